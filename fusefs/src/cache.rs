//! What the file system remembers of the agent's answers and when it asks again: directory
//! listings by path, recent attributes by inode, the walk-ahead and the walker detection. It
//! must never read a clock, touch FUSE or do I/O: the shell in `fs.rs` passes the time in, acts
//! on what comes back ("answer from this listing", "fetch this listing", "list these siblings
//! ahead") and makes the agent calls.
//!
//! Everything here is as fresh as the attribute TTL: the kernel trusts attributes that long
//! anyway, so answering from a listing or a recent lookup within it adds no staleness of its
//! own. Read-only mounts keep whole directory listings, fetched at `opendir`, ahead of a tree
//! walk, or when lookups keep missing in a directory (git's index refresh stats every tracked
//! file one by one); they answer lookups, `opendir` and extended attribute probes without a
//! round trip. Writable mounts keep no listing: a writer expects to see what it just did.
//!
//! A listing being fetched is shared by everyone who wants it meanwhile. The cache keeps the
//! shell's handle of that fetch (`F`, opaque here) so that the walk-ahead never fetches a
//! directory twice and a lookup can wait on a fetch another request started.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mirrord_protocol::fs::{Attr, DirEntry, FileKind};

use crate::inodes::{join, parent_and_name};
use crate::readers::Readers;

/// Listings (and directories with recent misses) kept before expired ones are dropped, then
/// all of them: a walk over a huge tree must not grow the cache without bound.
const MAX_LISTINGS: usize = 4096;
/// Sibling directories listed ahead of a reader walking a tree (`find`, `grep -r`, `du`), so
/// the agent lists the next ones while the kernel and the reader work through this one.
const WALK_AHEAD: usize = 8;

/// A directory's entries in the agent's order, and where each name is.
#[derive(Debug)]
pub struct Listing {
    entries: Vec<DirEntry>,
    by_name: HashMap<String, usize>,
}

impl Listing {
    pub fn new(entries: Vec<DirEntry>) -> Listing {
        let by_name = entries
            .iter()
            .enumerate()
            .map(|(i, entry)| (entry.name.clone(), i))
            .collect();
        Listing { entries, by_name }
    }

    /// The entries in the agent's order, which is what readdir offsets count.
    pub fn entries(&self) -> &[DirEntry] {
        &self.entries
    }

    pub fn entry(&self, name: &str) -> Option<&DirEntry> {
        self.by_name.get(name).map(|&i| &self.entries[i])
    }

    pub fn attr(&self, name: &str) -> Option<&Attr> {
        self.entry(name).map(|entry| &entry.attr)
    }
}

/// How to answer a lookup.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Lookup {
    /// The directory's fresh listing answers: the name's attributes, or `None` for no such
    /// name (`ENOENT`). The reader was already noted.
    Listed(Option<Attr>),
    /// Lookups keep missing in this directory: fetch (or wait for) its whole listing
    /// ([`Cache::listing_or_fetch`]) and answer from it ([`Cache::looked_up`]); if the listing
    /// fails, ask about the name.
    FetchListing,
    /// Ask the agent about this one name, then [`Cache::looked_up`].
    Ask,
}

/// A directory's listing, now or later.
#[derive(Debug)]
pub enum Listed<F> {
    /// Fetched within the TTL.
    Fresh(Arc<Listing>),
    /// Being fetched: wait on this (the fetch may have been started by this very call), store
    /// what it brings ([`Cache::store`]) and say so ([`Cache::fetch_ended`]).
    Fetching(F),
}

/// How to answer an extended attribute probe (`getxattr`, `listxattr`) on a path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Xattrs {
    /// The NUL-separated names, from the directory's fresh listing.
    Known(Vec<u8>),
    /// Probes keep coming in this directory (`ls -l` probes every file): list it with every
    /// entry's names, store that, then look again ([`Cache::xattr_names`]).
    ListDir(String),
    /// Ask the agent about this one path.
    Ask,
}

/// See the module doc. `F` is the shell's handle of a listing being fetched.
pub struct Cache<F> {
    ttl: Duration,
    /// False on writable mounts.
    keeps_listings: bool,
    /// The latest attributes seen for each inode and when: `open` right after a lookup (the
    /// common case) reuses them instead of asking the agent again.
    recent: HashMap<u64, (Attr, Instant)>,
    /// Listings by directory path, and when each was fetched (read-only mounts only).
    fetched: HashMap<String, (Arc<Listing>, Instant)>,
    /// Listing fetches under way, by directory path.
    fetching: HashMap<String, F>,
    /// When a lookup in a directory last went to the agent.
    missed: HashMap<String, Instant>,
    /// When an extended attribute probe in a directory last went to the agent.
    xattr_missed: HashMap<String, Instant>,
    /// Which processes walk trees without looking at files.
    readers: Readers,
}

impl<F: Clone> Cache<F> {
    /// Everything kept lasts `ttl` (the attribute TTL); a `writable` mount keeps no listings.
    pub fn new(ttl: Duration, writable: bool) -> Self {
        Cache {
            ttl,
            keeps_listings: !writable,
            recent: HashMap::new(),
            fetched: HashMap::new(),
            fetching: HashMap::new(),
            missed: HashMap::new(),
            xattr_missed: HashMap::new(),
            readers: Readers::default(),
        }
    }

    fn fresh(&self, since: Instant, now: Instant) -> bool {
        now.saturating_duration_since(since) < self.ttl
    }

    /// `attr` was just seen for `ino` (a lookup, a `getattr`, an `open`).
    pub fn remember(&mut self, ino: u64, attr: &Attr, now: Instant) {
        self.recent.insert(ino, (*attr, now));
    }

    /// The kernel forgot `ino`; its number may name another file next.
    pub fn forget(&mut self, ino: u64) {
        self.recent.remove(&ino);
    }

    /// Attributes of `ino` (at `path`) seen within the TTL, from a lookup or from its
    /// directory's listing: what `open` answers with, no round trip.
    pub fn known_attr(&self, ino: u64, path: &str, now: Instant) -> Option<Attr> {
        let recent = self
            .recent
            .get(&ino)
            .filter(|(_, seen)| self.fresh(*seen, now))
            .map(|(attr, _)| *attr);
        recent.or_else(|| self.listed(path, now).map(|entry| entry.attr))
    }

    /// The fresh listing of `dir`, if one was fetched within the TTL.
    pub fn listing(&self, dir: &str, now: Instant) -> Option<Arc<Listing>> {
        let (listing, fetched) = self.fetched.get(dir)?;
        self.fresh(*fetched, now).then(|| listing.clone())
    }

    /// `path`'s entry in its directory's fresh listing.
    fn listed(&self, path: &str, now: Instant) -> Option<&DirEntry> {
        let (dir, name) = parent_and_name(path)?;
        let (listing, fetched) = self.fetched.get(dir)?;
        if !self.fresh(*fetched, now) {
            return None;
        }
        listing.entry(name)
    }

    /// `pid` looks up `name` in `dir`.
    pub fn lookup(&mut self, dir: &str, name: &str, pid: u32, now: Instant) -> Lookup {
        if let Some(listing) = self.listing(dir, now) {
            let attr = listing.attr(name).copied();
            self.looked_up(pid, attr.as_ref());
            return Lookup::Listed(attr);
        }
        if self.repeated_miss(dir, now, |cache| &mut cache.missed) {
            Lookup::FetchListing
        } else {
            Lookup::Ask
        }
    }

    /// `pid` looked up a file whose attributes are `attr` (`None`: no such file); a file that
    /// is not a directory means the process looks at what it walks.
    pub fn looked_up(&mut self, pid: u32, attr: Option<&Attr>) {
        if attr.is_some_and(|attr| attr.kind != FileKind::Dir) {
            self.readers.looked_at_file(pid);
        }
    }

    /// `pid` starts reading a directory: whether to list it by names only (see `readers.rs`).
    pub fn names_only(&mut self, pid: u32) -> bool {
        self.readers.names_only(pid)
    }

    /// Records that a probe in `dir` went to the agent; whether another one did within the TTL
    /// (always false when listings are not kept).
    fn repeated_miss(
        &mut self,
        dir: &str,
        now: Instant,
        misses: impl Fn(&mut Self) -> &mut HashMap<String, Instant>,
    ) -> bool {
        if !self.keeps_listings {
            return false;
        }
        let ttl = self.ttl;
        let misses = misses(self);
        let repeated = misses
            .insert(dir.to_owned(), now)
            .is_some_and(|last| now.saturating_duration_since(last) < ttl);
        if misses.len() > MAX_LISTINGS {
            misses.retain(|_, last| now.saturating_duration_since(*last) < ttl);
        }
        repeated
    }

    /// The listing of `dir` on a read-only mount: the fresh one if there is one, else the fetch
    /// under way, else a new fetch (`start` makes its handle).
    pub fn listing_or_fetch(
        &mut self,
        dir: &str,
        now: Instant,
        start: impl FnOnce() -> F,
    ) -> Listed<F> {
        if let Some(listing) = self.listing(dir, now) {
            return Listed::Fresh(listing);
        }
        Listed::Fetching(
            self.fetching
                .entry(dir.to_owned())
                .or_insert_with(start)
                .clone(),
        )
    }

    /// A fetch of `dir` ended; `is_this` tells its handle from a later fetch's.
    pub fn fetch_ended(&mut self, dir: &str, is_this: impl FnOnce(&F) -> bool) {
        if self.fetching.get(dir).is_some_and(is_this) {
            self.fetching.remove(dir);
        }
    }

    /// The agent listed `dir`: kept for the TTL on a read-only mount (replacing any older
    /// listing), and returned either way.
    pub fn store(&mut self, dir: &str, entries: Vec<DirEntry>, now: Instant) -> Arc<Listing> {
        let listing = Arc::new(Listing::new(entries));
        if !self.keeps_listings {
            return listing;
        }
        if self.fetched.len() >= MAX_LISTINGS {
            let ttl = self.ttl;
            self.fetched
                .retain(|_, (_, fetched)| now.saturating_duration_since(*fetched) < ttl);
            if self.fetched.len() >= MAX_LISTINGS {
                self.fetched.clear();
            }
        }
        self.fetched.insert(dir.to_owned(), (listing.clone(), now));
        listing
    }

    /// `dir` was just opened: if its parent's listing is fresh, a tree walk is likely under
    /// way, so the next [`WALK_AHEAD`] sibling directories in listing order that are neither
    /// fresh nor being fetched are to be fetched now, before the walk reaches them. Each comes
    /// with its new fetch (`start` makes the handles), already registered.
    pub fn walk_ahead(
        &mut self,
        dir: &str,
        now: Instant,
        mut start: impl FnMut() -> F,
    ) -> Vec<(String, F)> {
        if !self.keeps_listings {
            return Vec::new();
        }
        let Some((parent, name)) = parent_and_name(dir) else {
            return Vec::new();
        };
        let Some(listing) = self.listing(parent, now) else {
            return Vec::new();
        };
        let Some(&at) = listing.by_name.get(name) else {
            return Vec::new();
        };
        let siblings = listing.entries[at + 1..]
            .iter()
            .filter(|entry| entry.attr.kind == FileKind::Dir)
            .take(WALK_AHEAD)
            .map(|entry| join(parent, &entry.name));
        let mut ahead = Vec::new();
        for sibling in siblings {
            let known =
                self.listing(&sibling, now).is_some() || self.fetching.contains_key(&sibling);
            if !known {
                let fetch = start();
                self.fetching.insert(sibling.clone(), fetch.clone());
                ahead.push((sibling, fetch));
            }
        }
        ahead
    }

    /// The extended attribute names of `path` from its directory's fresh listing, if that
    /// listing carries them.
    pub fn xattr_names(&self, path: &str, now: Instant) -> Option<Vec<u8>> {
        self.listed(path, now)?.xattrs.clone()
    }

    /// An extended attribute probe of `path`: answered from a listing, or worth listing its
    /// directory with every entry's names (a second probe there within the TTL), or not.
    pub fn xattrs(&mut self, path: &str, now: Instant) -> Xattrs {
        if let Some(names) = self.xattr_names(path, now) {
            return Xattrs::Known(names);
        }
        match parent_and_name(path) {
            Some((dir, _)) if self.repeated_miss(dir, now, |cache| &mut cache.xattr_missed) => {
                Xattrs::ListDir(dir.to_owned())
            }
            _ => Xattrs::Ask,
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use mirrord_protocol::fs::Timestamp;

    const TTL: Duration = Duration::from_secs(1);

    /// Attributes of a test file: `ino` on device 1, times at the epoch.
    pub(crate) fn attr(ino: u64, kind: FileKind, size: u64) -> Attr {
        let epoch = Timestamp { secs: 0, nanos: 0 };
        Attr {
            ino,
            dev: 1,
            kind,
            size,
            blocks: 0,
            mode: 0o644,
            nlink: 1,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: 4096,
            atime: epoch,
            mtime: epoch,
            ctime: epoch,
        }
    }

    fn entry(name: &str, kind: FileKind) -> DirEntry {
        DirEntry {
            name: name.to_owned(),
            attr: attr(name.len() as u64, kind, 10),
            xattrs: None,
        }
    }

    fn file(name: &str) -> DirEntry {
        entry(name, FileKind::File)
    }

    fn dir(name: &str) -> DirEntry {
        entry(name, FileKind::Dir)
    }

    /// A read-only cache whose fetch handles are numbered in the order they are made.
    fn read_only() -> (Cache<u32>, impl FnMut() -> u32) {
        let mut n = 0;
        (Cache::new(TTL, false), move || {
            n += 1;
            n
        })
    }

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_listing_lasts_one_ttl() {
        let (mut cache, _) = read_only();
        let t0 = Instant::now();
        cache.store("/etc", vec![file("hostname")], t0);
        assert!(cache.listing("/etc", t0 + ms(999)).is_some());
        assert!(cache.listing("/etc", t0 + TTL).is_none());
        assert!(cache.listing("/usr", t0).is_none());
        // A new listing starts a new TTL.
        cache.store("/etc", vec![file("hosts")], t0 + TTL);
        let listing = cache.listing("/etc", t0 + ms(1500));
        assert!(
            listing.is_some_and(|l| l.entry("hosts").is_some() && l.entry("hostname").is_none())
        );
    }

    #[test]
    fn a_fresh_listing_answers_lookups_and_open() {
        let (mut cache, _) = read_only();
        let t0 = Instant::now();
        cache.store("/etc", vec![file("hostname"), dir("ssl")], t0);
        let at = t0 + ms(500);
        assert_eq!(
            cache.lookup("/etc", "hostname", 1, at),
            Lookup::Listed(Some(attr(8, FileKind::File, 10)))
        );
        // Absent from a fresh listing: no such file, without asking.
        assert_eq!(cache.lookup("/etc", "passwd", 1, at), Lookup::Listed(None));
        assert_eq!(
            cache.known_attr(99, "/etc/ssl", at).map(|a| a.kind),
            Some(FileKind::Dir)
        );
        // Expired: asked again.
        assert_eq!(cache.lookup("/etc", "hostname", 1, t0 + TTL), Lookup::Ask);
        assert_eq!(cache.known_attr(99, "/etc/ssl", t0 + TTL), None);
    }

    /// git's index refresh stats every tracked file one by one: the second miss in a directory
    /// within the TTL fetches the whole listing, which answers the rest.
    #[test]
    fn lookups_that_keep_missing_fetch_the_listing() {
        let (mut cache, mut start) = read_only();
        let t0 = Instant::now();
        assert_eq!(cache.lookup("/src", "a.rs", 1, t0), Lookup::Ask);
        assert_eq!(cache.lookup("/other", "x", 1, t0), Lookup::Ask);
        assert_eq!(
            cache.lookup("/src", "b.rs", 1, t0 + ms(300)),
            Lookup::FetchListing
        );
        let Listed::Fetching(fetch) = cache.listing_or_fetch("/src", t0 + ms(300), &mut start)
        else {
            panic!("nothing to fetch");
        };
        // Another lookup meanwhile waits on the same fetch.
        let again = cache.listing_or_fetch("/src", t0 + ms(310), &mut start);
        assert!(matches!(again, Listed::Fetching(f) if f == fetch));
        cache.store(
            "/src",
            vec![file("a.rs"), file("b.rs"), file("c.rs")],
            t0 + ms(320),
        );
        cache.fetch_ended("/src", |f| *f == fetch);
        assert!(matches!(
            cache.lookup("/src", "c.rs", 1, t0 + ms(400)),
            Lookup::Listed(Some(_))
        ));
        assert!(matches!(
            cache.listing_or_fetch("/src", t0 + ms(400), &mut start),
            Listed::Fresh(_)
        ));
        // Misses further apart than the TTL are one-offs.
        assert_eq!(cache.lookup("/other", "y", 1, t0 + ms(1500)), Lookup::Ask);
    }

    #[test]
    fn a_failed_fetch_leaves_room_for_the_next() {
        let (mut cache, mut start) = read_only();
        let t0 = Instant::now();
        let Listed::Fetching(first) = cache.listing_or_fetch("/d", t0, &mut start) else {
            panic!("fresh without a fetch");
        };
        // The fetch failed: nothing stored; the next caller starts another.
        cache.fetch_ended("/d", |f| *f == first);
        let Listed::Fetching(second) = cache.listing_or_fetch("/d", t0, &mut start) else {
            panic!("fresh without a fetch");
        };
        assert_ne!(first, second);
        // A late end of the first fetch does not drop the second.
        cache.fetch_ended("/d", |f| *f == first);
        let third = cache.listing_or_fetch("/d", t0, &mut start);
        assert!(matches!(third, Listed::Fetching(f) if f == second));
    }

    #[test]
    fn walk_ahead_fetches_the_next_sibling_directories() {
        let (mut cache, mut start) = read_only();
        let t0 = Instant::now();
        let mut entries = vec![dir("d0"), file("f"), dir("d1")];
        entries.extend((2..12).map(|i| dir(&format!("d{i}"))));
        cache.store("/tree", entries, t0);
        // d2 is fresh already and d3 is being fetched: neither is fetched again.
        cache.store("/tree/d2", vec![], t0);
        let Listed::Fetching(d3) = cache.listing_or_fetch("/tree/d3", t0, &mut start) else {
            panic!("fresh without a fetch");
        };
        let ahead = cache.walk_ahead("/tree/d0", t0 + ms(10), &mut start);
        let dirs: Vec<&str> = ahead.iter().map(|(d, _)| d.as_str()).collect();
        assert_eq!(
            dirs,
            [
                "/tree/d1", "/tree/d4", "/tree/d5", "/tree/d6", "/tree/d7", "/tree/d8"
            ]
        );
        // Each is registered: a lookup there now waits on that fetch.
        for (sibling, fetch) in &ahead {
            let listed = cache.listing_or_fetch(sibling, t0 + ms(20), &mut start);
            assert!(matches!(listed, Listed::Fetching(f) if f == *fetch && f != d3));
        }
        // Opened again: nothing new to fetch.
        assert!(
            cache
                .walk_ahead("/tree/d0", t0 + ms(30), &mut start)
                .is_empty()
        );
        // The last directory has no siblings after it; a parent not listed gives no walk.
        assert!(
            cache
                .walk_ahead("/tree/d11", t0 + ms(30), &mut start)
                .is_empty()
        );
        assert!(cache.walk_ahead("/elsewhere/d", t0, &mut start).is_empty());
        assert!(cache.walk_ahead("/", t0, &mut start).is_empty());
        // Once the parent's listing expired, opening a directory is no sign of a walk.
        assert!(
            cache
                .walk_ahead("/tree/d9", t0 + TTL, &mut start)
                .is_empty()
        );
    }

    #[test]
    fn recent_attributes_serve_open_within_the_ttl() {
        let (mut cache, _) = read_only();
        let t0 = Instant::now();
        let seen = attr(7, FileKind::File, 42);
        cache.remember(7, &seen, t0);
        assert_eq!(cache.known_attr(7, "/a/f", t0 + ms(999)), Some(seen));
        assert_eq!(cache.known_attr(7, "/a/f", t0 + TTL), None);
        // A later sighting starts over; the kernel forgetting the inode drops it.
        cache.remember(7, &seen, t0 + TTL);
        assert_eq!(cache.known_attr(7, "/a/f", t0 + ms(1500)), Some(seen));
        cache.forget(7);
        assert_eq!(cache.known_attr(7, "/a/f", t0 + ms(1500)), None);
    }

    #[test]
    fn walkers_are_told_from_readers_of_files() {
        let (mut cache, _) = read_only();
        let t0 = Instant::now();
        let (find, ls) = (10, 11);
        assert!(!cache.names_only(find));
        assert!(cache.names_only(find));
        // A directory lookup is still walking; a file lookup, even answered from a listing,
        // brings attributes back.
        cache.store("/d", vec![dir("sub"), file("f")], t0);
        assert!(matches!(
            cache.lookup("/d", "sub", find, t0),
            Lookup::Listed(Some(_))
        ));
        assert!(cache.names_only(find));
        assert!(matches!(
            cache.lookup("/d", "f", find, t0),
            Lookup::Listed(Some(_))
        ));
        assert!(!cache.names_only(find));
        // Likewise for a file the agent was asked about.
        assert!(!cache.names_only(ls));
        cache.looked_up(ls, None);
        assert!(cache.names_only(ls));
        cache.looked_up(ls, Some(&attr(1, FileKind::File, 0)));
        assert!(!cache.names_only(ls));
    }

    #[test]
    fn repeated_xattr_probes_list_the_directory_with_names() {
        let (mut cache, _) = read_only();
        let t0 = Instant::now();
        assert_eq!(cache.xattrs("/d/a", t0), Xattrs::Ask);
        assert_eq!(
            cache.xattrs("/d/b", t0 + ms(1)),
            Xattrs::ListDir("/d".to_owned())
        );
        // A listing without names (a lookup's or a walk's) doesn't answer probes.
        cache.store("/e", vec![file("a")], t0);
        assert_eq!(cache.xattr_names("/e/a", t0), None);
        let mut with_names = file("b");
        with_names.xattrs = Some(b"user.x\0".to_vec());
        cache.store("/d", vec![file("a"), with_names], t0 + ms(2));
        assert_eq!(
            cache.xattrs("/d/b", t0 + ms(3)),
            Xattrs::Known(b"user.x\0".to_vec())
        );
        assert_eq!(cache.xattrs("/d/b", t0 + ms(2) + TTL), Xattrs::Ask);
        // Lookup misses and probe misses are counted apart.
        assert_eq!(cache.lookup("/f", "a", 1, t0), Lookup::Ask);
        assert_eq!(cache.xattrs("/f/a", t0), Xattrs::Ask);
    }

    /// Writable mounts: a writer expects to see what it just did (a file it created, renamed
    /// or unlinked), so no listing is kept and nothing is answered or fetched ahead from one.
    #[test]
    fn writable_mounts_keep_no_listings() {
        let mut cache: Cache<u32> = Cache::new(TTL, true);
        let t0 = Instant::now();
        let listing = cache.store("/d", vec![dir("a"), dir("b")], t0);
        assert_eq!(listing.entries().len(), 2);
        assert!(cache.listing("/d", t0).is_none());
        for at in [t0, t0 + ms(1), t0 + ms(2)] {
            assert_eq!(cache.lookup("/d", "x", 1, at), Lookup::Ask);
            assert_eq!(cache.xattrs("/d/x", at), Xattrs::Ask);
        }
        assert!(cache.walk_ahead("/d/a", t0, || 1).is_empty());
        // Attributes still serve the open that follows a lookup.
        let seen = attr(3, FileKind::File, 1);
        cache.remember(3, &seen, t0);
        assert_eq!(cache.known_attr(3, "/d/x", t0 + ms(5)), Some(seen));
    }

    #[test]
    fn bounded_listings_and_misses() {
        let (mut cache, _) = read_only();
        let t0 = Instant::now();
        let fill = |cache: &mut Cache<u32>, at: Instant| {
            cache.fetched.clear();
            for i in 0..MAX_LISTINGS {
                cache.store(&format!("/d{i}"), vec![], at);
            }
            assert_eq!(cache.fetched.len(), MAX_LISTINGS);
        };
        // Full of expired listings: they go, the fresh ones stay.
        fill(&mut cache, t0);
        cache.store("/late", vec![], t0 + TTL);
        assert_eq!(cache.fetched.len(), 1);
        // Full of fresh ones: all go.
        fill(&mut cache, t0 + TTL);
        cache.store("/later", vec![], t0 + TTL);
        assert_eq!(cache.fetched.len(), 1);
        // Misses are trimmed of expired ones only, so none is lost while it still counts.
        for i in 0..MAX_LISTINGS + 10 {
            cache.lookup(&format!("/m{i}"), "x", 1, t0);
        }
        assert_eq!(cache.missed.len(), MAX_LISTINGS + 10);
        cache.lookup("/late-miss", "x", 1, t0 + TTL);
        assert_eq!(cache.missed.len(), 1);
    }
}
