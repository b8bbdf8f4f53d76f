//! The content-addressed cache: every input of an image (packages, components, keyrings) as
//! `blobs/sha256/<hex>`, written only after its digest matched. Downloads resume from
//! `partial/`; a mismatch keeps nothing of the bad download. `--offline` builds read only this.
//!
//! Default location: `/var/cache/imgbuild` (root) or `$XDG_CACHE_HOME/imgbuild`;
//! `IMGBUILD_CACHE` or `--cache` override it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::digest::sha256_and_512_file;
use crate::progress::Task;

/// An expected digest, as the definition or lock gives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Digest {
    /// A hex SHA-256: also the blob's name in the cache.
    Sha256(String),
    /// A hex SHA-512, for upstreams that publish only that.
    Sha512(String),
}

impl std::fmt::Display for Digest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Digest::Sha256(h) => write!(f, "sha256:{h}"),
            Digest::Sha512(h) => write!(f, "sha512:{h}"),
        }
    }
}

/// Why an input could not be had from the cache or its source.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// The bytes do not have the pinned digest.
    #[error("{what}: checksum mismatch: expected {expected}, got {actual} (the download was discarded)")]
    Mismatch {
        /// The input it was for.
        what: String,
        /// The pinned digest (`sha256:…`).
        expected: String,
        /// The digest the bytes have.
        actual: String,
    },
    /// `--offline`, and the input is not in the cache.
    #[error(
        "{what} is not in the cache ({digest}) and --offline forbids fetching it; run `imgbuild fetch` where the sources are reachable, then copy {cache}"
    )]
    Missing {
        /// The input.
        what: String,
        /// Its pinned digest.
        digest: String,
        /// The cache directory, to copy from a machine that has it.
        cache: String,
    },
    /// The download failed, after retries.
    #[error("{what}: cannot download {url} ({attempts} attempts): {reason}")]
    Download {
        /// The input.
        what: String,
        /// Where it was fetched from.
        url: String,
        /// The last attempt's error.
        reason: String,
        /// How many attempts were made.
        attempts: u32,
    },
    /// A cache or source file cannot be read or written.
    #[error("{what}: {path}: {source}")]
    Io {
        /// The input it was for.
        what: String,
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
}

/// The cache directory, with an HTTP client for filling it.
#[derive(Clone)]
pub struct Cache {
    /// The cache directory.
    pub root: PathBuf,
    /// Never download: an input not in the cache is an error.
    pub offline: bool,
    http: reqwest::Client,
}

/// The cache directory when `--cache` is not given: `IMGBUILD_CACHE`, `/var/cache/imgbuild` for
/// root, else `$XDG_CACHE_HOME/imgbuild` (or `~/.cache/imgbuild`).
pub fn default_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("IMGBUILD_CACHE") {
        return d.into();
    }
    if nix_is_root() {
        return "/var/cache/imgbuild".into();
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| "/tmp".into())
        .join("imgbuild")
}

/// HTTP clients for sources: HTTPS trusted through the system's CA bundle, bounded waits.
pub fn http_builder() -> reqwest::ClientBuilder {
    proto::tls::install_default_provider();
    let bundle = std::fs::read_to_string("/etc/ssl/certs/ca-certificates.crt").unwrap_or_default();
    let mut b =
        reqwest::Client::builder().connect_timeout(Duration::from_secs(20)).read_timeout(Duration::from_secs(60));
    if !bundle.is_empty() {
        if let Ok(tls) = proto::tls::client_config(&bundle, None) {
            b = b.tls_backend_preconfigured(tls);
        }
    }
    b
}

fn nix_is_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0).unwrap_or(false)
}

impl Cache {
    /// Opens (creating) the cache at `root`; downloads trust the system's CA bundle.
    pub fn open(root: &Path, offline: bool) -> Result<Self, CacheError> {
        let io = |path: &Path, source| CacheError::Io { what: "cache".into(), path: path.to_path_buf(), source };
        for d in ["blobs/sha256", "partial"] {
            std::fs::create_dir_all(root.join(d)).map_err(|e| io(&root.join(d), e))?;
        }
        let http = http_builder().build().map_err(|e| CacheError::Download {
            what: "cache".into(),
            url: String::new(),
            reason: e.to_string(),
            attempts: 0,
        })?;
        Ok(Cache { root: root.to_path_buf(), offline, http })
    }

    /// Where the blob with this sha256 is (whether or not it is there).
    pub fn blob(&self, sha256: &str) -> PathBuf {
        self.root.join("blobs/sha256").join(sha256)
    }

    /// Whether the blob with this sha256 is in the cache.
    pub fn has(&self, sha256: &str) -> bool {
        self.blob(sha256).is_file()
    }

    fn missing(&self, what: &str, d: &Digest) -> CacheError {
        CacheError::Missing { what: what.into(), digest: d.to_string(), cache: self.root.display().to_string() }
    }

    /// Verifies `tmp` against `expect` and moves it into the cache; returns the sha256.
    fn admit(&self, what: &str, tmp: &Path, expect: &Digest) -> Result<String, CacheError> {
        let io = |source| CacheError::Io { what: what.into(), path: tmp.to_path_buf(), source };
        let (s256, s512) = sha256_and_512_file(tmp).map_err(io)?;
        let (want, got) = match expect {
            Digest::Sha256(h) => (h, &s256),
            Digest::Sha512(h) => (h, &s512),
        };
        if want != got {
            let _ = std::fs::remove_file(tmp);
            return Err(CacheError::Mismatch { what: what.into(), expected: expect.to_string(), actual: got.clone() });
        }
        std::fs::rename(tmp, self.blob(&s256)).map_err(io)?;
        Ok(s256)
    }

    /// Moves `tmp`, whose bytes were checked some other way (an OCI pull checks each part by its
    /// digest), into the cache; returns its sha256.
    pub fn adopt(&self, what: &str, tmp: &Path) -> Result<String, CacheError> {
        let io = |source| CacheError::Io { what: what.into(), path: tmp.to_path_buf(), source };
        let sha256 = crate::digest::sha256_file(tmp).map_err(io)?;
        std::fs::rename(tmp, self.blob(&sha256)).map_err(io)?;
        Ok(sha256)
    }

    /// A scratch path for `what` under the cache's `partial/` (same file system as the blobs).
    pub fn scratch(&self, what: &str) -> PathBuf {
        let safe: String = what.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect();
        self.root.join("partial").join(format!("{safe}-{}", std::process::id()))
    }

    /// The cached blob for `expect`, if present (by sha256 only; sha512 pins need the lock).
    pub fn lookup(&self, expect: &Digest) -> Option<PathBuf> {
        match expect {
            Digest::Sha256(h) if self.has(h) => Some(self.blob(h)),
            _ => None,
        }
    }

    /// Copies a local file into the cache after checking its digest.
    pub fn import(&self, what: &str, src: &Path, expect: &Digest) -> Result<String, CacheError> {
        if let Digest::Sha256(h) = expect {
            if self.has(h) {
                return Ok(h.clone());
            }
        }
        let tmp = self.root.join("partial").join(format!("import-{}-{}", std::process::id(), what.replace('/', "_")));
        std::fs::copy(src, &tmp).map_err(|source| CacheError::Io {
            what: what.into(),
            path: src.to_path_buf(),
            source,
        })?;
        self.admit(what, &tmp, expect)
    }

    /// Downloads `url` into the cache unless it is there; resumes a partial download, and
    /// retries three times (saying so) before it gives up. Bytes received count on `progress`.
    pub async fn fetch(
        &self,
        what: &str,
        url: &str,
        expect: &Digest,
        progress: Option<&Task>,
    ) -> Result<String, CacheError> {
        if let Digest::Sha256(h) = expect {
            if self.has(h) {
                return Ok(h.clone());
            }
        }
        if self.offline {
            return Err(self.missing(what, expect));
        }
        let key = match expect {
            Digest::Sha256(h) | Digest::Sha512(h) => h[..32].to_string(),
        };
        let part = self.root.join("partial").join(format!("{key}.part"));
        let mut attempt = 0;
        loop {
            let have = std::fs::metadata(&part).map(|m| m.len()).unwrap_or(0);
            let mut req = self.http.get(url);
            if have > 0 {
                req = req.header(reqwest::header::RANGE, format!("bytes={have}-"));
            }
            let result: Result<(), String> = async {
                let mut resp = req.send().await.map_err(|e| proto::error_chain(&e))?;
                let status = resp.status();
                let append = status == reqwest::StatusCode::PARTIAL_CONTENT;
                if !status.is_success() {
                    return Err(format!("HTTP {status}"));
                }
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .write(true)
                    .append(append)
                    .truncate(!append)
                    .open(&part)
                    .map_err(|e| format!("{}: {e}", part.display()))?;
                while let Some(chunk) = resp.chunk().await.map_err(|e| proto::error_chain(&e))? {
                    f.write_all(&chunk).map_err(|e| format!("{}: {e}", part.display()))?;
                    if let Some(t) = progress {
                        t.inc(chunk.len() as u64);
                    }
                }
                f.sync_all().map_err(|e| format!("{}: {e}", part.display()))
            }
            .await;
            match result {
                Ok(()) => return self.admit(what, &part, expect),
                Err(e) if attempt < 3 => {
                    attempt += 1;
                    tracing::warn!("{what}: {e}; retrying ({attempt} of 3), resuming where it stopped");
                    tokio::time::sleep(Duration::from_secs(1 << attempt)).await;
                }
                Err(reason) => {
                    return Err(CacheError::Download {
                        what: what.into(),
                        url: url.into(),
                        reason,
                        attempts: attempt + 1,
                    });
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn import_verifies_and_keeps_nothing_bad() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(&d.path().join("cache"), false).unwrap();
        let f = d.path().join("x");
        std::fs::write(&f, b"hello").unwrap();
        let good = "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824";
        assert_eq!(c.import("x", &f, &Digest::Sha256(good.into())).unwrap(), good);
        assert!(c.has(good));
        let e = c.import("y", &f, &Digest::Sha256("0".repeat(64))).unwrap_err().to_string();
        assert!(e.contains("checksum mismatch") && e.contains(good), "{e}");
        assert_eq!(std::fs::read_dir(d.path().join("cache/partial")).unwrap().count(), 0);
    }

    #[tokio::test]
    async fn offline_names_the_missing_entry() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path(), true).unwrap();
        let e = c
            .fetch("kubelet", "https://example.invalid/kubelet", &Digest::Sha256("a".repeat(64)), None)
            .await
            .unwrap_err();
        assert!(e.to_string().contains("kubelet is not in the cache") && e.to_string().contains("--offline"), "{e}");
    }
}
