//! `[[image]]`s from a registry: pulled by the pinned digest over the OCI distribution API from a
//! real registry (Debian's docker-registry, the reference implementation, on loopback), written
//! as an OCI layout archive that umoci reads, the same bytes every time; a registry that serves
//! other bytes than asked for, or hands the pull token to another host, is caught.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use imgbuild::image::definition::{Definition, OciRef};
use imgbuild::image::registry::{self, PullError};
use serde_json::{Value, json};
use support::*;

const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";

fn sha(b: &[u8]) -> String {
    format!("sha256:{}", imgbuild::digest::sha256_hex(b))
}

/// docker-registry on a free loopback port, storing under `dir`.
fn start_registry(dir: &Path) -> (ChildGuard, String) {
    let bin = require_tool("docker-registry", "docker-registry (unpacked by .ci/setup-host)");
    let port = free_port();
    let config = dir.join("registry.yml");
    std::fs::write(
        &config,
        format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: 127.0.0.1:{port}\n",
            dir.join("data").display()
        ),
    )
    .unwrap();
    let child =
        Command::new(bin).arg("serve").arg(&config).stdout(Stdio::null()).stderr(Stdio::null()).spawn().unwrap();
    let guard = ChildGuard(child, "docker-registry".into());
    let base = format!("http://127.0.0.1:{port}");
    wait_for("docker-registry", Duration::from_secs(20), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    (guard, base)
}

/// Pushes content the way `docker push` does: blobs (monolithic upload), then manifests.
struct Pusher {
    http: reqwest::Client,
    base: String,
    repo: String,
}

impl Pusher {
    async fn blob(&self, data: &[u8]) -> String {
        let digest = sha(data);
        let r = self.http.post(format!("{}/v2/{}/blobs/uploads/", self.base, self.repo)).send().await.unwrap();
        assert_eq!(r.status(), 202, "start upload");
        let location = r.headers()["location"].to_str().unwrap().to_string();
        let url = if location.starts_with("http") { location } else { format!("{}{location}", self.base) };
        let sep = if url.contains('?') { '&' } else { '?' };
        let r = self.http.put(format!("{url}{sep}digest={digest}")).body(data.to_vec()).send().await.unwrap();
        assert_eq!(r.status(), 201, "finish upload of {digest}");
        digest
    }

    async fn manifest(&self, reference: &str, media_type: &str, body: &[u8]) -> String {
        let r = self
            .http
            .put(format!("{}/v2/{}/manifests/{reference}", self.base, self.repo))
            .header("content-type", media_type)
            .body(body.to_vec())
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201, "push manifest {reference}: {}", r.text().await.unwrap());
        sha(body)
    }
}

/// The blobs of the baked busybox image (images/local/build-oci-images), by digest, and its
/// manifest's digest.
fn busybox() -> (std::collections::HashMap<String, Vec<u8>>, String) {
    let archive = cache_dir().join("oci/busybox-1.35.0.oci.tar");
    assert!(archive.is_file(), "{} is missing: run .ci/setup-host", archive.display());
    let mut files = std::collections::HashMap::new();
    let mut tar = tar::Archive::new(std::fs::File::open(&archive).unwrap());
    for e in tar.entries().unwrap() {
        let mut e = e.unwrap();
        let path = e.path().unwrap().to_string_lossy().trim_start_matches("./").to_string();
        let mut data = Vec::new();
        std::io::Read::read_to_end(&mut e, &mut data).unwrap();
        files.insert(path, data);
    }
    let index: Value = serde_json::from_slice(&files["index.json"]).unwrap();
    let manifest = index["manifests"][0]["digest"].as_str().unwrap().to_string();
    let blobs = files
        .into_iter()
        .filter_map(|(p, d)| p.strip_prefix("blobs/sha256/").map(|h| (format!("sha256:{h}"), d)))
        .collect();
    (blobs, manifest)
}

fn oci(reference: &str, digest: &str) -> OciRef {
    let (repository, tag) = imgbuild::image::definition::split_reference(reference).unwrap();
    OciRef {
        reference: reference.into(),
        repository: repository.into(),
        tag: tag.into(),
        digest: digest.into(),
        sandbox: false,
    }
}

async fn pull(o: &OciRef, dir: &Path, name: &str) -> Result<PathBuf, PullError> {
    let out = dir.join(format!("{name}.oci.tar"));
    registry::pull(&registry::client().unwrap(), o, &dir.join(format!("{name}.work")), &out).await.map(|()| out)
}

#[tokio::test(flavor = "multi_thread")]
async fn pulls_by_digest_from_a_real_registry() {
    let dir = tempfile::tempdir().unwrap();
    let (_registry, base) = start_registry(dir.path());
    let host = base.trim_start_matches("http://").to_string();
    let p = Pusher { http: reqwest::Client::new(), base: base.clone(), repo: "e2e/busybox".into() };

    // The baked busybox image, and a second platform's manifest (another config, the same
    // layer) under one index: what upstreams publish.
    let (blobs, manifest_digest) = busybox();
    for data in blobs.values() {
        p.blob(data).await;
    }
    let manifest = &blobs[&manifest_digest];
    assert_eq!(p.manifest(&manifest_digest, OCI_MANIFEST, manifest).await, manifest_digest);
    let m: Value = serde_json::from_slice(manifest).unwrap();
    let arm_config = br#"{"architecture":"arm64","os":"linux","rootfs":{"type":"layers","diff_ids":[]}}"#;
    let arm_config_digest = p.blob(arm_config).await;
    let mut arm = m.clone();
    arm["config"] = json!({"mediaType": "application/vnd.oci.image.config.v1+json", "digest": arm_config_digest, "size": arm_config.len()});
    let arm = serde_json::to_vec(&arm).unwrap();
    let arm_digest = p.manifest(&sha(&arm), OCI_MANIFEST, &arm).await;
    let desc = |digest: &str, size: usize, arch: &str| json!({"mediaType": OCI_MANIFEST, "digest": digest, "size": size, "platform": {"os": "linux", "architecture": arch}});
    let index = serde_json::to_vec(&json!({
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [desc(&arm_digest, arm.len(), "arm64"), desc(&manifest_digest, manifest.len(), "amd64")],
    }))
    .unwrap();
    let index_digest = p.manifest("1.35.0", OCI_INDEX, &index).await;

    // By the index digest: the amd64 image, the index kept, the pin recorded.
    let reference = format!("{host}/e2e/busybox:1.35.0");
    let o = oci(&reference, &index_digest);
    let a = pull(&o, dir.path(), "a").await.unwrap();
    assert_eq!(imgbuild::image::oci::verify(&a, &o).unwrap(), manifest_digest, "the archive names the amd64 manifest");
    let b = pull(&o, dir.path(), "b").await.unwrap();
    assert_eq!(std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap(), "two pulls, other bytes");
    assert!(!dir.path().join("a.work").exists(), "the pull's blobs are left behind");
    // umoci reads it as an OCI image layout: index, manifest, config and layer all there.
    let layout = dir.path().join("layout");
    std::fs::create_dir(&layout).unwrap();
    assert!(Command::new("tar").arg("-xf").arg(&a).arg("-C").arg(&layout).status().unwrap().success());
    let stat = Command::new(require_tool("umoci", "umoci"))
        .args(["stat", "--json", "--image"])
        .arg(format!("{}:1.35.0", layout.display()))
        .output()
        .unwrap();
    assert!(stat.status.success(), "umoci stat: {}", String::from_utf8_lossy(&stat.stderr));
    assert!(layout.join("blobs/sha256").join(index_digest.trim_start_matches("sha256:")).is_file());
    assert!(!layout.join("blobs/sha256").join(arm_config_digest.trim_start_matches("sha256:")).exists());

    // By a manifest digest: that manifest, nothing recorded beside it.
    let single = oci(&reference, &manifest_digest);
    let s = pull(&single, dir.path(), "single").await.unwrap();
    assert_eq!(imgbuild::image::oci::verify(&s, &single).unwrap(), manifest_digest);
    let e = imgbuild::image::oci::verify(&s, &o).unwrap_err().to_string();
    assert!(e.contains(&index_digest), "{e}");

    // What the registry does not have, and an index without our platform.
    let missing = oci(&reference, &sha(b"nothing"));
    let e = pull(&missing, dir.path(), "m").await.unwrap_err().to_string();
    assert!(e.contains(&reference) && e.contains("404"), "{e}");
    assert!(!dir.path().join("m.oci.tar").exists(), "a failed pull leaves an archive");
    let arm_only = serde_json::to_vec(
        &json!({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [desc(&arm_digest, arm.len(), "arm64")]}),
    )
    .unwrap();
    let arm_only = p.manifest("arm-only", OCI_INDEX, &arm_only).await;
    let e = pull(&oci(&format!("{host}/e2e/busybox:arm-only"), &arm_only), dir.path(), "arm").await.unwrap_err();
    assert!(e.to_string().contains("has no linux/amd64 manifest"), "{e}");

    // Through a definition and the lock: into the cache by the archive's sha256; offline, the
    // cache's absence is named.
    // (Another tag than the definition's own busybox, which installs to the same path.)
    let pinned = format!("{host}/e2e/busybox:pulled");
    let def_text = std::fs::read_to_string(workspace_root().join("images/debian-12.toml")).unwrap()
        + &format!("\n[[image]]\nreference = \"{pinned}\"\ndigest = \"{index_digest}\"\nroles = [\"worker\"]\n");
    let def = Definition::parse(&def_text, Path::new("images/x.toml")).unwrap();
    let c = def.components.iter().find(|c| c.name == pinned).unwrap();
    assert!(c.from_registry());
    let cache = imgbuild::image::cache::Cache::open(&dir.path().join("cache"), false).unwrap();
    let (sha256, size) = imgbuild::image::lock::component_blob(c, &cache).await.unwrap();
    let direct = pull(&oci(&pinned, &index_digest), dir.path(), "direct").await.unwrap();
    assert_eq!(std::fs::read(cache.blob(&sha256)).unwrap(), std::fs::read(&direct).unwrap());
    assert_eq!(size, std::fs::metadata(&direct).unwrap().len());
    assert_eq!(c.source(), format!("{host}/e2e/busybox@{index_digest}"));
    let offline = imgbuild::image::cache::Cache::open(&dir.path().join("empty"), true).unwrap();
    let e = imgbuild::image::lock::component_blob(c, &offline).await.unwrap_err().to_string();
    assert!(e.contains("--offline") && e.contains(&index_digest), "{e}");
}

/// What the fake registry below saw: (host it was asked on, path, Authorization header).
type Seen = Arc<Mutex<Vec<(String, String, Option<String>)>>>;

/// A registry for error paths only: `/token` hands out a token, `/v2/...` wants it, blobs
/// redirect to another host (`storage`), and `bad` serves other bytes than its digest.
async fn fake_registry(seen: Seen, storage_port: u16, manifest: Vec<u8>, blob: Vec<u8>) -> u16 {
    use axum::extract::{Path as P, State};
    use axum::http::{HeaderMap, StatusCode, header};
    use axum::response::IntoResponse;
    #[derive(Clone)]
    struct S {
        seen: Seen,
        storage_port: u16,
        manifest: Vec<u8>,
        port: u16,
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    async fn v2(
        State(s): State<S>,
        P((repo, kind, digest)): P<(String, String, String)>,
        h: HeaderMap,
    ) -> axum::response::Response {
        let auth = h.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_string());
        s.seen.lock().unwrap().push(("registry".into(), format!("{repo}/{kind}/{digest}"), auth.clone()));
        if auth.as_deref() != Some("Bearer t0ken") {
            let challenge = format!(r#"Bearer realm="http://127.0.0.1:{}/token",service="fake""#, s.port);
            return (StatusCode::UNAUTHORIZED, [(header::WWW_AUTHENTICATE, challenge)]).into_response();
        }
        match (repo.as_str(), kind.as_str()) {
            (_, "manifests") => ([(header::CONTENT_TYPE, OCI_MANIFEST)], s.manifest.clone()).into_response(),
            ("bad", "blobs") => b"not what was asked for".to_vec().into_response(),
            (_, _) => (
                StatusCode::TEMPORARY_REDIRECT,
                [(header::LOCATION, format!("http://localhost:{}/storage/{digest}", s.storage_port))],
            )
                .into_response(),
        }
    }
    let s = S { seen: seen.clone(), storage_port, manifest, port };
    let app = axum::Router::new()
        .route("/token", axum::routing::get(|| async { axum::Json(json!({"token": "t0ken"})) }))
        .route("/v2/{repo}/{kind}/{digest}", axum::routing::get(v2))
        .with_state(s);
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    // The storage host: any blob, and what it was asked with.
    let storage = tokio::net::TcpListener::bind(("127.0.0.1", storage_port)).await.unwrap();
    let app = axum::Router::new().route(
        "/storage/{digest}",
        axum::routing::get(move |P(d): P<String>, h: HeaderMap| {
            let (seen, blob) = (seen.clone(), blob.clone());
            async move {
                let auth = h.get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_string());
                seen.lock().unwrap().push(("storage".into(), d, auth));
                blob
            }
        }),
    );
    tokio::spawn(async move { axum::serve(storage, app).await.unwrap() });
    port
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_stay_with_the_registry_and_substituted_bytes_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    // The storage host serves `layer` for any blob: config and layer are those bytes.
    let layer = b"layer bytes".to_vec();
    let manifest = serde_json::to_vec(&json!({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": sha(&layer), "size": layer.len()},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": sha(&layer), "size": layer.len()}],
    }))
    .unwrap();
    let seen: Seen = Arc::default();
    let port = fake_registry(seen.clone(), free_port(), manifest.clone(), layer.clone()).await;

    // Token fetched when asked, sent to the registry, never to the storage it redirects to.
    let good = oci(&format!("127.0.0.1:{port}/good:1"), &sha(&manifest));
    pull(&good, dir.path(), "good").await.unwrap();
    let seen_now = seen.lock().unwrap().clone();
    assert!(seen_now.iter().any(|(h, _, a)| h == "registry" && a.as_deref() == Some("Bearer t0ken")));
    let storage: Vec<_> = seen_now.iter().filter(|(h, _, _)| h == "storage").collect();
    assert!(!storage.is_empty(), "blobs were not fetched through the redirect: {seen_now:?}");
    assert!(storage.iter().all(|(_, _, a)| a.is_none()), "the registry's token went to another host: {storage:?}");

    // A registry serving other bytes for a blob: refused, by digest, nothing written.
    let bad = oci(&format!("127.0.0.1:{port}/bad:1"), &sha(&manifest));
    let e = pull(&bad, dir.path(), "bad").await.unwrap_err();
    assert!(matches!(e, PullError::Digest { .. } | PullError::Invalid { .. }), "{e}");
    assert!(!dir.path().join("bad.oci.tar").exists());
    // A manifest that is not the pinned one (the registry's bytes hash to something else).
    let other = oci(&format!("127.0.0.1:{port}/good:1"), &sha(b"another manifest"));
    let e = pull(&other, dir.path(), "other").await.unwrap_err();
    assert!(matches!(e, PullError::Digest { .. }), "{e}");
    assert!(e.to_string().contains("refused"), "{e}");
}
