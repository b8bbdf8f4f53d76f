//! Progress of long work (fetches, the base tree, file systems, disk formats), for whoever waits
//! on it: live bars on a terminal (indicatif), and one line per finished step with its time when
//! stderr is not a terminal (CI logs, pipes), so a log shows where minutes went; a step that
//! counts something also says how far it is every [`PLAIN_EVERY`] there.
//!
//! One [`Progress`] per command; log lines go through [`Progress::writer`], so that they print
//! above the bars instead of through them.

use std::io::{IsTerminal, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain-text task says how far it is.
pub const PLAIN_EVERY: Duration = Duration::from_secs(30);

/// What a task counts.
#[derive(Debug, Clone, Copy)]
pub enum Unit {
    /// Bytes, of this many in all.
    Bytes(u64),
    /// Things of a kind ("packages"), this many in all.
    Items(u64, &'static str),
    /// Work whose size is not known: a spinner and the time so far.
    Time,
}

/// Where progress goes: bars on a terminal, plain lines elsewhere.
#[derive(Clone)]
pub struct Progress {
    bars: Option<MultiProgress>,
}

impl Default for Progress {
    fn default() -> Self {
        Progress::detect()
    }
}

impl Progress {
    /// Bars when stderr is a terminal (and `IMGBUILD_PROGRESS` is not `plain`), lines otherwise.
    pub fn detect() -> Self {
        let plain = std::env::var("IMGBUILD_PROGRESS").is_ok_and(|v| v == "plain");
        if plain || !std::io::stderr().is_terminal() { Progress::plain() } else { Progress::bars() }
    }

    /// Plain lines, whatever stderr is.
    pub fn plain() -> Self {
        Progress { bars: None }
    }

    fn bars() -> Self {
        Progress { bars: Some(MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8))) }
    }

    /// A task that shows how far it is until [`Task::finish`].
    pub fn task(&self, label: impl Into<String>, unit: Unit) -> Task {
        let label = label.into();
        let bar = self.bars.as_ref().map(|m| {
            let (len, template) = match unit {
                Unit::Bytes(n) => {
                    (n, "{spinner} {msg:32!} {bar:28} {bytes:>10}/{total_bytes:<10} {bytes_per_sec:>11} {elapsed:>4}")
                }
                Unit::Items(n, _) => (n, "{spinner} {msg:32!} {bar:28} {pos:>5}/{len:<5} {prefix:11} {elapsed:>4}"),
                Unit::Time => (0, "{spinner} {msg:32!} {elapsed:>4}"),
            };
            let bar = m.add(ProgressBar::new(len));
            #[expect(clippy::expect_used, reason = "the three templates above are constants in indicatif's syntax")]
            bar.set_style(ProgressStyle::with_template(template).expect("valid template"));
            if let Unit::Items(_, what) = unit {
                bar.set_prefix(what);
            }
            bar.set_message(label.clone());
            bar.enable_steady_tick(Duration::from_millis(250));
            bar
        });
        let len = match unit {
            Unit::Bytes(n) | Unit::Items(n, _) => n,
            Unit::Time => 0,
        };
        let plain = Plain { unit, len, pos: 0, said: Instant::now() };
        Task { bar, label, start: Instant::now(), plain: std::sync::Mutex::new(plain) }
    }

    /// A writer for log lines: above the bars on a terminal, plain stderr otherwise.
    pub fn writer(&self) -> LogWriter {
        LogWriter { bars: self.bars.clone().map(Arc::new) }
    }
}

/// One step of long work.
pub struct Task {
    bar: Option<ProgressBar>,
    label: String,
    start: Instant,
    plain: std::sync::Mutex<Plain>,
}

/// Where a task is, for the plain lines.
struct Plain {
    unit: Unit,
    len: u64,
    pos: u64,
    said: Instant,
}

impl Task {
    /// Counts `n` more (bytes or items).
    pub fn inc(&self, n: u64) {
        match &self.bar {
            Some(b) => b.inc(n),
            None => self.plain_at(|p| p.pos + n),
        }
    }

    /// Sets the count so far.
    pub fn set_position(&self, n: u64) {
        match &self.bar {
            Some(b) => b.set_position(n),
            None => self.plain_at(|_| n),
        }
    }

    /// Sets the count in all, once it is known.
    #[expect(
        clippy::expect_used,
        reason = "the lock is held only to update counters and log a line, which do not panic: never poisoned"
    )]
    pub fn set_length(&self, n: u64) {
        match &self.bar {
            Some(b) => b.set_length(n),
            None => self.plain.lock().expect("task lock").len = n,
        }
    }

    /// Moves the plain-text position; says where it is when the last line is old enough.
    fn plain_at(&self, pos: impl FnOnce(&Plain) -> u64) {
        #[expect(
            clippy::expect_used,
            reason = "the lock is held only to update counters and log a line, which do not panic: never poisoned"
        )]
        let mut p = self.plain.lock().expect("task lock");
        p.pos = pos(&p);
        if p.said.elapsed() < PLAIN_EVERY {
            return;
        }
        p.said = Instant::now();
        let at = match p.unit {
            Unit::Bytes(_) => format!("{} of {}", mib(p.pos), mib(p.len)),
            Unit::Items(_, what) => format!("{} of {} {what}", p.pos, p.len),
            Unit::Time => return,
        };
        tracing::info!("{}: {at} ({:.0}s so far)", self.label, self.start.elapsed().as_secs_f64());
    }

    /// The word after the count ("unpacked", then "configured").
    pub fn set_prefix(&self, prefix: &'static str) {
        match &self.bar {
            Some(b) => b.set_prefix(prefix),
            None => {
                #[expect(
                    clippy::expect_used,
                    reason = "the lock is held only to update counters and log a line, which do not panic: never poisoned"
                )]
                let mut p = self.plain.lock().expect("task lock");
                p.unit = Unit::Items(p.len, prefix);
            }
        }
    }

    /// Time since the task started.
    pub fn elapsed(&self) -> Duration {
        self.start.elapsed()
    }

    /// Ends the task: the bar goes, and one line says what was done and how long it took.
    pub fn finish(self, summary: impl std::fmt::Display) -> Duration {
        let took = self.start.elapsed();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
        tracing::info!("{}: {summary} ({:.1}s)", self.label, took.as_secs_f64());
        took
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        // A task abandoned by an error leaves no bar behind.
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

/// See [`Progress::writer`].
#[derive(Clone)]
pub struct LogWriter {
    bars: Option<Arc<MultiProgress>>,
}

impl Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match &self.bars {
            Some(m) => m.suspend(|| std::io::stderr().write_all(buf)).map(|()| buf.len()),
            None => std::io::stderr().write(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        std::io::stderr().flush()
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Progress {
    type Writer = LogWriter;

    fn make_writer(&'a self) -> LogWriter {
        self.writer()
    }
}

static GLOBAL: std::sync::OnceLock<Progress> = std::sync::OnceLock::new();

/// The command's progress, as [`install`] set it (plain lines when nothing did: tests).
pub fn global() -> &'static Progress {
    GLOBAL.get_or_init(Progress::plain)
}

/// Sets the command's progress, once, at start.
pub fn install(p: Progress) -> &'static Progress {
    let _ = GLOBAL.set(p);
    global()
}

/// Bytes as MiB with one decimal, for summaries.
pub fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", bytes as f64 / (1024.0 * 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_tasks_draw_nothing_and_time_themselves() {
        let p = Progress::plain();
        let t = p.task("base tree", Unit::Items(10, "packages"));
        t.inc(3);
        t.set_length(12);
        t.inc(2);
        assert!(t.bar.is_none());
        let (pos, len) = {
            let p = t.plain.lock().unwrap();
            (p.pos, p.len)
        };
        assert_eq!((pos, len), (5, 12));
        assert!(t.finish("done") < Duration::from_secs(5));
    }
}
