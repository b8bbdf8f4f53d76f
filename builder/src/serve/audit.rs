//! The audit log: one JSON line per enrollment, signature, refusal, approval and report, appended
//! to `audit.log` in the state dir and mirrored to the log at info level.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use time::OffsetDateTime;

pub struct Audit {
    file: Option<Mutex<File>>,
}

impl Audit {
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Audit { file: Some(Mutex::new(f)) })
    }

    /// An audit log that only goes to the tracing log (tests, benchmarks).
    pub fn log_only() -> Self {
        Audit { file: None }
    }

    pub fn line(&self, event: &str, fields: &[(&str, &str)]) {
        let mut obj = serde_json::Map::new();
        let ts = OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
        obj.insert("ts".into(), ts.into());
        obj.insert("event".into(), event.into());
        for (k, v) in fields {
            obj.insert((*k).into(), (*v).into());
        }
        let line = serde_json::Value::Object(obj).to_string();
        tracing::info!(target: "audit", "{line}");
        if let Some(f) = &self.file {
            let mut f = f.lock().expect("audit lock");
            if let Err(e) = writeln!(f, "{line}") {
                tracing::error!("cannot append to the audit log: {e}");
            }
        }
    }
}
