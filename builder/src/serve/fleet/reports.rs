//! `POST /v1/report`: what a node says about each phase, kept on its record (the newest
//! [`records::KEEP_REPORTS`]; failures also in its errors) and counted.

use proto::wire::{ErrorCode, PhaseStatus, Report, limits};

use super::records::{self, NodeRecord};
use super::{ApiError, Fleet};

impl Fleet {
    /// Records node `name`'s report: its last phase, status and message, the newest reports and
    /// failures kept, and an audit line.
    pub async fn report(&self, name: &str, report: Report) -> Result<(), ApiError> {
        if report.message.len() > limits::REPORT_MESSAGE {
            return Err(ApiError::new(
                ErrorCode::TooLarge,
                format!("a report message of {} bytes (at most {})", report.message.len(), limits::REPORT_MESSAGE),
            ));
        }
        if report.boot_id.as_ref().is_some_and(|b| b.len() > 64) {
            return Err(ApiError::new(ErrorCode::TooLarge, "a boot id over 64 bytes"));
        }
        let (key, report) = (&records::node_key(name), &report);
        self.transact(txn!(|tx| {
            let mut node: NodeRecord =
                tx.get(key).await?.ok_or_else(|| ApiError::new(ErrorCode::NotEnrolled, format!("no node {name}")))?;
            node.phase = Some(report.phase);
            node.status = Some(report.status);
            node.message = report.message.clone();
            node.last_report_at = Some(report.at);
            if report.status == PhaseStatus::Failed {
                node.errors.push(format!("{}: {}", report.phase, report.message));
                let excess = node.errors.len().saturating_sub(records::KEEP_ERRORS);
                node.errors.drain(..excess);
            }
            node.reports.push(report.clone());
            let excess = node.reports.len().saturating_sub(records::KEEP_REPORTS);
            node.reports.drain(..excess);
            tx.put(key, &node);
            Ok(())
        }))
        .await?;
        self.audit.line(
            "report",
            &[
                ("node", name),
                ("phase", report.phase.as_str()),
                ("status", report.status.as_str()),
                ("message", &report.message),
            ],
        );
        self.metrics.reported(report.status);
        Ok(())
    }
}
