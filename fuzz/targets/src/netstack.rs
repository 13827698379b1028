//! The netstack's packet ingestion: arbitrary bytes as the IP packets an app sends into the
//! TUN, through the stack's core with every new flow answered (see `mirrord_netstack::replay`).
//!
//! Input: packets one after another, each as a big-endian u16 length and that many bytes
//! (a last packet cut short is taken as it is).

pub fn run(data: &[u8]) {
    mirrord_netstack::replay(packets(data));
}

/// Splits the input into packets.
pub fn packets(mut data: &[u8]) -> Vec<Vec<u8>> {
    let mut packets = Vec::new();
    while let Some((len, rest)) = data.split_first_chunk::<2>() {
        let len = usize::from(u16::from_be_bytes(*len)).min(rest.len());
        packets.push(rest[..len].to_vec());
        data = &rest[len..];
    }
    packets
}
