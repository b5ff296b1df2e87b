//! What the fuzz targets share: the record format of the targets that replay a sequence of
//! operations (`xds_state`, `policy`), and, in the tests, the seed corpus: how it is made
//! from the project's own inputs and that it still decodes.

/// `op (1 byte) | length (2 bytes, big-endian) | bytes`, repeated; a truncated last record
/// takes what is left.
pub struct Records<'a>(&'a [u8]);

impl<'a> Records<'a> {
    pub fn new(data: &'a [u8]) -> Records<'a> {
        Records(data)
    }
}

impl<'a> Iterator for Records<'a> {
    type Item = (u8, &'a [u8]);

    fn next(&mut self) -> Option<(u8, &'a [u8])> {
        let [op, hi, lo, tail @ ..] = self.0 else { return None };
        let len = usize::from(u16::from_be_bytes([*hi, *lo])).min(tail.len());
        let (chunk, rest) = tail.split_at(len);
        self.0 = rest;
        Some((*op, chunk))
    }
}

/// Appends one record.
pub fn record(out: &mut Vec<u8>, op: u8, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("a record under 64 KiB");
    out.push(op);
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod seeds;
