//! Symlink targets as the local kernel will follow them: the kernel resolves a FUSE symlink
//! against the launched process's own `/`, so a pod link to `/etc/shadow` (or `../../..` past the
//! mount) would reach the host's file. Targets that could leave the mount are rewritten to an
//! absolute path under the mount point; harmless relative ones stay verbatim (tools such as git
//! compare them). Pure; it never touches a file.

/// Whether the local kernel, following `target` from a link whose parent directory is `depth`
/// levels below the pod root, surely stays inside the mount: only leading `..` components (from
/// a real directory of the mount, at most `depth` of them), then no `..` at all.
fn stays_inside(target: &str, depth: usize) -> bool {
    if target.starts_with('/') {
        return false;
    }
    let mut ups = 0;
    let mut past_ups = false;
    for component in target.split('/') {
        match component {
            ".." if past_ups => return false,
            ".." => ups += 1,
            "" | "." => {}
            _ => past_ups = true,
        }
    }
    ups <= depth
}

/// `path` with `.`, `..` and empty components folded lexically, `..` stopping at the root.
fn normalize(path: &str) -> Vec<&str> {
    let mut out: Vec<&str> = Vec::new();
    for component in path.split('/') {
        match component {
            "" | "." => {}
            ".." => {
                out.pop();
            }
            name => out.push(name),
        }
    }
    out
}

/// What `readlink` shows for the pod link `link` (a pod-absolute path) holding `target`, when
/// the pod root is mounted at `mountpoint` in the process's view.
pub fn local_target(mountpoint: &str, link: &str, target: &str) -> String {
    let parent = link.rsplit_once('/').map_or("", |(dir, _)| dir);
    let depth = normalize(parent).len();
    if stays_inside(target, depth) {
        return target.to_owned();
    }
    // The link's meaning inside the pod, then placed under the mount point.
    let joined = if target.starts_with('/') {
        target.to_owned()
    } else {
        format!("{parent}/{target}")
    };
    let in_pod = normalize(&joined);
    let base = mountpoint.trim_end_matches('/');
    if in_pod.is_empty() {
        return if base.is_empty() {
            "/".to_owned()
        } else {
            base.to_owned()
        };
    }
    format!("{base}/{}", in_pod.join("/"))
}

#[cfg(test)]
mod tests {
    use super::local_target;

    #[test]
    fn links_that_could_leave_the_mount_are_pinned_under_it() {
        let m = "/tmp/remote";
        let cases = [
            ("/app/abs", "/etc/shadow", "/tmp/remote/etc/shadow"),
            (
                "/app/esc",
                "../../../../etc/shadow",
                "/tmp/remote/etc/shadow",
            ),
            ("/app/up", "../..", "/tmp/remote"),
            ("/app/root", "/", "/tmp/remote"),
            ("/a/b/mid", "x/../../../y", "/tmp/remote/y"),
            ("/a/b/abs", "/x/./y/../z/", "/tmp/remote/x/z"),
            // Harmless relative links are shown as the pod has them.
            ("/app/rel", "data/file", "data/file"),
            ("/app/lib", "../lib/libc.so", "../lib/libc.so"),
            ("/a/b/c", "../../x", "../../x"),
            ("/sa/token", "..data/token", "..data/token"),
            ("/top", "sibling", "sibling"),
            ("/top", "../x", "/tmp/remote/x"),
        ];
        for (link, target, want) in cases {
            assert_eq!(local_target(m, link, target), want, "{link} -> {target}");
        }
        assert_eq!(local_target("/", "/app/abs", "/etc/shadow"), "/etc/shadow");
        assert_eq!(local_target("/m/", "/l", "/"), "/m");
    }
}
