//! Replays every committed fuzz input — the seeds (`fuzz/seeds/TARGET`) and every input a
//! fuzzer once crashed on (`fuzz/regressions/TARGET`) — through the same target functions the
//! fuzz binaries call, on stable, so `.ci/run` catches a fixed crash coming back.

use std::path::{Path, PathBuf};

use mirrord_fuzz_targets::TARGETS;

fn inputs(target: &str, kind: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(kind)
        .join(target);
    let Ok(entries) = std::fs::read_dir(&dir) else {
        return Vec::new();
    };
    let mut files: Vec<PathBuf> = entries
        .map(|entry| entry.expect("a readable corpus folder").path())
        .filter(|path| path.is_file())
        .collect();
    files.sort();
    files
}

fn replay(name: &str) {
    let (_, run) = TARGETS
        .iter()
        .find(|(target, _)| *target == name)
        .expect("a known target");
    let seeds = inputs(name, "seeds");
    assert!(!seeds.is_empty(), "no seeds for {name}");
    for path in seeds.iter().chain(&inputs(name, "regressions")) {
        let data = std::fs::read(path).expect("a readable corpus file");
        eprintln!("{}", path.display());
        run(&data);
    }
}

#[test]
fn frame() {
    replay("frame");
}

#[test]
fn agent_fs() {
    replay("agent_fs");
}

#[test]
fn netstack() {
    replay("netstack");
}

#[test]
fn dns() {
    replay("dns");
}

#[test]
fn config() {
    replay("config");
}

#[test]
fn http_filter() {
    replay("http_filter");
}

/// Every target has a test above and a fuzz binary in fuzz/fuzz_targets.
#[test]
fn every_target_is_replayed_and_fuzzed() {
    let this = include_str!("replay.rs");
    let fuzz = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz_targets");
    for (name, _) in TARGETS {
        assert!(
            this.contains(&format!("fn {name}()")),
            "{name} is not replayed"
        );
        assert!(
            fuzz.join(format!("{name}.rs")).is_file(),
            "{name} has no fuzz binary"
        );
    }
}
