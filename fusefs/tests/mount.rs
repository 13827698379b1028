//! The file system mounted for real over a fake pod root, served in-process by the agent's own
//! file service. Each test re-runs itself inside `unshare --mount --propagation private`, so its
//! FUSE mount lives in a private mount namespace that dies with it; the outer half then checks
//! that no mount was left in the host's namespace. Needs root and unshare(1); skipped otherwise.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use mirrord_fusefs::{Backend, BoxFuture, Options, RemoteFs, mount};
use mirrord_protocol::RemoteError;
use mirrord_protocol::fs::{FsRequest, FsResponse};

const IN_NAMESPACE: &str = "MIRRORD_FUSEFS_TEST_IN_NAMESPACE";

/// The agent's file service, called in-process; requests naming "stall" never get an answer,
/// as from an agent that went away without closing the connection.
struct InProcess {
    root: PathBuf,
    /// The directories listed (`ReadDir`), in order.
    listed: Arc<Mutex<Vec<String>>>,
}

/// Whether the request reads a file whose name says "stall".
fn reads_a_stalling_file(request: &FsRequest) -> bool {
    match request {
        FsRequest::Read { path, .. } => path.contains("stall"),
        FsRequest::ReadFiles { dir, names } => {
            dir.contains("stall") || names.iter().any(|name| name.contains("stall"))
        }
        _ => false,
    }
}

impl Backend for InProcess {
    fn call(&self, request: FsRequest) -> BoxFuture<Result<FsResponse, RemoteError>> {
        let root = self.root.clone();
        if let FsRequest::ReadDir { path, .. } = &request {
            self.listed.lock().unwrap().push(path.clone());
        }
        Box::pin(async move {
            if reads_a_stalling_file(&request) {
                std::future::pending::<()>().await;
            }
            // The agent itself always allows writes; read-only mode is the mount's to enforce.
            let answered = tokio::task::spawn_blocking(move || {
                mirrord_agent::fs::serve(&root, request, true)
                    .and_then(mirrord_agent::fs::Answer::into_response)
            })
            .await;
            match answered {
                Ok(Ok(response)) => Ok(response),
                Ok(Err(error)) => Err(RemoteError {
                    errno: error.errno(),
                    message: error.to_string(),
                }),
                Err(error) => Err(RemoteError {
                    errno: libc::EIO,
                    message: error.to_string(),
                }),
            }
        })
    }
}

fn fs_name() -> String {
    format!("mirrord-fusefs-test-{}", std::process::id())
}

/// Runs `test` inside a fresh private mount namespace (by re-running this test binary there),
/// then checks the host's mount table.
fn in_private_mount_namespace(name: &str, test: fn()) {
    if std::env::var_os(IN_NAMESPACE).is_some() {
        test();
        return;
    }
    if !nix::unistd::geteuid().is_root() || !Path::new("/usr/bin/unshare").exists() {
        eprintln!("skipped: needs root and unshare(1)");
        return;
    }
    let exe = std::env::current_exe().expect("the test binary knows its path");
    let status = Command::new("/usr/bin/unshare")
        .args(["--mount", "--propagation", "private"])
        .arg(exe)
        .args(["--exact", name, "--nocapture", "--test-threads=1"])
        .env(IN_NAMESPACE, "1")
        .env("MIRRORD_FUSEFS_OUTER_PID", std::process::id().to_string())
        .status()
        .expect("unshare runs");
    let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
    assert!(
        !mounts.contains("mirrord-fusefs-test"),
        "a FUSE mount leaked into the host namespace:\n{mounts}"
    );
    assert!(status.success(), "{name} failed inside its mount namespace");
}

/// A fake pod root and a mount point, removed on drop.
struct Scene {
    dir: PathBuf,
}

impl Scene {
    fn new(tag: &str) -> Scene {
        use std::os::unix::fs::symlink;
        let dir = std::env::temp_dir().join(format!("mirrord-fusefs-{tag}-{}", std::process::id()));
        let pod = dir.join("pod");
        std::fs::create_dir_all(pod.join("etc")).unwrap();
        std::fs::create_dir_all(pod.join("app")).unwrap();
        std::fs::create_dir_all(dir.join("mnt")).unwrap();
        std::fs::write(pod.join("etc/shadow"), "pod shadow\n").unwrap();
        std::fs::write(pod.join("etc/hostname"), "pod-1\n").unwrap();
        std::fs::write(pod.join("app/stall"), "never read\n").unwrap();
        symlink("/etc/shadow", pod.join("app/shadow")).unwrap();
        symlink("../../../../../../../../etc/shadow", pod.join("app/escape")).unwrap();
        // A few thousand files in nested directories, one holding a needle.
        for d in 0..30 {
            let sub = pod.join(format!("tree/d{d}/sub"));
            std::fs::create_dir_all(&sub).unwrap();
            for f in 0..100 {
                let text = if d == 17 && f == 42 {
                    "hay needle hay\n"
                } else {
                    "hay\n"
                };
                std::fs::write(sub.join(format!("f{f}")), text).unwrap();
            }
        }
        // Bigger than several agent reads, with a pattern that shows misplaced chunks.
        let big: Vec<u8> = (0..3 * 1024 * 1024 + 123)
            .map(|i: u32| (i % 251) as u8)
            .collect();
        std::fs::write(pod.join("app/big"), big).unwrap();
        Scene { dir }
    }

    fn pod(&self) -> PathBuf {
        self.dir.join("pod")
    }

    fn mnt(&self) -> PathBuf {
        self.dir.join("mnt")
    }
}

impl Drop for Scene {
    fn drop(&mut self) {
        let _ = nix::mount::umount2(&self.mnt(), nix::mount::MntFlags::MNT_DETACH);
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs a shell line with `$M` set to the mount point; returns (success, stdout, stderr).
fn sh(mnt: &Path, line: &str) -> (bool, String, String) {
    let out = Command::new("sh")
        .args(["-c", line])
        .env("M", mnt)
        .output()
        .expect("sh runs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn ok(mnt: &Path, line: &str) -> String {
    let (success, stdout, stderr) = sh(mnt, line);
    assert!(success, "`{line}` failed: {stderr}");
    stdout
}

fn mount_scene(
    scene: &Scene,
    writable: bool,
) -> (tokio::runtime::Runtime, mirrord_fusefs::Mounted) {
    let (runtime, mounted, _) = mount_scene_with(scene, writable, Duration::from_millis(200));
    (runtime, mounted)
}

/// Mounts with attribute and entry TTLs of `ttl`; also returns the directories listed.
fn mount_scene_with(
    scene: &Scene,
    writable: bool,
    ttl: Duration,
) -> (
    tokio::runtime::Runtime,
    mirrord_fusefs::Mounted,
    Arc<Mutex<Vec<String>>>,
) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(4)
        .enable_all()
        .build()
        .expect("a runtime");
    let options = Options {
        writable,
        attr_ttl: ttl,
        entry_ttl: ttl,
        request_timeout: Duration::from_secs(2),
        fs_name: fs_name(),
        mountpoint: None,
        xattrs: true,
    };
    let listed = Arc::new(Mutex::new(Vec::new()));
    let backend = Arc::new(InProcess {
        root: scene.pod(),
        listed: listed.clone(),
    });
    let fs = RemoteFs::new(backend, runtime.handle().clone(), options);
    let mounted = mount(fs, &scene.mnt()).expect("mount");
    (runtime, mounted, listed)
}

fn mounted_here() -> bool {
    std::fs::read_to_string("/proc/self/mounts")
        .unwrap_or_default()
        .contains(&fs_name())
}

#[test]
fn read_only_mount_shows_the_pod_and_refuses_writes() {
    in_private_mount_namespace("read_only_mount_shows_the_pod_and_refuses_writes", || {
        let scene = Scene::new("ro");
        let (runtime, mounted) = mount_scene(&scene, false);
        let m = mounted.mountpoint().to_owned();
        assert!(mounted_here());

        let listing = ok(&m, "ls -la $M $M/etc $M/app");
        assert!(
            listing.contains("hostname")
                && listing.contains(&format!("shadow -> {}/etc/shadow", m.display())),
            "{listing}"
        );
        assert_eq!(ok(&m, "cat $M/etc/hostname"), "pod-1\n");
        // Symlinks to absolute paths and `..` chains mean the pod's files, never the host's.
        assert_eq!(ok(&m, "cat $M/app/shadow"), "pod shadow\n");
        assert_eq!(ok(&m, "cat $M/app/escape"), "pod shadow\n");
        // Pinned under the mount point, since the local kernel follows it from the local `/`.
        assert_eq!(
            ok(&m, "readlink $M/app/shadow"),
            format!("{}/etc/shadow\n", m.display())
        );
        assert_eq!(ok(&m, "cat $M/app/../app/shadow"), "pod shadow\n");
        assert_eq!(
            ok(&m, "find $M/tree | wc -l").trim(),
            (1 + 30 * 2 + 3000).to_string()
        );
        assert_eq!(ok(&m, "find $M/tree -type f | wc -l").trim(), "3000");
        let found = ok(&m, "grep -r needle $M/tree");
        assert_eq!(
            found,
            format!("{}/tree/d17/sub/f42:hay needle hay\n", m.display())
        );
        // Large reads come back whole and in order (twice: cold, then from the page cache).
        let want = ok(&scene.pod(), "sha256sum < $M/app/big");
        assert_eq!(ok(&m, "sha256sum < $M/app/big"), want);
        assert_eq!(ok(&m, "sha256sum < $M/app/big"), want);
        assert_eq!(
            ok(&m, "stat -c %s $M/app/big").trim(),
            (3 * 1024 * 1024 + 123).to_string()
        );
        assert!(ok(&m, "stat -f -c %b $M").trim().parse::<u64>().is_ok());

        // Every kind of change is refused with EROFS, and the pod is untouched.
        for change in [
            "echo x > $M/new",
            "echo x >> $M/etc/hostname",
            "mkdir $M/d",
            "rm $M/etc/hostname",
            "rmdir $M/tree/d0",
            "mv $M/etc/hostname $M/etc/h2",
            "ln -s /x $M/l",
            "chmod 600 $M/etc/hostname",
            "touch $M/etc/hostname",
            "truncate -s 0 $M/etc/hostname",
        ] {
            let (success, _, stderr) = sh(&m, change);
            assert!(
                !success && stderr.contains("Read-only file system"),
                "{change}: {stderr}"
            );
        }
        assert_eq!(
            std::fs::read_to_string(scene.pod().join("etc/hostname")).unwrap(),
            "pod-1\n"
        );

        // A request the agent never answers fails with EIO after the timeout, while the rest of
        // the mount keeps answering meanwhile.
        let stalled = std::thread::spawn({
            let m = m.clone();
            move || sh(&m, "cat $M/app/stall")
        });
        assert_eq!(ok(&m, "cat $M/etc/hostname"), "pod-1\n");
        let (success, _, stderr) = stalled.join().unwrap();
        assert!(
            !success && stderr.contains("Input/output error"),
            "{stderr}"
        );

        mounted.unmount().expect("unmount");
        assert!(!mounted_here());
        drop(runtime);
    });
}

/// A tree walk finds every entry while each directory is listed once, the next siblings before
/// the walk reaches them; a directory changed in the pod shows the change once the TTL is over.
#[test]
fn tree_walks_list_ahead_and_listings_last_one_ttl() {
    in_private_mount_namespace("tree_walks_list_ahead_and_listings_last_one_ttl", || {
        let scene = Scene::new("walk");
        // Long enough that nothing listed during the walk expires before it is used, even on
        // a loaded machine.
        let ttl = Duration::from_secs(5);
        let (runtime, mounted, listed) = mount_scene_with(&scene, false, ttl);
        let m = mounted.mountpoint().to_owned();
        let count = |path: &str| listed.lock().unwrap().iter().filter(|p| *p == path).count();

        // The walk starts at the first directory in the listing's own order (`ls -f`).
        let first = ok(&m, "ls -f $M/tree | grep '^d' | head -n 1");
        ok(&m, &format!("ls $M/tree/{}", first.trim()));
        let opened = format!("/tree/{}", first.trim());
        let ahead = || {
            listed
                .lock()
                .unwrap()
                .iter()
                .filter(|p| p.starts_with("/tree/d") && **p != opened)
                .count()
        };
        // The listings ahead are asked for in the background: wait until they have been.
        for _ in 0..100 {
            if ahead() >= 8 {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let ahead = ahead();
        assert_eq!(ahead, 8, "listed: {:?}", listed.lock().unwrap());

        assert_eq!(
            ok(&m, "find $M/tree | wc -l").trim(),
            (1 + 30 * 2 + 3000).to_string()
        );
        for d in 0..30 {
            for dir in [format!("/tree/d{d}"), format!("/tree/d{d}/sub")] {
                assert_eq!(count(&dir), 1, "{dir}: {:?}", listed.lock().unwrap());
            }
        }

        std::fs::write(scene.pod().join("tree/d3/new-in-pod"), "x").unwrap();
        std::thread::sleep(ttl + Duration::from_millis(100));
        assert!(ok(&m, "ls $M/tree/d3").contains("new-in-pod"));

        mounted.unmount().expect("unmount");
        drop(runtime);
    });
}

/// A walk that only wants names (`find`) gets listings without attributes from its second
/// directory on; one that looks at the files gets them back. Either way every name, type,
/// mode and size is the pod's.
#[test]
fn walkers_see_the_pods_names_types_and_sizes() {
    in_private_mount_namespace("walkers_see_the_pods_names_types_and_sizes", || {
        let scene = Scene::new("walkers");
        let (runtime, mounted, _) = mount_scene_with(&scene, false, Duration::from_secs(5));
        let m = mounted.mountpoint().to_owned();
        let pod = scene.pod();
        // `find -printf FORMAT` over the tree under `root`, sorted.
        let walk = |root: &Path, format: &str| {
            ok(
                root,
                &format!("find $M/tree -printf '{format}' | LC_ALL=C sort"),
            )
        };
        let in_pod = |format: &str| walk(&pod, format);
        let in_mount = |format: &str| walk(&m, format);
        // Names and types only (from the listing's entry types).
        let names = "%y %P\\n";
        assert_eq!(in_mount(names), in_pod(names));
        assert_eq!(in_mount(names).lines().count(), 1 + 30 * 2 + 3000);
        // The same walk asking for every file's mode and size: from its first file lookup on,
        // the listings carry attributes again.
        let stats = "%y %m %s %P\\n";
        assert_eq!(in_mount(stats), in_pod(stats));
        // A fresh walker, then `stat` of files in the directories it read by name.
        ok(&m, "find $M/tree/d4 $M/tree/d5 $M/tree/d6 > /dev/null");
        let stat = "stat -c '%F %a %s %n' $M/tree/d6/sub $M/tree/d6/sub/f7 | sed 's, /.*/tree/, ,'";
        assert_eq!(ok(&m, stat), ok(&pod, stat));

        mounted.unmount().expect("unmount");
        drop(runtime);
    });
}

#[test]
fn writable_mount_changes_the_pods_files() {
    in_private_mount_namespace("writable_mount_changes_the_pods_files", || {
        let scene = Scene::new("rw");
        let (runtime, mounted) = mount_scene(&scene, true);
        let m = mounted.mountpoint().to_owned();
        let pod = scene.pod();

        ok(&m, "echo hello > $M/app/new && echo more >> $M/app/new");
        assert_eq!(
            std::fs::read_to_string(pod.join("app/new")).unwrap(),
            "hello\nmore\n"
        );
        ok(
            &m,
            "mkdir -p $M/app/dir/sub && mv $M/app/new $M/app/dir/sub/moved",
        );
        assert_eq!(ok(&m, "cat $M/app/dir/sub/moved"), "hello\nmore\n");
        ok(&m, "mv $M/app/dir $M/app/dir2");
        assert_eq!(ok(&m, "cat $M/app/dir2/sub/moved"), "hello\nmore\n");
        assert!(pod.join("app/dir2/sub/moved").is_file());
        ok(
            &m,
            "chmod 640 $M/app/dir2/sub/moved && truncate -s 3 $M/app/dir2/sub/moved",
        );
        assert_eq!(ok(&m, "stat -c %a:%s $M/app/dir2/sub/moved"), "640:3\n");
        ok(&m, "touch -d @1000000000 $M/app/dir2/sub/moved");
        assert_eq!(ok(&m, "stat -c %Y $M/app/dir2/sub/moved"), "1000000000\n");
        ok(&m, "chown 1234:4321 $M/app/dir2/sub/moved");
        assert_eq!(ok(&m, "stat -c %u:%g $M/app/dir2/sub/moved"), "1234:4321\n");
        // A symlink created through the mount holds its target verbatim, meaning the pod's `/`.
        ok(&m, "ln -s /etc/hostname $M/app/hn");
        assert_eq!(
            std::fs::read_link(pod.join("app/hn")).unwrap(),
            Path::new("/etc/hostname")
        );
        assert_eq!(ok(&m, "cat $M/app/hn"), "pod-1\n");
        // Writing through an absolute symlink changes the pod's file.
        ok(&m, "echo changed > $M/app/hn");
        assert_eq!(
            std::fs::read_to_string(pod.join("etc/hostname")).unwrap(),
            "changed\n"
        );
        // Copies bigger than one agent write arrive whole.
        ok(&m, "cp $M/app/big $M/app/big2 && sync $M/app/big2");
        assert_eq!(
            std::fs::read(pod.join("app/big2")).unwrap(),
            std::fs::read(pod.join("app/big")).unwrap()
        );
        // The errors a shell user sees are the real ones.
        let (_, _, stderr) = sh(&m, "rmdir $M/app/dir2");
        assert!(stderr.contains("Directory not empty"), "{stderr}");
        let (_, _, stderr) = sh(&m, "mkdir $M/app/dir2");
        assert!(stderr.contains("File exists"), "{stderr}");
        let (_, _, stderr) = sh(&m, "cat $M/app/nope");
        assert!(stderr.contains("No such file or directory"), "{stderr}");
        ok(&m, "rm -r $M/app/dir2 $M/app/hn $M/app/big2");
        assert!(!pod.join("app/dir2").exists() && !pod.join("app/hn").exists());
        // A file appended to in the pod shows its new lines once the attribute TTL has passed.
        ok(&m, "cat $M/etc/shadow");
        std::fs::write(pod.join("etc/shadow"), "pod shadow\nnew line\n").unwrap();
        std::thread::sleep(Duration::from_millis(400));
        assert_eq!(ok(&m, "cat $M/etc/shadow"), "pod shadow\nnew line\n");

        drop(mounted);
        assert!(!mounted_here());
        drop(runtime);
    });
}
