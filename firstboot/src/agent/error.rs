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

/// Why a phase failed; [`PhaseError::code`] is what its report carries.
#[derive(Debug, thiserror::Error)]
pub enum PhaseError {
    /// Identify: the machine has nothing to be told apart by.
    #[error("no machine identity: no SMBIOS UUID and no Ethernet MAC address")]
    NoIdentity,
    /// Identify: no source had a payload (the sources looked at).
    #[error("no first-boot payload (looked at: {})", .0.join(", "))]
    NoPayload(Vec<String>),
    /// Identify: a source had a payload that does not parse.
    #[error(transparent)]
    Payload(#[from] SourceError),
    /// Identify: the payload was made for another role than the image's.
    #[error("this is a {image} image but the payload is for role {payload}")]
    RoleMismatch {
        /// The role the image was baked for.
        image: Role,
        /// The role the payload is for.
        payload: Role,
    },
    /// Identify: a role with an etcd member would keep its state (and so etcd's data) in RAM.
    #[error(
        "this {role}'s /var, where etcd keeps its member data, is in RAM ({fstype}): it would be lost at \
         every reboot. Boot it from a disk image, or by PXE with imgbuild.state=disk (spec.pxe.state.{role}: \
         disk, the default) and a disk for its state"
    )]
    StateInRam {
        /// The payload's role.
        role: Role,
        /// The file system /var is on.
        fstype: String,
    },
    /// Identify: a payload fetched from the kernel command line's URL is not to be trusted.
    #[error("the payload from {url} {reason}")]
    InsecurePayload {
        /// Where the payload came from.
        url: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The enrollment client cannot be built (bad server URL, pin or certificate).
    #[error(transparent)]
    Setup(#[from] SetupError),
    /// A call of the enrollment server failed.
    #[error("{what}")]
    Call {
        /// What the call was for (`enrolling`, `fetching the node config`).
        what: &'static str,
        /// Why it failed.
        #[source]
        error: CallError,
    },
    /// Enroll: the deadline passed while the operator had not approved the machine (the server's message).
    #[error("still waiting for the operator's approval at the deadline: {0}")]
    NotApproved(String),
    /// The server's answer (the first: what it said) lacks a part it must carry (the second).
    #[error("the server said {0} but sent no {1}")]
    Incomplete(&'static str, &'static str),
    /// A file could not be read or written.
    #[error("{}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        error: std::io::Error,
    },
    /// A key could not be made or loaded, or a CSR signed.
    #[error("key or CSR: {0}")]
    Key(#[from] rcgen::Error),
    /// Write-files: the config names a path that is not absolute or has `..` in it.
    #[error("refusing to write {0}: not an absolute path without '..'")]
    BadPath(String),
    /// A file's owner is not in the tree's /etc/passwd or /etc/group.
    #[error("{0}")]
    Owner(String),
    /// Write-files: no NIC matches the config's, and files need its name.
    #[error("no network interface with MAC {mac} or address {address}")]
    NoInterface {
        /// The MAC from the inventory, or `-`.
        mac: String,
        /// The address the NIC must carry, or `-`.
        address: String,
    },
    /// Host setup failed.
    #[error(transparent)]
    Host(#[from] HostError),
    /// A systemd call failed.
    #[error(transparent)]
    Systemd(#[from] SystemdError),
    /// Join failed.
    #[error(transparent)]
    Join(#[from] JoinError),
    /// The phase record could not be read or written.
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
            PhaseError::StateInRam { .. } => "state-in-ram",
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
    /// Maps the error to [`PhaseError::Io`] naming `path`.
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
