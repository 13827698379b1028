//! The inode table: which pod path each kernel inode number stands for, and how many kernel
//! lookups keep it alive. Pure bookkeeping; it never talks to the agent or the kernel.
//!
//! A file that is not a directory is numbered with its remote inode number when that number is
//! free, so `stat` shows the pod's `st_ino`: tools that cache stat data (git's index) find their
//! entries unchanged, and hard links share one number. Directories, and files whose number is
//! taken by another live file (one on another device of the pod), get numbers of our own.

use std::collections::HashMap;

use mirrord_protocol::fs::{Attr, FileKind};

/// The kernel's number for the mount's root directory.
pub const ROOT_INO: u64 = 1;

/// Where our own numbers start: far above the inode numbers file systems hand out.
const OWN_NUMBERS: u64 = 1 << 62;

/// A remote file: its device and inode number, and for a symlink its ctime. The kernel keeps a
/// symlink's target cached for its inode (FUSE_CACHE_SYMLINKS); a symlink never changes in
/// place, but one made anew may get the number its predecessor just freed, and the ctime tells
/// them apart.
type Identity = (u64, u64, (i64, u32));

#[derive(Debug)]
struct Node {
    path: String,
    /// Further names of a hard-linked file, looked up through other paths.
    other_paths: Vec<String>,
    /// Set for nodes that are not directories: the remote file they stand for.
    identity: Option<Identity>,
    /// Lookups the kernel holds; the node goes when `forget` brings this to zero.
    lookups: u64,
    /// (mtime, size) when the file was last opened, to tell whether its cached pages are
    /// still good.
    cache_key: Option<CacheKey>,
}

impl Node {
    fn new(path: &str, identity: Option<Identity>) -> Node {
        Node {
            path: path.to_owned(),
            other_paths: Vec::new(),
            identity,
            lookups: 1,
            cache_key: None,
        }
    }

    fn paths_mut(&mut self) -> impl Iterator<Item = &mut String> {
        std::iter::once(&mut self.path).chain(self.other_paths.iter_mut())
    }
}

/// What must be unchanged for the kernel to keep a file's page cache across opens.
pub type CacheKey = (mirrord_protocol::fs::Timestamp, u64);

#[derive(Debug)]
pub struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    by_identity: HashMap<Identity, u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

/// `parent`'s child `name`, in the pod's absolute form.
pub fn join(parent: &str, name: &str) -> String {
    let parent = if parent == "/" { "" } else { parent };
    let mut path = String::with_capacity(parent.len() + 1 + name.len());
    path.push_str(parent);
    path.push('/');
    path.push_str(name);
    path
}

/// The directory holding `path` and its last component; `None` for `/`.
pub fn parent_and_name(path: &str) -> Option<(&str, &str)> {
    let (parent, name) = path.rsplit_once('/')?;
    if name.is_empty() {
        return None;
    }
    Some((if parent.is_empty() { "/" } else { parent }, name))
}

fn identity(attr: &Attr) -> Option<Identity> {
    let made = match attr.kind {
        FileKind::Symlink => (attr.ctime.secs, attr.ctime.nanos),
        _ => (0, 0),
    };
    (attr.kind != FileKind::Dir).then_some((attr.dev, attr.ino, made))
}

impl Inodes {
    pub fn new() -> Self {
        Inodes {
            by_ino: HashMap::from([(ROOT_INO, Node::new("/", None))]),
            by_path: HashMap::from([("/".to_owned(), ROOT_INO)]),
            by_identity: HashMap::new(),
            next: OWN_NUMBERS,
        }
    }

    pub fn path(&self, ino: u64) -> Option<&str> {
        self.by_ino.get(&ino).map(|n| n.path.as_str())
    }

    /// The number `path` already has, without counting a lookup.
    pub fn peek(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Counts one kernel lookup of `path`, whose attributes are `attr`, and returns its number:
    /// the one it has while it is the same file, a new one when the name now holds another.
    pub fn lookup(&mut self, path: &str, attr: &Attr) -> u64 {
        let identity = identity(attr);
        if let Some(ino) = self.by_path.get(path)
            && let Some(node) = self.by_ino.get_mut(ino)
            && (node.identity == identity || *ino == ROOT_INO)
        {
            node.lookups += 1;
            return *ino;
        }
        // A symlink is never shared between names: the kernel follows its (cached) target from
        // wherever it is looked up, and `links::local_target` chose that target for one parent
        // directory. The same link reached at a shallower depth (a hard link of it, or its
        // directory renamed in the pod) could otherwise climb out of the mount with `..`.
        if let Some(id) = identity.filter(|_| attr.kind != FileKind::Symlink)
            && let Some(&ino) = self.by_identity.get(&id)
            && let Some(node) = self.by_ino.get_mut(&ino)
        {
            // Another name of a file we know: a hard link.
            node.lookups += 1;
            if !node.paths_mut().any(|p| p == path) {
                node.other_paths.push(path.to_owned());
            }
            self.by_path.insert(path.to_owned(), ino);
            return ino;
        }
        let ino = match identity {
            Some((_, remote, _)) if remote > ROOT_INO && !self.by_ino.contains_key(&remote) => {
                remote
            }
            _ => self.own_number(),
        };
        self.by_ino.insert(ino, Node::new(path, identity));
        self.by_path.insert(path.to_owned(), ino);
        if let Some(id) = identity.filter(|_| attr.kind != FileKind::Symlink) {
            self.by_identity.insert(id, ino);
        }
        ino
    }

    fn own_number(&mut self) -> u64 {
        while self.by_ino.contains_key(&self.next) {
            self.next += 1;
        }
        self.next += 1;
        self.next - 1
    }

    /// The kernel dropped `n` lookups of `ino`.
    pub fn forget(&mut self, ino: u64, n: u64) {
        if ino == ROOT_INO {
            return;
        }
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return;
        };
        node.lookups = node.lookups.saturating_sub(n);
        if node.lookups > 0 {
            return;
        }
        let Some(mut node) = self.by_ino.remove(&ino) else {
            return;
        };
        for path in node.paths_mut() {
            if self.by_path.get(path.as_str()) == Some(&ino) {
                self.by_path.remove(path.as_str());
            }
        }
        if let Some(id) = node.identity
            && self.by_identity.get(&id) == Some(&ino)
        {
            self.by_identity.remove(&id);
        }
    }

    /// `path` was removed: a later lookup of the name gets a fresh number, while the old one
    /// lives on until the kernel forgets it, under another of its names if it has one (or a
    /// path that no longer resolves).
    pub fn removed(&mut self, path: &str) {
        let Some(ino) = self.by_path.remove(path) else {
            return;
        };
        let Some(node) = self.by_ino.get_mut(&ino) else {
            return;
        };
        if node.path == path {
            if let Some(other) = node.other_paths.pop() {
                node.path = other;
            } else if let Some(id) = node.identity
                && self.by_identity.get(&id) == Some(&ino)
            {
                // Its last name is gone: a file found later with the same number is another.
                self.by_identity.remove(&id);
            }
        } else {
            node.other_paths.retain(|p| p != path);
        }
    }

    /// `from` was renamed to `to`: it and everything below it move; whatever `to` named before
    /// is gone.
    pub fn renamed(&mut self, from: &str, to: &str) {
        self.removed(to);
        let prefix = format!("{from}/");
        let moved: Vec<(String, u64)> = self
            .by_path
            .iter()
            .filter(|(p, _)| p.as_str() == from || p.starts_with(&prefix))
            .map(|(p, ino)| (p.clone(), *ino))
            .collect();
        for (old, ino) in moved {
            self.by_path.remove(&old);
            let new = format!("{to}{}", &old[from.len()..]);
            if let Some(node) = self.by_ino.get_mut(&ino)
                && let Some(path) = node.paths_mut().find(|p| **p == old)
            {
                *path = new.clone();
            }
            self.by_path.insert(new, ino);
        }
    }

    /// Records the file's state at this open; true when it matches the previous open's, so the
    /// kernel may keep the pages it cached then.
    pub fn reopened(&mut self, ino: u64, key: CacheKey) -> bool {
        match self.by_ino.get_mut(&ino) {
            Some(node) => node.cache_key.replace(key) == Some(key),
            None => false,
        }
    }

    pub fn len(&self) -> usize {
        self.by_ino.len()
    }

    pub fn is_empty(&self) -> bool {
        self.by_ino.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mirrord_protocol::fs::Timestamp;

    fn attr(kind: FileKind, dev: u64, ino: u64) -> Attr {
        let epoch = Timestamp { secs: 0, nanos: 0 };
        Attr {
            ino,
            dev,
            kind,
            size: 0,
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

    fn file(ino: u64) -> Attr {
        attr(FileKind::File, 7, ino)
    }

    fn dir(ino: u64) -> Attr {
        attr(FileKind::Dir, 7, ino)
    }

    #[test]
    fn a_symlink_made_anew_with_a_freed_number_is_another_inode() {
        let mut t = Inodes::new();
        let link = |secs| Attr {
            ctime: Timestamp { secs, nanos: 0 },
            ..attr(FileKind::Symlink, 7, 60)
        };
        let old = t.lookup("/l", &link(100));
        assert_eq!(t.lookup("/l", &link(100)), old, "the same link");
        let new = t.lookup("/l", &link(200));
        assert_ne!(new, old, "its cached target must not be the old link's");
        // A regular file keeps its number whatever its times: its pages follow mtime and size.
        let f = t.lookup("/f", &file(70));
        let touched = Attr {
            ctime: Timestamp { secs: 9, nanos: 0 },
            ..file(70)
        };
        assert_eq!(t.lookup("/f", &touched), f);
    }

    #[test]
    fn a_symlink_is_numbered_for_one_name_only() {
        let mut t = Inodes::new();
        let link = Attr {
            ctime: Timestamp { secs: 5, nanos: 0 },
            ..attr(FileKind::Symlink, 7, 80)
        };
        // `../../../x` is harmless at /a/b/c and climbs out of the mount at the top: the same
        // pod link under both names (a hard link, or its directory renamed in the pod) must be
        // two kernel inodes, each with its own readlink answer.
        let deep = t.lookup("/a/b/c/link", &link);
        let top = t.lookup("/link", &link);
        assert_ne!(deep, top);
        assert_eq!(t.path(deep), Some("/a/b/c/link"));
        assert_eq!(t.path(top), Some("/link"));
        assert_eq!(t.lookup("/link", &link), top, "one name keeps its number");
        t.forget(deep, 1);
        assert_eq!(t.path(top), Some("/link"));
    }

    #[test]
    fn lookups_are_counted_and_forgotten() {
        let mut t = Inodes::new();
        let a = t.lookup("/a", &dir(50));
        assert_eq!(t.lookup("/a", &dir(50)), a);
        assert_eq!(t.path(a), Some("/a"));
        t.forget(a, 1);
        assert_eq!(t.path(a), Some("/a"));
        t.forget(a, 1);
        assert_eq!(t.path(a), None);
        assert_eq!(t.peek("/a"), None);
        assert_ne!(
            t.lookup("/a", &dir(50)),
            a,
            "our own numbers are never reused"
        );
        t.forget(ROOT_INO, 100);
        assert_eq!(t.path(ROOT_INO), Some("/"));
        assert_eq!(t.lookup("/", &dir(2)), ROOT_INO);
    }

    #[test]
    fn files_show_the_remote_inode_number_unless_it_is_taken() {
        let mut t = Inodes::new();
        assert_eq!(t.lookup("/f", &file(1234)), 1234);
        assert_eq!(t.lookup("/f", &file(1234)), 1234);
        // The same number on another device of the pod is another file.
        let other = t.lookup("/proc/x", &attr(FileKind::File, 8, 1234));
        assert!(other >= OWN_NUMBERS, "{other}");
        // Directories and the root's number are never taken from the pod.
        assert!(t.lookup("/d", &dir(99)) >= OWN_NUMBERS);
        assert!(t.lookup("/one", &file(1)) >= OWN_NUMBERS);
        // Once forgotten, the number is the file's again.
        t.forget(1234, 2);
        assert_eq!(t.lookup("/f", &file(1234)), 1234);
    }

    #[test]
    fn hard_links_share_a_number_and_outlive_one_name() {
        let mut t = Inodes::new();
        let a = t.lookup("/a", &file(40));
        assert_eq!(t.lookup("/b", &file(40)), a);
        assert_eq!(t.peek("/b"), Some(a));
        t.removed("/a");
        assert_eq!(t.path(a), Some("/b"), "the other name serves the file");
        assert_eq!(t.peek("/a"), None);
        t.forget(a, 2);
        assert_eq!(t.peek("/b"), None);
        assert!(t.path(a).is_none());
    }

    #[test]
    fn a_name_holding_another_file_gets_another_number() {
        let mut t = Inodes::new();
        let old = t.lookup("/f", &file(10));
        // Replaced behind our back (an editor's rename over it): the new file's number.
        let new = t.lookup("/f", &file(11));
        assert_eq!(new, 11);
        assert_eq!(t.peek("/f"), Some(new));
        t.forget(old, 1);
        assert_eq!(t.peek("/f"), Some(new));
        // A name that became a directory.
        let d = t.lookup("/f", &dir(11));
        assert!(d >= OWN_NUMBERS && d != new);
    }

    #[test]
    fn renames_move_whole_subtrees_and_replace_the_target() {
        let mut t = Inodes::new();
        let d = t.lookup("/d", &dir(2));
        let f = t.lookup("/d/f", &file(3));
        let g = t.lookup("/d/sub/g", &file(4));
        let other = t.lookup("/dx", &dir(5));
        let victim = t.lookup("/e", &dir(6));
        t.renamed("/d", "/e");
        assert_eq!(t.path(d), Some("/e"));
        assert_eq!(t.path(f), Some("/e/f"));
        assert_eq!(t.path(g), Some("/e/sub/g"));
        assert_eq!(t.path(other), Some("/dx"));
        assert_eq!(t.peek("/e"), Some(d));
        // The replaced node is no longer reachable by name, and forgetting it leaves `/e` alone.
        t.forget(victim, 1);
        assert_eq!(t.peek("/e"), Some(d));
        assert_eq!(t.len(), 6 - 1);
        assert_eq!(t.lookup("/e/f", &file(3)), f);
    }

    #[test]
    fn removed_names_get_fresh_numbers() {
        let mut t = Inodes::new();
        let a = t.lookup("/a", &dir(9));
        t.removed("/a");
        let b = t.lookup("/a", &dir(9));
        assert_ne!(a, b);
        t.forget(a, 1);
        assert_eq!(t.peek("/a"), Some(b));
        // A file removed and created again under the same name and number is another file.
        let f = t.lookup("/f", &file(20));
        t.removed("/f");
        let g = t.lookup("/f", &file(20));
        assert_ne!(
            f, g,
            "{f} is still live, so the new file cannot have its number"
        );
    }

    #[test]
    fn page_cache_is_kept_only_while_mtime_and_size_hold() {
        let mut t = Inodes::new();
        let a = t.lookup("/a", &file(30));
        let k1 = (Timestamp { secs: 1, nanos: 0 }, 10);
        assert!(!t.reopened(a, k1));
        assert!(t.reopened(a, k1));
        assert!(!t.reopened(a, (Timestamp { secs: 1, nanos: 1 }, 10)));
        assert!(!t.reopened(a, (Timestamp { secs: 1, nanos: 1 }, 11)));
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
        assert_eq!(parent_and_name("/x"), Some(("/", "x")));
        assert_eq!(parent_and_name("/a/x"), Some(("/a", "x")));
        assert_eq!(parent_and_name("/"), None);
    }
}
