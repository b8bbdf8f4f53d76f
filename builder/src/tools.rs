//! Host tools the bake runs (mmdebstrap, mkfs.*, sfdisk, qemu-img, ...): where they are, which
//! Debian package provides each, and running them so that a failure says what the tool said.
//!
//! A failed tool's error carries its own diagnostic lines (apt's `E:`/`W:` lines, mkfs' and
//! qemu-img's messages) and the last lines it wrote, not just an exit status. [`stream`] hands
//! every output line to the caller as it comes (progress), and keeps the same error lines.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};

/// Host tools and the Debian packages that provide them.
const TOOLS: &[(&str, &str)] = &[
    ("mmdebstrap", "mmdebstrap"),
    ("dpkg-scanpackages", "dpkg-dev"),
    ("dpkg-deb", "dpkg"),
    ("apt-get", "apt"),
    ("mkfs.erofs", "erofs-utils"),
    ("mkfs.vfat", "dosfstools"),
    ("mcopy", "mtools"),
    ("grub-mkimage", "grub-common"),
    ("mkfs.ext4", "e2fsprogs"),
    ("sfdisk", "fdisk"),
    ("qemu-img", "qemu-utils"),
    ("tar", "tar"),
];

/// How many lines of a failed tool's output an error keeps.
const KEEP_LINES: usize = 24;

/// Why a host tool did not do its job.
#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    /// The tool is not installed or cannot be started.
    #[error(
        "host tool {tool} is missing or failed to start ({reason}): apt-get install {package} (or run .ci/setup-host)"
    )]
    Missing {
        /// The tool (or files it needs).
        tool: String,
        /// The Debian package that provides it.
        package: String,
        /// Why it cannot run.
        reason: String,
    },
    /// The tool ran and exited with a failure.
    #[error("{tool} failed ({status}){}", lines_after_colon(.output))]
    Failed {
        /// The tool.
        tool: String,
        /// Its exit status.
        status: String,
        /// Its diagnostic lines, then its last lines.
        output: Vec<String>,
    },
}

fn lines_after_colon(lines: &[String]) -> String {
    if lines.is_empty() { String::new() } else { format!(":\n    {}", lines.join("\n    ")) }
}

fn package_of(tool: &str) -> &'static str {
    TOOLS.iter().find(|(t, _)| *t == tool).map_or("the package providing it", |(_, p)| p)
}

/// Where a host tool is on PATH.
pub fn path(tool: &str) -> Option<PathBuf> {
    std::env::split_paths(&std::env::var_os("PATH")?).map(|d| d.join(tool)).find(|p| p.is_file())
}

/// A host tool's path, or the error that names its package.
pub fn require(tool: &str) -> Result<PathBuf, ToolError> {
    path(tool).ok_or_else(|| ToolError::Missing {
        tool: tool.into(),
        package: package_of(tool).into(),
        reason: "not on PATH".into(),
    })
}

/// Fails naming the first missing host tool of a bake and its package.
pub fn check_all() -> Result<(), ToolError> {
    for (tool, _) in TOOLS {
        require(tool)?;
    }
    // The disks boot on UEFI and on legacy BIOS: GRUB's modules for both platforms.
    for (platform, what, package) in
        [("x86_64-efi", "GRUB EFI modules", "grub-efi-amd64-bin"), ("i386-pc", "GRUB BIOS modules", "grub-pc-bin")]
    {
        if !Path::new("/usr/lib/grub").join(platform).join("linux.mod").exists() {
            return Err(ToolError::Missing {
                tool: what.into(),
                package: package.into(),
                reason: format!("no /usr/lib/grub/{platform}"),
            });
        }
    }
    Ok(())
}

/// The lines of a tool's output worth showing when it failed: every diagnostic line (apt's and
/// dpkg's `E:`/`W:`/`dpkg: error`, `error:`/`warning:` of most tools), then the last lines.
#[derive(Debug, Default)]
struct Diagnostics {
    marked: Vec<String>,
    tail: std::collections::VecDeque<String>,
}

impl Diagnostics {
    fn push(&mut self, line: &str) {
        let line = line.trim_end();
        if line.is_empty() {
            return;
        }
        let lower = line.to_ascii_lowercase();
        let marked = ["e:", "w:", "error", "fatal", "warning:", "dpkg: error", "mmdebstrap: error"]
            .iter()
            .any(|m| lower.starts_with(m))
            || lower.contains(" error:")
            || lower.contains("failed");
        if marked && self.marked.len() < KEEP_LINES && !self.marked.iter().any(|l| l == line) {
            self.marked.push(line.to_string());
        }
        if self.tail.len() == KEEP_LINES / 2 {
            self.tail.pop_front();
        }
        self.tail.push_back(line.to_string());
    }

    fn lines(self) -> Vec<String> {
        let mut out = self.marked;
        for l in self.tail {
            if !out.contains(&l) {
                out.push(l);
            }
        }
        out
    }
}

fn failed(tool: &str, status: ExitStatus, diag: Diagnostics) -> ToolError {
    ToolError::Failed { tool: tool.into(), status: status.to_string(), output: diag.lines() }
}

fn spawn_error(tool: &str, e: std::io::Error) -> ToolError {
    ToolError::Missing { tool: tool.into(), package: package_of(tool).into(), reason: e.to_string() }
}

/// Runs a host tool to the end; its stdout on success, its diagnostics in the error otherwise.
pub fn run(cmd: &mut Command, tool: &str) -> Result<Vec<u8>, ToolError> {
    let out = cmd.output().map_err(|e| spawn_error(tool, e))?;
    if out.status.success() {
        return Ok(out.stdout);
    }
    let mut diag = Diagnostics::default();
    for line in String::from_utf8_lossy(&out.stderr).lines().chain(String::from_utf8_lossy(&out.stdout).lines()) {
        diag.push(line);
    }
    Err(failed(tool, out.status, diag))
}

/// Runs a host tool, handing each line of its stdout and stderr (split at `\n` and `\r`, which
/// progress meters use) to `on_line` as it comes.
pub fn stream(cmd: &mut Command, tool: &str, mut on_line: impl FnMut(&str)) -> Result<(), ToolError> {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| spawn_error(tool, e))?;
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let readers: Vec<_> = [
        child.stdout.take().map(|o| Box::new(o) as Box<dyn Read + Send>),
        child.stderr.take().map(|e| Box::new(e) as Box<dyn Read + Send>),
    ]
    .into_iter()
    .flatten()
    .map(|r| {
        let tx = tx.clone();
        std::thread::spawn(move || {
            let mut r = BufReader::new(r);
            let mut buf = Vec::new();
            loop {
                buf.clear();
                // Lines end at \n; a progress meter's \r-separated updates are split below.
                match r.read_until(b'\n', &mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        for part in String::from_utf8_lossy(&buf).split('\r') {
                            if tx.send(part.trim_end_matches('\n').to_string()).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        })
    })
    .collect();
    drop(tx);
    let mut diag = Diagnostics::default();
    for line in rx {
        on_line(&line);
        diag.push(&line);
    }
    for r in readers {
        let _ = r.join();
    }
    let status = child.wait().map_err(|e| spawn_error(tool, e))?;
    if status.success() { Ok(()) } else { Err(failed(tool, status, diag)) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_the_diagnostics_and_the_last_lines() {
        let script = "for i in $(seq 1 50); do echo \"Unpacking p$i ...\"; done; \
                      echo 'E: The repository is broken' >&2; echo 'W: something odd' >&2; \
                      for i in $(seq 1 30); do echo \"Setting up p$i ...\"; done; exit 3";
        let e = run(Command::new("sh").args(["-c", script]), "sh").unwrap_err().to_string();
        assert!(e.starts_with("sh failed (exit status: 3):"), "{e}");
        assert!(e.contains("\n    E: The repository is broken\n    W: something odd"), "{e}");
        assert!(e.contains("Setting up p30 ...") && !e.contains("Unpacking p1 ..."), "{e}");
        let lines = e.lines().count();
        assert!(lines <= 1 + KEEP_LINES + KEEP_LINES / 2, "{lines} lines: {e}");
    }

    #[test]
    fn stream_hands_over_every_line_and_splits_carriage_returns() {
        let mut seen = Vec::new();
        stream(
            Command::new("sh").args(["-c", "printf '(10/100%%)\\r(50/100%%)\\r'; echo done; echo err >&2"]),
            "sh",
            |l| seen.push(l.to_string()),
        )
        .unwrap();
        for want in ["(10/100%)", "(50/100%)", "done", "err"] {
            assert!(seen.iter().any(|l| l == want), "{want} not in {seen:?}");
        }
        let e = stream(
            Command::new("sh").args(["-c", "echo 'mkfs.ext4: No space left on device' >&2; exit 1"]),
            "sh",
            |_| {},
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("mkfs.ext4: No space left on device"), "{e}");
    }

    #[test]
    fn a_missing_tool_names_its_package() {
        let e = run(&mut Command::new("/nonexistent/mkfs.erofs"), "mkfs.erofs").unwrap_err().to_string();
        assert!(e.contains("apt-get install erofs-utils"), "{e}");
    }
}
