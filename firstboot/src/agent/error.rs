//! Why a phase failed, with its causes kept: each variant wraps the error of the part that
//! failed (the enrollment client, systemd, the host, the join, the record). [`PhaseError::code`]
//! is the stable word a report carries, so that the server and its operator can count and match
//! failures without parsing messages.

use std::path::PathBuf;

use proto::Role;

use super::client::{CallError, SetupError};
use super::host::HostError;
use super::join::JoinError;
use super::record::RecordError;
use super::source::SourceError;
use super::systemd::SystemdError;

#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    #[error("no machine identity: no SMBIOS UUID and no Ethernet MAC address")]
    NoIdentity,
    #[error("no first-boot payload (looked at: {})", .0.join(", "))]
    NoPayload(Vec<String>),
    #[error(transparent)]
    Payload(#[from] SourceError),
    #[error("this is a {image} image but the payload is for role {payload}")]
    RoleMismatch { image: Role, payload: Role },
    #[error("the payload from {url} {reason}")]
    InsecurePayload { url: String, reason: &'static str },
    #[error(transparent)]
    Setup(#[from] SetupError),
    #[error("{what}")]
    Call {
        what: &'static str,
        #[source]
        error: CallError,
    },
    #[error("still waiting for the operator's approval at the deadline: {0}")]
    NotApproved(String),
    #[error("the server said {0} but sent no {1}")]
    Incomplete(&'static str, &'static str),
    #[error("{}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        error: std::io::Error,
    },
    #[error("key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    #[error("refusing to write {0}: not an absolute path without '..'")]
    BadPath(String),
    #[error("{0}")]
    Owner(String),
    #[error("no network interface with MAC {mac} or address {address}")]
    NoInterface { mac: String, address: String },
    #[error(transparent)]
    Host(#[from] HostError),
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    #[error(transparent)]
    Join(#[from] JoinError),
    #[error(transparent)]
    Record(#[from] RecordError),
}

impl PhaseError {
    /// A stable word for what failed, carried by the report.
    pub fn code(&self) -> &'static str {
        match self {
            PhaseError::NoIdentity => "no-identity",
            PhaseError::NoPayload(_) => "no-payload",
            PhaseError::Payload(_) => "bad-payload",
            PhaseError::RoleMismatch { .. } => "role-mismatch",
            PhaseError::InsecurePayload { .. } => "insecure-payload",
            PhaseError::Setup(_) => "client-setup",
            PhaseError::Call { error, .. } => match error {
                CallError::Untrusted(_) => "server-untrusted",
                CallError::Api { body, .. } => body.code.as_str(),
                CallError::Deadline(..) | CallError::Transport(_) => "server-unreachable",
                CallError::Decode(_) => "server-answer",
            },
            PhaseError::NotApproved(_) => "not-approved",
            PhaseError::Incomplete(..) => "server-answer",
            PhaseError::Io { .. } => "io",
            PhaseError::Key(_) => "key",
            PhaseError::BadPath(_) => "bad-path",
            PhaseError::Owner(_) => "owner",
            PhaseError::NoInterface { .. } => "no-interface",
            PhaseError::Host(_) => "host",
            PhaseError::Systemd(_) => "systemd",
            PhaseError::Join(_) => "join",
            PhaseError::Record(_) => "state-file",
        }
    }

    /// The whole chain on one line, as reports and the console show it.
    pub fn chain(&self) -> String {
        proto::error_chain(self)
    }
}

/// `.at(path)` on an I/O result.
pub trait IoAt<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, PhaseError>;
}

impl<T> IoAt<T> for std::io::Result<T> {
    fn at(self, path: impl Into<PathBuf>) -> Result<T, PhaseError> {
        self.map_err(|error| PhaseError::Io { path: path.into(), error })
    }
}

/// A call of the enrollment server, named for what it was for.
pub fn call(what: &'static str) -> impl Fn(CallError) -> PhaseError {
    move |error| PhaseError::Call { what, error }
}
