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
/// "BIOS boot partition": GRUB's i386-pc core image, read by the boot code in the protective MBR.
const BIOS_BOOT_TYPE: &str = "21686148-6449-6E6F-744E-656564454649";
/// The BIOS boot partition fills the gap between the GPT's entries (LBA 2-33) and the first
/// partition at 1 MiB, so the other partitions keep their places and numbers.
const BIOS_BOOT_START: u64 = 34;
const BIOS_BOOT_SECTORS: u64 = 2048 - BIOS_BOOT_START;
/// Its GPT partition number: after the four file systems.
const BIOS_BOOT_NUMBER: usize = 5;
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
    /// The BIOS boot partition's GUID.
    pub bios: String,
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
            bios: uuid(&format!("{seed}/bios")),
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

/// GRUB's modules of both boot loaders: the configuration below finds the ESP by its UUID and
/// boots the kernel and initramfs on it.
const GRUB_MODULES: [&str; 9] =
    ["part_gpt", "fat", "search", "search_fs_uuid", "linux", "normal", "echo", "serial", "terminal"];

/// One GRUB image with the boot configuration built in (`-c`): `x86_64-efi` for the ESP's
/// `BOOTX64.EFI`, `i386-pc` for the BIOS boot partition's core image.
fn grub_image(format: &str, cfg: &Path, extra: &[&str], out: &Path) -> Result<(), BakeError> {
    run(
        Command::new("grub-mkimage")
            .args(["-O", format, "-p", "/EFI/BOOT", "-o"])
            .arg(out)
            .arg("-c")
            .arg(cfg)
            .args(GRUB_MODULES)
            .args(extra),
        "grub-mkimage",
    )?;
    Ok(())
}

/// The boot configuration both GRUBs carry.
fn grub_config(work: &Path, ids: &Ids, cmdline: &str) -> Result<std::path::PathBuf, BakeError> {
    let cfg = work.join("grub-early.cfg");
    std::fs::write(
        &cfg,
        format!(
            "set timeout=0\nserial --unit=0 --speed=115200\nterminal_output console serial\n\
             search --no-floppy --fs-uuid --set=root {}\nlinux /vmlinuz {cmdline}\ninitrd /initrd.img\nboot\n",
            ids.esp_fs_uuid()
        ),
    )
    .at(&cfg)?;
    Ok(cfg)
}

/// The EFI system partition: GRUB (config built in), the kernel and the initramfs; and, for
/// legacy BIOS, GRUB's i386-pc core image with the same configuration in `bios_core`.
pub fn esp(
    tree: &Path,
    work: &Path,
    out: &Path,
    bios_core: &Path,
    ids: &Ids,
    cmdline: &str,
    epoch: i64,
) -> Result<u64, BakeError> {
    let stage = work.join("esp");
    let boot = stage.join("EFI/BOOT");
    std::fs::create_dir_all(&boot).at(&boot)?;
    let cfg = grub_config(work, ids, cmdline)?;
    grub_image("x86_64-efi", &cfg, &["efi_gop", "efi_uga"], &boot.join("BOOTX64.EFI"))?;
    grub_image("i386-pc", &cfg, &["biosdisk"], bios_core)?;
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
            .args(["-C", "-F", "32", "-n", "ESP", "--invariant"])
            .arg(out)
            .arg((size / 1024).to_string()),
        "mkfs.vfat",
    )?;
    set_fat32_volume_id(out, &ids.esp_volid).at(out)?;
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

/// Writes the volume id (8 hex digits) into a FAT32 file system's boot sector and its backup.
/// `mkfs.vfat --invariant`, which makes every other byte reproducible, also fixes the id to
/// 1234-ABCD whatever `-i` says; GRUB finds the ESP by this id, so each image needs its own.
fn set_fat32_volume_id(fs: &Path, volid: &str) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const VOLUME_ID: u64 = 0x43;
    const BACKUP_BOOT_SECTOR: u64 = 0x32;
    let id = u32::from_str_radix(volid, 16)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("volume id {volid}")))?;
    let f = std::fs::OpenOptions::new().read(true).write(true).open(fs)?;
    let mut backup = [0u8; 2];
    f.read_exact_at(&mut backup, BACKUP_BOOT_SECTOR)?;
    let backup = u64::from(u16::from_le_bytes(backup));
    for sector in [0, backup] {
        f.write_all_at(&id.to_le_bytes(), sector * 512 + VOLUME_ID)?;
    }
    Ok(())
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

/// A GPT disk of these partitions, each rounded up to whole MiB, that boots on UEFI (the ESP's
/// GRUB) and on legacy BIOS (`bios_core` in the BIOS boot partition, [`install_bios_boot`]).
pub fn assemble(out: &Path, parts: &[Partition<'_>], bios_core: &Path, ids: &Ids) -> Result<u64, BakeError> {
    let mut sizes = Vec::with_capacity(parts.len());
    for p in parts {
        let len = std::fs::metadata(p.image).at(p.image)?.len();
        sizes.push(round_up(len, MIB));
    }
    let total = MIB + sizes.iter().sum::<u64>() + MIB;
    let _ = std::fs::remove_file(out);
    let disk = std::fs::OpenOptions::new().read(true).write(true).create_new(true).open(out).at(out)?;
    disk.set_len(total).at(out)?;
    // Lines named pN: sfdisk numbers each partition by the name's digits.
    let mut script = format!("label: gpt\nlabel-id: {}\nunit: sectors\nfirst-lba: {BIOS_BOOT_START}\n", ids.disk);
    let mut at = MIB;
    for (i, (p, size)) in parts.iter().zip(&sizes).enumerate() {
        script.push_str(&format!(
            "p{} : start={}, size={}, type={}, uuid={}, name=\"{}\"\n",
            i + 1,
            at / 512,
            size / 512,
            p.type_guid,
            p.uuid,
            p.name
        ));
        at += size;
    }
    script.push_str(&format!(
        "p{BIOS_BOOT_NUMBER} : start={BIOS_BOOT_START}, size={BIOS_BOOT_SECTORS}, type={BIOS_BOOT_TYPE}, uuid={}, \
         name=\"BIOS boot\"\n",
        ids.bios
    ));
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
    let core = std::fs::read(bios_core).at(bios_core)?;
    let boot = std::fs::read(GRUB_BIOS_BOOT_IMG).at(GRUB_BIOS_BOOT_IMG)?;
    install_bios_boot(&disk, &boot, core).at(out)?;
    Ok(total)
}

/// GRUB's boot sector for i386-pc (grub-pc-bin).
const GRUB_BIOS_BOOT_IMG: &str = "/usr/lib/grub/i386-pc/boot.img";

/// What `grub-bios-setup` does for a core image in a BIOS boot partition, on a file rather than
/// a device: GRUB's boot sector code goes into the protective MBR (its partition table kept)
/// pointing at the core image's first sector; the core image goes into the BIOS boot partition,
/// its first sector's block list pointing at the rest. The offsets are GRUB's
/// (include/grub/i386/pc/boot.h, grub-core/boot/i386/pc/diskboot.S).
fn install_bios_boot(disk: &std::fs::File, boot_img: &[u8], mut core: Vec<u8>) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    const KERNEL_SECTOR: usize = 0x5c;
    const DRIVE_CHECK: usize = 0x66;
    const BPB: std::ops::Range<usize> = 0x03..0x5a;
    const PARTITION_TABLE: std::ops::Range<usize> = 0x1b8..0x200; // and the boot signature
    const BLOCKLIST: usize = 512 - 12;
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    if boot_img.len() != 512 {
        return Err(invalid(format!("GRUB's boot.img is {} bytes, not 512", boot_img.len())));
    }
    if core.len() < 1024 || core.len() as u64 > BIOS_BOOT_SECTORS * 512 {
        return Err(invalid(format!(
            "GRUB's BIOS core image is {} bytes; the BIOS boot partition holds 1024 to {}",
            core.len(),
            BIOS_BOOT_SECTORS * 512
        )));
    }
    let mut mbr = [0u8; 512];
    disk.read_exact_at(&mut mbr, 0)?;
    let mut sector = [0u8; 512];
    sector.copy_from_slice(boot_img);
    sector[BPB].copy_from_slice(&mbr[BPB]);
    sector[PARTITION_TABLE].copy_from_slice(&mbr[PARTITION_TABLE]);
    sector[KERNEL_SECTOR..KERNEL_SECTOR + 8].copy_from_slice(&BIOS_BOOT_START.to_le_bytes());
    // A hard disk: the check for BIOSes that pass a wrong boot drive becomes two NOPs.
    sector[DRIVE_CHECK..DRIVE_CHECK + 2].copy_from_slice(&[0x90, 0x90]);
    // The core image's sectors after the first, contiguous: one block list entry (start, count,
    // load segment), then the terminator grub-mkimage left zeroed.
    let sectors = core.len().div_ceil(512) as u16;
    core.resize(usize::from(sectors) * 512, 0);
    core[BLOCKLIST..BLOCKLIST + 8].copy_from_slice(&(BIOS_BOOT_START + 1).to_le_bytes());
    core[BLOCKLIST + 8..BLOCKLIST + 10].copy_from_slice(&(sectors - 1).to_le_bytes());
    core[BLOCKLIST + 10..BLOCKLIST + 12].copy_from_slice(&0x0820u16.to_le_bytes());
    if core[BLOCKLIST - 12..BLOCKLIST].iter().any(|b| *b != 0) {
        return Err(invalid("GRUB's BIOS core image has no block list terminator".into()));
    }
    disk.write_all_at(&core, BIOS_BOOT_START * 512)?;
    disk.write_all_at(&sector, 0)
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

    #[test]
    fn the_esp_gets_its_own_volume_id() {
        let dir = tempfile::tempdir().unwrap();
        let fs = dir.path().join("esp.img");
        let mkfs = std::process::Command::new("mkfs.vfat")
            .args(["-C", "-F", "32", "--invariant"])
            .arg(&fs)
            .arg("65536")
            .output()
            .expect("mkfs.vfat (dosfstools) runs");
        assert!(mkfs.status.success());
        super::set_fat32_volume_id(&fs, "89ABCDEF").unwrap();
        let uuid =
            std::process::Command::new("blkid").args(["-p", "-o", "value", "-s", "UUID"]).arg(&fs).output().unwrap();
        assert_eq!(String::from_utf8_lossy(&uuid.stdout).trim(), "89AB-CDEF");
        // fsck.fat sees no difference between the boot sector and its backup.
        let fsck = std::process::Command::new("fsck.vfat").args(["-n"]).arg(&fs).output().unwrap();
        assert!(fsck.status.success(), "{}", String::from_utf8_lossy(&fsck.stdout));
        assert!(!String::from_utf8_lossy(&fsck.stdout).contains("differ"), "{}", String::from_utf8_lossy(&fsck.stdout));
    }

    #[test]
    fn bios_boot_code_keeps_the_partition_table_and_points_at_the_core_image() {
        use std::os::unix::fs::FileExt;
        let f = tempfile::tempfile().unwrap();
        f.set_len(1 << 20).unwrap();
        let mut mbr = [0u8; 512];
        mbr[0x1be..0x1ce].copy_from_slice(&[0, 0, 2, 0, 0xee, 0xff, 0xff, 0xff, 1, 0, 0, 0, 0xff, 0xff, 0x1f, 0]);
        mbr[0x1fe..].copy_from_slice(&[0x55, 0xaa]);
        f.write_all_at(&mbr, 0).unwrap();
        let boot = [0x11u8; 512];
        // A core image of 3 sectors and a bit, its block list where grub-mkimage leaves it.
        let mut core = vec![0x22u8; 3 * 512 + 7];
        core[488..512].fill(0);
        super::install_bios_boot(&f, &boot, core.clone()).unwrap();

        let mut got = [0u8; 512];
        f.read_exact_at(&mut got, 0).unwrap();
        assert_eq!(got[0x1b8..], mbr[0x1b8..], "partition table and signature kept");
        assert_eq!(got[..3], [0x11; 3]);
        assert_eq!(u64::from_le_bytes(got[0x5c..0x64].try_into().unwrap()), 34, "core image's first sector");
        assert_eq!(got[0x66..0x68], [0x90, 0x90]);
        let mut first = [0u8; 512];
        f.read_exact_at(&mut first, 34 * 512).unwrap();
        assert_eq!(u64::from_le_bytes(first[500..508].try_into().unwrap()), 35);
        assert_eq!(u16::from_le_bytes(first[508..510].try_into().unwrap()), 3, "sectors after the first");
        assert_eq!(u16::from_le_bytes(first[510..512].try_into().unwrap()), 0x820);
        let mut rest = vec![0u8; 3 * 512];
        f.read_exact_at(&mut rest, 35 * 512).unwrap();
        assert_eq!(rest[..512 * 2 + 7], core[512..]);

        // A core image without the terminator, or too big for the partition: refused.
        let mut bad = vec![0x22u8; 2048];
        bad[500..512].fill(0);
        assert!(super::install_bios_boot(&f, &boot, bad).is_err());
        assert!(super::install_bios_boot(&f, &boot, vec![0; 2015 * 512]).is_err());
    }
}
