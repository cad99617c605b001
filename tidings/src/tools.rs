//! The small commands: topology check/apply, produce, inbox and stats.

use anyhow::{bail, Context};
use rdkafka::admin::AdminClient;
use rdkafka::client::DefaultClientContext;
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::io::BufRead;
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_pipeline::topology::{self, Topology};
use tidings_store::Store;

use crate::endpoints::{database_url, Endpoints};
use crate::up::load_topology;
use crate::Infra;

/// `args` parsed as a command's flags `A` (for the commands' tests: what clap makes of a command line).
#[cfg(test)]
pub(crate) fn parse_flags<A: clap::Args + clap::FromArgMatches>(args: &[&str]) -> A {
    let cmd = A::augment_args(clap::Command::new("tidings"));
    let matches = cmd.try_get_matches_from(std::iter::once("tidings").chain(args.iter().copied())).unwrap();
    A::from_arg_matches(&matches).unwrap()
}

/// A time bound of the data tools (replay, dlq, offsets, audit): RFC 3339 (`2026-11-20T00:00:00Z`)
/// or relative to `now_ms` (`-90s`, `-30m`, `-2h`, `-1d`), as milliseconds since the epoch.
pub(crate) fn parse_time(s: &str, now_ms: i64) -> Result<i64, String> {
    let s = s.trim();
    if let Some(rel) = s.strip_prefix('-') {
        let split = rel.find(|c: char| !c.is_ascii_digit()).unwrap_or(rel.len());
        let (n, unit) = rel.split_at(split);
        let n: i64 = n.parse().map_err(|_| format!("{s:?}: expected -<number><s|m|h|d>, e.g. -2h"))?;
        let unit_ms = match unit {
            "s" => 1_000,
            "m" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("{s:?}: the unit must be s, m, h or d (e.g. -2h)")),
        };
        return n
            .checked_mul(unit_ms)
            .map(|d| now_ms - d)
            .filter(|t| *t >= 0)
            .ok_or_else(|| format!("{s:?} is before 1970"));
    }
    let t = chrono::DateTime::parse_from_rfc3339(s)
        .map_err(|e| format!("{s:?} is neither RFC 3339 (2026-11-20T00:00:00Z) nor relative (-2h): {e}"))?;
    let ms = t.timestamp_millis();
    if ms < 0 {
        return Err(format!("{s:?} is before 1970"));
    }
    Ok(ms)
}

pub fn topology_check(path: &Path) -> anyhow::Result<ExitCode> {
    match Topology::load(path) {
        Ok(t) => {
            for w in &t.warnings {
                println!("warning: {w}");
            }
            println!("{}: OK ({} topics, {} templates)", path.display(), t.topics.len(), t.templates.len());
            Ok(ExitCode::SUCCESS)
        }
        Err(errs) => {
            eprintln!("{}: {} error(s)", path.display(), errs.0.len());
            for d in &errs.0 {
                eprintln!("  {d}");
            }
            Ok(ExitCode::from(2))
        }
    }
}

pub(crate) fn brokers(infra: &Infra) -> anyhow::Result<String> {
    infra
        .brokers
        .clone()
        .or_else(|| Endpoints::read(&infra.data_dir).map(|e| e.brokers))
        .context("no --brokers given and no running `tidings up` found (its endpoints.json)")
}

pub(crate) fn registry_url(infra: &Infra) -> anyhow::Result<String> {
    infra
        .schema_registry_url
        .clone()
        .or_else(|| Endpoints::read(&infra.data_dir).map(|e| e.schema_registry_url))
        .context("no --schema-registry-url given and no running `tidings up` found (its endpoints.json)")
}

pub(crate) fn topology_with_running_prefix(infra: &Infra) -> anyhow::Result<Topology> {
    let topo = load_topology(infra)?;
    if infra.topic_prefix.is_none() {
        if let Some(e) = Endpoints::read(&infra.data_dir) {
            return Ok(topo.with_prefix(&e.topic_prefix));
        }
    }
    Ok(topo)
}

pub async fn topology_apply(infra: &Infra) -> anyhow::Result<ExitCode> {
    let topo = load_topology(infra)?;
    let admin: AdminClient<DefaultClientContext> = infra.kafka(brokers(infra)?)?.admin().create()?;
    let report =
        topology::apply::apply(&topo, &admin, Duration::from_secs(30)).await.map_err(|e| anyhow::anyhow!("{e}"))?;
    println!("{report}");
    Ok(if report.is_clean() { ExitCode::SUCCESS } else { ExitCode::from(3) })
}

pub async fn produce(topic: &str, infra: &Infra) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(infra)?;
    let Some(spec) = topo.topics.get(topic) else {
        bail!("topic {topic:?} is not declared in {}", infra.topology.display())
    };
    let physical = topo.topic_name(topic);
    let registry = RegistryClient::new(infra.registry(registry_url(infra)?)?)?;
    let (id, schema) = registry.latest(&format!("{physical}-value")).await?;
    let encoder = FramedEncoder::new(id, schema)?;
    let producer: FutureProducer = infra.kafka(brokers(infra)?)?.producer().create()?;
    let (mut ok, mut bad) = (0u64, 0u64);
    for (n, line) in std::io::stdin().lock().lines().enumerate() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let json: serde_json::Value = match serde_json::from_str(&line) {
            Ok(j) => j,
            Err(e) => {
                eprintln!("line {}: not JSON: {e}", n + 1);
                bad += 1;
                continue;
            }
        };
        let payload = match json_to_avro(schema, &json).and_then(|v| encoder.encode(v)) {
            Ok(p) => p,
            Err(e) => {
                eprintln!("line {}: {e}", n + 1);
                bad += 1;
                continue;
            }
        };
        let key = spec.key.as_ref().and_then(|k| json.get(k)).and_then(|v| v.as_str()).map(str::to_string);
        let mut rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&physical).payload(payload.as_slice());
        if let Some(k) = &key {
            rec = rec.key(k.as_str());
        }
        producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| anyhow::anyhow!("line {}: {e}", n + 1))?;
        ok += 1;
    }
    eprintln!("{ok} event(s) produced to {physical}, {bad} rejected.");
    Ok(if bad == 0 { ExitCode::SUCCESS } else { ExitCode::from(4) })
}

pub async fn inbox(user: &str, limit: u32, infra: &Infra) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&database_url(infra)).await?;
    let items = store.inbox(user, None, limit).await?;
    let unread = store.unread_count(user).await?;
    println!("{user}: {unread} unread");
    for i in items {
        let n = &i.notification;
        let when = chrono::DateTime::from_timestamp_micros(n.occurred_at).map(|t| t.to_rfc3339()).unwrap_or_default();
        println!("{} {:<16} {}  {}", when, n.kind, n.title, if i.read { "" } else { "(unread)" });
        println!("    {}", n.body);
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn stats(infra: &Infra) -> anyhow::Result<ExitCode> {
    let store = Store::connect(&database_url(infra)).await?;
    println!("{}", serde_json::json!({ "notifications": store.count_notifications().await? }));
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_relative_and_rfc3339() {
        let now = 1_800_000_000_000;
        assert_eq!(parse_time("-2h", now), Ok(now - 7_200_000));
        assert_eq!(parse_time("-30m", now), Ok(now - 1_800_000));
        assert_eq!(parse_time("-1d", now), Ok(now - 86_400_000));
        assert_eq!(parse_time("-45s", now), Ok(now - 45_000));
        assert_eq!(parse_time("2026-11-20T00:00:00Z", now), Ok(1_795_132_800_000));
        assert_eq!(parse_time("2026-11-20T01:00:00+01:00", now), Ok(1_795_132_800_000));
        assert!(parse_time("-2x", now).unwrap_err().contains("unit"));
        assert!(parse_time("yesterday", now).unwrap_err().contains("RFC 3339"));
        assert!(parse_time("1960-01-01T00:00:00Z", now).unwrap_err().contains("1970"));
    }
}
