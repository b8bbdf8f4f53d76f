//! `imgbuild pxe dnsmasq`: a dnsmasq configuration for the nodes' network, so that PXE firmware
//! chains to iPXE and iPXE to `imgbuild serve --boot-listen`'s scripts (see `serve::boot`): DHCP
//! with the inventory's MACs and addresses (and, optionally, a dynamic range for machines that
//! enroll by policy), the routers, DNS and NTP servers of the manifest, TFTP of Debian's iPXE
//! builds for BIOS and UEFI firmware, and per-node iPXE scripts by MAC. No credential is in any
//! of it: PXE-booted machines enroll with the operator's approval (docs/security.md).

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::cluster::Cluster;
use crate::templates;

/// Where Debian's `ipxe` package puts `undionly.kpxe` and `ipxe.efi`.
pub const DEBIAN_IPXE_DIR: &str = "/usr/lib/ipxe";

/// What the dnsmasq configuration is made for, besides the cluster.
pub struct DnsmasqOptions {
    /// `http://HOST:PORT/boot`: where `imgbuild serve --boot-listen` serves (without a role).
    pub boot: String,
    /// The interface dnsmasq serves on (all of them when `None`).
    pub interface: Option<String>,
    /// `FIRST,LAST` addresses for machines outside the inventory; none: they get no address.
    pub dynamic: Option<(Ipv4Addr, Ipv4Addr)>,
    /// Where the iPXE binaries are (TFTP root).
    pub tftp_root: String,
}

/// The configuration text.
#[expect(clippy::expect_used, reason = "an embedded template given every variable it uses; the pxe tests render it")]
pub fn dnsmasq(cluster: &Cluster, o: &DnsmasqOptions) -> String {
    let tag = |name: &str| format!("node-{name}");
    let nodes: Vec<Value> = cluster
        .nodes
        .iter()
        .filter_map(|n| {
            let mac = n.mac.as_ref()?.to_string();
            Some(json!({
                "name": n.name, "ip": n.ip().to_string(), "tag": tag(&n.name),
                "mac_path": mac.replace(':', "-"), "mac": mac,
            }))
        })
        .collect();
    let routers: Vec<Value> = cluster
        .nodes
        .iter()
        .filter(|n| n.mac.is_some())
        .filter_map(|n| Some(json!({"tag": tag(&n.name), "gateway": n.gateway?.to_string()})))
        .collect();
    let mut networks: Vec<_> = cluster.nodes.iter().map(|n| n.address.trunc()).collect();
    networks.sort();
    networks.dedup();
    let networks: Vec<Value> = networks
        .iter()
        .map(|net| json!({"network": net.network().to_string(), "netmask": net.netmask().to_string()}))
        .collect();
    let join = |v: Vec<String>| v.join(",");
    let h = &cluster.hosts;
    templates::render(
        "dnsmasq.conf",
        json!({
            "cluster": cluster.name, "boot": o.boot.trim_end_matches('/'), "interface": o.interface,
            "networks": networks, "nodes": nodes, "routers": routers,
            "dynamic": o.dynamic.map(|(a, b)| format!("{a},{b}")),
            "others_role": "worker",
            "dns": join(h.dns_servers.iter().map(ToString::to_string).collect()),
            "search": join(h.search_domains.clone()),
            "ntp": join(h.ntp_servers.iter().filter(|s| s.parse::<std::net::IpAddr>().is_ok()).cloned().collect()),
            "tftp_root": o.tftp_root,
        }),
    )
    .expect("dnsmasq template renders")
}
