//! `imgbuild pxe dnsmasq`: the configuration for the reference cluster (golden), which dnsmasq's
//! own parser accepts, and the command's refusals.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;

use support::*;

#[test]
fn dnsmasq_config_for_the_reference_cluster() {
    let dnsmasq = require_tool("dnsmasq", "dnsmasq-base");
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    let run = |extra: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_imgbuild"))
            .arg("--state")
            .arg(&st.root)
            .args(["pxe", "dnsmasq", "--interface", "br0"])
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&["--dynamic-range", "192.168.3.150,192.168.3.199"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    golden("pxe/dnsmasq.conf", &text);
    for want in [
        "dhcp-host=52:54:00:03:01:11,set:node-k8s-master1,192.168.3.111,k8s-master1",
        "dhcp-boot=tag:ipxe,tag:node-k8s-master1,http://192.168.3.100:8080/boot/mac/52-54-00-03-01-11.ipxe",
        "dhcp-boot=tag:ipxe,tag:others,http://192.168.3.100:8080/boot/worker.ipxe",
        "dhcp-boot=tag:!ipxe,tag:efi64,ipxe.efi",
        "dhcp-option=option:dns-server,192.168.3.1",
    ] {
        assert!(text.lines().any(|l| l == want), "no line {want}");
    }
    // dnsmasq's own parser: every option and its arguments valid.
    let file = dir.path().join("dnsmasq.conf");
    std::fs::write(&file, &text).unwrap();
    let check = Command::new(&dnsmasq).arg("--test").arg(format!("--conf-file={}", file.display())).output().unwrap();
    assert!(check.status.success(), "dnsmasq --test: {}", String::from_utf8_lossy(&check.stderr));

    // --root http: every script URL asks for the HTTP root form.
    let out = run(&["--dynamic-range", "192.168.3.150,192.168.3.199", "--root", "http"]);
    let http = String::from_utf8(out.stdout).unwrap();
    let scripts: Vec<&str> = http.lines().filter(|l| l.starts_with("dhcp-boot=tag:ipxe,")).collect();
    assert_eq!(scripts.len(), 7, "{http}");
    assert!(scripts.iter().all(|l| l.ends_with(".ipxe?root=http")), "{scripts:?}");

    // A dynamic range over an inventory address, or outside every node network: refused, named.
    for (range, want) in [
        ("192.168.3.100,192.168.3.130", "holds 192.168.3.111, the address of k8s-master1"),
        ("10.9.0.10,10.9.0.20", "not inside any node network"),
        ("192.168.3.199,192.168.3.150", "FIRST,LAST"),
    ] {
        let out = run(&["--dynamic-range", range]);
        assert_eq!(out.status.code(), Some(3), "{range}");
        let e = String::from_utf8_lossy(&out.stderr);
        assert!(e.contains(want), "{range}: {e}");
    }
}
