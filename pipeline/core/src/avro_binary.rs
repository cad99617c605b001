//! Avro binary primitives for the hand-written codecs of fixed schemas (notifications, claims,
//! decisions): reading a datum field by field and writing zig-zag varints and strings.
//!
//! Written by hand because apache-avro keeps its varint reader and writer crate-private and offers
//! only its generic `Value` tree, whose per-record cost these codecs exist to avoid. Each codec is
//! property-tested against apache-avro's generic path.

use crate::error::CodecError;

/// The unread rest of a datum.
pub struct Datum<'a>(&'a [u8]);

impl<'a> Datum<'a> {
    pub fn new(datum: &'a [u8]) -> Self {
        Datum(datum)
    }

    /// Ok when the whole datum was read; trailing bytes are an error, as apache-avro's reader
    /// of a single datum makes them.
    pub fn end(&self) -> Result<(), CodecError> {
        match self.0.len() {
            0 => Ok(()),
            n => Err(CodecError::Avro(format!("{n} trailing bytes after the datum"))),
        }
    }

    pub fn byte(&mut self) -> Result<u8, CodecError> {
        let (&b, rest) = self.0.split_first().ok_or_else(|| CodecError::Avro("datum is truncated".into()))?;
        self.0 = rest;
        Ok(b)
    }

    pub fn long(&mut self) -> Result<i64, CodecError> {
        let mut z: u64 = 0;
        for i in 0..10 {
            let b = self.byte()?;
            // In the tenth byte only the lowest bit fits; the rest is dropped, as apache-avro does.
            z |= u64::from(b & 0x7f) << (7 * i);
            if b & 0x80 == 0 {
                return Ok((z >> 1) as i64 ^ -((z & 1) as i64));
            }
        }
        Err(CodecError::Avro("varint longer than 10 bytes".into()))
    }

    /// An Avro int, range-checked as apache-avro does.
    pub fn int(&mut self) -> Result<i32, CodecError> {
        let v = self.long()?;
        i32::try_from(v).map_err(|_| CodecError::Avro(format!("int {v} out of range")))
    }

    pub fn string(&mut self) -> Result<&'a str, CodecError> {
        let len = self.long()?;
        let len = usize::try_from(len)
            .ok()
            .filter(|l| *l <= self.0.len())
            .ok_or_else(|| CodecError::Avro(format!("string length {len} beyond the datum")))?;
        let (text, rest) = self.0.split_at(len);
        self.0 = rest;
        std::str::from_utf8(text).map_err(|e| CodecError::Avro(format!("string is not UTF-8: {e}")))
    }

    /// A `["null", "string"]` union.
    pub fn optional_string(&mut self) -> Result<Option<&'a str>, CodecError> {
        match self.long()? {
            0 => Ok(None),
            1 => self.string().map(Some),
            i => Err(CodecError::Avro(format!("union branch {i} of [null, string]"))),
        }
    }

    /// An array of strings: blocks of a count and that many items, ended by a zero count; a
    /// negative count means its absolute value, followed by the block's size in bytes.
    pub fn string_array(&mut self) -> Result<Vec<String>, CodecError> {
        let mut items = Vec::new();
        loop {
            let count = match self.long()? {
                0 => return Ok(items),
                c if c < 0 => {
                    self.long()?;
                    c.checked_neg().ok_or_else(|| CodecError::Avro("array block count overflows".into()))?
                }
                c => c,
            };
            // Every item takes at least one byte: a count beyond what is left cannot be real.
            if count as u64 > self.0.len() as u64 {
                return Err(CodecError::Avro(format!("array block of {count} items beyond the datum")));
            }
            items.reserve(count as usize);
            for _ in 0..count {
                items.push(self.string()?.to_owned());
            }
        }
    }

    pub fn boolean(&mut self) -> Result<bool, CodecError> {
        match self.byte()? {
            0 => Ok(false),
            1 => Ok(true),
            b => Err(CodecError::Avro(format!("boolean byte {b}"))),
        }
    }
}

/// An Avro string: zig-zag varint length, then the UTF-8 bytes.
pub fn put_string(s: &str, out: &mut Vec<u8>) {
    put_long(s.len() as i64, out);
    out.extend_from_slice(s.as_bytes());
}

/// An Avro long (and int): zig-zag, then a little-endian base-128 varint.
pub fn put_long(v: i64, out: &mut Vec<u8>) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    while z >= 0x80 {
        out.push((z as u8 & 0x7f) | 0x80);
        z >>= 7;
    }
    out.push(z as u8);
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        /// What `put_*` writes, `Datum` reads back, and apache-avro agrees on both.
        #[test]
        fn longs_and_strings_round_trip_as_apache_avro_encodes_them(v in any::<i64>(), s in ".{0,40}") {
            let mut out = Vec::new();
            put_long(v, &mut out);
            put_string(&s, &mut out);
            let encode = |schema: &apache_avro::Schema, value: apache_avro::types::Value| {
                apache_avro::writer::datum::GenericDatumWriter::builder(schema).build().unwrap().write_value_to_vec(value).unwrap()
            };
            let mut theirs = encode(&apache_avro::Schema::Long, apache_avro::types::Value::Long(v));
            theirs.extend(encode(&apache_avro::Schema::String, apache_avro::types::Value::String(s.clone())));
            prop_assert_eq!(&out, &theirs);
            let mut r = Datum::new(&out);
            prop_assert_eq!(r.long().unwrap(), v);
            prop_assert_eq!(r.string().unwrap(), s.as_str());
            prop_assert!(r.end().is_ok());
        }
    }

    #[test]
    fn truncated_and_trailing_bytes_are_errors() {
        assert!(Datum::new(&[0x80]).long().is_err());
        assert!(Datum::new(&[4, b'a']).string().is_err());
        assert!(Datum::new(&[0]).end().is_err());
        assert!(Datum::new(&[0xff; 11]).long().is_err());
    }
}
