//! Compiled kernels kept on disk between runs, so a process compiles its CUDA kernels once per
//! machine rather than once per start (NVRTC's work for our sources is about 20 s of CPU time,
//! half of it flash attention's, and every rank of an `mpirun` pays it at the same time).
//! PyTorch's Triton kernels and the driver's own PTX cache work the same way.
//!
//! An entry holds the exact source it was compiled from and everything else that decides the
//! binary (the program's name, the architecture, NVRTC's version and options), compared
//! byte for byte on every read: the file name's hash only spreads entries, it never decides a
//! hit. A checksum over the binary catches a file damaged on disk. Anything that does not read
//! back exactly is a miss, and the kernel is compiled (and the entry rewritten) as if there
//! were no cache. Entries are written to a temporary file and renamed into place, so ranks
//! starting together never read half an entry.

use std::path::{Path, PathBuf};

const MAGIC: &[u8] = b"dptrain kernel cache 1\n";

/// What decides a compiled kernel file.
#[derive(Debug, Clone)]
pub struct Key<'a> {
    pub name: &'a str,
    pub arch: &'a str,
    /// The compiler and its options (e.g. "nvrtc 13.0 --std=c++17 -default-device").
    pub compiler: &'a str,
    /// The full source compiled (with the common header).
    pub source: &'a str,
}

/// 64-bit FNV-1a: small, and the same in every build (std's hasher may change between
/// Rust releases, which would only cost misses, but the checksum must stay fixed).
pub fn fnv64(parts: &[&[u8]]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for p in parts {
        for &b in *p {
            h ^= b as u64;
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        // A separator, so ("ab", "c") and ("a", "bc") differ.
        h ^= 0xff;
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

/// A directory of compiled kernel files.
#[derive(Debug, Clone)]
pub struct KernelCache {
    dir: PathBuf,
}

impl KernelCache {
    pub fn new(dir: impl Into<PathBuf>) -> KernelCache {
        KernelCache { dir: dir.into() }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn header(key: &Key) -> String {
        format!("{}\n{}\n{}\n", key.name, key.arch, key.compiler)
    }

    /// Where `key`'s entry lives.
    pub fn path(&self, key: &Key) -> PathBuf {
        let h = fnv64(&[Self::header(key).as_bytes(), key.source.as_bytes()]);
        self.dir.join(format!("{}-{}-{h:016x}.cubin", key.name, key.arch))
    }

    /// The binary compiled for exactly `key`, if the cache holds it intact.
    pub fn get(&self, key: &Key) -> Option<Vec<u8>> {
        let bytes = std::fs::read(self.path(key)).ok()?;
        let mut r = Reader { rest: bytes.strip_prefix(MAGIC)? };
        if r.chunk()? != Self::header(key).as_bytes() || r.chunk()? != key.source.as_bytes() {
            return None;
        }
        let sum = u64::from_le_bytes(r.take(8)?.try_into().ok()?);
        let bin = r.chunk()?;
        (r.rest.is_empty() && !bin.is_empty() && fnv64(&[bin]) == sum).then(|| bin.to_vec())
    }

    /// Keeps `bin` as `key`'s binary (replacing any entry there).
    pub fn put(&self, key: &Key, bin: &[u8]) -> Result<(), String> {
        let path = self.path(key);
        let header = Self::header(key);
        let mut out = Vec::with_capacity(MAGIC.len() + header.len() + key.source.len() + bin.len() + 32);
        out.extend_from_slice(MAGIC);
        for chunk in [header.as_bytes(), key.source.as_bytes()] {
            out.extend_from_slice(&(chunk.len() as u64).to_le_bytes());
            out.extend_from_slice(chunk);
        }
        out.extend_from_slice(&fnv64(&[bin]).to_le_bytes());
        out.extend_from_slice(&(bin.len() as u64).to_le_bytes());
        out.extend_from_slice(bin);
        std::fs::create_dir_all(&self.dir).map_err(|e| format!("{}: {e}", self.dir.display()))?;
        // One temporary name per process and thread: ranks and threads writing the same entry
        // each rename a whole file into place.
        let tmp = self.dir.join(format!(
            ".{}.{}.{:?}",
            path.file_name().and_then(|n| n.to_str()).unwrap_or("entry"),
            std::process::id(),
            std::thread::current().id()
        ));
        let written = std::fs::write(&tmp, &out).and_then(|_| std::fs::rename(&tmp, &path));
        if let Err(e) = written {
            let _ = std::fs::remove_file(&tmp);
            return Err(format!("{}: {e}", path.display()));
        }
        Ok(())
    }
}

/// Length-prefixed chunks read off the front of an entry.
struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.rest.len() < n {
            return None;
        }
        let (a, b) = self.rest.split_at(n);
        self.rest = b;
        Some(a)
    }

    fn chunk(&mut self) -> Option<&'a [u8]> {
        let n = u64::from_le_bytes(self.take(8)?.try_into().ok()?);
        self.take(usize::try_from(n).ok()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("dptrain-kcache-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    const KEY: Key = Key { name: "flash", arch: "sm_90", compiler: "nvrtc 13.0 --std=c++17", source: "__global__ void k() {}" };

    #[test]
    fn an_entry_reads_back_only_for_exactly_its_key() {
        let dir = tmp("key");
        let cache = KernelCache::new(&dir);
        assert_eq!(cache.get(&KEY), None);
        cache.put(&KEY, b"\x7fELF binary").unwrap();
        assert_eq!(cache.get(&KEY).as_deref(), Some(&b"\x7fELF binary"[..]));
        // anything else that decides the binary misses, including the same file name: a source
        // whose hash collided would still be compared in full
        for other in [
            Key { source: "__global__ void k() { }", ..KEY },
            Key { arch: "sm_80", ..KEY },
            Key { compiler: "nvrtc 13.1 --std=c++17", ..KEY },
            Key { name: "optim", ..KEY },
        ] {
            assert_eq!(cache.get(&other), None, "{other:?}");
            std::fs::copy(cache.path(&KEY), cache.path(&other)).unwrap();
            assert_eq!(cache.get(&other), None, "{other:?} read another key's entry");
        }
        // a rewrite replaces the entry; no temporary file is left behind
        cache.put(&KEY, b"newer").unwrap();
        assert_eq!(cache.get(&KEY).as_deref(), Some(&b"newer"[..]));
        assert!(std::fs::read_dir(&dir).unwrap().flatten().all(|e| !e.file_name().to_string_lossy().starts_with('.')));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_damaged_entry_is_a_miss() {
        let dir = tmp("damage");
        let cache = KernelCache::new(&dir);
        cache.put(&KEY, b"0123456789abcdef").unwrap();
        let path = cache.path(&KEY);
        let good = std::fs::read(&path).unwrap();
        // every truncation, a byte flipped anywhere, bytes appended, an empty file
        for cut in 0..good.len() {
            std::fs::write(&path, &good[..cut]).unwrap();
            assert_eq!(cache.get(&KEY), None, "truncated to {cut}");
        }
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x20;
            std::fs::write(&path, &bad).unwrap();
            assert_eq!(cache.get(&KEY), None, "byte {i} flipped");
        }
        let mut longer = good.clone();
        longer.push(0);
        std::fs::write(&path, &longer).unwrap();
        assert_eq!(cache.get(&KEY), None);
        // a length field far past the file is a miss, not an allocation or a panic
        let mut huge = good.clone();
        huge[MAGIC.len()..MAGIC.len() + 8].copy_from_slice(&u64::MAX.to_le_bytes());
        std::fs::write(&path, &huge).unwrap();
        assert_eq!(cache.get(&KEY), None);
        std::fs::write(&path, &good).unwrap();
        assert!(cache.get(&KEY).is_some());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_unwritable_cache_is_an_error_to_report_not_a_failure() {
        let dir = tmp("unwritable");
        std::fs::create_dir_all(dir.parent().unwrap()).unwrap();
        std::fs::write(&dir, b"a file where the directory should be").unwrap();
        let cache = KernelCache::new(dir.join("kernels"));
        let e = cache.put(&KEY, b"bin").unwrap_err();
        assert!(e.contains("kernels"), "{e}");
        assert_eq!(cache.get(&KEY), None);
        std::fs::remove_file(&dir).unwrap();
    }

    #[test]
    fn ranks_writing_one_entry_at_once_leave_a_whole_one() {
        let dir = tmp("race");
        let cache = KernelCache::new(&dir);
        let bin: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..5 {
                        cache.put(&KEY, &bin).unwrap();
                        // a reader never sees a partial entry
                        if let Some(got) = cache.get(&KEY) {
                            assert!(got == bin);
                        }
                    }
                });
            }
        });
        assert!(cache.get(&KEY).unwrap() == bin);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn the_checksum_is_fixed() {
        // FNV-1a's published offset basis for the empty input, then our separator
        assert_eq!(fnv64(&[]), 0xcbf2_9ce4_8422_2325);
        assert_ne!(fnv64(&[b"ab", b"c"]), fnv64(&[b"a", b"bc"]));
        // pinned when it was written: a change would make every entry on users' disks a miss
        // (the byte loop alone gives FNV-1a's published 0xaf63dc4c8601ec8c for "a")
        assert_eq!(fnv64(&[b"dptrain"]), 0x0430_3eb7_677f_fc4e);
    }
}
