//! Stream-optimized VMDK, the disk format of an OVA (VMware Virtual Disk Format 5.0, "Stream-
//! Optimized Compressed Sparse Extents"): a header whose grain directory is at the end, the
//! embedded descriptor, then every non-zero 64 KiB grain deflated behind a grain marker, each
//! grain table after the grains it maps, the grain directory, a footer (the header again, now with
//! the directory's offset) and an end-of-stream marker. The file is written front to back, as the
//! format intends, with the grains deflated on every core. Durability is the caller's: a bake
//! flushes each output once it is finished.
//!
//! Written here rather than by `qemu-img convert -O vmdk`, which compresses on one core and was
//! half of a warm bake; `qemu-img` still reads every VMDK back in the image tests.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

use flate2::Compression;
use flate2::write::ZlibEncoder;
use ring::digest;

const SECTOR: u64 = 512;
/// Sectors per grain (64 KiB), and grain-table entries per table: the values VMware writes.
const GRAIN_SECTORS: u64 = 128;
const GTES_PER_GT: u64 = 512;
const GRAIN_BYTES: usize = (GRAIN_SECTORS * SECTOR) as usize;
/// Sectors of embedded descriptor, and where the first grain may start (one grain in).
const DESCRIPTOR_SECTORS: u64 = 20;
const OVERHEAD_SECTORS: u64 = GRAIN_SECTORS;
const GD_AT_END: u64 = u64::MAX;
/// Flags: valid new-line detection test, compressed grains, markers.
const FLAGS: u32 = 1 | 1 << 16 | 1 << 17;
const MARKER_EOS: u32 = 0;
const MARKER_GT: u32 = 1;
const MARKER_GD: u32 = 2;
const MARKER_FOOTER: u32 = 3;

/// What was written: the file's size and SHA-256 (hex), computed on the way out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Bytes written.
    pub size: u64,
    /// Hex SHA-256 of the bytes written.
    pub sha256: String,
}

/// The 512-byte sparse extent header.
fn header(capacity: u64, gd_offset: u64) -> [u8; SECTOR as usize] {
    let mut h = [0u8; SECTOR as usize];
    let mut at = 0;
    let mut put = |bytes: &[u8]| {
        h[at..at + bytes.len()].copy_from_slice(bytes);
        at += bytes.len();
    };
    put(b"KDMV");
    put(&3u32.to_le_bytes()); // version 3: what VMware requires of stream-optimized extents
    put(&FLAGS.to_le_bytes());
    put(&capacity.to_le_bytes());
    put(&GRAIN_SECTORS.to_le_bytes());
    put(&1u64.to_le_bytes()); // descriptor offset
    put(&DESCRIPTOR_SECTORS.to_le_bytes());
    put(&(GTES_PER_GT as u32).to_le_bytes());
    put(&0u64.to_le_bytes()); // no redundant grain directory
    put(&gd_offset.to_le_bytes());
    put(&OVERHEAD_SECTORS.to_le_bytes());
    put(&[0]); // clean shutdown
    put(b"\n \r\n"); // new-line detection characters
    put(&1u16.to_le_bytes()); // deflate
    h
}

/// A metadata marker: the number of sectors that follow, and their kind.
fn marker(sectors: u64, kind: u32) -> [u8; SECTOR as usize] {
    let mut m = [0u8; SECTOR as usize];
    m[..8].copy_from_slice(&sectors.to_le_bytes());
    m[12..16].copy_from_slice(&kind.to_le_bytes());
    m
}

/// The embedded descriptor, for a disk behind a SCSI controller as the OVF declares it.
fn descriptor(capacity: u64, file_name: &str, content_id: &[u8; 16]) -> Vec<u8> {
    let hex = crate::digest::hex(content_id);
    let cylinders = (capacity / (255 * 63)).clamp(1, 65535);
    let text = format!(
        "# Disk DescriptorFile\nversion=1\nencoding=\"UTF-8\"\nCID={cid}\nparentCID=ffffffff\n\
         createType=\"streamOptimized\"\n\n# Extent description\nRW {capacity} SPARSE \"{file_name}\"\n\n\
         # The Disk Data Base\n#DDB\n\nddb.adapterType = \"lsilogic\"\nddb.geometry.cylinders = \"{cylinders}\"\n\
         ddb.geometry.heads = \"255\"\nddb.geometry.sectors = \"63\"\nddb.longContentID = \"{hex}\"\n\
         ddb.virtualHWVersion = \"4\"\n",
        cid = &hex[..8],
    );
    let mut d = text.into_bytes();
    d.resize((DESCRIPTOR_SECTORS * SECTOR) as usize, 0);
    d
}

/// A grain as it goes into the file: marker (LBA, length), deflated data, padding to a sector.
/// `None` for a grain of zeros, which the format leaves out.
fn grain(lba: u64, data: &[u8], level: Compression) -> std::io::Result<Option<Vec<u8>>> {
    if data.iter().all(|b| *b == 0) {
        return Ok(None);
    }
    let mut z = ZlibEncoder::new(Vec::with_capacity(12 + data.len() / 2), level);
    z.get_mut().extend_from_slice(&lba.to_le_bytes());
    z.get_mut().extend_from_slice(&[0; 4]);
    z.write_all(data)?;
    let mut out = z.finish()?;
    let len = (out.len() - 12) as u32;
    out[8..12].copy_from_slice(&len.to_le_bytes());
    out.resize(out.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
    Ok(Some(out))
}

/// Counts and hashes what goes out.
struct Out<W: Write> {
    inner: W,
    sha256: digest::Context,
    written: u64,
}

impl<W: Write> Out<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.inner.write_all(bytes)?;
        self.sha256.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    fn sector(&self) -> u64 {
        self.written / SECTOR
    }
}

/// Grains per unit of work: 4 MiB.
const CHUNK_GRAINS: usize = 64;

/// Indices of the grains that overlap data, in order.
fn data_grains(extents: &[(u64, u64)], grains: u64) -> Vec<u64> {
    let grain = GRAIN_SECTORS * SECTOR;
    let mut out: Vec<u64> = Vec::new();
    for &(start, end) in extents {
        let first = (start / grain).max(out.last().map_or(0, |l| l + 1));
        out.extend(first..end.div_ceil(grain).min(grains));
    }
    out
}

/// Writes a raw disk image (a whole number of sectors) as a stream-optimized VMDK into `sink`
/// (sequentially; buffered here); `file_name` is the name the descriptor gives the extent, and
/// the content ID is derived from the disk's bytes, so the same disk always gives the same VMDK.
///
/// One thread reads the grains that hold data (holes are skipped), a worker per core deflates
/// them, and this thread writes them in order with the grain tables between.
/// The disk's bytes count on `progress` as their grains are written (holes at once).
pub fn write(
    raw: &Path,
    sink: impl Write,
    file_name: &str,
    level: Compression,
    progress: Option<&crate::progress::Task>,
) -> std::io::Result<Written> {
    use std::os::unix::fs::FileExt;
    use std::sync::mpsc::{Receiver, sync_channel};
    use std::sync::{Arc, Mutex};

    let src = File::open(raw)?;
    let len = src.metadata()?.len();
    if len % SECTOR != 0 {
        return Err(std::io::Error::other(format!("{}: {len} bytes is not a whole number of sectors", raw.display())));
    }
    let capacity = len / SECTOR;
    let grains = capacity.div_ceil(GRAIN_SECTORS);
    let tables = grains.div_ceil(GTES_PER_GT);
    let todo = data_grains(&super::disk::data_extents(&src, len)?, grains);
    let workers = std::thread::available_parallelism().map_or(1, |n| n.get());

    // The descriptor's content ID must be known before the content: a digest of the disk's size
    // and first MiB (the partition table and so the disk's GUIDs) is stable and tells disks apart.
    let mut first = vec![0u8; (1 << 20).min(len as usize)];
    src.read_exact_at(&mut first, 0)?;
    let mut id = [0u8; 16];
    let mut id_ctx = digest::Context::new(&digest::SHA256);
    id_ctx.update(&len.to_le_bytes());
    id_ctx.update(&first);
    id.copy_from_slice(&id_ctx.finish().as_ref()[..16]);

    let mut out = Out {
        inner: BufWriter::with_capacity(1 << 20, sink),
        sha256: digest::Context::new(&digest::SHA256),
        written: 0,
    };
    out.put(&header(capacity, GD_AT_END))?;
    out.put(&descriptor(capacity, file_name, &id))?;
    out.put(&vec![0; ((OVERHEAD_SECTORS - 1 - DESCRIPTOR_SECTORS) * SECTOR) as usize])?;

    type Chunk = (usize, Vec<u64>, Vec<u8>);
    type Done = (usize, Vec<(u64, Option<Vec<u8>>)>);
    let (work_tx, work_rx) = sync_channel::<Chunk>(2 * workers);
    let (done_tx, done_rx) = sync_channel::<std::io::Result<Done>>(2 * workers);
    let work_rx: Arc<Mutex<Receiver<Chunk>>> = Arc::new(Mutex::new(work_rx));
    let mut directory = Vec::with_capacity(tables as usize * 4);
    std::thread::scope(|s| -> std::io::Result<()> {
        let src = &src;
        let reader = s.spawn(move || -> std::io::Result<()> {
            for (seq, run) in todo.chunks(CHUNK_GRAINS).enumerate() {
                let mut data = vec![0u8; run.len() * GRAIN_BYTES];
                for (g, buf) in run.iter().zip(data.chunks_mut(GRAIN_BYTES)) {
                    let at = g * GRAIN_SECTORS * SECTOR;
                    let n = (len - at).min(GRAIN_BYTES as u64) as usize;
                    src.read_exact_at(&mut buf[..n], at)?;
                }
                if work_tx.send((seq, run.to_vec(), data)).is_err() {
                    break; // the writer stopped; its error is the one to report
                }
            }
            Ok(())
        });
        for _ in 0..workers {
            let (rx, tx) = (work_rx.clone(), done_tx.clone());
            s.spawn(move || {
                loop {
                    #[expect(
                        clippy::expect_used,
                        reason = "held only for recv(), which does not panic: never poisoned"
                    )]
                    let next = rx.lock().expect("work queue").recv();
                    let Ok((seq, run, data)) = next else { break };
                    let done: std::io::Result<Vec<_>> = run
                        .iter()
                        .zip(data.chunks(GRAIN_BYTES))
                        .map(|(g, d)| grain(g * GRAIN_SECTORS, d, level).map(|c| (*g, c)))
                        .collect();
                    if tx.send(done.map(|d| (seq, d))).is_err() {
                        break;
                    }
                }
            });
        }
        // Only the workers hold the queues now: when the writer stops early, they stop, and then
        // the reader does.
        drop((done_tx, work_rx));

        // Write chunks in order; a grain table goes out once its last grain is behind it.
        let mut pending = std::collections::BTreeMap::new();
        let (mut next, mut table, mut gt) = (0usize, 0u64, vec![0u8; (GTES_PER_GT * 4) as usize]);
        let flush_table = |out: &mut Out<_>, gt: &mut Vec<u8>, directory: &mut Vec<u8>| {
            out.put(&marker(gt.len() as u64 / SECTOR, MARKER_GT))?;
            directory.extend_from_slice(&(out.sector() as u32).to_le_bytes());
            out.put(gt)?;
            gt.fill(0);
            std::io::Result::Ok(())
        };
        for done in done_rx {
            let (seq, chunk) = done?;
            pending.insert(seq, chunk);
            while let Some(chunk) = pending.remove(&next) {
                for (g, c) in chunk {
                    if let Some(p) = progress {
                        p.set_position((g + 1) * GRAIN_SECTORS * SECTOR);
                    }
                    while g / GTES_PER_GT > table {
                        flush_table(&mut out, &mut gt, &mut directory)?;
                        table += 1;
                    }
                    if let Some(c) = c {
                        let i = (g % GTES_PER_GT) as usize * 4;
                        gt[i..i + 4].copy_from_slice(&(out.sector() as u32).to_le_bytes());
                        out.put(&c)?;
                    }
                }
                next += 1;
            }
        }
        #[expect(clippy::expect_used, reason = "join fails only if the reader panicked, a bug: the panic goes on")]
        reader.join().expect("VMDK reader panicked")?;
        while table < tables {
            flush_table(&mut out, &mut gt, &mut directory)?;
            table += 1;
        }
        Ok(())
    })?;
    directory.resize(directory.len().div_ceil(SECTOR as usize) * SECTOR as usize, 0);
    out.put(&marker(directory.len() as u64 / SECTOR, MARKER_GD))?;
    let gd_offset = out.sector();
    out.put(&directory)?;
    out.put(&marker(1, MARKER_FOOTER))?;
    out.put(&header(capacity, gd_offset))?;
    out.put(&marker(0, MARKER_EOS))?;
    out.inner.flush()?;
    Ok(Written { size: out.written, sha256: crate::digest::hex(out.sha256.finish().as_ref()) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields_sit_where_the_format_puts_them() {
        let h = header(3551232, GD_AT_END);
        assert_eq!(&h[0..4], b"KDMV");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(h[8..12].try_into().unwrap()), 0x0003_0001);
        assert_eq!(u64::from_le_bytes(h[12..20].try_into().unwrap()), 3551232);
        assert_eq!(u64::from_le_bytes(h[20..28].try_into().unwrap()), 128);
        assert_eq!(u32::from_le_bytes(h[44..48].try_into().unwrap()), 512);
        assert_eq!(u64::from_le_bytes(h[56..64].try_into().unwrap()), GD_AT_END);
        assert_eq!(&h[73..77], b"\n \r\n");
        assert_eq!(u16::from_le_bytes(h[77..79].try_into().unwrap()), 1);
    }

    #[test]
    fn zero_grains_are_left_out_and_others_carry_their_lba() {
        assert!(grain(0, &[0; GRAIN_BYTES], Compression::fast()).unwrap().is_none());
        let mut data = vec![0u8; GRAIN_BYTES];
        data[100] = 7;
        let g = grain(256, &data, Compression::fast()).unwrap().unwrap();
        assert_eq!(u64::from_le_bytes(g[..8].try_into().unwrap()), 256);
        assert_eq!(g.len() % 512, 0);
        let n = u32::from_le_bytes(g[8..12].try_into().unwrap()) as usize;
        let mut back = Vec::new();
        use std::io::Read;
        flate2::read::ZlibDecoder::new(&g[12..12 + n]).read_to_end(&mut back).unwrap();
        assert_eq!(back, data);
    }

    /// qemu-img, an independent reader of the format, checks what we write and converts it back
    /// to the same bytes: data, holes, zero blocks written out, a last table that is not full
    /// and a last grain that is not whole.
    #[test]
    fn qemu_img_reads_it_back_to_the_same_bytes() {
        use std::os::unix::fs::FileExt;
        let d = tempfile::tempdir().unwrap();
        let raw = d.path().join("disk.raw");
        let len = 3 * GTES_PER_GT * GRAIN_SECTORS * SECTOR + 5 * GRAIN_BYTES as u64 + 3 * SECTOR;
        let f = File::create(&raw).unwrap();
        f.set_len(len).unwrap();
        let mut noise = vec![0u8; 3 << 20];
        ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut noise).unwrap();
        f.write_all_at(&noise, 0).unwrap();
        f.write_all_at(&vec![0u8; 2 << 20], 40 << 20).unwrap(); // zeros that are not a hole
        f.write_all_at(b"text text text text", 70 << 20).unwrap();
        f.write_all_at(&noise[..1000], len - 1000).unwrap();
        drop(f);
        let vmdk = d.path().join("disk.vmdk");
        let w = write(&raw, File::create(&vmdk).unwrap(), "disk.vmdk", Compression::fast(), None).unwrap();
        assert_eq!(w.size, std::fs::metadata(&vmdk).unwrap().len());
        assert_eq!(w.sha256, crate::digest::sha256_file(&vmdk).unwrap());
        let qemu = |args: &[&str]| {
            let o = std::process::Command::new("qemu-img").args(args).output().expect("qemu-img (qemu-utils)");
            assert!(o.status.success(), "qemu-img {args:?}: {}", String::from_utf8_lossy(&o.stderr));
            String::from_utf8(o.stdout).unwrap()
        };
        let v = vmdk.to_str().unwrap();
        qemu(&["check", "-f", "vmdk", v]);
        let info: serde_json::Value = serde_json::from_str(&qemu(&["info", "--output=json", v])).unwrap();
        assert_eq!(info["format-specific"]["data"]["create-type"], "streamOptimized");
        assert_eq!(info["virtual-size"], len);
        let back = d.path().join("back.raw");
        qemu(&["convert", "-f", "vmdk", "-O", "raw", v, back.to_str().unwrap()]);
        assert!(std::fs::read(&back).unwrap() == std::fs::read(&raw).unwrap(), "the VMDK reads back differently");
        // The same disk gives the same file.
        let again =
            write(&raw, File::create(d.path().join("again.vmdk")).unwrap(), "disk.vmdk", Compression::fast(), None)
                .unwrap();
        assert_eq!(again, w);
    }

    #[test]
    fn a_disk_that_is_not_whole_sectors_is_refused() {
        let d = tempfile::tempdir().unwrap();
        std::fs::write(d.path().join("odd.raw"), [1u8; 1000]).unwrap();
        let e = write(&d.path().join("odd.raw"), std::io::sink(), "x.vmdk", Compression::fast(), None).unwrap_err();
        assert!(e.to_string().contains("not a whole number of sectors"), "{e}");
    }
}
