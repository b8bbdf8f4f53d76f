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

use proto::Role;
use proto::wire::ImageInfo;

use super::cache::Cache;
use super::definition::Definition;
use super::files::link_or_copy;
use super::lock::Lock;
use super::{BakeError, IoAt};
use crate::digest::sha256_hex;
use crate::progress::{self, Unit};
use crate::tools;

mod embedded {
    include!(concat!(env!("OUT_DIR"), "/image_files.rs"));
}

/// Units enabled in every image, and units that must not start before firstboot configured them.
const ENABLE: &[&str] =
    &["firstboot.service", "systemd-networkd.service", "systemd-resolved.service", "ssh-hostkeys.service"];
const DISABLE: &[&str] = &["etcd.service", "haproxy.service", "keepalived.service", "docker.service", "bird.service"];

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
        #[expect(clippy::expect_used, reason = "`dir` joined with a relative file path has a parent")]
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
    // A flat repository of exactly the locked packages, hard-linked from the cache. Its path
    // goes into a copy:// URI, which must be absolute: apt reads `copy://out/...` as host `out`
    // (a relative --out, the default, failed every cold bake this way).
    let repo = std::path::absolute(work.join("repo")).at(work)?;
    std::fs::create_dir_all(&repo).at(&repo)?;
    let mut include = Vec::new();
    for p in lock.packages_for(role) {
        let blob = cache.blob(&p.sha256);
        if !blob.is_file() {
            return Err(super::cache::CacheError::Missing {
                what: format!("{} {}", p.name, p.version),
                digest: format!("sha256:{}", p.sha256),
                cache: cache.root.display().to_string(),
            }
            .into());
        }
        let link = repo.join(p.file_name());
        link_or_copy(&blob, &link).at(&link)?;
        include.push(format!("{}={}", p.name, p.version));
    }
    let packages =
        tools::run(Command::new("dpkg-scanpackages").args(["-m", "."]).current_dir(&repo), "dpkg-scanpackages")?;
    std::fs::write(repo.join("Packages"), packages).at(repo.join("Packages"))?;
    let files = work.join("image-files");
    stage_image_files(&files).at(&files)?;
    let script = work.join("customize.sh");
    std::fs::write(&script, customize_script(def)).at(&script)?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).at(&script)?;

    let trees = cache.root.join("trees");
    let tmp = trees.join(format!("{key}.tmp"));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).at(&tmp)?;
    let root = tmp.join("root");
    let mut mm = Command::new("mmdebstrap");
    mm.env("SOURCE_DATE_EPOCH", epoch.to_string())
        // The kernel's postinst would make an initramfs without our boot method: it is made
        // once, by the customize hook.
        .env("INITRD", "No")
        // Verbose: apt's and dpkg's own lines come through, for progress and for the error.
        .args(["--mode=root", "--variant=custom", "--verbose", "--architectures=amd64"])
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
    mmdebstrap(&mut mm, &root, role, include.len() as u64)?;
    std::fs::write(tmp.join(".complete"), format!("{key}\n")).at(tmp.join(".complete"))?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).at(&dir)?;
    Ok(dir.join("root"))
}

/// How often mmdebstrap is tried when apt's index step fails (the one step that has failed
/// without a lasting cause; the error keeps apt's own lines either way).
const MMDEBSTRAP_ATTEMPTS: u32 = 3;

/// Runs mmdebstrap into `root`, showing how many of the packages dpkg has unpacked and then
/// configured. A failure of `apt-get update` is retried (and said so); any other is final.
fn mmdebstrap(cmd: &mut Command, root: &Path, role: Role, packages: u64) -> Result<(), BakeError> {
    for attempt in 1.. {
        let task = progress::global().task(format!("{role}: base tree"), Unit::Items(packages, "unpacked"));
        let (mut unpacked, mut configured) = (0u64, 0u64);
        let result = tools::stream(cmd, "mmdebstrap", |line| {
            if line.starts_with("Unpacking ") {
                unpacked += 1;
                task.set_position(unpacked);
            } else if line.starts_with("Setting up ") {
                if configured == 0 {
                    task.set_prefix("configured");
                }
                configured += 1;
                task.set_position(configured);
            }
        });
        match result {
            Ok(()) => {
                task.finish(format!("mmdebstrap: {unpacked} packages unpacked, {configured} configured, customized"));
                return Ok(());
            }
            Err(e) if attempt < MMDEBSTRAP_ATTEMPTS && e.to_string().contains("apt-get update") => {
                tracing::warn!(
                    "{role}: mmdebstrap's apt-get update failed (attempt {attempt} of {MMDEBSTRAP_ATTEMPTS}); retrying: {e}"
                );
                let _ = std::fs::remove_dir_all(root);
            }
            Err(e) => return Err(e.into()),
        }
    }
    unreachable!("the loop returns")
}

/// image.json: the image's name, role and component versions.
fn image_info(def: &Definition, role: Role) -> Vec<u8> {
    let components =
        def.components.iter().filter(|c| c.for_role(role)).map(|c| (c.name.clone(), c.version.clone())).collect();
    let info = ImageInfo {
        name: def.name.clone(),
        role,
        kubernetes_version: def.kubernetes.clone(),
        components,
        sandbox_image: super::oci::sandbox(def, role),
    };
    #[expect(clippy::expect_used, reason = "ImageInfo is strings, a role and a string map: JSON holds all of them")]
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
    let _ = writeln!(s, "images {}", sha256_hex(super::oci::pinned(def, role).as_bytes()));
    let _ = writeln!(s, "layer {} -> {}", proto::paths::BINARY, proto::paths::LAYER);
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
    if tools::run(Command::new("cp").args(["-a", "--link"]).arg(base).arg(&root), "cp").is_err() {
        let _ = std::fs::remove_dir_all(&root);
        tools::run(Command::new("cp").args(["-a", "--reflink=auto"]).arg(base).arg(&root), "cp")?;
    }
    let mut list = String::new();
    for c in def.components.iter().filter(|c| c.for_role(role)) {
        let locked = lock.require(&c.name)?;
        let blob = cache.blob(&locked.sha256);
        if let Some(oci) = &c.oci {
            list += &super::oci::list_line(oci, &super::oci::verify(&blob, oci)?);
        }
        let src_dir = if c.is_archive() {
            let x = work.join("extract").join(&c.name);
            std::fs::create_dir_all(&x).at(&x)?;
            tools::run(Command::new("tar").arg("-xf").arg(&blob).arg("-C").arg(&x), "tar")?;
            Some(x)
        } else {
            None
        };
        for inst in c.install.iter().filter(|i| i.roles.contains(&role)) {
            let target = proto::paths::under(&root, &inst.to);
            match (&src_dir, &inst.from) {
                (Some(x), Some(from)) if from.ends_with('/') => {
                    let from_dir = x.join(from);
                    std::fs::create_dir_all(&target).at(&target)?;
                    for e in std::fs::read_dir(&from_dir).at(&from_dir)? {
                        let e = e.at(&from_dir)?;
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
    let layer = proto::paths::under(&root, proto::paths::LAYER);
    std::fs::create_dir_all(&layer).at(&layer)?;
    let binary = proto::paths::under(&root, proto::paths::BINARY);
    let _ = std::fs::remove_file(&binary);
    std::os::unix::fs::symlink(Path::new(proto::paths::LAYER).join("firstboot"), &binary).at(&binary)?;
    let info_path = proto::paths::under(&root, proto::paths::IMAGE_INFO);
    #[expect(clippy::expect_used, reason = "a path under a root joined with an absolute node path has a parent")]
    std::fs::create_dir_all(info_path.parent().expect("has parent")).at(&info_path)?;
    let _ = std::fs::remove_file(&info_path);
    std::fs::write(&info_path, image_info(def, role)).at(&info_path)?;
    if !list.is_empty() {
        let list_path = proto::paths::under(&root, proto::paths::IMAGE_LIST);
        #[expect(clippy::expect_used, reason = "a path under a root joined with an absolute node path has a parent")]
        std::fs::create_dir_all(list_path.parent().expect("has parent")).at(&list_path)?;
        let _ = std::fs::remove_file(&list_path);
        std::fs::write(&list_path, list).at(&list_path)?;
    }
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
    let mkfs = tools::require("mkfs.erofs")?;
    let options = super::disk::erofs_options(uuid, epoch).join(" ");
    let tool = crate::digest::sha256_file(&mkfs).at(&mkfs)?;
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
    super::disk::erofs_step(&format!("{role}: root file system"), &root, &made, uuid, epoch)?;
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

/// The firstboot layer's tree: the binary alone, mounted at [`proto::paths::LAYER`].
pub fn firstboot_layer(firstboot: &Path, work: &Path) -> Result<PathBuf, BakeError> {
    let dir = work.join("firstboot-layer");
    let _ = std::fs::remove_dir_all(&dir);
    install_file(firstboot, &dir.join("firstboot"))?;
    Ok(dir)
}

fn install_file(src: &Path, dst: &Path) -> Result<(), BakeError> {
    let io = |e: std::io::Error| BakeError::Io {
        path: dst.to_path_buf(),
        error: std::io::Error::new(e.kind(), format!("from {}: {e}", src.display())),
    };
    let dir =
        dst.parent().ok_or_else(|| io(std::io::Error::new(std::io::ErrorKind::InvalidInput, "no parent directory")))?;
    std::fs::create_dir_all(dir).map_err(io)?;
    let _ = std::fs::remove_file(dst);
    std::fs::copy(src, dst).map_err(io)?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o755)).map_err(io)
}
