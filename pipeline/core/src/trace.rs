//! W3C trace context (`traceparent`) carried in Kafka headers from ingest through templating to
//! notifications, so one trace id follows an event end to end.

/// Parses `00-<32 hex trace id>-<16 hex parent id>-<2 hex flags>`; returns (trace id, span id).
pub fn parse_traceparent(v: &str) -> Option<(&str, &str)> {
    let mut parts = v.split('-');
    let (ver, trace, span, flags) = (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase());
    (parts.next().is_none()
        && hex(ver, 2)
        && ver != "ff"
        && hex(trace, 32)
        && trace.bytes().any(|b| b != b'0')
        && hex(span, 16)
        && span.bytes().any(|b| b != b'0')
        && hex(flags, 2))
    .then_some((trace, span))
}

/// A new sampled trace context.
pub fn new_traceparent() -> String {
    let t = uuid::Uuid::new_v4().simple().to_string();
    let s = &uuid::Uuid::new_v4().simple().to_string()[..16];
    format!("00-{t}-{s}-01")
}

/// The context for a child operation: same trace id, new span id, same flags.
pub fn child_traceparent(parent: &str) -> Option<String> {
    let (trace, _) = parse_traceparent(parent)?;
    let flags = &parent[parent.len() - 2..];
    let s = &uuid::Uuid::new_v4().simple().to_string()[..16];
    Some(format!("00-{trace}-{s}-{flags}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_and_child_share_the_trace_id() {
        let p = new_traceparent();
        let (t, s) = parse_traceparent(&p).unwrap();
        let c = child_traceparent(&p).unwrap();
        let (ct, cs) = parse_traceparent(&c).unwrap();
        assert_eq!(t, ct);
        assert_ne!(s, cs);
    }

    #[test]
    fn rejects_invalid() {
        assert!(parse_traceparent("00-00000000000000000000000000000000-0000000000000001-01").is_none());
        assert!(parse_traceparent("00-abc-def-01").is_none());
        assert!(parse_traceparent("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01").is_some());
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,80}") {
            let _ = parse_traceparent(&s);
        }
    }
}
