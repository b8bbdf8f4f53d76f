//! Counters for `/metrics` (Prometheus text format 0.0.4).

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use proto::wire::{ErrorCode, PhaseStatus};

use super::fleet::NodeStatus;

#[derive(Default)]
pub struct Metrics {
    enrolled: AtomicU64,
    signed: AtomicU64,
    refused: Mutex<BTreeMap<(String, String), u64>>,
    reports: Mutex<BTreeMap<&'static str, u64>>,
    requests: AtomicU64,
}

impl Metrics {
    pub fn enrolled(&self) {
        self.enrolled.fetch_add(1, Ordering::Relaxed);
    }
    pub fn signed(&self) {
        self.signed.fetch_add(1, Ordering::Relaxed);
    }
    pub fn request(&self) {
        self.requests.fetch_add(1, Ordering::Relaxed);
    }
    pub fn refused(&self, op: &str, code: ErrorCode) {
        let code = serde_json::to_value(code).ok().and_then(|v| v.as_str().map(String::from)).unwrap_or_default();
        *self.refused.lock().expect("metrics lock").entry((op.to_string(), code)).or_default() += 1;
    }
    pub fn reported(&self, status: PhaseStatus) {
        *self.reports.lock().expect("metrics lock").entry(status.as_str()).or_default() += 1;
    }

    /// The exposition text, with per-phase node gauges from `fleet`.
    pub fn render(&self, fleet: &[NodeStatus]) -> String {
        let mut out = String::new();
        let mut counter = |name: &str, help: &str, v: u64| {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}");
        };
        counter(
            "imgbuild_enrollments_total",
            "Machines enrolled (including re-enrollments with a new key).",
            self.enrolled.load(Ordering::Relaxed),
        );
        counter(
            "imgbuild_certificates_signed_total",
            "Certificates signed for node keys.",
            self.signed.load(Ordering::Relaxed),
        );
        counter("imgbuild_http_requests_total", "API requests received.", self.requests.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP imgbuild_refusals_total Requests refused, by operation and reason.\n# TYPE imgbuild_refusals_total counter"
        );
        for ((op, code), v) in self.refused.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "imgbuild_refusals_total{{op=\"{op}\",code=\"{code}\"}} {v}");
        }
        let _ = writeln!(
            out,
            "# HELP imgbuild_reports_total Phase reports received, by status.\n# TYPE imgbuild_reports_total counter"
        );
        for (status, v) in self.reports.lock().expect("metrics lock").iter() {
            let _ = writeln!(out, "imgbuild_reports_total{{status=\"{status}\"}} {v}");
        }
        let mut phases: BTreeMap<(String, String), u64> = BTreeMap::new();
        for n in fleet {
            let phase = n.phase.map_or("none".to_string(), |p| p.as_str().to_string());
            let status = n.status.map_or("none".to_string(), |s| s.as_str().to_string());
            *phases.entry((phase, status)).or_default() += 1;
        }
        let _ = writeln!(
            out,
            "# HELP imgbuild_machines Machines known to the server, by last phase and status.\n# TYPE imgbuild_machines gauge"
        );
        for ((phase, status), v) in phases {
            let _ = writeln!(out, "imgbuild_machines{{phase=\"{phase}\",status=\"{status}\"}} {v}");
        }
        out
    }
}
