//! Helpers for the hostile-archive suite (`tests/tests/hostile_archives_e2e.rs`): layer tars
//! no honest tool writes, and the checks that loading them wrote nothing where it should not.
//!
//! Owns: a tar writer for every member kind an attacker can use (names of any length through
//! GNU long-name records, `..` and absolute names and link targets kept as given, hard links,
//! character and block devices, fifos, GNU sparse files of any apparent size), gzip of a layer,
//! a deep-tree layer, disk use (`du`) of a tree, finding files by name under a directory, and
//! the scratch directory a test loads its archives into (an image store, an `outside`
//! directory a hostile entry aims at, a name no file may ever carry). Does not own: the plain
//! ustar writer and the archive formats (`docker_archive`, `oci_archive`: [`crate::images`]),
//! running stagehand ([`crate::e2e`]), or what a test asserts about stagehand's output.

use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// One member of a tar written by [`tar`].
#[derive(Debug, Clone)]
pub enum Member {
    /// A regular file with a mode.
    File {
        name: String,
        data: Vec<u8>,
        mode: u32,
    },
    /// A directory with a mode.
    Dir { name: String, mode: u32 },
    /// A symbolic link `name -> target`.
    Symlink { name: String, target: String },
    /// A hard link `name` to the member `target`.
    HardLink { name: String, target: String },
    /// A character device.
    Char {
        name: String,
        major: u32,
        minor: u32,
    },
    /// A block device.
    Block {
        name: String,
        major: u32,
        minor: u32,
    },
    /// A named pipe.
    Fifo { name: String },
    /// A GNU sparse file (type `S`) of `size` bytes: `data` at offset 0 (a multiple of 512
    /// bytes long) and `tail` at `size - tail.len()`, holes in between.
    Sparse {
        name: String,
        size: u64,
        data: Vec<u8>,
        tail: Vec<u8>,
    },
}

impl Member {
    /// A regular file, mode 0644.
    pub fn file(name: &str, data: impl Into<Vec<u8>>) -> Member {
        Member::File {
            name: name.into(),
            data: data.into(),
            mode: 0o644,
        }
    }

    /// A directory, mode 0755.
    pub fn dir(name: &str) -> Member {
        Member::Dir {
            name: name.into(),
            mode: 0o755,
        }
    }

    /// A symbolic link `name -> target`.
    pub fn symlink(name: &str, target: &str) -> Member {
        Member::Symlink {
            name: name.into(),
            target: target.into(),
        }
    }

    /// A hard link `name` to `target`.
    pub fn hard_link(name: &str, target: &str) -> Member {
        Member::HardLink {
            name: name.into(),
            target: target.into(),
        }
    }
}

/// A tar of `members`, names and link targets written exactly as given (long ones through GNU
/// `././@LongLink` records), owner 0:0, mtime 0, ending with the two zero blocks.
pub fn tar(members: &[Member]) -> Vec<u8> {
    let mut out = Vec::new();
    for m in members {
        match m {
            Member::File { name, data, mode } => {
                header(&mut out, name, b'0', "", data.len() as u64, *mode, (0, 0));
                out.extend_from_slice(data);
                pad(&mut out);
            }
            Member::Dir { name, mode } => header(&mut out, name, b'5', "", 0, *mode, (0, 0)),
            Member::Symlink { name, target } => {
                header(&mut out, name, b'2', target, 0, 0o777, (0, 0))
            }
            Member::HardLink { name, target } => {
                header(&mut out, name, b'1', target, 0, 0o644, (0, 0))
            }
            Member::Char { name, major, minor } => {
                header(&mut out, name, b'3', "", 0, 0o666, (*major, *minor))
            }
            Member::Block { name, major, minor } => {
                header(&mut out, name, b'4', "", 0, 0o666, (*major, *minor))
            }
            Member::Fifo { name } => header(&mut out, name, b'6', "", 0, 0o644, (0, 0)),
            Member::Sparse {
                name,
                size,
                data,
                tail,
            } => sparse(&mut out, name, *size, data, tail),
        }
    }
    out.resize(out.len() + 1024, 0);
    out
}

fn pad(out: &mut Vec<u8>) {
    out.resize(out.len().next_multiple_of(512), 0);
}

/// A GNU long name (`L`) or long link (`K`) record carrying `value`.
fn long_record(out: &mut Vec<u8>, kind: u8, value: &str) {
    let mut data = value.as_bytes().to_vec();
    data.push(0);
    let h = block("././@LongLink", kind, "", data.len() as u64, 0o644, (0, 0));
    out.extend_from_slice(&h);
    out.extend_from_slice(&data);
    pad(out);
}

fn header(
    out: &mut Vec<u8>,
    name: &str,
    kind: u8,
    link: &str,
    size: u64,
    mode: u32,
    dev: (u32, u32),
) {
    if link.len() > 100 {
        long_record(out, b'K', link);
    }
    if name.len() > 100 {
        long_record(out, b'L', name);
    }
    let short = |s: &str| -> String { s.chars().take(100).collect() };
    out.extend_from_slice(&block(&short(name), kind, &short(link), size, mode, dev));
}

/// One GNU-magic header block, checksummed.
fn block(name: &str, kind: u8, link: &str, size: u64, mode: u32, dev: (u32, u32)) -> [u8; 512] {
    let mut h = [0u8; 512];
    let name = &name.as_bytes()[..name.len().min(100)];
    let link = &link.as_bytes()[..link.len().min(100)];
    h[..name.len()].copy_from_slice(name);
    h[100..108].copy_from_slice(format!("{mode:07o}\0").as_bytes());
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    h[124..136].copy_from_slice(format!("{size:011o}\0").as_bytes());
    h[136..148].copy_from_slice(b"00000000000\0");
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link);
    h[257..265].copy_from_slice(b"ustar  \0");
    h[329..337].copy_from_slice(format!("{:07o}\0", dev.0).as_bytes());
    h[337..345].copy_from_slice(format!("{:07o}\0", dev.1).as_bytes());
    checksum(&mut h);
    h
}

fn checksum(h: &mut [u8; 512]) {
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
}

/// GNU base-256 number in a 12-byte field: 10 GiB does not fit eleven octal digits.
fn base256(field: &mut [u8], v: u64) {
    field.fill(0);
    field[0] = 0x80;
    field[4..12].copy_from_slice(&v.to_be_bytes());
}

fn sparse(out: &mut Vec<u8>, name: &str, size: u64, data: &[u8], tail: &[u8]) {
    assert!(
        data.len().is_multiple_of(512),
        "all but the last sparse chunk must fill whole blocks"
    );
    assert!(name.len() <= 100, "sparse member name too long: {name}");
    let mut h = block(name, b'S', "", 0, 0o644, (0, 0));
    base256(&mut h[124..136], (data.len() + tail.len()) as u64);
    // Sparse map in the header: (offset, length) x 4 from byte 386; the last, empty, block
    // at the end of the file says where it ends.
    let map = [
        (0, data.len() as u64),
        (size - tail.len() as u64, tail.len() as u64),
        (size, 0),
    ];
    for (i, (offset, len)) in map.iter().enumerate() {
        base256(&mut h[386 + i * 24..398 + i * 24], *offset);
        base256(&mut h[398 + i * 24..410 + i * 24], *len);
    }
    base256(&mut h[483..495], size);
    checksum(&mut h);
    out.extend_from_slice(&h);
    out.extend_from_slice(data);
    out.extend_from_slice(tail);
    pad(out);
}

/// Directories `d/`, `d/d/`, ... `depth` deep (as `name/` components), and a file `bottom`
/// holding `found` at the bottom. Returns the tar and the path of `bottom`.
pub fn deep_layer(depth: usize, component: &str) -> (Vec<u8>, String) {
    let mut members = Vec::with_capacity(depth + 1);
    let mut path = String::new();
    for _ in 0..depth {
        path.push_str(component);
        path.push('/');
        members.push(Member::dir(&path));
    }
    let bottom = format!("{path}bottom");
    members.push(Member::file(&bottom, "found\n"));
    (tar(&members), bottom)
}

/// `bytes` gzip-compressed.
pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(bytes).expect("gzip into memory");
    gz.finish().expect("gzip into memory")
}

/// Bytes of disk that the tree at `path` uses (`du`: allocated blocks, symlinks not
/// followed, hard links counted once).
pub fn du_bytes(path: &Path) -> u64 {
    let mut seen = std::collections::HashSet::new();
    du_walk(path, &mut seen)
}

fn du_walk(path: &Path, seen: &mut std::collections::HashSet<(u64, u64)>) -> u64 {
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return 0;
    };
    let mut total = if seen.insert((meta.dev(), meta.ino())) {
        meta.blocks() * 512
    } else {
        0
    };
    if meta.is_dir() {
        for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
            total += du_walk(&e.path(), seen);
        }
    }
    total
}

/// Every path under `dir` (not following symlinks) whose file name contains `needle`.
pub fn files_named(dir: &Path, needle: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return found;
    };
    for e in entries.flatten() {
        if e.file_name().to_string_lossy().contains(needle) {
            found.push(e.path());
        }
        if e.file_type().is_ok_and(|t| t.is_dir()) {
            found.extend(files_named(&e.path(), needle));
        }
    }
    found
}

/// Where a test's archives go and where they aim: `<temp>/<marker>-hostile-*/` holding the
/// image store (`store/`), an empty directory `outside/` a hostile entry points at, and the
/// archives. Removed (store included) when dropped.
pub struct Scratch {
    dir: tempfile::TempDir,
    /// A name no file anywhere may carry after a load: hostile entries use it.
    pub escape: String,
}

impl Scratch {
    /// A fresh scratch directory for the test with `marker`.
    pub fn new(marker: &str) -> Scratch {
        let dir = tempfile::Builder::new()
            .prefix(&format!("{marker}-hostile-"))
            .tempdir()
            .expect("create the scratch dir");
        std::fs::create_dir(dir.path().join("outside")).expect("create outside/");
        Scratch {
            dir,
            escape: format!("escape-{marker}"),
        }
    }

    /// The scratch directory.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The image store.
    pub fn store(&self) -> PathBuf {
        self.dir.path().join("store")
    }

    /// The directory hostile entries aim at; it must stay empty.
    pub fn outside(&self) -> PathBuf {
        self.dir.path().join("outside")
    }

    /// Write `bytes` as the archive `name` in the scratch directory.
    pub fn archive(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.dir.path().join(name);
        std::fs::write(&p, bytes).unwrap_or_else(|e| panic!("write {}: {e}", p.display()));
        p
    }

    /// Panic if anything was written where a hostile entry aimed: into `outside/`, under
    /// any name carrying [`Scratch::escape`] in the scratch dir (store included), in the temp
    /// dir, in `/` or in `/etc`.
    pub fn assert_nothing_outside(&self, case: &str) {
        let outside: Vec<PathBuf> = std::fs::read_dir(self.outside())
            .expect("read outside/")
            .flatten()
            .map(|e| e.path())
            .collect();
        assert!(
            outside.is_empty(),
            "{case}: written into {}: {outside:#?}",
            self.outside().display()
        );
        let mut named = files_named(self.path(), &self.escape);
        named.extend(
            [
                std::env::temp_dir().join(&self.escape),
                Path::new("/").join(&self.escape),
                Path::new("/etc").join(&self.escape),
            ]
            .into_iter()
            .filter(|p| p.symlink_metadata().is_ok()),
        );
        assert!(named.is_empty(), "{case}: wrote outside: {named:#?}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_names_get_a_gnu_record_and_devices_their_numbers() {
        let long = "x/".repeat(80);
        let t = tar(&[
            Member::dir(&long),
            Member::Char {
                name: "mem".into(),
                major: 1,
                minor: 1,
            },
        ]);
        // LongLink header, its data block (161 bytes + NUL), the dir header, the device.
        assert_eq!(&t[..13], b"././@LongLink");
        assert_eq!(t[156], b'L');
        assert_eq!(&t[512..512 + long.len()], long.as_bytes());
        assert_eq!(t[1024 + 156], b'5');
        assert_eq!(t[1536 + 156], b'3');
        assert_eq!(&t[1536 + 329..1536 + 337], b"0000001\0");
        assert_eq!(t.len(), 4 * 512 + 1024);
    }

    #[test]
    fn sparse_member_maps_data_tail_and_end() {
        let t = tar(&[Member::Sparse {
            name: "s".into(),
            size: 10 << 30,
            data: vec![1; 512],
            tail: b"tail".to_vec(),
        }]);
        assert_eq!(t[156], b'S');
        // realsize in base-256.
        assert_eq!(t[483], 0x80);
        assert_eq!(&t[487..495], &(10u64 << 30).to_be_bytes());
        // Header, 512 data bytes, the tail padded to a block, the end.
        assert_eq!(t.len(), 512 + 512 + 512 + 1024);
    }

    #[test]
    fn du_counts_blocks_not_apparent_size() {
        let dir = tempfile::tempdir().unwrap();
        let f = std::fs::File::create(dir.path().join("holes")).unwrap();
        f.set_len(1 << 30).unwrap();
        assert!(du_bytes(dir.path()) < 1 << 20);
    }
}
