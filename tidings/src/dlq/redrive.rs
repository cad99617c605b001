//! `tidings dlq replay`: selected letters go back to the partition they were read from, in their
//! dead-letter order (so each key's order holds), counted in `tidings.dlq.replay-count`; a letter
//! re-driven too often goes to the quarantine topic. Executed runs are recorded and resumable.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::Args;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde::{Deserialize, Serialize};
use tidings_core::kafka::{is_dlq_header, H_DLQ_REPLAY_COUNT};
use tidings_store::replays::{Replay, ReplayKind, ReplayOutcome};
use tidings_store::Store;

use super::letters::{self, Filters, Letter, Reader};
use super::{dead_letter_topics, Select, QUARANTINE};
use crate::endpoints::database_url;
use crate::tools::{brokers, topology_with_running_prefix};
use crate::Infra;

/// Header on a quarantined letter naming the dead-letter topic it came from.
pub const H_QUARANTINED_FROM: &str = "tidings.dlq.quarantined-from";
/// Earlier recorded re-drives looked at to skip letters they already handled.
const HISTORY: i64 = 10_000;
/// Letters produced between two saves of the progress, and the longest time between two saves
/// while letters are being produced (a slow --rate still leaves a recent point to resume from).
const SAVE_EVERY: usize = 500;
const SAVE_AFTER: Duration = Duration::from_secs(1);
/// Seconds between plain progress lines.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

#[derive(Args, Clone, Debug)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub select: Select,
    /// Re-drive and quarantine; without it, only say what would be done.
    #[arg(long)]
    pub execute: bool,
    /// Letters produced per second at most (re-driven and quarantined together).
    #[arg(long, env = "TIDINGS_DLQ_RATE", default_value_t = 500, value_parser = clap::value_parser!(u32).range(1..))]
    pub rate: u32,
    /// Re-drives a record gets: a letter whose `tidings.dlq.replay-count` has reached this goes
    /// to tidings.dlq.quarantine instead of its source topic.
    #[arg(long, env = "TIDINGS_DLQ_MAX_REDRIVES", default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..))]
    pub max_redrives: u32,
    /// Letters a dry run lists one by one at most (the counts cover all of them).
    #[arg(long, default_value_t = 50)]
    pub show: usize,
    #[command(flatten)]
    pub infra: Infra,
}

/// What a run did (or would do) with the letters it read.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counts {
    read: u64,
    selected: u64,
    redriven: u64,
    quarantined: u64,
    /// Re-driven or quarantined by an earlier run.
    already: u64,
    /// No value or no source coordinates in the letter (a smaller copy): nothing to re-drive.
    unredrivable: u64,
}

/// What happens to one letter.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    Redrive,
    Quarantine,
    Already,
    Unredrivable,
}

/// An earlier run's letters: the offsets it got through, per partition, and its filters.
struct Earlier {
    filters: Filters,
    covered: BTreeMap<i32, (i64, i64)>,
}

impl Earlier {
    fn handled(&self, l: &Letter) -> bool {
        self.covered.get(&l.partition).is_some_and(|(s, e)| (*s..*e).contains(&l.offset)) && self.filters.matches(l)
    }
}

fn classify(l: &Letter, earlier: &[Earlier], max_redrives: u32) -> Action {
    if earlier.iter().any(|e| e.handled(l)) {
        Action::Already
    } else if l.replay_count() >= max_redrives {
        Action::Quarantine
    } else if l.payload.is_none() || l.source_topic().is_none() || l.source_partition().is_none() {
        Action::Unredrivable
    } else {
        Action::Redrive
    }
}

/// The record a letter is re-driven as: its key, value and own headers, the count one higher.
fn redriven_headers(l: &Letter) -> OwnedHeaders {
    let mut h = OwnedHeaders::new_with_capacity(l.headers.len());
    for (k, v) in &l.headers {
        if !is_dlq_header(k) {
            h = h.insert(Header { key: k, value: v.as_deref() });
        }
    }
    let next = l.replay_count().saturating_add(1).to_string();
    h.insert(Header { key: H_DLQ_REPLAY_COUNT, value: Some(&next) })
}

type Plan = BTreeMap<i32, (i64, i64)>;
type Progress = BTreeMap<i32, i64>;

fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

pub async fn run(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let infra = &args.infra;
    let topo = topology_with_running_prefix(infra)?;
    let filters = args.select.filters(&topo)?;
    let kafka = infra.kafka(brokers(infra)?)?;
    let store = Store::connect(&database_url(infra)).await?;
    let quarantine = topo.topic_name(QUARANTINE);
    if !topo.topics.contains_key(QUARANTINE) {
        bail!("the topology declares no {QUARANTINE} topic for letters re-driven too often");
    }
    let stop = Arc::new(AtomicBool::new(false));
    if args.execute {
        let stop = stop.clone();
        tokio::spawn(async move {
            let _ = tokio::signal::ctrl_c().await;
            eprintln!("Stopping after the letters in flight; the same command resumes.");
            stop.store(true, Ordering::SeqCst);
        });
    }
    let producer: Option<FutureProducer> = if args.execute { Some(kafka.producer().create()?) } else { None };
    let history = store.list_replays(ReplayKind::Dlq, HISTORY).await?;
    let mut code = ExitCode::SUCCESS;
    for logical in dead_letter_topics(&topo, &args.select.dlqs, false)? {
        let topic = topo.topic_name(&logical);
        let filters_json = serde_json::to_string(&filters)?;
        let fingerprint = uuid::Uuid::new_v5(
            &uuid::Uuid::NAMESPACE_OID,
            format!("dlq\n{topic}\n{filters_json}\n{}", args.max_redrives).as_bytes(),
        )
        .to_string();
        let resumed = store.unfinished_replay(ReplayKind::Dlq, &fingerprint).await?;
        let resumed = resumed.as_ref();
        let earlier: Vec<Earlier> = history
            .iter()
            .filter(|r| r.topic == topic && Some(&r.replay_id) != resumed.map(|r| &r.replay_id))
            .filter_map(|r| earlier_run(r).ok())
            .collect();
        let (plan, mut progress, mut counts): (Plan, Progress, Counts) = match resumed {
            Some(r) => {
                eprintln!("{logical}: resuming the re-drive {} started at {}.", r.replay_id, r.started_at);
                (decode_plan(&r.plan)?, serde_json::from_str(&r.progress)?, serde_json::from_str(&r.counts)?)
            }
            None => (letters::ranges(&kafka, &topic)?, Progress::new(), Counts::default()),
        };
        // An empty dead-letter topic leaves no record: there is nothing a later run could skip.
        let empty = plan.values().all(|(s, e)| s >= e);
        let replay_id = match (resumed, args.execute) {
            (Some(r), _) => Some(r.replay_id.clone()),
            (None, true) if !empty => {
                let id = uuid::Uuid::new_v4().to_string();
                store
                    .create_replay(&Replay {
                        replay_id: id.clone(),
                        kind: ReplayKind::Dlq,
                        fingerprint: fingerprint.clone(),
                        started_by: std::env::var("USER").unwrap_or_else(|_| "unknown".into()),
                        started_at: now_us(),
                        updated_at: now_us(),
                        finished_at: None,
                        outcome: ReplayOutcome::Running,
                        topic: topic.clone(),
                        stage: None,
                        plan: encode_plan(&plan)?,
                        filters: filters_json.clone(),
                        progress: "{}".into(),
                        counts: "{}".into(),
                    })
                    .await?;
                Some(id)
            }
            (None, _) => None,
        };
        let todo: Plan =
            plan.iter().map(|(p, (s, e))| (*p, (progress.get(p).copied().unwrap_or(*s).max(*s), *e))).collect();
        let mut reader = Reader::new(&kafka, &topic, &todo)?;
        let mut pending: Vec<DeliveryFuture> = Vec::new();
        let (started, mut produced, mut listed) = (Instant::now(), 0u64, 0usize);
        let (mut last_line, mut last_save) = (Instant::now(), Instant::now());
        let ended: anyhow::Result<bool> = async {
            while let Some(l) = reader.next().await? {
                counts.read += 1;
                let next = l.offset + 1;
                if filters.matches(&l) {
                    counts.selected += 1;
                    let action = classify(&l, &earlier, args.max_redrives);
                    match action {
                        Action::Already => counts.already += 1,
                        Action::Unredrivable => counts.unredrivable += 1,
                        Action::Redrive => counts.redriven += 1,
                        Action::Quarantine => counts.quarantined += 1,
                    }
                    if !args.execute && matches!(action, Action::Redrive | Action::Quarantine) && listed < args.show {
                        listed += 1;
                        println!("{}", dry_line(&l, action, &quarantine));
                    }
                    if let (Some(producer), Action::Redrive | Action::Quarantine) = (&producer, action) {
                        // The rate: letter n leaves no earlier than n / rate seconds after the start.
                        let due = started + Duration::from_secs_f64(produced as f64 / args.rate as f64);
                        tokio::time::sleep_until(due.into()).await;
                        pending.push(produce(producer, &l, action, &topic, &quarantine).await?);
                        produced += 1;
                    }
                }
                progress.insert(l.partition, next);
                if pending.len() >= SAVE_EVERY || (!pending.is_empty() && last_save.elapsed() >= SAVE_AFTER) {
                    last_save = Instant::now();
                    save(&store, replay_id.as_deref(), &mut pending, &progress, &counts).await?;
                }
                if args.execute && last_line.elapsed() >= PROGRESS_EVERY {
                    last_line = Instant::now();
                    let rate = produced as f64 / started.elapsed().as_secs_f64().max(1e-9);
                    eprintln!(
                        "{logical}: {} letters read, {} re-driven, {} quarantined, {rate:.0}/s",
                        counts.read, counts.redriven, counts.quarantined
                    );
                }
                if stop.load(Ordering::SeqCst) {
                    return Ok(false);
                }
            }
            Ok(true)
        }
        .await;
        // Whatever ended the run, what was produced is awaited before the progress says so.
        let saved = save(&store, replay_id.as_deref(), &mut pending, &progress, &counts).await;
        let outcome = match (&ended, &saved) {
            (Ok(true), Ok(())) => ReplayOutcome::Done,
            (Ok(false), Ok(())) => ReplayOutcome::Stopped,
            _ => ReplayOutcome::Failed,
        };
        if let Some(id) = &replay_id {
            // A done run covers its whole plan, so later runs skip exactly what it looked at.
            if outcome == ReplayOutcome::Done {
                for (p, (_, e)) in &plan {
                    progress.insert(*p, *e);
                }
            }
            store
                .finish_replay(
                    id,
                    outcome,
                    &serde_json::to_string(&progress)?,
                    &serde_json::to_string(&counts)?,
                    now_us(),
                )
                .await?;
        }
        ended?;
        saved?;
        let c = &counts;
        if args.execute {
            println!(
                "{logical}: {} letter(s) read, {} selected: {} re-driven, {} quarantined to {quarantine}, {} handled by an earlier run, {} without a value or source to re-drive ({}).",
                c.read, c.selected, c.redriven, c.quarantined, c.already, c.unredrivable, outcome.as_str()
            );
            if outcome == ReplayOutcome::Stopped {
                code = ExitCode::from(130);
                break;
            }
        } else {
            println!(
                "{logical}: dry run: {} letter(s) read, {} selected: would re-drive {}, would quarantine {} (re-driven {} times already), {} handled by an earlier run, {} without a value or source to re-drive. Add --execute to do it.",
                c.read, c.selected, c.redriven, c.quarantined, args.max_redrives, c.already, c.unredrivable
            );
        }
    }
    Ok(code)
}

async fn produce(
    producer: &FutureProducer,
    l: &Letter,
    action: Action,
    dlq: &str,
    quarantine: &str,
) -> anyhow::Result<DeliveryFuture> {
    let (mut rec, headers): (FutureRecord<'_, [u8], [u8]>, OwnedHeaders) = if action == Action::Redrive {
        let topic = l.source_topic().context("a re-driven letter names its source")?;
        let partition = l.source_partition().context("a re-driven letter names its partition")?;
        (FutureRecord::to(topic).partition(partition), redriven_headers(l))
    } else {
        let mut h = OwnedHeaders::new_with_capacity(l.headers.len() + 1);
        for (k, v) in &l.headers {
            h = h.insert(Header { key: k, value: v.as_deref() });
        }
        (FutureRecord::to(quarantine), h.insert(Header { key: H_QUARANTINED_FROM, value: Some(dlq) }))
    };
    rec = rec.headers(headers);
    if let Some(k) = &l.key {
        rec = rec.key(k.as_slice());
    }
    if let Some(p) = &l.payload {
        rec = rec.payload(p.as_slice());
    }
    // Waits while the producer's queue is full; a record it can never take is an error here.
    loop {
        match producer.send_result(rec) {
            Ok(d) => return Ok(d),
            Err((e, back)) if e.rdkafka_error_code() == Some(rdkafka::types::RDKafkaErrorCode::QueueFull) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Err((e, _)) => bail!("producing letter {}@{}: {e}", l.partition, l.offset),
        }
    }
}

/// Waits for every produced letter, then records how far the run got.
async fn save(
    store: &Store,
    replay_id: Option<&str>,
    pending: &mut Vec<DeliveryFuture>,
    progress: &Progress,
    counts: &Counts,
) -> anyhow::Result<()> {
    for d in pending.drain(..) {
        match d.await {
            Ok(Ok(_)) => {}
            Ok(Err((e, _))) => bail!("a re-driven letter was not written: {e}"),
            Err(_) => bail!("the producer went away before a re-driven letter was acknowledged"),
        }
    }
    if let Some(id) = replay_id {
        store
            .save_replay_progress(id, &serde_json::to_string(progress)?, &serde_json::to_string(counts)?, now_us())
            .await?;
    }
    Ok(())
}

fn dry_line(l: &Letter, action: Action, quarantine: &str) -> String {
    let key = l.key.as_deref().map(String::from_utf8_lossy).unwrap_or_default();
    let reason = l.reason().unwrap_or("?");
    match action {
        Action::Quarantine => format!(
            "would quarantine  [{}@{}] key={key:?} {reason}, re-driven {} times -> {quarantine}",
            l.partition,
            l.offset,
            l.replay_count()
        ),
        _ => format!(
            "would re-drive    [{}@{}] key={key:?} {reason} -> {}[{}] (replay-count {})",
            l.partition,
            l.offset,
            l.source_topic().unwrap_or("?"),
            l.source_partition().unwrap_or(-1),
            l.replay_count() + 1
        ),
    }
}

/// Plans as JSON: `{"<partition>": [start, end]}`.
fn encode_plan(plan: &Plan) -> anyhow::Result<String> {
    Ok(serde_json::to_string(&plan.iter().map(|(p, (s, e))| (p.to_string(), [*s, *e])).collect::<BTreeMap<_, _>>())?)
}

fn decode_plan(s: &str) -> anyhow::Result<Plan> {
    let raw: BTreeMap<String, [i64; 2]> = serde_json::from_str(s).context("a recorded dlq plan")?;
    raw.into_iter().map(|(p, [s, e])| Ok((p.parse()?, (s, e)))).collect()
}

fn earlier_run(r: &Replay) -> anyhow::Result<Earlier> {
    let plan = decode_plan(&r.plan)?;
    let progress: Progress = serde_json::from_str(&r.progress)?;
    let covered = plan.iter().map(|(p, (s, _))| (*p, (*s, progress.get(p).copied().unwrap_or(*s)))).collect();
    Ok(Earlier { filters: serde_json::from_str(&r.filters)?, covered })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tidings_core::kafka::{H_DLQ_REASON, H_DLQ_TOPIC, H_SPRING_OFFSET};

    fn letter(offset: i64, count: Option<&str>) -> Letter {
        let mut headers = vec![
            ("traceparent".to_string(), Some(b"00-a-b-01".to_vec())),
            (H_DLQ_REASON.to_string(), Some(b"unknown-schema-id".to_vec())),
            (H_DLQ_TOPIC.to_string(), Some(b"orders".to_vec())),
            (tidings_core::kafka::H_DLQ_PARTITION.to_string(), Some(b"2".to_vec())),
            (H_SPRING_OFFSET.to_string(), Some(7i64.to_be_bytes().to_vec())),
        ];
        if let Some(c) = count {
            headers.push((H_DLQ_REPLAY_COUNT.to_string(), Some(c.as_bytes().to_vec())));
        }
        Letter {
            partition: 0,
            offset,
            timestamp_ms: Some(0),
            key: Some(b"k".to_vec()),
            payload: Some(vec![1]),
            headers,
        }
    }

    #[test]
    fn a_letter_re_driven_max_times_is_quarantined_never_re_driven() {
        assert_eq!(classify(&letter(0, None), &[], 3), Action::Redrive);
        assert_eq!(classify(&letter(0, Some("2")), &[], 3), Action::Redrive);
        assert_eq!(classify(&letter(0, Some("3")), &[], 3), Action::Quarantine);
        assert_eq!(classify(&letter(0, Some("9")), &[], 3), Action::Quarantine);
        let mut no_value = letter(0, None);
        no_value.payload = None;
        assert_eq!(classify(&no_value, &[], 3), Action::Unredrivable);
        // An earlier run that got through offsets [0, 5) with matching filters handled offset 4, not 5.
        let earlier = [Earlier { filters: Filters::default(), covered: [(0, (0, 5))].into() }];
        assert_eq!(classify(&letter(4, None), &earlier, 3), Action::Already);
        assert_eq!(classify(&letter(5, None), &earlier, 3), Action::Redrive);
        let other_reason = [Earlier {
            filters: Filters { reasons: vec!["malformed-avro".into()], ..Default::default() },
            covered: [(0, (0, 5))].into(),
        }];
        assert_eq!(classify(&letter(4, None), &other_reason, 3), Action::Redrive);
    }

    #[test]
    fn a_re_driven_record_keeps_its_own_headers_and_counts_one_more() {
        use rdkafka::message::Headers;
        for (count, want) in [(None, "1"), (Some("2"), "3")] {
            let h = redriven_headers(&letter(0, count));
            let keys: Vec<(&str, Option<&[u8]>)> = h.iter().map(|x| (x.key, x.value)).collect();
            assert_eq!(keys, [("traceparent", Some(&b"00-a-b-01"[..])), (H_DLQ_REPLAY_COUNT, Some(want.as_bytes()))]);
        }
    }

    #[test]
    fn plans_round_trip() {
        let plan: Plan = [(0, (3, 9)), (2, (0, 0))].into();
        assert_eq!(decode_plan(&encode_plan(&plan).unwrap()).unwrap(), plan);
    }
}
