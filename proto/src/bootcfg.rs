//! The first-boot payload: what a machine needs to find and trust its enrollment server.
//!
//! Every transport carries the same [`BootConfig`]: Ignition and cloud-init write it as JSON to
//! [`crate::paths::BOOT_CONFIG`], VMware guestinfo carries those payloads, and PXE passes it on the
//! kernel command line, either inline (`firstboot.server=… firstboot.pin=… firstboot.token=…
//! firstboot.role=…`) or as a location to fetch it from (`firstboot.config=URL firstboot.pin=…`).
//! It holds no private key: public data, and at most one machine's own credential (a token).

use std::net::IpAddr;

use serde::{Deserialize, Serialize};

use crate::pin::CaPin;
use crate::role::Role;
use crate::token::BootstrapToken;

/// The [`BootConfig::version`] this build writes and reads.
pub const BOOT_CONFIG_VERSION: u32 = 1;

/// The first-boot payload: where the enrollment server is, how to trust it, and the machine's
/// credential.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct BootConfig {
    /// Format version of this file.
    pub version: u32,
    /// Enrollment server base URLs (`https://host:port`), tried in order.
    pub servers: Vec<String>,
    /// The pin of the CA that signed the enrollment server's certificate.
    pub ca_pin: CaPin,
    /// The machine's credential: its node's one-time credential, or the worker token. None in
    /// what the server hands out openly: such a machine waits for the operator's approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<BootstrapToken>,
    /// The role this payload was made for.
    pub role: Role,
    /// Static address for the first NIC, where there is no DHCP.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<StaticNetwork>,
    /// DNS, NTP and operators' SSH keys, applied before enrolling (static and DHCP nodes alike).
    #[serde(default, skip_serializing_if = "HostBasics::is_empty")]
    pub host: HostBasics,
}

/// What a node's operating system gets from the manifest (`spec.hosts`, and the node's own SSH
/// keys): nothing secret, so in every payload, and applied first so that an operator can log in
/// (break-glass) even on a machine that never enrolls.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct HostBasics {
    /// DNS servers for systemd-resolved, in order.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns_servers: Vec<IpAddr>,
    /// DNS search domains.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub search_domains: Vec<String>,
    /// NTP servers for systemd-timesyncd.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ntp_servers: Vec<String>,
    /// OpenSSH public keys for root's `authorized_keys`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ssh_authorized_keys: Vec<String>,
}

impl HostBasics {
    /// Nothing to apply.
    pub fn is_empty(&self) -> bool {
        self.dns_servers.is_empty()
            && self.search_domains.is_empty()
            && self.ntp_servers.is_empty()
            && self.ssh_authorized_keys.is_empty()
    }
}

/// A static address for a node's NIC, for networks without DHCP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
pub struct StaticNetwork {
    /// Interface to configure; the first non-loopback NIC when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    /// MAC of the NIC to configure (used to find it when `interface` is absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    /// `ip/prefix`.
    pub address: String,
    /// The default gateway; no default route when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gateway: Option<IpAddr>,
    /// DNS servers, in order of preference.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dns: Vec<IpAddr>,
}

/// What a kernel command line says about the payload.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CmdlineConfig {
    /// The whole payload on the command line.
    Inline(Box<BootConfig>),
    /// Fetch the payload from `url`; when it is HTTPS, trust only a server under `pin`.
    Remote {
        /// Where the payload is (`http://` or `https://`).
        url: String,
        /// The CA an HTTPS `url`'s server must chain to.
        pin: CaPin,
    },
}

/// Why the kernel command line does not give a payload.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CmdlineError {
    /// A `firstboot.` key (the first) is missing, which the second one needs.
    #[error("kernel command line: firstboot.{0} is missing (needed with {1})")]
    Missing(&'static str, &'static str),
    /// A `firstboot.` key has a value that does not parse.
    #[error("kernel command line: firstboot.{key}: {reason}")]
    Invalid {
        /// The key without its `firstboot.` prefix.
        key: &'static str,
        /// Why its value does not parse.
        reason: String,
    },
}

impl BootConfig {
    /// The inline kernel-command-line form (PXE). Values contain no spaces by construction.
    pub fn to_cmdline(&self) -> String {
        let mut args =
            vec![format!("firstboot.server={}", self.servers.join(",")), format!("firstboot.pin={}", self.ca_pin)];
        if let Some(t) = &self.token {
            args.push(format!("firstboot.token={}", t.expose()));
        }
        args.push(format!("firstboot.role={}", self.role));
        if let Some(n) = &self.network {
            args.push(format!("firstboot.ip={}", n.address));
            if let Some(gw) = n.gateway {
                args.push(format!("firstboot.gw={gw}"));
            }
            if let Some(mac) = &n.mac {
                args.push(format!("firstboot.mac={mac}"));
            }
            if let Some(i) = &n.interface {
                args.push(format!("firstboot.if={i}"));
            }
            if !n.dns.is_empty() {
                let dns: Vec<String> = n.dns.iter().map(ToString::to_string).collect();
                args.push(format!("firstboot.dns={}", dns.join(",")));
            }
        }
        args.join(" ")
    }
}

/// Reads the `firstboot.*` arguments of a kernel command line. `Ok(None)` when there are none.
pub fn parse_cmdline(cmdline: &str) -> Result<Option<CmdlineConfig>, CmdlineError> {
    let get = |key: &str| {
        cmdline
            .split_ascii_whitespace()
            .filter_map(|a| a.strip_prefix("firstboot.")?.strip_prefix(key)?.strip_prefix('='))
            .next_back()
    };
    let invalid = |key: &'static str, reason: String| CmdlineError::Invalid { key, reason };
    let pin = |needed: &'static str| -> Result<CaPin, CmdlineError> {
        get("pin")
            .ok_or(CmdlineError::Missing("pin", needed))?
            .parse()
            .map_err(|e: crate::pin::PinError| invalid("pin", e.to_string()))
    };
    if let Some(url) = get("config") {
        return Ok(Some(CmdlineConfig::Remote { url: url.to_string(), pin: pin("firstboot.config")? }));
    }
    let Some(servers) = get("server") else {
        return Ok(None);
    };
    let needed = "firstboot.server";
    let token = get("token")
        .map(|t| t.parse().map_err(|e: crate::token::InvalidToken| invalid("token", e.to_string())))
        .transpose()?;
    let role = get("role")
        .ok_or(CmdlineError::Missing("role", needed))?
        .parse()
        .map_err(|e: crate::role::UnknownRole| invalid("role", e.to_string()))?;
    let network = match get("ip") {
        None => None,
        Some(address) => Some(StaticNetwork {
            interface: get("if").map(str::to_string),
            mac: get("mac").map(str::to_string),
            address: address.to_string(),
            gateway: get("gw")
                .map(|g| g.parse().map_err(|_| invalid("gw", format!("'{g}' is not an IP address"))))
                .transpose()?,
            dns: get("dns")
                .map(|d| {
                    d.split(',')
                        .map(|a| a.parse().map_err(|_| invalid("dns", format!("'{a}' is not an IP address"))))
                        .collect::<Result<Vec<_>, _>>()
                })
                .transpose()?
                .unwrap_or_default(),
        }),
    };
    Ok(Some(CmdlineConfig::Inline(Box::new(BootConfig {
        version: BOOT_CONFIG_VERSION,
        servers: servers.split(',').map(str::to_string).collect(),
        ca_pin: pin(needed)?,
        token,
        role,
        network,
        // DNS, NTP and SSH keys do not fit a command line: a payload URL carries them.
        host: HostBasics::default(),
    }))))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> BootConfig {
        BootConfig {
            version: BOOT_CONFIG_VERSION,
            servers: vec!["https://192.168.3.10:9443".into(), "https://192.168.3.11:9443".into()],
            ca_pin: format!("sha256:{}", "ab".repeat(32)).parse().unwrap(),
            token: Some("abcdef.0123456789abcdef".parse().unwrap()),
            role: Role::Worker,
            network: Some(StaticNetwork {
                interface: None,
                mac: Some("52:54:00:03:01:21".into()),
                address: "192.168.3.121/24".into(),
                gateway: Some("192.168.3.1".parse().unwrap()),
                dns: vec!["192.168.3.1".parse().unwrap()],
            }),
            host: HostBasics::default(),
        }
    }

    #[test]
    fn cmdline_roundtrip() {
        let c = sample();
        let line = format!("BOOT_IMAGE=/vmlinuz ro quiet {} console=ttyS0", c.to_cmdline());
        assert_eq!(parse_cmdline(&line).unwrap(), Some(CmdlineConfig::Inline(Box::new(c))));
    }

    #[test]
    fn cmdline_cases() {
        let pin = format!("sha256:{}", "00".repeat(32));
        assert_eq!(parse_cmdline("ro quiet").unwrap(), None);
        assert_eq!(
            parse_cmdline(&format!("firstboot.config=https://x/y firstboot.pin={pin}")).unwrap(),
            Some(CmdlineConfig::Remote { url: "https://x/y".into(), pin: pin.parse().unwrap() })
        );
        assert_eq!(
            parse_cmdline("firstboot.config=https://x/y").unwrap_err(),
            CmdlineError::Missing("pin", "firstboot.config")
        );
        let e = parse_cmdline(&format!(
            "firstboot.server=https://x firstboot.pin={pin} firstboot.token=bad firstboot.role=worker"
        ))
        .unwrap_err();
        assert!(matches!(e, CmdlineError::Invalid { key: "token", .. }), "{e:?}");
        let e = parse_cmdline(&format!(
            "firstboot.server=https://x firstboot.pin={pin} firstboot.token=abcdef.0123456789abcdef firstboot.role=boss"
        ))
        .unwrap_err();
        assert!(e.to_string().contains("master, worker, etcd"), "{e}");
    }

    #[test]
    fn json_rejects_unknown_fields() {
        let mut v = serde_json::to_value(sample()).unwrap();
        v["extra"] = 1.into();
        assert!(serde_json::from_value::<BootConfig>(v).is_err());
    }
}
