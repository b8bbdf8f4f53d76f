//! The enrollment logic: who may enroll as which node, which certificates a node gets, what it
//! reported. Written once against [`Store`]'s optimistic transactions: each operation reads what
//! it depends on, decides, and commits only if nothing it read changed, else starts over. So two
//! server replicas sharing one etcd can never bind one node to two machines.
//!
//! Records: `machines/<identity key>` (a machine, pending or bound to a node),
//! `nodes/<name>` (binding, certificates issued, reports), `token-uses/<id>` and `token-uses/<id>/<identity key>`
//! (how many and which machines spent a limited enrollment token), `pod-slots/<index>` (which machine outside the inventory holds
//! which per-node pod range), `lease/bootstrap`.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use proto::Role;
use proto::wire::*;
use ring::digest;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::audit::Audit;
use super::metrics::Metrics;
use super::store::{Store, StoreError, Txn};
use crate::cluster::{Cluster, EnrollPolicy};
use crate::digest::sha256_hex;
use crate::pki::{self, Ca, CaKind, NodeIdentity};
use crate::tokens::{TokenRecord, TokenState, TokenStore, TokenUsage};

/// Reports and errors kept per node (older ones are in the audit log).
const KEEP_REPORTS: usize = 64;
const KEEP_ERRORS: usize = 16;
/// How long a master may hold the bootstrap lease without completing.
const LEASE_TTL: time::Duration = time::Duration::minutes(5);

#[derive(Debug, Clone)]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
}

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self { code, message: message.into() }
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        tracing::error!("store: {e}");
        ApiError::new(ErrorCode::Internal, "the server's store failed; try again")
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MachineState {
    /// Unknown machine waiting for `imgbuild nodes approve`.
    Pending,
    /// Approved; binds on its next enrollment.
    Approved,
    Enrolled,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct MachineRecord {
    pub key: String,
    pub identity: MachineIdentity,
    pub state: MachineState,
    pub role: Role,
    pub node: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    pub first_seen: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    pub last_seen: OffsetDateTime,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct StoredCert {
    /// hex SHA-256 of the certified SubjectPublicKeyInfo.
    pub spki: String,
    pub cert: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRecord {
    pub name: String,
    pub role: Role,
    pub machine: String,
    pub ip: Option<Ipv4Addr>,
    /// Index of the node's pod range in the pod CIDR.
    pub pod_index: usize,
    pub image: Option<ImageInfo>,
    #[serde(with = "time::serde::rfc3339")]
    pub enrolled_at: OffsetDateTime,
    pub client: StoredCert,
    #[serde(default)]
    pub certs: BTreeMap<CertPurpose, StoredCert>,
    pub phase: Option<Phase>,
    pub status: Option<PhaseStatus>,
    #[serde(default)]
    pub message: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_report_at: Option<OffsetDateTime>,
    #[serde(default)]
    pub reports: Vec<Report>,
    #[serde(default)]
    pub errors: Vec<String>,
}

impl NodeRecord {
    pub fn identity(&self) -> NodeIdentity {
        NodeIdentity { name: self.name.clone(), role: self.role, ip: self.ip }
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct LeaseRecord {
    holder: Option<String>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    expires: Option<OffsetDateTime>,
    completed: bool,
}

/// One row of `imgbuild nodes`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "camelCase")]
pub struct NodeStatus {
    pub machine: String,
    pub node: Option<String>,
    pub role: Role,
    pub state: MachineState,
    pub phase: Option<Phase>,
    pub status: Option<PhaseStatus>,
    pub message: String,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub last_report_at: Option<OffsetDateTime>,
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub enrolled_at: Option<OffsetDateTime>,
    pub errors: Vec<String>,
    pub certificates: usize,
}

/// tokens.json, re-read when it changes, so `imgbuild token revoke` takes effect at once.
struct TokenSource {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Arc<Vec<TokenRecord>>)>,
}

impl TokenSource {
    fn current(&self) -> Result<Arc<Vec<TokenRecord>>, ApiError> {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().expect("token cache lock");
        if cache.0 != mtime || mtime.is_none() {
            let store = TokenStore::load(&self.path).map_err(|e| {
                tracing::error!("{e}");
                ApiError::new(ErrorCode::Internal, "the server cannot read its tokens")
            })?;
            *cache = (mtime, Arc::new(store.records));
        }
        Ok(cache.1.clone())
    }
}

pub struct Cas {
    pub cluster: Ca,
    pub etcd: Ca,
    pub front_proxy: Ca,
    pub enrollment: Ca,
}

impl Cas {
    pub fn get(&self, kind: CaKind) -> &Ca {
        match kind {
            CaKind::Cluster => &self.cluster,
            CaKind::Etcd => &self.etcd,
            CaKind::FrontProxy => &self.front_proxy,
            CaKind::Enrollment => &self.enrollment,
        }
    }
}

pub struct Fleet {
    pub store: Store,
    pub cluster: Cluster,
    pub cas: Cas,
    tokens: TokenSource,
    pub audit: Audit,
    pub metrics: Metrics,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// Lowercased, sorted, de-duplicated identity.
pub fn normalize(mut id: MachineIdentity) -> MachineIdentity {
    id.uuid = id.uuid.map(|u| u.trim().to_ascii_lowercase()).filter(|u| !u.is_empty());
    id.serial = id.serial.map(|s| s.trim().to_string()).filter(|s| !s.is_empty());
    id.macs =
        id.macs.iter().map(|m| m.trim().to_ascii_lowercase().replace('-', ":")).filter(|m| !m.is_empty()).collect();
    id.macs.sort();
    id.macs.dedup();
    id
}

impl Fleet {
    pub fn new(store: Store, cluster: Cluster, cas: Cas, tokens_path: PathBuf, audit: Audit) -> Self {
        Fleet {
            store,
            cluster,
            cas,
            tokens: TokenSource { path: tokens_path, cache: Mutex::new((None, Arc::new(Vec::new()))) },
            audit,
            metrics: Metrics::default(),
        }
    }

    async fn get<T: DeserializeOwned>(&self, key: &str) -> Result<(Option<T>, u64), ApiError> {
        match self.store.get(key).await? {
            None => Ok((None, 0)),
            Some(e) => {
                let v = serde_json::from_slice(&e.value).map_err(|err| {
                    tracing::error!("store record {key} does not parse: {err}");
                    ApiError::new(ErrorCode::Internal, "corrupt server record")
                })?;
                Ok((Some(v), e.version))
            }
        }
    }

    fn refuse(&self, what: &str, source: IpAddr, subject: &str, e: ApiError) -> ApiError {
        self.audit.line(
            super::audit::REFUSED,
            &[
                ("op", what),
                ("source", &source.to_string()),
                ("subject", subject),
                ("code", &format!("{:?}", e.code)),
                ("reason", &e.message),
            ],
        );
        self.metrics.refused(what, e.code);
        e
    }

    /// The tokens as of now (tokens.json, re-read when it changed).
    pub fn tokens(&self) -> Result<Arc<Vec<TokenRecord>>, ApiError> {
        self.tokens.current()
    }

    /// Checks an enrollment token: format was checked by parsing; here existence, usage,
    /// revocation and expiry.
    fn enrollment_token(&self, presented: &proto::BootstrapToken) -> Result<TokenRecord, ApiError> {
        let tokens = self.tokens.current()?;
        let Some(rec) = tokens.iter().find(|t| t.token.matches(presented)) else {
            return Err(ApiError::new(
                ErrorCode::InvalidToken,
                format!("token {presented} is not known to this server"),
            ));
        };
        if !rec.usages.contains(&TokenUsage::Enrollment) {
            return Err(ApiError::new(
                ErrorCode::InvalidToken,
                format!("token {presented} is not an enrollment token"),
            ));
        }
        match rec.state(now()) {
            TokenState::Valid => Ok(rec.clone()),
            TokenState::Revoked => {
                Err(ApiError::new(ErrorCode::TokenRevoked, format!("token {presented} was revoked")))
            }
            TokenState::Expired => {
                Err(ApiError::new(ErrorCode::TokenExpired, format!("token {presented} has expired")))
            }
        }
    }

    /// POST /v1/enroll.
    pub async fn enroll(&self, req: EnrollRequest, source: IpAddr) -> Result<EnrollResponse, ApiError> {
        let identity = normalize(req.identity.clone());
        let subject = identity.key();
        self.enroll_inner(req, identity, source).await.map_err(|e| self.refuse("enroll", source, &subject, e))
    }

    async fn enroll_inner(
        &self,
        req: EnrollRequest,
        identity: MachineIdentity,
        source: IpAddr,
    ) -> Result<EnrollResponse, ApiError> {
        if req.protocol != PROTOCOL_VERSION {
            return Err(ApiError::new(
                ErrorCode::UnsupportedProtocol,
                format!("protocol {} is not supported (this server speaks {PROTOCOL_VERSION})", req.protocol),
            ));
        }
        if identity.is_empty() {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "the identity has neither an SMBIOS UUID nor a MAC address",
            ));
        }
        let token = self.enrollment_token(&req.token)?;
        let role =
            token.role.ok_or_else(|| ApiError::new(ErrorCode::InvalidToken, "enrollment token without a role"))?;
        let mkey = identity.key();
        let machine_key = format!("machines/{mkey}");
        let uses_key = format!("token-uses/{}", token.id());
        let mut name_len = 8;
        loop {
            let t = now();
            let (machine, mver) = self.get::<MachineRecord>(&machine_key).await?;

            // Already bound: the same machine asking again (a retry, or a reinstalled firstboot).
            if let Some(m) = machine.as_ref().filter(|m| m.state == MachineState::Enrolled) {
                let name = m.node.clone().expect("enrolled machines have a node");
                let node_key = format!("nodes/{name}");
                let (node, nver) = self.get::<NodeRecord>(&node_key).await?;
                let mut node = node.ok_or_else(|| {
                    ApiError::new(ErrorCode::Internal, format!("machine bound to missing node {name}"))
                })?;
                if node.role != role {
                    return Err(ApiError::new(
                        ErrorCode::TokenRole,
                        format!("this machine is {} node {name}; the token is for role {role}", node.role),
                    ));
                }
                let spec = pki::enroll_client_spec(&name, node.role);
                let spki =
                    pki::check_csr(&spec, &req.csr).map_err(|e| ApiError::new(ErrorCode::CsrRefused, e.to_string()))?;
                let spki_hex = sha256_hex(&spki);
                if node.client.spki == spki_hex {
                    return Ok(enrolled(&node));
                }
                let (cert, _) = self
                    .cas
                    .enrollment
                    .sign_csr(&spec, &req.csr, self.cluster.pki.cert_validity)
                    .map_err(|e| ApiError::new(ErrorCode::CsrRefused, e.to_string()))?;
                node.client = StoredCert { spki: spki_hex, cert };
                node.image = req.image.clone().or(node.image);
                let mut txn = Txn::default();
                txn.check(&node_key, nver).put(&node_key, json(&node));
                if self.store.commit(txn).await? {
                    self.audit
                        .line("re-enrolled", &[("node", &name), ("machine", &mkey), ("source", &source.to_string())]);
                    self.metrics.enrolled();
                    return Ok(enrolled(&node));
                }
                continue;
            }

            // Which node is this machine?
            let mut txn = Txn::default();
            txn.check(&machine_key, mver);
            let inventory = self.cluster.nodes.iter().enumerate().find(|(_, n)| {
                n.uuid.as_ref().is_some_and(|u| identity.uuid.as_deref() == Some(u.as_str()))
                    || n.mac.as_ref().is_some_and(|mac| identity.macs.iter().any(|x| x == mac.as_str()))
            });
            // (name, role, address, pod range, whether the name was generated here)
            let (name, node_role, ip, pod_index, generated) = match (inventory, &machine) {
                (Some((i, n)), _) => {
                    if n.role != role {
                        return Err(ApiError::new(
                            ErrorCode::TokenRole,
                            format!(
                                "this machine is {} node {} in the inventory; the token is for role {role}",
                                n.role, n.name
                            ),
                        ));
                    }
                    (n.name.clone(), n.role, Some(n.ip()), i, false)
                }
                (None, Some(m)) if m.state == MachineState::Approved => {
                    let name = m.node.clone().expect("approved machines have a name");
                    let slot = self.claim_pod_slot(&mkey, &mut txn).await?;
                    (name, m.role, None, slot, false)
                }
                (None, _) => match self.cluster.enrollment.policy {
                    EnrollPolicy::KnownOnly => {
                        return Err(ApiError::new(
                            ErrorCode::UnknownMachine,
                            format!("machine {mkey} is not in the inventory and the policy is known-only"),
                        ));
                    }
                    EnrollPolicy::Approve => {
                        let rec = MachineRecord {
                            key: mkey.clone(),
                            identity: identity.clone(),
                            state: MachineState::Pending,
                            role,
                            node: None,
                            first_seen: machine.as_ref().map_or(t, |m| m.first_seen),
                            last_seen: t,
                            source: source.to_string(),
                        };
                        txn.put(&machine_key, json(&rec));
                        if !self.store.commit(txn).await? {
                            continue;
                        }
                        if machine.is_none() {
                            self.audit.line(
                                "queued",
                                &[("machine", &mkey), ("role", role.as_str()), ("source", &source.to_string())],
                            );
                        }
                        return Ok(EnrollResponse {
                            status: EnrollStatus::Pending,
                            node: None,
                            client_cert: None,
                            retry_after_secs: Some(30),
                            message: format!("machine {mkey} waits for `imgbuild nodes approve {mkey}`"),
                        });
                    }
                    EnrollPolicy::AutoWorker => {
                        if role != Role::Worker {
                            return Err(ApiError::new(
                                ErrorCode::TokenRole,
                                format!("unknown machines may only become workers; the token is for role {role}"),
                            ));
                        }
                        let slot = self.claim_pod_slot(&mkey, &mut txn).await?;
                        (self.auto_name(&mkey, Role::Worker, name_len), Role::Worker, None, slot, true)
                    }
                },
            };
            if self.cluster.networks.node_pod_cidr(pod_index).is_none() {
                return Err(ApiError::new(
                    ErrorCode::Internal,
                    format!("the pod CIDR has no range left for node {name}"),
                ));
            }

            // One machine per node, for good.
            let node_key = format!("nodes/{name}");
            let (existing, nver) = self.get::<NodeRecord>(&node_key).await?;
            if existing.as_ref().is_some_and(|n| n.machine != mkey) && generated {
                // Another machine's identity hashes to the same short name: use a longer one.
                name_len += 4;
                continue;
            }
            if let Some(other) = existing.filter(|n| n.machine != mkey) {
                self.audit.line(
                    "conflict",
                    &[
                        ("node", &name),
                        ("bound", &other.machine),
                        ("claimed-by", &mkey),
                        ("source", &source.to_string()),
                    ],
                );
                return Err(ApiError::new(
                    ErrorCode::IdentityConflict,
                    format!("node {name} is already bound to another machine; refusing {mkey}"),
                ));
            }
            txn.check(&node_key, nver);

            // Use limits count machines, not requests: a marker per machine and a count. Tokens
            // without a limit keep neither (a count every enrollment updates would serialize them).
            if let Some(max) = token.max_uses {
                let marker = format!("{uses_key}/{mkey}");
                let (seen, mver) = self.get::<bool>(&marker).await?;
                if seen.is_none() {
                    let (used, uver) = self.get::<u32>(&uses_key).await?;
                    let used = used.unwrap_or(0);
                    if used >= max {
                        return Err(ApiError::new(
                            ErrorCode::TokenExhausted,
                            format!("token {} has been used by {used} machines, its limit", req.token),
                        ));
                    }
                    txn.check(&uses_key, uver).put(&uses_key, json(&(used + 1)));
                    txn.check(&marker, mver).put(&marker, json(&true));
                }
            }

            let spec = pki::enroll_client_spec(&name, node_role);
            let (cert, spki) = self
                .cas
                .enrollment
                .sign_csr(&spec, &req.csr, self.cluster.pki.cert_validity)
                .map_err(|e| ApiError::new(ErrorCode::CsrRefused, e.to_string()))?;
            let node = NodeRecord {
                name: name.clone(),
                role: node_role,
                machine: mkey.clone(),
                ip,
                pod_index,
                image: req.image.clone(),
                enrolled_at: t,
                client: StoredCert { spki: sha256_hex(&spki), cert },
                certs: BTreeMap::new(),
                phase: Some(Phase::Enroll),
                status: Some(PhaseStatus::Succeeded),
                message: String::new(),
                last_report_at: None,
                reports: Vec::new(),
                errors: Vec::new(),
            };
            let rec = MachineRecord {
                key: mkey.clone(),
                identity: identity.clone(),
                state: MachineState::Enrolled,
                role: node_role,
                node: Some(name.clone()),
                first_seen: machine.as_ref().map_or(t, |m| m.first_seen),
                last_seen: t,
                source: source.to_string(),
            };
            txn.put(&node_key, json(&node)).put(&machine_key, json(&rec));
            if self.store.commit(txn).await? {
                self.audit.line(
                    "enrolled",
                    &[
                        ("node", &name),
                        ("role", node_role.as_str()),
                        ("machine", &mkey),
                        ("token", token.id()),
                        ("source", &source.to_string()),
                    ],
                );
                self.metrics.enrolled();
                return Ok(enrolled(&node));
            }
        }
    }

    /// A per-node pod range for a machine outside the inventory, claimed in `txn`. Ranges after
    /// the inventory's are probed from a position derived from the machine's identity, so that
    /// concurrent enrollments rarely touch the same key (a global counter would make every
    /// enrollment conflict with every other).
    async fn claim_pod_slot(&self, mkey: &str, txn: &mut Txn) -> Result<usize, ApiError> {
        let first = self.cluster.nodes.len();
        let free = (self.cluster.networks.node_ranges() as usize).saturating_sub(first);
        let h = digest::digest(&digest::SHA256, mkey.as_bytes());
        let start = u64::from_be_bytes(h.as_ref()[..8].try_into().expect("8 bytes")) as usize % free.max(1);
        for k in 0..free {
            let slot = first + (start + k) % free;
            let key = format!("pod-slots/{slot}");
            let (owner, ver) = self.get::<String>(&key).await?;
            if owner.is_none() || owner.as_deref() == Some(mkey) {
                txn.check(&key, ver).put(&key, json(&mkey));
                return Ok(slot);
            }
        }
        Err(ApiError::new(ErrorCode::Internal, "the pod CIDR has no per-node range left"))
    }

    /// A stable name for a machine outside the inventory, derived from its identity.
    fn auto_name(&self, mkey: &str, role: Role, len: usize) -> String {
        format!("{role}-{}", &sha256_hex(mkey.as_bytes())[..len.min(64)])
    }

    /// The node a client certificate speaks for: CN names it, and the certified key must be the
    /// one the node enrolled with (a superseded certificate no longer works).
    pub async fn authenticate(&self, cn: &str, spki_der: &[u8]) -> Result<NodeRecord, ApiError> {
        let (node, _) = self.get::<NodeRecord>(&format!("nodes/{cn}")).await?;
        match node {
            Some(n) if n.client.spki == sha256_hex(spki_der) => Ok(n),
            Some(_) => Err(ApiError::new(
                ErrorCode::NotEnrolled,
                format!("this client certificate for {cn} was superseded; enroll again"),
            )),
            None => Err(ApiError::new(ErrorCode::NotEnrolled, format!("no node {cn} is enrolled"))),
        }
    }

    /// POST /v1/sign: certificates for the node's own keys, one per purpose; the same key asked
    /// again gets the same certificate.
    pub async fn sign(&self, name: &str, req: SignRequest, source: IpAddr) -> Result<SignResponse, ApiError> {
        let key = format!("nodes/{name}");
        loop {
            let (node, ver) = self.get::<NodeRecord>(&key).await?;
            let mut node = node.ok_or_else(|| ApiError::new(ErrorCode::NotEnrolled, format!("no node {name}")))?;
            let ident = node.identity();
            let mut out = Vec::new();
            let mut changed = Vec::new();
            for item in &req.csrs {
                let refuse = |m: String| {
                    self.refuse(
                        "sign",
                        source,
                        &format!("{name}/{}", item.purpose),
                        ApiError::new(ErrorCode::CsrRefused, m),
                    )
                };
                let spec = pki::leaf_spec(item.purpose, &self.cluster, &ident).ok_or_else(|| {
                    refuse(format!("{} certificates are not issued to {} nodes", item.purpose, node.role))
                })?;
                let spki = pki::check_csr(&spec, &item.csr).map_err(|e| refuse(e.to_string()))?;
                let spki_hex = sha256_hex(&spki);
                let ca = self.cas.get(spec.ca);
                match node.certs.get(&item.purpose) {
                    Some(stored) if stored.spki == spki_hex => {
                        out.push(IssuedCert {
                            purpose: item.purpose,
                            cert: stored.cert.clone(),
                            ca: ca.cert_pem.clone(),
                        });
                    }
                    _ => {
                        let (cert, _) = ca
                            .sign_csr(&spec, &item.csr, self.cluster.pki.cert_validity)
                            .map_err(|e| refuse(e.to_string()))?;
                        node.certs.insert(item.purpose, StoredCert { spki: spki_hex, cert: cert.clone() });
                        changed.push(item.purpose);
                        out.push(IssuedCert { purpose: item.purpose, cert, ca: ca.cert_pem.clone() });
                    }
                }
            }
            if !changed.is_empty() {
                let mut txn = Txn::default();
                txn.check(&key, ver).put(&key, json(&node));
                if !self.store.commit(txn).await? {
                    continue;
                }
                for p in &changed {
                    self.audit
                        .line("signed", &[("node", name), ("purpose", p.as_str()), ("source", &source.to_string())]);
                    self.metrics.signed();
                }
            }
            return Ok(SignResponse { certs: out });
        }
    }

    /// POST /v1/report.
    pub async fn report(&self, name: &str, report: Report) -> Result<(), ApiError> {
        let key = format!("nodes/{name}");
        loop {
            let (node, ver) = self.get::<NodeRecord>(&key).await?;
            let mut node = node.ok_or_else(|| ApiError::new(ErrorCode::NotEnrolled, format!("no node {name}")))?;
            node.phase = Some(report.phase);
            node.status = Some(report.status);
            node.message = report.message.clone();
            node.last_report_at = Some(report.at);
            if report.status == PhaseStatus::Failed {
                node.errors.push(format!("{}: {}", report.phase, report.message));
                let excess = node.errors.len().saturating_sub(KEEP_ERRORS);
                node.errors.drain(..excess);
            }
            node.reports.push(report.clone());
            let excess = node.reports.len().saturating_sub(KEEP_REPORTS);
            node.reports.drain(..excess);
            let mut txn = Txn::default();
            txn.check(&key, ver).put(&key, json(&node));
            if self.store.commit(txn).await? {
                self.audit.line(
                    "report",
                    &[
                        ("node", name),
                        ("phase", report.phase.as_str()),
                        ("status", report.status.as_str()),
                        ("message", &report.message),
                    ],
                );
                self.metrics.reported(report.status);
                return Ok(());
            }
        }
    }

    /// POST /v1/bootstrap-lease: one master at a time applies the cluster objects.
    pub async fn lease(
        &self,
        node: &NodeRecord,
        action: LeaseAction,
        objects: impl FnOnce() -> Vec<serde_json::Value>,
    ) -> Result<LeaseResponse, ApiError> {
        if node.role != Role::Master {
            return Err(ApiError::new(ErrorCode::BadRequest, "only masters take the bootstrap lease"));
        }
        loop {
            let t = now();
            let (lease, ver) = self.get::<LeaseRecord>("lease/bootstrap").await?;
            let mut lease = lease.unwrap_or_default();
            let free = lease.holder.is_none()
                || lease.expires.is_some_and(|e| e < t)
                || lease.holder.as_deref() == Some(&node.name);
            let granted = match action {
                LeaseAction::Acquire if lease.completed => {
                    return Ok(LeaseResponse {
                        granted: false,
                        completed: true,
                        holder: lease.holder,
                        objects: vec![],
                    });
                }
                LeaseAction::Acquire if free => {
                    lease.holder = Some(node.name.clone());
                    lease.expires = Some(t + LEASE_TTL);
                    true
                }
                LeaseAction::Acquire => {
                    return Ok(LeaseResponse {
                        granted: false,
                        completed: false,
                        holder: lease.holder,
                        objects: vec![],
                    });
                }
                LeaseAction::Complete if lease.holder.as_deref() == Some(&node.name) => {
                    lease.completed = true;
                    false
                }
                LeaseAction::Complete => {
                    return Err(ApiError::new(
                        ErrorCode::BadRequest,
                        format!("{} does not hold the bootstrap lease", node.name),
                    ));
                }
            };
            let mut txn = Txn::default();
            txn.check("lease/bootstrap", ver).put("lease/bootstrap", json(&lease));
            if self.store.commit(txn).await? {
                self.audit
                    .line("lease", &[("node", &node.name), ("action", if granted { "granted" } else { "completed" })]);
                let objects = if granted { objects() } else { vec![] };
                return Ok(LeaseResponse { granted, completed: lease.completed, holder: lease.holder, objects });
            }
        }
    }

    /// `imgbuild nodes approve`: a pending machine (by identity key, MAC or UUID) becomes `name`.
    pub async fn approve(&self, machine: &str, name: Option<String>) -> Result<NodeStatus, ApiError> {
        loop {
            let pending = self.list_machines().await?;
            let m = pending
                .into_iter()
                .find(|(m, _)| {
                    m.key == machine
                        || m.identity.macs.iter().any(|x| x == &machine.to_ascii_lowercase())
                        || m.identity.uuid.as_deref() == Some(&machine.to_ascii_lowercase())
                })
                .ok_or_else(|| {
                    ApiError::new(ErrorCode::UnknownMachine, format!("no machine {machine} has asked to enroll"))
                })?;
            let (mut rec, ver) = m;
            if rec.state != MachineState::Pending {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("machine {} is {:?}, not pending", rec.key, rec.state),
                ));
            }
            // Without a name: a stable one derived from the machine's identity.
            let name = name.clone().unwrap_or_else(|| self.auto_name(&rec.key, rec.role, 8));
            if !crate::cluster::is_dns_label(&name) {
                return Err(ApiError::new(
                    ErrorCode::BadRequest,
                    format!("'{name}' is not a valid node name (RFC 1123 label)"),
                ));
            }
            let taken = self.cluster.node(&name).is_some()
                || self.get::<NodeRecord>(&format!("nodes/{name}")).await?.0.is_some()
                || self.list_machines().await?.iter().any(|(m, _)| m.node.as_deref() == Some(name.as_str()));
            if taken {
                return Err(ApiError::new(ErrorCode::IdentityConflict, format!("node name {name} is taken")));
            }
            rec.state = MachineState::Approved;
            rec.node = Some(name.clone());
            let key = format!("machines/{}", rec.key);
            let mut txn = Txn::default();
            txn.check(&key, ver).put(&key, json(&rec));
            if self.store.commit(txn).await? {
                self.audit.line("approved", &[("machine", &rec.key), ("node", &name)]);
                return Ok(machine_status(&rec, None));
            }
        }
    }

    async fn list_machines(&self) -> Result<Vec<(MachineRecord, u64)>, ApiError> {
        let mut out = Vec::new();
        for (k, e) in self.store.list("machines/").await? {
            let m: MachineRecord = serde_json::from_slice(&e.value).map_err(|err| {
                tracing::error!("store record {k}: {err}");
                ApiError::new(ErrorCode::Internal, "corrupt server record")
            })?;
            out.push((m, e.version));
        }
        Ok(out)
    }

    /// Every machine the server has seen, with its node and last report.
    pub async fn status(&self) -> Result<Vec<NodeStatus>, ApiError> {
        let mut nodes: BTreeMap<String, NodeRecord> = BTreeMap::new();
        for (k, e) in self.store.list("nodes/").await? {
            let n: NodeRecord = serde_json::from_slice(&e.value).map_err(|err| {
                tracing::error!("store record {k}: {err}");
                ApiError::new(ErrorCode::Internal, "corrupt server record")
            })?;
            nodes.insert(n.name.clone(), n);
        }
        let mut out: Vec<NodeStatus> = self
            .list_machines()
            .await?
            .into_iter()
            .map(|(m, _)| {
                let node = m.node.as_ref().and_then(|n| nodes.get(n));
                machine_status(&m, node)
            })
            .collect();
        out.sort_by(|a, b| a.node.cmp(&b.node).then(a.machine.cmp(&b.machine)));
        Ok(out)
    }

    pub async fn node(&self, name: &str) -> Result<Option<NodeRecord>, ApiError> {
        Ok(self.get::<NodeRecord>(&format!("nodes/{name}")).await?.0)
    }
}

fn machine_status(m: &MachineRecord, node: Option<&NodeRecord>) -> NodeStatus {
    NodeStatus {
        machine: m.key.clone(),
        node: m.node.clone(),
        role: node.map_or(m.role, |n| n.role),
        state: m.state,
        phase: node.and_then(|n| n.phase),
        status: node.and_then(|n| n.status),
        message: node.map(|n| n.message.clone()).unwrap_or_default(),
        last_report_at: node.and_then(|n| n.last_report_at),
        enrolled_at: node.map(|n| n.enrolled_at),
        errors: node.map(|n| n.errors.clone()).unwrap_or_default(),
        certificates: node.map_or(0, |n| n.certs.len()),
    }
}

fn enrolled(node: &NodeRecord) -> EnrollResponse {
    EnrollResponse {
        status: EnrollStatus::Enrolled,
        node: Some(NodeAssignment { name: node.name.clone(), role: node.role }),
        client_cert: Some(node.client.cert.clone()),
        retry_after_secs: None,
        message: format!("enrolled as {} node {}", node.role, node.name),
    }
}

fn json<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}
