//! Shell completion: the scripts `mirrord completions SHELL` prints, and the completer of target
//! names they call back into. Completing must never print an error or hang a shell: every
//! source of names is best effort, the cluster's within [`CLUSTER_TIMEOUT`].
//!
//! The scripts are clap_complete's dynamic ones: the shell runs `mirrord` again with
//! [`COMPLETE_VAR`] set and the words typed so far, so flags, subcommands and target names all
//! come from the same definitions as the parser.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::io::Write;
use std::time::Duration;

use clap_complete::engine::CompletionCandidate;
use clap_complete::env::{Bash, EnvCompleter, Fish, Zsh};

use crate::args::CompletionShell;
use crate::cluster_agent::{self, KubeSettings};

/// The variable that turns a run of `mirrord` into a completion request.
pub const COMPLETE_VAR: &str = "_MIRRORD_COMPLETE";

/// How long a completion waits for the cluster's targets before offering what it has.
const CLUSTER_TIMEOUT: Duration = Duration::from_secs(2);

/// Answers a completion request and exits when [`COMPLETE_VAR`] is set; returns otherwise.
pub fn answer_if_asked() {
    clap_complete::CompleteEnv::with_factory(crate::args::command)
        .var(COMPLETE_VAR)
        .complete();
}

/// The registration script for `shell`; it calls `mirrord` from `PATH`.
pub fn script(shell: CompletionShell, out: &mut dyn Write) -> std::io::Result<()> {
    let completer: &dyn EnvCompleter = match shell {
        CompletionShell::Bash => &Bash,
        CompletionShell::Zsh => &Zsh,
        CompletionShell::Fish => &Fish,
    };
    completer.write_registration(COMPLETE_VAR, "mirrord", "mirrord", "mirrord", out)
}

/// Target names starting with `current`: `targetless`, the cluster's targets (the kubeconfig's
/// current namespace) and `pid/PID` of local processes in network namespaces of their own
/// (containers, pods, test fixtures), one per namespace.
pub fn complete_target(current: &OsStr) -> Vec<CompletionCandidate> {
    let Some(current) = current.to_str() else {
        return Vec::new();
    };
    let mut candidates = vec![
        CompletionCandidate::new("targetless")
            .help(Some("no target: the cluster's network".into())),
    ];
    candidates.extend(
        cluster_targets()
            .into_iter()
            .map(|path| CompletionCandidate::new(path).help(Some("in the cluster".into()))),
    );
    candidates.extend(
        container_processes().into_iter().map(|(pid, name)| {
            CompletionCandidate::new(format!("pid/{pid}")).help(Some(name.into()))
        }),
    );
    candidates.retain(|candidate| {
        candidate
            .get_value()
            .to_str()
            .is_some_and(|value| value.starts_with(current))
    });
    candidates
}

fn cluster_targets() -> Vec<String> {
    let settings = KubeSettings::default();
    if !cluster_agent::cluster_configured(&settings) {
        return Vec::new();
    }
    let Ok(runtime) = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    else {
        return Vec::new();
    };
    let listed = runtime.block_on(tokio::time::timeout(
        CLUSTER_TIMEOUT,
        cluster_agent::list(&settings, false),
    ));
    // A connection still pending must not keep the shell waiting.
    runtime.shutdown_background();
    match listed {
        Ok(Ok(targets)) => targets.into_iter().map(|(_, path)| path).collect(),
        _ => Vec::new(),
    }
}

/// The lowest pid of each network namespace other than ours, with its command name: the
/// init process of a container or pod. Processes we may not inspect are left out.
fn container_processes() -> Vec<(u32, String)> {
    let Ok(own) = std::fs::read_link("/proc/self/ns/net") else {
        return Vec::new();
    };
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut first: BTreeMap<std::path::PathBuf, u32> = BTreeMap::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(netns) = std::fs::read_link(entry.path().join("ns/net")) else {
            continue;
        };
        if netns == own {
            continue;
        }
        first
            .entry(netns)
            .and_modify(|lowest| *lowest = (*lowest).min(pid))
            .or_insert(pid);
    }
    let mut processes: Vec<(u32, String)> = first
        .into_values()
        .map(|pid| {
            let name = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
            (pid, name.trim().to_owned())
        })
        .collect();
    processes.sort();
    processes
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_shell_gets_a_script_calling_mirrord() {
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let mut out = Vec::new();
            script(shell, &mut out).unwrap();
            let text = String::from_utf8(out).unwrap();
            assert!(text.contains(COMPLETE_VAR), "{shell:?}: {text}");
        }
    }

    #[test]
    fn targetless_is_always_offered_and_prefixes_filter() {
        let all = complete_target(OsStr::new(""));
        assert!(all.iter().any(|c| c.get_value() == "targetless"));
        assert!(complete_target(OsStr::new("zzz")).is_empty());
    }
}
