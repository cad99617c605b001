//! `tidings status`: the topology, the live instances and what they own, each group's lag and
//! state over a window (OK, lagging, stalled, stopped; see `tidings_core::status::eval`), dead
//! letters by reason and streams per gateway, as a table or JSON. Exit 3 when a group is not OK.

use std::collections::HashMap;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Args;
use tidings_core::status::{Collector, GroupSpec, StatusReport, StatusSpec};
use tidings_pipeline::stages::claims;
use tidings_pipeline::topology::Topology;

use crate::endpoints::database_url;
use crate::tools::{brokers, topology_with_running_prefix};
use crate::Infra;

/// The compacted topic every `tidings up` announces itself on (logical name).
pub const INSTANCES_TOPIC: &str = "tidings.instances";
/// Exit code when any group is not OK.
pub const EX_NOT_OK: u8 = 3;

#[derive(Args, Debug)]
#[command(after_help = "Exit status: 0 every group is OK, 3 some group is lagging, stalled or stopped, 1 an error.")]
pub struct StatusArgs {
    /// Print the report as JSON (what the gateway's GET /v1/status answers).
    #[arg(long)]
    pub json: bool,
    /// How long to sample lag before judging each group (`10s`, `500ms`, `2m`); a stall or a
    /// growing lag shows only over a window.
    #[arg(long, default_value = "10s", value_parser = parse_window)]
    pub window: Duration,
    #[command(flatten)]
    pub infra: Infra,
}

/// The groups, instances topic and dead-letter topics of `topo` (physical names); with
/// `delivery_group` (logical), the gateways' group too.
pub fn spec(topo: &Topology, delivery_group: Option<&str>) -> StatusSpec {
    let st = &topo.stages;
    let names = |v: &[String]| v.iter().map(|t| topo.topic_name(t)).collect::<Vec<_>>();
    let group = |stage: &str, group: &str, inputs: Vec<String>, output: Option<&str>, dlq: &str, required| GroupSpec {
        stage: stage.into(),
        group: topo.group_name(group),
        topics: inputs,
        output: output.map(|o| topo.topic_name(o)),
        dead_letter: Some(topo.topic_name(dlq)),
        commits: true,
        offsets_in_store: false,
        required,
    };
    let mut groups = vec![
        group(
            "templating",
            &st.templating.group,
            names(&st.templating.inputs),
            Some(&st.templating.output),
            &st.templating.dead_letter,
            true,
        ),
        group(
            "persistence",
            &st.persistence.group,
            names(&st.persistence.inputs),
            None,
            &st.persistence.dead_letter,
            true,
        ),
    ];
    if topo.topics.contains_key(&st.scheduler.input) {
        groups.push(group(
            "scheduler",
            &st.scheduler.group,
            names(std::slice::from_ref(&st.scheduler.input)),
            None,
            &st.scheduler.dead_letter,
            false,
        ));
    }
    if topo.topics.contains_key(claims::INPUT) && topo.topics.contains_key(claims::OUTPUT) {
        let input = vec![topo.topic_name(claims::INPUT)];
        let mut g = group("claims", &st.claims.group, input, Some(claims::OUTPUT), &st.claims.dead_letter, false);
        // Committed with its decisions in the database, never to Kafka.
        g.offsets_in_store = true;
        groups.push(g);
    }
    if let Some(d) = delivery_group {
        groups.push(GroupSpec {
            stage: "gateway".into(),
            group: topo.group_name(d),
            topics: vec![topo.topic_name(&st.templating.output)],
            output: None,
            dead_letter: None,
            commits: false,
            offsets_in_store: false,
            required: false,
        });
    }
    let dead_letters =
        topo.topics.keys().filter(|t| t.starts_with("tidings.dlq.")).map(|t| topo.topic_name(t)).collect();
    StatusSpec { instances_topic: topo.topic_name(INSTANCES_TOPIC), groups, dead_letters }
}

pub async fn run(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let topo = topology_with_running_prefix(&args.infra)?;
    let kafka = args.infra.kafka(brokers(&args.infra)?)?;
    let collector = Arc::new(Collector::new(&kafka, spec(&topo, None))?);
    // The claim stage's offsets are in the database: without it, its lag is not shown.
    let store = match tidings_store::Store::connect(&database_url(&args.infra)).await {
        Ok(s) => Some(s),
        Err(e) => {
            eprintln!("warning: the claim stage's lag is not shown: its offsets are in the database ({e})");
            None
        }
    };
    // Five looks over the window (one a second at most, two at least), the first now.
    let every = (args.window / 5).max(Duration::from_secs(1));
    let start = Instant::now();
    let mut samples = Vec::new();
    loop {
        let stored = match &store {
            Some(store) => stored_offsets(store, collector.spec()).await,
            None => HashMap::new(),
        };
        let c = collector.clone();
        samples.push(tokio::task::spawn_blocking(move || c.sample(&stored)).await??);
        // Two looks at least: a stall shows only between two.
        if samples.len() >= 2 && start.elapsed() + every > args.window + Duration::from_millis(100) {
            break;
        }
        tokio::time::sleep(every).await;
    }
    let c = collector.clone();
    let letters = tokio::task::spawn_blocking(move || c.dead_letters()).await?;
    let report = tidings_core::status::report(collector.spec(), &samples, letters);
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", table(&report));
    }
    Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::from(EX_NOT_OK) })
}

/// The next offsets of the groups that keep them in `store` (the claim stage), by group; a
/// group whose read failed is left out (its lag is then not shown).
pub async fn stored_offsets(store: &tidings_store::Store, spec: &StatusSpec) -> HashMap<String, HashMap<i32, i64>> {
    let mut out = HashMap::new();
    for g in spec.groups.iter().filter(|g| g.offsets_in_store) {
        match store.claim_offsets(&g.group).await {
            Ok(rows) => {
                out.insert(g.group.clone(), rows.into_iter().collect());
            }
            Err(e) => tracing::warn!(error = %e, "The stored offsets of {} are unreadable.", g.group),
        }
    }
    out
}

fn parse_window(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (n, unit) = s.split_at(split);
    let n: f64 = n.parse().map_err(|_| format!("{s:?} is not a duration like 10s, 500ms or 2m"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" | "" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => return Err(format!("{s:?}: unit must be ms, s, m or h")),
    };
    if !(0.0..=86_400.0).contains(&secs) {
        return Err(format!("{s:?} is out of range (0 to 24h)"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Rows under a header, each column as wide as its widest cell.
fn columns(out: &mut String, header: &[&str], rows: &[Vec<String>]) {
    let mut w: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut l = String::from(" ");
        for (i, c) in cells.iter().enumerate() {
            l.push(' ');
            l.push_str(c);
            if i + 1 < cells.len() {
                l.push_str(&" ".repeat(w[i] - c.chars().count() + 1));
            }
        }
        l.trim_end().to_string() + "\n"
    };
    out.push_str(&line(header.to_vec()));
    for r in rows {
        out.push_str(&line(r.iter().map(String::as_str).collect()));
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

fn secs(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |s| format!("{s:.1}"))
}

/// The report for a person.
pub fn table(r: &StatusReport) -> String {
    let mut out = String::new();
    let when = chrono::DateTime::from_timestamp_millis(r.generated_at_ms).map(|t| t.to_rfc3339()).unwrap_or_default();
    let bad = r.groups.iter().filter(|g| g.state != tidings_core::status::State::Ok).count();
    let verdict = if r.ok { "all groups OK".to_string() } else { format!("{bad} group(s) not OK") };
    out.push_str(&format!(
        "tidings status at {when} (window {:.1}s, {} samples): {verdict}\n\nTopology\n",
        r.window_ms as f64 / 1000.0,
        r.samples
    ));
    let rows: Vec<Vec<String>> = r
        .topology
        .iter()
        .map(|t| {
            vec![
                t.stage.clone(),
                t.group.clone(),
                t.inputs.join(","),
                opt(t.output.clone()),
                opt(t.dead_letter.clone()),
            ]
        })
        .collect();
    columns(&mut out, &["STAGE", "GROUP", "INPUTS", "OUTPUT", "DEAD LETTERS"], &rows);

    out.push_str("\nInstances\n");
    let rows: Vec<Vec<String>> = r
        .instances
        .iter()
        .map(|a| {
            let owned: usize = a.groups.values().map(|o| o.partitions.len()).sum();
            let age = (r.generated_at_ms - a.updated_at_ms).max(0) as f64 / 1000.0;
            vec![
                a.instance.clone(),
                a.host.clone(),
                a.pid.to_string(),
                a.stages.join(","),
                owned.to_string(),
                format!("{age:.0}s ago"),
                a.gateway.as_ref().map_or_else(|| "-".into(), |g| g.url.clone()),
            ]
        })
        .collect();
    columns(&mut out, &["INSTANCE", "HOST", "PID", "STAGES", "PARTITIONS", "UPDATED", "GATEWAY"], &rows);

    out.push_str("\nGroups\n");
    let rows: Vec<Vec<String>> = r
        .groups
        .iter()
        .map(|g| {
            vec![
                g.stage.clone(),
                g.group.clone(),
                g.state.as_str().into(),
                g.members.to_string(),
                g.instances.len().to_string(),
                opt(g.lag_messages),
                secs(g.lag_seconds),
                g.reason.clone().unwrap_or_default(),
            ]
        })
        .collect();
    columns(&mut out, &["STAGE", "GROUP", "STATE", "MEMBERS", "INSTANCES", "LAG", "LAG SECONDS", "WHY"], &rows);

    out.push_str("\nPartitions and owners\n");
    let mut rows = Vec::new();
    for g in &r.groups {
        for p in &g.partitions {
            rows.push(vec![
                g.group.clone(),
                format!("{}[{}]", p.topic, p.partition),
                if p.owners.is_empty() { "(none)".into() } else { p.owners.join(",") },
                opt(p.committed),
                opt(p.high),
                opt(p.lag_messages),
                secs(p.lag_seconds),
                p.state.as_str().into(),
            ]);
        }
    }
    columns(&mut out, &["GROUP", "PARTITION", "OWNER", "COMMITTED", "END", "LAG", "LAG SECONDS", "STATE"], &rows);

    out.push_str("\nDead letters\n");
    let mut rows = Vec::new();
    for d in &r.dead_letters {
        let of = if d.counted < d.total { format!(" (reasons of the newest {})", d.counted) } else { String::new() };
        rows.push(vec![d.topic.clone(), format!("{}{of}", d.total), String::new(), String::new()]);
        for (reason, n) in &d.by_reason {
            rows.push(vec![String::new(), String::new(), reason.clone(), n.to_string()]);
        }
    }
    columns(&mut out, &["TOPIC", "LETTERS", "REASON", "COUNT"], &rows);

    out.push_str("\nGateways\n");
    let rows: Vec<Vec<String>> = r
        .gateways
        .iter()
        .map(|g| vec![g.instance.clone(), g.url.clone(), g.streams.to_string(), g.partitions.to_string()])
        .collect();
    columns(&mut out, &["INSTANCE", "URL", "STREAMS", "PARTITIONS"], &rows);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_parse_with_units() {
        assert_eq!(parse_window("10s").unwrap(), Duration::from_secs(10));
        assert_eq!(parse_window("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_window("2m").unwrap(), Duration::from_secs(120));
        assert!(parse_window("10x").is_err() && parse_window("-1s").is_err() && parse_window("2d").is_err());
    }
}
