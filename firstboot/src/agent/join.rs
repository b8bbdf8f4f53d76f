//! Joining Kubernetes the standard way.
//!
//! Workers: discovery through the VIP (fetch `kube-public/cluster-info` without trusting the
//! server yet, check that its CA matches the pin and that its `jws-kubeconfig-<id>` signature
//! verifies with the token, then fetch it again trusting only that CA), write the bootstrap
//! kubeconfig, start the kubelet, and wait until it holds its client certificate and its Node
//! exists. Masters: wait for etcd `/health` and the apiserver's `/readyz`, apply the cluster
//! objects when holding the bootstrap lease, then bootstrap the kubelet the same way and put the
//! master labels and taint on the node.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::client::{Backoff, Client as Enrollment, Retried};
use super::systemd::Systemd;
use proto::error_chain;
use proto::fsutil::{ensure_dir, write_atomic};
use proto::paths;
use proto::pin::{CaPin, verify_detached_jws};
use proto::wire::{ControlPlaneCheck, JoinSpec, LeaseAction, LeaseRequest, LeaseResponse, PATH_BOOTSTRAP_LEASE};

/// Why the node did not join.
#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    /// `cluster-info` could not be fetched, or does not match the pin or the token's signature.
    #[error("discovery: {0}")]
    Discovery(String),
    /// Something the join waits for (etcd, the apiserver, the kubelet's certificate, the Node) did
    /// not come within the deadline.
    #[error("{what} not ready after {waited:?}: {last}")]
    NotReady {
        /// What was waited for.
        what: String,
        /// How long.
        waited: Duration,
        /// The last attempt's error.
        last: String,
    },
    /// A file, a systemd call or a Kubernetes request failed.
    #[error("{0}")]
    Other(String),
}

fn other(e: impl std::fmt::Display) -> JoinError {
    JoinError::Other(e.to_string())
}

/// A small Kubernetes API client.
pub struct Kube {
    http: reqwest::Client,
    base: String,
}

impl Kube {
    /// A client of the API at `base` trusting only `ca_pem`, presenting `client` (cert, key PEM) if given.
    pub fn new(base: &str, ca_pem: &str, client: Option<(&str, &str)>) -> Result<Self, JoinError> {
        let tls = proto::tls::client_config(ca_pem, client).map_err(other)?;
        Self::with_tls(base, tls)
    }

    fn with_tls(base: &str, tls: rustls::ClientConfig) -> Result<Self, JoinError> {
        let http = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(Duration::from_secs(15))
            .build()
            .map_err(other)?;
        Ok(Kube { http, base: base.trim_end_matches('/').to_string() })
    }

    /// A GET of `path`: the status and the body, or why there is no answer.
    pub async fn get(&self, path: &str) -> Result<(u16, String), String> {
        let r = self.http.get(format!("{}{path}", self.base)).send().await.map_err(|e| error_chain(&e))?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.map_err(|e| e.to_string())?))
    }

    async fn send(&self, method: reqwest::Method, path: &str, body: &Value) -> Result<(u16, String), String> {
        let r = self
            .http
            .request(method, format!("{}{path}", self.base))
            .json(body)
            .send()
            .await
            .map_err(|e| error_chain(&e))?;
        let status = r.status().as_u16();
        Ok((status, r.text().await.map_err(|e| e.to_string())?))
    }

    /// Creates `obj`, or replaces it when it exists.
    pub async fn apply(&self, obj: &Value) -> Result<(), String> {
        let (collection, name) = object_path(obj)?;
        let (status, body) = self.send(reqwest::Method::POST, &collection, obj).await?;
        match status {
            200 | 201 => Ok(()),
            409 => {
                let item = format!("{collection}/{name}");
                let (s, cur) = self.get(&item).await?;
                if s != 200 {
                    return Err(format!("GET {item}: HTTP {s}"));
                }
                let cur: Value = serde_json::from_str(&cur).map_err(|e| e.to_string())?;
                let mut obj = obj.clone();
                obj["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"].clone();
                let (s, b) = self.send(reqwest::Method::PUT, &item, &obj).await?;
                if s == 200 { Ok(()) } else { Err(format!("PUT {item}: HTTP {s}: {}", trim(&b))) }
            }
            s => Err(format!("POST {collection}: HTTP {s}: {}", trim(&body))),
        }
    }
}

fn trim(s: &str) -> String {
    s.chars().take(300).collect()
}

/// The REST collection and name of a Kubernetes object.
fn object_path(obj: &Value) -> Result<(String, String), String> {
    let api = obj["apiVersion"].as_str().ok_or("object without apiVersion")?;
    let kind = obj["kind"].as_str().ok_or("object without kind")?;
    let name = obj["metadata"]["name"].as_str().ok_or("object without metadata.name")?;
    let prefix = if api == "v1" { "/api/v1".to_string() } else { format!("/apis/{api}") };
    let plural = format!("{}s", kind.to_ascii_lowercase());
    let collection = match obj["metadata"]["namespace"].as_str() {
        Some(ns) => format!("{prefix}/namespaces/{ns}/{plural}"),
        None => format!("{prefix}/{plural}"),
    };
    Ok((collection, name.to_string()))
}

/// Polls `check` about every 2 s until it returns `Ok`, or fails at the deadline with its last
/// error.
async fn wait_until<T, F, Fut>(what: &str, deadline: Instant, check: F) -> Result<T, JoinError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let every = Backoff { initial: Duration::from_secs(2), max: Duration::from_secs(2) };
    every.poll(what, deadline, check).await.map_err(|r| match r {
        Retried::Final(last) => JoinError::NotReady { what: what.to_string(), waited: Duration::ZERO, last },
        Retried::Deadline(waited, last) => JoinError::NotReady { what: what.to_string(), waited, last },
    })
}

/// Accepts any server certificate: only for the first, unauthenticated fetch of cluster-info,
/// whose content is then checked against the pin and the token's signature.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

const CLUSTER_INFO: &str = "/api/v1/namespaces/kube-public/configmaps/cluster-info";

/// Checks a fetched cluster-info: the CA in its kubeconfig has the pin, and the signature for
/// the token verifies. Returns the CA PEM.
pub fn verify_cluster_info(body: &str, spec: &JoinSpec) -> Result<String, String> {
    use base64::Engine;
    let cm: Value = serde_json::from_str(body).map_err(|e| format!("cluster-info is not JSON: {e}"))?;
    let kubeconfig = cm["data"]["kubeconfig"].as_str().ok_or("cluster-info has no data.kubeconfig")?;
    let jws_key = format!("jws-kubeconfig-{}", spec.token.id());
    let jws = cm["data"][&jws_key]
        .as_str()
        .ok_or_else(|| format!("cluster-info has no {jws_key} yet (not signed for this token)"))?;
    let kc: Value = serde_saphyr::from_str(kubeconfig).map_err(|e| format!("cluster-info kubeconfig: {e}"))?;
    let ca_b64 = kc["clusters"][0]["cluster"]["certificate-authority-data"].as_str().ok_or("cluster-info has no CA")?;
    let ca_pem =
        String::from_utf8(base64::engine::general_purpose::STANDARD.decode(ca_b64).map_err(|e| e.to_string())?)
            .map_err(|_| "CA is not PEM")?;
    let pin = CaPin::of_cert_pem(&ca_pem).map_err(|e| e.to_string())?;
    if pin != spec.ca_pin {
        return Err(format!("REFUSED: cluster-info's CA is {pin}, the pinned CA is {}", spec.ca_pin));
    }
    verify_detached_jws(jws, kubeconfig, &spec.token).map_err(|e| format!("REFUSED: {e}"))?;
    Ok(ca_pem)
}

async fn discover(spec: &JoinSpec, deadline: Instant) -> Result<String, JoinError> {
    let provider = proto::tls::provider();
    let mut tls = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(other)?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)))
        .with_no_client_auth();
    tls.alpn_protocols = vec![b"http/1.1".to_vec()];
    let insecure = Kube::with_tls(&spec.api_server, tls)?;
    let ca = wait_until("a signed cluster-info through the VIP", deadline, || async {
        let (status, body) = insecure.get(CLUSTER_INFO).await?;
        if status != 200 {
            return Err(format!("GET {CLUSTER_INFO}: HTTP {status}"));
        }
        match verify_cluster_info(&body, spec) {
            // A mismatch is an attack or a misconfiguration: stop, do not wait it out.
            Err(e) if e.starts_with("REFUSED") => Ok(Err(e)),
            other => other.map(Ok),
        }
    })
    .await?
    .map_err(JoinError::Discovery)?;
    // Now trusting only that CA, the server must hold a certificate from it.
    let secure = Kube::new(&spec.api_server, &ca, None)?;
    let (status, body) =
        secure.get(CLUSTER_INFO).await.map_err(|e| JoinError::Discovery(format!("with the discovered CA: {e}")))?;
    if status != 200 {
        return Err(JoinError::Discovery(format!("with the discovered CA: HTTP {status}")));
    }
    verify_cluster_info(&body, spec).map_err(JoinError::Discovery)?;
    Ok(ca)
}

fn read(root: &Path, p: &str) -> Result<String, JoinError> {
    std::fs::read_to_string(paths::under(root, p)).map_err(|e| other(format!("{p}: {e}")))
}

async fn control_plane(cp: &ControlPlaneCheck, root: &Path, deadline: Instant) -> Result<Kube, JoinError> {
    let etcd = Kube::new(
        &cp.etcd_url,
        &read(root, &cp.etcd_ca)?,
        Some((&read(root, &cp.etcd_cert)?, &read(root, &cp.etcd_key)?)),
    )?;
    wait_until("etcd /health", deadline, || async {
        let (status, body) = etcd.get("/health").await?;
        let v: Value = serde_json::from_str(&body).unwrap_or_default();
        if status == 200 && v["health"] == "true" { Ok(()) } else { Err(format!("HTTP {status}: {}", trim(&body))) }
    })
    .await?;
    let api = Kube::new(
        &cp.apiserver_url,
        &read(root, &cp.ca)?,
        Some((&read(root, &cp.admin_cert)?, &read(root, &cp.admin_key)?)),
    )?;
    wait_until("kube-apiserver /readyz", deadline, || async {
        let (status, body) = api.get("/readyz").await?;
        if status == 200 { Ok(()) } else { Err(format!("HTTP {status}: {}", trim(&body))) }
    })
    .await?;
    Ok(api)
}

/// Takes the bootstrap lease until the cluster objects are applied (by us or another master).
async fn bootstrap_objects(enrollment: &Enrollment, api: &Kube, deadline: Instant) -> Result<bool, JoinError> {
    wait_until("the cluster objects (bootstrap lease)", deadline, || async {
        let r: LeaseResponse = enrollment
            .post(PATH_BOOTSTRAP_LEASE, &LeaseRequest { action: LeaseAction::Acquire })
            .await
            .map_err(|e| e.to_string())?;
        if r.completed {
            return Ok(false);
        }
        if !r.granted {
            return Err(format!("{} holds the bootstrap lease", r.holder.unwrap_or_default()));
        }
        for obj in &r.objects {
            api.apply(obj).await?;
        }
        let _: LeaseResponse = enrollment
            .post(PATH_BOOTSTRAP_LEASE, &LeaseRequest { action: LeaseAction::Complete })
            .await
            .map_err(|e| e.to_string())?;
        Ok(true)
    })
    .await
}

/// Runs the join; returns the outcome message.
pub async fn join<S: Systemd>(
    spec: &JoinSpec,
    root: &Path,
    systemd: &mut S,
    enrollment: &Enrollment,
    deadline: Instant,
) -> Result<String, JoinError> {
    let mut notes = Vec::new();
    let admin = match &spec.control_plane {
        Some(cp) => {
            let api = control_plane(cp, root, deadline).await?;
            if bootstrap_objects(enrollment, &api, deadline).await? {
                notes.push("applied the cluster objects");
            }
            Some(api)
        }
        None => None,
    };
    if spec.discovery {
        let ca = discover(spec, deadline).await?;
        let ca_path = paths::under(root, paths::CA_CERT);
        match std::fs::read_to_string(&ca_path) {
            Ok(have) if CaPin::of_cert_pem(&have).ok() != Some(spec.ca_pin) => {
                return Err(JoinError::Discovery(format!("{} does not have the pinned CA", ca_path.display())));
            }
            Ok(_) => {}
            Err(_) => {
                #[expect(
                    clippy::expect_used,
                    reason = "a path under a root joined with an absolute node path has a parent"
                )]
                ensure_dir(ca_path.parent().expect("has parent"), 0o755).map_err(other)?;
                write_atomic(&ca_path, ca.as_bytes(), 0o644, None).map_err(other)?;
            }
        }
        notes.push("verified cluster-info");
    }
    let boot = paths::under(root, paths::BOOTSTRAP_KUBECONFIG);
    #[expect(clippy::expect_used, reason = "a path under a root joined with an absolute node path has a parent")]
    ensure_dir(boot.parent().expect("has parent"), 0o755).map_err(other)?;
    write_atomic(&boot, spec.bootstrap_kubeconfig.as_bytes(), 0o600, None).map_err(other)?;
    systemd.start(&spec.kubelet_unit).await.map_err(other)?;

    // TLS bootstrap: the kubelet's CSR is auto-approved and it writes its client certificate.
    let cert_path = paths::under(root, paths::KUBELET_CLIENT_CERT);
    let pem = wait_until("the kubelet's client certificate", deadline, || async {
        std::fs::read_to_string(&cert_path).map_err(|e| format!("{}: {e}", cert_path.display()))
    })
    .await?;
    let ca = read(root, paths::CA_CERT)?;
    let as_node = Kube::new(&spec.api_server, &ca, Some((&pem, &pem)))?;
    let node_path = format!("/api/v1/nodes/{}", spec.node_name);
    wait_until(&format!("Node {}", spec.node_name), deadline, || async {
        let (status, body) = as_node.get(&node_path).await?;
        if status == 200 { Ok(()) } else { Err(format!("HTTP {status}: {}", trim(&body))) }
    })
    .await?;
    if let Some(api) = &admin {
        if !spec.node_labels.is_empty() || !spec.node_taints.is_empty() {
            wait_until("master labels and taint", deadline, || async { label_node(api, spec).await }).await?;
        }
    }
    let what = if spec.control_plane.is_some() { "control plane ready" } else { "joined" };
    Ok(if notes.is_empty() { what.to_string() } else { format!("{what} ({})", notes.join(", ")) })
}

async fn label_node(api: &Kube, spec: &JoinSpec) -> Result<(), String> {
    let path = format!("/api/v1/nodes/{}", spec.node_name);
    let (status, body) = api.get(&path).await?;
    if status != 200 {
        return Err(format!("GET {path}: HTTP {status}"));
    }
    let mut node: Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    for (k, v) in &spec.node_labels {
        node["metadata"]["labels"][k] = Value::String(v.clone());
    }
    let taints = node["spec"]["taints"].as_array().cloned().unwrap_or_default();
    let mut taints = taints;
    for t in &spec.node_taints {
        if !taints.iter().any(|x| x["key"] == t.key.as_str() && x["effect"] == t.effect.as_str()) {
            taints.push(serde_json::json!({"key": t.key, "value": t.value, "effect": t.effect}));
        }
    }
    node["spec"]["taints"] = Value::Array(taints);
    let (status, body) = api.send(reqwest::Method::PUT, &path, &node).await?;
    if status == 200 { Ok(()) } else { Err(format!("PUT {path}: HTTP {status}: {}", trim(&body))) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn object_paths() {
        let cases = [
            (
                serde_json::json!({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s", "namespace": "kube-system"}}),
                "/api/v1/namespaces/kube-system/secrets",
            ),
            (
                serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "ClusterRoleBinding", "metadata": {"name": "b"}}),
                "/apis/rbac.authorization.k8s.io/v1/clusterrolebindings",
            ),
            (
                serde_json::json!({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding", "metadata": {"name": "b", "namespace": "kube-public"}}),
                "/apis/rbac.authorization.k8s.io/v1/namespaces/kube-public/rolebindings",
            ),
        ];
        for (obj, want) in cases {
            assert_eq!(object_path(&obj).unwrap().0, want);
        }
        assert!(object_path(&serde_json::json!({"kind": "X"})).is_err());
    }
}
