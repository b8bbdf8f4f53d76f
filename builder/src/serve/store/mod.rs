//! Durable state of the enrollment server behind one small interface: read keys with their
//! versions, and commit a set of writes only if the keys read are unchanged (optimistic
//! concurrency). The enrollment logic ([`super::fleet`]) is written once against it and retries on
//! conflict; each backend makes the check-and-write atomic:
//!
//! - [`RedbStore`] (default): an embedded ACID file in the state dir. Commits from concurrent
//!   requests are grouped into one fsync; a commit is acknowledged only once it is durable.
//! - [`EtcdStore`]: etcd's v3 API, so several `imgbuild serve` replicas can share state. The
//!   version of a key is its `mod_revision`; commits are etcd transactions comparing them.
//!
//! To add a backend: implement get/list/commit with those semantics and add a variant to [`Store`].

mod etcd;
mod redb;

pub use self::etcd::{EtcdConfig, EtcdStore};
pub use self::redb::RedbStore;

/// A stored value and the version it was read at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The value's bytes (a record's JSON).
    pub value: Vec<u8>,
    /// The key's version when read; greater than 0, and changed by every write.
    pub version: u64,
}

/// Writes that apply only if every checked key still has the version it was read at
/// (`0`: the key must not exist).
#[derive(Debug, Default, Clone)]
pub struct Txn {
    /// Keys and the versions they must still have (`0`: must not exist).
    pub checks: Vec<(String, u64)>,
    /// Keys to write, with their new values.
    pub puts: Vec<(String, Vec<u8>)>,
    /// Keys to delete.
    pub deletes: Vec<String>,
}

impl Txn {
    /// Requires `key` to still have `version` (`0`: not to exist) at commit.
    pub fn check(&mut self, key: &str, version: u64) -> &mut Self {
        self.checks.push((key.to_string(), version));
        self
    }
    /// Writes `value` at `key` on commit.
    pub fn put(&mut self, key: &str, value: Vec<u8>) -> &mut Self {
        self.puts.push((key.to_string(), value));
        self
    }
    /// Deletes `key` on commit.
    pub fn delete(&mut self, key: &str) -> &mut Self {
        self.deletes.push(key.to_string());
        self
    }
    /// Writes nothing (only reads were recorded).
    pub fn is_read_only(&self) -> bool {
        self.puts.is_empty() && self.deletes.is_empty()
    }
}

/// Why the store could not be read or written.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The embedded database failed.
    #[error("store {path}: {message}")]
    Redb {
        /// The database file.
        path: String,
        /// What failed.
        message: String,
    },
    /// etcd failed or could not be reached.
    #[error("etcd {endpoint}: {message}")]
    Etcd {
        /// The endpoint(s) asked.
        endpoint: String,
        /// What failed.
        message: String,
    },
}

/// The configured backend.
pub enum Store {
    /// An embedded database in the state dir.
    Redb(RedbStore),
    /// An etcd cluster shared by replicas.
    Etcd(EtcdStore),
}

impl Store {
    /// The value of `key` with its version, or `None` if it does not exist.
    pub async fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        match self {
            Store::Redb(s) => s.get(key),
            Store::Etcd(s) => s.get(key).await,
        }
    }

    /// Every key under `prefix`, in key order.
    pub async fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        match self {
            Store::Redb(s) => s.list(prefix),
            Store::Etcd(s) => s.list(prefix).await,
        }
    }

    /// Applies `txn` atomically if its checks hold. `Ok(false)`: a checked key changed.
    pub async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        match self {
            Store::Redb(s) => s.commit(txn).await,
            Store::Etcd(s) => s.commit(txn).await,
        }
    }

    /// Which backend and where, for the startup log.
    pub fn describe(&self) -> String {
        match self {
            Store::Redb(s) => format!("redb {}", s.path().display()),
            Store::Etcd(s) => format!("etcd {}", s.endpoints().join(",")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The semantics every backend must have; run against redb here and etcd in tests/.
    pub async fn conformance(s: &Store) {
        assert_eq!(s.get("a/1").await.unwrap(), None);
        let mut t = Txn::default();
        t.check("a/1", 0).put("a/1", b"one".to_vec()).put("a/2", b"two".to_vec());
        assert!(s.commit(t).await.unwrap());
        let e1 = s.get("a/1").await.unwrap().unwrap();
        assert_eq!(e1.value, b"one");
        assert!(e1.version > 0);
        // A stale version loses.
        let mut stale = Txn::default();
        stale.check("a/1", 0).put("a/1", b"x".to_vec());
        assert!(!s.commit(stale).await.unwrap());
        assert_eq!(s.get("a/1").await.unwrap().unwrap().value, b"one");
        // The current version wins and bumps it.
        let mut t = Txn::default();
        t.check("a/1", e1.version).put("a/1", b"uno".to_vec());
        assert!(s.commit(t).await.unwrap());
        let e1b = s.get("a/1").await.unwrap().unwrap();
        assert!(e1b.version > e1.version);
        let keys: Vec<String> = s.list("a/").await.unwrap().into_iter().map(|(k, _)| k).collect();
        assert_eq!(keys, ["a/1", "a/2"]);
        assert!(s.list("b/").await.unwrap().is_empty());
        // A delete is checked like a put, and a deleted key reads as never written.
        let mut t = Txn::default();
        t.check("a/2", e1b.version).delete("a/2");
        assert!(!s.commit(t).await.unwrap(), "a stale check must stop a delete");
        let e2 = s.get("a/2").await.unwrap().unwrap();
        let mut t = Txn::default();
        t.check("a/2", e2.version).delete("a/2");
        assert!(s.commit(t).await.unwrap());
        assert_eq!(s.get("a/2").await.unwrap(), None);
        let mut t = Txn::default();
        t.check("a/2", 0).put("a/2", b"again".to_vec());
        assert!(s.commit(t).await.unwrap(), "a deleted key can be created anew");
    }

    #[tokio::test]
    async fn redb_conformance_and_concurrent_increments() {
        let d = tempfile::tempdir().unwrap();
        let s = std::sync::Arc::new(Store::Redb(RedbStore::open(&d.path().join("db")).unwrap()));
        conformance(&s).await;
        // 200 concurrent read-modify-write increments of one counter: none may be lost.
        let mut tasks = Vec::new();
        for _ in 0..200 {
            let s = s.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let cur = s.get("ctr").await.unwrap();
                    let (n, v) =
                        cur.map_or((0u64, 0), |e| (String::from_utf8(e.value).unwrap().parse().unwrap(), e.version));
                    let mut t = Txn::default();
                    t.check("ctr", v).put("ctr", (n + 1).to_string().into_bytes());
                    if s.commit(t).await.unwrap() {
                        break;
                    }
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        assert_eq!(s.get("ctr").await.unwrap().unwrap().value, b"200");
    }
}
