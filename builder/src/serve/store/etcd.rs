//! The etcd backend, through etcd's v3 JSON API (`/v3/kv/range`, `/v3/kv/txn`; etcd 3.4+), with
//! reqwest and rustls: no gRPC stack. Keys live under `/imgbuild/<cluster>/`. A key's version is
//! its `mod_revision`; "must not exist" is `create_revision == 0`.

use std::sync::atomic::{AtomicUsize, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Value, json};

use super::{Entry, StoreError, Txn};

/// How to reach etcd.
#[derive(Debug, Clone)]
pub struct EtcdConfig {
    /// Client URLs (`https://host:2379`), tried in turn.
    pub endpoints: Vec<String>,
    /// PEM CA for the members' certificates, and a client certificate and key (PEM), when the
    /// cluster uses TLS.
    pub ca_pem: Option<String>,
    /// The client certificate (PEM), with `client_key_pem`.
    pub client_cert_pem: Option<String>,
    /// The client key (PEM), with `client_cert_pem`.
    pub client_key_pem: Option<String>,
    /// Key prefix; `/imgbuild/<cluster>/`.
    pub prefix: String,
}

/// The store in etcd, shared by every replica of `imgbuild serve` of one cluster.
pub struct EtcdStore {
    cfg: EtcdConfig,
    http: reqwest::Client,
    /// The endpoint that answered last; requests start there.
    current: AtomicUsize,
}

#[derive(Deserialize)]
struct Kv {
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default)]
    mod_revision: Option<String>,
}

#[derive(Deserialize)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Deserialize)]
struct TxnResponse {
    #[serde(default)]
    succeeded: bool,
}

/// The smallest key greater than every key with this prefix (etcd's `range_end` for a prefix).
fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

impl EtcdStore {
    /// A client for the endpoints in `cfg` (nothing is contacted yet).
    pub fn new(cfg: EtcdConfig) -> Result<Self, StoreError> {
        let endpoint = cfg.endpoints.first().cloned().unwrap_or_default();
        let fail = |message: String| StoreError::Etcd { endpoint: endpoint.clone(), message };
        if cfg.endpoints.is_empty() {
            return Err(fail("no endpoints given".into()));
        }
        let mut b = reqwest::Client::builder().timeout(std::time::Duration::from_secs(10));
        if let Some(ca) = &cfg.ca_pem {
            let tls = proto::tls::client_config(ca, cfg.client_cert_pem.as_deref().zip(cfg.client_key_pem.as_deref()))
                .map_err(|e| fail(format!("TLS setup: {e}")))?;
            b = b.tls_backend_preconfigured(tls);
        }
        let http = b.build().map_err(|e| fail(format!("HTTP client: {e}")))?;
        Ok(Self { cfg, http, current: AtomicUsize::new(0) })
    }

    /// The client URLs, as configured.
    pub fn endpoints(&self) -> &[String] {
        &self.cfg.endpoints
    }

    fn key(&self, k: &str) -> String {
        format!("{}{k}", self.cfg.prefix)
    }

    /// POSTs to the first endpoint that answers.
    async fn call(&self, path: &str, body: Value) -> Result<Value, StoreError> {
        let n = self.cfg.endpoints.len();
        let start = self.current.load(Ordering::Relaxed);
        let mut last = String::new();
        for i in 0..n {
            let idx = (start + i) % n;
            let url = format!("{}{path}", self.cfg.endpoints[idx].trim_end_matches('/'));
            match self.http.post(&url).json(&body).send().await {
                Ok(r) if r.status().is_success() => {
                    self.current.store(idx, Ordering::Relaxed);
                    return r.json().await.map_err(|e| StoreError::Etcd { endpoint: url, message: e.to_string() });
                }
                Ok(r) => {
                    let status = r.status();
                    last = format!("{url}: HTTP {status}: {}", r.text().await.unwrap_or_default());
                }
                Err(e) => last = format!("{url}: {e}"),
            }
        }
        Err(StoreError::Etcd { endpoint: self.cfg.endpoints.join(","), message: last })
    }

    fn decode(&self, kv: Kv) -> Result<(String, Entry), StoreError> {
        let bad = |m: String| StoreError::Etcd { endpoint: self.cfg.endpoints.join(","), message: m };
        let key =
            String::from_utf8(B64.decode(&kv.key).map_err(|e| bad(e.to_string()))?).map_err(|e| bad(e.to_string()))?;
        let value = B64.decode(&kv.value).map_err(|e| bad(e.to_string()))?;
        let version = kv.mod_revision.as_deref().unwrap_or("0").parse().map_err(|_| bad("bad mod_revision".into()))?;
        let key = key.strip_prefix(&self.cfg.prefix).unwrap_or(&key).to_string();
        Ok((key, Entry { value, version }))
    }

    /// The value of `key` with its `mod_revision`.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let r = self.call("/v3/kv/range", json!({"key": B64.encode(self.key(key))})).await?;
        let r: RangeResponse = serde_json::from_value(r).map_err(|e| StoreError::Etcd {
            endpoint: self.cfg.endpoints.join(","),
            message: format!("range response: {e}"),
        })?;
        r.kvs.into_iter().next().map(|kv| self.decode(kv).map(|(_, e)| e)).transpose()
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let p = self.key(prefix);
        let body = json!({"key": B64.encode(&p), "range_end": B64.encode(prefix_end(p.as_bytes()))});
        let r = self.call("/v3/kv/range", body).await?;
        let r: RangeResponse = serde_json::from_value(r).map_err(|e| StoreError::Etcd {
            endpoint: self.cfg.endpoints.join(","),
            message: format!("range response: {e}"),
        })?;
        r.kvs.into_iter().map(|kv| self.decode(kv)).collect()
    }

    /// One etcd transaction: the puts and deletes if every check holds. `Ok(false)`: one did not.
    pub async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        let compare: Vec<Value> = txn
            .checks
            .iter()
            .map(|(k, v)| {
                let key = B64.encode(self.key(k));
                if *v == 0 {
                    json!({"key": key, "target": "CREATE", "result": "EQUAL", "create_revision": "0"})
                } else {
                    json!({"key": key, "target": "MOD", "result": "EQUAL", "mod_revision": v.to_string()})
                }
            })
            .collect();
        let success: Vec<Value> = txn
            .puts
            .iter()
            .map(|(k, v)| json!({"request_put": {"key": B64.encode(self.key(k)), "value": B64.encode(v)}}))
            .chain(txn.deletes.iter().map(|k| json!({"request_delete_range": {"key": B64.encode(self.key(k))}})))
            .collect();
        let r = self.call("/v3/kv/txn", json!({"compare": compare, "success": success, "failure": []})).await?;
        let r: TxnResponse = serde_json::from_value(r).map_err(|e| StoreError::Etcd {
            endpoint: self.cfg.endpoints.join(","),
            message: format!("txn response: {e}"),
        })?;
        Ok(r.succeeded)
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn prefix_end_cases() {
        assert_eq!(super::prefix_end(b"/a/"), b"/a0");
        assert_eq!(super::prefix_end(b"a\xff"), b"b");
        assert_eq!(super::prefix_end(b"\xff"), b"\0");
    }
}
