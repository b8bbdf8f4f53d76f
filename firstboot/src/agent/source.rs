//! Where the first-boot payload comes from. Each [`ConfigSource`] is one transport; [`load`]
//! tries them in this order and takes the first that has a payload:
//!
//! 1. `--config FILE` (tests, manual runs);
//! 2. [`paths::BOOT_CONFIG`], written by Ignition (`storage.files`) or cloud-init (`write_files`);
//! 3. the kernel command line, inline or as `firstboot.config=URL` (PXE);
//! 4. VMware guestinfo (`guestinfo.ignition.config.data`, then `guestinfo.userdata`, with their
//!    `.encoding`: base64 or gzip+base64), read with open-vm-tools' `vmtoolsd --cmd`;
//! 5. QEMU fw_cfg `opt/com.coreos/config`, where Ignition's QEMU platform (and libvirt) put an
//!    Ignition config.
//!
//! Ignition and cloud-init payloads are also understood directly (guestinfo carries them): the
//! entry for [`paths::BOOT_CONFIG`] is taken out of them.

use std::io::Read;
use std::path::{Path, PathBuf};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;

use proto::bootcfg::{BOOT_CONFIG_VERSION, BootConfig, CmdlineConfig, parse_cmdline};
use proto::paths;

/// Why a payload that was found cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The payload does not parse or decode.
    #[error("{source_name}: {message}")]
    Invalid {
        /// Where it was found.
        source_name: String,
        /// What is wrong with it.
        message: String,
    },
}

fn invalid(source_name: &str, message: impl Into<String>) -> SourceError {
    SourceError::Invalid { source_name: source_name.to_string(), message: message.into() }
}

/// A payload as found, before a remote one is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Found {
    /// The payload itself.
    Config(Box<BootConfig>),
    /// Fetch from this URL; trust only this CA when it is HTTPS.
    Remote {
        /// Where the payload is (`http://` or `https://`).
        url: String,
        /// The CA an HTTPS server must chain to; a plain-HTTP payload must name it too.
        pin: proto::pin::CaPin,
    },
}

/// One transport a payload can come by.
pub trait ConfigSource: Send + Sync {
    /// The source's name, for the log and errors.
    fn name(&self) -> String;
    /// `Ok(None)` when this transport carries no payload.
    fn load(&self, root: &Path) -> Result<Option<Found>, SourceError>;
}

/// Parses a payload in any of its forms: our JSON, an Ignition config, or a cloud-config.
pub fn parse_payload(text: &str, source_name: &str) -> Result<BootConfig, SourceError> {
    let t = text.trim_start();
    if t.starts_with("#cloud-config") {
        return from_cloud_config(text, source_name);
    }
    let v: serde_json::Value =
        serde_json::from_str(text).map_err(|e| invalid(source_name, format!("not JSON: {e}")))?;
    if v.get("ignition").is_some() {
        return from_ignition(&v, source_name);
    }
    let version = v.get("version").and_then(serde_json::Value::as_u64).unwrap_or(0);
    if version != u64::from(BOOT_CONFIG_VERSION) {
        return Err(invalid(
            source_name,
            format!(
                "payload version {version}: this firstboot reads version {BOOT_CONFIG_VERSION} (make the payload with the imgbuild of this image)"
            ),
        ));
    }
    serde_json::from_value(v).map_err(|e| invalid(source_name, format!("not a firstboot config: {e}")))
}

fn from_ignition(v: &serde_json::Value, source_name: &str) -> Result<BootConfig, SourceError> {
    let files = v["storage"]["files"].as_array().cloned().unwrap_or_default();
    let f = files
        .iter()
        .find(|f| f["path"] == paths::BOOT_CONFIG)
        .ok_or_else(|| invalid(source_name, format!("the Ignition config writes no {}", paths::BOOT_CONFIG)))?;
    let src = f["contents"]["source"].as_str().ok_or_else(|| invalid(source_name, "file has no contents.source"))?;
    let data = decode_data_url(src).ok_or_else(|| invalid(source_name, "contents.source is not a data: URL"))?;
    let data = match f["contents"]["compression"].as_str() {
        None | Some("") => data,
        Some("gzip") => gunzip(&data).map_err(|e| invalid(source_name, format!("gzip: {e}")))?,
        Some(c) => return Err(invalid(source_name, format!("unsupported compression {c}"))),
    };
    let text = String::from_utf8(data).map_err(|_| invalid(source_name, "config is not UTF-8"))?;
    parse_payload(&text, source_name)
}

fn from_cloud_config(text: &str, source_name: &str) -> Result<BootConfig, SourceError> {
    let v: serde_json::Value =
        serde_saphyr::from_str(text).map_err(|e| invalid(source_name, format!("cloud-config: {e}")))?;
    let files = v["write_files"].as_array().cloned().unwrap_or_default();
    let f = files
        .iter()
        .find(|f| f["path"] == paths::BOOT_CONFIG)
        .ok_or_else(|| invalid(source_name, format!("the cloud-config writes no {}", paths::BOOT_CONFIG)))?;
    let content = f["content"].as_str().unwrap_or_default();
    let data = match f["encoding"].as_str().unwrap_or("text/plain") {
        "text/plain" => content.as_bytes().to_vec(),
        "b64" | "base64" => B64.decode(content.trim()).map_err(|e| invalid(source_name, format!("base64: {e}")))?,
        "gz+b64" | "gzip+base64" | "gz+base64" | "gzip+b64" => {
            let raw = B64.decode(content.trim()).map_err(|e| invalid(source_name, format!("base64: {e}")))?;
            gunzip(&raw).map_err(|e| invalid(source_name, format!("gzip: {e}")))?
        }
        e => return Err(invalid(source_name, format!("unsupported write_files encoding {e}"))),
    };
    let text = String::from_utf8(data).map_err(|_| invalid(source_name, "config is not UTF-8"))?;
    parse_payload(&text, source_name)
}

/// `data:[<mediatype>][;base64],<data>` (RFC 2397).
fn decode_data_url(url: &str) -> Option<Vec<u8>> {
    let rest = url.strip_prefix("data:")?;
    let (meta, data) = rest.split_once(',')?;
    if meta.ends_with(";base64") { B64.decode(data).ok() } else { percent_decode(data) }
}

fn percent_decode(s: &str) -> Option<Vec<u8>> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    Some(out)
}

fn gunzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    flate2::read::GzDecoder::new(data).read_to_end(&mut out)?;
    Ok(out)
}

/// Decodes a guestinfo value by its `.encoding` (`base64`, `gzip+base64`, or none).
pub fn decode_guestinfo(value: &str, encoding: Option<&str>) -> Result<String, String> {
    let bytes = match encoding.map(str::trim).unwrap_or("") {
        "" => value.as_bytes().to_vec(),
        "base64" | "b64" => B64.decode(value.trim()).map_err(|e| format!("base64: {e}"))?,
        "gzip+base64" | "gz+b64" => {
            gunzip(&B64.decode(value.trim()).map_err(|e| format!("base64: {e}"))?).map_err(|e| format!("gzip: {e}"))?
        }
        e => return Err(format!("unknown encoding '{e}' (base64 or gzip+base64)")),
    };
    String::from_utf8(bytes).map_err(|_| "not UTF-8".to_string())
}

/// A file named on the command line.
pub struct LocalFile(pub PathBuf);

impl ConfigSource for LocalFile {
    fn name(&self) -> String {
        format!("--config {}", self.0.display())
    }
    fn load(&self, _root: &Path) -> Result<Option<Found>, SourceError> {
        let text = std::fs::read_to_string(&self.0).map_err(|e| invalid(&self.name(), e.to_string()))?;
        parse_payload(&text, &self.name()).map(|c| Some(Found::Config(Box::new(c))))
    }
}

/// The file Ignition or cloud-init wrote.
pub struct WrittenFile;

impl ConfigSource for WrittenFile {
    fn name(&self) -> String {
        paths::BOOT_CONFIG.to_string()
    }
    fn load(&self, root: &Path) -> Result<Option<Found>, SourceError> {
        match std::fs::read_to_string(paths::under(root, paths::BOOT_CONFIG)) {
            Ok(text) => parse_payload(&text, &self.name()).map(|c| Some(Found::Config(Box::new(c)))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(invalid(&self.name(), e.to_string())),
        }
    }
}

/// The kernel command line.
pub struct KernelCmdline;

impl ConfigSource for KernelCmdline {
    fn name(&self) -> String {
        "kernel command line".into()
    }
    fn load(&self, root: &Path) -> Result<Option<Found>, SourceError> {
        let line = std::fs::read_to_string(paths::under(root, paths::KERNEL_CMDLINE)).unwrap_or_default();
        match parse_cmdline(&line) {
            Ok(None) => Ok(None),
            Ok(Some(CmdlineConfig::Inline(c))) => Ok(Some(Found::Config(c))),
            Ok(Some(CmdlineConfig::Remote { url, pin })) => Ok(Some(Found::Remote { url, pin })),
            Err(e) => Err(invalid(&self.name(), e.to_string())),
        }
    }
}

/// VMware guestinfo through open-vm-tools' `vmtoolsd --cmd "info-get KEY"`: the form VMware
/// documents and that keeps working where a VM's tools policy restricts `vmware-rpctool`. Outside
/// VMware, or for a key that is not set, vmtoolsd exits non-zero and the source has nothing.
pub struct Guestinfo {
    /// The `vmtoolsd` binary; the source is skipped when it is absent.
    pub vmtoolsd: PathBuf,
}

/// Where open-vm-tools installs vmtoolsd (the images carry it).
pub const VMTOOLSD: &str = "/usr/bin/vmtoolsd";

/// The OVF environment property keys firstboot reads: the vApp properties the OVA declares.
const OVF_KEYS: [&str; 4] = [
    "guestinfo.ignition.config.data",
    "guestinfo.ignition.config.data.encoding",
    "guestinfo.userdata",
    "guestinfo.userdata.encoding",
];

/// The vApp properties of an OVF environment document (what vSphere puts in `guestinfo.ovfEnv`
/// when the OVA's `ovf:transport="com.vmware.guestInfo"` is honoured): `oe:key` → `oe:value` of
/// every `PropertySection/Property`, for the keys firstboot reads. Empty values count as unset.
pub fn ovf_env_properties(xml: &str) -> Result<std::collections::BTreeMap<String, String>, String> {
    const OE: &str = "http://schemas.dmtf.org/ovf/environment/1";
    let doc = roxmltree::Document::parse(xml).map_err(|e| format!("guestinfo.ovfEnv is not XML: {e}"))?;
    let root = doc.root_element();
    if root.tag_name().name() != "Environment" || root.tag_name().namespace() != Some(OE) {
        return Err(format!("guestinfo.ovfEnv: the root element is not {OE}'s Environment"));
    }
    Ok(root
        .descendants()
        .filter(|n| n.has_tag_name((OE, "Property")))
        .filter(|n| n.parent_element().is_some_and(|p| p.has_tag_name((OE, "PropertySection"))))
        .filter_map(|n| Some((n.attribute((OE, "key"))?, n.attribute((OE, "value"))?)))
        .filter(|(k, v)| OVF_KEYS.contains(k) && !v.is_empty())
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect())
}

impl Guestinfo {
    fn get(&self, key: &str) -> Option<String> {
        let out =
            std::process::Command::new(&self.vmtoolsd).arg("--cmd").arg(format!("info-get {key}")).output().ok()?;
        let v = String::from_utf8_lossy(&out.stdout).trim().to_string();
        (out.status.success() && !v.is_empty()).then_some(v)
    }
}

impl ConfigSource for Guestinfo {
    fn name(&self) -> String {
        "VMware guestinfo".into()
    }
    fn load(&self, _root: &Path) -> Result<Option<Found>, SourceError> {
        if !self.vmtoolsd.exists() {
            return Ok(None);
        }
        // `govc vm.change -e guestinfo.KEY=…` sets keys directly; a vApp property set when the
        // OVA is deployed arrives inside the OVF environment. A direct key wins.
        let ovf = match self.get("guestinfo.ovfEnv") {
            Some(xml) => ovf_env_properties(&xml).map_err(|e| invalid(&self.name(), e))?,
            None => Default::default(),
        };
        let get = |key: &str| -> Option<(String, String)> {
            match self.get(key) {
                Some(v) => Some((v, format!("{} {key}", self.name()))),
                None => ovf.get(key).map(|v| (v.clone(), format!("{} ovfEnv property {key}", self.name()))),
            }
        };
        for key in ["guestinfo.ignition.config.data", "guestinfo.userdata"] {
            if let Some((value, name)) = get(key) {
                let encoding = get(&format!("{key}.encoding")).map(|(e, _)| e);
                let text = decode_guestinfo(&value, encoding.as_deref()).map_err(|e| invalid(&name, e))?;
                return parse_payload(&text, &name).map(|c| Some(Found::Config(Box::new(c))));
            }
        }
        Ok(None)
    }
}

/// QEMU's fw_cfg, as the qemu_fw_cfg kernel module exposes it.
pub struct QemuFwCfg;

/// Where fw_cfg exposes the Ignition config QEMU was given.
pub const FW_CFG_IGNITION: &str = "/sys/firmware/qemu_fw_cfg/by_name/opt/com.coreos/config/raw";

impl ConfigSource for QemuFwCfg {
    fn name(&self) -> String {
        "QEMU fw_cfg opt/com.coreos/config".into()
    }
    fn load(&self, root: &Path) -> Result<Option<Found>, SourceError> {
        let path = paths::under(root, FW_CFG_IGNITION);
        let on_qemu = std::fs::read_to_string("/sys/class/dmi/id/sys_vendor").is_ok_and(|v| v.trim() == "QEMU");
        if !path.exists() && root == Path::new("/") && on_qemu {
            // /sys/firmware/qemu_fw_cfg appears once the module is loaded, which udev may not
            // have done yet.
            let _ = std::process::Command::new("modprobe").arg("qemu_fw_cfg").status();
        }
        match std::fs::read_to_string(&path) {
            Ok(text) => parse_payload(&text, &self.name()).map(|c| Some(Found::Config(Box::new(c)))),
            Err(_) => Ok(None),
        }
    }
}

/// The transports in their documented order.
pub fn default_sources(explicit: Option<PathBuf>, vmtoolsd: PathBuf) -> Vec<Box<dyn ConfigSource>> {
    let mut v: Vec<Box<dyn ConfigSource>> = Vec::new();
    if let Some(p) = explicit {
        v.push(Box::new(LocalFile(p)));
    }
    v.push(Box::new(WrittenFile));
    v.push(Box::new(KernelCmdline));
    v.push(Box::new(Guestinfo { vmtoolsd }));
    v.push(Box::new(QemuFwCfg));
    v
}

/// The first payload any source has, and which source it came from.
pub fn load(root: &Path, sources: &[Box<dyn ConfigSource>]) -> Result<Option<(Found, String)>, SourceError> {
    for s in sources {
        if let Some(found) = s.load(root)? {
            return Ok(Some((found, s.name())));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::role::Role;

    fn sample() -> BootConfig {
        BootConfig {
            version: BOOT_CONFIG_VERSION,
            servers: vec!["https://127.0.0.1:9443".into()],
            ca_pin: format!("sha256:{}", "cd".repeat(32)).parse().unwrap(),
            token: Some("abcdef.0123456789abcdef".parse().unwrap()),
            role: Role::Master,
            network: None,
            host: Default::default(),
        }
    }

    fn gzip_b64(s: &str) -> String {
        use std::io::Write;
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(s.as_bytes()).unwrap();
        B64.encode(e.finish().unwrap())
    }

    #[test]
    fn written_file_and_precedence() {
        let d = tempfile::tempdir().unwrap();
        let p = paths::under(d.path(), paths::BOOT_CONFIG);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, serde_json::to_string(&sample()).unwrap()).unwrap();
        let srcs = default_sources(None, "/nonexistent".into());
        let (found, from) = load(d.path(), &srcs).unwrap().unwrap();
        assert_eq!(found, Found::Config(Box::new(sample())));
        assert_eq!(from, paths::BOOT_CONFIG);
        // An explicit file wins.
        let mut other = sample();
        other.role = Role::Worker;
        let explicit = d.path().join("x.json");
        std::fs::write(&explicit, serde_json::to_string(&other).unwrap()).unwrap();
        let srcs = default_sources(Some(explicit), "/nonexistent".into());
        assert_eq!(load(d.path(), &srcs).unwrap().unwrap().0, Found::Config(Box::new(other)));
    }

    #[test]
    fn kernel_cmdline_inline_and_remote() {
        let d = tempfile::tempdir().unwrap();
        let p = paths::under(d.path(), paths::KERNEL_CMDLINE);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, format!("ro {}\n", sample().to_cmdline())).unwrap();
        assert_eq!(KernelCmdline.load(d.path()).unwrap(), Some(Found::Config(Box::new(sample()))));
        std::fs::write(&p, format!("ro firstboot.config=https://x:9443/boot firstboot.pin={}\n", sample().ca_pin))
            .unwrap();
        assert!(matches!(KernelCmdline.load(d.path()).unwrap(), Some(Found::Remote { .. })));
        std::fs::write(&p, "ro quiet\n").unwrap();
        assert_eq!(KernelCmdline.load(d.path()).unwrap(), None);
    }

    #[test]
    fn ignition_and_cloud_config_payloads() {
        let json = serde_json::to_string(&sample()).unwrap();
        let ign = serde_json::json!({
            "ignition": {"version": "3.4.0"},
            "storage": {"files": [{"path": paths::BOOT_CONFIG, "mode": 384, "contents": {"source": format!("data:;base64,{}", B64.encode(&json))}}]}
        });
        assert_eq!(parse_payload(&ign.to_string(), "t").unwrap(), sample());
        let pct = serde_json::json!({"ignition": {"version": "3.0.0"}, "storage": {"files": [{"path": paths::BOOT_CONFIG, "contents": {"source": format!("data:,{}", json.replace('"', "%22").replace(' ', "%20"))}}]}});
        assert_eq!(parse_payload(&pct.to_string(), "t").unwrap(), sample());
        let cc = format!(
            "#cloud-config\nwrite_files:\n- path: {}\n  permissions: '0600'\n  encoding: b64\n  content: {}\n",
            paths::BOOT_CONFIG,
            B64.encode(&json)
        );
        assert_eq!(parse_payload(&cc, "t").unwrap(), sample());
        let cc_plain = format!("#cloud-config\nwrite_files:\n- path: {}\n  content: '{}'\n", paths::BOOT_CONFIG, json);
        assert_eq!(parse_payload(&cc_plain, "t").unwrap(), sample());
        let e = parse_payload("#cloud-config\nruncmd: [ls]\n", "t").unwrap_err();
        assert!(e.to_string().contains("writes no"), "{e}");
    }

    #[test]
    fn qemu_fw_cfg_ignition() {
        let d = tempfile::tempdir().unwrap();
        let ign = serde_json::json!({"ignition": {"version": "3.6.0"}, "storage": {"files": [{"path": paths::BOOT_CONFIG, "mode": 384, "contents": {"source": format!("data:;base64,{}", B64.encode(serde_json::to_string(&sample()).unwrap()))}}]}});
        let p = paths::under(d.path(), FW_CFG_IGNITION);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, ign.to_string()).unwrap();
        let (found, from) = load(d.path(), &default_sources(None, "/nonexistent".into())).unwrap().unwrap();
        assert_eq!(found, Found::Config(Box::new(sample())));
        assert!(from.contains("fw_cfg"), "{from}");
    }

    #[test]
    fn guestinfo_through_vmtoolsd() {
        let d = tempfile::tempdir().unwrap();
        let ign = serde_json::json!({"ignition": {"version": "3.4.0"}, "storage": {"files": [{"path": paths::BOOT_CONFIG, "contents": {"source": format!("data:;base64,{}", B64.encode(serde_json::to_string(&sample()).unwrap()))}}]}});
        // A vmtoolsd stands in for the hypervisor here: it answers `--cmd "info-get KEY"` from
        // files, and fails as the real one does for an unset key.
        let tool = d.path().join("vmtoolsd");
        std::fs::write(d.path().join("guestinfo.ignition.config.data"), gzip_b64(&ign.to_string())).unwrap();
        std::fs::write(d.path().join("guestinfo.ignition.config.data.encoding"), "gzip+base64").unwrap();
        std::fs::write(
            &tool,
            format!(
                "#!/bin/sh\n[ \"$1\" = --cmd ] || exit 2\nk=${{2#info-get }}\n[ -f '{0}/'\"$k\" ] || {{ echo 'No value found' >&2; exit 1; }}\ncat '{0}/'\"$k\"\n",
                d.path().display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tool, std::fs::Permissions::from_mode(0o755)).unwrap();
        let g = Guestinfo { vmtoolsd: tool };
        assert_eq!(g.load(d.path()).unwrap(), Some(Found::Config(Box::new(sample()))));
        assert_eq!(Guestinfo { vmtoolsd: "/nonexistent".into() }.load(d.path()).unwrap(), None);
        assert!(decode_guestinfo("xx", Some("rot13")).unwrap_err().contains("unknown encoding"));

        // Deployed from the OVA with the vApp properties set: only guestinfo.ovfEnv exists.
        for f in ["guestinfo.ignition.config.data", "guestinfo.ignition.config.data.encoding"] {
            std::fs::remove_file(d.path().join(f)).unwrap();
        }
        let env = format!(
            r#"<?xml version="1.0" encoding="UTF-8"?>
<Environment xmlns="http://schemas.dmtf.org/ovf/environment/1" xmlns:oe="http://schemas.dmtf.org/ovf/environment/1" xmlns:ve="http://www.vmware.com/schema/ovfenv" oe:id="" ve:vCenterId="vm-42">
  <PlatformSection><Kind>VMware ESXi</Kind><Version>8.0.0</Version></PlatformSection>
  <PropertySection>
    <Property oe:key="guestinfo.ignition.config.data" oe:value="{}"/>
    <Property oe:key="guestinfo.ignition.config.data.encoding" oe:value="gzip+base64"/>
    <Property oe:key="guestinfo.userdata" oe:value=""/>
  </PropertySection>
</Environment>"#,
            gzip_b64(&ign.to_string())
        );
        std::fs::write(d.path().join("guestinfo.ovfEnv"), &env).unwrap();
        assert_eq!(g.load(d.path()).unwrap(), Some(Found::Config(Box::new(sample()))));
        // A damaged value names where it came from.
        std::fs::write(d.path().join("guestinfo.ovfEnv"), env.replace("gzip+base64\"", "base64\"")).unwrap();
        let e = g.load(d.path()).unwrap_err().to_string();
        assert!(e.contains("ovfEnv property guestinfo.ignition.config.data"), "{e}");
        for (bad, want) in [
            ("<Environment/>", "not http://schemas.dmtf.org/ovf/environment/1's Environment"),
            ("<Environment", "not XML"),
        ] {
            assert!(ovf_env_properties(bad).unwrap_err().contains(want), "{bad}");
        }
    }
}
