//! Small files that come with their directory: when a reader goes through a directory's files
//! one after another (`grep -r`, `rg`, an editor opening a project), the contents of that
//! directory's small regular files are fetched in one agent request and reads are served from
//! them, instead of one round trip per file. Pure bookkeeping: which directory to fetch, which
//! names to ask for, and what is held and until when.
//!
//! A directory's batch is fetched when one of its small files is read and either the directory
//! was listed within the TTL (a walk: the reader listed it, then reads what it found) or
//! another of its files was read within the TTL. A single `cat` of one file costs no batch.
//! Bytes are held for the attribute TTL from the moment the agent read them, the same bound
//! every cached attribute has: a file changed in the pod is never served stale for longer.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrord_protocol::fs::{FileBatch, FileKind, MAX_BATCH_BYTES, MAX_BATCH_FILE, MAX_BATCH_FILES};

use crate::cache::Listing;

/// Most bytes held at once; past it everything held is dropped (it is at most a TTL old).
const MAX_HELD: usize = 64 * 1024 * 1024;
/// Most directories remembered as read from; past it the table starts over.
const MAX_DIRS: usize = 4096;

struct Held {
    bytes: Arc<[u8]>,
    fetched: Instant,
}

pub struct Prefetch {
    ttl: Duration,
    /// By path.
    held: HashMap<String, Held>,
    held_bytes: usize,
    /// When a small file of each directory was last read from the agent.
    read_in: HashMap<String, Instant>,
}

/// Whether a file of this size and kind ever travels in a batch.
pub fn batchable(kind: FileKind, size: u64) -> bool {
    kind == FileKind::File && size <= MAX_BATCH_FILE
}

impl Prefetch {
    pub fn new(ttl: Duration) -> Self {
        Prefetch {
            ttl,
            held: HashMap::new(),
            held_bytes: 0,
            read_in: HashMap::new(),
        }
    }

    fn fresh(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) < self.ttl
    }

    /// The bytes of `path` if a batch brought them within the TTL.
    pub fn get(&self, path: &str, now: Instant) -> Option<Arc<[u8]>> {
        let held = self.held.get(path)?;
        self.fresh(held.fetched, now).then(|| held.bytes.clone())
    }

    /// A small file of `dir` is about to be read from the agent: whether to fetch the
    /// directory's batch instead. `listed`: the directory was listed within the TTL.
    pub fn wants_batch(&mut self, dir: &str, listed: bool, now: Instant) -> bool {
        let again = self
            .read_in
            .get(dir)
            .is_some_and(|&read| self.fresh(read, now));
        if self.read_in.len() >= MAX_DIRS && !self.read_in.contains_key(dir) {
            self.read_in.clear();
        }
        self.read_in.insert(dir.to_owned(), now);
        listed || again
    }

    /// The names of `dir` to ask for: `first`, then the small regular files after it in the
    /// listing (then those before it), leaving out those held fresh, within the batch bounds
    /// by their listed sizes.
    pub fn plan(&self, dir: &str, listing: &Listing, first: &str, now: Instant) -> Vec<String> {
        let entries = listing.entries();
        let start = entries.iter().position(|e| e.name == first).unwrap_or(0);
        let mut names = Vec::new();
        let mut bytes = 0u64;
        for entry in entries[start..].iter().chain(&entries[..start]) {
            if names.len() == MAX_BATCH_FILES {
                break;
            }
            if !batchable(entry.attr.kind, entry.attr.size)
                || self
                    .get(&crate::inodes::join(dir, &entry.name), now)
                    .is_some()
            {
                continue;
            }
            if bytes + entry.attr.size > MAX_BATCH_BYTES as u64 {
                break;
            }
            bytes += entry.attr.size;
            names.push(entry.name.clone());
        }
        names
    }

    /// Holds what a batch of `dir` brought, read by the agent at about `now`.
    pub fn store(&mut self, dir: &str, batch: &FileBatch, now: Instant) {
        let Some(files) = batch.split() else {
            return;
        };
        let ttl = self.ttl;
        self.held
            .retain(|_, held| now.saturating_duration_since(held.fetched) < ttl);
        self.held_bytes = self.held.values().map(|held| held.bytes.len()).sum();
        if self.held_bytes + batch.data.len() > MAX_HELD {
            self.held.clear();
            self.held_bytes = 0;
        }
        for (file, bytes) in files {
            let path = crate::inodes::join(dir, &file.name);
            let held = Held {
                bytes: Arc::from(bytes),
                fetched: now,
            };
            self.held_bytes += bytes.len();
            if let Some(old) = self.held.insert(path, held) {
                self.held_bytes -= old.bytes.len();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::tests::attr;
    use mirrord_protocol::fs::{BatchedFile, DirEntry};

    const TTL: Duration = Duration::from_secs(1);

    fn listing(entries: &[(&str, FileKind, u64)]) -> Listing {
        Listing::new(
            entries
                .iter()
                .map(|&(name, kind, size)| DirEntry {
                    name: name.to_owned(),
                    attr: attr(1, kind, size),
                    xattrs: None,
                })
                .collect(),
        )
    }

    fn batch(files: &[(&str, &[u8])]) -> FileBatch {
        FileBatch {
            files: files
                .iter()
                .map(|(name, bytes)| BatchedFile {
                    name: (*name).to_owned(),
                    attr: attr(1, FileKind::File, bytes.len() as u64),
                    len: bytes.len() as u32,
                })
                .collect(),
            data: files.iter().flat_map(|(_, b)| b.iter().copied()).collect(),
        }
    }

    #[test]
    fn one_read_of_an_unlisted_directory_fetches_no_batch_the_second_does() {
        let now = Instant::now();
        let mut prefetch = Prefetch::new(TTL);
        assert!(!prefetch.wants_batch("/etc", false, now));
        assert!(prefetch.wants_batch("/etc", false, now + TTL / 2));
        // Long after: a single read again.
        assert!(!prefetch.wants_batch("/etc", false, now + TTL * 3));
        assert!(
            prefetch.wants_batch("/src", true, now),
            "a listed directory is a walk"
        );
    }

    #[test]
    fn the_plan_starts_at_the_file_read_and_takes_only_small_regular_files() {
        let now = Instant::now();
        let mut prefetch = Prefetch::new(TTL);
        let big = MAX_BATCH_FILE + 1;
        let dir = listing(&[
            ("a", FileKind::File, 10),
            ("b", FileKind::File, big),
            ("c", FileKind::File, 20),
            ("fifo", FileKind::Fifo, 0),
            ("sub", FileKind::Dir, 4096),
            ("d", FileKind::File, 30),
        ]);
        assert_eq!(prefetch.plan("/src", &dir, "c", now), ["c", "d", "a"]);
        prefetch.store("/src", &batch(&[("c", b"cc"), ("d", b"dd")]), now);
        assert_eq!(
            prefetch.plan("/src", &dir, "a", now),
            ["a"],
            "held ones are not asked again"
        );
    }

    #[test]
    fn the_plan_keeps_within_the_batch_bounds() {
        let now = Instant::now();
        let prefetch = Prefetch::new(TTL);
        let names: Vec<String> = (0..MAX_BATCH_FILES * 2).map(|i| format!("f{i}")).collect();
        let small: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), FileKind::File, 1))
            .collect();
        assert_eq!(
            prefetch.plan("/d", &listing(&small), "f0", now).len(),
            MAX_BATCH_FILES
        );
        let full: Vec<_> = names
            .iter()
            .map(|n| (n.as_str(), FileKind::File, MAX_BATCH_FILE))
            .collect();
        let plan = prefetch.plan("/d", &listing(&full), "f0", now);
        assert_eq!(plan.len() as u64 * MAX_BATCH_FILE, MAX_BATCH_BYTES as u64);
    }

    #[test]
    fn held_bytes_are_served_for_the_ttl_only() {
        let now = Instant::now();
        let mut prefetch = Prefetch::new(TTL);
        prefetch.store("/src", &batch(&[("a", b"first"), ("b", b"")]), now);
        assert_eq!(prefetch.get("/src/a", now).as_deref(), Some(&b"first"[..]));
        assert_eq!(prefetch.get("/src/b", now).as_deref(), Some(&b""[..]));
        assert_eq!(prefetch.get("/src/c", now), None);
        assert_eq!(
            prefetch.get("/src/a", now + TTL),
            None,
            "stale after the TTL"
        );
        // A newer batch replaces what was held.
        prefetch.store("/src", &batch(&[("a", b"second")]), now + TTL);
        assert_eq!(
            prefetch.get("/src/a", now + TTL).as_deref(),
            Some(&b"second"[..])
        );
        assert_eq!(prefetch.held_bytes, 6, "expired entries were dropped");
    }

    #[test]
    fn a_batch_whose_lengths_do_not_add_up_is_ignored() {
        let now = Instant::now();
        let mut prefetch = Prefetch::new(TTL);
        let mut bad = batch(&[("a", b"abc")]);
        bad.data.pop();
        prefetch.store("/src", &bad, now);
        assert_eq!(prefetch.get("/src/a", now), None);
    }
}
