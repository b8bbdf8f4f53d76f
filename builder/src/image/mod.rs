//! The main job: bake a bootable, immutable image per role.
//!
//! definition + lock → cache (every input verified) → base tree (mmdebstrap, cached) → role
//! tree → erofs root (cached) → + firstboot layer, ESP, state → GPT disk.raw → qcow2, OVA, PXE
//! set, manifest.json, SBOM.
//! Everything is built in `out/.<role>.tmp-<pid>` and renamed to `out/<role>` at the end, so a
//! failed bake leaves nothing half-written. Long steps show their progress ([`crate::progress`]).

pub mod cache;
pub mod definition;
pub mod disk;
pub mod files;
pub mod lock;
pub mod oci;
pub mod outputs;
pub mod registry;
pub mod tree;
pub mod vmdk;

use std::path::{Path, PathBuf};
use std::time::Instant;

use futures_util::StreamExt;
use proto::Role;

use self::cache::{Cache, Digest};
use self::definition::Definition;
use self::files::{Cleanup, remove_tree, sync_tree};
use self::lock::Lock;
use crate::progress::{self, Unit};
use crate::tools::{self, ToolError};

/// Why a bake (or lock, or fetch) failed.
#[derive(Debug, thiserror::Error)]
pub enum BakeError {
    /// A host tool is missing or failed.
    #[error(transparent)]
    Tool(#[from] ToolError),
    /// The image definition cannot be read or is not valid.
    #[error(transparent)]
    Definition(#[from] definition::DefinitionError),
    /// The lock cannot be made, read or used.
    #[error(transparent)]
    Lock(#[from] lock::LockError),
    /// An input could not be fetched or verified.
    #[error(transparent)]
    Cache(#[from] cache::CacheError),
    /// An OCI image archive is not what the definition pins.
    #[error(transparent)]
    Oci(#[from] oci::OciError),
    /// The definition makes no image of the asked role.
    #[error("{image} has no {role} image (roles: master, worker{etcd})", etcd = if *.has_etcd { ", etcd" } else { "" })]
    Role {
        /// The definition's name.
        image: String,
        /// The role asked for.
        role: Role,
        /// Whether the definition makes etcd images.
        has_etcd: bool,
    },
    /// The image's Kubernetes is not the one the cluster pins.
    #[error(
        "image {image} carries Kubernetes {image_version}, but cluster '{cluster}' pins {cluster_version} (spec.versions.kubernetes)"
    )]
    Version {
        /// The definition's name.
        image: String,
        /// The Kubernetes version it carries.
        image_version: String,
        /// The cluster's name.
        cluster: String,
        /// The version the cluster pins.
        cluster_version: String,
    },
    /// The firstboot binary to install is not there.
    #[error("no firstboot binary at {}: build it with `cargo build --release --bins` or give --firstboot", .0.display())]
    Firstboot(PathBuf),
    /// The definition has no lock, and `--offline` cannot make one.
    #[error(
        "{} does not exist and --offline cannot resolve one: run `imgbuild lock` where the mirror is reachable",
        .0.display()
    )]
    NoLock(PathBuf),
    /// A file or directory could not be read or written.
    #[error("{}: {error}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        error: std::io::Error,
    },
    /// An output format's own limit, or a shipped template that does not render.
    #[error("{0}")]
    Output(String),
}

/// `.at(path)` on an I/O result: the error names the file it was about.
pub trait IoAt<T> {
    /// Maps the error to [`BakeError::Io`] naming `path`.
    fn at(self, path: impl AsRef<Path>) -> Result<T, BakeError>;
}

impl<T> IoAt<T> for std::io::Result<T> {
    fn at(self, path: impl AsRef<Path>) -> Result<T, BakeError> {
        self.map_err(|error| BakeError::Io { path: path.as_ref().to_path_buf(), error })
    }
}

/// What to bake, from what, and where to.
pub struct BakeOptions {
    /// The image definition (`images/<name>.toml`); its lock is beside it.
    pub image: PathBuf,
    /// The roles to bake, in order.
    pub roles: Vec<Role>,
    /// The output directory: each role's image goes to `<out>/<role>/`.
    pub out: PathBuf,
    /// Use only the cache.
    pub offline: bool,
    /// The cache directory.
    pub cache: PathBuf,
    /// The firstboot binary to install.
    pub firstboot: PathBuf,
    /// Rebuild the base tree and the root file system even when the cache has them
    /// (reproducibility checks).
    pub fresh_tree: bool,
}

/// One baked role.
#[derive(Debug)]
pub struct Baked {
    /// The role.
    pub role: Role,
    /// Where its outputs are (`<out>/<role>/`).
    pub dir: PathBuf,
    /// How long the bake took, in seconds.
    pub seconds: f64,
    /// Each step's name and seconds, in order.
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
            return Err(BakeError::NoLock(lock_file));
        }
        tracing::info!("no {}: resolving the definition now", lock_file.display());
        let lock = lock::resolve(&def, &text, &cache).await?;
        lock.save(&lock_file, image)?;
        lock
    };
    let lock_sha256 = crate::digest::sha256_hex(&std::fs::read(&lock_file).at(&lock_file)?);
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
    let missing: Vec<_> =
        lock.packages.iter().filter(|p| p.roles.iter().any(|r| roles.contains(r)) && !cache.has(&p.sha256)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let bytes = missing.iter().map(|p| p.size).sum();
    let task = progress::global().task(format!("fetch {} packages", missing.len()), Unit::Bytes(bytes));
    let results: Vec<Result<String, cache::CacheError>> = futures_util::stream::iter(&missing)
        .map(|p| {
            let (task, digest, what) = (&task, Digest::Sha256(p.sha256.clone()), format!("{} {}", p.name, p.version));
            async move { cache.fetch(&what, &p.url, &digest, Some(task)).await }
        })
        .buffer_unordered(4)
        .collect()
        .await;
    for r in results {
        r?;
    }
    task.finish(format!("{} from {}", progress::mib(bytes), def.base.mirror));
    Ok(())
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
    std::fs::create_dir_all(&opts.out).at(&opts.out)?;
    let tmp = opts.out.join(format!(".{role}.tmp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    let cleanup = Cleanup(tmp.clone());
    let work = tmp.join(".work");
    std::fs::create_dir_all(&work).at(&work)?;
    let mut t = Instant::now();

    let base = tree::base_tree(def, lock, role, cache, epoch, &work, opts.fresh_tree)?;
    step("base tree", &mut t);
    let ids = disk::Ids::new(&format!("{}/{role}/{lock_sha256}", def.name));
    let (fb_layer, esp, state) = (work.join("firstboot.erofs"), work.join("esp.img"), work.join("state.ext4"));
    let bios_core = work.join("bios-core.img");
    // mkfs.erofs of the root runs on one core; the ESP, the state file system and the firstboot
    // layer are made beside it. The kernel and initramfs are the base tree's.
    let rootfs = std::thread::scope(|s| {
        let side = s.spawn(|| {
            disk::esp(&base, &work, &esp, &bios_core, &ids, &disk::kernel_cmdline(&ids), epoch)?;
            disk::state(&state, &ids, 1 << 30, epoch)?;
            disk::erofs(&tree::firstboot_layer(&opts.firstboot, &work)?, &fb_layer, &ids.firstboot_fs, epoch)
        });
        let rootfs = tree::root_image(def, lock, role, &base, cache, &ids.root_fs, epoch, &work, opts.fresh_tree);
        #[expect(clippy::expect_used, reason = "join fails only if the thread panicked, a bug: the panic goes on")]
        side.join().expect("ESP thread panicked")?;
        rootfs
    })?;
    step("root, firstboot layer, esp and state", &mut t);
    let raw = tmp.join("disk.raw");
    let task = progress::global().task(format!("{role}: disk.raw"), Unit::Time);
    let size = disk::assemble(&raw, &disk::layout(&ids, &esp, &rootfs, &fb_layer, &state), &bios_core, &ids)?;
    task.finish(format!("GPT with ESP, root, firstboot, state and BIOS boot, {}", progress::mib(size)));
    step("disk.raw", &mut t);
    // The VMDK's compression takes every core; qcow2 (mostly I/O), the PXE set and the digest and
    // flush of each finished output go beside it, so hashing and writeback overlap compression.
    let done = |rel: &str| -> Result<serde_json::Value, BakeError> {
        let entry = outputs::file_entry(&tmp, rel)?;
        std::fs::File::open(tmp.join(rel)).and_then(|f| f.sync_all()).at(tmp.join(rel))?;
        Ok(entry)
    };
    let pxe_files = outputs::PXE_FILES.map(|f| format!("pxe/{f}"));
    let outputs_list = std::thread::scope(|s| -> Result<Vec<serde_json::Value>, BakeError> {
        let raw_entry = s.spawn(|| done("disk.raw"));
        let side = s.spawn(|| -> Result<Vec<serde_json::Value>, BakeError> {
            outputs::qcow2(&raw, &tmp.join("disk.qcow2"), role)?;
            let mut entries = vec![done("disk.qcow2")?];
            outputs::pxe(&base, &rootfs, &fb_layer, &tmp.join("pxe"), def, role)?;
            for f in &pxe_files {
                entries.push(done(f)?);
            }
            Ok(entries)
        });
        outputs::ova(&raw, &tmp, def, role, epoch)?;
        let ova = done(&format!("{role}.ova"))?;
        #[expect(clippy::expect_used, reason = "join fails only if the thread panicked, a bug: the panic goes on")]
        let mut side = side.join().expect("qcow2 thread panicked")?;
        #[expect(clippy::expect_used, reason = "join fails only if the thread panicked, a bug: the panic goes on")]
        let mut all = vec![raw_entry.join().expect("digest thread panicked")?, side.remove(0), ova];
        all.extend(side);
        Ok(all)
    })?;
    step("qcow2, ova, pxe and digests", &mut t);
    let fb256 = crate::digest::sha256_file(&opts.firstboot).at(&opts.firstboot)?;
    let fb =
        serde_json::json!({"sha256": fb256, "size": std::fs::metadata(&opts.firstboot).map(|m| m.len()).unwrap_or(0)});
    let manifest = outputs::manifest(def, lock, role, &fb, lock_sha256, outputs_list, epoch);
    #[expect(clippy::expect_used, reason = "a serde_json::Value always serializes")]
    let write_json = |name: &str, v: &serde_json::Value| {
        let path = tmp.join(name);
        std::fs::write(&path, serde_json::to_vec_pretty(v).expect("JSON values serialize")).at(&path)
    };
    write_json("manifest.json", &manifest)?;
    write_json("sbom.spdx.json", &outputs::sbom(def, lock, role, lock_sha256, epoch))?;
    remove_tree(&work).at(&work)?;
    sync_tree(&tmp).at(&tmp)?;
    let dest = opts.out.join(role.as_str());
    let old = opts.out.join(format!(".{role}.old-{}", std::process::id()));
    if dest.exists() {
        std::fs::rename(&dest, &old).at(&dest)?;
    }
    std::fs::rename(&tmp, &dest).at(&dest)?;
    std::mem::forget(cleanup);
    std::fs::File::open(&opts.out).and_then(|d| d.sync_all()).at(&opts.out)?;
    // The old output goes last, once the new one is durable.
    let _ = remove_tree(&old);
    step("manifest, sbom and publish", &mut t);
    Ok(Baked { role, dir: dest, seconds: start.elapsed().as_secs_f64(), steps })
}

/// The whole main job for these roles.
pub async fn bake(opts: &BakeOptions, cluster_version: Option<(String, String)>) -> Result<Vec<Baked>, BakeError> {
    tools::check_all()?;
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
        #[expect(
            clippy::expect_used,
            reason = "a blocking task is never cancelled: it fails only if the bake panicked, a bug: the panic goes on"
        )]
        let b = tokio::task::spawn_blocking(move || bake_role(&d, &l, &s, &c, role, &o))
            .await
            .expect("the bake thread panicked")?;
        baked.push(b);
    }
    Ok(baked)
}
