//! How `mirrord` ends when it fails itself: one line for the user and the exit status, carried
//! as a value up to `main`, which alone prints and exits. The statuses follow env(1) and
//! `docker run`, so a failure of mirrord is never mistaken for the command's own status.

use crate::launcher::LaunchError;

/// Exit status when mirrord itself fails.
pub const EXIT_MIRRORD_FAILED: i32 = 125;
/// Exit status after Ctrl-C before the command started (128 + SIGINT).
pub const EXIT_INTERRUPTED: i32 = 130;
/// Exit status after SIGTERM before the command started (128 + SIGTERM).
pub const EXIT_TERMINATED: i32 = 143;

/// A failure of mirrord, and the status it ends with.
#[derive(Debug)]
pub struct Failure {
    pub error: anyhow::Error,
    pub code: i32,
}

impl Failure {
    /// Ctrl-C while the session was being set up.
    pub fn interrupted() -> Failure {
        Failure {
            error: anyhow::anyhow!("interrupted"),
            code: EXIT_INTERRUPTED,
        }
    }

    /// SIGTERM while the session was being set up.
    pub fn terminated() -> Failure {
        Failure {
            error: anyhow::anyhow!("terminated"),
            code: EXIT_TERMINATED,
        }
    }

    /// The command could not be launched: 127 when it does not exist, 126 when it cannot be
    /// executed, 125 otherwise.
    pub fn launch(error: LaunchError) -> Failure {
        Failure {
            code: error.exit_code(),
            error: error.into(),
        }
    }

    /// The line to print after `mirrord: `.
    pub fn line(&self) -> String {
        mirrord_link::report::one_line(&self.error)
    }
}

/// Any other error is mirrord's own failure.
impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Failure {
        Failure {
            error: error.into(),
            code: EXIT_MIRRORD_FAILED,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_failure_carries_its_status() {
        let not_found = LaunchError::NotFound {
            program: "nope".into(),
        };
        assert_eq!(Failure::launch(not_found).code, 127);
        assert_eq!(Failure::interrupted().code, 130);
        assert_eq!(Failure::interrupted().line(), "interrupted");
        let other: Failure = std::io::Error::other("agent gone").into();
        assert_eq!((other.code, other.line()), (125, "agent gone".to_owned()));
    }
}
