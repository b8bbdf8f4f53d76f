//! What a bake leaves in `out/<role>/` besides the disk: the PXE set, the OVA, manifest.json and
//! an SPDX SBOM.

use std::path::Path;

use proto::Role;
use serde_json::{Value, json};

use super::definition::Definition;
use super::files::link_or_copy;
use super::lock::Lock;
use super::{BakeError, IoAt, vmdk};
use crate::digest::sha256_file;
use crate::progress::{self, Unit};
use crate::{templates, tools};

/// The files of a PXE set, as `pxe/` holds them and `imgbuild serve` serves them.
pub const PXE_FILES: [&str; 5] = ["vmlinuz", "initrd.img", "rootfs.erofs", "firstboot.erofs", "boot.ipxe"];

/// `pxe/`: vmlinuz, initrd.img, rootfs.erofs, firstboot.erofs and boot.ipxe.
pub fn pxe(
    tree: &Path,
    rootfs: &Path,
    firstboot: &Path,
    dir: &Path,
    def: &Definition,
    role: Role,
) -> Result<(), BakeError> {
    std::fs::create_dir_all(dir).at(dir)?;
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(tree.join(f), dir.join(f)).at(dir.join(f))?;
    }
    // The kernel's EFI stub joins the files of its initrd= arguments as they are (pxe::initrds),
    // and the kernel reads a cpio archive after the initramfs only at a multiple of 4 bytes; it
    // skips zeros after a compressed archive.
    let initrd = dir.join("initrd.img");
    let len = std::fs::metadata(&initrd).at(&initrd)?.len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&initrd)
        .and_then(|f| f.set_len(len.next_multiple_of(4)))
        .at(&initrd)?;
    for (src, name) in [(rootfs, "rootfs.erofs"), (firstboot, "firstboot.erofs")] {
        link_or_copy(src, &dir.join(name)).at(dir.join(name))?;
    }
    let script = templates::render(
        "boot.ipxe",
        json!({"role": role, "image": def.name, "cmdline": crate::pxe::cmdline(crate::pxe::PxeRoot::Initrd, None)}),
    )
    .map_err(|e| BakeError::Output(format!("boot.ipxe: {e:#}")))?;
    std::fs::write(dir.join("boot.ipxe"), script).at(dir.join("boot.ipxe"))
}

/// `disk.qcow2` from `disk.raw`, with qemu-img's own progress meter shown.
pub fn qcow2(raw: &Path, out: &Path, role: Role) -> Result<(), BakeError> {
    let task = progress::global().task(format!("{role}: disk.qcow2"), Unit::Items(100, "%"));
    tools::stream(
        std::process::Command::new("qemu-img").args(["convert", "-p", "-f", "raw", "-O", "qcow2"]).arg(raw).arg(out),
        "qemu-img",
        // "    (42.00/100%)"
        |line| {
            let pct =
                line.trim().strip_prefix('(').and_then(|l| l.split('/').next()).and_then(|p| p.parse::<f64>().ok());
            if let Some(p) = pct {
                task.set_position(p as u64);
            }
        },
    )?;
    let size = std::fs::metadata(out).at(out)?.len();
    task.finish(format!("qemu-img convert, {}", progress::mib(size)));
    Ok(())
}

/// zlib level of the OVA's grains: the fastest. The root partition is lz4-compressed already, so
/// higher levels cost several times the CPU for a few percent of size (the issue note has the
/// one-off measurement; BENCHMARKS.md the OVA sizes this gives).
const VMDK_COMPRESSION: flate2::Compression = flate2::Compression::fast();

/// `<role>.ova`: OVF descriptor (with the guestinfo vApp properties), manifest, and a
/// stream-optimized VMDK, in that order in a ustar archive. The VMDK is compressed straight into
/// the archive, at an offset reserved for the two small members before it: those are written last,
/// once the VMDK's size and digest are known. The descriptor is padded with trailing spaces to the
/// length it has with the longest possible size, so the offset does not depend on the digits.
pub fn ova(disk_raw: &Path, dir: &Path, def: &Definition, role: Role, epoch: i64) -> Result<(), BakeError> {
    use std::io::{Seek, SeekFrom};
    use std::os::unix::fs::FileExt;

    let name = format!("{}-{role}", def.name);
    let (vmdk, ovf_name, mf_name) = (format!("{name}-disk1.vmdk"), format!("{name}.ovf"), format!("{name}.mf"));
    let path = dir.join(format!("{role}.ova"));
    let io = |error: std::io::Error| BakeError::Io { path: path.clone(), error };
    let capacity = std::fs::metadata(disk_raw).map(|m| m.len()).unwrap_or(0);
    let descriptor = |vmdk_size: u64| {
        templates::render(
            "ova.ovf",
            json!({
                "name": name, "role": role, "image": def.name, "description": def.description,
                "vmdk": vmdk, "vmdk_size": vmdk_size, "capacity": capacity,
                "guest_os": if def.base.distribution == "ubuntu" { "ubuntu64Guest" } else { "debian12_64Guest" },
                "cpus": 2, "memory_mib": if role == Role::Master { 4096 } else { 2048 },
            }),
        )
        .map_err(|e| BakeError::Output(format!("ova.ovf: {e:#}")))
    };
    let manifest = |ovf_sha256: &str, vmdk_sha256: &str| {
        format!("SHA256({ovf_name})= {ovf_sha256}\nSHA256({vmdk})= {vmdk_sha256}\n")
    };
    let ovf_len = descriptor(u64::MAX)?.len() as u64;
    let mf_len = manifest(&"0".repeat(64), &"0".repeat(64)).len() as u64;
    let vmdk_at = 3 * TAR_BLOCK + ovf_len.next_multiple_of(TAR_BLOCK) + mf_len.next_multiple_of(TAR_BLOCK);

    let mut file = std::fs::File::create(&path).map_err(io)?;
    file.seek(SeekFrom::Start(vmdk_at)).map_err(io)?;
    let task = progress::global().task(format!("{role}: {role}.ova"), Unit::Bytes(capacity));
    let written = vmdk::write(disk_raw, &mut file, &vmdk, VMDK_COMPRESSION, Some(&task)).map_err(io)?;
    if written.size >= 1 << 33 {
        return Err(BakeError::Output(format!("{vmdk}: {} bytes is beyond a ustar member's 8 GiB", written.size)));
    }
    // Ends: the VMDK's padding, two zero blocks, and zeros to a whole 10 KiB record, as tar does.
    let end = (vmdk_at + written.size).next_multiple_of(TAR_BLOCK) + 2 * TAR_BLOCK;
    let end = end.next_multiple_of(20 * TAR_BLOCK);
    file.set_len(end).map_err(io)?;

    let mut ovf = descriptor(written.size)?;
    ovf.insert_str(ovf.trim_end().len(), &" ".repeat(ovf_len as usize - ovf.len()));
    let mf = manifest(&crate::digest::sha256_hex(ovf.as_bytes()), &written.sha256);
    debug_assert_eq!(mf.len() as u64, mf_len);
    let mut head = Vec::with_capacity(vmdk_at as usize);
    for (member, data) in [(&ovf_name, ovf.as_bytes()), (&mf_name, mf.as_bytes())] {
        head.extend_from_slice(&tar_header(member, data.len() as u64, epoch)?);
        head.extend_from_slice(data);
        head.resize(head.len().next_multiple_of(TAR_BLOCK as usize), 0);
    }
    head.extend_from_slice(&tar_header(&vmdk, written.size, epoch)?);
    debug_assert_eq!(head.len() as u64, vmdk_at);
    file.write_all_at(&head, 0).map_err(io)?;
    task.finish(format!("stream-optimized VMDK of {}, OVA {}", progress::mib(capacity), progress::mib(end)));
    Ok(())
}

const TAR_BLOCK: u64 = 512;

/// A ustar header for a regular file (mode 0644, owner and group 0, no names), as
/// `tar --format=ustar --owner=0 --group=0 --numeric-owner --mtime=@EPOCH` writes it (but for
/// the checksum's digits: the `tar` crate writes seven and a NUL, GNU tar six, a NUL and a space;
/// POSIX allows both).
fn tar_header(name: &str, size: u64, mtime: i64) -> Result<[u8; 512], BakeError> {
    let mut h = tar::Header::new_ustar();
    h.set_path(name).map_err(|e| BakeError::Output(format!("{name}: not a ustar member name: {e}")))?;
    h.set_entry_type(tar::EntryType::Regular);
    h.set_mode(0o644);
    h.set_uid(0);
    h.set_gid(0);
    h.set_size(size);
    h.set_mtime(mtime.max(0) as u64);
    h.set_device_major(0).map_err(|e| BakeError::Output(e.to_string()))?;
    h.set_device_minor(0).map_err(|e| BakeError::Output(e.to_string()))?;
    h.set_cksum();
    Ok(*h.as_bytes())
}

/// A file's entry for manifest.json.
pub fn file_entry(dir: &Path, rel: &str) -> Result<Value, BakeError> {
    let p = dir.join(rel);
    let s256 = sha256_file(&p).at(&p)?;
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
        "images": super::oci::for_role(def, role).map(|o| json!({"reference": o.reference, "digest": o.digest, "archive": o.archive_path(), "sandbox": o.sandbox})).collect::<Vec<_>>(),
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
    for (oci, c) in def
        .components
        .iter()
        .filter(|c| c.for_role(role))
        .filter_map(|c| lock.component(&c.name).map(|locked| (c.oci.as_ref(), locked)))
    {
        let id = spdx_id("Component", &format!("{}-{}", c.name, c.version));
        let mut package = json!({
            "SPDXID": id, "name": c.name, "versionInfo": c.version,
            "downloadLocation": if c.source.starts_with("http") { c.source.clone() } else { "NOASSERTION".to_string() },
            "filesAnalyzed": false, "checksums": [{"algorithm": "SHA256", "checksumValue": c.sha256}],
            "licenseConcluded": "NOASSERTION", "licenseDeclared": "NOASSERTION", "copyrightText": "NOASSERTION",
        });
        if let Some(oci) = oci {
            // An OCI image by its manifest digest (purl-spec's `oci` type).
            package["primaryPackagePurpose"] = json!("CONTAINER");
            package["externalRefs"] = json!([{"referenceCategory": "PACKAGE-MANAGER", "referenceType": "purl",
                "referenceLocator": format!("pkg:oci/{}@{}?repository_url={}&tag={}", oci.name(), oci.digest.replace(':', "%3A"), oci.repository, oci.tag)}]);
        }
        packages.push(package);
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

#[cfg(test)]
mod tests {
    use super::*;

    /// What a hypervisor reads: a ustar archive (read here by GNU tar) of the descriptor first,
    /// then the manifest whose digests match, then a VMDK that qemu-img converts back to the disk.
    #[test]
    fn the_ova_is_a_tar_of_descriptor_manifest_and_vmdk() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let (def, _) = Definition::load(&root.join("images/debian-12.toml")).unwrap();
        let raw = d.path().join("disk.raw");
        let f = std::fs::File::create(&raw).unwrap();
        f.set_len(9 << 20).unwrap();
        let mut noise = vec![0u8; 1 << 20];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut noise).unwrap();
        f.write_all_at(&noise, 3 << 20).unwrap();
        drop(f);
        ova(&raw, d.path(), &def, Role::Worker, 1_700_000_000).unwrap();
        let archive = d.path().join("worker.ova");
        assert_eq!(std::fs::metadata(&archive).unwrap().len() % 10240, 0, "whole tar records");

        let tar = |args: &[&str]| {
            let o = std::process::Command::new("tar").args(args).current_dir(d.path()).output().unwrap();
            assert!(o.status.success(), "tar {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        };
        let name = format!("{}-worker", def.name);
        let members: Vec<String> = tar(&["-tf", "worker.ova"]).lines().map(String::from).collect();
        assert_eq!(members, [format!("{name}.ovf"), format!("{name}.mf"), format!("{name}-disk1.vmdk")]);
        let listing = tar(&["--numeric-owner", "--full-time", "-tvf", "worker.ova"]);
        assert!(listing.lines().all(|l| l.starts_with("-rw-r--r-- 0/0")), "{listing}");
        std::fs::create_dir(d.path().join("x")).unwrap();
        tar(&["-xf", "worker.ova", "-C", "x"]);

        let x = d.path().join("x");
        let vmdk = x.join(format!("{name}-disk1.vmdk"));
        let ovf = std::fs::read_to_string(x.join(format!("{name}.ovf"))).unwrap();
        let size = std::fs::metadata(&vmdk).unwrap().len();
        assert!(ovf.contains(&format!("ovf:size=\"{size}\"")), "the descriptor names the VMDK's size {size}");
        assert!(ovf.trim_end().ends_with("</Envelope>"));
        let mf = std::fs::read_to_string(x.join(format!("{name}.mf"))).unwrap();
        for member in [format!("{name}.ovf"), format!("{name}-disk1.vmdk")] {
            let digest = crate::digest::sha256_file(&x.join(&member)).unwrap();
            assert!(mf.contains(&format!("SHA256({member})= {digest}\n")), "{mf}");
        }
        let back = d.path().join("back.raw");
        let o = std::process::Command::new("qemu-img")
            .args(["convert", "-f", "vmdk", "-O", "raw"])
            .arg(&vmdk)
            .arg(&back)
            .output()
            .expect("qemu-img (qemu-utils)");
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(std::fs::read(&back).unwrap(), std::fs::read(&raw).unwrap());
    }
}
