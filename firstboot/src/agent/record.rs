//! The phase record, `/var/lib/firstboot/state.json` (0600: it holds the credential and, on
//! masters, CA keys from the config): which phase comes next and everything earlier phases
//! learned. Rewritten atomically after every phase, so a crash or power cut resumes where it
//! stopped. A damaged, edited or newer file is an error that names it, never a panic.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use proto::bootcfg::BootConfig;
use proto::fsutil::{ensure_dir, write_atomic};
use proto::paths;
use proto::wire::{ImageInfo, IssuedCert, MachineIdentity, NodeAssignment, NodeConfig, Phase, Report};

/// The [`Record::version`] this firstboot writes and reads.
pub const RECORD_VERSION: u32 = 1;

/// What firstboot knows about this machine's provisioning, saved after every phase.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Record {
    /// Format version of the file ([`RECORD_VERSION`]).
    pub version: u32,
    /// The next phase to run; every earlier one has succeeded.
    pub phase: Phase,
    /// Boots that found this record (1 on the first).
    pub boots: u32,
    /// The identity found in the identify phase.
    pub identity: Option<MachineIdentity>,
    /// The payload found in the identify phase.
    pub boot_config: Option<BootConfig>,
    /// The image this machine booted, if it says.
    pub image: Option<ImageInfo>,
    /// The node enrollment bound this machine to.
    pub node: Option<NodeAssignment>,
    /// PEM client certificate from enrollment (its key is `enroll.key` beside this file).
    pub client_cert: Option<String>,
    /// The node config fetched from the server.
    pub config: Option<NodeConfig>,
    /// The certificates the server issued for the config's keys.
    #[serde(default)]
    pub certs: Vec<IssuedCert>,
    /// Reports not yet delivered (those before enrollment, or while the server was away).
    #[serde(default)]
    pub pending_reports: Vec<Report>,
    /// When provisioning finished, and how.
    #[serde(default, with = "time::serde::rfc3339::option")]
    pub finished_at: Option<OffsetDateTime>,
    /// How provisioning ended ("joined", "provisioned (join skipped)"); set by the join phase.
    #[serde(default)]
    pub outcome: String,
}

impl Record {
    /// A record for a machine that has not run any phase.
    pub fn new() -> Self {
        Record {
            version: RECORD_VERSION,
            phase: Phase::Identify,
            boots: 0,
            identity: None,
            boot_config: None,
            image: None,
            node: None,
            client_cert: None,
            config: None,
            certs: Vec::new(),
            pending_reports: Vec::new(),
            finished_at: None,
            outcome: String::new(),
        }
    }
}

impl Default for Record {
    fn default() -> Self {
        Self::new()
    }
}

/// Where the record lives under a root.
pub struct RecordFile {
    path: PathBuf,
}

/// Why the phase record cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The file exists but cannot be read.
    #[error("cannot read {0}")]
    Read(PathBuf, #[source] std::io::Error),
    /// The file is not a phase record (the parser's reason).
    #[error("{0} is not a firstboot state file ({1}); move it away to start over")]
    Parse(PathBuf, String),
    /// The file was written by a newer firstboot.
    #[error(
        "{path} was written by a newer firstboot (state version {found}; this one reads {RECORD_VERSION}): run that firstboot, or move the file away to start over"
    )]
    Version {
        /// The record file.
        path: PathBuf,
        /// The version it has.
        found: u32,
    },
    /// The record's phase needs something an earlier phase should have stored.
    #[error(
        "the state file says phase {phase} is next but holds no {what} (edited or damaged?): move {} away to start over",
        paths::STATE_FILE
    )]
    Missing {
        /// What is missing (`payload`, `node config`).
        what: &'static str,
        /// The phase the record is at.
        phase: Phase,
    },
    /// The file or its directory cannot be written.
    #[error("cannot write {0}")]
    Write(PathBuf, #[source] std::io::Error),
}

impl Record {
    /// What an earlier phase stored, or the error that says the file lacks it.
    pub fn need<'a, T>(&self, v: &'a Option<T>, what: &'static str) -> Result<&'a T, RecordError> {
        v.as_ref().ok_or(RecordError::Missing { what, phase: self.phase })
    }
}

impl RecordFile {
    /// The record file of the tree at `root` ([`paths::STATE_FILE`]).
    pub fn new(root: &Path) -> Self {
        RecordFile { path: paths::under(root, paths::STATE_FILE) }
    }

    /// The directory of the record, where the enrollment key is kept too.
    pub fn dir(&self) -> PathBuf {
        self.path.parent().map_or_else(PathBuf::new, Path::to_path_buf)
    }

    /// The record, a new one if there is none; a file this firstboot cannot read is an error
    /// that says what to do, never a panic later.
    pub fn load(&self) -> Result<Record, RecordError> {
        let bytes = match std::fs::read(&self.path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Record::new()),
            Err(e) => return Err(RecordError::Read(self.path.clone(), e)),
        };
        // The version first: a newer record may not parse as this one's.
        let version = serde_json::from_slice::<serde_json::Value>(&bytes)
            .map_err(|e| RecordError::Parse(self.path.clone(), e.to_string()))?
            .get("version")
            .and_then(serde_json::Value::as_u64)
            .ok_or_else(|| RecordError::Parse(self.path.clone(), "no version".into()))?;
        if version != u64::from(RECORD_VERSION) {
            return Err(RecordError::Version {
                path: self.path.clone(),
                found: version.try_into().unwrap_or(u32::MAX),
            });
        }
        serde_json::from_slice(&bytes).map_err(|e| RecordError::Parse(self.path.clone(), e.to_string()))
    }

    /// Writes the record atomically (0600), creating its directory (0700).
    pub fn save(&self, r: &Record) -> Result<(), RecordError> {
        ensure_dir(&self.dir(), 0o700).map_err(|e| RecordError::Write(self.dir(), e))?;
        let json = serde_json::to_vec_pretty(r).map_err(|e| RecordError::Write(self.path.clone(), e.into()))?;
        write_atomic(&self.path, &json, 0o600, None).map_err(|e| RecordError::Write(self.path.clone(), e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(text: &str) -> (tempfile::TempDir, RecordFile) {
        let d = tempfile::tempdir().unwrap();
        let f = RecordFile::new(d.path());
        std::fs::create_dir_all(f.dir()).unwrap();
        std::fs::write(paths::under(d.path(), paths::STATE_FILE), text).unwrap();
        (d, f)
    }

    #[test]
    fn a_damaged_edited_or_newer_state_file_is_an_error_not_a_panic() {
        for (name, text, want) in [
            ("truncated", r#"{"version": 1, "phase": "enr"#, "is not a firstboot state file"),
            ("not JSON", "\u{0}\u{1}binary", "is not a firstboot state file"),
            ("no version", r#"{"phase": "enroll"}"#, "no version"),
            (
                "newer",
                r#"{"version": 7, "phase": "enroll", "future": true}"#,
                "written by a newer firstboot (state version 7",
            ),
            ("an unknown phase", r#"{"version": 1, "phase": "pwn", "boots": 1}"#, "is not a firstboot state file"),
        ] {
            let (_d, f) = file_with(text);
            let e = f.load().unwrap_err().to_string();
            assert!(e.contains(want) && e.contains("state.json"), "{name}: {e}");
        }
        // Parses, but an earlier phase's result is missing: the phase that needs it says so.
        let (_d, f) = file_with(r#"{"version": 1, "phase": "fetch", "boots": 2}"#);
        let r = f.load().unwrap();
        let e = r.need(&r.boot_config, "payload").unwrap_err().to_string();
        assert!(e.contains("phase fetch is next but holds no payload"), "{e}");
    }
}
