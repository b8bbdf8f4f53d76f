//! Disk assembly without loop devices or mounts: each file system is made from files by its own
//! tool (mkfs.erofs from the tree, mkfs.vfat + mtools for the ESP, mkfs.ext4 for the empty state
//! file system), a GPT is written by sfdisk on a plain file, and the file systems are copied in
//! at their offsets, sparsely. Every identifier (GPT GUIDs, file-system UUIDs, the FAT volume id)
//! is derived from the image's inputs and every timestamp is SOURCE_DATE_EPOCH, so the same
//! inputs give the same bytes.

use std::io::Write;
use std::path::Path;
use std::process::Command;

use super::lock::sha256_hex;
use super::{BakeError, run};

const MIB: u64 = 1 << 20;
pub const STATE_LABEL: &str = "imgbuild-state";
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// "Root Partition (x86-64)" of the Discoverable Partitions Specification.
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const DATA_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";

/// Identifiers of one image, derived from its inputs.
#[derive(Debug, Clone)]
pub struct Ids {
    pub disk: String,
    pub esp: String,
    pub root: String,
    pub state: String,
    pub root_fs: String,
    pub state_fs: String,
    /// FAT volume id, 8 hex digits.
    pub esp_volid: String,
}

/// A UUID (version 4 layout) from a digest of `seed`.
fn uuid(seed: &str) -> String {
    let h = sha256_hex(seed.as_bytes());
    let mut b: Vec<char> = h[..32].chars().collect();
    b[12] = '4';
    b[16] = ['8', '9', 'a', 'b'][usize::from(b[16].to_digit(16).unwrap_or(0) as u8 & 3)];
    let s: String = b.into_iter().collect();
    format!("{}-{}-{}-{}-{}", &s[..8], &s[8..12], &s[12..16], &s[16..20], &s[20..32])
}

impl Ids {
    pub fn new(seed: &str) -> Ids {
        Ids {
            disk: uuid(&format!("{seed}/disk")),
            esp: uuid(&format!("{seed}/esp")),
            root: uuid(&format!("{seed}/root")),
            state: uuid(&format!("{seed}/state")),
            root_fs: uuid(&format!("{seed}/root-fs")),
            state_fs: uuid(&format!("{seed}/state-fs")),
            esp_volid: sha256_hex(format!("{seed}/esp-volid").as_bytes())[..8].to_uppercase(),
        }
    }

    /// The FAT volume id as GRUB and blkid print it (`ABCD-1234`).
    pub fn esp_fs_uuid(&self) -> String {
        format!("{}-{}", &self.esp_volid[..4], &self.esp_volid[4..])
    }
}

/// The kernel command line of a disk boot.
pub fn kernel_cmdline(ids: &Ids) -> String {
    format!("boot=imgbuild root=PARTUUID={} ro console=tty0 console=ttyS0,115200 systemd.show_status=1", ids.root)
}

/// The read-only root file system.
pub fn erofs(tree: &Path, out: &Path, ids: &Ids, epoch: i64) -> Result<(), BakeError> {
    run(
        Command::new("mkfs.erofs")
            .arg(format!("-T{epoch}"))
            .arg(format!("-U{}", ids.root_fs))
            .args(["-zlz4", "-x-1"])
            .arg(out)
            .arg(tree),
        "mkfs.erofs",
    )
    .map(|_| ())
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// The EFI system partition: GRUB (config built in), the kernel and the initramfs.
pub fn esp(tree: &Path, work: &Path, out: &Path, ids: &Ids, cmdline: &str, epoch: i64) -> Result<u64, BakeError> {
    let io = |what: &str, e: std::io::Error| BakeError::Io(format!("ESP {what}: {e}"));
    let stage = work.join("esp");
    let boot = stage.join("EFI/BOOT");
    std::fs::create_dir_all(&boot).map_err(|e| io("stage", e))?;
    let cfg = work.join("grub-early.cfg");
    std::fs::write(
        &cfg,
        format!(
            "set timeout=0\nsearch --no-floppy --fs-uuid --set=root {}\nlinux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n",
            ids.esp_fs_uuid()
        ),
    )
    .map_err(|e| io("grub.cfg", e))?;
    run(
        Command::new("grub-mkimage")
            .args(["-O", "x86_64-efi", "-p", "/EFI/BOOT", "-o"])
            .arg(boot.join("BOOTX64.EFI"))
            .arg("-c")
            .arg(&cfg)
            .args([
                "part_gpt",
                "fat",
                "search",
                "search_fs_uuid",
                "linux",
                "normal",
                "echo",
                "efi_gop",
                "efi_uga",
                "serial",
                "terminal",
            ]),
        "grub-mkimage",
    )?;
    std::fs::copy(tree.join("vmlinuz"), stage.join("vmlinuz")).map_err(|e| io("vmlinuz", e))?;
    std::fs::copy(tree.join("initrd.img"), stage.join("initrd.img")).map_err(|e| io("initrd.img", e))?;
    let payload: u64 = ["EFI/BOOT/BOOTX64.EFI", "vmlinuz", "initrd.img"]
        .iter()
        .map(|f| std::fs::metadata(stage.join(f)).map(|m| m.len()).unwrap_or(0))
        .sum();
    let size = round_up(payload + 16 * MIB, 8 * MIB).max(64 * MIB);
    run(
        Command::new("find").arg(&stage).args(["-exec", "touch", "-h", "-d", &format!("@{epoch}"), "{}", "+"]),
        "touch",
    )?;
    let _ = std::fs::remove_file(out);
    run(
        Command::new("mkfs.vfat")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .args(["-C", "-F", "32", "-n", "ESP", "-i", &ids.esp_volid, "--invariant"])
            .arg(out)
            .arg((size / 1024).to_string()),
        "mkfs.vfat",
    )?;
    run(
        Command::new("mcopy")
            .env("SOURCE_DATE_EPOCH", epoch.to_string())
            .arg("-i")
            .arg(out)
            .args(["-s", "-m"])
            .arg(stage.join("EFI"))
            .arg(stage.join("vmlinuz"))
            .arg(stage.join("initrd.img"))
            .arg("::/"),
        "mcopy",
    )?;
    Ok(size)
}

/// The empty state file system (grown to fill its disk at first boot).
pub fn state(out: &Path, ids: &Ids, size: u64, epoch: i64) -> Result<(), BakeError> {
    let _ = std::fs::remove_file(out);
    std::fs::File::create(out).and_then(|f| f.set_len(size)).map_err(|e| BakeError::Io(format!("state: {e}")))?;
    run(
        Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .args(["-q", "-L", STATE_LABEL, "-U", &ids.state_fs])
            .arg("-E")
            .arg(format!("hash_seed={},root_owner=0:0,nodiscard", ids.state_fs))
            .arg(out),
        "mkfs.ext4",
    )
    .map(|_| ())
}

/// The byte ranges of a file that hold data (SEEK_DATA/SEEK_HOLE); holes read as zeros and need
/// not be read at all. The whole file where the filesystem cannot say.
pub fn data_extents(f: &std::fs::File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    use nix::unistd::{Whence, lseek};
    let mut extents = Vec::new();
    let mut at = 0i64;
    while (at as u64) < len {
        let start = match lseek(f, at, Whence::SeekData) {
            Ok(s) => s,
            Err(nix::errno::Errno::ENXIO) => break,
            Err(nix::errno::Errno::EINVAL) => return Ok(vec![(0, len)]),
            Err(e) => return Err(e.into()),
        };
        let end = lseek(f, start, Whence::SeekHole).map_err(std::io::Error::from)?;
        extents.push((start as u64, (end as u64).min(len)));
        at = end;
    }
    Ok(extents)
}

/// Copies `src` into `disk` at `offset`, leaving its holes and all-zero blocks as holes.
fn copy_sparse(src: &Path, disk: &std::fs::File, offset: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(src)?;
    let mut buf = vec![0u8; MIB as usize];
    for (start, end) in data_extents(&f, f.metadata()?.len())? {
        let mut at = start;
        while at < end {
            let n = (end - at).min(MIB) as usize;
            f.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|b| *b != 0) {
                disk.write_all_at(&buf[..n], offset + at)?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

/// GPT disk: ESP, root, state.
pub fn assemble(out: &Path, esp: &Path, root: &Path, state: &Path, ids: &Ids) -> Result<u64, BakeError> {
    let len =
        |p: &Path| std::fs::metadata(p).map(|m| m.len()).map_err(|e| BakeError::Io(format!("{}: {e}", p.display())));
    let (esp_size, root_size, state_size) = (len(esp)?, round_up(len(root)?, MIB), len(state)?);
    let total = MIB + esp_size + root_size + state_size + MIB;
    let _ = std::fs::remove_file(out);
    let disk = std::fs::File::create(out).map_err(|e| BakeError::Io(format!("{}: {e}", out.display())))?;
    disk.set_len(total).map_err(|e| BakeError::Io(format!("{}: {e}", out.display())))?;
    let s = |b: u64| b / 512;
    let script = format!(
        "label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: 2048\n\
         start=2048, size={}, type={ESP_TYPE}, uuid={}, name=\"ESP\"\n\
         size={}, type={ROOT_TYPE}, uuid={}, name=\"root\"\n\
         size={}, type={DATA_TYPE}, uuid={}, name=\"{STATE_LABEL}\"\n",
        ids.disk,
        s(esp_size),
        ids.esp,
        s(root_size),
        ids.root,
        s(state_size),
        ids.state
    );
    let mut child = Command::new("sfdisk")
        .args(["--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never"])
        .arg(out)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .map_err(|e| BakeError::Tool { tool: "sfdisk".into(), package: "fdisk".into(), reason: e.to_string() })?;
    child.stdin.take().expect("piped").write_all(script.as_bytes()).map_err(|e| BakeError::Io(e.to_string()))?;
    let o = child.wait_with_output().map_err(|e| BakeError::Io(e.to_string()))?;
    if !o.status.success() {
        return Err(BakeError::Io(format!("sfdisk: {}", String::from_utf8_lossy(&o.stderr))));
    }
    for (img, at) in [(esp, MIB), (root, MIB + esp_size), (state, MIB + esp_size + root_size)] {
        copy_sparse(img, &disk, at).map_err(|e| BakeError::Io(format!("{}: {e}", img.display())))?;
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    #[test]
    fn uuids_are_stable_and_well_formed() {
        let a = super::Ids::new("x");
        assert_eq!(a.root, super::Ids::new("x").root);
        assert_ne!(a.root, super::Ids::new("y").root);
        assert_eq!(a.root.len(), 36);
        assert_eq!(&a.root[14..15], "4");
        assert!("89ab".contains(&a.root[19..20]));
        assert_eq!(a.esp_fs_uuid().len(), 9);
    }
}
