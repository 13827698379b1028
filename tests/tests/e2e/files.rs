//! The pod's files through `mirrord exec`: the pod's root at `$MIRRORD_REMOTE_ROOT` (FUSE,
//! served by the agent), read with ordinary tools; writes only in write mode; symlinks and `..`
//! never lead to the host's files; nothing stays mounted afterwards.

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::thread;
use std::time::Duration;

use libtest_mimic::Failed;
use mirrord_tests::cluster::{POD_FILE_DIR, POD_ONLY_FILE, POD_SHADOW};
use mirrord_tests::command::Run;
use mirrord_tests::{Cluster, Pod, Scene};

use super::{exec, standard_pod, start_until_first_line};

/// Runs `script` inside the pod (its mount namespace), as the pod's own processes would.
fn in_pod(pod: &Pod, script: &str) -> Result<String, Failed> {
    let mut cmd = pod.command("sh");
    cmd.args(["-c", script]);
    let out = cmd.run(Duration::from_secs(120))?;
    if out.code != 0 {
        return Err(Failed::from(format!(
            "in the pod: {script}: {}",
            out.describe()
        )));
    }
    Ok(out.stdout)
}

/// `sh -c script` through `mirrord exec` against `pod`, with `flags`.
fn mirrord_sh(
    scene: &Scene,
    pod: &Pod,
    flags: &[&str],
    script: &str,
) -> Result<mirrord_tests::Output, Failed> {
    exec(scene, pod, flags, &["sh", "-c", script])
}

pub fn fs_ls_cat_find_grep(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    in_pod(
        &pod,
        &format!(
            "cd {POD_FILE_DIR} && mkdir tree && cd tree && for d in $(seq 100); do mkdir d$d; \
             (cd d$d && seq 100 | sed 's/^/f/' | xargs touch); done && \
             mkdir ../grep && echo 'a needle here' > ../grep/one && echo hay > ../grep/two && \
             mkdir ../grep/sub && echo 'needle again' > ../grep/sub/three"
        ),
    )?;
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "R=$MIRRORD_REMOTE_ROOT; ls -la $R{POD_FILE_DIR} | grep -c {POD_ONLY_FILE}; cat $R{POD_FILE_DIR}/{POD_ONLY_FILE}; \
             find $R{POD_FILE_DIR}/tree -type f | wc -l; grep -rl needle $R{POD_FILE_DIR}/grep | sed \"s|$R||\" | sort"
        ),
    )?;
    let expected = format!(
        "1\n{}10000\n{POD_FILE_DIR}/grep/one\n{POD_FILE_DIR}/grep/sub/three\n",
        pod.pod_only_content()
    );
    ensure!(
        out.code == 0 && out.stdout == expected,
        "ls/cat/find/grep: {}",
        out.describe()
    );
    Ok(())
}

/// With `--fs-xattrs`, extended attributes read the same after a directory listing (which
/// carries their names, so absent ones are answered without asking the agent) as on a first,
/// direct lookup.
pub fn fs_extended_attributes(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    in_pod(
        &pod,
        &format!(
            "mkdir {POD_FILE_DIR}/x && echo a > {POD_FILE_DIR}/x/tagged && echo b > {POD_FILE_DIR}/x/plain && \
             python3 -c \"import os; os.setxattr('{POD_FILE_DIR}/x/tagged', 'user.color', b'blue')\""
        ),
    )?;
    // Probes each file twice: before any listing of the directory, then after one.
    let script = format!(
        "import errno, os, sys\n\
         d = os.path.join(os.environ['MIRRORD_REMOTE_ROOT'], '{}/x')\n\
         def probe(round):\n\
         \x20   for name in ('tagged', 'plain'):\n\
         \x20       p = os.path.join(d, name)\n\
         \x20       try:\n\
         \x20           value = os.getxattr(p, 'user.color').decode()\n\
         \x20       except OSError as e:\n\
         \x20           value = errno.errorcode[e.errno]\n\
         \x20       print(round, name, sorted(os.listxattr(p)), value)\n\
         probe('direct')\n\
         os.listdir(d)\n\
         probe('listed')\n",
        POD_FILE_DIR.trim_start_matches('/')
    );
    let out = exec(scene, &pod, &["--fs-xattrs"], &["python3", "-c", &script])?;
    let expected = "direct tagged ['user.color'] blue\n\
                    direct plain [] ENODATA\n\
                    listed tagged ['user.color'] blue\n\
                    listed plain [] ENODATA\n";
    ensure!(
        out.code == 0 && out.stdout == expected,
        "extended attributes: {}",
        out.describe()
    );
    Ok(())
}

/// By default the mount has no extended attributes, as sshfs: `getfattr` says they are not
/// supported (and the kernel stops asking, so `ls -l` costs no probes).
pub fn fs_extended_attributes_are_off_by_default(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    in_pod(
        &pod,
        &format!(
            "mkdir {POD_FILE_DIR}/x && echo a > {POD_FILE_DIR}/x/tagged && \
             python3 -c \"import os; os.setxattr('{POD_FILE_DIR}/x/tagged', 'user.color', b'blue')\""
        ),
    )?;
    let script = format!(
        "getfattr -n user.color $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/x/tagged; \
         getfattr -d $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/x/tagged; \
         ls -l $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/x | grep -c tagged"
    );
    let out = exec(scene, &pod, &[], &["sh", "-c", &script])?;
    let unsupported = out
        .stderr
        .lines()
        .filter(|line| line.ends_with("Operation not supported"))
        .count();
    ensure!(
        out.stdout == "1\n" && unsupported == 2,
        "getfattr without --fs-xattrs: {}",
        out.describe()
    );
    Ok(())
}

/// `grep -r` through a directory of small files (which come in one batch with their directory),
/// a large file, a FIFO and a symlink beside them: every file reads as in the pod, and a file
/// changed, removed or created, or the symlink made anew, in the pod shows so once the
/// attribute TTL (1 s) has passed.
pub fn fs_small_files_read_with_their_directory_follow_the_pod(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let dir = format!("{POD_FILE_DIR}/walk");
    in_pod(
        &pod,
        &format!(
            "mkdir {dir} && cd {dir} && echo one > a && echo two > b && echo three > c && \
             seq 20000 > big && mkfifo fifo && ln -s a link"
        ),
    )?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--", "sh", "-c"])
        .arg(format!(
            "cd $MIRRORD_REMOTE_ROOT{dir} || exit 1; \
             show() {{ grep -r . . --exclude=big | sort; grep -c . big; readlink link; }}; \
             show; echo READY; read go; sleep 1.5; show"
        ))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut session = cmd.spawn()?;
    let mut go = session.stdin.take().ok_or("no stdin")?;
    let mut lines = BufReader::new(session.stdout.take().ok_or("no stdout")?).lines();
    let mut before = Vec::new();
    for line in lines.by_ref() {
        let line = line?;
        if line == "READY" {
            break;
        }
        before.push(line);
    }
    in_pod(
        &pod,
        &format!("cd {dir} && echo changed > a && rm b && echo four > d && ln -sfn c link"),
    )?;
    std::io::Write::write_all(&mut go, b"go\n")?;
    drop(go);
    let after: Vec<String> = lines.collect::<Result<_, _>>()?;
    let status = session.wait()?;
    let expected_before = ["./a:one", "./b:two", "./c:three", "20000", "a"];
    let expected_after = ["./a:changed", "./c:three", "./d:four", "20000", "c"];
    ensure!(
        before == expected_before && after == expected_after && status.success(),
        "before the change {before:?}, after {after:?}, {status}"
    );
    Ok(())
}

/// `tail -f` of a file the pod appends to shows the new line (within the attribute TTL).
pub fn fs_tail_follows_pod_appends(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    in_pod(&pod, &format!("echo first > {POD_FILE_DIR}/app.log"))?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--", "sh", "-c"])
        .arg(format!(
            "exec timeout 15 tail -n +1 -f $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/app.log"
        ))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let mut tail = cmd.spawn()?;
    let mut lines = BufReader::new(tail.stdout.take().ok_or("no stdout")?).lines();
    let first = lines.next().transpose()?;
    ensure!(
        first.as_deref() == Some("first"),
        "tail -f began with {first:?}"
    );
    in_pod(
        &pod,
        &format!("echo appended-later >> {POD_FILE_DIR}/app.log"),
    )?;
    let (line_tx, line_rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        let _ = line_tx.send(lines.next().transpose());
    });
    let next = line_rx.recv_timeout(Duration::from_secs(10));
    let _ = tail.kill();
    let _ = tail.wait();
    ensure!(
        matches!(&next, Ok(Ok(Some(line))) if line == "appended-later"),
        "tail -f did not show the appended line: {next:?}"
    );
    Ok(())
}

pub fn fs_git_in_a_pod_repository(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    in_pod(
        &pod,
        &format!(
            "cd {POD_FILE_DIR} && git init -q repo && cd repo && for n in $(seq 50); do echo $n > file$n; done && \
             git add . && git -c user.name=pod -c user.email=pod@cluster commit -qm 'initial pod commit'"
        ),
    )?;
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "cd $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/repo && git log --format=%s && git status --porcelain && echo clean"
        ),
    )?;
    ensure!(
        out.code == 0 && out.stdout == "initial pod commit\nclean\n",
        "git: {}",
        out.describe()
    );
    // Files show the pod's inode numbers, which git's index recorded (so a clean work tree is
    // not read again), and hard links are one file.
    let in_pod_inodes = in_pod(
        &pod,
        &format!("cd {POD_FILE_DIR}/repo && ln file1 link1 && stat -c %i file1 file2 link1"),
    )?;
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "cd $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/repo && stat -c %i file1 file2 link1 && \
             [ file1 -ef link1 ] && [ ! file1 -ef file2 ] && echo same"
        ),
    )?;
    ensure!(
        out.code == 0 && out.stdout == format!("{in_pod_inodes}same\n"),
        "inode numbers (the pod's: {in_pod_inodes:?}): {}",
        out.describe()
    );
    Ok(())
}

pub fn fs_sha256_of_a_256_mib_file(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let in_pod_sum = in_pod(
        &pod,
        &format!(
            "head -c 268435456 /dev/urandom > {POD_FILE_DIR}/big.bin && sha256sum < {POD_FILE_DIR}/big.bin"
        ),
    )?;
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!("sha256sum < $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/big.bin"),
    )?;
    ensure!(
        out.code == 0 && out.stdout == in_pod_sum,
        "sha256: pod {in_pod_sum:?}, mirrord {}",
        out.describe()
    );
    Ok(())
}

pub fn fs_write_mode_and_read_only_mode(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let out = mirrord_sh(
        scene,
        &pod,
        &["--fs-mode", "write"],
        &format!("echo written-locally > $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/from-laptop.txt"),
    )?;
    ensure!(out.code == 0, "write mode: {}", out.describe());
    let seen = in_pod(&pod, &format!("cat {POD_FILE_DIR}/from-laptop.txt"))?;
    ensure!(seen == "written-locally\n", "the pod sees {seen:?}");

    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!("echo nope > $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/refused.txt"),
    )?;
    ensure!(
        out.code != 0 && out.stderr.contains("Read-only file system"),
        "read mode accepted a write: {}",
        out.describe()
    );
    let listing = in_pod(&pod, &format!("ls {POD_FILE_DIR}"))?;
    ensure!(
        !listing.contains("refused.txt"),
        "the refused file exists in the pod: {listing}"
    );
    Ok(())
}

/// A pod symlink to `/etc/shadow`, a relative one climbing past the pod's root, and `..` chains
/// inside the mount all reach the pod's files, never the host's; `/etc/hosts` is the pod's.
pub fn fs_escape_attempts_stay_in_the_pod(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    in_pod(
        &pod,
        &format!(
            "cd {POD_FILE_DIR} && ln -s /etc/shadow abs-link && ln -s ../../../../../../etc/shadow rel-link && \
             echo 'pod hosts' > hosts-marker"
        ),
    )?;
    let host_shadow = std::fs::read_to_string("/etc/shadow").unwrap_or_default();
    ensure!(
        host_shadow != POD_SHADOW,
        "the host's /etc/shadow equals the pod's; the test proves nothing"
    );
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "R=$MIRRORD_REMOTE_ROOT; cat $R{POD_FILE_DIR}/abs-link $R{POD_FILE_DIR}/rel-link \
             $R{POD_FILE_DIR}/../etc/shadow $R/../${{R##*/}}/etc/shadow 2>&1"
        ),
    )?;
    // (`$R/..` itself is resolved by the local kernel: DESIGN.md, "Confinement". Every path
    // that stays inside the mount must be the pod's.)
    ensure!(
        out.code == 0 && out.stdout == POD_SHADOW.repeat(4),
        "escape attempts: {}",
        out.describe()
    );
    // The pod's `/etc/shadow` written with one `..` too many is not found; never the host's.
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        "cat $MIRRORD_REMOTE_ROOT/../../etc/shadow",
    )?;
    ensure!(
        out.code != 0 && out.stdout.is_empty() && out.stderr.contains("No such file or directory"),
        "$MIRRORD_REMOTE_ROOT/../../etc/shadow: {}",
        out.describe()
    );
    let out = mirrord_sh(scene, &pod, &[], "cat /etc/shadow")?;
    ensure!(
        out.stdout != POD_SHADOW,
        "only overlaid paths are the pod's: {}",
        out.describe()
    );
    Ok(())
}

/// The launched process sees the pod's `/etc/hosts` and `/etc/hostname` at their own path in
/// read mode, and the local ones in local mode; the host's view never changes.
pub fn fs_overlays_follow_the_mode(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    // The pod's own /etc/hosts, bound in its private mount namespace only.
    in_pod(
        &pod,
        &format!(
            "cp /etc/hosts {POD_FILE_DIR}/hosts && echo '10.9.9.9 only-in-pod-hosts' >> {POD_FILE_DIR}/hosts && \
             mount --bind {POD_FILE_DIR}/hosts /etc/hosts"
        ),
    )?;
    let pod_hosts = in_pod(&pod, "cat /etc/hosts")?;
    let local_hosts = std::fs::read_to_string("/etc/hosts")?;
    // The pod's /etc/hosts, plus the name of the host-loopback address.
    let host_entry = "198.19.255.254\thost.mirrord.internal\n";
    let out = mirrord_sh(scene, &pod, &[], "cat /etc/hosts")?;
    ensure!(
        out.code == 0 && out.stdout.starts_with(&pod_hosts) && out.stdout.ends_with(host_entry),
        "read mode /etc/hosts: {}",
        out.describe()
    );
    let out = mirrord_sh(
        scene,
        &pod,
        &["--fs-mode", "local"],
        "cat /etc/hosts; test -d \"$MIRRORD_REMOTE_ROOT/srv\" && echo remote-root",
    )?;
    ensure!(
        out.code == 0
            && out.stdout.starts_with(&local_hosts)
            && out.stdout.ends_with(&format!("{host_entry}remote-root\n")),
        "local mode: {}",
        out.describe()
    );
    ensure!(
        std::fs::read_to_string("/etc/hosts")? == local_hosts,
        "the host's /etc/hosts changed"
    );
    Ok(())
}

/// The pod's service-account directory appears at its own path although this machine has no
/// `/var/run/secrets`: mirrord makes room over the nearest existing ancestor (`/run`) in the
/// command's mount namespace only, keeping every entry of the local `/run` visible there.
pub fn fs_service_account_without_a_local_path(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    const SA: &str = "/var/run/secrets/kubernetes.io/serviceaccount";
    let pod = standard_pod(cluster)?;
    ensure!(
        !std::path::Path::new("/run/secrets").exists(),
        "the world already has /run/secrets"
    );
    // The pod's own /run (a tmpfs of its mount namespace), holding its token as a kubelet would.
    in_pod(
        &pod,
        &format!(
            "mount -t tmpfs pod-run /run && mkdir -p {SA} && echo pod-token > {SA}/token && \
             echo default > {SA}/namespace"
        ),
    )?;
    let local_run = |extra: &[&str]| -> Result<Vec<String>, Failed> {
        let mut names: Vec<String> = std::fs::read_dir("/run")?
            .map(|entry| entry.map(|e| e.file_name().to_string_lossy().into_owned()))
            .collect::<Result<_, _>>()?;
        names.extend(extra.iter().map(|name| name.to_string()));
        names.sort();
        Ok(names)
    };
    let before = local_run(&[])?;
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!("cat {SA}/token {SA}/namespace && echo --- && ls -A /run && test -d /run/lock"),
    )?;
    let (files, listing) = out.stdout.split_once("---\n").unwrap_or_default();
    let mut listed: Vec<String> = listing.lines().map(str::to_owned).collect();
    listed.sort();
    ensure!(
        out.code == 0 && files == "pod-token\ndefault\n",
        "service account: {}",
        out.describe()
    );
    ensure!(
        listed == local_run(&["secrets"])?,
        "the command's /run is not the local /run plus secrets: {listed:?} vs {before:?}"
    );
    ensure!(
        local_run(&[])? == before,
        "the local /run changed: {:?}",
        local_run(&[])?
    );
    Ok(())
}

/// After `kill -9` of mirrord no FUSE mount exists anywhere we can see, and the next run sweeps
/// the empty mount-point directory the killed one could not remove.
pub fn fs_nothing_mounted_after_kill_9(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let mut cmd = scene.mirrord()?;
    cmd.args(["exec", "-t", &pod.target(), "--", "sh", "-c"])
        .arg(format!(
            "cat $MIRRORD_REMOTE_ROOT{POD_FILE_DIR}/{POD_ONLY_FILE}; exec sleep 60"
        ))
        .stderr(Stdio::null());
    let (mut mirrord, _, line) = start_until_first_line(cmd)?;
    ensure!(
        line == pod.pod_only_content(),
        "the command did not read the pod's file: {line:?}"
    );
    let leftover = std::env::temp_dir().join(format!("mirrord-remote-{}", mirrord.id()));
    mirrord.kill()?;
    mirrord.wait()?;
    thread::sleep(Duration::from_millis(300));
    let mounts = std::fs::read_to_string("/proc/self/mounts")?;
    ensure!(
        !mounts.lines().any(|line| line.contains(" fuse")),
        "a FUSE mount is left: {mounts}"
    );
    let out = exec(scene, &pod, &[], &["true"])?;
    ensure!(out.code == 0, "the next run: {}", out.describe());
    ensure!(
        !leftover.exists(),
        "{} was not swept by the next run",
        leftover.display()
    );
    Ok(())
}

/// A process in the pod, in its own process group, killed with its children when dropped.
struct PodLoop(std::process::Child);

impl PodLoop {
    fn start(pod: &Pod, script: &str) -> Result<PodLoop, Failed> {
        let mut cmd = pod.command("sh");
        cmd.args(["-c", script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        Ok(PodLoop(cmd.spawn()?))
    }
}

impl Drop for PodLoop {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let _ = nix::sys::signal::killpg(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGKILL,
            );
        }
        let _ = self.0.wait();
    }
}

/// A directory of this machine, removed with everything in it when dropped.
struct HostDir(std::path::PathBuf);

impl Drop for HostDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file only this machine has, at a path where the pod has a file of its own: the pod's
/// [`POD_FILE_DIR`] is a tmpfs of its mount namespace, so this machine's directory of the same
/// name is out of the pod's reach. Whoever reads `host` content through the mount escaped.
fn plant_host_marker(pod: &Pod, name: &str) -> Result<(HostDir, String, String), Failed> {
    let dir = HostDir(std::path::PathBuf::from(format!("{POD_FILE_DIR}/{name}")));
    let host = format!("host-only {name}");
    let in_pod_content = format!("the pod copy of {name}");
    std::fs::create_dir_all(&dir.0)?;
    std::fs::write(dir.0.join("secret"), format!("{host}\n"))?;
    in_pod(
        pod,
        &format!(
            "mkdir -p {POD_FILE_DIR}/{name} && echo '{in_pod_content}' > {POD_FILE_DIR}/{name}/secret"
        ),
    )?;
    Ok((dir, host, in_pod_content))
}

/// The pod keeps swapping a path between a directory, a symlink to `/`, one to `../../..`, one
/// to `/proc/self/root`, and keeps renaming a deep directory holding a link whose `..`s are
/// harmless only at its first depth, while the local process keeps reading through all of them:
/// every read returns the pod's file or an error, never the file this machine has at that path.
pub fn fs_symlink_swaps_during_reads_stay_in_the_pod(
    scene: &Scene,
    cluster: &Cluster,
) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let name = format!("mrdt-marker-{}", pod.pid());
    let (_host_dir, host, in_pod_content) = plant_host_marker(&pod, &name)?;
    let deep = "d/1/2/3/4/5/6/7/8/9";
    // From /srv/race/d/1/…/9 (12 levels) the link's 12 `..` reach the pod's root exactly; from
    // /srv/race/e, where the pod moves it, they would climb 9 levels past the mount.
    let up12 = "../".repeat(12);
    let _swapper = PodLoop::start(
        &pod,
        &format!(
            "mkdir -p {POD_FILE_DIR}/race && cd {POD_FILE_DIR}/race || exit 1
             while :; do
               rm -rf x; ln -s / x
               rm -f x; ln -s ../../.. x
               rm -f x; ln -s /proc/self/root x
               rm -f x; mkdir -p x/srv/{name} && echo 'dir {in_pod_content}' > x/srv/{name}/secret
               rm -rf d e; mkdir -p {deep} && ln -s {up12}srv/{name}/secret {deep}/link
               sleep 0.01; mv {deep} e; sleep 0.01
             done"
        ),
    )?;
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "R=$MIRRORD_REMOTE_ROOT/srv/race; for i in $(seq 1500); do \
             cat $R/x/srv/{name}/secret $R/{deep}/link $R/e/link 2>/dev/null; done; echo done"
        ),
    )?;
    ensure!(
        out.code == 0 && out.stdout.ends_with("done\n"),
        "the reading loop: {}",
        out.describe()
    );
    ensure!(
        !out.stdout.contains(&host),
        "a read through the mount returned this machine's file: {} of {} lines",
        out.stdout.lines().filter(|l| l.contains(&host)).count(),
        out.stdout.lines().count()
    );
    let reads: std::collections::BTreeMap<&str, usize> =
        out.stdout
            .lines()
            .fold(Default::default(), |mut seen, line| {
                *seen.entry(line).or_default() += 1;
                seen
            });
    ensure!(
        reads.contains_key(in_pod_content.as_str())
            && reads.contains_key(format!("dir {in_pod_content}").as_str())
            && reads.len() == 3,
        "expected only the pod's two files (and `done`) to be read, through links and the \
         directory alike: {reads:?}"
    );
    Ok(())
}

/// `/proc/self` tricks and very long names and paths, each with what a user would see: links
/// into the pod's `/proc` mean the pod's root, never this machine's; a 255-byte name reads, a
/// 256-byte one is `File name too long`, and so is a path past PATH_MAX inside the pod, while
/// the session goes on serving.
pub fn fs_proc_self_and_long_names(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let pod = standard_pod(cluster)?;
    let name = format!("mrdt-marker-{}", pod.pid());
    let (_host_dir, host, in_pod_content) = plant_host_marker(&pod, &name)?;
    let long = "n".repeat(255);
    let level = "l".repeat(250);
    in_pod(
        &pod,
        &format!(
            "cd {POD_FILE_DIR} && ln -s /proc/self/root selfroot && ln -s /proc/self/cwd selfcwd && \
             ln -s /proc/1/root oneroot && ln -s /proc/self/root/.. uproot && echo 'long name' > {long} && mkdir deep && \
             python3 -c 'import os\nos.chdir(\"deep\")\nfor _ in range(17): os.mkdir(\"{level}\"); os.chdir(\"{level}\")\nopen(\"f\", \"w\").write(\"bottom\")'"
        ),
    )?;
    // 16 levels (4,025 bytes under the pod's root) are still a path the agent takes; the 17th
    // (4,276) is not. A shell's `cd` takes the whole path, under this machine's PATH_MAX.
    let sixteen = vec![level.as_str(); 16].join("/");
    let secret = format!("srv/{name}/secret");
    // One line per path: the file's content, or `error` (the message goes to stderr).
    let paths = [
        format!("$S/selfroot/{secret}"),
        format!("$MIRRORD_REMOTE_ROOT/proc/self/root/{secret}"),
        format!("$S/oneroot/{secret}"),
        format!("$S/uproot/{secret}"),
        format!("$S/selfcwd/{secret}"),
    ];
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "S=$MIRRORD_REMOTE_ROOT/srv; for p in {}; do cat $p || echo error; done",
            paths.join(" ")
        ),
    )?;
    let got: Vec<&str> = out.stdout.lines().collect();
    ensure!(
        out.code == 0 && !out.stdout.contains(&host) && got.len() == paths.len(),
        "/proc links: {}",
        out.describe()
    );
    // The pod's own `/proc/self/root` is the pod's root; links the agent cannot read or that
    // lead nowhere in the pod are errors. Whatever they are, none is this machine's file.
    ensure!(
        got[..2] == [in_pod_content.as_str(); 2]
            && got[2..]
                .iter()
                .all(|l| *l == in_pod_content || *l == "error"),
        "/proc links: {:?}: {}",
        paths.iter().zip(&got).collect::<Vec<_>>(),
        out.describe()
    );
    let out = mirrord_sh(
        scene,
        &pod,
        &[],
        &format!(
            "S=$MIRRORD_REMOTE_ROOT/srv; cat $S/{long}; cat $S/{long}n; \
             cd $S/deep/{sixteen} || exit 3; cat {level}/f; \
             cat $S/{POD_ONLY_FILE}"
        ),
    )?;
    let lines: Vec<&str> = out.stderr.lines().collect();
    ensure!(
        out.stdout == format!("long name\n{}", pod.pod_only_content())
            && lines.len() == 2
            && lines[0].contains(&format!("{long}n: File name too long"))
            && lines[1].contains(&format!("{level}/f: File name too long")),
        "long names and paths: {}",
        out.describe()
    );
    Ok(())
}

/// A session at the most verbose log level of both ends (`MIRRORD_LOG=trace`,
/// `MIRRORD_AGENT_LOG=trace`) that uses a token, reads a file, writes one and takes an env
/// value, each a unique secret, and a refused attempt with a wrong token: the command sees the
/// secrets, and neither mirrord's stderr nor the agent's holds any of them.
pub fn secrets_never_reach_the_logs(scene: &Scene, cluster: &Cluster) -> Result<(), Failed> {
    let unique = std::process::id();
    let token = format!("token-secret-{unique}-a1b2");
    let wrong = format!("wrong-token-secret-{unique}-c3d4");
    let env_secret = format!("env-secret-{unique}-e5f6");
    let file_secret = format!("file-secret-{unique}-a7b8");
    let written = format!("written-secret-{unique}-c9d0");
    let pod = mirrord_tests::Pod::builder("web-7d9f8-x2k4q")
        .env("API_KEY", &env_secret)
        .file("secret.txt", format!("{file_secret}\n"))
        .start(cluster)?;
    let mut cmd = scene.agent()?;
    cmd.args(["--target-pid", &pod.pid().to_string()])
        .env("MIRRORD_AGENT_TOKEN", &token)
        .env("MIRRORD_AGENT_LOG", "trace");
    let agent = mirrord_tests::HandStartedAgent::start(cmd, mirrord_tests::command::SHORT)?;
    let session = |token: &str, script: &str| -> Result<mirrord_tests::Output, Failed> {
        let mut cmd = scene.mirrord()?;
        cmd.args([
            "exec",
            "--fs-mode",
            "write",
            "--agent-addr",
            agent.addr(),
            "--",
        ])
        .args(["sh", "-c", script])
        .env("MIRRORD_AGENT_TOKEN", token)
        .env("MIRRORD_LOG", "trace")
        .env("WRITTEN", &written);
        Ok(cmd.run(Duration::from_secs(60))?)
    };
    let refused = session(&wrong, "true")?;
    ensure!(refused.code != 0, "a wrong token: {}", refused.describe());
    let out = session(
        &token,
        "printenv API_KEY; cat $MIRRORD_REMOTE_ROOT/srv/secret.txt; \
         echo $WRITTEN > $MIRRORD_REMOTE_ROOT/srv/written.txt",
    )?;
    ensure!(
        out.code == 0 && out.stdout == format!("{env_secret}\n{file_secret}\n"),
        "the session: {}",
        out.describe()
    );
    ensure!(
        in_pod(&pod, "cat /srv/written.txt")? == format!("{written}\n"),
        "the written file"
    );
    let agent_log = agent.stderr();
    let logs = [
        ("mirrord (wrong token)", refused.stderr.as_str()),
        ("mirrord", out.stderr.as_str()),
        ("the agent", agent_log.as_str()),
    ];
    // The logs really are verbose: a test that saw no log line would prove nothing.
    ensure!(
        out.stderr.lines().count() > 20 && agent_log.contains("session open"),
        "expected trace logs from both ends: mirrord {} lines, agent {} lines",
        out.stderr.lines().count(),
        agent_log.lines().count()
    );
    for (whose, log) in logs {
        for secret in [&token, &wrong, &env_secret, &file_secret, &written] {
            ensure!(
                !log.contains(secret.as_str()),
                "{whose}'s log holds {secret:?}: {}",
                log.lines()
                    .filter(|l| l.contains(secret.as_str()))
                    .take(3)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
    }
    Ok(())
}
