//! Kubernetes objects and kubeconfigs imgbuild renders: the bootstrap-token Secret, the RBAC
//! bindings for node bootstrap and CSR auto-approval (kubeadm's names), `kube-public/cluster-info`
//! with anonymous read access, and kubeconfig files. Objects are JSON values: written as YAML files
//! for `kubectl apply`, and applied as JSON by the first master.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::{Value, json};

use crate::templates;
use crate::tokens::{DEFAULT_NODE_GROUP, TokenRecord, TokenUsage};

/// `kube-system/bootstrap-token-<id>` with the keys and value rules of
/// `bootstrap.kubernetes.io/token` Secrets.
pub fn bootstrap_token_secret(t: &TokenRecord) -> Value {
    let mut data = serde_json::Map::new();
    data.insert("token-id".into(), t.id().into());
    data.insert("token-secret".into(), t.token.secret().into());
    if !t.description.is_empty() {
        data.insert("description".into(), t.description.clone().into());
    }
    if let Some(exp) = t.expires {
        #[expect(
            clippy::expect_used,
            reason = "token expiries are UTC and round-trip tokens.json as RFC 3339, so they format as RFC 3339"
        )]
        let rfc = exp.format(&time::format_description::well_known::Rfc3339).expect("valid time");
        data.insert("expiration".into(), rfc.into());
    }
    for usage in &t.usages {
        data.insert(format!("usage-bootstrap-{}", usage.as_str()), "true".into());
    }
    if !t.groups.is_empty() {
        data.insert("auth-extra-groups".into(), t.groups.join(",").into());
    }
    json!({
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": format!("bootstrap-token-{}", t.id()), "namespace": "kube-system"},
        "type": "bootstrap.kubernetes.io/token",
        "stringData": data,
    })
}

/// The default join token's request: kubeadm's usages and group.
pub fn join_token_usages() -> (Vec<TokenUsage>, Vec<String>) {
    (vec![TokenUsage::Authentication, TokenUsage::Signing], vec![DEFAULT_NODE_GROUP.to_string()])
}

fn cluster_role_binding(name: &str, role: &str, kind: &str, subject: &str) -> Value {
    json!({
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "ClusterRoleBinding",
        "metadata": {"name": name},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole", "name": role},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": subject}],
    })
}

/// Lets bootstrap tokens of `group` create CSRs and have node client CSRs auto-approved, and lets
/// nodes renew their client certificates (kubeadm's three bindings).
pub fn node_bootstrap_rbac(group: &str) -> Vec<Value> {
    vec![
        cluster_role_binding("kubeadm:kubelet-bootstrap", "system:node-bootstrapper", "Group", group),
        cluster_role_binding(
            "kubeadm:node-autoapprove-bootstrap",
            "system:certificates.k8s.io:certificatesigningrequests:nodeclient",
            "Group",
            group,
        ),
        cluster_role_binding(
            "kubeadm:node-autoapprove-certificate-rotation",
            "system:certificates.k8s.io:certificatesigningrequests:selfnodeclient",
            "Group",
            "system:nodes",
        ),
    ]
}

/// The kubeconfig stored in `cluster-info` (the bootstrap signer signs these exact bytes).
#[expect(clippy::expect_used, reason = "an embedded template given every variable it uses; the kube tests render it")]
pub fn cluster_info_kubeconfig(ca_pem: &str, server: &str) -> String {
    templates::render("cluster-info-kubeconfig.yaml", json!({"ca_data": B64.encode(ca_pem), "server": server}))
        .expect("cluster-info template renders")
}

/// `kube-public/cluster-info`, and the Role/RoleBinding that let anonymous users read it.
pub fn cluster_info(ca_pem: &str, server: &str) -> Vec<Value> {
    vec![
        json!({
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": "cluster-info", "namespace": "kube-public"},
            "data": {"kubeconfig": cluster_info_kubeconfig(ca_pem, server)},
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "Role",
            "metadata": {"name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public"},
            "rules": [{"apiGroups": [""], "resources": ["configmaps"], "resourceNames": ["cluster-info"], "verbs": ["get"]}],
        }),
        json!({
            "apiVersion": "rbac.authorization.k8s.io/v1",
            "kind": "RoleBinding",
            "metadata": {"name": "kubeadm:bootstrap-signer-clusterinfo", "namespace": "kube-public"},
            "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubeadm:bootstrap-signer-clusterinfo"},
            "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "User", "name": "system:anonymous"}],
        }),
    ]
}

/// Objects as a multi-document YAML file for `kubectl apply -f`.
#[expect(clippy::expect_used, reason = "YAML can write every JSON value")]
pub fn to_yaml(objects: &[Value]) -> String {
    objects
        .iter()
        .map(|o| serde_saphyr::to_string(o).expect("JSON values serialize as YAML"))
        .collect::<Vec<_>>()
        .join("---\n")
}

/// CoreDNS as kubeadm deploys it (ServiceAccount, RBAC, Corefile, Deployment, the `kube-dns`
/// Service at `cluster_dns`), running `image`, tolerating the masters' `taint`.
pub fn coredns(image: &str, cluster_dns: &str, dns_domain: &str, taint: &str) -> Vec<Value> {
    let ctx = json!({"image": image, "cluster_dns": cluster_dns, "dns_domain": dns_domain, "taint": taint});
    #[expect(clippy::expect_used, reason = "the template is embedded, and its context has every variable it uses")]
    let text = templates::render("addons/coredns.yaml", ctx).expect("coredns template renders");
    text.split("\n---\n")
        .map(|doc| {
            #[expect(clippy::expect_used, reason = "the embedded template is YAML for any strings in its context")]
            let v: Value = serde_saphyr::from_str(doc).expect("coredns template is YAML");
            v
        })
        .collect()
}

/// Where a kubeconfig finds the CA.
pub enum CaRef<'a> {
    /// Embedded as `certificate-authority-data` (this PEM).
    Pem(&'a str),
    /// Referenced as `certificate-authority` (a path on the node).
    File(&'a str),
}

/// How a kubeconfig's user authenticates.
pub enum Auth<'a> {
    /// A bearer token (a bootstrap token, `id.secret`).
    Token(&'a str),
    /// A client certificate and key embedded as `client-*-data` (PEM).
    CertPem {
        /// The certificate, PEM.
        cert: &'a str,
        /// The private key, PEM.
        key: &'a str,
    },
    /// A client certificate and key referenced by path on the node.
    CertFiles {
        /// The certificate's path.
        cert: &'a str,
        /// The key's path.
        key: &'a str,
    },
}

/// A kubeconfig with one cluster (`server`, trusting `ca`), one user and one context.
#[expect(clippy::expect_used, reason = "an embedded template given every variable it uses; the kube tests render it")]
pub fn kubeconfig(cluster: &str, server: &str, ca: CaRef<'_>, user: &str, auth: Auth<'_>) -> String {
    let mut ctx = serde_json::Map::new();
    ctx.insert("cluster".into(), cluster.into());
    ctx.insert("server".into(), server.into());
    ctx.insert("user".into(), user.into());
    match ca {
        CaRef::Pem(p) => ctx.insert("ca_data".into(), B64.encode(p).into()),
        CaRef::File(f) => ctx.insert("ca_file".into(), f.into()),
    };
    match auth {
        Auth::Token(t) => {
            ctx.insert("token".into(), t.into());
        }
        Auth::CertPem { cert, key } => {
            ctx.insert("cert_data".into(), B64.encode(cert).into());
            ctx.insert("key_data".into(), B64.encode(key).into());
        }
        Auth::CertFiles { cert, key } => {
            ctx.insert("cert_file".into(), cert.into());
            ctx.insert("key_file".into(), key.into());
        }
    }
    templates::render("kubeconfig.yaml", Value::Object(ctx)).expect("kubeconfig template renders")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tokens::{NewToken, TokenStore};

    #[test]
    fn secret_has_kubernetes_keys() {
        let d = tempfile::tempdir().unwrap();
        let mut s = TokenStore::load(&d.path().join("t.json")).unwrap();
        let (usages, groups) = join_token_usages();
        let now = time::macros::datetime!(2026-11-22 10:00:00.5 UTC);
        let t = s
            .create(
                NewToken {
                    ttl: Some(std::time::Duration::from_secs(86400)),
                    usages: usages.into_iter().collect(),
                    groups,
                    description: "join".into(),
                    role: None,
                    node: None,
                    max_uses: None,
                },
                now,
            )
            .unwrap()
            .clone();
        let v = bootstrap_token_secret(&t);
        assert_eq!(v["type"], "bootstrap.kubernetes.io/token");
        assert_eq!(v["metadata"]["name"], format!("bootstrap-token-{}", t.id()));
        let d = &v["stringData"];
        assert_eq!(d["token-id"], t.id());
        assert_eq!(d["token-secret"], t.token.secret());
        assert_eq!(d["expiration"], "2026-11-23T10:00:00Z");
        assert_eq!(d["usage-bootstrap-authentication"], "true");
        assert_eq!(d["usage-bootstrap-signing"], "true");
        assert_eq!(d["auth-extra-groups"], DEFAULT_NODE_GROUP);
        let yaml = to_yaml(&[v]);
        let back: Value = serde_saphyr::from_str(&yaml).unwrap();
        assert_eq!(back["stringData"]["token-secret"], t.token.secret());
    }

    #[test]
    fn cluster_info_round_trips_through_yaml_byte_for_byte() {
        let objs = cluster_info(
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
            "https://192.168.3.110:6443",
        );
        let kc = objs[0]["data"]["kubeconfig"].as_str().unwrap().to_string();
        assert!(kc.starts_with("apiVersion: v1\nclusters:\n- cluster:\n    certificate-authority-data: "), "{kc}");
        let yaml = to_yaml(&objs);
        let docs: Vec<Value> = serde_saphyr::from_multiple(&yaml).unwrap();
        assert_eq!(docs.len(), 3);
        assert_eq!(docs[0]["data"]["kubeconfig"].as_str().unwrap(), kc);
    }

    #[test]
    fn kubeconfig_variants() {
        let kc = kubeconfig(
            "k8s",
            "https://v:6443",
            CaRef::File("/etc/kubernetes/pki/ca.crt"),
            "kubelet",
            Auth::Token("abcdef.0123456789abcdef"),
        );
        let v: Value = serde_saphyr::from_str(&kc).unwrap();
        assert_eq!(v["users"][0]["user"]["token"], "abcdef.0123456789abcdef");
        assert_eq!(v["clusters"][0]["cluster"]["certificate-authority"], "/etc/kubernetes/pki/ca.crt");
        assert_eq!(v["current-context"], "kubelet@k8s");
        let kc = kubeconfig("k8s", "https://v:6443", CaRef::Pem("CA"), "admin", Auth::CertPem { cert: "C", key: "K" });
        let v: Value = serde_saphyr::from_str(&kc).unwrap();
        assert_eq!(v["users"][0]["user"]["client-key-data"], B64.encode("K"));
    }
}
