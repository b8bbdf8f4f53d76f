//! `/metrics`, in the OpenMetrics text format, through the Prometheus project's own client
//! (`prometheus-client`). Counters count as things happen; the machine gauges (by state and last
//! phase) come from the store, read at most once per [`GAUGES_EVERY`] whatever the scrape rate:
//! a scrape never walks the store. Counts only: no names, no identities.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use proto::wire::{ErrorCode, NodeStatus, PhaseStatus};

/// How old the machine gauges may be.
pub const GAUGES_EVERY: Duration = Duration::from_secs(15);

/// The media type of the exposition.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Refusal {
    op: String,
    code: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Status {
    status: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Machine {
    state: String,
    phase: String,
    status: String,
}

/// The server's counters and machine gauges, in one registry.
pub struct Metrics {
    registry: Registry,
    enrolled: Counter,
    signed: Counter,
    requests: Counter,
    refused: Family<Refusal, Counter>,
    reports: Family<Status, Counter>,
    machines: Family<Machine, Gauge>,
    gauges_at: Mutex<Option<Instant>>,
}

impl Default for Metrics {
    fn default() -> Self {
        let (enrolled, signed, requests) = (Counter::default(), Counter::default(), Counter::default());
        let (refused, reports, machines) = (Family::default(), Family::default(), Family::default());
        let mut registry = Registry::with_prefix("imgbuild");
        registry.register("enrollments", "Machines bound to a node", enrolled.clone());
        registry.register("certificates_signed", "Certificates signed for node keys", signed.clone());
        registry.register("http_requests", "API requests received", requests.clone());
        registry.register("refusals", "Requests refused, by operation and reason", refused.clone());
        registry.register("reports", "Phase reports received, by status", reports.clone());
        registry.register(
            "machines",
            "Machines known to the server, by state, last phase and status",
            machines.clone(),
        );
        Metrics { registry, enrolled, signed, requests, refused, reports, machines, gauges_at: Mutex::new(None) }
    }
}

impl Metrics {
    /// Counts a machine bound to a node.
    pub fn enrolled(&self) {
        self.enrolled.inc();
    }

    /// Counts `n` certificates signed.
    pub fn signed(&self, n: u64) {
        self.signed.inc_by(n);
    }

    /// Counts an API request.
    pub fn request(&self) {
        self.requests.inc();
    }

    /// Counts a refusal of operation `op` with `code`.
    pub fn refused(&self, op: &str, code: ErrorCode) {
        self.refused.get_or_create(&Refusal { op: op.into(), code: code.as_str().into() }).inc();
    }

    /// Counts a phase report by its status.
    pub fn reported(&self, status: PhaseStatus) {
        self.reports.get_or_create(&Status { status: status.as_str().into() }).inc();
    }

    /// Whether the machine gauges are older than [`GAUGES_EVERY`]; if so, the caller is the one
    /// to refresh them (others keep serving the old ones meanwhile).
    pub fn gauges_due(&self) -> bool {
        let mut at = self.gauges_at.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if at.is_some_and(|t| t.elapsed() < GAUGES_EVERY) {
            return false;
        }
        *at = Some(Instant::now());
        true
    }

    /// Sets the machine gauges from the fleet as it is now.
    pub fn set_machines(&self, fleet: &[NodeStatus]) {
        self.machines.clear();
        for n in fleet {
            let labels = Machine {
                state: n.state.as_str().into(),
                phase: n.phase.map_or("none", |p| p.as_str()).into(),
                status: n.status.map_or("none", |s| s.as_str()).into(),
            };
            self.machines.get_or_create(&labels).inc();
        }
    }

    /// The exposition text.
    pub fn render(&self) -> String {
        let mut out = String::new();
        #[expect(clippy::expect_used, reason = "encoding fails only if the writer does, and a String never does")]
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String cannot fail");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_in_the_exposition() {
        let m = Metrics::default();
        m.enrolled();
        m.signed(3);
        m.refused("enroll", ErrorCode::Refused);
        m.refused("enroll", ErrorCode::Refused);
        m.reported(PhaseStatus::Failed);
        let text = m.render();
        for want in [
            "imgbuild_enrollments_total 1",
            "imgbuild_certificates_signed_total 3",
            "imgbuild_refusals_total{op=\"enroll\",code=\"refused\"} 2",
            "imgbuild_reports_total{status=\"failed\"} 1",
            "# EOF",
        ] {
            assert!(text.contains(want), "{want} missing in:\n{text}");
        }
        assert!(m.gauges_due(), "never set: due");
        assert!(!m.gauges_due(), "just set: not due");
    }
}
