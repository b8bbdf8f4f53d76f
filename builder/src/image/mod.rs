//! The main job: bake a bootable, immutable image per role.
//!
//! definition + lock → cache (every input verified) → base tree (mmdebstrap, cached) → role
//! tree → erofs root (cached) → + firstboot layer, ESP, state → GPT disk.raw → qcow2, OVA, PXE
//! set, manifest.json, SBOM.
//! Everything is built in `out/.<role>.tmp-<pid>` and renamed to `out/<role>` at the end, so a
//! failed bake leaves nothing half-written.

pub mod cache;
pub mod definition;
pub mod disk;
pub mod lock;
pub mod outputs;
pub mod tree;
pub mod vmdk;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use firstboot::Role;
use futures_util::StreamExt;

use self::cache::{Cache, Digest};
use self::definition::Definition;
use self::lock::Lock;

#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    #[error(
        "host tool {tool} is missing or failed to start ({reason}): apt-get install {package} (or run .ci/setup-host)"
    )]
    Tool { tool: String, package: String, reason: String },
    #[error("{tool} failed: {stderr}")]
    Command { tool: String, stderr: String },
    #[error(transparent)]
    Definition(#[from] definition::DefinitionError),
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    #[error("{image} has no {role} image (roles: master, worker{etcd})", etcd = if *.has_etcd { ", etcd" } else { "" })]
    Role { image: String, role: Role, has_etcd: bool },
    #[error(
        "image {image} carries Kubernetes {image_version}, but cluster '{cluster}' pins {cluster_version} (spec.versions.kubernetes)"
    )]
    Version { image: String, image_version: String, cluster: String, cluster_version: String },
    #[error("no firstboot binary at {0}: build it with `cargo build --release -p firstboot` or give --firstboot")]
    Firstboot(PathBuf),
    #[error("{0}")]
    Io(String),
}

/// Host tools and the Debian packages that provide them.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("dpkg-scanpackages", "dpkg-dev"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("grub-mkimage", "grub-common"),
    ("mkfs.ext4", "e2fsprogs"),
    ("sfdisk", "fdisk"),
    ("qemu-img", "qemu-utils"),
    ("tar", "tar"),
];

fn package_of(tool: &str) -> &'static str {
    TOOLS.iter().find(|(t, _)| *t == tool).map_or("the package providing it", |(_, p)| p)
}

/// Where a host tool is on PATH.
fn tool_path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// A host tool's path, or the error that names its package.
fn require_tool(tool: &str) -> Result<PathBuf, BakeError> {
    tool_path(tool).ok_or_else(|| BakeError::Tool {
        tool: tool.into(),
        package: package_of(tool).into(),
        reason: "not on PATH".into(),
    })
}

/// Fails naming the first missing host tool and its package.
pub fn check_tools() -> Result<(), BakeError> {
    for (tool, _) in TOOLS {
        require_tool(tool)?;
    }
    if !Path::new("/usr/lib/grub/x86_64-efi/linux.mod").exists() {
        return Err(BakeError::Tool {
            tool: "GRUB EFI modules".into(),
            package: "grub-efi-amd64-bin".into(),
            reason: "no /usr/lib/grub/x86_64-efi".into(),
        });
    }
    Ok(())
}

/// Runs a host tool; its stdout on success, its stderr in the error otherwise.
pub fn run(cmd: &mut Command, tool: &str) -> Result<Vec<u8>, BakeError> {
    let out = cmd.output().map_err(|e| BakeError::Tool {
        tool: tool.into(),
        package: package_of(tool).into(),
        reason: e.to_string(),
    })?;
    if out.status.success() {
        Ok(out.stdout)
    } else {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(12).collect();
        Err(BakeError::Command { tool: tool.into(), stderr: tail.into_iter().rev().collect::<Vec<_>>().join("\n") })
    }
}

pub struct BakeOptions {
    pub image: PathBuf,
    pub roles: Vec<Role>,
    pub out: PathBuf,
    pub offline: bool,
    pub cache: PathBuf,
    pub firstboot: PathBuf,
    /// Rebuild the base tree and the root file system even when the cache has them
    /// (reproducibility checks).
    pub fresh_tree: bool,
}

/// One baked role.
#[derive(Debug)]
pub struct Baked {
    pub role: Role,
    pub dir: PathBuf,
    pub seconds: f64,
    pub steps: Vec<(String, f64)>,
}

/// Definition, lock (resolved and saved first if there is none) and cache.
pub async fn prepare(
    image: &Path,
    cache_dir: &Path,
    offline: bool,
) -> Result<(Definition, Lock, Cache, String), BakeError> {
    let (def, text) = Definition::load(image)?;
    let cache = Cache::open(cache_dir, offline)?;
    let lock_file = lock::lock_path(image);
    let lock = if lock_file.exists() {
        Lock::load(&lock_file, image, &text)?
    } else {
        if offline {
            return Err(BakeError::Io(format!(
                "{} does not exist and --offline cannot resolve one",
                lock_file.display()
            )));
        }
        tracing::info!("no {}: resolving the definition now", lock_file.display());
        let lock = lock::resolve(&def, &text, &cache).await?;
        lock.save(&lock_file, image)?;
        lock
    };
    let lock_sha256 = lock::sha256_hex(
        &std::fs::read(&lock_file).map_err(|e| BakeError::Io(format!("{}: {e}", lock_file.display())))?,
    );
    Ok((def, lock, cache, lock_sha256))
}

/// Fills the cache with every input of these roles (downloads in parallel, verified). The
/// components come first: they are few, often local files, and a wrong pin should fail the
/// build before minutes of package downloads.
pub async fn fetch(def: &Definition, lock: &Lock, cache: &Cache, roles: &[Role]) -> Result<(), BakeError> {
    lock::keyring(def, cache).await?;
    for c in def.components.iter().filter(|c| roles.iter().any(|r| c.for_role(*r))) {
        let locked = lock.require(&c.name)?;
        if !cache.has(&locked.sha256) {
            let (sha256, _) = lock::component_blob(c, cache).await?;
            if sha256 != locked.sha256 {
                return Err(cache::CacheError::Mismatch {
                    what: c.name.clone(),
                    expected: format!("sha256:{}", locked.sha256),
                    actual: sha256,
                }
                .into());
            }
        }
    }
    let packages: Vec<_> = lock.packages.iter().filter(|p| p.roles.iter().any(|r| roles.contains(r))).collect();
    let results: Vec<Result<String, cache::CacheError>> = futures_util::stream::iter(packages)
        .map(|p| async move {
            cache
                .fetch(&format!("{} {}", p.name, p.version), &p.url, &Digest::Sha256(p.sha256.clone()), Some(p.size))
                .await
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for r in results {
        r?;
    }
    Ok(())
}

/// `dst` (replaced) as a hard link of `src`, or a copy where they are on different file systems.
pub(crate) fn link_or_copy(src: &Path, dst: &Path) -> std::io::Result<()> {
    let _ = std::fs::remove_file(dst);
    std::fs::hard_link(src, dst).or_else(|e| match e.kind() {
        std::io::ErrorKind::NotFound => Err(e),
        _ => std::fs::copy(src, dst).map(|_| ()),
    })
}

/// Removes a directory tree when dropped (the temp output of a failed bake).
struct Cleanup(PathBuf);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Flushes every file and directory under `dir` to disk, before the rename that publishes the
/// outputs (the big ones are flushed already, as each is finished).
fn sync_tree(dir: &Path) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let e = e?;
        if e.file_type()?.is_dir() {
            sync_tree(&e.path())?;
        } else {
            std::fs::File::open(e.path())?.sync_all()?;
        }
    }
    std::fs::File::open(dir)?.sync_all()
}

/// Removes a directory tree, unlinking its files side by side: on a filesystem mounted with
/// `discard` (as this project's machine is) an unlink of a big synced file waits ~0.5 s for the
/// device, and those waits overlap (measured: two 500 MB files, 1.17 s one after the other,
/// 0.69 s side by side).
fn remove_tree(dir: &Path) -> std::io::Result<()> {
    let mut files = Vec::new();
    let mut dirs = vec![dir.to_path_buf()];
    while let Some(d) = dirs.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            match e.file_type() {
                Ok(t) if t.is_dir() => dirs.push(e.path()),
                _ => files.push(e.path()),
            }
        }
    }
    let next = std::sync::atomic::AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..files.len().min(8) {
            s.spawn(|| {
                while let Some(f) = files.get(next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)) {
                    let _ = std::fs::remove_file(f);
                }
            });
        }
    });
    std::fs::remove_dir_all(dir)
}

/// Bakes one role (blocking: run it off the async runtime).
pub fn bake_role(
    def: &Definition,
    lock: &Lock,
    lock_sha256: &str,
    cache: &Cache,
    role: Role,
    opts: &BakeOptions,
) -> Result<Baked, BakeError> {
    let start = Instant::now();
    let mut steps = Vec::new();
    let mut step = |name: &str, t: &mut Instant| {
        steps.push((name.to_string(), t.elapsed().as_secs_f64()));
        *t = Instant::now();
    };
    let epoch = lock.source_date_epoch;
    std::fs::create_dir_all(&opts.out).map_err(|e| BakeError::Io(format!("{}: {e}", opts.out.display())))?;
    let tmp = opts.out.join(format!(".{role}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cleanup = Cleanup(tmp.clone());
    let work = tmp.join(".work");
    std::fs::create_dir_all(&work).map_err(|e| BakeError::Io(e.to_string()))?;
    let mut t = Instant::now();

    let base = tree::base_tree(def, lock, role, cache, epoch, &work, opts.fresh_tree)?;
    step("base tree", &mut t);
    let ids = disk::Ids::new(&format!("{}/{role}/{lock_sha256}", def.name));
    let (fb_layer, esp, state) = (work.join("firstboot.erofs"), work.join("esp.img"), work.join("state.ext4"));
    // mkfs.erofs of the root runs on one core; the ESP, the state file system and the firstboot
    // layer are made beside it. The kernel and initramfs are the base tree's.
    let rootfs = std::thread::scope(|s| {
        let side = s.spawn(|| {
            disk::esp(&base, &work, &esp, &ids, &disk::kernel_cmdline(&ids), epoch)?;
            disk::state(&state, &ids, 1 << 30, epoch)?;
            disk::erofs(&tree::firstboot_layer(&opts.firstboot, &work)?, &fb_layer, &ids.firstboot_fs, epoch)
        });
        let rootfs = tree::root_image(def, lock, role, &base, cache, &ids.root_fs, epoch, &work, opts.fresh_tree);
        side.join().expect("ESP thread panicked")?;
        rootfs
    })?;
    step("root, firstboot layer, esp and state", &mut t);
    let raw = tmp.join("disk.raw");
    disk::assemble(&raw, &disk::layout(&ids, &esp, &rootfs, &fb_layer, &state), &ids.disk)?;
    step("disk.raw", &mut t);
    // The VMDK's compression takes every core; qcow2 (mostly I/O), the PXE set and the digest and
    // flush of each finished output go beside it, so hashing and writeback overlap compression.
    let done = |rel: &str| -> Result<serde_json::Value, BakeError> {
        let entry = outputs::file_entry(&tmp, rel)?;
        std::fs::File::open(tmp.join(rel))
            .and_then(|f| f.sync_all())
            .map_err(|e| BakeError::Io(format!("{rel}: {e}")))?;
        Ok(entry)
    };
    let pxe_files = outputs::PXE_FILES.map(|f| format!("pxe/{f}"));
    let outputs_list = std::thread::scope(|s| -> Result<Vec<serde_json::Value>, BakeError> {
        let raw_entry = s.spawn(|| done("disk.raw"));
        let side = s.spawn(|| -> Result<Vec<serde_json::Value>, BakeError> {
            run(
                Command::new("qemu-img")
                    .args(["convert", "-q", "-f", "raw", "-O", "qcow2"])
                    .arg(&raw)
                    .arg(tmp.join("disk.qcow2")),
                "qemu-img",
            )?;
            let mut entries = vec![done("disk.qcow2")?];
            outputs::pxe(&base, &rootfs, &fb_layer, &tmp.join("pxe"), def, role)?;
            for f in &pxe_files {
                entries.push(done(f)?);
            }
            Ok(entries)
        });
        outputs::ova(&raw, &tmp, def, role, epoch)?;
        let ova = done(&format!("{role}.ova"))?;
        let mut side = side.join().expect("qcow2 thread panicked")?;
        let mut all = vec![raw_entry.join().expect("digest thread panicked")?, side.remove(0), ova];
        all.extend(side);
        Ok(all)
    })?;
    step("qcow2, ova, pxe and digests", &mut t);
    let fb256 = cache::sha256_file(&opts.firstboot).map_err(|e| BakeError::Io(e.to_string()))?;
    let fb =
        serde_json::json!({"sha256": fb256, "size": std::fs::metadata(&opts.firstboot).map(|m| m.len()).unwrap_or(0)});
    let manifest = outputs::manifest(def, lock, role, &fb, lock_sha256, outputs_list, epoch);
    std::fs::write(tmp.join("manifest.json"), serde_json::to_vec_pretty(&manifest).expect("json"))
        .map_err(|e| BakeError::Io(e.to_string()))?;
    let sbom = outputs::sbom(def, lock, role, lock_sha256, epoch);
    std::fs::write(tmp.join("sbom.spdx.json"), serde_json::to_vec_pretty(&sbom).expect("json"))
        .map_err(|e| BakeError::Io(e.to_string()))?;
    remove_tree(&work).map_err(|e| BakeError::Io(format!("{}: {e}", work.display())))?;
    sync_tree(&tmp).map_err(|e| BakeError::Io(format!("{}: {e}", tmp.display())))?;
    let dest = opts.out.join(role.as_str());
    let old = opts.out.join(format!(".{role}.old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(&dest, &old).map_err(|e| BakeError::Io(e.to_string()))?;
    }
    std::fs::rename(&tmp, &dest).map_err(|e| BakeError::Io(e.to_string()))?;
    std::mem::forget(cleanup);
    std::fs::File::open(&opts.out).and_then(|d| d.sync_all()).map_err(|e| BakeError::Io(e.to_string()))?;
    // The old output goes last, once the new one is durable.
    let _ = remove_tree(&old);
    step("manifest, sbom and publish", &mut t);
    Ok(Baked { role, dir: dest, seconds: start.elapsed().as_secs_f64(), steps })
}

/// The whole main job for these roles.
pub async fn bake(opts: &BakeOptions, cluster_version: Option<(String, String)>) -> Result<Vec<Baked>, BakeError> {
    check_tools()?;
    if !opts.firstboot.is_file() {
        return Err(BakeError::Firstboot(opts.firstboot.clone()));
    }
    let (def, lock, cache, lock_sha256) = prepare(&opts.image, &opts.cache, opts.offline).await?;
    if let Some((cluster, version)) = cluster_version {
        if version != def.kubernetes {
            return Err(BakeError::Version {
                image: def.name.clone(),
                image_version: def.kubernetes.clone(),
                cluster,
                cluster_version: version,
            });
        }
    }
    let available = lock::roles(&def);
    for r in &opts.roles {
        if !available.contains(r) {
            return Err(BakeError::Role {
                image: def.name.clone(),
                role: *r,
                has_etcd: available.contains(&Role::Etcd),
            });
        }
    }
    fetch(&def, &lock, &cache, &opts.roles).await?;
    let mut baked = Vec::new();
    for role in &opts.roles {
        let (d, l, c, s) = (def.clone(), lock.clone(), cache.clone(), lock_sha256.clone());
        let role = *role;
        let o = BakeOptions {
            image: opts.image.clone(),
            roles: vec![role],
            out: opts.out.clone(),
            offline: opts.offline,
            cache: opts.cache.clone(),
            firstboot: opts.firstboot.clone(),
            fresh_tree: opts.fresh_tree,
        };
        let b = tokio::task::spawn_blocking(move || bake_role(&d, &l, &s, &c, role, &o))
            .await
            .map_err(|e| BakeError::Io(e.to_string()))??;
        baked.push(b);
    }
    Ok(baked)
}
