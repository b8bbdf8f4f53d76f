//! Crash-safe file writes, used for the operator's state dir and for every file a node writes:
//! a temp file in the same directory created with the final mode, written, fsynced, chowned,
//! renamed over the target, then the directory fsynced. A reader sees the old file or the new
//! one, never a torn one; nothing half-written is left behind on error.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Writes `contents` to `path` atomically with permission bits `mode` and, when given, owner
/// `(uid, gid)`. The parent directory must exist.
pub fn write_atomic(path: &Path, contents: &[u8], mode: u32, owner: Option<(u32, u32)>) -> io::Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, format!("{} has no file name", path.display())))?;
    let tmp = dir.join(format!(".{}.tmp-{}", name.to_string_lossy(), std::process::id()));
    let result = (|| {
        let mut f = OpenOptions::new().write(true).create(true).truncate(true).mode(mode).open(&tmp)?;
        // The umask may have cleared bits of `mode`; set them exactly.
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        if let Some((uid, gid)) = owner {
            std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
        }
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Creates `dir` and its missing parents, and sets `dir`'s mode.
pub fn ensure_dir(dir: &Path, mode: u32) -> io::Result<()> {
    fs::create_dir_all(dir)?;
    fs::set_permissions(dir, fs::Permissions::from_mode(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_with_mode_and_replaces() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("secret.key");
        write_atomic(&p, b"one", 0o600, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"one");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o600);
        write_atomic(&p, b"two", 0o644, None).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"two");
        assert_eq!(fs::metadata(&p).unwrap().permissions().mode() & 0o7777, 0o644);
        assert_eq!(fs::read_dir(d.path()).unwrap().count(), 1, "temp file left behind");
    }

    #[test]
    fn failure_leaves_nothing() {
        let d = tempfile::tempdir().unwrap();
        // The target is a non-empty directory: rename fails after the temp file was written.
        let p = d.path().join("target");
        fs::create_dir(&p).unwrap();
        fs::write(p.join("x"), b"").unwrap();
        assert!(write_atomic(&p, b"data", 0o600, None).is_err());
        let names: Vec<_> = fs::read_dir(d.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, vec![std::ffi::OsString::from("target")]);
    }
}
