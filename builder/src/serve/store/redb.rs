//! The embedded backend. One writer thread takes commits from a queue and applies everything
//! queued in one redb write transaction with one fsync (group commit), answering each request
//! once that transaction is durable. Values are stored as an 8-byte big-endian version followed
//! by the bytes; versions come from one counter, so they only grow.
//!
//! Under load the writer lingers: when the last group held more than one commit, it waits
//! up to [`LINGER`] for more before committing, as PostgreSQL's `commit_delay` does. A commit's
//! cost is mostly fixed (the page-table pages, the header, the fsync), so fewer, larger groups
//! save the server CPU; a lone commit (one machine enrolling) never waits.

use std::path::{Path, PathBuf};
use std::sync::{Arc, mpsc};
use std::time::{Duration, Instant};

use ::redb::{Database, ReadableDatabase, ReadableTable, TableDefinition};
use tokio::sync::oneshot;

use super::{Entry, StoreError, Txn};

const KV: TableDefinition<&str, &[u8]> = TableDefinition::new("kv");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");
/// Commits applied in one transaction at most.
const MAX_BATCH: usize = 512;
/// How long a busy writer waits for more commits to group.
const LINGER: Duration = Duration::from_millis(1);

type Reply = oneshot::Sender<Result<bool, StoreError>>;

/// The embedded store: one redb file, written by one thread that groups concurrent commits.
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
    queue: mpsc::Sender<(Txn, Reply)>,
}

fn err(path: &Path, e: impl std::fmt::Display) -> StoreError {
    StoreError::Redb { path: path.display().to_string(), message: e.to_string() }
}

/// A stored value: its version (8 bytes, big-endian), then its bytes. Shorter is a damaged file.
fn decode(path: &Path, key: &str, raw: &[u8]) -> Result<Entry, StoreError> {
    match raw.split_first_chunk::<8>() {
        Some((v, value)) => Ok(Entry { version: u64::from_be_bytes(*v), value: value.to_vec() }),
        None => {
            Err(err(path, format!("key {key}: a stored value of {} bytes has no version (damaged file?)", raw.len())))
        }
    }
}

impl RedbStore {
    /// Opens (or creates) the store file, readable by its owner only: it holds every node's
    /// record and certificates.
    pub fn open(path: &Path) -> Result<Self, StoreError> {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        std::fs::OpenOptions::new().create(true).append(true).mode(0o600).open(path).map_err(|e| err(path, e))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(|e| err(path, e))?;
        let db = Arc::new(Database::create(path).map_err(|e| err(path, e))?);
        let w = db.begin_write().map_err(|e| err(path, e))?;
        w.open_table(KV).map_err(|e| err(path, e))?;
        w.open_table(META).map_err(|e| err(path, e))?;
        w.commit().map_err(|e| err(path, e))?;
        let (queue, rx) = mpsc::channel();
        let (db2, path2) = (db.clone(), path.to_path_buf());
        std::thread::Builder::new()
            .name("store-writer".into())
            .spawn(move || writer(&db2, &path2, rx))
            .map_err(|e| err(path, e))?;
        Ok(Self { db, path: path.to_path_buf(), queue })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The value of `key` with its version.
    pub fn get(&self, key: &str) -> Result<Option<Entry>, StoreError> {
        let r = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let t = r.open_table(KV).map_err(|e| err(&self.path, e))?;
        t.get(key).map_err(|e| err(&self.path, e))?.map(|g| decode(&self.path, key, g.value())).transpose()
    }

    /// Every key under `prefix`, in key order.
    pub fn list(&self, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        let r = self.db.begin_read().map_err(|e| err(&self.path, e))?;
        let t = r.open_table(KV).map_err(|e| err(&self.path, e))?;
        let mut out = Vec::new();
        for item in t.range(prefix..).map_err(|e| err(&self.path, e))? {
            let (k, v) = item.map_err(|e| err(&self.path, e))?;
            if !k.value().starts_with(prefix) {
                break;
            }
            out.push((k.value().to_string(), decode(&self.path, k.value(), v.value())?));
        }
        Ok(out)
    }

    /// Queues `txn` for the writer; resolves once it is durable (`Ok(false)`: a check failed).
    pub async fn commit(&self, txn: Txn) -> Result<bool, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.queue.send((txn, tx)).map_err(|_| err(&self.path, "the store writer stopped"))?;
        rx.await.map_err(|_| err(&self.path, "the store writer stopped"))?
    }
}

fn writer(db: &Database, path: &Path, rx: mpsc::Receiver<(Txn, Reply)>) {
    let mut busy = false;
    while let Ok(first) = rx.recv() {
        let mut batch = vec![first];
        let until = Instant::now() + LINGER;
        while batch.len() < MAX_BATCH {
            let next = match rx.try_recv() {
                Ok(item) => Some(item),
                Err(_) if busy => rx.recv_timeout(until.saturating_duration_since(Instant::now())).ok(),
                Err(_) => None,
            };
            match next {
                Some(item) => batch.push(item),
                None => break,
            }
        }
        busy = batch.len() > 1;
        match apply(db, path, &batch) {
            Ok(outcomes) => {
                for ((_, reply), ok) in batch.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(ok));
                }
            }
            Err(e) => {
                let message = e.to_string();
                for (_, reply) in batch {
                    let _ = reply.send(Err(err(path, &message)));
                }
            }
        }
    }
}

/// Applies each transaction in order inside one write transaction; a transaction whose checks
/// fail writes nothing. Returns whether each applied.
fn apply(db: &Database, path: &Path, batch: &[(Txn, Reply)]) -> Result<Vec<bool>, StoreError> {
    let e = |x: ::redb::Error| err(path, x);
    apply_redb(db, path, batch).map_err(|x| match x {
        Applied::Redb(x) => e(x),
        Applied::Store(s) => s,
    })
}

enum Applied {
    Redb(::redb::Error),
    Store(StoreError),
}

impl<E: Into<::redb::Error>> From<E> for Applied {
    fn from(e: E) -> Self {
        Applied::Redb(e.into())
    }
}

fn apply_redb(db: &Database, path: &Path, batch: &[(Txn, Reply)]) -> Result<Vec<bool>, Applied> {
    let w = db.begin_write()?;
    let mut outcomes = Vec::with_capacity(batch.len());
    {
        let mut kv = w.open_table(KV)?;
        let mut meta = w.open_table(META)?;
        let mut seq = meta.get("seq")?.map(|g| g.value()).unwrap_or(0);
        for (txn, _) in batch {
            let mut ok = true;
            for (key, want) in &txn.checks {
                let have = match kv.get(key.as_str())? {
                    Some(g) => decode(path, key, g.value()).map_err(Applied::Store)?.version,
                    None => 0,
                };
                if have != *want {
                    ok = false;
                    break;
                }
            }
            if ok {
                seq += 1;
                for (key, value) in &txn.puts {
                    let mut raw = Vec::with_capacity(8 + value.len());
                    raw.extend_from_slice(&seq.to_be_bytes());
                    raw.extend_from_slice(value);
                    kv.insert(key.as_str(), raw.as_slice())?;
                }
                for key in &txn.deletes {
                    kv.remove(key.as_str())?;
                }
            }
            outcomes.push(ok);
        }
        meta.insert("seq", seq)?;
    }
    w.commit()?;
    Ok(outcomes)
}
