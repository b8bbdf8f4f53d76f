//! Checks a raw manifest and turns it into [`Cluster`]. Every check runs even when an earlier one
//! failed, so the operator sees all problems in one go.

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::str::FromStr;
use std::time::Duration;

use ipnet::Ipv4Net;
use proto::Role;

use super::raw::{self, RawCluster, Scalar};
use super::types::*;

/// (field path, value as written, what is wrong / what would be valid)
pub type Found = (String, Option<String>, String);

#[derive(Default)]
pub(super) struct Checker {
    found: Vec<Found>,
}

impl Checker {
    pub(super) fn bad(&mut self, path: impl Into<String>, value: Option<&str>, message: impl Into<String>) {
        self.found.push((path.into(), value.map(str::to_string), message.into()));
    }

    fn required<'a>(&mut self, path: &str, v: &'a Option<String>, what: &str) -> Option<&'a str> {
        if v.is_none() {
            self.bad(path, None, format!("required: {what}"));
        }
        v.as_deref()
    }

    /// Parses an optional value; `None` on absence or (recorded) error.
    pub(super) fn parse<T>(
        &mut self,
        path: &str,
        v: Option<&str>,
        parse: impl FnOnce(&str) -> Result<T, String>,
    ) -> Option<T> {
        let v = v?;
        match parse(v) {
            Ok(t) => Some(t),
            Err(e) => {
                self.bad(path, Some(v), e);
                None
            }
        }
    }
}

fn cidr(s: &str) -> Result<Ipv4Net, String> {
    if s.contains(':') {
        return Err("IPv6 networks are not supported yet; use an IPv4 CIDR like 10.30.0.0/16".into());
    }
    let net: Ipv4Net = s.parse().map_err(|_| "expected an IPv4 CIDR like 10.30.0.0/16".to_string())?;
    if net.network() != net.addr() {
        return Err(format!("host bits are set; the network is {}", net.trunc()));
    }
    Ok(net)
}

fn ipv4(s: &str) -> Result<Ipv4Addr, String> {
    s.parse().map_err(|_| "expected an IPv4 address like 192.168.3.110".to_string())
}

fn host_address(s: &str) -> Result<Ipv4Net, String> {
    let net: Ipv4Net = s
        .parse()
        .map_err(|_| "expected the node's IPv4 address with its subnet's prefix, like 192.168.3.111/24".to_string())?;
    if net.prefix_len() < 31 && (net.addr() == net.network() || net.addr() == net.broadcast()) {
        return Err(format!("{} is the network or broadcast address of {}", net.addr(), net.trunc()));
    }
    Ok(net)
}

fn int(s: &Scalar, lo: i64, hi: i64) -> Result<i64, String> {
    let v = match s {
        Scalar::Int(i) => *i,
        Scalar::Str(t) => t.parse().map_err(|_| format!("expected a whole number from {lo} to {hi}"))?,
    };
    if (lo..=hi).contains(&v) { Ok(v) } else { Err(format!("must be from {lo} to {hi}")) }
}

fn positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() { Err("must be longer than zero".into()) } else { Ok(d) }
}

/// `spec.networks.podNetwork`: its mode, and for `bgp` the AS number (default 64512).
fn pod_network(c: &mut Checker, raw: &raw::RawPodNetwork) -> Option<PodNetwork> {
    let asn_text = raw.asn.as_ref().map(ToString::to_string);
    match raw.mode.as_deref().unwrap_or("bgp") {
        "bgp" => {
            let asn = match &raw.asn {
                None => PodNetwork::DEFAULT_ASN,
                Some(s) => c.parse("spec.networks.podNetwork.asn", asn_text.as_deref(), |_| asn(s))?,
            };
            Some(PodNetwork::Bgp { asn })
        }
        "external" => {
            if raw.asn.is_some() {
                c.bad("spec.networks.podNetwork.asn", asn_text.as_deref(), "only mode bgp takes an AS number");
            }
            Some(PodNetwork::External)
        }
        other => {
            c.bad(
                "spec.networks.podNetwork.mode",
                Some(other),
                "must be bgp (imgbuild's BIRD route reflection) or external (your own network add-on)",
            );
            None
        }
    }
}

/// `spec.pxe`: each role's state mode; roles that run an etcd member never keep it in RAM.
fn pxe(c: &mut Checker, raw: Option<&raw::RawPxe>) -> Pxe {
    let mut pxe = Pxe::default();
    for (key, value) in raw.and_then(|r| r.state.as_ref()).into_iter().flatten() {
        let path = format!("spec.pxe.state.{key}");
        let path = path.as_str();
        let Ok(role) = key.parse::<Role>() else {
            c.bad(path, Some(key), "not a role: master, worker, etcd");
            continue;
        };
        let Some(mode) = PxeState::ALL.into_iter().find(|m| m.as_str() == value) else {
            c.bad(path, Some(value), "must be disk (the labelled partition, else one made on the first empty disk), label (only the labelled partition) or ram");
            continue;
        };
        if mode == PxeState::Ram && role != Role::Worker {
            c.bad(
                path,
                Some(value),
                format!(
                    "a {role} keeps etcd's member data in its state, which RAM loses at every reboot: use disk or label"
                ),
            );
            continue;
        }
        match role {
            Role::Master => pxe.master = mode,
            Role::Worker => pxe.worker = mode,
            Role::Etcd => pxe.etcd = mode,
        }
    }
    pxe
}

/// A BGP AS number: 1 to 4294967294, not one RFC 7300 and RFC 6793 reserve.
fn asn(s: &Scalar) -> Result<u32, String> {
    let v = int(s, 1, 4_294_967_294)
        .map_err(|_| "expected an AS number from 1 to 4294967294 (private: 64512-65534)".to_string())?;
    match v {
        23456 => Err("23456 is AS_TRANS (RFC 6793), not an AS of its own".into()),
        65535 => Err("65535 is reserved (RFC 7300)".into()),
        v => Ok(v as u32),
    }
}

/// Validates a raw manifest; on failure returns every problem found.
pub fn validate(raw: &RawCluster) -> Result<Cluster, Vec<Found>> {
    let mut c = Checker::default();

    // --- header ---------------------------------------------------------------------------------
    match raw.api_version.as_deref() {
        Some(raw::API_VERSION) => {}
        v => c.bad("apiVersion", v, format!("must be {}", raw::API_VERSION)),
    }
    match raw.kind.as_deref() {
        Some(raw::KIND) => {}
        v => c.bad("kind", v, format!("must be {}", raw::KIND)),
    }
    let name = c.required("metadata.name", &raw.metadata.name, "the cluster's name").map(str::to_string);
    if let Some(n) = &name {
        if !is_dns_label(n) {
            c.bad(
                "metadata.name",
                Some(n),
                "must be an RFC 1123 label: 1-63 of a-z, 0-9, '-', starting and ending alphanumeric",
            );
        }
    }
    let spec = &raw.spec;

    // --- versions -------------------------------------------------------------------------------
    let kubernetes = c.parse("spec.versions.kubernetes", spec.versions.kubernetes.as_deref(), KubeVersion::from_str);
    if let Some(v) = kubernetes {
        if (v.major, v.minor) < (1, 20) {
            c.bad("spec.versions.kubernetes", spec.versions.kubernetes.as_deref(), "v1.20.0 or newer is supported");
        }
    }
    let versions =
        Versions { kubernetes, etcd: spec.versions.etcd.clone(), containerd: spec.versions.containerd.clone() };

    // --- networks -------------------------------------------------------------------------------
    let nw = &spec.networks;
    let pod = c.required("spec.networks.podCIDR", &nw.pod_cidr, "the pod network, e.g. 10.30.0.0/16");
    let pod = c.parse("spec.networks.podCIDR", pod, cidr);
    let svc = c.required("spec.networks.serviceCIDR", &nw.service_cidr, "the service network, e.g. 10.40.0.0/16");
    let svc = c.parse("spec.networks.serviceCIDR", svc, cidr);
    if let Some(s) = svc {
        if s.prefix_len() > 28 {
            c.bad(
                "spec.networks.serviceCIDR",
                nw.service_cidr.as_deref(),
                "too small: needs at least 16 addresses (a /28 or larger)",
            );
        } else if s.prefix_len() < 12 {
            c.bad(
                "spec.networks.serviceCIDR",
                nw.service_cidr.as_deref(),
                "too large: kube-apiserver accepts at most a /12",
            );
        }
    }
    if let (Some(p), Some(s)) = (pod, svc) {
        if p.contains(&s.network()) || s.contains(&p.network()) {
            c.bad(
                "spec.networks.serviceCIDR",
                nw.service_cidr.as_deref(),
                format!("overlaps spec.networks.podCIDR ({p})"),
            );
        }
    }
    let dns = c.parse("spec.networks.clusterDNS", nw.cluster_dns.as_deref(), ipv4);
    let dns = match (dns, svc) {
        (Some(d), Some(s)) => {
            let first = Ipv4Addr::from(u32::from(s.network()) + 1);
            if !s.contains(&d) {
                c.bad(
                    "spec.networks.clusterDNS",
                    nw.cluster_dns.as_deref(),
                    format!("must be inside spec.networks.serviceCIDR ({s})"),
                );
            } else if d == s.network() || d == s.broadcast() {
                c.bad(
                    "spec.networks.clusterDNS",
                    nw.cluster_dns.as_deref(),
                    format!("is the network or broadcast address of {s}"),
                );
            } else if d == first {
                c.bad(
                    "spec.networks.clusterDNS",
                    nw.cluster_dns.as_deref(),
                    format!(
                        "{first} is reserved for the kubernetes Service; use e.g. {}",
                        Ipv4Addr::from(u32::from(s.network()) + 10)
                    ),
                );
            }
            Some(d)
        }
        // Default: the tenth service address, as kubeadm does.
        (None, Some(s)) if nw.cluster_dns.is_none() => Some(Ipv4Addr::from(u32::from(s.network()) + 10)),
        _ => None,
    };
    let domain = nw.dns_domain.clone().unwrap_or_else(|| "cluster.local".into());
    if !is_dns_subdomain(&domain) {
        c.bad("spec.networks.dnsDomain", Some(&domain), "must be a DNS name like k8s.org (lowercase RFC 1123 labels)");
    }
    let mask_text = nw.node_cidr_mask_size.as_ref().map(ToString::to_string);
    let node_mask = match &nw.node_cidr_mask_size {
        None => Some(24u8),
        Some(s) => c.parse("spec.networks.nodeCIDRMaskSize", mask_text.as_deref(), |_| int(s, 8, 30).map(|v| v as u8)),
    };
    let pod_network = pod_network(&mut c, &nw.pod_network);
    let node_mask = match (node_mask, pod) {
        (Some(m), Some(p)) if m <= p.prefix_len() => {
            c.bad(
                "spec.networks.nodeCIDRMaskSize",
                mask_text.as_deref().or(Some("24")),
                format!("must be longer than the pod CIDR's prefix /{} so each node gets a share", p.prefix_len()),
            );
            None
        }
        (m, _) => m,
    };

    // --- API endpoint -------------------------------------------------------------------------
    let ae = &spec.api_endpoint;
    let vip = c.required("spec.apiEndpoint.vip", &ae.vip, "the API virtual IP held by keepalived");
    let vip = c.parse("spec.apiEndpoint.vip", vip, ipv4);
    let port_text = ae.port.as_ref().map(ToString::to_string);
    let port = match &ae.port {
        None => Some(6443u16),
        Some(s) => c.parse("spec.apiEndpoint.port", port_text.as_deref(), |_| int(s, 1, 65535).map(|v| v as u16)),
    };
    for (net, field) in [(pod, "podCIDR"), (svc, "serviceCIDR")] {
        if let (Some(v), Some(n)) = (vip, net) {
            if n.contains(&v) {
                c.bad("spec.apiEndpoint.vip", ae.vip.as_deref(), format!("lies inside spec.networks.{field} ({n})"));
            }
        }
    }

    // --- etcd -----------------------------------------------------------------------------------
    let topology = match spec.etcd.topology.as_deref() {
        None | Some("stacked") => Some(EtcdTopology::Stacked),
        Some("external") => Some(EtcdTopology::External),
        Some(t) => {
            c.bad(
                "spec.etcd.topology",
                Some(t),
                "valid topologies: stacked (an etcd member on each master), external (nodes with role etcd)",
            );
            None
        }
    };

    // --- enrollment -----------------------------------------------------------------------------
    let en = &spec.enrollment;
    let mut servers = Vec::new();
    match &en.servers {
        None => c.bad(
            "spec.enrollment.servers",
            None,
            "required: at least one https://HOST:PORT where nodes reach imgbuild serve",
        ),
        Some(list) if list.is_empty() => c.bad("spec.enrollment.servers", None, "needs at least one https://HOST:PORT"),
        Some(list) => {
            for (i, s) in list.iter().enumerate() {
                if let Some(u) = c.parse(&format!("spec.enrollment.servers[{i}]"), Some(s), ServerUrl::from_str) {
                    servers.push(u);
                }
            }
        }
    }
    let policy = match en.policy.as_deref() {
        None => Some(EnrollPolicy::KnownOnly),
        p => c.parse("spec.enrollment.policy", p, EnrollPolicy::from_str),
    };
    let ttl = |c: &mut Checker, field: &str, v: &Option<String>| match v {
        None => Some(Duration::from_secs(24 * 3600)),
        Some(s) => c.parse(&format!("spec.enrollment.{field}"), Some(s), positive_duration),
    };
    let enroll_ttl = ttl(&mut c, "enrollmentTokenTTL", &en.enrollment_token_ttl);
    let join_ttl = ttl(&mut c, "joinTokenTTL", &en.join_token_ttl);

    // --- PKI ------------------------------------------------------------------------------------
    let pk = &spec.pki;
    let key_algorithm = match pk.key_algorithm.as_deref() {
        None => Some(KeyAlgorithm::EcdsaP256),
        a => c.parse("spec.pki.keyAlgorithm", a, KeyAlgorithm::from_str),
    };
    let validity = |c: &mut Checker, field: &str, v: &Option<String>, default_days: u64| match v {
        None => Some(Duration::from_secs(default_days * 86400)),
        Some(s) => c.parse(&format!("spec.pki.{field}"), Some(s), positive_duration),
    };
    let ca_validity = validity(&mut c, "caValidity", &pk.ca_validity, 3650);
    let cert_validity = validity(&mut c, "certValidity", &pk.cert_validity, 365);
    if let (Some(ca), Some(leaf)) = (ca_validity, cert_validity) {
        if leaf > ca {
            c.bad(
                "spec.pki.certValidity",
                pk.cert_validity.as_deref(),
                "must not exceed spec.pki.caValidity (a certificate cannot outlive its CA)",
            );
        }
    }

    // --- hosts and components ---------------------------------------------------------------------
    let hosts = super::hosts::hosts(&mut c, &spec.hosts);
    let components = super::hosts::components(&mut c, &spec.components);
    let pxe = pxe(&mut c, spec.pxe.as_ref());

    // --- nodes ----------------------------------------------------------------------------------
    let mut nodes = Vec::new();
    let mut names: HashMap<String, usize> = HashMap::new();
    let mut macs: HashMap<String, usize> = HashMap::new();
    let mut uuids: HashMap<String, usize> = HashMap::new();
    let mut ips: HashMap<Ipv4Addr, usize> = HashMap::new();
    if spec.nodes.is_empty() {
        c.bad("spec.nodes", None, "needs at least one master");
    }
    for (i, n) in spec.nodes.iter().enumerate() {
        let at = |f: &str| format!("spec.nodes[{i}].{f}");
        let name = c.required(&at("name"), &n.name, "the node's name (also its hostname)");
        if let Some(name) = name {
            if !is_dns_label(name) {
                c.bad(
                    at("name"),
                    Some(name),
                    "must be an RFC 1123 label: 1-63 of a-z, 0-9, '-', starting and ending alphanumeric",
                );
            } else if let Some(first) = names.insert(name.to_string(), i) {
                c.bad(at("name"), Some(name), format!("duplicate: spec.nodes[{first}] has the same name"));
            }
        }
        let role_text = c.required(&at("role"), &n.role, "master, worker or etcd");
        let role = c.parse(&at("role"), role_text, |r| Role::from_str(r).map_err(|e| e.to_string()));
        let mac = c.parse(&at("mac"), n.mac.as_deref(), Mac::from_str);
        if let Some(m) = &mac {
            if let Some(first) = macs.insert(m.to_string(), i) {
                c.bad(at("mac"), n.mac.as_deref(), format!("duplicate: spec.nodes[{first}] has the same MAC"));
            }
        }
        let uuid = c.parse(&at("uuid"), n.uuid.as_deref(), SmbiosUuid::from_str);
        if let Some(u) = &uuid {
            if let Some(first) = uuids.insert(u.to_string(), i) {
                c.bad(at("uuid"), n.uuid.as_deref(), format!("duplicate: spec.nodes[{first}] has the same UUID"));
            }
        }
        if n.mac.is_none() && n.uuid.is_none() {
            c.bad(at("mac"), None, "a node needs a mac or a uuid (SMBIOS) so its machine can be recognised");
        }
        let addr_text = c.required(&at("address"), &n.address, "IPv4 address with prefix, e.g. 192.168.3.111/24");
        let address = c.parse(&at("address"), addr_text, host_address);
        if let Some(a) = address {
            if let Some(first) = ips.insert(a.addr(), i) {
                c.bad(at("address"), addr_text, format!("duplicate: spec.nodes[{first}] has the same IP"));
            }
            for (net, field) in [(pod, "podCIDR"), (svc, "serviceCIDR")] {
                if let Some(net) = net {
                    if net.contains(&a.addr()) || a.trunc().contains(&net.network()) {
                        c.bad(
                            at("address"),
                            addr_text,
                            format!("node network {} overlaps spec.networks.{field} ({net})", a.trunc()),
                        );
                    }
                }
            }
            if vip == Some(a.addr()) {
                c.bad(
                    "spec.apiEndpoint.vip",
                    ae.vip.as_deref(),
                    format!("equals the address of spec.nodes[{i}]; the VIP must be a free address"),
                );
            }
        }
        let gateway = c.parse(&at("gateway"), n.gateway.as_deref(), ipv4);
        if let (Some(g), Some(a)) = (gateway, address) {
            if !a.trunc().contains(&g) {
                c.bad(at("gateway"), n.gateway.as_deref(), format!("is outside the node's network {}", a.trunc()));
            } else if g == a.addr() {
                c.bad(at("gateway"), n.gateway.as_deref(), "is the node's own address");
            }
        }
        if let (Some(Role::Master), Some(v), Some(a)) = (role, vip, address) {
            if !a.trunc().contains(&v) {
                c.bad("spec.apiEndpoint.vip", ae.vip.as_deref(), format!("is not in the network {} of master spec.nodes[{i}]; keepalived can only hold a VIP on the masters' subnet", a.trunc()));
            } else if v == a.network() || v == a.broadcast() {
                c.bad(
                    "spec.apiEndpoint.vip",
                    ae.vip.as_deref(),
                    format!("is the network or broadcast address of {}", a.trunc()),
                );
            }
        }
        if let (Some(Role::Etcd), Some(EtcdTopology::Stacked)) = (role, topology) {
            c.bad(
                at("role"),
                role_text,
                "etcd nodes need spec.etcd.topology: external (stacked etcd runs on the masters)",
            );
        }
        let ssh_authorized_keys =
            super::hosts::ssh_keys(&mut c, &at("sshAuthorizedKeys"), n.ssh_authorized_keys.as_ref());
        if let (Some(name), Some(role), Some(address)) = (name, role, address) {
            nodes.push(Node { name: name.to_string(), role, mac, uuid, address, gateway, ssh_authorized_keys });
        }
    }
    if !spec.nodes.iter().any(|n| n.role.as_deref() == Some("master")) && !spec.nodes.is_empty() {
        c.bad("spec.nodes", None, "needs at least one node with role master");
    }
    if let (Some(p), Some(m)) = (pod, node_mask) {
        let capacity = 1u64 << (m - p.prefix_len());
        if spec.nodes.len() as u64 > capacity {
            c.bad("spec.networks.nodeCIDRMaskSize", mask_text.as_deref().or(Some("24")), format!("{p} holds {capacity} per-node /{m} ranges but there are {} nodes; use a larger pod CIDR or a longer mask", spec.nodes.len()));
        }
    }
    if let Some(t) = topology {
        let member_role = if t == EtcdTopology::Stacked { "master" } else { "etcd" };
        let members = spec.nodes.iter().filter(|n| n.role.as_deref() == Some(member_role)).count();
        if members == 0 || members % 2 == 0 {
            c.bad(
                "spec.etcd.topology",
                Some(t.as_str()),
                format!("etcd needs an odd number of members for quorum; there are {members} {member_role} nodes"),
            );
        }
    }

    if !c.found.is_empty() {
        return Err(c.found);
    }
    // Every Option below is Some: a None would have recorded a problem above.
    let missing = || vec![("(internal)".to_string(), None, "validation incomplete".to_string())];
    let (Some(name), Some(pod), Some(svc), Some(dns), Some(node_mask), Some(vip), Some(port), Some(etcd)) =
        (name, pod, svc, dns, node_mask, vip, port, topology)
    else {
        return Err(missing());
    };
    let (Some(policy), Some(enrollment_token_ttl), Some(join_token_ttl)) = (policy, enroll_ttl, join_ttl) else {
        return Err(missing());
    };
    let (Some(key_algorithm), Some(ca_validity), Some(cert_validity), Some(pod_network)) =
        (key_algorithm, ca_validity, cert_validity, pod_network)
    else {
        return Err(missing());
    };
    Ok(Cluster {
        name,
        versions,
        networks: Networks {
            pod_cidr: pod,
            service_cidr: svc,
            cluster_dns: dns,
            dns_domain: domain,
            node_cidr_mask: node_mask,
            pod_network,
        },
        api: ApiEndpoint { vip, port },
        etcd,
        enrollment: Enrollment { servers, policy, enrollment_token_ttl, join_token_ttl },
        pki: PkiSettings { key_algorithm, ca_validity, cert_validity },
        hosts,
        components,
        pxe,
        nodes,
    })
}
