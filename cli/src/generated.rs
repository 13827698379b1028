//! Files mirrord writes for the launched command alone — its `/etc/hosts` and
//! `/etc/resolv.conf` — which the command's setup binds over the local path inside its private
//! mount namespace. They live in the temp directory only until bound; nothing outside the temp
//! directory is ever written.

use std::path::{Path, PathBuf};

/// Name prefix of generated files in the temp directory: `mirrord-gen-PID-NAME`.
const PREFIX: &str = "mirrord-gen-";

/// One generated file and the local path it replaces; removed on drop.
#[derive(Debug)]
pub struct GeneratedFile {
    path: PathBuf,
    target: PathBuf,
}

impl GeneratedFile {
    /// Writes `contents` for `target`, which must exist (a bind needs an existing path), so a
    /// machine without it keeps running the command without the replacement.
    pub fn write(name: &str, target: &Path, contents: &str) -> std::io::Result<GeneratedFile> {
        // Left only by a mirrord killed between writing them and starting the command; one
        // scan of the temp directory per run is enough.
        static SWEPT: std::sync::Once = std::sync::Once::new();
        SWEPT.call_once(|| sweep_stale(PREFIX, |path| std::fs::remove_file(path)));
        // metadata follows symlinks: /etc/resolv.conf is often one, and the bind lands on its
        // destination, which must exist too.
        std::fs::metadata(target)?;
        let path = std::env::temp_dir().join(format!("{PREFIX}{}-{name}", std::process::id()));
        std::fs::write(&path, contents)?;
        Ok(GeneratedFile {
            path,
            target: target.to_owned(),
        })
    }

    /// `(generated file, local path)`, for [`crate::launcher::Launch::files`].
    pub fn bind(&self) -> (PathBuf, PathBuf) {
        (self.path.clone(), self.target.clone())
    }
}

impl Drop for GeneratedFile {
    fn drop(&mut self) {
        // Usually gone already: the command's setup removes it once bound.
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Removes what runs that were killed left in the temp directory: entries named
/// `PREFIX` + pid (+ `-` + anything) whose pid no longer exists, each with `remove`.
pub fn sweep_stale(prefix: &str, remove: fn(&Path) -> std::io::Result<()>) {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|name| name.strip_prefix(prefix))
            .and_then(|rest| rest.split('-').next())
        else {
            continue;
        };
        if pid.parse::<u32>().is_ok() && !Path::new("/proc").join(pid).exists() {
            let _ = remove(&entry.path());
        }
    }
}
