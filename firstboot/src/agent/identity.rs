//! Who this machine is. Each [`IdentitySource`] reports what its platform offers; [`identify`]
//! merges them in order (the first UUID and serial win, MACs are united).
//!
//! Sources: SMBIOS via sysfs (skipped in containers, where it describes the host), the NICs'
//! permanent MACs, the kernel command line (`firstboot.uuid=`, `firstboot.boot-mac=` as iPXE
//! passes them), and files cloud-init leaves (`/var/lib/cloud/data/instance-id` as a serial).

use std::path::Path;

use proto::paths;
use proto::wire::{HostSetup, MachineIdentity};

/// One place a machine's identity can be read from.
pub trait IdentitySource: Send + Sync {
    /// The source's name, for the log.
    fn name(&self) -> &'static str;
    /// What this source knows; an empty identity when it knows nothing.
    fn identify(&self, root: &Path) -> MachineIdentity;
}

fn read_trimmed(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok().map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// SMBIOS product UUID and serial from `/sys/class/dmi/id`.
pub struct Dmi;

impl IdentitySource for Dmi {
    fn name(&self) -> &'static str {
        "dmi"
    }
    fn identify(&self, root: &Path) -> MachineIdentity {
        // In a container (systemd writes /run/systemd/container) DMI is the host's.
        if in_container(root) {
            return MachineIdentity::default();
        }
        let uuid = read_trimmed(&paths::under(root, paths::DMI_PRODUCT_UUID))
            .map(|u| u.to_ascii_lowercase())
            // Firmware placeholders identify nothing.
            .filter(|u| u != "00000000-0000-0000-0000-000000000000" && u != "ffffffff-ffff-ffff-ffff-ffffffffffff");
        let serial = read_trimmed(&paths::under(root, paths::DMI_PRODUCT_SERIAL)).filter(|s| {
            !matches!(
                s.to_ascii_lowercase().as_str(),
                "0" | "none" | "not specified" | "to be filled by o.e.m." | "default string"
            )
        });
        MachineIdentity { uuid, serial, macs: vec![] }
    }
}

/// MACs of the Ethernet NICs in `/sys/class/net` whose address is permanent (0) or was set by
/// whoever made the NIC (3: a hypervisor, a container manager); random (1) and stolen (2)
/// addresses, as bridges and ad-hoc veths have, identify nothing.
pub struct Nics;

impl IdentitySource for Nics {
    fn name(&self) -> &'static str {
        "nics"
    }
    fn identify(&self, root: &Path) -> MachineIdentity {
        let dir = paths::under(root, paths::NET_CLASS);
        let mut macs = Vec::new();
        for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
            let p = entry.path();
            let name = entry.file_name().to_string_lossy().into_owned();
            if name == "lo" || read_trimmed(&p.join("type")).as_deref() != Some("1") {
                continue; // not Ethernet
            }
            if read_trimmed(&p.join("addr_assign_type")).is_some_and(|t| t == "1" || t == "2") {
                continue;
            }
            if let Some(mac) = read_trimmed(&p.join("address")).filter(|m| m != "00:00:00:00:00:00") {
                macs.push(mac.to_ascii_lowercase());
            }
        }
        macs.sort();
        MachineIdentity { uuid: None, serial: None, macs }
    }
}

/// `firstboot.uuid=` and `firstboot.boot-mac=` on the kernel command line.
pub struct Cmdline;

impl IdentitySource for Cmdline {
    fn name(&self) -> &'static str {
        "cmdline"
    }
    fn identify(&self, root: &Path) -> MachineIdentity {
        let line = read_trimmed(&paths::under(root, paths::KERNEL_CMDLINE)).unwrap_or_default();
        let arg =
            |k: &str| line.split_ascii_whitespace().find_map(|a| a.strip_prefix(k)).map(|v| v.to_ascii_lowercase());
        MachineIdentity {
            uuid: arg("firstboot.uuid="),
            serial: None,
            macs: arg("firstboot.boot-mac=").map(|m| m.replace('-', ":")).into_iter().collect(),
        }
    }
}

/// cloud-init's instance id, as a serial where the firmware has none.
pub struct CloudInitFiles;

impl IdentitySource for CloudInitFiles {
    fn name(&self) -> &'static str {
        "cloud-init"
    }
    fn identify(&self, root: &Path) -> MachineIdentity {
        let serial =
            read_trimmed(&paths::under(root, "/var/lib/cloud/data/instance-id")).filter(|s| s != "iid-datasource-none");
        MachineIdentity { uuid: None, serial, macs: vec![] }
    }
}

/// The sources in the order their answers count.
pub fn default_sources() -> Vec<Box<dyn IdentitySource>> {
    vec![Box::new(Dmi), Box::new(Cmdline), Box::new(Nics), Box::new(CloudInitFiles)]
}

/// What the sources say, merged (the first UUID and serial, every MAC); the one normal form
/// is [`MachineIdentity::normalized`], which the server applies too.
pub fn identify(root: &Path, sources: &[Box<dyn IdentitySource>]) -> MachineIdentity {
    let mut id = MachineIdentity::default();
    for s in sources {
        let found = s.identify(root);
        tracing::debug!("identity from {}: {found:?}", s.name());
        id.uuid = id.uuid.or(found.uuid);
        id.serial = id.serial.or(found.serial);
        id.macs.extend(found.macs);
    }
    id
}

/// Whether this tree runs in a container (systemd-nspawn, podman, ...): the kernel, DMI and
/// kernel modules are the host's.
pub fn in_container(root: &Path) -> bool {
    paths::under(root, "/run/systemd/container").exists()
}

/// The name of the node's NIC: the one with the inventory's MAC, else the one that carries the
/// node's address (`ADDR` or `ADDR/PREFIX`).
pub fn node_interface(root: &Path, host: &HostSetup) -> Option<String> {
    if let Some(mac) = &host.interface_mac {
        let dir = paths::under(root, paths::NET_CLASS);
        let found = std::fs::read_dir(&dir).into_iter().flatten().flatten().find(|e| {
            read_trimmed(&e.path().join("address")).is_some_and(|a| a.eq_ignore_ascii_case(mac))
                && read_trimmed(&e.path().join("type")).as_deref() == Some("1")
        });
        if let Some(e) = found {
            return Some(e.file_name().to_string_lossy().into_owned());
        }
    }
    let want: std::net::IpAddr = host.interface_address.as_deref()?.split('/').next()?.parse().ok()?;
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let ip = ifa.address.as_ref().and_then(|a| {
            a.as_sockaddr_in()
                .map(|v4| std::net::IpAddr::V4(v4.ip()))
                .or_else(|| a.as_sockaddr_in6().map(|v6| std::net::IpAddr::V6(v6.ip())))
        })?;
        (ip == want).then_some(ifa.interface_name)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(root: &Path, p: &str, s: &str) {
        let p = paths::under(root, p);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, s).unwrap();
    }

    fn nic(root: &Path, name: &str, mac: &str, kind: &str, assign: &str) {
        write(root, &format!("/sys/class/net/{name}/address"), &format!("{mac}\n"));
        write(root, &format!("/sys/class/net/{name}/type"), kind);
        write(root, &format!("/sys/class/net/{name}/addr_assign_type"), assign);
    }

    #[test]
    fn merges_sources_in_order() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path();
        write(r, paths::DMI_PRODUCT_UUID, "4C4C4544-0042-3510-8052-B4C04F4D4E31\n");
        write(r, paths::DMI_PRODUCT_SERIAL, "To Be Filled By O.E.M.\n");
        nic(r, "eth0", "52:54:00:03:01:21", "1", "0");
        nic(r, "br0", "02:aa:bb:cc:dd:ee", "1", "1");
        nic(r, "cni0", "02:aa:bb:cc:dd:ef", "1", "2");
        nic(r, "lo", "00:00:00:00:00:00", "772", "0");
        write(r, paths::KERNEL_CMDLINE, "ro firstboot.boot-mac=52-54-00-03-01-99\n");
        write(r, "/var/lib/cloud/data/instance-id", "i-123\n");
        let id = identify(r, &default_sources()).normalized().unwrap();
        assert_eq!(id.uuid.as_deref(), Some("4c4c4544-0042-3510-8052-b4c04f4d4e31"));
        assert_eq!(id.serial.as_deref(), Some("i-123"));
        assert_eq!(id.macs, ["52:54:00:03:01:21", "52:54:00:03:01:99"]);
    }

    #[test]
    fn containers_have_no_dmi_identity() {
        let d = tempfile::tempdir().unwrap();
        write(d.path(), paths::DMI_PRODUCT_UUID, "4c4c4544-0042-3510-8052-b4c04f4d4e31");
        write(d.path(), "/run/systemd/container", "systemd-nspawn");
        nic(d.path(), "host0", "52:54:00:03:01:11", "1", "0");
        let id = identify(d.path(), &default_sources());
        assert_eq!(id.uuid, None);
        assert_eq!(id.key(), "macs:52:54:00:03:01:11");
    }

    #[test]
    fn the_node_interface_is_found_by_mac_then_address() {
        let d = tempfile::tempdir().unwrap();
        nic(d.path(), "cni0", "02:aa:bb:cc:dd:ef", "1", "2");
        nic(d.path(), "enp1s0", "52:54:00:03:01:11", "1", "0");
        let by_mac = HostSetup { interface_mac: Some("52:54:00:03:01:11".into()), ..Default::default() };
        assert_eq!(node_interface(d.path(), &by_mac).as_deref(), Some("enp1s0"));
        let unknown = HostSetup { interface_mac: Some("52:54:00:03:01:99".into()), ..Default::default() };
        assert_eq!(node_interface(d.path(), &unknown), None);
        // Every machine has a loopback interface carrying 127.0.0.1.
        let by_address = HostSetup { interface_address: Some("127.0.0.1/8".into()), ..Default::default() };
        assert_eq!(node_interface(d.path(), &by_address).as_deref(), Some("lo"));
    }
}
