//! The fuzz targets' bodies, one plain function per target, so that libFuzzer (the binaries in
//! `fuzz/fuzz_targets`, built with nightly by cargo-fuzz) and the stable replay test
//! (`tests/replay.rs`, run by `.ci/run`) feed bytes through exactly the same code. Each takes
//! arbitrary bytes and must return without panicking, whatever they are; where a target checks
//! an invariant beyond that (a decoded frame encodes back to itself, no file outside the root
//! is ever served), it panics so that the fuzzer reports it.
//!
//! See docs/fuzzing.md for what each target covers and how to run it.

pub mod agent_fs;
pub mod config;
pub mod dns;
pub mod frame;
pub mod http_filter;
pub mod netstack;

/// A target's body: takes any bytes, never panics unless an invariant broke.
pub type Target = fn(&[u8]);

/// Every target, by the name of its fuzz binary and corpus folder.
pub const TARGETS: [(&str, Target); 6] = [
    ("frame", frame::run),
    ("agent_fs", agent_fs::run),
    ("netstack", netstack::run),
    ("dns", dns::run),
    ("config", config::run),
    ("http_filter", http_filter::run),
];
