//! SHA-256 as imgbuild names things by it: cache blobs, lock pins, outputs in manifest.json,
//! root file systems and base trees by the digest of their inputs.

use std::io::Read;
use std::path::Path;

use ring::digest;

/// Lower-case hex of bytes.
pub fn hex(b: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(2 * b.len());
    for x in b {
        s.push(char::from(DIGITS[usize::from(x >> 4)]));
        s.push(char::from(DIGITS[usize::from(x & 15)]));
    }
    s
}

/// Hex SHA-256 of bytes.
pub fn sha256_hex(b: &[u8]) -> String {
    hex(digest::digest(&digest::SHA256, b).as_ref())
}

/// Feeds a file to `f`, a MiB at a time.
fn each_block(path: &Path, mut f: impl FnMut(&[u8])) -> std::io::Result<()> {
    let mut file = std::fs::File::open(path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match file.read(&mut buf)? {
            0 => return Ok(()),
            n => f(&buf[..n]),
        }
    }
}

/// A file's hex SHA-256.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut s256 = digest::Context::new(&digest::SHA256);
    each_block(path, |b| s256.update(b))?;
    Ok(hex(s256.finish().as_ref()))
}

/// A file's hex SHA-256 and SHA-512 (definitions may pin either).
pub fn sha256_and_512_file(path: &Path) -> std::io::Result<(String, String)> {
    let (mut s256, mut s512) = (digest::Context::new(&digest::SHA256), digest::Context::new(&digest::SHA512));
    each_block(path, |b| {
        s256.update(b);
        s512.update(b);
    })?;
    Ok((hex(s256.finish().as_ref()), hex(s512.finish().as_ref())))
}

#[cfg(test)]
mod tests {
    #[test]
    fn known_digests() {
        assert_eq!(super::sha256_hex(b"hello"), "2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824");
        assert_eq!(super::hex(&[0, 15, 255]), "000fff");
    }
}
