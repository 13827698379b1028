//! The agent's answer to file requests from a session, read-only (a write session's requests
//! change files, which a fuzzer must not do to the machine): a `ClientMessage` decoded from the
//! input, as the agent decodes it, and served by `mirrord_agent::fs::serve` over a small root
//! holding the tricks a pod can play — absolute and relative symlinks, links that climb out
//! with `..`, a loop, a link to `/proc/self`. Beside the root lies a file no answer may ever
//! contain: confinement holds or the target panics.

use std::os::unix::fs::symlink;
use std::path::PathBuf;
use std::sync::OnceLock;

use mirrord_protocol::frame::FrameDecoder;
use mirrord_protocol::fs::FsResponse;
use mirrord_protocol::{ClientMessage, Request};

/// What the file beside the root holds; it must never come back.
const OUTSIDE: &[u8] = b"outside-the-root-3f9c2a";

/// A root to serve and, beside it, the file it must not reveal. Removed when dropped.
struct Fixture {
    dir: PathBuf,
}

impl Fixture {
    /// Built under the system's temporary directory, named after the process.
    fn new() -> std::io::Result<Fixture> {
        let dir = std::env::temp_dir().join(format!("mirrord-fuzz-fs-{}", std::process::id()));
        let fixture = Fixture { dir };
        let root = fixture.root();
        std::fs::create_dir_all(root.join("etc"))?;
        std::fs::create_dir_all(root.join("app/data"))?;
        std::fs::write(root.join("etc/hostname"), "pod-7\n")?;
        std::fs::write(root.join("etc/resolv.conf"), "nameserver 10.96.0.10\n")?;
        std::fs::write(root.join("app/data/a.txt"), "inside a\n")?;
        std::fs::write(root.join("app/data/b.txt"), "inside b\n")?;
        std::fs::write(fixture.dir.join("secret"), OUTSIDE)?;
        symlink("/etc/hostname", root.join("app/abs"))?;
        symlink("../etc", root.join("app/rel"))?;
        symlink("../../secret", root.join("app/up"))?;
        symlink("../../../../../../../../secret", root.join("app/far"))?;
        symlink("/../secret", root.join("app/rootup"))?;
        symlink(fixture.dir.join("secret"), root.join("app/hostpath"))?;
        symlink("loop2", root.join("app/loop1"))?;
        symlink("loop1", root.join("app/loop2"))?;
        symlink("/proc/self/root/secret", root.join("app/proc"))?;
        Ok(fixture)
    }

    fn root(&self) -> PathBuf {
        self.dir.join("root")
    }

    /// Serves the request the bytes decode to, if any; panics when an answer holds the file
    /// outside the root.
    fn serve(&self, data: &[u8]) {
        let Some(ClientMessage::Request {
            request: Request::Fs(request),
            ..
        }) = decode(data)
        else {
            return;
        };
        let Ok(answer) = mirrord_agent::fs::serve(&self.root(), request, false) else {
            return;
        };
        let Ok(response) = answer.into_response() else {
            return;
        };
        let bytes = match &response {
            FsResponse::Data(bytes) => bytes,
            FsResponse::Files(batch) => &batch.data,
            _ => return,
        };
        assert!(
            !bytes.windows(OUTSIDE.len()).any(|w| w == OUTSIDE),
            "a file outside the root was served: {response:?}"
        );
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The message `data` holds, as the agent would decode it from one frame.
fn decode(data: &[u8]) -> Option<ClientMessage> {
    let len = u32::try_from(data.len()).ok()?;
    let mut decoder = FrameDecoder::new();
    decoder.push(&len.to_be_bytes());
    decoder.push(&0u32.to_be_bytes());
    decoder.push(data);
    decoder.next().ok().flatten()
}

static FIXTURE: OnceLock<Option<Fixture>> = OnceLock::new();

extern "C" fn remove_fixture() {
    if let Some(Some(fixture)) = FIXTURE.get() {
        let _ = std::fs::remove_dir_all(&fixture.dir);
    }
}

/// The fuzzer's entry: one fixture for the whole process, removed when it exits.
pub fn run(data: &[u8]) {
    let fixture = FIXTURE.get_or_init(|| {
        let fixture = Fixture::new().ok()?;
        // SAFETY: `remove_fixture` is a plain function that only touches the static, which
        // outlives every exit handler; atexit has no other requirement.
        unsafe { libc::atexit(remove_fixture) };
        Some(fixture)
    });
    if let Some(fixture) = fixture {
        fixture.serve(data);
    }
}
