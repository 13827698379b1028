//! The inode table: which pod path each kernel inode number stands for, and how many kernel
//! lookups keep it alive. Pure bookkeeping; it never talks to the agent or the kernel.

use std::collections::HashMap;

/// The kernel's number for the mount's root directory.
pub const ROOT_INO: u64 = 1;

#[derive(Debug)]
struct Node {
    path: String,
    /// Lookups the kernel holds; the node goes when `forget` brings this to zero.
    lookups: u64,
    /// (mtime, size) when the file was last opened, to tell whether its cached pages are
    /// still good.
    cache_key: Option<CacheKey>,
}

/// What must be unchanged for the kernel to keep a file's page cache across opens.
pub type CacheKey = (mirrord_protocol::fs::Timestamp, u64);

#[derive(Debug)]
pub struct Inodes {
    by_ino: HashMap<u64, Node>,
    by_path: HashMap<String, u64>,
    next: u64,
}

impl Default for Inodes {
    fn default() -> Self {
        Self::new()
    }
}

/// `parent`'s child `name`, in the pod's absolute form.
pub fn join(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

impl Inodes {
    pub fn new() -> Self {
        let root = Node {
            path: "/".to_owned(),
            lookups: 1,
            cache_key: None,
        };
        Inodes {
            by_ino: HashMap::from([(ROOT_INO, root)]),
            by_path: HashMap::from([("/".to_owned(), ROOT_INO)]),
            next: ROOT_INO + 1,
        }
    }

    pub fn path(&self, ino: u64) -> Option<&str> {
        self.by_ino.get(&ino).map(|n| n.path.as_str())
    }

    /// The number `path` already has, without counting a lookup.
    pub fn peek(&self, path: &str) -> Option<u64> {
        self.by_path.get(path).copied()
    }

    /// Counts one kernel lookup of `path` and returns its number (a new one if needed).
    pub fn lookup(&mut self, path: &str) -> u64 {
        if let Some(ino) = self.by_path.get(path)
            && let Some(node) = self.by_ino.get_mut(ino)
        {
            node.lookups += 1;
            return *ino;
        }
        let ino = self.next;
        self.next += 1;
        self.by_ino.insert(
            ino,
            Node {
                path: path.to_owned(),
                lookups: 1,
                cache_key: None,
            },
        );
        self.by_path.insert(path.to_owned(), ino);
        ino
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
        if node.lookups == 0 {
            let path = std::mem::take(&mut node.path);
            self.by_ino.remove(&ino);
            if self.by_path.get(&path) == Some(&ino) {
                self.by_path.remove(&path);
            }
        }
    }

    /// `path` was removed: a later lookup of the name gets a fresh number, while the old one
    /// lives on (with a path that no longer resolves) until the kernel forgets it.
    pub fn removed(&mut self, path: &str) {
        self.by_path.remove(path);
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
            if let Some(node) = self.by_ino.get_mut(&ino) {
                node.path = new.clone();
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

    #[test]
    fn lookups_are_counted_and_forgotten() {
        let mut t = Inodes::new();
        let a = t.lookup("/a");
        assert_eq!(t.lookup("/a"), a);
        assert_eq!(t.path(a), Some("/a"));
        t.forget(a, 1);
        assert_eq!(t.path(a), Some("/a"));
        t.forget(a, 1);
        assert_eq!(t.path(a), None);
        assert_eq!(t.peek("/a"), None);
        assert_ne!(t.lookup("/a"), a, "numbers are never reused");
        t.forget(ROOT_INO, 100);
        assert_eq!(t.path(ROOT_INO), Some("/"));
    }

    #[test]
    fn renames_move_whole_subtrees_and_replace_the_target() {
        let mut t = Inodes::new();
        let d = t.lookup("/d");
        let f = t.lookup("/d/f");
        let g = t.lookup("/d/sub/g");
        let other = t.lookup("/dx");
        let victim = t.lookup("/e");
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
    }

    #[test]
    fn removed_names_get_fresh_numbers() {
        let mut t = Inodes::new();
        let a = t.lookup("/a");
        t.removed("/a");
        let b = t.lookup("/a");
        assert_ne!(a, b);
        t.forget(a, 1);
        assert_eq!(t.peek("/a"), Some(b));
    }

    #[test]
    fn page_cache_is_kept_only_while_mtime_and_size_hold() {
        let mut t = Inodes::new();
        let a = t.lookup("/a");
        let k1 = (Timestamp { secs: 1, nanos: 0 }, 10);
        assert!(!t.reopened(a, k1));
        assert!(t.reopened(a, k1));
        assert!(!t.reopened(a, (Timestamp { secs: 1, nanos: 1 }, 10)));
        assert!(!t.reopened(a, (Timestamp { secs: 1, nanos: 1 }, 11)));
        assert_eq!(join("/", "x"), "/x");
        assert_eq!(join("/a", "x"), "/a/x");
    }
}
