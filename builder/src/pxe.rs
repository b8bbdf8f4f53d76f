//! PXE boots: the kernel command line of the PXE sets, where a node's root comes from
//! ([`PxeRoot`]), and `imgbuild pxe dnsmasq`: a dnsmasq configuration for the nodes' network, so
//! that PXE firmware chains to iPXE and iPXE to `imgbuild serve --boot-listen`'s scripts (see
//! `serve::boot`): DHCP with the inventory's MACs and addresses (and, optionally, a dynamic range
//! for machines that enroll by policy), the routers, DNS and NTP servers of the manifest, TFTP
//! of Debian's iPXE builds for BIOS and UEFI firmware, and per-node iPXE scripts by MAC. No
//! credential is in any of it: PXE-booted machines enroll with the operator's approval
//! (docs/security.md).

use std::net::Ipv4Addr;

use serde_json::{Value, json};

use crate::cluster::{Cluster, PxeState};
use crate::templates;

/// How a PXE-booted kernel gets the root image and the firstboot layer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum PxeRoot {
    /// iPXE loads both into RAM with the kernel and the initramfs, as cpio archives
    /// ([`initrds`]): the only network client is iPXE's
    #[default]
    Initrd,
    /// The initramfs fetches both over HTTP with the kernel's own NIC driver
    /// (`imgbuild.root=http://…`): firmware that is slow at large downloads (UEFI's network
    /// stack) loads only the kernel and the initramfs
    Http,
}

impl PxeRoot {
    /// The word in `?root=`, `--boot-root` and `--root`.
    pub fn as_str(self) -> &'static str {
        match self {
            PxeRoot::Initrd => "initrd",
            PxeRoot::Http => "http",
        }
    }
}

/// The kernel command line of a PXE boot. iPXE scripts set `base` to the PXE set's URL, which
/// the HTTP form refers to as `${base}`; `BOOTIF` makes the initramfs configure the NIC that
/// booted. `state` is the role's `spec.pxe.state` (none: the initramfs' default, RAM).
pub fn cmdline(root: PxeRoot, state: Option<PxeState>) -> String {
    let mut line = match root {
        PxeRoot::Initrd => "boot=imgbuild imgbuild.root=/rootfs.erofs imgbuild.firstboot=/firstboot.erofs".to_string(),
        PxeRoot::Http => "boot=imgbuild imgbuild.root=${base}/rootfs.erofs imgbuild.firstboot=${base}/firstboot.erofs \
                          ip=dhcp BOOTIF=01-${netX/mac:hexhyp}"
            .to_string(),
    };
    if let Some(state) = state {
        line.push_str(&format!(" imgbuild.state={}", state.as_str()));
    }
    line + " console=tty0 console=ttyS0,115200 systemd.show_status=1"
}

/// The files an iPXE script loads after the kernel, by the names the kernel command line gives
/// them (`initrd=NAME`, one per file): the initramfs, and in the initrd form the root image and
/// the firstboot layer, each as a cpio archive of one file that `imgbuild serve` wraps around the
/// image ([`Newc`]). Whatever the firmware, every iPXE hands them over: on BIOS iPXE concatenates
/// them after the kernel; UEFI iPXE builds before 2023 (Debian 12's is from 2019) only expose
/// them as files named after the URL, which the kernel's EFI stub reads by the `initrd=`
/// arguments and does not unwrap, and newer ones serve them through the initrd media device path
/// (the stub then ignores `initrd=`).
pub fn initrds(root: PxeRoot) -> &'static [&'static str] {
    match root {
        PxeRoot::Initrd => &["initrd.img", "rootfs.erofs.cpio", "firstboot.erofs.cpio"],
        PxeRoot::Http => &["initrd.img"],
    }
}

/// A cpio archive (`newc`, as the kernel unpacks initramfs) of one regular file, made around
/// the file's bytes without copying them: `head`, the file, `tail`.
#[derive(Debug)]
pub struct Newc {
    /// The file's header and name, padded to 4 bytes.
    pub head: Vec<u8>,
    /// The file's length.
    pub size: u64,
    /// The padding after the file and the trailer entry.
    pub tail: Vec<u8>,
}

impl Newc {
    /// The archive of `name` with `size` bytes, or `None` when the size does not fit the
    /// format's 32-bit field (4 GiB).
    pub fn new(name: &str, size: u64) -> Option<Newc> {
        let head = newc_header(1, 0o100_444, u32::try_from(size).ok()?, name);
        let mut tail = vec![0; pad4(size)];
        tail.append(&mut newc_header(0, 0, 0, "TRAILER!!!"));
        Some(Newc { head, size, tail })
    }

    /// The archive's length.
    pub fn archive_len(&self) -> u64 {
        self.head.len() as u64 + self.size + self.tail.len() as u64
    }
}

/// Zero bytes that pad `n` bytes to a multiple of 4.
fn pad4(n: u64) -> usize {
    ((4 - n % 4) % 4) as usize
}

/// One `newc` entry's header (magic, 13 hex fields) and NUL-terminated name, padded.
fn newc_header(ino: u32, mode: u32, size: u32, name: &str) -> Vec<u8> {
    let nlink = u32::from(mode != 0);
    let namesize = name.len() + 1;
    let fields = [ino, mode, 0, 0, nlink, 0, size, 0, 0, 0, 0, namesize as u32, 0];
    let mut h = b"070701".to_vec();
    for f in fields {
        h.extend_from_slice(format!("{f:08X}").as_bytes());
    }
    h.extend_from_slice(name.as_bytes());
    h.push(0);
    h.resize(h.len() + pad4(h.len() as u64), 0);
    h
}

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
    /// The root form the scripts ask for (`?root=`); none: the server's `--boot-root`.
    pub root: Option<PxeRoot>,
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
            "query": o.root.map(|r| format!("?root={}", r.as_str())).unwrap_or_default(),
        }),
    )
    .expect("dnsmasq template renders")
}
