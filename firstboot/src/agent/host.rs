//! Host settings behind [`Host`]: [`RealHost`] acts on the running system (nix for the hostname
//! and swap, /proc/sys for sysctls, modprobe for modules, sys-mount for data disks);
//! [`Recorder`] writes down what would be done, for tests and `--simulate`.

use std::path::{Path, PathBuf};

use proto::paths;
use proto::wire::DataDisk;

/// Why a host setting could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum HostError {
    /// The hostname could not be written or set.
    #[error("hostname {name}: {reason}")]
    Hostname {
        /// The hostname.
        name: String,
        /// What failed.
        reason: String,
    },
    /// A kernel parameter could not be set (and does not already have the value).
    #[error("sysctl {key}={value}: {reason}")]
    Sysctl {
        /// The parameter (`net.ipv4.ip_forward`).
        key: String,
        /// The value it should get.
        value: String,
        /// What failed, and the value it has.
        reason: String,
    },
    /// A kernel module could not be loaded.
    #[error("kernel module {name}: {reason}")]
    Module {
        /// The module.
        name: String,
        /// modprobe's complaint, or why it could not run.
        reason: String,
    },
    /// Swap could not be turned off (the device and the reason).
    #[error("swap off: {0}")]
    Swap(String),
    /// A data disk could not be mounted, or a required one is missing.
    #[error("data disk with label {label} at {mount_point}: {reason}")]
    Mount {
        /// The filesystem label.
        label: String,
        /// Where it should be mounted.
        mount_point: String,
        /// What failed.
        reason: String,
    },
}

/// What the host-setup phase changes on the machine.
pub trait Host {
    /// Writes /etc/hostname and sets the running hostname.
    fn set_hostname(&mut self, name: &str) -> Result<(), HostError>;
    /// Sets a kernel parameter (`net.ipv4.ip_forward`) now.
    fn sysctl(&mut self, key: &str, value: &str) -> Result<(), HostError>;
    /// Loads a kernel module, unless it is loaded already.
    fn load_module(&mut self, name: &str) -> Result<(), HostError>;
    /// Turns off every active swap device.
    fn swap_off(&mut self) -> Result<(), HostError>;
    /// Mounts a filesystem by label, unless it is mounted already; a missing optional disk is skipped.
    fn mount_data_disk(&mut self, disk: &DataDisk) -> Result<(), HostError>;
}

/// The running system under `root` (normally `/`).
pub struct RealHost {
    /// The tree to act on: `/` on a node.
    pub root: PathBuf,
}

impl RealHost {
    fn path(&self, p: &str) -> PathBuf {
        paths::under(&self.root, p)
    }
}

impl Host for RealHost {
    fn set_hostname(&mut self, name: &str) -> Result<(), HostError> {
        let err = |reason: String| HostError::Hostname { name: name.to_string(), reason };
        proto::fsutil::write_atomic(&self.path(paths::HOSTNAME), format!("{name}\n").as_bytes(), 0o644, None)
            .map_err(|e| err(format!("{}: {e}", paths::HOSTNAME)))?;
        nix::unistd::sethostname(name).map_err(|e| err(e.to_string()))
    }

    fn sysctl(&mut self, key: &str, value: &str) -> Result<(), HostError> {
        let path = self.path(&format!("/proc/sys/{}", key.replace('.', "/")));
        let err = |reason: String| HostError::Sysctl { key: key.to_string(), value: value.to_string(), reason };
        match std::fs::write(&path, value) {
            Ok(()) => Ok(()),
            // Read-only (a container): fine if it already has the value.
            Err(e) => match std::fs::read_to_string(&path) {
                Ok(cur) if cur.split_whitespace().eq(value.split_whitespace()) => Ok(()),
                Ok(cur) => Err(err(format!("{e}; it is {}", cur.trim()))),
                Err(_) => Err(err(e.to_string())),
            },
        }
    }

    fn load_module(&mut self, name: &str) -> Result<(), HostError> {
        if self.path(&format!("/sys/module/{name}")).exists() {
            return Ok(());
        }
        // A container shares the host's kernel: which modules it has is the host's business.
        if super::identity::in_container(&self.root) {
            tracing::info!("kernel module {name}: left to the host (this node is a container)");
            return Ok(());
        }
        // Dependencies and compressed modules are kmod's business.
        let out = std::process::Command::new("modprobe")
            .arg(name)
            .output()
            .map_err(|e| HostError::Module { name: name.to_string(), reason: format!("cannot run modprobe: {e}") })?;
        if out.status.success() {
            Ok(())
        } else {
            Err(HostError::Module {
                name: name.to_string(),
                reason: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    fn swap_off(&mut self) -> Result<(), HostError> {
        let swaps = std::fs::read_to_string(self.path("/proc/swaps")).unwrap_or_default();
        for dev in swaps.lines().skip(1).filter_map(|l| l.split_whitespace().next()) {
            let c = std::ffi::CString::new(dev).map_err(|e| HostError::Swap(e.to_string()))?;
            // SAFETY: swapoff(2) with a valid NUL-terminated path.
            if unsafe { nix::libc::swapoff(c.as_ptr()) } != 0 {
                return Err(HostError::Swap(format!("{dev}: {}", std::io::Error::last_os_error())));
            }
        }
        Ok(())
    }

    fn mount_data_disk(&mut self, disk: &DataDisk) -> Result<(), HostError> {
        let err = |reason: String| HostError::Mount {
            label: disk.label.clone(),
            mount_point: disk.mount_point.clone(),
            reason,
        };
        let src = self.path(&format!("/dev/disk/by-label/{}", disk.label));
        if !src.exists() {
            return if disk.required { Err(err("no such disk".into())) } else { Ok(()) };
        }
        let target = self.path(&disk.mount_point);
        std::fs::create_dir_all(&target).map_err(|e| err(e.to_string()))?;
        if is_mountpoint(&target) {
            return Ok(());
        }
        sys_mount::Mount::builder()
            .fstype(disk.fstype.as_str())
            .mount(&src, &target)
            .map(|_| ())
            .map_err(|e| err(e.to_string()))
    }
}

/// The file system of the mount in effect on `path` when it is one (the last mount on a path is
/// the one in effect), from `/proc/self/mounts`.
fn mounted_fstype(path: &Path) -> Option<String> {
    let mounts = std::fs::read_to_string("/proc/self/mounts").ok()?;
    let target = path.to_string_lossy();
    mounts.lines().rev().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.get(1) == Some(&target.as_ref())).then(|| f.get(2).map(|t| t.to_string())).flatten()
    })
}

/// When `root`'s `/var` is a mount of a file system that lives in RAM (a PXE boot's state with no
/// disk for it: the initramfs's tmpfs `imgbuild-state`), that file system's type.
pub fn state_in_ram(root: &Path) -> Option<String> {
    mounted_fstype(&paths::under(root, "/var")).filter(|t| t == "tmpfs" || t == "ramfs")
}

/// How the tree at `root` is mounted, as the node reports it: the file system of `/` and
/// whether it refuses writes (an immutable image's root must), tried for real with a probe file
/// in `/usr`.
pub fn root_layout(root: &Path) -> String {
    let fstype = mounted_fstype(root).unwrap_or_else(|| "unknown".into());
    let probe = paths::under(root, "/usr/.firstboot-write-probe");
    let writes = match std::fs::OpenOptions::new().write(true).create_new(true).open(&probe) {
        Ok(_) => {
            let _ = std::fs::remove_file(&probe);
            "accepts writes".to_string()
        }
        Err(e) if e.raw_os_error() == Some(nix::libc::EROFS) => "refuses writes (read-only)".to_string(),
        Err(e) => format!("refuses writes ({e})"),
    };
    format!("root {fstype}, {writes}")
}

fn is_mountpoint(p: &Path) -> bool {
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    let p = p.to_string_lossy();
    mounts.lines().any(|l| l.split_whitespace().nth(4) == Some(&p))
}

/// Writes down effects instead of performing them.
#[derive(Default)]
pub struct Recorder {
    /// What would have been done, one line per effect (`sysctl net.ipv4.ip_forward=1`), in order.
    pub effects: Vec<String>,
    /// Also append each effect to this file (for `--simulate` runs in other processes).
    pub log: Option<PathBuf>,
}

impl Recorder {
    /// Writes down one effect.
    pub fn note(&mut self, effect: String) {
        if let Some(p) = &self.log {
            use std::io::Write;
            if let Ok(mut f) = std::fs::OpenOptions::new().create(true).append(true).open(p) {
                let _ = writeln!(f, "{effect}");
            }
        }
        self.effects.push(effect);
    }
}

impl Host for Recorder {
    fn set_hostname(&mut self, name: &str) -> Result<(), HostError> {
        self.note(format!("hostname {name}"));
        Ok(())
    }
    fn sysctl(&mut self, key: &str, value: &str) -> Result<(), HostError> {
        self.note(format!("sysctl {key}={value}"));
        Ok(())
    }
    fn load_module(&mut self, name: &str) -> Result<(), HostError> {
        self.note(format!("modprobe {name}"));
        Ok(())
    }
    fn swap_off(&mut self) -> Result<(), HostError> {
        self.note("swapoff -a".into());
        Ok(())
    }
    fn mount_data_disk(&mut self, disk: &DataDisk) -> Result<(), HostError> {
        self.note(format!("mount LABEL={} {} ({})", disk.label, disk.mount_point, disk.fstype));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The check firstboot makes before a master or etcd node enrolls: a real tmpfs on `/var`
    /// (as a diskless PXE boot's initramfs mounts it) is seen, a plain directory is not.
    #[test]
    fn state_in_ram_sees_a_tmpfs_on_var() {
        let root = tempfile::tempdir().unwrap();
        let var = root.path().join("var");
        std::fs::create_dir(&var).unwrap();
        assert_eq!(state_in_ram(root.path()), None);
        let mount = sys_mount::Mount::builder().fstype("tmpfs").mount("imgbuild-state", &var).unwrap();
        assert_eq!(state_in_ram(root.path()).as_deref(), Some("tmpfs"));
        sys_mount::Unmount::unmount(&mount, sys_mount::UnmountFlags::DETACH).unwrap();
        assert_eq!(state_in_ram(root.path()), None);
    }
}
