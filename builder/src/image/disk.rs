//! Disk assembly without loop devices or mounts: each file system is made from files by its own
//! tool (mkfs.erofs from the trees of the root and of the firstboot layer, mkfs.vfat + mtools for
//! the ESP, mkfs.ext4 for the empty state file system), a GPT is written by sfdisk on a plain
//! file, and the file systems are copied in at their offsets, sparsely. Every identifier (GPT
//! GUIDs, file-system UUIDs, the FAT volume id) is derived from the image's inputs and every
//! timestamp is SOURCE_DATE_EPOCH, so the same inputs give the same bytes.

use std::path::Path;
use std::process::Command;

use super::{BakeError, IoAt};
use crate::digest::sha256_hex;
use crate::progress::{self, Unit};
use crate::tools::run;

const MIB: u64 = 1 << 20;
/// The label of the state partition and its ext4 (`/etc`, `/var`, `/root`), which the initramfs finds it by.
pub const STATE_LABEL: &str = "imgbuild-state";
const ESP_TYPE: &str = "C12A7328-F81F-11D2-BA4B-00A0C93EC93B";
/// "Root Partition (x86-64)" of the Discoverable Partitions Specification.
const ROOT_TYPE: &str = "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709";
const DATA_TYPE: &str = "0FC63DAF-8483-4772-8E79-3D69D8477DE4";
/// The partition name of the firstboot layer's erofs.
pub const FIRSTBOOT_LABEL: &str = "imgbuild-firstboot";

/// Identifiers of one image, derived from its inputs.
#[derive(Debug, Clone)]
pub struct Ids {
    /// The GPT disk GUID.
    pub disk: String,
    /// The ESP's partition GUID.
    pub esp: String,
    /// The root partition's GUID (the kernel's `root=PARTUUID=`).
    pub root: String,
    /// The firstboot layer's partition GUID (`imgbuild.firstboot=PARTUUID=`).
    pub firstboot: String,
    /// The state partition's GUID.
    pub state: String,
    /// The root erofs's UUID.
    pub root_fs: String,
    /// The firstboot layer erofs's UUID.
    pub firstboot_fs: String,
    /// The state ext4's UUID.
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
    /// Every identifier of the image whose inputs `seed` names.
    pub fn new(seed: &str) -> Ids {
        Ids {
            disk: uuid(&format!("{seed}/disk")),
            esp: uuid(&format!("{seed}/esp")),
            root: uuid(&format!("{seed}/root")),
            firstboot: uuid(&format!("{seed}/firstboot")),
            state: uuid(&format!("{seed}/state")),
            root_fs: uuid(&format!("{seed}/root-fs")),
            firstboot_fs: uuid(&format!("{seed}/firstboot-fs")),
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
    format!(
        "boot=imgbuild root=PARTUUID={} imgbuild.firstboot=PARTUUID={} ro console=tty0 console=ttyS0,115200 \
         systemd.show_status=1",
        ids.root, ids.firstboot
    )
}

/// The options of every erofs an image carries (the root cache key includes them).
pub fn erofs_options(uuid: &str, epoch: i64) -> [String; 4] {
    [format!("-T{epoch}"), format!("-U{uuid}"), "-zlz4".into(), "-x-1".into()]
}

/// A read-only file system of `tree` (the root, or the firstboot layer).
pub fn erofs(tree: &Path, out: &Path, uuid: &str, epoch: i64) -> Result<(), BakeError> {
    run(Command::new("mkfs.erofs").args(erofs_options(uuid, epoch)).arg(out).arg(tree), "mkfs.erofs")?;
    Ok(())
}

/// [`erofs`], shown as a step of its own (the root's takes a while; mkfs.erofs reports no
/// progress, so the step shows its time).
pub fn erofs_step(label: &str, tree: &Path, out: &Path, uuid: &str, epoch: i64) -> Result<(), BakeError> {
    let task = progress::global().task(label, Unit::Time);
    erofs(tree, out, uuid, epoch)?;
    let size = std::fs::metadata(out).at(out)?.len();
    task.finish(format!("erofs, {}", progress::mib(size)));
    Ok(())
}

fn round_up(n: u64, to: u64) -> u64 {
    n.div_ceil(to) * to
}

/// The EFI system partition: GRUB (config built in), the kernel and the initramfs.
pub fn esp(tree: &Path, work: &Path, out: &Path, ids: &Ids, cmdline: &str, epoch: i64) -> Result<u64, BakeError> {
    let stage = work.join("esp");
    let boot = stage.join("EFI/BOOT");
    std::fs::create_dir_all(&boot).at(&boot)?;
    let cfg = work.join("grub-early.cfg");
    std::fs::write(
        &cfg,
        format!(
            "set timeout=0\nsearch --no-floppy --fs-uuid --set=root {}\nlinux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n",
            ids.esp_fs_uuid()
        ),
    )
    .at(&cfg)?;
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
    for f in ["vmlinuz", "initrd.img"] {
        std::fs::copy(tree.join(f), stage.join(f)).at(tree.join(f))?;
    }
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
    std::fs::File::create(out).and_then(|f| f.set_len(size)).at(out)?;
    run(
        Command::new("mkfs.ext4")
            .env("E2FSPROGS_FAKE_TIME", epoch.to_string())
            .args(["-q", "-L", STATE_LABEL, "-U", &ids.state_fs])
            .arg("-E")
            .arg(format!("hash_seed={},root_owner=0:0,nodiscard", ids.state_fs))
            .arg(out),
        "mkfs.ext4",
    )?;
    Ok(())
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

/// One partition of a disk image: the file system image that fills it.
pub struct Partition<'a> {
    /// The file system image.
    pub image: &'a Path,
    /// The GPT partition name.
    pub name: &'a str,
    /// The GPT partition type GUID.
    pub type_guid: &'a str,
    /// The partition's unique GUID.
    pub uuid: &'a str,
}

/// The partitions of an image, in disk order: the state partition last, where it can grow.
pub fn layout<'a>(
    ids: &'a Ids,
    esp: &'a Path,
    root: &'a Path,
    firstboot: &'a Path,
    state: &'a Path,
) -> [Partition<'a>; 4] {
    [
        Partition { image: esp, name: "ESP", type_guid: ESP_TYPE, uuid: &ids.esp },
        Partition { image: root, name: "root", type_guid: ROOT_TYPE, uuid: &ids.root },
        Partition { image: firstboot, name: FIRSTBOOT_LABEL, type_guid: DATA_TYPE, uuid: &ids.firstboot },
        Partition { image: state, name: STATE_LABEL, type_guid: DATA_TYPE, uuid: &ids.state },
    ]
}

/// A GPT disk of these partitions, each rounded up to whole MiB.
pub fn assemble(out: &Path, parts: &[Partition<'_>], disk_guid: &str) -> Result<u64, BakeError> {
    let mut sizes = Vec::with_capacity(parts.len());
    for p in parts {
        let len = std::fs::metadata(p.image).at(p.image)?.len();
        sizes.push(round_up(len, MIB));
    }
    let total = MIB + sizes.iter().sum::<u64>() + MIB;
    let _ = std::fs::remove_file(out);
    let disk = std::fs::File::create(out).at(out)?;
    disk.set_len(total).at(out)?;
    let mut script = format!("label: gpt\nlabel-id: {disk_guid}\nunit: sectors\nfirst-lba: 2048\n");
    let mut at = MIB;
    for (p, size) in parts.iter().zip(&sizes) {
        script.push_str(&format!(
            "start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
            at / 512,
            size / 512,
            p.type_guid,
            p.uuid,
            p.name
        ));
        at += size;
    }
    let script_file = out.with_extension("sfdisk");
    std::fs::write(&script_file, script).at(&script_file)?;
    let written = run(
        Command::new("sfdisk")
            .args(["--quiet", "--no-reread", "--no-tell-kernel", "--wipe", "never"])
            .arg(out)
            .stdin(std::fs::File::open(&script_file).at(&script_file)?),
        "sfdisk",
    );
    let _ = std::fs::remove_file(&script_file);
    written?;
    let mut at = MIB;
    for (p, size) in parts.iter().zip(&sizes) {
        copy_sparse(p.image, &disk, at).at(p.image)?;
        at += size;
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
