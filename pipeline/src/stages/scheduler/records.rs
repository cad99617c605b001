//! The release headers of a `tidings.scheduled` record (when, where, under which id) and the
//! encoding of the other headers kept with it in the store, produced again on release.

use std::collections::HashSet;

use rdkafka::message::{Header, Headers, OwnedHeaders};

/// The headers templating writes (release-at: decimal microseconds since the epoch; release-to:
/// the full topic name; release-id: the deterministic id) and the one a release adds (released-at:
/// the release-at it was released for), named once for both stages.
pub use crate::stages::templating::{H_RELEASED_AT, H_RELEASE_AT, H_RELEASE_ID, H_RELEASE_TO};

/// Longest release id kept (bytes): ids are UUIDs or `campaign:<id>`; a key of the store's index.
pub const MAX_RELEASE_ID_BYTES: usize = 512;

/// A header as kept: its name and value (`None`: a null value).
pub type KeptHeader = (String, Option<Vec<u8>>);

/// What the release headers say, and the record's other headers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Release {
    pub at: i64,
    pub to: String,
    pub id: String,
    pub other: Vec<KeptHeader>,
}

/// Why a record cannot be kept: its dead letter's reason and error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreleasable {
    pub reason: &'static str,
    pub error: String,
}

impl Unreleasable {
    fn new(reason: &'static str, error: impl Into<String>) -> Self {
        Unreleasable { reason, error: error.into() }
    }
}

/// The release of a record with `headers`, if its release headers are there (each once) and
/// valid and its destination is one of `destinations`.
pub fn release_of<H: Headers>(headers: Option<&H>, destinations: &HashSet<String>) -> Result<Release, Unreleasable> {
    let (mut at, mut to, mut id, mut other) = (None, None, None, Vec::new());
    for h in headers.into_iter().flat_map(|h| h.iter()) {
        let slot = match h.key {
            H_RELEASE_AT => &mut at,
            H_RELEASE_TO => &mut to,
            H_RELEASE_ID => &mut id,
            // A released-at of an earlier release (a record released into tidings.scheduled again)
            // is not carried twice.
            H_RELEASED_AT => continue,
            _ => {
                other.push((h.key.to_string(), h.value.map(<[u8]>::to_vec)));
                continue;
            }
        };
        if slot.is_some() {
            return Err(Unreleasable::new("duplicate-release-header", format!("header {} appears twice", h.key)));
        }
        let text = h
            .value
            .and_then(|v| std::str::from_utf8(v).ok())
            .ok_or_else(|| Unreleasable::new("bad-release-header", format!("header {} is not UTF-8 text", h.key)))?;
        *slot = Some(text);
    }
    let missing = |name: &str| Unreleasable::new("missing-release-header", format!("no {name} header"));
    let at_text = at.ok_or_else(|| missing(H_RELEASE_AT))?;
    let to = to.ok_or_else(|| missing(H_RELEASE_TO))?;
    let id = id.ok_or_else(|| missing(H_RELEASE_ID))?;
    let at = at_text.trim().parse::<i64>().map_err(|_| {
        Unreleasable::new(
            "bad-release-at",
            format!("{H_RELEASE_AT} {at_text:?} is not decimal microseconds since the epoch"),
        )
    })?;
    if !destinations.contains(to) {
        return Err(Unreleasable::new(
            "unknown-release-to",
            format!("{H_RELEASE_TO} {to:?} is not a topic of the topology"),
        ));
    }
    if id.is_empty() || id.len() > MAX_RELEASE_ID_BYTES {
        return Err(Unreleasable::new(
            "bad-release-id",
            format!("{H_RELEASE_ID} has {} bytes; it needs 1 to {MAX_RELEASE_ID_BYTES}", id.len()),
        ));
    }
    // PostgreSQL text cannot hold NUL: the store would refuse the whole batch it is in.
    if id.chars().any(char::is_control) {
        return Err(Unreleasable::new("bad-release-id", format!("{H_RELEASE_ID} {id:?} has control characters")));
    }
    Ok(Release { at, to: to.to_string(), id: id.to_string(), other })
}

/// Format version of [`encode_headers`].
const VERSION: u8 = 1;

/// The headers as kept in the store: a version byte, then per header its name's length (u16 BE),
/// the name, its value's length (i32 BE, -1 for null) and the value.
pub fn encode_headers(headers: &[KeptHeader]) -> Vec<u8> {
    let mut out = vec![VERSION];
    for (name, value) in headers {
        // Kafka header names are short; a longer one is cut rather than misframed.
        let name = &name.as_bytes()[..name.len().min(u16::MAX as usize)];
        out.extend_from_slice(&(name.len() as u16).to_be_bytes());
        out.extend_from_slice(name);
        match value {
            Some(v) => {
                out.extend_from_slice(&i32::try_from(v.len()).unwrap_or(i32::MAX).to_be_bytes());
                out.extend_from_slice(&v[..v.len().min(i32::MAX as usize)]);
            }
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
    out
}

/// The headers [`encode_headers`] wrote; `None` for bytes it did not write.
pub fn decode_headers(mut bytes: &[u8]) -> Option<Vec<KeptHeader>> {
    fn take<'a>(bytes: &mut &'a [u8], n: usize) -> Option<&'a [u8]> {
        if bytes.len() < n {
            return None;
        }
        let (head, rest) = bytes.split_at(n);
        *bytes = rest;
        Some(head)
    }
    if take(&mut bytes, 1)? != [VERSION] {
        return None;
    }
    let mut out = Vec::new();
    while !bytes.is_empty() {
        let n = u16::from_be_bytes(take(&mut bytes, 2)?.try_into().ok()?) as usize;
        let name = std::str::from_utf8(take(&mut bytes, n)?).ok()?.to_string();
        let len = i32::from_be_bytes(take(&mut bytes, 4)?.try_into().ok()?);
        let value = match len {
            -1 => None,
            len => Some(take(&mut bytes, usize::try_from(len).ok()?)?.to_vec()),
        };
        out.push((name, value));
    }
    Some(out)
}

/// The headers a released record carries: the kept ones, then `tidings.released-at`.
pub fn released_headers(kept: &[KeptHeader], release_at: i64) -> OwnedHeaders {
    let mut out = OwnedHeaders::new_with_capacity(kept.len() + 1);
    for (name, value) in kept {
        out = out.insert(Header { key: name, value: value.as_deref() });
    }
    out.insert(Header { key: H_RELEASED_AT, value: Some(release_at.to_string().as_bytes()) })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn destinations() -> HashSet<String> {
        HashSet::from(["t-notifications".to_string(), "t-campaigns".to_string()])
    }

    fn headers(pairs: &[(&str, Option<&[u8]>)]) -> OwnedHeaders {
        pairs.iter().fold(OwnedHeaders::new(), |h, (k, v)| h.insert(Header { key: k, value: *v }))
    }

    #[test]
    fn release_headers_are_read_and_the_others_kept_in_order() {
        let h = headers(&[
            ("traceparent", Some(b"00-abc-def-01")),
            (H_RELEASE_AT, Some(b"1796637600000000")),
            (H_RELEASE_TO, Some(b"t-notifications")),
            ("tidings.delivery-only", Some(b"true")),
            (H_RELEASE_ID, Some(b"7c1e0c3a-1111-5222-8333-444455556666")),
            ("empty", None),
            (H_RELEASED_AT, Some(b"5")),
        ]);
        let r = release_of(Some(&h), &destinations()).unwrap();
        assert_eq!((r.at, r.to.as_str()), (1_796_637_600_000_000, "t-notifications"));
        assert_eq!(r.id, "7c1e0c3a-1111-5222-8333-444455556666");
        let other: Vec<KeptHeader> = vec![
            ("traceparent".into(), Some(b"00-abc-def-01".to_vec())),
            ("tidings.delivery-only".into(), Some(b"true".to_vec())),
            ("empty".into(), None),
        ];
        assert_eq!(r.other, other);
        let released = released_headers(&r.other, r.at);
        let names: Vec<(&str, Option<&[u8]>)> = released.iter().map(|h| (h.key, h.value)).collect();
        assert_eq!(names.len(), 4);
        assert_eq!(names[3], (H_RELEASED_AT, Some(&b"1796637600000000"[..])));
        assert_eq!(names[2], ("empty", None));
    }

    #[test]
    fn bad_release_headers_are_named() {
        let ok: [(&str, Option<&[u8]>); 3] =
            [(H_RELEASE_AT, Some(b"10")), (H_RELEASE_TO, Some(b"t-campaigns")), (H_RELEASE_ID, Some(b"campaign:c1"))];
        assert!(release_of(Some(&headers(&ok)), &destinations()).is_ok());
        let reason = |pairs: &[(&str, Option<&[u8]>)]| release_of(Some(&headers(pairs)), &destinations()).unwrap_err();
        assert_eq!(release_of::<OwnedHeaders>(None, &destinations()).unwrap_err().reason, "missing-release-header");
        let missing = reason(&ok[1..]);
        assert_eq!(missing.reason, "missing-release-header");
        assert!(missing.error.contains(H_RELEASE_AT), "{missing:?}");
        let bad_at = reason(&[(H_RELEASE_AT, Some(b"tomorrow")), ok[1], ok[2]]);
        assert_eq!(bad_at.reason, "bad-release-at");
        assert!(bad_at.error.contains("tomorrow"), "{bad_at:?}");
        assert_eq!(reason(&[(H_RELEASE_AT, Some(&[0xff])), ok[1], ok[2]]).reason, "bad-release-header");
        assert_eq!(reason(&[(H_RELEASE_AT, None), ok[1], ok[2]]).reason, "bad-release-header");
        assert_eq!(reason(&[ok[0], (H_RELEASE_TO, Some(b"orders")), ok[2]]).reason, "unknown-release-to");
        assert_eq!(reason(&[ok[0], ok[1], (H_RELEASE_ID, Some(b""))]).reason, "bad-release-id");
        let long = vec![b'x'; MAX_RELEASE_ID_BYTES + 1];
        assert_eq!(reason(&[ok[0], ok[1], (H_RELEASE_ID, Some(&long))]).reason, "bad-release-id");
        assert_eq!(reason(&[ok[0], ok[1], (H_RELEASE_ID, Some(b"n\x001"))]).reason, "bad-release-id");
        assert_eq!(reason(&[ok[0], ok[1], ok[2], ok[0]]).reason, "duplicate-release-header");
    }

    #[test]
    fn foreign_bytes_are_not_headers() {
        assert_eq!(decode_headers(&[]), None);
        assert_eq!(decode_headers(&[2]), None);
        assert_eq!(decode_headers(&[VERSION]), Some(vec![]));
        assert_eq!(decode_headers(&[VERSION, 0, 5, b'a']), None, "a cut name");
        assert_eq!(decode_headers(&[VERSION, 0, 1, b'a', 0, 0, 0, 3, 1]), None, "a cut value");
        assert_eq!(decode_headers(&[VERSION, 0, 1, b'a', 0xff, 0xff, 0xff, 0xfe]), None, "a negative length");
    }

    proptest! {
        #[test]
        fn headers_round_trip(hs in proptest::collection::vec(
            ("[a-z.\\-]{0,20}", proptest::option::of(proptest::collection::vec(any::<u8>(), 0..40))), 0..8)) {
            prop_assert_eq!(decode_headers(&encode_headers(&hs)), Some(hs));
        }
    }
}
