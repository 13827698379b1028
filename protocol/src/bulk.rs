//! What every frame obeys: the size limits and the one large byte field ("bulk") a message may
//! carry apart from its encoding. A leaf: it imports nothing of this crate, so framing,
//! messages and errors can all use it without depending on each other.

/// Most bytes in one frame, message and bulk together (the 8-byte header excluded).
pub const MAX_FRAME_LEN: usize = 2 * 1024 * 1024;
/// Most bytes in one `StreamFrame::Data`, so one busy stream cannot hog the connection, and
/// enough that a bulk transfer costs a read of its socket per 256 KiB, not per 64 KiB (a
/// receiver checks a frame against the credit it granted, not against this).
pub const MAX_DATA_CHUNK: usize = 256 * 1024;
/// Most bytes one file read (`FsRequest::Read`) may ask for, so the answer always fits in a
/// frame. The agent serves no more than this, whatever it is asked.
pub const MAX_FILE_READ: u32 = 1024 * 1024;
/// Byte fields at least this long travel as a frame's bulk.
pub const BULK_MIN: usize = 16 * 1024;

/// A message with (in some variants) one large byte field that may travel as bulk.
pub trait Bulk {
    /// The field, in the variants that have one.
    fn bulk_mut(&mut self) -> Option<&mut Vec<u8>>;
}
