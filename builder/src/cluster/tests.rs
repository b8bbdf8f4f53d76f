use super::*;

fn default() -> Cluster {
    Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap()
}

#[test]
fn embedded_default_is_the_reference_cluster() {
    let c = default();
    assert_eq!(c.masters().count(), 3);
    assert_eq!(c.nodes_with(proto::Role::Worker).count(), 3);
    assert_eq!(c.etcd, EtcdTopology::Stacked);
    assert_eq!(c.etcd_members().count(), 3);
    assert_eq!(c.api.vip.to_string(), "192.168.3.110");
    assert_eq!(c.networks.pod_cidr.to_string(), "10.30.0.0/16");
    assert_eq!(c.networks.service_cidr.to_string(), "10.40.0.0/16");
    assert_eq!(c.networks.cluster_dns.to_string(), "10.40.0.10");
    assert_eq!(c.networks.dns_domain, "k8s.org");
    assert_eq!(c.networks.first_service_ip().to_string(), "10.40.0.1");
    assert_eq!(c.networks.pod_network, PodNetwork::Bgp { asn: 64512 });
}

#[test]
fn resolved_spec_round_trips() {
    let c = default();
    let again = Cluster::parse(&c.to_yaml(), "resolved.yaml").unwrap();
    assert_eq!(again, c);
}

/// Replaces `from` (which must occur) in the default manifest and returns the problems.
fn problems(edits: &[(&str, &str)]) -> Vec<Problem> {
    let mut text = DEFAULT_MANIFEST.to_string();
    for (from, to) in edits {
        assert!(text.contains(from), "test edit: {from:?} not in the manifest");
        text = text.replacen(from, to, 1);
    }
    match Cluster::parse(&text, "cluster.yaml") {
        Ok(_) => vec![],
        Err(p) => {
            assert_eq!(p.file, "cluster.yaml");
            p.list
        }
    }
}

#[test]
fn each_problem_names_path_line_and_what_is_valid() {
    // (case, edits, expected path, expected message fragment)
    type Case<'a> = (&'a str, &'a [(&'a str, &'a str)], &'a str, &'a str);
    let cases: &[Case] = &[
        (
            "overlapping pod/service",
            &[("serviceCIDR: 10.40.0.0/16", "serviceCIDR: 10.30.128.0/17")],
            "spec.networks.serviceCIDR",
            "overlaps spec.networks.podCIDR",
        ),
        (
            "dns outside service",
            &[("clusterDNS: 10.40.0.10", "clusterDNS: 10.50.0.10")],
            "spec.networks.clusterDNS",
            "must be inside spec.networks.serviceCIDR (10.40.0.0/16)",
        ),
        (
            "dns is the kubernetes service ip",
            &[("clusterDNS: 10.40.0.10", "clusterDNS: 10.40.0.1")],
            "spec.networks.clusterDNS",
            "reserved for the kubernetes Service",
        ),
        (
            "service cidr too small",
            &[
                ("serviceCIDR: 10.40.0.0/16", "serviceCIDR: 10.40.0.0/29"),
                ("clusterDNS: 10.40.0.10", "clusterDNS: 10.40.0.5"),
            ],
            "spec.networks.serviceCIDR",
            "too small",
        ),
        (
            "host bits",
            &[("podCIDR: 10.30.0.0/16", "podCIDR: 10.30.0.5/16")],
            "spec.networks.podCIDR",
            "the network is 10.30.0.0/16",
        ),
        (
            "even etcd",
            &[("name: k8s-master3\n      role: master", "name: k8s-master3\n      role: worker")],
            "spec.etcd.topology",
            "odd number of members",
        ),
        (
            "vip outside masters' subnet",
            &[("vip: 192.168.3.110", "vip: 192.168.4.110")],
            "spec.apiEndpoint.vip",
            "not in the network 192.168.3.0/24",
        ),
        (
            "vip equals node ip",
            &[("vip: 192.168.3.110", "vip: 192.168.3.121")],
            "spec.apiEndpoint.vip",
            "equals the address of spec.nodes[3]",
        ),
        (
            "duplicate name",
            &[("name: k8s-worker2", "name: k8s-worker1")],
            "spec.nodes[4].name",
            "duplicate: spec.nodes[3]",
        ),
        (
            "duplicate mac",
            &[("52:54:00:03:01:22", "52:54:00:03:01:21")],
            "spec.nodes[4].mac",
            "duplicate: spec.nodes[3]",
        ),
        (
            "duplicate ip",
            &[("192.168.3.122/24", "192.168.3.121/24")],
            "spec.nodes[4].address",
            "duplicate: spec.nodes[3]",
        ),
        ("invalid name", &[("name: k8s-worker3", "name: K8s_Worker3")], "spec.nodes[5].name", "RFC 1123"),
        (
            "unknown field",
            &[("    dnsDomain: k8s.org", "    dnsDomain: k8s.org\n    dnsDomian: typo.org")],
            "spec.networks.dnsDomian",
            "unknown field",
        ),
        (
            "too many nodes for pod cidr",
            &[("nodeCIDRMaskSize: 24", "nodeCIDRMaskSize: 18")],
            "spec.networks.nodeCIDRMaskSize",
            "holds 4 per-node /18 ranges but there are 6 nodes",
        ),
        (
            "node network overlaps pods",
            &[("192.168.3.121/24", "10.30.9.9/24")],
            "spec.nodes[3].address",
            "overlaps spec.networks.podCIDR",
        ),
        ("bad mac", &[("52:54:00:03:01:21", "52:54:00:03:01")], "spec.nodes[3].mac", "six hex octets"),
        ("multicast mac", &[("52:54:00:03:01:21", "01:00:5e:00:00:01")], "spec.nodes[3].mac", "multicast"),
        (
            "gateway outside subnet",
            &[(
                "address: 192.168.3.121/24\n      gateway: 192.168.3.1",
                "address: 192.168.3.121/24\n      gateway: 192.168.9.1",
            )],
            "spec.nodes[3].gateway",
            "outside the node's network",
        ),
        ("unknown role", &[("role: worker", "role: minion")], "spec.nodes[3].role", "master, worker, etcd"),
        (
            "bad policy",
            &[("policy: known-only", "policy: everyone")],
            "spec.enrollment.policy",
            "known-only, approve, auto-worker",
        ),
        (
            "http server",
            &[("https://192.168.3.100:9443", "http://192.168.3.100:9443")],
            "spec.enrollment.servers[0]",
            "https://",
        ),
        (
            "bad ttl",
            &[("joinTokenTTL: 168h", "joinTokenTTL: forever")],
            "spec.enrollment.joinTokenTTL",
            "not a duration",
        ),
        (
            "bad key algorithm",
            &[("keyAlgorithm: ecdsa-p256", "keyAlgorithm: dsa")],
            "spec.pki.keyAlgorithm",
            "ecdsa-p256, rsa-2048",
        ),
        ("wrong kind", &[("kind: Cluster", "kind: Klaster")], "kind", "must be Cluster"),
        (
            "master state in ram",
            &[("state: { master: disk, worker: ram }", "state: { master: ram, worker: ram }")],
            "spec.pxe.state.master",
            "etcd's member data",
        ),
        (
            "unknown pxe state",
            &[("state: { master: disk, worker: ram }", "state: { master: disk, worker: nfs }")],
            "spec.pxe.state.worker",
            "must be disk",
        ),
        (
            "pxe state of no role",
            &[("state: { master: disk, worker: ram }", "state: { master: disk, minion: ram }")],
            "spec.pxe.state.minion",
            "not a role",
        ),
        ("etcd role in stacked", &[("role: worker", "role: etcd")], "spec.nodes[3].role", "topology: external"),
        ("ipv6", &[("podCIDR: 10.30.0.0/16", "podCIDR: fd00::/48")], "spec.networks.podCIDR", "IPv6"),
        ("pod network mode", &[("mode: bgp", "mode: vxlan")], "spec.networks.podNetwork.mode", "bgp"),
        (
            "dns server",
            &[("dnsServers: [192.168.3.1]", "dnsServers: [dns.local]")],
            "spec.hosts.dnsServers[0]",
            "IP address",
        ),
        (
            "search domain",
            &[("searchDomains: [k8s.org]", "searchDomains: [K8S_org]")],
            "spec.hosts.searchDomains[0]",
            "DNS name",
        ),
        (
            "ntp server",
            &[("ntpServers: [192.168.3.1]", "ntpServers: [\"ntp server\"]")],
            "spec.hosts.ntpServers[0]",
            "host name or an IP",
        ),
        (
            "ssh key",
            &[("sshAuthorizedKeys: []", "sshAuthorizedKeys: [\"ssh-dss AAAA me\"]")],
            "spec.hosts.sshAuthorizedKeys[0]",
            "not one of",
        ),
        (
            "flag imgbuild sets",
            &[("components: {}", "components: {apiserver: {extraArgs: {secure-port: 8443}}}")],
            "spec.components.apiserver.extraArgs.secure-port",
            "set by imgbuild",
        ),
        (
            "flag with dashes",
            &[("components: {}", "components: {scheduler: {extraArgs: {--v: 4}}}")],
            "spec.components.scheduler.extraArgs.--v",
            "without the leading '--'",
        ),
        (
            "kube-proxy flags",
            &[("components: {}", "components: {kubeProxy: {extraArgs: {v: 4}}}")],
            "spec.components.kubeProxy.extraArgs",
            "use config",
        ),
        (
            "config field imgbuild sets",
            &[("components: {}", "components: {kubelet: {config: {clusterDNS: [10.0.0.10]}}}")],
            "spec.components.kubelet.config.clusterDNS",
            "set by imgbuild",
        ),
        (
            "config for a flag-only component",
            &[("components: {}", "components: {apiserver: {config: {a: 1}}}")],
            "spec.components.apiserver.config",
            "only kubelet and kubeProxy",
        ),
        (
            "unknown component",
            &[("components: {}", "components: {etcd: {extraArgs: {a: b}}}")],
            "spec.components.etcd",
            "unknown field",
        ),
        ("asn zero", &[("asn: 64512", "asn: 0")], "spec.networks.podNetwork.asn", "1 to 4294967294"),
        ("asn as_trans", &[("asn: 64512", "asn: 23456")], "spec.networks.podNetwork.asn", "AS_TRANS"),
        ("asn too big", &[("asn: 64512", "asn: 4294967295")], "spec.networks.podNetwork.asn", "1 to 4294967294"),
        ("asn with external", &[("mode: bgp", "mode: external")], "spec.networks.podNetwork.asn", "only mode bgp"),
        (
            "old kubernetes",
            &[("versions: {}", "versions: {kubernetes: v1.19.3}")],
            "spec.versions.kubernetes",
            "v1.20.0 or newer",
        ),
    ];
    for (name, edits, path, fragment) in cases {
        let found = problems(edits);
        let p = found
            .iter()
            .find(|p| p.path == *path && p.message.contains(fragment))
            .unwrap_or_else(|| panic!("case {name}: no problem at {path} containing {fragment:?}; got {found:#?}"));
        assert!(p.line.is_some(), "case {name}: no line for {p}");
    }
}

#[test]
fn reports_all_problems_at_once_with_lines() {
    let found = problems(&[
        ("clusterDNS: 10.40.0.10", "clusterDNS: 10.50.0.10"),
        ("52:54:00:03:01:22", "52:54:00:03:01:21"),
        ("    port: 6443", "    port: 6443\n    prot: 1"),
        ("name: k8s-worker3", "name: -bad"),
    ]);
    let paths: Vec<&str> = found.iter().map(|p| p.path.as_str()).collect();
    assert_eq!(found.len(), 4, "{found:#?}");
    for want in ["spec.networks.clusterDNS", "spec.nodes[4].mac", "spec.apiEndpoint.prot", "spec.nodes[5].name"] {
        assert!(paths.contains(&want), "{want} missing from {paths:?}");
    }
    let dns = found.iter().find(|p| p.path == "spec.networks.clusterDNS").unwrap();
    let line = DEFAULT_MANIFEST.lines().position(|l| l.contains("clusterDNS:")).unwrap() + 1;
    assert_eq!(dns.line, Some(line));
    assert_eq!(dns.value.as_deref(), Some("10.50.0.10"));
    let text = Problems { file: "cluster.yaml".into(), list: found }.to_string();
    assert!(text.starts_with("cluster.yaml: 4 problems\n"), "{text}");
    assert!(
        text.contains(&format!("line {line}: spec.networks.clusterDNS = \"10.50.0.10\": must be inside")),
        "{text}"
    );
}

#[test]
fn yaml_syntax_error_names_the_line() {
    let text = DEFAULT_MANIFEST.replacen("  networks:\n", "  networks:\n   - [unclosed\n", 1);
    let p = Cluster::parse(&text, "cluster.yaml").unwrap_err();
    assert_eq!(p.list.len(), 1);
    assert!(p.list[0].line.is_some(), "{p}");
}

#[test]
fn wrong_value_type_is_reported() {
    let found = problems(&[("port: 6443", "port: [1, 2]")]);
    assert!(!found.is_empty());
}

#[test]
fn defaults_fill_optional_fields() {
    let text = "apiVersion: imgbuild.k8s.org/v1alpha1\nkind: Cluster\nmetadata: {name: tiny}\nspec:\n  networks: {podCIDR: 10.244.0.0/16, serviceCIDR: 10.96.0.0/12}\n  apiEndpoint: {vip: 10.0.0.10}\n  enrollment: {servers: ['https://10.0.0.2:9443']}\n  nodes:\n  - {name: m1, role: master, uuid: 4C4C4544-0042-3510-8052-B4C04F4D4E31, address: 10.0.0.11/24}\n";
    let c = Cluster::parse(text, "tiny.yaml").unwrap();
    assert_eq!(c.networks.cluster_dns.to_string(), "10.96.0.10");
    assert_eq!(c.networks.dns_domain, "cluster.local");
    assert_eq!(c.api.port, 6443);
    assert_eq!(c.enrollment.policy, EnrollPolicy::KnownOnly);
    assert_eq!(c.nodes[0].uuid.as_ref().unwrap().as_str(), "4c4c4544-0042-3510-8052-b4c04f4d4e31");
    assert_eq!(c.pki.key_algorithm, KeyAlgorithm::EcdsaP256);
}

proptest::proptest! {
    #[test]
    fn parser_never_panics(s in "\\PC{0,400}") {
        let _ = Cluster::parse(&s, "fuzz.yaml");
    }

    #[test]
    fn mutated_manifest_never_panics(at in 0usize..2000, junk in "[ -~\n]{0,12}") {
        let mut t = DEFAULT_MANIFEST.to_string();
        let at = at.min(t.len());
        if t.is_char_boundary(at) {
            t.insert_str(at, &junk);
            let _ = Cluster::parse(&t, "fuzz.yaml");
        }
    }
}
