//! OCI images from a registry (`[[image]]` with neither `url` nor `file`), pulled by the digest the
//! definition pins over the OCI distribution API, and written as an OCI image layout archive
//! that the bake treats like any other (`oci::verify`, the lock's sha256).
//!
//! The pinned digest is what upstreams publish: usually an image index (several platforms),
//! sometimes a single manifest. The pull checks every byte against a digest before using it —
//! the index against the pin, the platform's manifest against the index's descriptor, config
//! and layers against the manifest — so a registry (or anything between) can only refuse, never
//! substitute. The archive holds the index and the one platform's manifest, config and layers;
//! its `index.json` names the platform manifest with the reference's tag (what containerd
//! imports) and records the pinned digest beside it ([`INDEX_DIGEST`]). Entries are in a fixed
//! order with fixed metadata: the same image gives the same archive bytes on any machine.
//!
//! Registries: `https://HOST` for the reference's first path component when it names a host
//! (`registry.k8s.io/pause`), Docker Hub otherwise; plain `http://` only for loopback hosts
//! (`127.0.0.1:5000/x`, `localhost:5000/x`), as Docker and containerd treat them. Anonymous
//! bearer tokens (`WWW-Authenticate: Bearer realm=...`) are fetched when a registry asks;
//! redirects (blob storage) are followed by hand, never carrying the registry's token to
//! another host.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Duration;

use reqwest::StatusCode;
use reqwest::header::{ACCEPT, AUTHORIZATION, CONTENT_TYPE, LOCATION, WWW_AUTHENTICATE};
use serde::{Deserialize, Serialize};

use super::definition::OciRef;
use crate::digest::{hex, sha256_hex};

/// The annotation the archive's `index.json` records the definition's pinned digest in, when
/// that digest is an index and the archive names the platform's manifest.
pub const INDEX_DIGEST: &str = "org.imgbuild.index.digest";
/// The platform images are pulled for.
pub const PLATFORM: (&str, &str) = ("linux", "amd64");

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
const DOCKER_MANIFEST: &str = "application/vnd.docker.distribution.manifest.v2+json";
/// Manifests and indexes are small; a larger one is refused rather than read.
const MAX_MANIFEST: usize = 4 << 20;

/// Why an image cannot be pulled.
#[derive(Debug, thiserror::Error)]
pub enum PullError {
    /// The registry answered with an error status (after authentication, if it asked for it).
    #[error("{reference}: GET {url}: HTTP {status}{}", if body.is_empty() { String::new() } else { format!(": {body}") })]
    Status {
        /// The image.
        reference: String,
        /// What was asked for.
        url: String,
        /// The status.
        status: StatusCode,
        /// The start of the registry's error body.
        body: String,
    },
    /// The request failed (connection, TLS, timeout).
    #[error("{reference}: GET {url}: {reason}")]
    Transport {
        /// The image.
        reference: String,
        /// What was asked for.
        url: String,
        /// Why.
        reason: String,
    },
    /// Content did not have the digest it was asked for by.
    #[error("{reference}: {what} has digest sha256:{actual}, not {expected}: refused")]
    Digest {
        /// The image.
        reference: String,
        /// Which part (index, manifest, layer).
        what: String,
        /// The digest asked for.
        expected: String,
        /// The bytes' digest.
        actual: String,
    },
    /// An index or manifest that is not what the OCI image spec describes.
    #[error("{reference}: {reason}")]
    Invalid {
        /// The image.
        reference: String,
        /// What is wrong.
        reason: String,
    },
    /// A file of the archive cannot be written.
    #[error("{reference}: {}: {source}", path.display())]
    Io {
        /// The image.
        reference: String,
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// An OCI descriptor: what index and manifest entries point at.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    platform: Option<Platform>,
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    annotations: std::collections::BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Platform {
    os: String,
    architecture: String,
}

/// An image index or manifest list; a manifest has `config` and `layers` instead.
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
}

/// Where a reference's registry is, and the repository's name there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    /// `https://registry.k8s.io` (or `http://` for a loopback host).
    pub base: String,
    /// The repository on that registry (`pause`, `library/busybox`).
    pub repository: String,
}

/// Where `repository` (a reference's repository part) is pulled from.
pub fn locate(repository: &str) -> Location {
    match repository.split_once('/') {
        Some((host, rest)) if host.contains(['.', ':']) || host == "localhost" => {
            let name = host.rsplit_once(':').map_or(host, |(h, _)| h);
            let loopback = name == "localhost" || name.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
            let scheme = if loopback { "http" } else { "https" };
            Location { base: format!("{scheme}://{host}"), repository: rest.to_string() }
        }
        _ if repository.contains('/') => {
            Location { base: "https://registry-1.docker.io".into(), repository: repository.to_string() }
        }
        _ => Location { base: "https://registry-1.docker.io".into(), repository: format!("library/{repository}") },
    }
}

/// A session with one repository of one registry.
struct Session<'a> {
    http: &'a reqwest::Client,
    loc: Location,
    reference: &'a str,
    token: Option<String>,
}

impl Session<'_> {
    fn transport(&self, url: &str, e: &reqwest::Error) -> PullError {
        PullError::Transport { reference: self.reference.into(), url: url.into(), reason: proto::error_chain(e) }
    }

    /// GETs `/v2/<repository>/<kind>/<digest>`: authenticates when asked to, follows redirects
    /// by hand (the token stays with the registry's host).
    async fn get(&mut self, kind: &str, digest: &str, accept: &str) -> Result<reqwest::Response, PullError> {
        let origin = format!("{}/v2/{}/{kind}/{digest}", self.loc.base, self.loc.repository);
        let mut url = origin.clone();
        let mut authenticated = false;
        for _ in 0..8 {
            let mut req = self.http.get(&url).header(ACCEPT, accept);
            let same_host = url.starts_with(&format!("{}/", self.loc.base));
            if let (Some(t), true) = (&self.token, same_host) {
                req = req.header(AUTHORIZATION, format!("Bearer {t}"));
            }
            let resp = req.send().await.map_err(|e| self.transport(&url, &e))?;
            let status = resp.status();
            if status == StatusCode::UNAUTHORIZED && same_host && !authenticated {
                let challenge = resp.headers().get(WWW_AUTHENTICATE).and_then(|v| v.to_str().ok()).unwrap_or("");
                self.token = Some(self.token(challenge, &url).await?);
                authenticated = true;
                continue;
            }
            if status.is_redirection() {
                let location = resp.headers().get(LOCATION).and_then(|v| v.to_str().ok()).unwrap_or("");
                url = reqwest::Url::parse(&url)
                    .and_then(|u| u.join(location))
                    .map_err(|e| PullError::Invalid {
                        reference: self.reference.into(),
                        reason: format!("{url} redirects to '{location}': {e}"),
                    })?
                    .to_string();
                continue;
            }
            if !status.is_success() {
                let body = resp.text().await.unwrap_or_default();
                return Err(PullError::Status {
                    reference: self.reference.into(),
                    url,
                    status,
                    body: body.chars().take(200).collect(),
                });
            }
            return Ok(resp);
        }
        Err(PullError::Invalid { reference: self.reference.into(), reason: format!("{origin}: too many redirects") })
    }

    /// An anonymous pull token from the realm a `WWW-Authenticate: Bearer` challenge names.
    async fn token(&self, challenge: &str, url: &str) -> Result<String, PullError> {
        let invalid = |reason: String| PullError::Invalid { reference: self.reference.into(), reason };
        let params = parse_challenge(challenge)
            .ok_or_else(|| invalid(format!("{url} asks for authentication this client cannot do: '{challenge}'")))?;
        let realm = params.iter().find(|(k, _)| k == "realm").map(|(_, v)| v.clone()).unwrap_or_default();
        let mut token_url = reqwest::Url::parse(&realm).map_err(|e| invalid(format!("token realm '{realm}': {e}")))?;
        if token_url.scheme() != "https" && !self.loc.base.starts_with("http://") {
            return Err(invalid(format!("token realm '{realm}' is not https")));
        }
        {
            let mut q = token_url.query_pairs_mut();
            for (k, v) in params.iter().filter(|(k, _)| k == "service" || k == "scope") {
                q.append_pair(k, v);
            }
            if !params.iter().any(|(k, _)| k == "scope") {
                q.append_pair("scope", &format!("repository:{}:pull", self.loc.repository));
            }
        }
        let resp = self.http.get(token_url.clone()).send().await.map_err(|e| self.transport(token_url.as_str(), &e))?;
        if !resp.status().is_success() {
            return Err(PullError::Status {
                reference: self.reference.into(),
                url: token_url.to_string(),
                status: resp.status(),
                body: String::new(),
            });
        }
        #[derive(Deserialize)]
        struct Token {
            token: Option<String>,
            access_token: Option<String>,
        }
        let t: Token = resp.json().await.map_err(|e| self.transport(token_url.as_str(), &e))?;
        t.token.or(t.access_token).ok_or_else(|| invalid(format!("{token_url} gave no token")))
    }

    /// A manifest or index by digest, checked against it.
    async fn document(&mut self, digest: &str, what: &str) -> Result<(String, Vec<u8>), PullError> {
        let accept = [OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST].join(", ");
        let mut resp = self.get("manifests", digest, &accept).await?;
        let media_type = resp.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("").to_string();
        let mut body = Vec::new();
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(digest, &e))? {
            body.extend_from_slice(&chunk);
            if body.len() > MAX_MANIFEST {
                return Err(PullError::Invalid {
                    reference: self.reference.into(),
                    reason: format!("{what} {digest} is over {MAX_MANIFEST} bytes"),
                });
            }
        }
        check(self.reference, what, digest, &sha256_hex(&body))?;
        Ok((media_type, body))
    }

    /// A blob by digest into `path`, checked against its digest and size.
    async fn blob(&mut self, d: &Descriptor, what: &str, path: &Path) -> Result<(), PullError> {
        let io = |source| PullError::Io { reference: self.reference.into(), path: path.to_path_buf(), source };
        let mut resp = self.get("blobs", &d.digest, "*/*").await?;
        let mut file = std::fs::File::create(path).map_err(io)?;
        let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
        let mut size = 0u64;
        while let Some(chunk) = resp.chunk().await.map_err(|e| self.transport(&d.digest, &e))? {
            size += chunk.len() as u64;
            if size > d.size {
                break;
            }
            ctx.update(&chunk);
            file.write_all(&chunk).map_err(io)?;
        }
        file.sync_all().map_err(io)?;
        if size != d.size {
            return Err(PullError::Invalid {
                reference: self.reference.into(),
                reason: format!("{what} {} is {size} bytes or more, its descriptor says {}", d.digest, d.size),
            });
        }
        check(self.reference, what, &d.digest, &hex(ctx.finish().as_ref()))
    }
}

fn check(reference: &str, what: &str, expected: &str, actual_hex: &str) -> Result<(), PullError> {
    if expected.strip_prefix("sha256:") == Some(actual_hex) {
        Ok(())
    } else {
        Err(PullError::Digest {
            reference: reference.into(),
            what: what.into(),
            expected: expected.into(),
            actual: actual_hex.into(),
        })
    }
}

/// `Bearer realm="…",service="…",scope="…"` → its parameters; `None` for other schemes.
fn parse_challenge(h: &str) -> Option<Vec<(String, String)>> {
    let rest = h.trim().strip_prefix("Bearer ").or_else(|| h.trim().strip_prefix("bearer "))?;
    let mut out = Vec::new();
    let mut s = rest.trim();
    while !s.is_empty() {
        let (key, after) = s.split_once('=')?;
        let after = after.trim_start();
        let (value, tail) = if let Some(q) = after.strip_prefix('"') {
            let end = q.find('"')?;
            (&q[..end], &q[end + 1..])
        } else {
            after.split_once(',').map_or((after, ""), |(v, t)| (v, t))
        };
        out.push((key.trim().to_string(), value.to_string()));
        s = tail.trim_start().trim_start_matches(',').trim_start();
    }
    out.iter().any(|(k, _)| k == "realm").then_some(out)
}

/// Pulls `oci` by its pinned digest for [`PLATFORM`] and writes the OCI layout archive to `out`
/// (through a temporary file beside it; `out` appears complete or not at all). `work` holds the
/// blobs meanwhile.
pub async fn pull(http: &reqwest::Client, oci: &OciRef, work: &Path, out: &Path) -> Result<(), PullError> {
    let reference = oci.reference.as_str();
    let invalid = |reason: String| PullError::Invalid { reference: reference.into(), reason };
    let io = |path: &Path, source| PullError::Io { reference: reference.into(), path: path.to_path_buf(), source };
    let mut s = Session { http, loc: locate(&oci.repository), reference, token: None };
    std::fs::create_dir_all(work).map_err(|e| io(work, e))?;
    // (digest, bytes) of the index and manifest, and the blob files.
    let mut documents: Vec<(String, Vec<u8>)> = Vec::new();
    let (media_type, body) = s.document(&oci.digest, "pinned digest").await?;
    let top: Document = serde_json::from_slice(&body).map_err(|e| invalid(format!("{}: {e}", oci.digest)))?;
    let media_type = top.media_type.clone().unwrap_or(media_type);
    let (manifest_desc, manifest) = if let Some(list) = &top.manifests {
        let d = list
            .iter()
            .find(|d| d.platform.as_ref().is_some_and(|p| (p.os.as_str(), p.architecture.as_str()) == PLATFORM))
            .ok_or_else(|| invalid(format!("index {} has no {}/{} manifest", oci.digest, PLATFORM.0, PLATFORM.1)))?
            .clone();
        documents.push((oci.digest.clone(), body));
        let (_, mbody) = s.document(&d.digest, "platform manifest").await?;
        if mbody.len() as u64 != d.size {
            return Err(invalid(format!("manifest {} is {} bytes, the index says {}", d.digest, mbody.len(), d.size)));
        }
        let m: Document = serde_json::from_slice(&mbody).map_err(|e| invalid(format!("{}: {e}", d.digest)))?;
        documents.push((d.digest.clone(), mbody));
        (d, m)
    } else {
        let d = Descriptor {
            media_type,
            digest: oci.digest.clone(),
            size: body.len() as u64,
            platform: None,
            annotations: Default::default(),
        };
        documents.push((oci.digest.clone(), body));
        (d, top)
    };
    let (Some(config), Some(layers)) = (manifest.config, manifest.layers) else {
        return Err(invalid(format!("{} is not an image manifest (no config and layers)", manifest_desc.digest)));
    };
    let mut blobs: Vec<(String, PathBuf)> = Vec::new();
    for (i, d) in std::iter::once(&config).chain(&layers).enumerate() {
        let hex = d.digest.strip_prefix("sha256:").filter(|h| crate::image::definition::is_hex(h, 64));
        let hex = hex.ok_or_else(|| invalid(format!("blob digest '{}' is not sha256", d.digest)))?;
        let path = work.join(hex);
        let what = if i == 0 { "config".to_string() } else { format!("layer {i}") };
        s.blob(d, &what, &path).await?;
        blobs.push((hex.to_string(), path));
    }

    // index.json: the platform manifest under the tag, the pin beside it.
    let mut desc = Descriptor { platform: None, annotations: Default::default(), ..manifest_desc };
    desc.annotations.insert("org.opencontainers.image.ref.name".into(), oci.tag.clone());
    desc.annotations.insert("io.containerd.image.name".into(), oci.reference.clone());
    if desc.digest != oci.digest {
        desc.annotations.insert(INDEX_DIGEST.into(), oci.digest.clone());
    }
    let index = serde_json::json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc]});
    let index = serde_json::to_vec(&index).map_err(|e| invalid(e.to_string()))?;

    let tmp = out.with_extension("tmp");
    let file = std::fs::File::create(&tmp).map_err(|e| io(&tmp, e))?;
    let mut tar = tar::Builder::new(std::io::BufWriter::new(file));
    let mut entries: Vec<(String, Entry)> = vec![
        ("oci-layout".into(), Entry::Bytes(br#"{"imageLayoutVersion":"1.0.0"}"#.to_vec())),
        ("index.json".into(), Entry::Bytes(index)),
    ];
    let mut blob_entries: Vec<(String, Entry)> = documents
        .into_iter()
        .map(|(d, b)| (format!("blobs/sha256/{}", d.trim_start_matches("sha256:")), Entry::Bytes(b)))
        .chain(blobs.into_iter().map(|(h, p)| (format!("blobs/sha256/{h}"), Entry::File(p))))
        .collect();
    blob_entries.sort_by(|a, b| a.0.cmp(&b.0));
    blob_entries.dedup_by(|a, b| a.0 == b.0);
    entries.extend(blob_entries);
    for (name, entry) in entries {
        let mut h = tar::Header::new_ustar();
        h.set_mode(0o644);
        h.set_mtime(0);
        h.set_uid(0);
        h.set_gid(0);
        let r = match entry {
            Entry::Bytes(b) => {
                h.set_size(b.len() as u64);
                h.set_cksum();
                tar.append_data(&mut h, &name, b.as_slice())
            }
            Entry::File(p) => {
                let f = std::fs::File::open(&p).map_err(|e| io(&p, e))?;
                h.set_size(f.metadata().map_err(|e| io(&p, e))?.len());
                h.set_cksum();
                tar.append_data(&mut h, &name, f)
            }
        };
        r.map_err(|e| io(&tmp, e))?;
    }
    let w = tar.into_inner().map_err(|e| io(&tmp, e))?;
    let file = w.into_inner().map_err(|e| io(&tmp, e.into_error()))?;
    file.sync_all().map_err(|e| io(&tmp, e))?;
    std::fs::rename(&tmp, out).map_err(|e| io(out, e))?;
    let _ = std::fs::remove_dir_all(work);
    Ok(())
}

enum Entry {
    Bytes(Vec<u8>),
    File(PathBuf),
}

/// A client for registries: the system's CA bundle, no automatic redirects (see [`pull`]).
pub fn client() -> Result<reqwest::Client, reqwest::Error> {
    super::cache::http_builder().redirect(reqwest::redirect::Policy::none()).timeout(Duration::from_secs(600)).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registries_of_references() {
        let l = |r: &str| {
            let l = locate(r);
            format!("{} {}", l.base, l.repository)
        };
        assert_eq!(l("registry.k8s.io/pause"), "https://registry.k8s.io pause");
        assert_eq!(l("registry.k8s.io/coredns/coredns"), "https://registry.k8s.io coredns/coredns");
        assert_eq!(l("busybox"), "https://registry-1.docker.io library/busybox");
        assert_eq!(l("calico/node"), "https://registry-1.docker.io calico/node");
        assert_eq!(l("127.0.0.1:5000/pause"), "http://127.0.0.1:5000 pause");
        assert_eq!(l("localhost:5000/a/b"), "http://localhost:5000 a/b");
        assert_eq!(l("10.0.0.5:5000/pause"), "https://10.0.0.5:5000 pause", "only loopback gets plain http");
    }

    #[test]
    fn bearer_challenges() {
        let p = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/busybox:pull""#,
        )
        .unwrap();
        assert_eq!(p[0], ("realm".into(), "https://auth.docker.io/token".into()));
        assert_eq!(p[2], ("scope".into(), "repository:library/busybox:pull".into()));
        assert!(parse_challenge(r#"Basic realm="x""#).is_none());
        assert!(parse_challenge(r#"Bearer service="x""#).is_none(), "no realm");
        assert!(parse_challenge(r#"Bearer realm="unterminated"#).is_none());
    }
}
