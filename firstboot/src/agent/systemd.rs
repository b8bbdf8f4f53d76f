//! systemd behind [`Systemd`]: [`Dbus`] talks to the manager over the system bus (systemd-zbus):
//! daemon-reload, enable unit files, start or restart a unit and wait for the job's result.
//! [`super::host::Recorder`] writes down what would be done.

use std::time::Duration;

use futures_util::StreamExt;
use systemd_zbus::{ManagerProxy, Mode};

use super::host::Recorder;

/// How long one start job may take (etcd and the apiserver can be slow under emulation).
const JOB_TIMEOUT: Duration = Duration::from_secs(300);

/// Why systemd did not do what was asked.
#[derive(Debug, thiserror::Error)]
pub enum SystemdError {
    /// The system bus or the manager cannot be reached.
    #[error("cannot talk to systemd over D-Bus: {0}")]
    Bus(String),
    /// The manager refused a call.
    #[error("{op} {unit}: {reason}")]
    Call {
        /// The call (`start`, `enable`, `daemon-reload`).
        op: &'static str,
        /// The unit(s); empty for daemon-reload.
        unit: String,
        /// The manager's error.
        reason: String,
    },
    /// A start or restart job finished with a result other than `done`.
    #[error("{unit} did not start: job result '{result}' (see `journalctl -u {unit}`)")]
    JobFailed {
        /// The unit.
        unit: String,
        /// The job's result (`failed`, `timeout`, `dependency`).
        result: String,
    },
    /// A job had no result within the job timeout (5 minutes).
    #[error("{unit}: no job result after {0:?}", JOB_TIMEOUT)]
    Timeout {
        /// The unit.
        unit: String,
    },
}

/// What firstboot asks of systemd.
#[allow(async_fn_in_trait)]
pub trait Systemd {
    /// Reloads unit files (after the config wrote some).
    async fn daemon_reload(&mut self) -> Result<(), SystemdError>;
    /// Enables unit files, so that they start on later boots.
    async fn enable(&mut self, units: &[String]) -> Result<(), SystemdError>;
    /// Starts `unit` and waits until its start job finished successfully.
    async fn start(&mut self, unit: &str) -> Result<(), SystemdError>;
    /// Restarts `unit` and waits until its job finished successfully.
    async fn restart(&mut self, unit: &str) -> Result<(), SystemdError>;
}

/// The system's systemd, over D-Bus.
pub struct Dbus {
    manager: ManagerProxy<'static>,
}

impl Dbus {
    /// Connects to the system bus and subscribes to job signals.
    pub async fn connect() -> Result<Self, SystemdError> {
        let bus = |e: zbus::Error| SystemdError::Bus(e.to_string());
        let conn = zbus::Connection::system().await.map_err(bus)?;
        let manager = ManagerProxy::new(&conn).await.map_err(bus)?;
        // Job signals are only sent to subscribers.
        manager.subscribe().await.map_err(bus)?;
        Ok(Dbus { manager })
    }

    async fn job(&self, op: &'static str, unit: &str) -> Result<(), SystemdError> {
        let call = |e: zbus::Error| SystemdError::Call { op, unit: unit.to_string(), reason: e.to_string() };
        // Listen before starting the job, or its JobRemoved may come first.
        let mut removed = self.manager.receive_job_removed().await.map_err(call)?;
        let job = match op {
            "restart" => self.manager.restart_unit(unit, Mode::Replace).await,
            _ => self.manager.start_unit(unit, Mode::Replace).await,
        }
        .map_err(call)?;
        let wait = async {
            while let Some(signal) = removed.next().await {
                let Ok(args) = signal.args() else { continue };
                if args.job.as_str() == job.as_str() {
                    return Some(args.result.to_string());
                }
            }
            None
        };
        match tokio::time::timeout(JOB_TIMEOUT, wait).await {
            Ok(Some(r)) if r == "done" => Ok(()),
            Ok(Some(result)) => Err(SystemdError::JobFailed { unit: unit.to_string(), result }),
            Ok(None) => Err(SystemdError::Bus("the signal stream ended".into())),
            Err(_) => Err(SystemdError::Timeout { unit: unit.to_string() }),
        }
    }
}

impl Systemd for Dbus {
    async fn daemon_reload(&mut self) -> Result<(), SystemdError> {
        self.manager.reload().await.map_err(|e| SystemdError::Call {
            op: "daemon-reload",
            unit: String::new(),
            reason: e.to_string(),
        })
    }

    async fn enable(&mut self, units: &[String]) -> Result<(), SystemdError> {
        if units.is_empty() {
            return Ok(());
        }
        let names: Vec<&str> = units.iter().map(String::as_str).collect();
        self.manager.enable_unit_files(&names, false, true).await.map(|_| ()).map_err(|e| SystemdError::Call {
            op: "enable",
            unit: units.join(" "),
            reason: e.to_string(),
        })
    }

    async fn start(&mut self, unit: &str) -> Result<(), SystemdError> {
        self.job("start", unit).await
    }

    async fn restart(&mut self, unit: &str) -> Result<(), SystemdError> {
        self.job("restart", unit).await
    }
}

impl Systemd for Recorder {
    async fn daemon_reload(&mut self) -> Result<(), SystemdError> {
        self.note("systemctl daemon-reload".into());
        Ok(())
    }
    async fn enable(&mut self, units: &[String]) -> Result<(), SystemdError> {
        self.note(format!("systemctl enable {}", units.join(" ")));
        Ok(())
    }
    async fn start(&mut self, unit: &str) -> Result<(), SystemdError> {
        self.note(format!("systemctl start {unit}"));
        Ok(())
    }
    async fn restart(&mut self, unit: &str) -> Result<(), SystemdError> {
        self.note(format!("systemctl restart {unit}"));
        Ok(())
    }
}
