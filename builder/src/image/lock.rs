//! `imgbuild lock`: resolves a definition into a lock that names every input byte. apt, in a
//! private root, reads the mirror's signed index (the archive key is pinned by sha256) and lists
//! the exact closure of each role's packages with the essential and required base; the index
//! gives each one's sha256. Components are fetched into the cache so their sizes (and sha256,
//! where upstream publishes sha512) are known.
//!
//! A build uses the lock's bytes or stops naming what differs.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use proto::Role;
use serde::{Deserialize, Serialize};

use super::cache::{Cache, CacheError, Digest};
use super::definition::Definition;
use crate::digest::sha256_hex;

/// `images/<name>.lock`: every package and component an image definition resolved to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct Lock {
    /// The definition's name.
    pub definition: String,
    /// sha256 of the definition's text: a lock is only valid for the text it was made from.
    pub definition_sha256: String,
    /// sha256 of the archive keyring the package index was verified with.
    pub keyring_sha256: String,
    /// SOURCE_DATE_EPOCH of every build from this lock: when the lock was made.
    pub source_date_epoch: i64,
    /// Every Debian package of every role, with the roles that install it.
    #[serde(rename = "package")]
    pub packages: Vec<LockedPackage>,
    /// Every pinned component: binaries and archives from outside the Debian archive.
    #[serde(rename = "component")]
    pub components: Vec<LockedComponent>,
}

/// A Debian package at one version, as the signed index describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockedPackage {
    /// Package name.
    pub name: String,
    /// Exact version, epoch included.
    pub version: String,
    /// Architecture (`amd64`, `all`).
    pub arch: String,
    /// Where apt fetches it.
    pub url: String,
    /// Size in bytes, from the index.
    pub size: u64,
    /// sha256 of the `.deb`, from the signed index.
    pub sha256: String,
    /// The roles whose images contain it.
    pub roles: Vec<Role>,
}

/// A component the definition pins, with what its bytes turned out to be.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct LockedComponent {
    /// The component's name in the definition.
    pub name: String,
    /// Its version, as the definition says.
    pub version: String,
    /// Its URL, or the local file it was imported from.
    pub source: String,
    /// Size in bytes.
    pub size: u64,
    /// sha256 of its bytes (the cache's blob name).
    pub sha256: String,
}

impl LockedPackage {
    /// `name_version_arch.deb`, as apt names it (epoch colons kept out of file names).
    pub fn file_name(&self) -> String {
        format!("{}_{}_{}.deb", self.name, self.version.replace(':', "%3a"), self.arch)
    }
}

/// Why a definition cannot be locked, or a lock used.
#[derive(Debug, thiserror::Error)]
pub enum LockError {
    /// The mirror (or the keyring's) cannot be reached.
    #[error(
        "{definition}: cannot reach {mirror} for {what}: {reason}\n  this machine may not reach it: bake with `--image images/debian-12.toml`, \
         or on an air-gapped site fill the cache elsewhere (`imgbuild fetch`) and build with --offline"
    )]
    Unreachable {
        /// The definition's name.
        definition: String,
        /// What was being fetched.
        what: String,
        /// The mirror.
        mirror: String,
        /// apt's errors.
        reason: String,
    },
    /// apt cannot make a consistent package set for a role.
    #[error("apt could not resolve the packages of the {role} image: {reason}")]
    Resolve {
        /// The role.
        role: Role,
        /// apt's errors.
        reason: String,
    },
    /// A lock file cannot be read or does not parse.
    #[error("{path} is not a lock file: {reason}")]
    Parse {
        /// The lock file.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// The definition changed since the lock was made.
    #[error(
        "{lock} was made from another version of {definition} (its sha256 differs); run `imgbuild lock --image {definition}`"
    )]
    Stale {
        /// The lock file.
        lock: PathBuf,
        /// The definition it belongs to.
        definition: PathBuf,
    },
    /// The archive keyring cannot be had or does not match its pin.
    #[error("keyring {path}: {reason}")]
    Keyring {
        /// The keyring's path on this machine.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// A component the build needs is not in the lock.
    #[error("component {0} is not in the lock: run `imgbuild lock`")]
    Missing(String),
    /// A download or a cache file failed.
    #[error(transparent)]
    Cache(#[from] super::cache::CacheError),
    /// An image cannot be pulled from its registry.
    #[error(transparent)]
    Pull(#[from] super::registry::PullError),
    /// A file, directory or program failed (what and why).
    #[error("{0}")]
    Io(String),
}

/// The lock file that belongs to a definition: `images/x.toml` → `images/x.lock`.
pub fn lock_path(definition: &Path) -> PathBuf {
    definition.with_extension("lock")
}

impl Lock {
    /// Reads the lock at `path`, refusing it when it was made from another text of the definition.
    pub fn load(path: &Path, definition: &Path, definition_text: &str) -> Result<Lock, LockError> {
        let text =
            std::fs::read_to_string(path).map_err(|e| LockError::Parse { path: path.into(), reason: e.to_string() })?;
        let lock: Lock =
            toml::from_str(&text).map_err(|e| LockError::Parse { path: path.into(), reason: e.to_string() })?;
        if lock.definition_sha256 != sha256_hex(definition_text.as_bytes()) {
            return Err(LockError::Stale { lock: path.into(), definition: definition.into() });
        }
        Ok(lock)
    }

    /// Writes the lock with a header naming the command that made it.
    pub fn save(&self, path: &Path, definition: &Path) -> Result<(), LockError> {
        let body = toml::to_string(self).map_err(|e| LockError::Io(e.to_string()))?;
        let text = format!(
            "# Generated by `imgbuild lock --image {}`: every byte an image build uses. Do not edit.\n{body}",
            definition.display()
        );
        proto::fsutil::write_atomic(path, text.as_bytes(), 0o644, None)
            .map_err(|e| LockError::Io(format!("{}: {e}", path.display())))
    }

    /// The packages the `role` image installs.
    pub fn packages_for(&self, role: Role) -> impl Iterator<Item = &LockedPackage> {
        self.packages.iter().filter(move |p| p.roles.contains(&role))
    }

    /// The locked component called `name`.
    pub fn component(&self, name: &str) -> Option<&LockedComponent> {
        self.components.iter().find(|c| c.name == name)
    }

    /// The locked component a build needs, or the error that says to lock again.
    pub fn require(&self, name: &str) -> Result<&LockedComponent, LockError> {
        self.component(name).ok_or_else(|| LockError::Missing(name.to_string()))
    }
}

/// One stanza of an apt package index.
#[derive(Debug, Clone, Default)]
struct Stanza {
    fields: BTreeMap<String, String>,
}

impl Stanza {
    fn get(&self, k: &str) -> &str {
        self.fields.get(k).map(String::as_str).unwrap_or("")
    }
}

fn parse_index(text: &str) -> Vec<Stanza> {
    let mut out = Vec::new();
    for para in text.split("\n\n") {
        let mut s = Stanza::default();
        let mut last = String::new();
        for line in para.lines() {
            if line.starts_with(' ') || line.starts_with('\t') {
                continue; // continuation lines (descriptions): not needed
            }
            if let Some((k, v)) = line.split_once(':') {
                last = k.to_string();
                s.fields.insert(last.clone(), v.trim().to_string());
            }
        }
        let _ = last;
        if !s.fields.is_empty() {
            out.push(s);
        }
    }
    out
}

/// apt confined to a private directory: its own sources, lists, status and configuration.
pub struct Apt {
    root: tempfile::TempDir,
}

impl Apt {
    /// An empty apt root with these `sources.list` lines.
    pub fn new(sources: &[String]) -> Result<Self, LockError> {
        let root =
            tempfile::Builder::new().prefix("imgbuild-apt-").tempdir().map_err(|e| LockError::Io(e.to_string()))?;
        let r = root.path();
        for d in [
            "etc/apt/apt.conf.d",
            "etc/apt/preferences.d",
            "etc/apt/sources.list.d",
            "etc/apt/trusted.gpg.d",
            "var/lib/apt/lists/partial",
            "var/cache/apt/archives/partial",
            "var/lib/dpkg",
        ] {
            std::fs::create_dir_all(r.join(d)).map_err(|e| LockError::Io(e.to_string()))?;
        }
        std::fs::write(r.join("var/lib/dpkg/status"), "").map_err(|e| LockError::Io(e.to_string()))?;
        std::fs::write(r.join("etc/apt/apt.conf"), "").map_err(|e| LockError::Io(e.to_string()))?;
        std::fs::write(r.join("etc/apt/sources.list"), sources.join("\n") + "\n")
            .map_err(|e| LockError::Io(e.to_string()))?;
        Ok(Apt { root })
    }

    fn cmd(&self, program: &str) -> Command {
        let r = self.root.path();
        let mut c = Command::new(program);
        c.env("APT_CONFIG", r.join("etc/apt/apt.conf"))
            .env("LC_ALL", "C")
            .arg(format!("-oDir={}", r.display()))
            .arg(format!("-oDir::State::status={}", r.join("var/lib/dpkg/status").display()))
            .args(["-oAPT::Architecture=amd64", "-oAPT::Architectures::=amd64", "-oDebug::NoLocking=1"])
            .args(["-oAcquire::Languages=none", "-oAPT::Sandbox::User=root", "-oAcquire::Retries=3"])
            .args([
                "-oAcquire::IndexTargets::deb::DEP-11::DefaultEnabled=false",
                "-oAcquire::IndexTargets::deb::DEP-11-icons::DefaultEnabled=false",
            ]);
        c
    }

    fn run(&self, mut c: Command) -> Result<String, String> {
        let out = c.output().map_err(|e| format!("cannot run apt: {e} (apt-get is in Debian's apt package)"))?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            let err = String::from_utf8_lossy(&out.stderr);
            Err(err.lines().filter(|l| l.starts_with("E:") || l.starts_with("W:")).collect::<Vec<_>>().join("; "))
        }
    }

    /// `apt-get update` in the private root; fails when any index could not be fetched.
    pub fn update(&self) -> Result<(), String> {
        let mut c = self.cmd("apt-get");
        // Without --error-on=any, apt-get update exits 0 when it could fetch nothing at all.
        c.args(["-q", "update", "--error-on=any"]);
        self.run(c).map(|_| ())
    }

    fn dumpavail(&self) -> Result<Vec<Stanza>, String> {
        let mut c = self.cmd("apt-cache");
        c.arg("dumpavail");
        Ok(parse_index(&self.run(c)?))
    }

    /// URLs of the full closure of `packages` on an empty system.
    fn print_uris(&self, packages: &[String]) -> Result<Vec<String>, String> {
        let mut c = self.cmd("apt-get");
        c.args(["install", "--print-uris", "-qq", "-y", "--no-install-recommends"]).args(packages);
        let out = self.run(c)?;
        Ok(out.lines().filter_map(|l| l.split('\'').nth(1)).map(str::to_string).collect())
    }

    /// Downloads one package by name=version into `dir`.
    fn download(&self, spec: &str, dir: &Path) -> Result<(), String> {
        let mut c = self.cmd("apt-get");
        c.current_dir(dir).args(["download", "-q", spec]);
        self.run(c).map(|_| ())
    }
}

/// The keyring file verified against its pin, from this machine or from its package.
pub async fn keyring(def: &Definition, cache: &Cache) -> Result<PathBuf, LockError> {
    let k = &def.base.keyring;
    let expect = Digest::Sha256(k.sha256.clone());
    if let Some(p) = cache.lookup(&expect) {
        return Ok(p);
    }
    let host = Path::new(&k.path);
    if host.is_file() {
        return Ok(cache.blob(&cache.import("archive keyring", host, &expect)?));
    }
    let (Some(package), Some(from)) = (&k.package, &k.from) else {
        return Err(LockError::Keyring {
            path: k.path.clone(),
            reason: "not on this machine, and no package to get it from".into(),
        });
    };
    if cache.offline {
        return Err(super::cache::CacheError::Missing {
            what: format!("keyring {}", k.path),
            digest: expect.to_string(),
            cache: cache.root.display().to_string(),
        }
        .into());
    }
    // The package comes from a Debian suite, signed by this machine's Debian archive key.
    let (mirror, suite) = from.split_once(' ').ok_or_else(|| LockError::Keyring {
        path: k.path.clone(),
        reason: format!("from '{from}' must be 'MIRROR SUITE'"),
    })?;
    let apt =
        Apt::new(&[format!("deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] {mirror} {suite} main")])?;
    apt.update().map_err(|reason| LockError::Unreachable {
        definition: def.name.clone(),
        what: format!("its archive keyring (package {package})"),
        mirror: mirror.into(),
        reason,
    })?;
    let dir = tempfile::tempdir().map_err(|e| LockError::Io(e.to_string()))?;
    apt.download(package, dir.path()).map_err(|reason| LockError::Keyring { path: k.path.clone(), reason })?;
    let deb =
        std::fs::read_dir(dir.path()).map_err(|e| LockError::Io(e.to_string()))?.flatten().next().ok_or_else(|| {
            LockError::Keyring { path: k.path.clone(), reason: format!("{package} did not download") }
        })?;
    let x = dir.path().join("x");
    let st = Command::new("dpkg-deb")
        .arg("-x")
        .arg(deb.path())
        .arg(&x)
        .status()
        .map_err(|e| LockError::Io(e.to_string()))?;
    if !st.success() {
        return Err(LockError::Keyring {
            path: k.path.clone(),
            reason: format!("dpkg-deb -x {} failed", deb.path().display()),
        });
    }
    Ok(cache.blob(&cache.import("archive keyring", &proto::paths::under(&x, &k.path), &expect)?))
}

/// The roles a definition makes images for.
pub fn roles(def: &Definition) -> Vec<Role> {
    let mut r = vec![Role::Master, Role::Worker];
    if !def.packages.etcd.is_empty() || def.components.iter().any(|c| c.for_role(Role::Etcd)) {
        r.push(Role::Etcd);
    }
    r
}

/// Resolves `def` into a lock (needs the mirror, and the components' sources).
pub async fn resolve(def: &Definition, definition_text: &str, cache: &Cache) -> Result<Lock, LockError> {
    let keyring = keyring(def, cache).await?;
    let apt = Apt::new(&def.sources(&keyring))?;
    apt.update().map_err(|reason| LockError::Unreachable {
        definition: def.name.clone(),
        what: format!("its {} packages", def.base.distribution),
        mirror: def.base.mirror.clone(),
        reason,
    })?;
    let index = apt.dumpavail().map_err(|reason| LockError::Resolve { role: Role::Master, reason })?;
    // The base system, as debootstrap's and mmdebstrap's minbase: Essential and required, and apt.
    let mut base: Vec<String> = index
        .iter()
        .filter(|s| s.get("Essential") == "yes" || s.get("Priority") == "required")
        .map(|s| s.get("Package").to_string())
        .collect();
    base.push("apt".into());
    base.sort();
    base.dedup();
    let by_file: BTreeMap<&str, &Stanza> = index.iter().map(|s| (s.get("Filename"), s)).collect();
    let mut packages: BTreeMap<(String, String), LockedPackage> = BTreeMap::new();
    let mirror = def.base.mirror.trim_end_matches('/');
    for role in roles(def) {
        let wanted: Vec<String> = base.iter().cloned().chain(def.packages.for_role(role)).collect();
        let urls = apt.print_uris(&wanted).map_err(|reason| LockError::Resolve { role, reason })?;
        for url in urls {
            let filename = url.strip_prefix(mirror).map(|f| f.trim_start_matches('/')).unwrap_or(&url);
            let filename = filename.replace("%2b", "+").replace("%3a", ":").replace("%7e", "~");
            let s = by_file
                .get(filename.as_str())
                .ok_or_else(|| LockError::Resolve { role, reason: format!("{url} is not in the index") })?;
            let key = (s.get("Package").to_string(), s.get("Version").to_string());
            let entry = packages.entry(key).or_insert_with(|| LockedPackage {
                name: s.get("Package").into(),
                version: s.get("Version").into(),
                arch: s.get("Architecture").into(),
                url: format!("{mirror}/{}", s.get("Filename")),
                size: s.get("Size").parse().unwrap_or(0),
                sha256: s.get("SHA256").into(),
                roles: vec![],
            });
            if !entry.roles.contains(&role) {
                entry.roles.push(role);
            }
        }
    }
    let mut components = Vec::new();
    for c in &def.components {
        let (sha256, size) = component_blob(c, cache).await?;
        components.push(LockedComponent {
            name: c.name.clone(),
            version: c.version.clone(),
            source: c.source(),
            size,
            sha256,
        });
    }
    Ok(Lock {
        definition: def.name.clone(),
        definition_sha256: sha256_hex(definition_text.as_bytes()),
        keyring_sha256: def.base.keyring.sha256.clone(),
        source_date_epoch: time::OffsetDateTime::now_utc().unix_timestamp(),
        packages: packages.into_values().collect(),
        components,
    })
}

/// Puts a component into the cache (download or import, verified); returns (sha256, size).
pub async fn component_blob(c: &super::definition::Component, cache: &Cache) -> Result<(String, u64), LockError> {
    if let (Some(oci), true) = (&c.oci, c.from_registry()) {
        let sha256 = pull_image(oci, cache).await?;
        let size = std::fs::metadata(cache.blob(&sha256)).map(|m| m.len()).unwrap_or(0);
        return Ok((sha256, size));
    }
    let expect = match (&c.sha256, &c.sha512) {
        (Some(h), _) => Digest::Sha256(h.clone()),
        (None, Some(h)) => Digest::Sha512(h.clone()),
        (None, None) => unreachable!("definitions are checked to be pinned"),
    };
    let what = format!("{} {}", c.name, c.version);
    let sha256 = match (&c.url, &c.file) {
        (Some(url), _) => cache.fetch(&what, url, &expect, None).await?,
        (_, Some(file)) => cache.import(&what, file, &expect)?,
        _ => unreachable!("definitions are checked to have a source"),
    };
    let size = std::fs::metadata(cache.blob(&sha256)).map(|m| m.len()).unwrap_or(0);
    Ok((sha256, size))
}

/// An `[[image]]` from its registry, by digest, into the cache as an OCI archive; its sha256.
async fn pull_image(oci: &super::definition::OciRef, cache: &Cache) -> Result<String, LockError> {
    let what = format!("{}@{}", oci.reference, oci.digest);
    if cache.offline {
        return Err(
            CacheError::Missing { what, digest: oci.digest.clone(), cache: cache.root.display().to_string() }.into()
        );
    }
    let http = super::registry::client().map_err(|e| CacheError::Download {
        what: what.clone(),
        url: String::new(),
        reason: e.to_string(),
        attempts: 0,
    })?;
    let scratch = cache.scratch(&what);
    let archive = scratch.with_extension("oci.tar");
    let pulled = super::registry::pull(&http, oci, &scratch, &archive).await;
    let _ = std::fs::remove_dir_all(&scratch);
    pulled?;
    Ok(cache.adopt(&what, &archive)?)
}

#[cfg(test)]
mod tests {
    #[test]
    fn index_stanzas() {
        let s = super::parse_index("Package: a\nVersion: 1\nDescription: x\n more\n\nPackage: b\nEssential: yes\n");
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].get("Version"), "1");
        assert_eq!(s[1].get("Essential"), "yes");
    }
}
