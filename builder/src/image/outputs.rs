//! What a bake leaves in `out/<role>/` besides the disk: the PXE set, the OVA, manifest.json and
//! an SPDX SBOM.

use std::path::Path;
use std::process::Command;

use firstboot::Role;
use serde_json::{Value, json};

use super::cache::sha256_file;
use super::definition::Definition;
use super::lock::Lock;
use super::{BakeError, run, vmdk};
use crate::templates;

/// The PXE kernel command line (the root image comes as an initrd: RAM mode).
pub fn pxe_cmdline() -> String {
    "boot=imgbuild imgbuild.root=/rootfs.erofs console=tty0 console=ttyS0,115200 systemd.show_status=1".into()
}

fn link_or_copy(src: &Path, dst: &Path) -> Result<(), BakeError> {
    let _ = std::fs::remove_file(dst);
    std::fs::hard_link(src, dst)
        .or_else(|_| std::fs::copy(src, dst).map(|_| ()))
        .map_err(|e| BakeError::Io(format!("{}: {e}", dst.display())))
}

/// `pxe/`: vmlinuz, initrd.img, rootfs.erofs and boot.ipxe.
pub fn pxe(tree: &Path, rootfs: &Path, dir: &Path, def: &Definition, role: Role) -> Result<(), BakeError> {
    std::fs::create_dir_all(dir).map_err(|e| BakeError::Io(e.to_string()))?;
    std::fs::copy(tree.join("vmlinuz"), dir.join("vmlinuz")).map_err(|e| BakeError::Io(format!("vmlinuz: {e}")))?;
    std::fs::copy(tree.join("initrd.img"), dir.join("initrd.img"))
        .map_err(|e| BakeError::Io(format!("initrd.img: {e}")))?;
    link_or_copy(rootfs, &dir.join("rootfs.erofs"))?;
    let script = templates::render("boot.ipxe", json!({"role": role, "image": def.name, "cmdline": pxe_cmdline()}))
        .map_err(|e| BakeError::Io(format!("boot.ipxe: {e}")))?;
    std::fs::write(dir.join("boot.ipxe"), script).map_err(|e| BakeError::Io(e.to_string()))
}

/// zlib level of the OVA's grains: the fastest. The root partition is lz4-compressed already, so
/// higher levels cost several times the CPU for a few percent of size (the issue note has the
/// one-off measurement; BENCHMARKS.md the OVA sizes this gives).
const VMDK_COMPRESSION: flate2::Compression = flate2::Compression::fast();

/// `<role>.ova`: OVF descriptor (with the guestinfo vApp properties), manifest, and a
/// stream-optimized VMDK, in that order in a ustar archive.
pub fn ova(
    disk_raw: &Path,
    dir: &Path,
    work: &Path,
    def: &Definition,
    role: Role,
    epoch: i64,
) -> Result<(), BakeError> {
    let name = format!("{}-{role}", def.name);
    let stage = work.join("ova");
    std::fs::create_dir_all(&stage).map_err(|e| BakeError::Io(e.to_string()))?;
    let vmdk = format!("{name}-disk1.vmdk");
    let written = vmdk::from_raw(disk_raw, &stage.join(&vmdk), &vmdk, VMDK_COMPRESSION)
        .map_err(|e| BakeError::Io(format!("{vmdk}: {e}")))?;
    let size = |p: &Path| std::fs::metadata(p).map(|m| m.len()).unwrap_or(0);
    let ovf = templates::render(
        "ova.ovf",
        json!({
            "name": name, "role": role, "image": def.name, "description": def.description,
            "vmdk": vmdk, "vmdk_size": written.size, "capacity": size(disk_raw),
            "guest_os": if def.base.distribution == "ubuntu" { "ubuntu64Guest" } else { "debian12_64Guest" },
            "cpus": 2, "memory_mib": if role == Role::Master { 4096 } else { 2048 },
        }),
    )
    .map_err(|e| BakeError::Io(format!("ova.ovf: {e}")))?;
    let ovf_name = format!("{name}.ovf");
    std::fs::write(stage.join(&ovf_name), &ovf).map_err(|e| BakeError::Io(e.to_string()))?;
    let ovf_sha256 = super::lock::sha256_hex(ovf.as_bytes());
    let mf = format!("SHA256({ovf_name})= {ovf_sha256}\nSHA256({vmdk})= {}\n", written.sha256);
    let mf_name = format!("{name}.mf");
    std::fs::write(stage.join(&mf_name), mf).map_err(|e| BakeError::Io(e.to_string()))?;
    run(
        Command::new("tar")
            .args(["--format=ustar", "--owner=0", "--group=0", "--numeric-owner", &format!("--mtime=@{epoch}"), "-cf"])
            .arg(dir.join(format!("{role}.ova")))
            .arg("-C")
            .arg(&stage)
            .args([&ovf_name, &mf_name, &vmdk]),
        "tar",
    )?;
    Ok(())
}

/// A file's entry for manifest.json.
pub fn file_entry(dir: &Path, rel: &str) -> Result<Value, BakeError> {
    let p = dir.join(rel);
    let s256 = sha256_file(&p).map_err(|e| BakeError::Io(format!("{}: {e}", p.display())))?;
    let size = std::fs::metadata(&p).map(|m| m.len()).unwrap_or(0);
    Ok(json!({"path": rel, "sha256": s256, "size": size}))
}

/// manifest.json: every package, component and output of the image.
pub fn manifest(
    def: &Definition,
    lock: &Lock,
    role: Role,
    firstboot: &Value,
    lock_sha256: &str,
    outputs: Vec<Value>,
    epoch: i64,
) -> Value {
    json!({
        "image": def.name,
        "role": role,
        "kubernetes": def.kubernetes,
        "lock": {"sha256": lock_sha256},
        "sourceDateEpoch": epoch,
        "packages": lock.packages_for(role).map(|p| json!({"name": p.name, "version": p.version, "arch": p.arch, "sha256": p.sha256, "size": p.size})).collect::<Vec<_>>(),
        "components": def.components.iter().filter(|c| c.for_role(role)).filter_map(|c| lock.component(&c.name)).map(|c| json!({"name": c.name, "version": c.version, "source": c.source, "sha256": c.sha256, "size": c.size})).collect::<Vec<_>>(),
        "firstboot": firstboot,
        "outputs": outputs,
    })
}

/// An SPDX 2.3 document describing the image and everything in it.
pub fn sbom(def: &Definition, lock: &Lock, role: Role, lock_sha256: &str, epoch: i64) -> Value {
    let created = time::OffsetDateTime::from_unix_timestamp(epoch)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default();
    let spdx_id = |kind: &str, name: &str| {
        format!("SPDXRef-{kind}-{}", name.replace(|c: char| !c.is_ascii_alphanumeric() && c != '.' && c != '-', "-"))
    };
    let image_id = spdx_id("Image", &format!("{}-{role}", def.name));
    let mut packages = vec![json!({
        "SPDXID": image_id, "name": format!("{}-{role}", def.name), "versionInfo": lock_sha256,
        "downloadLocation": "NOASSERTION", "filesAnalyzed": false, "primaryPackagePurpose": "OPERATING-SYSTEM",
        "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
    })];
    let mut relationships = vec![
        json!({"spdxElementId": "SPDXRef-DOCUMENT", "relationshipType": "DESCRIBES", "relatedSpdxElement": image_id}),
    ];
    for p in lock.packages_for(role) {
        let id = spdx_id("Package", &format!("{}-{}", p.name, p.version));
        packages.push(json!({
            "SPDXID": id, "name": p.name, "versionInfo": p.version, "downloadLocation": p.url, "filesAnalyzed": false,
            "checksums": [{"algorithm": "SHA256", "checksumValue": p.sha256}],
            "externalRefs": [{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl", "referenceLocator": format!("pkg:deb/{}/{}@{}?arch={}", def.base.distribution, p.name, p.version, p.arch)}],
            "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
        }));
        relationships
            .push(json!({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": id}));
    }
    for c in def.components.iter().filter(|c| c.for_role(role)).filter_map(|c| lock.component(&c.name)) {
        let id = spdx_id("Component", &format!("{}-{}", c.name, c.version));
        packages.push(json!({
            "SPDXID": id, "name": c.name, "versionInfo": c.version,
            "downloadLocation": if c.source.starts_with("http") { c.source.clone() } else { "NOASSERTION".to_string() },
            "filesAnalyzed": false, "checksums": [{"algorithm": "SHA256", "checksumValue": c.sha256}],
            "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
        }));
        relationships
            .push(json!({"spdxElementId": image_id, "relationshipType": "CONTAINS", "relatedSpdxElement": id}));
    }
    json!({
        "spdxVersion": "SPDX-2.3",
        "dataLicense": "CC0-1.0",
        "SPDXID": "SPDXRef-DOCUMENT",
        "name": format!("{}-{role}", def.name),
        "documentNamespace": format!("https://imgbuild.k8s.org/spdx/{}-{role}-{lock_sha256}", def.name),
        "creationInfo": {"created": created, "creators": [format!("Tool: imgbuild-{}", env!("CARGO_PKG_VERSION"))]},
        "packages": packages,
        "relationships": relationships,
    })
}
