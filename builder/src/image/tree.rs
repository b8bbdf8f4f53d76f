//! Root trees. The base tree of a role is mmdebstrap's work: the exact locked packages, installed
//! from a local repository of cached .debs (no network), then customised (trimmed, the image
//! files from manifests/image/ added, the initramfs made once, units enabled, every machine
//! identity removed). It is cached under the digest of all that goes into it, so rebuilding an
//! image whose packages did not change skips it. The role tree is a copy of it plus the
//! components and image.json; its root file system is cached under the digest of its inputs
//! ([`role_key`]). firstboot goes in a layer of its own ([`firstboot_layer`]), so a new firstboot
//! reuses the root file system.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use firstboot::Role;
use firstboot::proto::ImageInfo;

use super::cache::Cache;
use super::definition::Definition;
use super::lock::{Lock, sha256_hex};
use super::{BakeError, link_or_copy, run};

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/image_files.rs"));
}

/// Units enabled in every image, and units that must not start before firstboot configured them.
const ENABLE: &[&str] =
    &["firstboot.service", "systemd-networkd.service", "systemd-resolved.service", "ssh-hostkeys.service"];
const DISABLE: &[&str] = &["etcd.service", "haproxy.service", "keepalived.service", "docker.service"];

/// The digest of everything that goes into a role's base tree.
fn base_key(def: &Definition, lock: &Lock, role: Role, epoch: i64) -> String {
    let mut s = format!("v1 {} {role} epoch={epoch}\n", def.name);
    for p in lock.packages_for(role) {
        let _ = writeln!(s, "pkg {} {} {}", p.name, p.version, p.sha256);
    }
    for t in &def.packages.trim {
        let _ = writeln!(s, "trim {t}");
    }
    for (path, contents, mode) in embedded::IMAGE_FILES {
        let _ = writeln!(s, "file {path} {mode:o} {}", sha256_hex(contents.as_bytes()));
    }
    let _ = writeln!(s, "customize {}", sha256_hex(customize_script(def).as_bytes()));
    sha256_hex(s.as_bytes())
}

/// The customize hook mmdebstrap runs inside the new root (`$1`).
fn customize_script(def: &Definition) -> String {
    let trim: Vec<String> = def.packages.trim.iter().map(|t| format!("rm -rf -- {t}")).collect();
    format!(
        r#"#!/bin/sh
set -eu
root="$1"
cd "$root"
{trim}
kver=$(ls usr/lib/modules | head -n 1)
chroot "$root" depmod -a "$kver"
chroot "$root" update-initramfs -c -k "$kver" >/dev/null
ln -sf "boot/vmlinuz-$kver" vmlinuz
ln -sf "boot/initrd.img-$kver" initrd.img
systemctl --root="$root" enable {enable} >/dev/null 2>&1
for u in {disable}; do systemctl --root="$root" disable "$u" >/dev/null 2>&1 || true; done
systemctl --root="$root" enable docker.socket >/dev/null 2>&1 || true
# apt as an operator expects it: the definition's mirror, not the bake's local repository.
cat > etc/apt/sources.list <<'SOURCES'
{sources}
SOURCES
# No identity and no secret in an image: machine-id, host keys and hostname come at first boot.
: > etc/machine-id
rm -f var/lib/dbus/machine-id etc/ssh/ssh_host_* etc/hostname
ln -sf ../run/systemd/resolve/stub-resolv.conf etc/resolv.conf
rm -rf var/log/* var/cache/apt/* var/lib/apt/lists/* var/cache/debconf/*-old var/lib/dpkg/*-old tmp/*
"#,
        trim = trim.join("\n"),
        sources = def.sources(Path::new(&def.base.keyring.path)).join("\n"),
        enable = ENABLE.join(" "),
        disable = DISABLE.join(" "),
    )
}

/// Writes manifests/image/ into `dir` with the files' modes.
fn stage_image_files(dir: &Path) -> std::io::Result<()> {
    for (path, contents, mode) in embedded::IMAGE_FILES {
        let p = dir.join(path);
        std::fs::create_dir_all(p.parent().expect("relative path has a parent"))?;
        std::fs::write(&p, contents)?;
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(*mode))?;
    }
    Ok(())
}

/// The role's base tree, from the cache (unless `fresh`) or built now. Returns its path (read
/// it, do not change it).
pub fn base_tree(
    def: &Definition,
    lock: &Lock,
    role: Role,
    cache: &Cache,
    epoch: i64,
    work: &Path,
    fresh: bool,
) -> Result<PathBuf, BakeError> {
    let key = base_key(def, lock, role, epoch);
    let dir = cache.root.join("trees").join(&key);
    if !fresh && dir.join(".complete").exists() {
        tracing::info!("{role}: base tree from the cache ({})", &key[..12]);
        return Ok(dir.join("root"));
    }
    let io = |what: &str, e: std::io::Error| BakeError::Io(format!("{what}: {e}"));
    // A flat repository of exactly the locked packages, hard-linked from the cache.
    let repo = work.join("repo");
    std::fs::create_dir_all(&repo).map_err(|e| io("repo", e))?;
    let mut include = Vec::new();
    for p in lock.packages_for(role) {
        let blob = cache.blob(&p.sha256);
        if !blob.is_file() {
            return Err(BakeError::Io(format!("{} {} is not in the cache: run `imgbuild fetch`", p.name, p.version)));
        }
        let link = repo.join(p.file_name());
        link_or_copy(&blob, &link).map_err(|e| io("repo", e))?;
        include.push(format!("{}={}", p.name, p.version));
    }
    let packages = run(Command::new("dpkg-scanpackages").args(["-m", "."]).current_dir(&repo), "dpkg-scanpackages")?;
    std::fs::write(repo.join("Packages"), packages).map_err(|e| io("repo", e))?;
    let files = work.join("image-files");
    stage_image_files(&files).map_err(|e| io("image files", e))?;
    let script = work.join("customize.sh");
    std::fs::write(&script, customize_script(def)).map_err(|e| io("customize.sh", e))?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).map_err(|e| io("customize.sh", e))?;

    let tmp = cache.root.join("trees").join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| io("trees", e))?;
    let root = tmp.join("root");
    tracing::info!("{role}: mmdebstrap ({} packages, from the cache)", include.len());
    let mut mm = Command::new("mmdebstrap");
    mm.env("SOURCE_DATE_EPOCH", epoch.to_string())
        // The kernel's postinst would make an initramfs without our boot method: it is made
        // once, by the customize hook.
        .env("INITRD", "No")
        .args(["--mode=root", "--variant=custom", "--quiet", "--architectures=amd64"])
        .arg(format!("--include={}", include.join(",")))
        .args(["--dpkgopt=force-unsafe-io", "--aptopt=Acquire::Languages \"none\""])
        .args(["--dpkgopt=path-exclude=/usr/share/man/*", "--dpkgopt=path-exclude=/usr/share/doc/*"])
        .args(["--dpkgopt=path-include=/usr/share/doc/*/copyright", "--dpkgopt=path-exclude=/usr/share/locale/*"])
        .args(["--dpkgopt=path-exclude=/usr/share/info/*"])
        .arg(format!("--customize-hook=sync-in {} /", files.display()))
        .arg(format!("--customize-hook={}", script.display()))
        .arg(&def.base.suite)
        .arg(&root)
        .arg(format!("deb [trusted=yes] copy://{} ./", repo.display()));
    run(&mut mm, "mmdebstrap")?;
    std::fs::write(tmp.join(".complete"), format!("{key}\n")).map_err(|e| io("trees", e))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| io("trees", e))?;
    Ok(dir.join("root"))
}

/// image.json: the image's name, role and component versions.
fn image_info(def: &Definition, role: Role) -> Vec<u8> {
    let components =
        def.components.iter().filter(|c| c.for_role(role)).map(|c| (c.name.clone(), c.version.clone())).collect();
    let info = ImageInfo { name: def.name.clone(), role, kubernetes_version: def.kubernetes.clone(), components };
    serde_json::to_vec_pretty(&info).expect("serializes")
}

/// The digest of everything that goes into a role tree: its base tree, every component file
/// with where it goes, image.json, and what [`role_tree`] does with them (its version: bump it
/// when that changes).
pub fn role_key(def: &Definition, lock: &Lock, role: Role, epoch: i64) -> Result<String, BakeError> {
    let mut s = format!("v1 role tree\nbase {}\n", base_key(def, lock, role, epoch));
    for c in def.components.iter().filter(|c| c.for_role(role)) {
        let locked = lock.require(&c.name)?;
        for inst in c.install.iter().filter(|i| i.roles.contains(&role)) {
            let _ = writeln!(s, "component {} {} {:?} -> {}", c.name, locked.sha256, inst.from, inst.to);
        }
    }
    let _ = writeln!(s, "image.json {}", sha256_hex(&image_info(def, role)));
    let _ = writeln!(s, "layer {} -> {}", firstboot::paths::BINARY, firstboot::paths::LAYER);
    Ok(sha256_hex(s.as_bytes()))
}

/// The base tree (hard-linked) with the role's components, image.json, and the mount point of
/// the firstboot layer with `/usr/bin/firstboot` linked into it.
pub fn role_tree(
    def: &Definition,
    lock: &Lock,
    role: Role,
    base: &Path,
    cache: &Cache,
    work: &Path,
) -> Result<PathBuf, BakeError> {
    let root = work.join("root");
    let _ = std::fs::remove_dir_all(&root);
    // Hard links where the output is on the cache's filesystem (a copy elsewhere): the role tree
    // shares the cached base tree's files, so everything below replaces a file (remove, then
    // create) and never writes into one.
    if run(Command::new("cp").args(["-a", "--link"]).arg(base).arg(&root), "cp").is_err() {
        let _ = std::fs::remove_dir_all(&root);
        run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(base).arg(&root), "cp")?;
    }
    let io = |what: String, e: std::io::Error| BakeError::Io(format!("{what}: {e}"));
    for c in def.components.iter().filter(|c| c.for_role(role)) {
        let locked = lock.require(&c.name)?;
        let blob = cache.blob(&locked.sha256);
        let src_dir = if c.is_archive() {
            let x = work.join("extract").join(&c.name);
            std::fs::create_dir_all(&x).map_err(|e| io(c.name.clone(), e))?;
            run(Command::new("tar").arg("-xf").arg(&blob).arg("-C").arg(&x), "tar")?;
            Some(x)
        } else {
            None
        };
        for inst in c.install.iter().filter(|i| i.roles.contains(&role)) {
            let target = firstboot::paths::under(&root, &inst.to);
            match (&src_dir, &inst.from) {
                (Some(x), Some(from)) if from.ends_with('/') => {
                    let from_dir = x.join(from);
                    std::fs::create_dir_all(&target).map_err(|e| io(inst.to.clone(), e))?;
                    for e in std::fs::read_dir(&from_dir).map_err(|e| io(from.clone(), e))? {
                        let e = e.map_err(|e| io(from.clone(), e))?;
                        if e.file_type().map(|t| t.is_file()).unwrap_or(false) {
                            install_file(&e.path(), &target.join(e.file_name()))?;
                        }
                    }
                }
                (Some(x), Some(from)) => install_file(&x.join(from), &target)?,
                _ => install_file(&blob, &target)?,
            }
        }
    }
    let layer = firstboot::paths::under(&root, firstboot::paths::LAYER);
    std::fs::create_dir_all(&layer).map_err(|e| io(layer.display().to_string(), e))?;
    let binary = firstboot::paths::under(&root, firstboot::paths::BINARY);
    let _ = std::fs::remove_file(&binary);
    std::os::unix::fs::symlink(Path::new(firstboot::paths::LAYER).join("firstboot"), &binary)
        .map_err(|e| io(binary.display().to_string(), e))?;
    let info_path = firstboot::paths::under(&root, firstboot::paths::IMAGE_INFO);
    std::fs::create_dir_all(info_path.parent().expect("has parent")).map_err(|e| io("image.json".into(), e))?;
    let _ = std::fs::remove_file(&info_path);
    std::fs::write(&info_path, image_info(def, role)).map_err(|e| io("image.json".into(), e))?;
    Ok(root)
}

/// The role's root file system, as `work/root.erofs`: linked from the cache when nothing that
/// goes into its tree changed (unless `fresh`), else made now from a new role tree and kept in the
/// cache, one per image and role. The bake holds its own link, so a concurrent bake pruning the
/// cache cannot take it away; the file is never written to once made.
#[allow(clippy::too_many_arguments)]
pub fn root_image(
    def: &Definition,
    lock: &Lock,
    role: Role,
    base: &Path,
    cache: &Cache,
    uuid: &str,
    epoch: i64,
    work: &Path,
    fresh: bool,
) -> Result<PathBuf, BakeError> {
    let io = |what: &Path, e: std::io::Error| BakeError::Io(format!("{}: {e}", what.display()));
    let mkfs = super::require_tool("mkfs.erofs")?;
    let options = super::disk::erofs_options(uuid, epoch).join(" ");
    let tool = super::cache::sha256_file(&mkfs).map_err(|e| io(&mkfs, e))?;
    let key = sha256_hex(
        format!("v1 root\ntree {}\nmkfs.erofs {tool} {options}\n", role_key(def, lock, role, epoch)?).as_bytes(),
    );
    let dir = cache.root.join("roots");
    let prefix = format!("{}-{role}-", def.name);
    let cached = dir.join(format!("{prefix}{key}.erofs"));
    let made = work.join("root.erofs");
    if !fresh && link_or_copy(&cached, &made).is_ok() {
        tracing::info!("{role}: root file system from the cache ({})", &key[..12]);
        return Ok(made);
    }
    let root = role_tree(def, lock, role, base, cache, work)?;
    super::disk::erofs(&root, &made, uuid, epoch)?;
    // A root that cannot be kept costs the next bake time, not this one its result.
    if let Err(e) = keep(&made, &dir, &prefix, &key) {
        tracing::warn!("{role}: the root file system is not kept in the cache: {e}");
    }
    Ok(made)
}

/// Puts a root file system into the cache as `<prefix><key>.erofs` (durably, all or nothing) and
/// drops the image's and role's earlier roots: only the newest is worth its space.
fn keep(made: &Path, dir: &Path, prefix: &str, key: &str) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join(format!(".{prefix}{}.tmp", std::process::id()));
    let kept = link_or_copy(made, &tmp)
        .and_then(|_| std::fs::File::open(&tmp)?.sync_all())
        .and_then(|_| std::fs::rename(&tmp, dir.join(format!("{prefix}{key}.erofs"))));
    if kept.is_err() {
        let _ = std::fs::remove_file(&tmp);
        return kept;
    }
    for e in std::fs::read_dir(dir)?.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let old_key = name.strip_prefix(prefix).and_then(|n| n.strip_suffix(".erofs"));
        if old_key.is_some_and(|k| k != key && k.len() == 64 && k.bytes().all(|b| b.is_ascii_hexdigit())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// The firstboot layer's tree: the binary alone, mounted at [`firstboot::paths::LAYER`].
pub fn firstboot_layer(firstboot: &Path, work: &Path) -> Result<PathBuf, BakeError> {
    let dir = work.join("firstboot-layer");
    let _ = std::fs::remove_dir_all(&dir);
    install_file(firstboot, &dir.join("firstboot"))?;
    Ok(dir)
}

fn install_file(src: &Path, dst: &Path) -> Result<(), BakeError> {
    let io = |e: std::io::Error| BakeError::Io(format!("{} -> {}: {e}", src.display(), dst.display()));
    std::fs::create_dir_all(dst.parent().expect("absolute path has a parent")).map_err(io)?;
    let _ = std::fs::remove_file(dst);
    std::fs::copy(src, dst).map_err(io)?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).map_err(io)
}
