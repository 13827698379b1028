//! The first bytes each side sends, before any frame: a fixed preamble that names the protocol
//! version and the sending software. Its layout never changes, whatever happens to framing and
//! messages later, so a CLI and an agent of different releases always learn each other's
//! version and can say so in one line instead of failing on a frame they cannot read.
//!
//! Layout: the 8 bytes `mirrord\0`, the protocol version (u32, big-endian), the length of the
//! software name (one byte), then the name in UTF-8 (e.g. `mirrord-agent 0.1.0`).
//!
//! Both sides send theirs at once on connecting, so the exchange costs no round trip of its own.
//! This module only builds and parses the bytes; reading and writing them is the caller's.

/// Bumped on any incompatible change to framing or messages.
pub const PROTOCOL_VERSION: u32 = 7;

/// The preamble's first bytes, never to change.
pub const MAGIC: [u8; 8] = *b"mirrord\0";

/// Bytes before the software name: magic, version, name length.
pub const FIXED_LEN: usize = MAGIC.len() + 4 + 1;

/// Names longer than this are cut (at a character boundary) when encoded.
const MAX_SOFTWARE: usize = u8::MAX as usize;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Greeting {
    pub version: u32,
    /// Who sent it: a program and its release, for the user to read.
    pub software: String,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GreetingError {
    /// The peer is not a mirrord peer of any release that sends a greeting: another service,
    /// or an agent from before greetings existed (protocol 3 or older).
    #[error("it did not greet as mirrord does (first bytes {0:02x?})")]
    NotMirrord(Vec<u8>),
}

impl Greeting {
    /// This side's greeting.
    pub fn ours(software: &str) -> Greeting {
        Greeting {
            version: PROTOCOL_VERSION,
            software: software.to_owned(),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut name = self.software.as_str();
        while name.len() > MAX_SOFTWARE {
            let mut cut = MAX_SOFTWARE;
            while !name.is_char_boundary(cut) {
                cut -= 1;
            }
            name = &name[..cut];
        }
        let mut out = Vec::with_capacity(FIXED_LEN + name.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&self.version.to_be_bytes());
        // Cut to MAX_SOFTWARE above, so it fits in a byte.
        out.push(name.len() as u8);
        out.extend_from_slice(name.as_bytes());
        out
    }

    /// Checks the fixed part and returns how many name bytes follow it.
    pub fn parse_fixed(fixed: &[u8; FIXED_LEN]) -> Result<(u32, usize), GreetingError> {
        if fixed[..MAGIC.len()] != MAGIC {
            return Err(GreetingError::NotMirrord(fixed[..MAGIC.len()].to_vec()));
        }
        let mut version = [0u8; 4];
        version.copy_from_slice(&fixed[MAGIC.len()..MAGIC.len() + 4]);
        Ok((
            u32::from_be_bytes(version),
            usize::from(fixed[FIXED_LEN - 1]),
        ))
    }

    /// The whole greeting from its fixed part and its name bytes. A name that is not UTF-8 is
    /// shown lossily: it is only ever printed.
    pub fn parse(fixed: &[u8; FIXED_LEN], name: &[u8]) -> Result<Greeting, GreetingError> {
        let (version, _) = Greeting::parse_fixed(fixed)?;
        Ok(Greeting {
            version,
            software: String::from_utf8_lossy(name).into_owned(),
        })
    }

    /// Whether a session can go on with a peer that sent this.
    pub fn compatible(&self) -> bool {
        self.version == PROTOCOL_VERSION
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trip(greeting: &Greeting) -> Greeting {
        let bytes = greeting.encode();
        let fixed: [u8; FIXED_LEN] = bytes[..FIXED_LEN].try_into().unwrap();
        let (_, name_len) = Greeting::parse_fixed(&fixed).unwrap();
        assert_eq!(bytes.len(), FIXED_LEN + name_len);
        Greeting::parse(&fixed, &bytes[FIXED_LEN..]).unwrap()
    }

    #[test]
    fn a_greeting_reads_back() {
        let ours = Greeting::ours("mirrord-agent 0.1.0");
        assert_eq!(round_trip(&ours), ours);
        assert!(ours.compatible());
    }

    /// The layout is frozen: these exact bytes must parse in every future release.
    #[test]
    fn the_layout_is_frozen() {
        let bytes = Greeting {
            version: 3,
            software: "x".into(),
        }
        .encode();
        assert_eq!(bytes, b"mirrord\0\x00\x00\x00\x03\x01x");
        let other = Greeting {
            version: PROTOCOL_VERSION + 1,
            software: "mirrord 9.0.0".into(),
        };
        assert!(!round_trip(&other).compatible());
    }

    #[test]
    fn long_names_are_cut_at_a_character_boundary() {
        let greeting = Greeting::ours(&"é".repeat(200));
        let back = round_trip(&greeting);
        assert_eq!(back.software, "é".repeat(127));
    }

    #[test]
    fn anything_else_is_not_mirrord() {
        // An old agent's first frame header, an HTTP server's answer.
        for first in [
            &[0u8, 0, 0, 9, 0, 0, 0, 0, 0, 0, 0, 0, 0][..],
            b"HTTP/1.1 400 ",
        ] {
            let fixed: [u8; FIXED_LEN] = first.try_into().unwrap();
            assert!(matches!(
                Greeting::parse_fixed(&fixed),
                Err(GreetingError::NotMirrord(_))
            ));
        }
    }
}
