//! The audit log: one JSON line per enrollment, signature, approval, reset, revocation, conflict,
//! refusal and report. An event that records a change is written into the store in the change's
//! own transaction (`audit/` keys, see [`super::fleet::records`]): no change is ever durable
//! without its record. Every event is also appended to `audit.log` (0600) in the state dir, for
//! reading and shipping. Refusals are also logged at warn level, so they reach the journal; the
//! other events at debug level (`IMGBUILD_LOG=audit=debug`).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::Path;
use std::sync::Mutex;

use time::OffsetDateTime;

/// The event logged at warn level.
pub const REFUSED: &str = "refused";

/// Where audit lines go: the tracing log, and `audit.log` when opened with a file.
pub struct Audit {
    file: Option<Mutex<File>>,
}

/// One audit line: `{"ts":…,"event":…,"k":"v",…}`, keys in the order given.
fn format_line(ts: OffsetDateTime, event: &str, fields: &[(&str, &str)]) -> String {
    let mut line = Vec::with_capacity(128);
    let ts = ts.format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    for (i, (k, v)) in [("ts", ts.as_str()), ("event", event)].iter().chain(fields).enumerate() {
        line.push(if i == 0 { b'{' } else { b',' });
        // Writing a str into a Vec cannot fail.
        let _ = serde_json::to_writer(&mut line, k);
        line.push(b':');
        let _ = serde_json::to_writer(&mut line, v);
    }
    line.push(b'}');
    #[expect(clippy::expect_used, reason = "the line is ASCII punctuation and serde_json's text, which is UTF-8")]
    String::from_utf8(line).expect("serde_json writes UTF-8")
}

impl Audit {
    /// Appends to the file at `path` (created 0600) as well as the tracing log.
    pub fn open(path: &Path) -> std::io::Result<Self> {
        use std::os::unix::fs::OpenOptionsExt;
        let f = OpenOptions::new().create(true).append(true).mode(0o600).open(path)?;
        Ok(Audit { file: Some(Mutex::new(f)) })
    }

    /// An audit log that only goes to the tracing log (tests, benchmarks).
    pub fn log_only() -> Self {
        Audit { file: None }
    }

    /// The line of an event, as the store and the file keep it.
    pub fn format(&self, at: OffsetDateTime, event: &str, fields: &[(&str, &str)]) -> String {
        format_line(at, event, fields)
    }

    /// An event now (refusals, reports: events that change nothing in the store).
    pub fn line(&self, event: &str, fields: &[(&str, &str)]) {
        self.line_at(OffsetDateTime::now_utc(), event, fields);
    }

    /// An event at `at` (a committed change's, already durable in the store).
    pub fn line_at(&self, at: OffsetDateTime, event: &str, fields: &[(&str, &str)]) {
        let mut line = format_line(at, event, fields);
        if event == REFUSED {
            tracing::warn!(target: "audit", "{line}");
        } else {
            tracing::debug!(target: "audit", "{line}");
        }
        if let Some(f) = &self.file {
            line.push('\n');
            // One write per line, so concurrent appends never interleave.
            #[expect(
                clippy::expect_used,
                reason = "held only for one write_all, which returns its errors rather than panicking: never poisoned"
            )]
            let mut f = f.lock().expect("audit lock");
            if let Err(e) = f.write_all(line.as_bytes()) {
                tracing::error!("cannot append to the audit log: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_is_one_json_object_with_the_fields_in_order() {
        let ts = OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap();
        let line = format_line(ts, "refused", &[("op", "enroll"), ("reason", "token \"x\" expired\n")]);
        assert_eq!(
            line,
            r#"{"ts":"2023-11-14T22:13:20Z","event":"refused","op":"enroll","reason":"token \"x\" expired\n"}"#
        );
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(v["reason"], "token \"x\" expired\n");
    }
}
