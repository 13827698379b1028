//! Records the git commit the binary is built from, for `mirrord --version`: `MIRRORD_GIT_COMMIT`
//! from the environment (for packagers building from a tarball), else `git rev-parse`, else
//! `unknown`. Never fails the build.

use std::process::Command;

fn git(args: &[&str]) -> Option<String> {
    let output = Command::new("git").args(args).output().ok()?;
    let text = String::from_utf8(output.stdout).ok()?;
    (output.status.success() && !text.trim().is_empty()).then(|| text.trim().to_owned())
}

fn main() {
    println!("cargo:rerun-if-env-changed=MIRRORD_GIT_COMMIT");
    let commit = std::env::var("MIRRORD_GIT_COMMIT")
        .ok()
        .filter(|commit| !commit.is_empty())
        .or_else(|| git(&["rev-parse", "--short=12", "HEAD"]))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=MIRRORD_GIT_COMMIT={commit}");
    // Built again when HEAD moves: a checkout (HEAD) or a commit on the branch (its ref).
    if let Some(git_dir) = git(&["rev-parse", "--absolute-git-dir"]) {
        println!("cargo:rerun-if-changed={git_dir}/HEAD");
    }
    if let (Some(common), Some(branch)) = (
        git(&["rev-parse", "--path-format=absolute", "--git-common-dir"]),
        git(&["symbolic-ref", "-q", "HEAD"]),
    ) {
        // A path that does not exist would make every build run this again.
        for path in [
            format!("{common}/{branch}"),
            format!("{common}/packed-refs"),
        ] {
            if std::path::Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
