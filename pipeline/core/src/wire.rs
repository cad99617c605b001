//! The Confluent wire format: magic byte 0, a 4-byte big-endian schema id, then the Avro datum.
//! Parsing is pure and total (any byte slice gives a value or an error), so it is fuzzed and
//! property-tested.

use crate::error::CodecError;

/// First byte of every framed record.
pub const MAGIC: u8 = 0;

/// Length of the header before the datum.
pub const HEADER_LEN: usize = 5;

/// Frames `datum` written with schema `schema_id`.
pub fn frame(schema_id: u32, datum: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + datum.len());
    frame_into(schema_id, datum, &mut out);
    out
}

/// Appends the framed record to `out` (lets hot paths reuse buffers).
pub fn frame_into(schema_id: u32, datum: &[u8], out: &mut Vec<u8>) {
    out.push(MAGIC);
    out.extend_from_slice(&schema_id.to_be_bytes());
    out.extend_from_slice(datum);
}

/// Splits a framed record into its schema id and datum.
pub fn split(bytes: &[u8]) -> Result<(u32, &[u8]), CodecError> {
    if bytes.len() < HEADER_LEN {
        return Err(CodecError::TooShort(bytes.len()));
    }
    if bytes[0] != MAGIC {
        return Err(CodecError::WrongMagic(bytes[0]));
    }
    let id = u32::from_be_bytes([bytes[1], bytes[2], bytes[3], bytes[4]]);
    Ok((id, &bytes[HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn frame_then_split_round_trips(id in any::<u32>(), datum in proptest::collection::vec(any::<u8>(), 0..256)) {
            let framed = frame(id, &datum);
            let (got_id, got) = split(&framed).unwrap();
            prop_assert_eq!(got_id, id);
            prop_assert_eq!(got, &datum[..]);
        }

        #[test]
        fn split_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..64)) {
            match split(&bytes) {
                Ok((_, datum)) => {
                    prop_assert_eq!(bytes[0], MAGIC);
                    prop_assert_eq!(datum.len(), bytes.len() - HEADER_LEN);
                }
                Err(CodecError::TooShort(n)) => prop_assert!(n < HEADER_LEN),
                Err(CodecError::WrongMagic(b)) => prop_assert_ne!(b, MAGIC),
                Err(e) => prop_assert!(false, "unexpected error {e}"),
            }
        }
    }

    #[test]
    fn rejects_short_and_wrong_magic() {
        assert!(matches!(split(&[0, 0, 0]), Err(CodecError::TooShort(3))));
        assert!(matches!(split(&[1, 0, 0, 0, 1, 2]), Err(CodecError::WrongMagic(1))));
    }
}
