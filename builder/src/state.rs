//! The cluster state directory (0700), created by `imgbuild init` and read by every command that
//! needs the cluster:
//!
//! ```text
//! cluster.yaml        the resolved spec (every default filled in)
//! pki/                kubeadm's layout: ca.*, etcd/ca.*, front-proxy-ca.*, sa.key, sa.pub,
//!                     plus enrollment-ca.*, serve.* (imgbuild serve's certificate) and
//!                     imgbuild-admin.* (the operator's identity on imgbuild serve) and
//!                     bgp.password (the pod network's BGP sessions)
//! tokens.json         join tokens, node credentials and the worker token (0600)
//! admin.conf          the operator's kubeconfig (0600)
//! kube/               objects to `kubectl apply -f`: bootstrap-token Secrets, RBAC, cluster-info
//! store/              imgbuild serve's database
//! ```
//!
//! Keys are 0600. Re-running `init` keeps every CA and key; replacing one takes `--rotate`.

use std::path::{Path, PathBuf};

use proto::Role;
use proto::fsutil::{ensure_dir, write_atomic};
use time::OffsetDateTime;

use crate::cluster::{Cluster, EnrollPolicy, LoadError};
use crate::kube;
use crate::pki::{self, Ca, CaKind, CertInfo, LeafSpec, PkiError};
use crate::tokens::{NewToken, TokenError, TokenStore, TokenUsage};

/// `--state` default and its environment variable.
pub const DEFAULT_STATE_DIR: &str = "cluster";
/// The environment variable that sets `--state`.
pub const STATE_ENV: &str = "IMGBUILD_STATE";

/// Leaf certificates in the state dir are re-issued when they expire within this long.
const RENEW_BEFORE: time::Duration = time::Duration::days(30);

/// Why the state directory cannot be read, created or completed.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// The directory (given) has no `cluster.yaml`: `init` has not run there.
    #[error("{0} has no cluster state (no cluster.yaml); run `imgbuild init --state {0}` first")]
    Missing(String),
    /// A file or directory cannot be written.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The directory belongs to another cluster than the manifest's.
    #[error(
        "{dir} holds the state of cluster '{existing}', but the manifest is for '{new}'; use another --state directory"
    )]
    OtherCluster {
        /// The state directory.
        dir: String,
        /// The cluster it holds.
        existing: String,
        /// The manifest's cluster.
        new: String,
    },
    /// A certificate or key exists without its other half.
    #[error(
        "{present} exists but {missing} does not; refusing to generate a new key for an existing certificate (restore the file, or replace both with --rotate {name})"
    )]
    HalfPair {
        /// The half that exists.
        present: PathBuf,
        /// The half that does not.
        missing: PathBuf,
        /// What `--rotate` takes to replace both.
        name: &'static str,
    },
    /// The state's `cluster.yaml` cannot be loaded.
    #[error(transparent)]
    Manifest(#[from] LoadError),
    /// A CA or key cannot be loaded, made or used.
    #[error(transparent)]
    Pki(#[from] PkiError),
    /// `tokens.json` cannot be read or written.
    #[error(transparent)]
    Tokens(#[from] TokenError),
}

/// What `--rotate` can replace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rotate {
    /// One of the CAs (`ca`, `etcd-ca`, `front-proxy-ca`, `enrollment-ca`): a new key and certificate.
    Ca(CaKind),
    /// `sa`: the service-account signing key pair.
    ServiceAccount,
    /// `serve-cert`: `imgbuild serve`'s certificate.
    ServeCert,
    /// `admin`: the operator's kubeconfig credentials.
    Admin,
    /// `serve-admin`: the operator's identity on `imgbuild serve`.
    ServeAdmin,
    /// `join-token`: revoke the Kubernetes join tokens and make a new one.
    JoinToken,
    /// `enrollment-tokens`: revoke every node credential and worker token and make new ones.
    EnrollmentTokens,
    /// `bgp-password`: a new password for the pod network's BGP sessions (nodes enrolled from
    /// then on get it; running nodes keep theirs until re-provisioned).
    BgpPassword,
}

impl Rotate {
    /// Every name `--rotate` takes, for help and errors.
    pub const NAMES: &'static str = "ca, etcd-ca, front-proxy-ca, enrollment-ca, sa, serve-cert, admin, serve-admin, join-token, enrollment-tokens, bgp-password";
}

impl std::str::FromStr for Rotate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if let Some(k) = CaKind::ALL.into_iter().find(|k| k.name() == s) {
            return Ok(Rotate::Ca(k));
        }
        match s {
            "sa" => Ok(Rotate::ServiceAccount),
            "serve-cert" => Ok(Rotate::ServeCert),
            "admin" => Ok(Rotate::Admin),
            "serve-admin" => Ok(Rotate::ServeAdmin),
            "join-token" => Ok(Rotate::JoinToken),
            "enrollment-tokens" => Ok(Rotate::EnrollmentTokens),
            "bgp-password" => Ok(Rotate::BgpPassword),
            _ => Err(format!("cannot rotate '{s}' (valid: {})", Rotate::NAMES)),
        }
    }
}

/// A cluster state directory.
#[derive(Debug, Clone)]
pub struct State {
    /// The directory.
    pub root: PathBuf,
}

impl State {
    /// The state directory at `root` (which need not exist yet).
    pub fn new(root: impl Into<PathBuf>) -> Self {
        Self { root: root.into() }
    }

    /// `cluster.yaml`: the resolved spec; its presence marks a complete state dir.
    pub fn cluster_file(&self) -> PathBuf {
        self.root.join("cluster.yaml")
    }
    /// `pki/`: CAs, keys and the operator's certificates, in kubeadm's layout.
    pub fn pki_dir(&self) -> PathBuf {
        self.root.join("pki")
    }
    /// `tokens.json`: every token and credential (0600).
    pub fn tokens_file(&self) -> PathBuf {
        self.root.join("tokens.json")
    }
    /// `kube/`: objects for `kubectl apply -f`.
    pub fn kube_dir(&self) -> PathBuf {
        self.root.join("kube")
    }
    /// `admin.conf`: the operator's kubeconfig (0600).
    pub fn admin_kubeconfig(&self) -> PathBuf {
        self.root.join("admin.conf")
    }
    /// `store/`: `imgbuild serve`'s embedded database.
    pub fn store_dir(&self) -> PathBuf {
        self.root.join("store")
    }
    /// `imgbuild serve`'s certificate, issued by the cluster CA.
    pub fn serve_cert(&self) -> PathBuf {
        self.pki_dir().join("serve.crt")
    }
    /// `imgbuild serve`'s key.
    pub fn serve_key(&self) -> PathBuf {
        self.pki_dir().join("serve.key")
    }
    /// The operator's identity on `imgbuild serve`.
    pub fn serve_admin_cert(&self) -> PathBuf {
        self.pki_dir().join("imgbuild-admin.crt")
    }
    /// The key of the operator's identity on `imgbuild serve`.
    pub fn serve_admin_key(&self) -> PathBuf {
        self.pki_dir().join("imgbuild-admin.key")
    }
    /// The TCP MD5 password of the pod network's BGP sessions (`podNetwork: bgp`).
    pub fn bgp_password(&self) -> PathBuf {
        self.pki_dir().join("bgp.password")
    }

    /// Whether `init` has completed here.
    pub fn exists(&self) -> bool {
        self.cluster_file().is_file()
    }

    /// The resolved cluster spec.
    pub fn cluster(&self) -> Result<Cluster, StateError> {
        if !self.exists() {
            return Err(StateError::Missing(self.root.display().to_string()));
        }
        Ok(Cluster::load(Some(&self.cluster_file()))?)
    }

    /// The CA of `kind`, with its key.
    pub fn ca(&self, kind: CaKind) -> Result<Ca, StateError> {
        Ok(Ca::load(&self.pki_dir(), kind)?)
    }

    /// The token store (empty when there is no `tokens.json` yet).
    pub fn tokens(&self) -> Result<TokenStore, StateError> {
        Ok(TokenStore::load(&self.tokens_file())?)
    }

    fn write(&self, path: &Path, contents: &[u8], mode: u32) -> Result<(), StateError> {
        write_atomic(path, contents, mode, None)
            .map_err(|source| StateError::Write { path: path.to_path_buf(), source })
    }

    fn mkdir(&self, dir: &Path) -> Result<(), StateError> {
        ensure_dir(dir, 0o700).map_err(|source| StateError::Write { path: dir.to_path_buf(), source })
    }

    /// Re-renders `kube/` from the tokens and the CA: a Secret per valid Kubernetes token, the
    /// RBAC bindings and `cluster-info`. Files of tokens no longer valid are removed.
    pub fn render_kube_objects(
        &self,
        cluster: &Cluster,
        tokens: &TokenStore,
        now: OffsetDateTime,
    ) -> Result<(), StateError> {
        let dir = self.kube_dir();
        self.mkdir(&dir)?;
        let ca = self.ca(CaKind::Cluster)?;
        let mut wanted = vec!["node-bootstrap-rbac.yaml".to_string(), "cluster-info.yaml".to_string()];
        self.write(
            &dir.join("node-bootstrap-rbac.yaml"),
            kube::to_yaml(&kube::node_bootstrap_rbac(crate::tokens::DEFAULT_NODE_GROUP)).as_bytes(),
            0o644,
        )?;
        self.write(
            &dir.join("cluster-info.yaml"),
            kube::to_yaml(&kube::cluster_info(&ca.cert_pem, &cluster.api.url())).as_bytes(),
            0o644,
        )?;
        for t in tokens.records.iter().filter(|t| t.is_kubernetes() && t.state(now) == crate::tokens::TokenState::Valid)
        {
            let name = format!("bootstrap-token-{}.yaml", t.id());
            self.write(&dir.join(&name), kube::to_yaml(&[kube::bootstrap_token_secret(t)]).as_bytes(), 0o600)?;
            wanted.push(name);
        }
        for entry in std::fs::read_dir(&dir).map_err(|source| StateError::Write { path: dir.clone(), source })? {
            let entry = entry.map_err(|source| StateError::Write { path: dir.clone(), source })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("bootstrap-token-") && !wanted.contains(&name) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

/// One line of `init`'s summary.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    /// What was done: `created`, `kept`, `rotated`, `issued`, `revoked`, `rendered`, `wrote`.
    pub action: &'static str,
    /// To what, with details.
    pub what: String,
}

/// What `imgbuild init` did, for its summary.
#[derive(Debug, Default)]
pub struct InitReport {
    /// One line per file or token, in order.
    pub steps: Vec<Step>,
    /// Non-fatal findings (e.g. a manifest setting that the kept PKI does not follow).
    pub warnings: Vec<String>,
}

impl InitReport {
    fn step(&mut self, action: &'static str, what: impl Into<String>) {
        self.steps.push(Step { action, what: what.into() });
    }
}

/// Does the certificate still carry `spec`'s names and stay valid long enough?
fn leaf_is_current(cert_pem: &str, spec: &LeafSpec, now: OffsetDateTime) -> bool {
    let Some(info) = CertInfo::parse(cert_pem) else { return false };
    let sorted = |mut v: Vec<String>| {
        v.sort();
        v
    };
    info.not_after >= now + RENEW_BEFORE
        && sorted(info.dns_names) == sorted(spec.dns_names.clone())
        && sorted(info.ips.iter().map(ToString::to_string).collect())
            == sorted(spec.ips.iter().map(ToString::to_string).collect())
}

/// `imgbuild init`: creates or completes the state dir for `cluster`.
pub fn init(state: &State, cluster: &Cluster, rotate: &[Rotate]) -> Result<InitReport, StateError> {
    let mut report = InitReport::default();
    let now = OffsetDateTime::now_utc();
    if state.exists() {
        let existing = state.cluster()?;
        if existing.name != cluster.name {
            return Err(StateError::OtherCluster {
                dir: state.root.display().to_string(),
                existing: existing.name,
                new: cluster.name.clone(),
            });
        }
    }
    state.mkdir(&state.root)?;
    state.mkdir(&state.pki_dir())?;
    state.mkdir(&state.pki_dir().join("etcd"))?;
    let pki_dir = state.pki_dir();
    let alg = cluster.pki.key_algorithm;

    // --- CAs ----------------------------------------------------------------------------------
    let mut rotated_cluster_ca = false;
    let mut rotated_enrollment_ca = false;
    let mut cas = Vec::new();
    for kind in CaKind::ALL {
        let (cert, key) = (pki_dir.join(kind.cert_file()), pki_dir.join(kind.key_file()));
        let wanted_rotation = rotate.contains(&Rotate::Ca(kind));
        let ca = match (cert.exists(), key.exists(), wanted_rotation) {
            (true, true, false) => {
                let ca = Ca::load(&pki_dir, kind)?;
                report.step("kept", format!("pki/{} ({})", kind.cert_file(), ca.pin()));
                ca
            }
            (true, false, false) => {
                return Err(StateError::HalfPair { present: cert, missing: key, name: kind.name() });
            }
            (false, true, false) => {
                return Err(StateError::HalfPair { present: key, missing: cert, name: kind.name() });
            }
            (exists, _, _) => {
                let (ca, key_pem) = Ca::generate(kind, alg, cluster.pki.ca_validity)?;
                state.write(&key, key_pem.as_bytes(), 0o600)?;
                state.write(&cert, ca.cert_pem.as_bytes(), 0o644)?;
                let action = if exists { "rotated" } else { "created" };
                report.step(action, format!("pki/{} ({}, {})", kind.cert_file(), alg.as_str(), ca.pin()));
                rotated_cluster_ca |= kind == CaKind::Cluster && exists;
                rotated_enrollment_ca |= kind == CaKind::Enrollment && exists;
                ca
            }
        };
        cas.push(ca);
    }
    #[expect(clippy::expect_used, reason = "`cas` has one CA per kind of `CaKind::ALL`")]
    let cluster_ca = cas.iter().find(|c| c.kind == CaKind::Cluster).expect("cluster CA");

    // --- service-account key pair ---------------------------------------------------------------
    let (sa_key, sa_pub) = (pki_dir.join("sa.key"), pki_dir.join("sa.pub"));
    match (sa_key.exists(), sa_pub.exists(), rotate.contains(&Rotate::ServiceAccount)) {
        (true, true, false) => report.step("kept", "pki/sa.key, pki/sa.pub"),
        (true, false, false) => return Err(StateError::HalfPair { present: sa_key, missing: sa_pub, name: "sa" }),
        (false, true, false) => return Err(StateError::HalfPair { present: sa_pub, missing: sa_key, name: "sa" }),
        (exists, _, _) => {
            let key = pki::generate_key(alg)?;
            state.write(&sa_key, key.serialize_pem().as_bytes(), 0o600)?;
            state.write(&sa_pub, key.public_key_pem().as_bytes(), 0o644)?;
            report.step(if exists { "rotated" } else { "created" }, "pki/sa.key, pki/sa.pub (service-account signing)");
        }
    }

    // --- the pod network's BGP password -------------------------------------------------------
    // TCP MD5 (RFC 2385) on every session: a machine on the node network without it cannot peer
    // with the masters and announce pod ranges. 32 of [a-z0-9]: 165 bits, within MD5's 80 bytes.
    let bgp = state.bgp_password();
    let rotate_bgp = rotate.contains(&Rotate::BgpPassword);
    if bgp.exists() && !rotate_bgp {
        report.step("kept", "pki/bgp.password");
    } else {
        state.write(&bgp, format!("{}\n", proto::token::random_string(32)).as_bytes(), 0o600)?;
        report.step(if rotate_bgp { "rotated" } else { "created" }, "pki/bgp.password (pod network BGP sessions)");
    }

    // --- leaf certificates the operator's side uses ---------------------------------------------
    let serve_spec = pki::enroll_server_spec(cluster);
    let serve_current = std::fs::read_to_string(state.serve_cert())
        .is_ok_and(|pem| leaf_is_current(&pem, &serve_spec, now))
        && state.serve_key().exists();
    if !serve_current || rotated_cluster_ca || rotate.contains(&Rotate::ServeCert) {
        let (cert, key) = cluster_ca.issue_with_new_key(&serve_spec, alg, cluster.pki.cert_validity)?;
        state.write(&state.serve_key(), key.as_bytes(), 0o600)?;
        state.write(&state.serve_cert(), cert.as_bytes(), 0o644)?;
        report
            .step("issued", format!("pki/serve.crt (imgbuild serve: {:?} {:?})", serve_spec.dns_names, serve_spec.ips));
    } else {
        report.step("kept", "pki/serve.crt");
    }
    let admin_current = std::fs::read_to_string(state.admin_kubeconfig())
        .ok()
        .and_then(|kc| {
            let v: serde_json::Value = serde_saphyr::from_str(&kc).ok()?;
            let data = v["users"][0]["user"]["client-certificate-data"].as_str()?.to_string();
            use base64::Engine;
            let pem = String::from_utf8(base64::engine::general_purpose::STANDARD.decode(data).ok()?).ok()?;
            let server_ok = v["clusters"][0]["cluster"]["server"].as_str() == Some(cluster.api.url().as_str());
            Some(server_ok && CertInfo::parse(&pem)?.not_after > now + RENEW_BEFORE)
        })
        .unwrap_or(false);
    if !admin_current || rotated_cluster_ca || rotate.contains(&Rotate::Admin) {
        let (cert, key) = cluster_ca.issue_with_new_key(&pki::admin_spec(), alg, cluster.pki.cert_validity)?;
        let kc = kube::kubeconfig(
            &cluster.name,
            &cluster.api.url(),
            kube::CaRef::Pem(&cluster_ca.cert_pem),
            "kubernetes-admin",
            kube::Auth::CertPem { cert: &cert, key: &key },
        );
        state.write(&state.admin_kubeconfig(), kc.as_bytes(), 0o600)?;
        report.step("issued", "admin.conf (kubernetes-admin, system:masters)");
    } else {
        report.step("kept", "admin.conf");
    }

    let serve_admin_current = std::fs::read_to_string(state.serve_admin_cert())
        .is_ok_and(|pem| leaf_is_current(&pem, &pki::serve_admin_spec(), now))
        && state.serve_admin_key().exists();
    if !serve_admin_current || rotated_enrollment_ca || rotate.contains(&Rotate::ServeAdmin) {
        #[expect(clippy::expect_used, reason = "`cas` has one CA per kind of `CaKind::ALL`")]
        let enrollment_ca = cas.iter().find(|c| c.kind == CaKind::Enrollment).expect("enrollment CA");
        let (cert, key) = enrollment_ca.issue_with_new_key(&pki::serve_admin_spec(), alg, cluster.pki.cert_validity)?;
        state.write(&state.serve_admin_key(), key.as_bytes(), 0o600)?;
        state.write(&state.serve_admin_cert(), cert.as_bytes(), 0o600)?;
        report.step("issued", "pki/imgbuild-admin.crt (the operator's identity on imgbuild serve)");
    } else {
        report.step("kept", "pki/imgbuild-admin.crt");
    }

    // --- tokens -------------------------------------------------------------------------------
    let mut tokens = state.tokens()?;
    if rotate.contains(&Rotate::JoinToken) {
        let ids: Vec<String> =
            tokens.records.iter().filter(|t| t.is_kubernetes()).map(|t| t.id().to_string()).collect();
        for id in ids {
            tokens.revoke(&id, now)?;
            report.step("revoked", format!("join token {id}"));
        }
    }
    if rotate.contains(&Rotate::EnrollmentTokens) {
        let ids: Vec<String> =
            tokens.records.iter().filter(|t| !t.is_kubernetes()).map(|t| t.id().to_string()).collect();
        for id in ids {
            tokens.revoke(&id, now)?;
            report.step("revoked", format!("enrollment token {id}"));
        }
    }
    match tokens.join_token(now) {
        Some(t) => report.step("kept", format!("join token {}", t.id())),
        None => {
            let (usages, groups) = kube::join_token_usages();
            let t = tokens.create(
                NewToken {
                    ttl: Some(cluster.enrollment.join_token_ttl),
                    usages: usages.into_iter().collect(),
                    groups,
                    description: "kubelet TLS bootstrap (imgbuild init)".into(),
                    role: None,
                    node: None,
                    max_uses: None,
                },
                now,
            )?;
            report.step("created", format!("join token {} (kubelet TLS bootstrap)", t.id()));
        }
    }
    // Every inventory node: its own one-time credential, for its node payload.
    for node in &cluster.nodes {
        if let Some(t) = tokens.node_credential(&node.name, now) {
            report.step("kept", format!("credential {} of {} {}", t.id(), node.role, node.name));
            continue;
        }
        let t = tokens.create(
            NewToken {
                ttl: Some(cluster.enrollment.enrollment_token_ttl),
                usages: [TokenUsage::Enrollment].into_iter().collect(),
                groups: vec![],
                description: format!("{} {} (imgbuild init)", node.role, node.name),
                role: Some(node.role),
                node: Some(node.name.clone()),
                max_uses: Some(1),
            },
            now,
        )?;
        report.step("created", format!("credential {} of {} {} (one machine, once)", t.id(), node.role, node.name));
    }
    // Workers: the worker token, for a role payload all workers may share (never a master's).
    let workers = cluster.nodes_with(Role::Worker).count() as u32;
    if workers > 0 || cluster.enrollment.policy == EnrollPolicy::AutoWorker {
        match tokens.enrollment_token(Role::Worker, now) {
            Some(t) => report.step("kept", format!("worker token {}", t.id())),
            None => {
                let t = tokens.create(
                    NewToken {
                        ttl: Some(cluster.enrollment.enrollment_token_ttl),
                        usages: [TokenUsage::Enrollment].into_iter().collect(),
                        groups: vec![],
                        description: "worker enrollment (imgbuild init)".into(),
                        role: Some(Role::Worker),
                        node: None,
                        // Under auto-worker, new machines come (each gets a pod range from the
                        // controller-manager while the pod CIDR has one left).
                        max_uses: (cluster.enrollment.policy != EnrollPolicy::AutoWorker).then_some(workers),
                    },
                    now,
                )?;
                report.step("created", format!("worker token {}", t.id()));
            }
        }
    }
    tokens.save()?;
    state.render_kube_objects(cluster, &tokens, now)?;
    report.step("rendered", "kube/ (bootstrap-token Secret, RBAC bindings, cluster-info)");

    // The resolved spec goes last: its presence marks a complete state dir.
    state.write(&state.cluster_file(), cluster.to_yaml().as_bytes(), 0o600)?;
    report.step("wrote", "cluster.yaml (resolved spec)");
    Ok(report)
}
