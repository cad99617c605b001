//! Encoder for PostgreSQL's binary `COPY … FROM STDIN (FORMAT binary)` stream, which the store uses
//! to bulk-load staging tables. Written by hand because no maintained crate encodes COPY BINARY for
//! sqlx (only for tokio-postgres), and the format is small: a header, length-prefixed fields, a trailer.
//!
//! Layout: the 11-byte signature `PGCOPY\n\xff\r\n\0`, an i32 flags word (0) and an i32 header-extension
//! length (0); then per row an i16 field count and per field an i32 byte length (-1 = NULL) followed by
//! the value in the type's binary send format (all integers big-endian); finally an i16 -1 trailer.

/// The binary COPY signature.
pub const SIGNATURE: &[u8; 11] = b"PGCOPY\n\xff\r\n\0";

/// Microseconds between the Unix epoch and PostgreSQL's epoch (2000-01-01 00:00:00 UTC).
pub const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// A value that cannot be put into a COPY stream.
#[derive(Debug, thiserror::Error)]
pub enum CopyError {
    /// A field longer than the i32 length prefix allows; PostgreSQL would refuse it anyway (max 1 GiB),
    /// so retrying cannot help.
    #[error("COPY field of {0} bytes exceeds the maximum field length")]
    FieldTooLarge(usize),
}

impl From<CopyError> for crate::StoreError {
    fn from(e: CopyError) -> Self {
        // The row's own value is too large: a refusal of that row, not of the batch.
        crate::StoreError::Rejected { reason: "copy-field-too-large", source: sqlx::Error::Encode(Box::new(e)) }
    }
}

/// Builds a binary COPY stream row by row. Callers may [`take`](Self::take) the bytes encoded so far at
/// any point (e.g. every MiB) and send them, so a large load never needs one buffer for all rows.
#[derive(Debug)]
pub struct CopyEncoder {
    buf: Vec<u8>,
    /// Fields announced by `begin_row` and not yet written; only checked in debug builds.
    pending_fields: i16,
}

impl Default for CopyEncoder {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyEncoder {
    /// A new stream, header already written.
    pub fn new() -> Self {
        Self::with_capacity(64 * 1024)
    }

    /// A new stream whose buffer starts with room for `capacity` bytes.
    pub fn with_capacity(capacity: usize) -> Self {
        let mut buf = Vec::with_capacity(capacity.max(SIGNATURE.len() + 8));
        buf.extend_from_slice(SIGNATURE);
        buf.extend_from_slice(&0i32.to_be_bytes()); // flags: no OIDs
        buf.extend_from_slice(&0i32.to_be_bytes()); // header extension length
        Self { buf, pending_fields: 0 }
    }

    /// Starts a row of `n_fields` fields (the staging table's column count).
    pub fn begin_row(&mut self, n_fields: i16) {
        debug_assert_eq!(self.pending_fields, 0, "previous COPY row is incomplete");
        self.pending_fields = n_fields;
        self.buf.extend_from_slice(&n_fields.to_be_bytes());
    }

    fn field(&mut self, bytes: &[u8]) -> Result<(), CopyError> {
        let len = i32::try_from(bytes.len()).map_err(|_| CopyError::FieldTooLarge(bytes.len()))?;
        self.fixed(&len.to_be_bytes(), bytes);
        Ok(())
    }

    fn fixed(&mut self, len: &[u8; 4], bytes: &[u8]) {
        self.count_field();
        self.buf.extend_from_slice(len);
        self.buf.extend_from_slice(bytes);
    }

    fn count_field(&mut self) {
        debug_assert!(self.pending_fields > 0, "more COPY fields than begin_row announced");
        self.pending_fields -= 1;
    }

    /// A NULL of any type.
    pub fn null(&mut self) {
        self.count_field();
        self.buf.extend_from_slice(&(-1i32).to_be_bytes());
    }

    /// A `text` value (UTF-8 bytes as is). PostgreSQL rejects text containing NUL characters.
    pub fn text(&mut self, s: &str) -> Result<(), CopyError> {
        self.field(s.as_bytes())
    }

    /// A nullable `text` value.
    pub fn opt_text(&mut self, s: Option<&str>) -> Result<(), CopyError> {
        match s {
            Some(s) => self.text(s),
            None => {
                self.null();
                Ok(())
            }
        }
    }

    /// An `int4` value.
    pub fn i32(&mut self, v: i32) {
        self.fixed(&4i32.to_be_bytes(), &v.to_be_bytes());
    }

    /// An `int8` value.
    pub fn i64(&mut self, v: i64) {
        self.fixed(&8i32.to_be_bytes(), &v.to_be_bytes());
    }

    /// A `uuid` value (its 16 bytes in RFC 4122 order).
    pub fn uuid(&mut self, v: &uuid::Uuid) {
        self.fixed(&16i32.to_be_bytes(), v.as_bytes());
    }

    /// A `timestamptz` given in microseconds since the Unix epoch. Values outside PostgreSQL's range
    /// are rejected by the server; values that would overflow here are sent as `i64::MIN + 1`
    /// (also out of range) rather than `i64::MIN`, which PostgreSQL would read as `-infinity`.
    pub fn timestamptz_unix_micros(&mut self, micros: i64) {
        let pg = micros.checked_sub(PG_EPOCH_OFFSET_MICROS).unwrap_or(i64::MIN + 1);
        self.fixed(&8i32.to_be_bytes(), &pg.to_be_bytes());
    }

    /// Bytes encoded and not yet taken.
    pub fn len(&self) -> usize {
        self.buf.len()
    }

    /// Whether nothing is buffered.
    pub fn is_empty(&self) -> bool {
        self.buf.is_empty()
    }

    /// Hands out the bytes encoded so far (to be sent as one COPY data chunk) and keeps encoding into
    /// a fresh buffer of the same capacity. Chunks need not end on row boundaries.
    pub fn take(&mut self) -> Vec<u8> {
        let capacity = self.buf.capacity();
        std::mem::replace(&mut self.buf, Vec::with_capacity(capacity))
    }

    /// Writes the trailer and returns the remaining bytes.
    pub fn finish(mut self) -> Vec<u8> {
        debug_assert_eq!(self.pending_fields, 0, "last COPY row is incomplete");
        self.buf.extend_from_slice(&(-1i16).to_be_bytes());
        self.buf
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// One field as the tests generate it.
    #[derive(Debug, Clone, PartialEq)]
    enum Field {
        Text(String),
        OptText(Option<String>),
        Int4(i32),
        Int8(i64),
        Uuid(u128),
        Ts(i64),
    }

    fn encode_field(enc: &mut CopyEncoder, f: &Field) {
        match f {
            Field::Text(s) => enc.text(s).unwrap(),
            Field::OptText(s) => enc.opt_text(s.as_deref()).unwrap(),
            Field::Int4(v) => enc.i32(*v),
            Field::Int8(v) => enc.i64(*v),
            Field::Uuid(v) => enc.uuid(&uuid::Uuid::from_u128(*v)),
            Field::Ts(v) => enc.timestamptz_unix_micros(*v),
        }
    }

    /// An independent reader of the binary COPY format: rows of raw fields (`None` = NULL).
    fn decode(mut data: &[u8]) -> Result<Vec<Vec<Option<Vec<u8>>>>, String> {
        fn take<'a>(data: &mut &'a [u8], n: usize) -> Result<&'a [u8], String> {
            if data.len() < n {
                return Err(format!("need {n} bytes, have {}", data.len()));
            }
            let (head, rest) = data.split_at(n);
            *data = rest;
            Ok(head)
        }
        if take(&mut data, 11)? != SIGNATURE {
            return Err("bad signature".into());
        }
        if take(&mut data, 4)? != [0, 0, 0, 0] {
            return Err("flags not zero".into());
        }
        let ext = i32::from_be_bytes(take(&mut data, 4)?.try_into().unwrap());
        take(&mut data, usize::try_from(ext).map_err(|_| "negative extension")?)?;
        let mut rows = Vec::new();
        loop {
            let n = i16::from_be_bytes(take(&mut data, 2)?.try_into().unwrap());
            if n == -1 {
                break;
            }
            let mut row = Vec::new();
            for _ in 0..n {
                let len = i32::from_be_bytes(take(&mut data, 4)?.try_into().unwrap());
                if len == -1 {
                    row.push(None);
                } else {
                    let len = usize::try_from(len).map_err(|_| format!("bad length {len}"))?;
                    row.push(Some(take(&mut data, len)?.to_vec()));
                }
            }
            rows.push(row);
        }
        if !data.is_empty() {
            return Err(format!("{} bytes after the trailer", data.len()));
        }
        Ok(rows)
    }

    /// Interprets a decoded raw field as the type the generator chose.
    fn interpret(like: &Field, raw: &Option<Vec<u8>>) -> Field {
        let text = |b: &Vec<u8>| String::from_utf8(b.clone()).unwrap();
        match (like, raw) {
            (Field::Text(_), Some(b)) => Field::Text(text(b)),
            (Field::OptText(_), b) => Field::OptText(b.as_ref().map(text)),
            (Field::Int4(_), Some(b)) => Field::Int4(i32::from_be_bytes(b.as_slice().try_into().unwrap())),
            (Field::Int8(_), Some(b)) => Field::Int8(i64::from_be_bytes(b.as_slice().try_into().unwrap())),
            (Field::Uuid(_), Some(b)) => Field::Uuid(u128::from_be_bytes(b.as_slice().try_into().unwrap())),
            (Field::Ts(_), Some(b)) => {
                Field::Ts(i64::from_be_bytes(b.as_slice().try_into().unwrap()) + PG_EPOCH_OFFSET_MICROS)
            }
            (like, None) => panic!("unexpected NULL for {like:?}"),
        }
    }

    fn any_text() -> impl Strategy<Value = String> {
        prop_oneof![Just(String::new()), "[a-z]{0,8}", any::<String>(), "[é€😀\u{10FFFF}\\t\\n\\\\]{0,6}"]
    }

    fn any_field() -> impl Strategy<Value = Field> {
        prop_oneof![
            any_text().prop_map(Field::Text),
            proptest::option::of(any_text()).prop_map(Field::OptText),
            any::<i32>().prop_map(Field::Int4),
            any::<i64>().prop_map(Field::Int8),
            any::<u128>().prop_map(Field::Uuid),
            // The whole range minus the saturation zone at the bottom.
            (i64::MIN + PG_EPOCH_OFFSET_MICROS..=i64::MAX).prop_map(Field::Ts),
        ]
    }

    proptest! {
        #[test]
        fn decoder_reads_back_what_the_encoder_wrote(
            rows in proptest::collection::vec(proptest::collection::vec(any_field(), 0..12), 0..40),
            take_every in 1usize..8,
        ) {
            let mut enc = CopyEncoder::with_capacity(16);
            let mut streamed = Vec::new();
            for (i, row) in rows.iter().enumerate() {
                enc.begin_row(row.len() as i16);
                for f in row {
                    encode_field(&mut enc, f);
                }
                // Chunks cut anywhere must concatenate to the same stream.
                if i % take_every == 0 {
                    streamed.extend(enc.take());
                }
            }
            streamed.extend(enc.finish());
            let decoded = decode(&streamed).map_err(TestCaseError::fail)?;
            prop_assert_eq!(decoded.len(), rows.len());
            for (row, raw) in rows.iter().zip(&decoded) {
                prop_assert_eq!(raw.len(), row.len());
                let back: Vec<Field> = row.iter().zip(raw).map(|(f, r)| interpret(f, r)).collect();
                prop_assert_eq!(&back, row);
            }
        }
    }

    #[test]
    fn header_trailer_and_known_encodings() {
        let mut enc = CopyEncoder::new();
        enc.begin_row(4);
        enc.i32(-2);
        enc.opt_text(None).unwrap();
        enc.text("é").unwrap();
        enc.timestamptz_unix_micros(PG_EPOCH_OFFSET_MICROS + 1);
        let bytes = enc.finish();
        let mut expected = b"PGCOPY\n\xff\r\n\0\0\0\0\0\0\0\0\0".to_vec();
        expected.extend_from_slice(&[0, 4]);
        expected.extend_from_slice(&[0, 0, 0, 4, 0xff, 0xff, 0xff, 0xfe]);
        expected.extend_from_slice(&[0xff, 0xff, 0xff, 0xff]);
        expected.extend_from_slice(&[0, 0, 0, 2, 0xc3, 0xa9]);
        expected.extend_from_slice(&[0, 0, 0, 8, 0, 0, 0, 0, 0, 0, 0, 1]);
        expected.extend_from_slice(&[0xff, 0xff]);
        assert_eq!(bytes, expected);
    }

    /// Random rows COPYed into a real PostgreSQL table come back exactly.
    #[tokio::test]
    async fn postgres_accepts_the_stream_and_returns_the_rows() {
        use proptest::strategy::ValueTree;
        use proptest::test_runner::TestRunner;
        use sqlx::{Connection, Row};

        // PostgreSQL text cannot hold NUL; timestamptz spans 4713 BC..294276 AD; keep well inside.
        let pg_text = || any::<String>().prop_map(|s| s.replace('\0', ""));
        let row = (
            any::<u128>(),
            prop_oneof![Just(String::new()), pg_text()],
            proptest::option::of(pg_text()),
            any::<i32>(),
            any::<i64>(),
            -200_000_000_000_000_000i64..200_000_000_000_000_000,
        );
        let mut runner = TestRunner::deterministic();
        let mut rows = proptest::collection::vec(row, 300).new_tree(&mut runner).unwrap().current();
        rows.push((0, String::new(), Some(String::new()), i32::MIN, i64::MIN, 0));
        rows.push((u128::MAX, "日本語 😀 \t\n\\N".into(), None, i32::MAX, i64::MAX, -1));

        let mut conn = sqlx::PgConnection::connect(&crate::testing::admin_url()).await.unwrap();
        sqlx::raw_sql(
            "CREATE TEMP TABLE copy_check (seq int4, u uuid, t text, nt text, i int4, l int8, ts timestamptz)",
        )
        .execute(&mut conn)
        .await
        .unwrap();
        let mut enc = CopyEncoder::with_capacity(1024);
        let mut copy = conn.copy_in_raw("COPY copy_check FROM STDIN (FORMAT binary)").await.unwrap();
        for (seq, (u, t, nt, i, l, ts)) in rows.iter().enumerate() {
            enc.begin_row(7);
            enc.i32(seq as i32);
            enc.uuid(&uuid::Uuid::from_u128(*u));
            enc.text(t).unwrap();
            enc.opt_text(nt.as_deref()).unwrap();
            enc.i32(*i);
            enc.i64(*l);
            enc.timestamptz_unix_micros(*ts);
            if enc.len() > 4096 {
                copy.send(enc.take()).await.unwrap();
            }
        }
        copy.send(enc.finish()).await.unwrap();
        assert_eq!(copy.finish().await.unwrap(), rows.len() as u64);

        let back =
            sqlx::query("SELECT u, t, nt, i, l, ts FROM copy_check ORDER BY seq").fetch_all(&mut conn).await.unwrap();
        assert_eq!(back.len(), rows.len());
        for (r, (u, t, nt, i, l, ts)) in back.iter().zip(&rows) {
            assert_eq!(r.get::<uuid::Uuid, _>("u"), uuid::Uuid::from_u128(*u));
            assert_eq!(&r.get::<String, _>("t"), t);
            assert_eq!(&r.get::<Option<String>, _>("nt"), nt);
            assert_eq!(r.get::<i32, _>("i"), *i);
            assert_eq!(r.get::<i64, _>("l"), *l);
            assert_eq!(r.get::<chrono::DateTime<chrono::Utc>, _>("ts").timestamp_micros(), *ts);
        }
    }
}
