//! How both binaries print a fatal error: one line a user can act on.

/// The error and its causes on one line, each cause once: several error types already end
/// their message with their cause's, and repeating it reads like a stutter.
pub fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain() {
        let cause = cause.to_string();
        if !line.contains(&cause) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&cause);
        }
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;
    use anyhow::Context;

    #[test]
    fn each_cause_once() {
        let io = std::io::Error::from_raw_os_error(libc::ECONNREFUSED);
        let error = Err::<(), _>(io)
            .context("cannot reach the agent")
            .unwrap_err();
        assert_eq!(
            one_line(&error),
            "cannot reach the agent: Connection refused (os error 111)"
        );

        #[derive(Debug, thiserror::Error)]
        #[error("cannot reach the agent: {source}")]
        struct Wrapped {
            source: std::io::Error,
        }
        let error = anyhow::Error::new(Wrapped {
            source: std::io::Error::from_raw_os_error(libc::ECONNREFUSED),
        });
        assert_eq!(
            one_line(&error),
            "cannot reach the agent: Connection refused (os error 111)"
        );
    }
}
