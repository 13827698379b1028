//! mirrord's own log on stderr: `MIRRORD_LOG` (an `EnvFilter` directive list) or, without it,
//! warnings only — minus what must never be written at any level.

use tracing::Metadata;
use tracing_subscriber::filter::{EnvFilter, FilterExt, filter_fn};
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{Layer, Registry};

/// Log targets that write the bytes passing through them: at trace, tungstenite prints every
/// WebSocket frame of the port-forward to the agent in hex (the session token, file contents,
/// env values) and the handshake request (the cluster credentials). Off whatever
/// `MIRRORD_LOG` asks.
const NEVER_LOGGED: &[&str] = &["tungstenite", "tokio_tungstenite"];

fn allowed(meta: &Metadata<'_>) -> bool {
    let target = meta.target();
    !NEVER_LOGGED.iter().any(|never| {
        target
            .strip_prefix(never)
            .is_some_and(|rest| rest.is_empty() || rest.starts_with("::"))
    })
}

/// The directives of `MIRRORD_LOG` (`env`), or the defaults when it is unset or invalid.
fn directives(env: Option<&str>, quiet: bool) -> EnvFilter {
    env.and_then(|env| EnvFilter::try_new(env).ok())
        .unwrap_or_else(|| {
            // kube-client logs each failed request as an error, and fuser each reply the kernel
            // no longer waits for (an interrupted request, as on Ctrl-C); mirrord says what failed
            // in its own line (and an unreachable API server once, not once a retry).
            EnvFilter::new(if quiet {
                "error,fuser=off,kube_client=off"
            } else {
                "warn,fuser=off,kube_client=off"
            })
        })
}

/// The filter for a log configured by `env` (`MIRRORD_LOG`).
fn filter(
    env: Option<&str>,
    quiet: bool,
) -> impl tracing_subscriber::layer::Filter<Registry> + use<> {
    directives(env, quiet).and(filter_fn(allowed))
}

/// Starts logging to stderr, as `MIRRORD_LOG` says.
pub fn init(quiet: bool, colour: bool) {
    let env = std::env::var("MIRRORD_LOG").ok();
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_ansi(colour)
        .with_target(false)
        .without_time()
        .with_filter(filter(env.as_deref(), quiet));
    tracing_subscriber::registry().with(layer).init();
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    /// What is written under `MIRRORD_LOG=env` of four events: a tungstenite frame at trace, a
    /// tokio-tungstenite error, a lookalike target's and mirrord's own line at trace.
    fn written(env: &str) -> String {
        #[derive(Clone, Default)]
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Capture {
            fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(buf);
                Ok(buf.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let capture = Capture::default();
        let writer = capture.clone();
        let layer = tracing_subscriber::fmt::layer()
            .with_writer(move || writer.clone())
            .with_filter(filter(Some(env), false));
        tracing::subscriber::with_default(tracing_subscriber::registry().with(layer), || {
            tracing::trace!(target: "tungstenite::protocol", "frame-payload");
            tracing::error!(target: "tokio_tungstenite", "stream-error");
            tracing::trace!(target: "tungstenite_lookalike", "lookalike-line");
            tracing::trace!(target: "mirrord_cli::run", "own-line");
        });
        String::from_utf8(capture.0.lock().unwrap().clone()).unwrap()
    }

    #[test]
    fn the_websocket_frames_are_never_logged_whatever_mirrord_log_says() {
        for env in [
            "trace",
            "tungstenite=trace",
            "trace,tungstenite::protocol=trace",
        ] {
            let out = written(env);
            assert!(
                !out.contains("frame-payload") && !out.contains("stream-error"),
                "MIRRORD_LOG={env}: {out}"
            );
        }
        let out = written("trace");
        assert!(
            out.contains("own-line") && out.contains("lookalike-line"),
            "{out}"
        );
        assert!(
            !written("").contains("own-line"),
            "warnings only by default"
        );
    }
}
