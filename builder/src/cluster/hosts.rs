//! `spec.hosts` (what each node's operating system gets: DNS, NTP, operators' SSH keys) and
//! `spec.components` (extra flags and configuration for the Kubernetes components), with their
//! checks. A flag or configuration key that imgbuild itself sets is a conflict, named as such:
//! which ones those are is read from the very templates that set them, so the two cannot drift.

use std::collections::BTreeMap;
use std::net::IpAddr;

use base64::Engine;
use serde_json::Value;

use super::raw::{RawComponent, RawComponents, RawHosts};
use super::types::is_dns_subdomain;
use super::validate::Checker;

/// `spec.hosts`: settings of every node's operating system.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hosts {
    /// DNS servers (systemd-resolved), in order, on DHCP and static nodes alike.
    pub dns_servers: Vec<IpAddr>,
    /// DNS search domains.
    pub search_domains: Vec<String>,
    /// NTP servers (systemd-timesyncd), names or addresses.
    pub ntp_servers: Vec<String>,
    /// OpenSSH public keys for root on every node: break-glass access to immutable nodes.
    pub ssh_authorized_keys: Vec<String>,
}

/// Extra `--flag=value` arguments of a component, flag names without the dashes.
pub type Flags = BTreeMap<String, String>;

/// `spec.components`: what operators add to the Kubernetes components' configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Components {
    /// kube-apiserver's extra flags (e.g. OIDC: `oidc-issuer-url`, `oidc-client-id`).
    pub apiserver: Flags,
    /// kube-controller-manager's extra flags.
    pub controller_manager: Flags,
    /// kube-scheduler's extra flags.
    pub scheduler: Flags,
    /// The kubelet's extra flags.
    pub kubelet: Flags,
    /// Extra top-level fields of the `KubeletConfiguration`.
    pub kubelet_config: serde_json::Map<String, Value>,
    /// Extra top-level fields of the `KubeProxyConfiguration` (kube-proxy takes no flags besides
    /// its config file).
    pub kube_proxy_config: serde_json::Map<String, Value>,
}

/// A component operators may configure: its manifest name, its unit template (whose flags are
/// imgbuild's), and its configuration template (whose top-level fields are imgbuild's).
struct Component {
    field: &'static str,
    unit: Option<&'static str>,
    config: Option<&'static str>,
}

const COMPONENTS: [Component; 5] = [
    Component { field: "apiserver", unit: Some("node/kube-apiserver.service"), config: None },
    Component { field: "controllerManager", unit: Some("node/kube-controller-manager.service"), config: None },
    Component { field: "scheduler", unit: Some("node/kube-scheduler.service"), config: None },
    Component { field: "kubelet", unit: Some("node/kubelet.service"), config: Some("node/kubelet-config.yaml") },
    Component { field: "kubeProxy", unit: None, config: Some("node/kube-proxy-config.yaml") },
];

/// The flags a unit template passes (`--name=`), which extra flags may not repeat.
fn template_flags(template: &str) -> Vec<String> {
    let source = crate::templates::source(template).unwrap_or_default();
    let mut flags: Vec<String> = source
        .split("--")
        .skip(1)
        .filter_map(|rest| {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '-').collect();
            (!name.is_empty()).then_some(name)
        })
        .collect();
    flags.sort();
    flags.dedup();
    flags
}

/// The top-level fields a configuration template sets.
fn template_fields(template: &str) -> Vec<String> {
    let source = crate::templates::source(template).unwrap_or_default();
    source
        .lines()
        .filter(|l| l.starts_with(|c: char| c.is_ascii_alphabetic()))
        .filter_map(|l| l.split_once(':').map(|(k, _)| k.to_string()))
        .collect()
}

/// An OpenSSH public key line (`TYPE BASE64 [COMMENT]`), checked: a known type whose base64 blob
/// names that type, as `ssh-keygen -l` would read it. Options before the type are not taken.
fn ssh_key(s: &str) -> Result<String, String> {
    const TYPES: [&str; 7] = [
        "ssh-ed25519",
        "ssh-rsa",
        "ecdsa-sha2-nistp256",
        "ecdsa-sha2-nistp384",
        "ecdsa-sha2-nistp521",
        "sk-ssh-ed25519@openssh.com",
        "sk-ecdsa-sha2-nistp256@openssh.com",
    ];
    let line = s.trim();
    if line.contains(['\n', '\r']) {
        return Err("one key per entry, on one line".into());
    }
    let mut parts = line.split_whitespace();
    let (Some(kind), Some(blob)) = (parts.next(), parts.next()) else {
        return Err("expected an OpenSSH public key: TYPE BASE64 [COMMENT], e.g. ssh-ed25519 AAAAC3... ops@site".into());
    };
    if !TYPES.contains(&kind) {
        return Err(format!(
            "key type '{kind}' is not one of {} (options before the key are not taken)",
            TYPES.join(", ")
        ));
    }
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(blob)
        .map_err(|_| "the key's second field is not base64".to_string())?;
    // The blob starts with the type as an SSH string: a 4-byte big-endian length, then the name.
    let named = bytes.get(..4).map(|l| u32::from_be_bytes([l[0], l[1], l[2], l[3]]) as usize);
    if named.and_then(|n| bytes.get(4..4 + n)) != Some(kind.as_bytes()) {
        return Err(format!("the key's blob is not a {kind} key (truncated or pasted from another key)"));
    }
    Ok(line.to_string())
}

/// The keys in `raw`, each checked, under `path`.
pub(super) fn ssh_keys(c: &mut Checker, path: &str, raw: Option<&Vec<String>>) -> Vec<String> {
    let mut keys = Vec::new();
    for (i, k) in raw.into_iter().flatten().enumerate() {
        if let Some(k) = c.parse(&format!("{path}[{i}]"), Some(k), ssh_key) {
            keys.push(k);
        }
    }
    keys
}

/// `spec.hosts`, checked.
pub(super) fn hosts(c: &mut Checker, raw: &RawHosts) -> Hosts {
    let mut h = Hosts::default();
    for (i, s) in raw.dns_servers.iter().flatten().enumerate() {
        let path = format!("spec.hosts.dnsServers[{i}]");
        if let Some(ip) = c.parse(&path, Some(s), |s| {
            s.parse::<IpAddr>().map_err(|_| "expected an IP address, e.g. 192.168.3.1".to_string())
        }) {
            h.dns_servers.push(ip);
        }
    }
    for (i, s) in raw.search_domains.iter().flatten().enumerate() {
        if is_dns_subdomain(s) && !s.is_empty() {
            h.search_domains.push(s.clone());
        } else {
            c.bad(format!("spec.hosts.searchDomains[{i}]"), Some(s), "must be a DNS name like k8s.org");
        }
    }
    for (i, s) in raw.ntp_servers.iter().flatten().enumerate() {
        if s.parse::<IpAddr>().is_ok() || (is_dns_subdomain(s) && !s.is_empty()) {
            h.ntp_servers.push(s.clone());
        } else {
            c.bad(
                format!("spec.hosts.ntpServers[{i}]"),
                Some(s),
                "must be a host name or an IP address, e.g. ntp.example.org",
            );
        }
    }
    h.ssh_authorized_keys = ssh_keys(c, "spec.hosts.sshAuthorizedKeys", raw.ssh_authorized_keys.as_ref());
    h
}

/// `spec.components`, checked: flag names and values, configuration fields, and no conflict with
/// what imgbuild sets.
pub(super) fn components(c: &mut Checker, raw: &RawComponents) -> Components {
    let mut out = Components::default();
    let raws: [&Option<RawComponent>; 5] =
        [&raw.apiserver, &raw.controller_manager, &raw.scheduler, &raw.kubelet, &raw.kube_proxy];
    for (spec, raw) in COMPONENTS.iter().zip(raws) {
        let Some(raw) = raw else { continue };
        let at = format!("spec.components.{}", spec.field);
        let mut flags = Flags::new();
        if let Some(args) = &raw.extra_args {
            let Some(unit) = spec.unit else {
                c.bad(
                    format!("{at}.extraArgs"),
                    None,
                    "kube-proxy takes its settings from its config file: use config",
                );
                continue;
            };
            let ours = template_flags(unit);
            for (name, value) in args {
                let path = format!("{at}.extraArgs.{name}");
                let valid = !name.is_empty()
                    && name.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
                if !valid {
                    c.bad(path, Some(name), "a flag name: lowercase letters, digits and '-', without the leading '--'");
                    continue;
                }
                if ours.contains(name) {
                    c.bad(path, Some(name), format!("--{name} is set by imgbuild ({unit}); it cannot be overridden"));
                    continue;
                }
                let value = match value {
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => {
                        c.bad(path, None, "the value must be a string, number or boolean");
                        continue;
                    }
                };
                if value.contains(['\n', '\r']) {
                    c.bad(path, Some(&value), "the value must be on one line");
                    continue;
                }
                flags.insert(name.clone(), value);
            }
        }
        let mut config = serde_json::Map::new();
        if let Some(extra) = &raw.config {
            let Some(template) = spec.config else {
                c.bad(format!("{at}.config"), None, "only kubelet and kubeProxy take config; use extraArgs");
                continue;
            };
            let Value::Object(map) = extra else {
                c.bad(format!("{at}.config"), None, "must be a mapping of configuration fields");
                continue;
            };
            let ours = template_fields(template);
            for (field, v) in map {
                if ours.contains(field) {
                    c.bad(
                        format!("{at}.config.{field}"),
                        Some(field),
                        format!("{field} is set by imgbuild ({template}); it cannot be overridden"),
                    );
                } else {
                    config.insert(field.clone(), v.clone());
                }
            }
        }
        match spec.field {
            "apiserver" => out.apiserver = flags,
            "controllerManager" => out.controller_manager = flags,
            "scheduler" => out.scheduler = flags,
            "kubelet" => {
                out.kubelet = flags;
                out.kubelet_config = config;
            }
            _ => out.kube_proxy_config = config,
        }
    }
    out
}

impl Hosts {
    /// The resolved spec's form.
    pub(super) fn to_raw(&self) -> RawHosts {
        let some = |v: Vec<String>| (!v.is_empty()).then_some(v);
        RawHosts {
            dns_servers: some(self.dns_servers.iter().map(ToString::to_string).collect()),
            search_domains: some(self.search_domains.clone()),
            ntp_servers: some(self.ntp_servers.clone()),
            ssh_authorized_keys: some(self.ssh_authorized_keys.clone()),
        }
    }
}

impl Components {
    /// The resolved spec's form.
    pub(super) fn to_raw(&self) -> RawComponents {
        let part = |flags: &Flags, config: Option<&serde_json::Map<String, Value>>| {
            let extra_args =
                (!flags.is_empty()).then(|| flags.iter().map(|(k, v)| (k.clone(), Value::String(v.clone()))).collect());
            let config = config.filter(|c| !c.is_empty()).map(|c| Value::Object(c.clone()));
            (extra_args.is_some() || config.is_some()).then_some(RawComponent { extra_args, config })
        };
        RawComponents {
            apiserver: part(&self.apiserver, None),
            controller_manager: part(&self.controller_manager, None),
            scheduler: part(&self.scheduler, None),
            kubelet: part(&self.kubelet, Some(&self.kubelet_config)),
            kube_proxy: part(&Flags::new(), Some(&self.kube_proxy_config)),
        }
    }
}

/// Flags as systemd `ExecStart=` words: `"--name=value"`, quoted, with `%` and `$` escaped so
/// systemd passes them through as written.
pub fn exec_words(flags: &Flags) -> Vec<String> {
    flags
        .iter()
        .map(|(k, v)| {
            let word =
                format!("--{k}={v}").replace('\\', "\\\\").replace('"', "\\\"").replace('%', "%%").replace('$', "$$");
            format!("\"{word}\"")
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_keys_are_checked() {
        // A real ed25519 public key's blob (made with ssh-keygen).
        let good = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGggOPvVLpf1bZvT1Vphrs6l+wf2RuIKkOKaF06sAHvT ops@site";
        assert_eq!(ssh_key(good).unwrap(), good);
        assert!(
            ssh_key("ssh-rsa AAAAC3NzaC1lZDI1NTE5AAAAIGggOPvVLpf1bZvT1Vphrs6l+wf2RuIKkOKaF06sAHvT")
                .unwrap_err()
                .contains("not a ssh-rsa key")
        );
        assert!(ssh_key("ssh-dss AAAA").unwrap_err().contains("not one of"));
        assert!(ssh_key("from=\"10.0.0.1\" ssh-ed25519 AAAA").unwrap_err().contains("options"));
        assert!(ssh_key("ssh-ed25519 !!!").unwrap_err().contains("base64"));
        assert!(ssh_key("ssh-ed25519").unwrap_err().contains("TYPE BASE64"));
    }

    #[test]
    fn imgbuild_s_own_flags_and_fields_come_from_the_templates() {
        let api = template_flags("node/kube-apiserver.service");
        assert!(api.contains(&"secure-port".to_string()) && api.contains(&"etcd-servers".to_string()));
        assert!(!api.contains(&"oidc-issuer-url".to_string()));
        let kubelet = template_fields("node/kubelet-config.yaml");
        assert!(kubelet.contains(&"clusterDNS".to_string()) && kubelet.contains(&"kind".to_string()));
    }

    #[test]
    fn exec_words_survive_systemd() {
        let f = Flags::from([("oidc-username-prefix".to_string(), "oidc:%u $HOME \"x\"".to_string())]);
        assert_eq!(exec_words(&f), vec![r#""--oidc-username-prefix=oidc:%%u $$HOME \"x\"""#.to_string()]);
    }
}
