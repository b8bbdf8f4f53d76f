//! The enrollment logic: who may enroll as which node, which certificates a node gets, what it
//! reported, and the operator's decisions. One job per module: [`enroll`], [`sign`] (and who a
//! certificate speaks for), [`lease`], [`reports`], [`admin`]; the records they keep are in
//! [`records`].
//!
//! Every operation is one optimistic transaction over [`Store`], through [`Fleet::transact`]: it
//! reads what it depends on (each read is checked again at commit), decides, writes, and starts
//! over if anything it read changed meanwhile. So two server replicas sharing one etcd can never
//! bind one node to two machines. Audit events of a change are written in the change's own
//! transaction: there is no change without its record.

/// An operation for [`Fleet::transact`]: `txn!(|tx| { ... })`, where `tx` is `&mut Tx` and the
/// block returns `Result<T, ApiError>`. Whatever the block uses from outside is borrowed (bind
/// owned values to references first): the operation may run more than once.
macro_rules! txn {
    (|$tx:ident| $body:block) => {
        |mut owned: $crate::serve::fleet::Tx<'_>| async move {
            let out = async {
                let $tx = &mut owned;
                $body
            }
            .await;
            (owned, out)
        }
    };
}

pub mod admin;
pub mod enroll;
pub mod lease;
pub mod records;
pub mod reports;
pub mod sign;

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use proto::wire::ErrorCode;
use serde::Serialize;
use serde::de::DeserializeOwned;
use time::OffsetDateTime;

use super::audit::Audit;
use super::metrics::Metrics;
use super::store::{Store, StoreError, Txn};
use crate::cluster::Cluster;
use crate::pki::{Ca, CaKind};
use crate::tokens::{TokenRecord, TokenStore};

/// A refusal or failure, as the API answers it: an [`ErrorCode`] and a message for the client.
#[derive(Debug, Clone)]
pub struct ApiError {
    /// What the client can act on; also picks the HTTP status.
    pub code: ErrorCode,
    /// What went wrong, for the client (never a secret or the inventory).
    pub message: String,
}

impl ApiError {
    /// An error with this code and message.
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

/// The CAs the server signs with.
pub struct Cas {
    /// The cluster CA: node, apiserver and kubelet certificates.
    pub cluster: Ca,
    /// The etcd CA: etcd members and their clients.
    pub etcd: Ca,
    /// The front-proxy CA: the aggregation layer's client.
    pub front_proxy: Ca,
    /// The enrollment CA: nodes' client certificates for this server.
    pub enrollment: Ca,
}

impl Cas {
    /// The CA of `kind`.
    pub fn get(&self, kind: CaKind) -> &Ca {
        match kind {
            CaKind::Cluster => &self.cluster,
            CaKind::Etcd => &self.etcd,
            CaKind::FrontProxy => &self.front_proxy,
            CaKind::Enrollment => &self.enrollment,
        }
    }
}

/// tokens.json, re-read when it changes, so that `imgbuild token revoke` and the credentials
/// `imgbuild nodes reset` mints take effect at once.
pub struct TokenSource {
    path: PathBuf,
    cache: Mutex<(Option<SystemTime>, Arc<Vec<TokenRecord>>)>,
}

impl TokenSource {
    /// Tokens read from `path` (on first use).
    pub fn new(path: PathBuf) -> Self {
        TokenSource { path, cache: Mutex::new((None, Arc::new(Vec::new()))) }
    }

    /// The tokens as of now.
    pub fn current(&self) -> Result<Arc<Vec<TokenRecord>>, ApiError> {
        let mtime = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let mut cache = self.cache.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
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

/// The enrollment core. Its parts are the server's own: handlers call its operations.
pub struct Fleet {
    store: Store,
    cluster: Cluster,
    cas: Cas,
    tokens: Arc<TokenSource>,
    audit: Audit,
    metrics: Arc<Metrics>,
}

fn now() -> OffsetDateTime {
    OffsetDateTime::now_utc()
}

/// The one encoding of every record.
#[expect(
    clippy::expect_used,
    reason = "records are strings, numbers, RFC 3339 times and string-keyed maps: JSON holds all of them"
)]
fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    serde_json::to_vec(v).expect("records serialize")
}

/// The one decoding: a record that does not parse is the server's fault, said once, here.
fn decode<T: DeserializeOwned>(key: &str, bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        tracing::error!("store record {key} does not parse: {e}");
        ApiError::new(ErrorCode::Internal, "a server record is corrupt; see the server's log")
    })
}

/// One optimistic transaction: what it read (checked again at commit) and what it writes.
pub struct Tx<'a> {
    store: &'a Store,
    txn: Txn,
    audit: Vec<(String, Vec<(String, String)>)>,
}

impl Tx<'_> {
    /// Reads a record; the commit fails (and the operation starts over) if it changes.
    pub async fn get<T: DeserializeOwned>(&mut self, key: &str) -> Result<Option<T>, ApiError> {
        match self.store.get(key).await? {
            None => {
                self.txn.check(key, 0);
                Ok(None)
            }
            Some(e) => {
                self.txn.check(key, e.version);
                decode(key, &e.value).map(Some)
            }
        }
    }

    /// Writes `value` at `key` when the transaction commits.
    pub fn put<T: Serialize>(&mut self, key: &str, value: &T) {
        self.txn.put(key, encode(value));
    }

    /// Deletes `key` when the transaction commits.
    pub fn delete(&mut self, key: &str) {
        self.txn.delete(key);
    }

    /// An audit event, durable with this transaction's changes.
    pub fn audit(&mut self, event: &str, fields: &[(&str, &str)]) {
        self.audit.push((event.to_string(), fields.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()));
    }
}

impl Fleet {
    /// The enrollment core over `store`, signing with `cas`, recording to `audit`.
    pub fn new(store: Store, cluster: Cluster, cas: Cas, tokens: Arc<TokenSource>, audit: Audit) -> Self {
        Fleet { store, cluster, cas, tokens, audit, metrics: Arc::new(Metrics::default()) }
    }

    /// The cluster it serves.
    pub fn cluster(&self) -> &Cluster {
        &self.cluster
    }

    /// Its counters, for `/metrics`.
    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    /// Its audit log.
    pub fn audit(&self) -> &Audit {
        &self.audit
    }

    /// The tokens as of now (tokens.json, re-read when it changed).
    pub fn tokens(&self) -> Result<Arc<Vec<TokenRecord>>, ApiError> {
        self.tokens.current()
    }

    /// Runs `op` as one transaction until it commits without conflict (or fails). An operation
    /// that only read commits nothing. `op` gets the transaction and hands it back with its
    /// result; write it with [`txn!`], which does the handing.
    pub async fn transact<'s, T, F, Fut>(&'s self, mut op: F) -> Result<T, ApiError>
    where
        F: FnMut(Tx<'s>) -> Fut,
        Fut: std::future::Future<Output = (Tx<'s>, Result<T, ApiError>)>,
    {
        loop {
            let (mut tx, out) = op(Tx { store: &self.store, txn: Txn::default(), audit: Vec::new() }).await;
            let out = out?;
            if tx.txn.is_read_only() {
                return Ok(out);
            }
            let at = now();
            for (i, (event, fields)) in tx.audit.iter().enumerate() {
                let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                let line = self.audit.format(at, event, &fields);
                tx.txn.put(&records::audit_key(at, i), line.into_bytes());
            }
            if self.store.commit(tx.txn).await? {
                for (event, fields) in &tx.audit {
                    let fields: Vec<(&str, &str)> = fields.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    self.audit.line_at(at, event, &fields);
                }
                return Ok(out);
            }
        }
    }

    /// One record as it is now (outside any transaction).
    pub async fn record<T: DeserializeOwned>(&self, key: &str) -> Result<Option<T>, ApiError> {
        self.store.get(key).await?.map(|e| decode(key, &e.value)).transpose()
    }

    /// Every record under `prefix`, decoded.
    pub async fn list<T: DeserializeOwned>(&self, prefix: &str) -> Result<Vec<T>, ApiError> {
        self.store.list(prefix).await?.into_iter().map(|(k, e)| decode(&k, &e.value)).collect()
    }

    /// Records a refusal (audit log and journal, and its metric) and returns it.
    fn refuse(&self, op: &str, source: IpAddr, subject: &str, e: ApiError, detail: &str) -> ApiError {
        self.audit.line(
            super::audit::REFUSED,
            &[
                ("op", op),
                ("source", &source.to_string()),
                ("subject", subject),
                ("code", e.code.as_str()),
                ("reason", if detail.is_empty() { &e.message } else { detail }),
            ],
        );
        self.metrics.refused(op, e.code);
        e
    }
}
