//! First-boot payloads: golden files, each format checked by its own consumer (ignition-config's
//! parser, cloud-init's schema validator, firstboot), no key material anywhere, determinism, and
//! the PXE path through `imgbuild serve`.

// Tests panic on purpose: a failed unwrap is a failed test; this crate is not public API.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use firstboot::agent::source::{decode_guestinfo, parse_payload};
use imgbuild::cluster::{Cluster, DEFAULT_MANIFEST};
use imgbuild::payload::{self, Encoding, Target};
use proto::Role;
use proto::bootcfg::{BOOT_CONFIG_VERSION, BootConfig};
use support::*;

/// A payload with fixed values, so that golden files do not change with each state.
fn fixed(cluster: &Cluster, target: &Target<'_>) -> BootConfig {
    BootConfig {
        version: BOOT_CONFIG_VERSION,
        servers: cluster.enrollment.servers.iter().map(ToString::to_string).collect(),
        ca_pin: format!("sha256:{}", "5e".repeat(32)).parse().unwrap(),
        token: Some("abcdef.0123456789abcdef".parse().unwrap()),
        role: target.role,
        network: target.node.map(|n| proto::bootcfg::StaticNetwork {
            interface: None,
            mac: n.mac.as_ref().map(ToString::to_string),
            address: n.address.to_string(),
            gateway: n.gateway.map(Into::into),
            dns: vec![],
        }),
        host: payload::host_basics(cluster, target.node),
    }
}

#[test]
fn golden_payloads_and_their_consumers() {
    let cluster = Cluster::parse(DEFAULT_MANIFEST, "cluster.yaml").unwrap();
    let w1 = cluster.node("k8s-worker1").unwrap();
    for (label, target) in [
        ("worker", Target { role: Role::Worker, node: None }),
        ("k8s-worker1", Target { role: Role::Worker, node: Some(w1) }),
    ] {
        let cfg = fixed(&cluster, &target);
        for version in payload::IGNITION_VERSIONS {
            let ign = payload::ignition(&cfg, version).unwrap();
            let (_, warnings) = ignition_config::Config::parse_str(&ign).unwrap_or_else(|e| panic!("{version}: {e}"));
            assert!(warnings.is_empty(), "Ignition {version}: {warnings:?}");
            assert_eq!(parse_payload(&ign, "test").unwrap(), cfg, "firstboot reads Ignition {version}");
            if *version == "3.6.0" || *version == "3.0.0" {
                golden(&format!("payload/{label}.ign-{version}.json"), &ign);
            }
        }
        let cc = payload::cloud_config(&cfg, &cluster, &target);
        golden(&format!("payload/{label}.cloud-config.yaml"), &cc);
        assert_eq!(parse_payload(&cc, "test").unwrap(), cfg, "firstboot reads the cloud-config");
        // cloud-init's own validator.
        let file = tempfile::NamedTempFile::new().unwrap();
        std::fs::write(file.path(), &cc).unwrap();
        let out = Command::new(require_tool("cloud-init", "cloud-init"))
            .args(["schema", "--config-file"])
            .arg(file.path())
            .output()
            .unwrap();
        let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success() && text.contains("Valid"), "cloud-init schema: {text}");

        for encoding in [Encoding::Base64, Encoding::GzipBase64] {
            let ign = payload::ignition(&cfg, "3.6.0").unwrap();
            let pairs = payload::guestinfo(&ign, &cc, encoding, payload::GUESTINFO_LIMIT).unwrap();
            let get = |k: &str| pairs.iter().find(|(key, _)| key == k).map(|(_, v)| v.clone()).unwrap();
            for key in ["guestinfo.ignition.config.data", "guestinfo.userdata"] {
                let text = decode_guestinfo(&get(key), Some(&get(&format!("{key}.encoding")))).unwrap();
                assert_eq!(parse_payload(&text, key).unwrap(), cfg, "{key} {encoding:?}");
            }
            golden(
                &format!("payload/{label}.guestinfo-{}.txt", encoding.as_str().replace('+', "-")),
                &payload::guestinfo_text(&pairs, "k8s-worker-vm"),
            );
            let e = payload::guestinfo(&ign, &cc, encoding, 100).unwrap_err();
            assert!(e.to_string().contains("over the 100-byte guestinfo limit"), "{e}");
        }
        let base = "http://192.168.3.100:8080/boot/worker";
        let ipxe = payload::ipxe(&cfg, &cluster, &target, base, imgbuild::pxe::PxeRoot::Initrd);
        golden(&format!("payload/{label}.ipxe"), &ipxe);
        let http = payload::ipxe(&cfg, &cluster, &target, base, imgbuild::pxe::PxeRoot::Http);
        golden(&format!("payload/{label}.http.ipxe"), &http);
        assert!(ipxe.contains(&format!("firstboot.pin={}", cfg.ca_pin)));
        let token = cfg.token.as_ref().unwrap().expose();
        assert!(!ipxe.contains(&token), "the iPXE script carries the payload's location, not its credential");
    }
    // The OVA declares the same vApp properties the guestinfo payload sets.
    let ovf = imgbuild::templates::render("ova.ovf", serde_json::json!({"name": "n", "role": "worker", "image": "i", "description": "d", "vmdk": "d.vmdk", "vmdk_size": 1, "capacity": 2, "guest_os": "g", "cpus": 2, "memory_mib": 2048})).unwrap();
    for key in [
        "guestinfo.ignition.config.data",
        "guestinfo.ignition.config.data.encoding",
        "guestinfo.userdata",
        "guestinfo.userdata.encoding",
    ] {
        assert!(ovf.contains(&format!("ovf:key=\"{key}\"")), "OVF lacks {key}");
    }
}

/// Every payload form from a real state, decoded where encoded.
fn all_forms(st: &imgbuild::state::State, cluster: &Cluster) -> Vec<String> {
    let mut out = Vec::new();
    for role in [Role::Master, Role::Worker] {
        for node in [None, cluster.nodes_with(role).next()] {
            let t = Target { role, node };
            let cfg = payload::boot_config(st, cluster, &t).unwrap();
            let ign = payload::ignition(&cfg, "3.6.0").unwrap();
            let cc = payload::cloud_config(&cfg, cluster, &t);
            for enc in [Encoding::Base64, Encoding::GzipBase64] {
                for (k, v) in payload::guestinfo(&ign, &cc, enc, payload::GUESTINFO_LIMIT).unwrap() {
                    if !k.ends_with(".encoding") {
                        out.push(decode_guestinfo(&v, Some(enc.as_str())).unwrap());
                    }
                    out.push(v);
                }
            }
            out.push(payload::ipxe(&cfg, cluster, &t, "http://x/boot", imgbuild::pxe::PxeRoot::Initrd));
            out.push(payload::config_json(&cfg));
            out.push(cc);
            out.push(
                String::from_utf8(
                    base64::engine::general_purpose::STANDARD
                        .decode(ign.split("base64,").nth(1).unwrap().split('"').next().unwrap())
                        .unwrap(),
                )
                .unwrap(),
            );
            out.push(ign);
        }
    }
    out
}

#[test]
fn no_key_material_and_deterministic() {
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| t);
    let forms = all_forms(&st, &cluster);
    // Every private key in the state dir: not one line of its body may appear anywhere.
    let mut key_lines = Vec::new();
    for entry in walk(&st.root) {
        let text = std::fs::read_to_string(&entry).unwrap_or_default();
        if text.contains("PRIVATE KEY") {
            key_lines.extend(text.lines().filter(|l| !l.starts_with("-----") && l.len() > 16).map(str::to_string));
        }
    }
    assert!(key_lines.len() > 10, "found no keys to look for");
    for f in &forms {
        assert!(!f.contains("PRIVATE KEY"), "a payload contains a PEM private key");
        for l in &key_lines {
            assert!(!f.contains(l.as_str()), "a payload contains private key material");
        }
    }
    assert_eq!(all_forms(&st, &cluster), forms, "payloads differ between two renderings of the same state");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

#[test]
fn cli_writes_payloads_0600() {
    let dir = tempfile::tempdir().unwrap();
    let (st, _) = state_with(dir.path(), |t| t);
    for format in ["ignition", "cloud-init", "guestinfo", "ipxe", "json"] {
        let out = dir.path().join(format!("p.{format}"));
        let o = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
            .args([
                "--state",
                st.root.to_str().unwrap(),
                "payload",
                "--role",
                "worker",
                "--node",
                "k8s-worker2",
                "--format",
                format,
                "--out",
            ])
            .arg(&out)
            .output()
            .unwrap();
        assert!(o.status.success(), "{format}: {}", String::from_utf8_lossy(&o.stderr));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&out).unwrap().permissions().mode() & 0o777, 0o600, "{format}");
    }
    let o = Command::new(env!("CARGO_BIN_EXE_imgbuild"))
        .args([
            "--state",
            st.root.to_str().unwrap(),
            "payload",
            "--role",
            "master",
            "--node",
            "k8s-worker2",
            "--format",
            "json",
        ])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("k8s-worker2 is a worker, not a master"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pxe_scripts_files_and_a_payload_fetched_from_the_kernel_command_line() {
    use imgbuild::serve::{Backend, ServeOptions};
    let dir = tempfile::tempdir().unwrap();
    let (st, cluster) = state_with(dir.path(), |t| t);
    let boot = dir.path().join("out");
    std::fs::create_dir_all(boot.join("worker/pxe")).unwrap();
    std::fs::write(boot.join("worker/pxe/vmlinuz"), b"kernel bytes").unwrap();
    let o = ServeOptions {
        listen: "127.0.0.1:0".parse().unwrap(),
        backend: Backend::Embedded,
        audit_file: false,
        boot: Some(imgbuild::serve::boot::BootListen {
            addr: "127.0.0.1:0".parse().unwrap(),
            dir: boot.clone(),
            root: imgbuild::pxe::PxeRoot::Initrd,
        }),
        limits: Default::default(),
    };
    let server = imgbuild::serve::start(&st, &o).await.unwrap();
    let http = format!("http://{}", server.boot_addr.unwrap());
    proto::tls::install_default_provider();
    let get = |url: String| async move {
        let r = reqwest::get(&url).await.unwrap();
        (r.status().as_u16(), r.text().await.unwrap())
    };
    assert_eq!(get(format!("{http}/boot/worker/vmlinuz")).await, (200, "kernel bytes".to_string()));
    let (code, script) = get(format!("{http}/boot/mac/52-54-00-03-01-22.ipxe")).await;
    assert_eq!(code, 200, "{script}");
    assert!(script.contains(&format!("set base {http}/boot/worker")), "{script}");
    assert!(
        script.contains("/v1/payload/node/k8s-worker2") && script.contains("firstboot.boot-mac=52:54:00:03:01:22"),
        "{script}"
    );
    assert_eq!(get(format!("{http}/boot/mac/52:54:00:99:99:99.ipxe")).await.0, 404);
    let (code, role_script) = get(format!("{http}/boot/master.ipxe")).await;
    assert!(code == 200 && role_script.contains("/v1/payload/role/master"), "{role_script}");
    // The roles' spec.pxe.state defaults: a master's state on disk, a worker's in RAM.
    assert!(role_script.contains(" imgbuild.state=disk "), "{role_script}");
    assert!(script.contains(" imgbuild.state=ram "), "{script}");
    // The server's root form (initrd) unless the script's URL asks for the other.
    // Each loaded file named on the command line too, for UEFI iPXE builds that only expose
    // them as files to the kernel's EFI stub.
    assert!(script.contains("\ninitrd ${base}/rootfs.erofs.cpio\n"), "{script}");
    assert!(
        script.contains(" initrd=initrd.img initrd=rootfs.erofs.cpio initrd=firstboot.erofs.cpio boot=imgbuild "),
        "{script}"
    );
    let (code, http_script) = get(format!("{http}/boot/mac/52-54-00-03-01-22.ipxe?root=http")).await;
    assert_eq!(code, 200, "{http_script}");
    assert!(
        http_script.contains(" imgbuild.root=${base}/rootfs.erofs imgbuild.firstboot=${base}/firstboot.erofs ip=dhcp ")
            && http_script.contains("vmlinuz initrd=initrd.img boot=imgbuild ")
            && !http_script.contains("initrd ${base}/rootfs.erofs"),
        "{http_script}"
    );
    // The images wrapped in a cpio archive as they go out: cpio itself unpacks the same bytes.
    let image: Vec<u8> = (0..1_000_003u32).map(|i| (i % 251) as u8).collect();
    std::fs::write(boot.join("worker/pxe/rootfs.erofs"), &image).unwrap();
    let r = reqwest::get(format!("{http}/boot/worker/rootfs.erofs.cpio")).await.unwrap();
    assert_eq!(r.status(), 200);
    let len: u64 = r.headers()[reqwest::header::CONTENT_LENGTH].to_str().unwrap().parse().unwrap();
    let archive = r.bytes().await.unwrap();
    assert_eq!(archive.len() as u64, len);
    assert_eq!(cpio_extract(&archive, "rootfs.erofs"), image);
    assert_eq!(get(format!("{http}/boot/worker/firstboot.erofs.cpio")).await.0, 404);
    assert_eq!(get(format!("{http}/boot/worker/vmlinuz.cpio")).await.0, 404);
    let (code, body) = get(format!("{http}/boot/worker.ipxe?root=nfs")).await;
    assert!(code == 400 && body.contains("root=nfs: expected initrd or http"), "{code} {body}");

    // firstboot, as a PXE-booted worker: the kernel command line says where the payload is.
    let url = format!("https://127.0.0.1:{}/v1/payload/node/k8s-worker2", server.addr.port());
    let pin = st.ca(imgbuild::pki::CaKind::Cluster).unwrap().pin();
    let root = node_root(&dir.path().join("node"), "52:54:00:03:01:22");
    std::fs::create_dir_all(root.join("proc")).unwrap();
    std::fs::write(root.join("proc/cmdline"), format!("boot=imgbuild firstboot.config={url} firstboot.pin={pin}\n"))
        .unwrap();
    let mut opts = firstboot::agent::Options::new(&root);
    opts.join = false;
    opts.deadline = Duration::from_secs(20);
    let mut agent = firstboot::agent::Agent::new(
        opts,
        firstboot::agent::host::Recorder::default(),
        firstboot::agent::host::Recorder::default(),
    )
    .unwrap();
    // The payload's servers are the manifest's; point them at this test's server after identify.
    let r = agent.run().await;
    let rec = agent.record();
    let bc = rec.boot_config.clone().expect("identify read the payload");
    // What anyone may fetch: the node's payload without its credential.
    let target = Target { role: Role::Worker, node: cluster.node("k8s-worker2") };
    assert_eq!(bc, payload::open_config(&st, &cluster, &target).unwrap());
    assert!(bc.token.is_none(), "the open endpoint served a credential");
    for script in [&script, &role_script] {
        let tokens = st.tokens().unwrap();
        for t in &tokens.records {
            assert!(!script.contains(&t.token.expose()), "an iPXE script carries a credential");
        }
    }
    assert!(
        agent.systemd.effects.contains(&"systemctl restart systemd-networkd.service".to_string()),
        "static address not applied: {:?}",
        agent.systemd.effects
    );
    let net = std::fs::read_to_string(root.join("etc/systemd/network/10-firstboot.network")).unwrap();
    assert!(
        net.contains("MACAddress=52:54:00:03:01:22")
            && net.contains("Address=192.168.3.122/24")
            && net.contains("Gateway=192.168.3.1"),
        "{net}"
    );
    // Enrolling goes to 192.168.3.100, which this test does not run: that fails, after identify.
    assert!(r.is_err());
    server.shutdown().await;
}

/// The one file `name` that GNU cpio unpacks from a newc `archive`, checking that it holds
/// nothing else.
fn cpio_extract(archive: &[u8], name: &str) -> Vec<u8> {
    use std::io::Write;
    let cpio = require_tool("cpio", "cpio");
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(cpio)
        .args(["-i", "--quiet", "--no-absolute-filenames", "-H", "newc"])
        .current_dir(dir.path())
        .stdin(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(archive).unwrap();
    assert!(child.wait().unwrap().success(), "cpio could not unpack the archive");
    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, [name], "the archive's files");
    assert_eq!(archive.len() % 4, 0, "a newc archive's length is a multiple of 4");
    std::fs::read(dir.path().join(name)).unwrap()
}
