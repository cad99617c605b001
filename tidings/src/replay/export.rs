//! `tidings replay --export FILE`: the planned range's records, decoded through the registry with
//! their Kafka coordinates and headers, as JSON Lines, or as an Avro object container file when the
//! name ends in `.avro` (each record's value in the topic's own schema). Nothing else is written.

use apache_avro::types::Value;
use apache_avro::Schema;
use rdkafka::message::{BorrowedMessage, Headers, Message};
use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tidings_core::json_avro::{avro_to_json, union_branch_name};
use tidings_core::kafka::KafkaConfig;
use tidings_core::retry::{until_done, GaveUp};
use tidings_core::source::{OffsetRange, RangeSource, Source};
use tidings_core::stage::{Processor, StageError, System};
use tidings_core::{DecodeError, RegistryClient};
use tokio_util::sync::CancellationToken;

use super::plan::Plan;
use super::{Counts, Filters, Show};

/// The Avro container's record: coordinates, headers, and the value in the topic's schema (null
/// with `error` set when it could not be decoded).
fn container_schema(event_schema: &str) -> Result<Schema, apache_avro::Error> {
    Schema::parse_str(&format!(
        r#"{{"type": "record", "name": "ExportedRecord", "namespace": "tidings.export", "fields": [
            {{"name": "topic", "type": "string"}},
            {{"name": "partition", "type": "int"}},
            {{"name": "offset", "type": "long"}},
            {{"name": "timestamp_ms", "type": ["null", "long"]}},
            {{"name": "key", "type": ["null", "bytes"]}},
            {{"name": "headers", "type": {{"type": "array", "items": {{"type": "record", "name": "Header",
                "fields": [{{"name": "name", "type": "string"}}, {{"name": "value", "type": ["null", "bytes"]}}]}}}}}},
            {{"name": "value", "type": ["null", {event_schema}]}},
            {{"name": "error", "type": ["null", "string"]}}
        ]}}"#
    ))
}

enum Out {
    Jsonl(BufWriter<File>),
    Avro(Box<apache_avro::Writer<'static, BufWriter<File>>>),
}

/// Writes the export: one attempt's processor (a restarted attempt rewrites the file).
struct Exporter {
    out: Option<Out>,
    reader: &'static Schema,
    registry: RegistryClient,
    filters: Filters,
    counts: Arc<Mutex<Counts>>,
    last_ts: HashMap<i32, i64>,
    show: Show,
    shutdown: CancellationToken,
}

/// Opens `path` for the export: Avro when it ends in `.avro`, else JSON Lines.
fn open(path: &Path, event_schema: &str) -> Result<Out, StageError> {
    let file = File::create(path).map_err(|e| StageError::configuration(format!("{}: {e}", path.display())))?;
    let w = BufWriter::new(file);
    if path.extension().is_some_and(|e| e == "avro") {
        let schema = container_schema(event_schema)
            .map_err(|e| StageError::configuration(format!("the export's Avro schema: {e}")))?;
        // Parsed once per attempt, kept for the writer's lifetime ('static).
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let writer = apache_avro::Writer::new(schema, w)
            .map_err(|e| StageError::configuration(format!("{}: {e}", path.display())))?;
        Ok(Out::Avro(Box::new(writer)))
    } else {
        Ok(Out::Jsonl(w))
    }
}

#[allow(clippy::too_many_arguments)]
pub(super) async fn run(
    path: &Path,
    plan: &Plan,
    kafka: &KafkaConfig,
    registry: RegistryClient,
    reader: &'static Schema,
    event_schema: &str,
    filters: &Filters,
    show: &Show,
    shutdown: &CancellationToken,
) -> Result<Counts, StageError> {
    let counts = Arc::new(Mutex::new(Counts::default()));
    let start = || async {
        *counts.lock().expect("lock") = Counts::default();
        let ranges =
            plan.partitions.iter().map(|p| OffsetRange::new(&plan.topic, p.partition, p.start, p.end)).collect();
        let source =
            RangeSource::new(kafka, ranges).map_err(|e| StageError::external(System::Kafka, true, e.to_string()))?;
        let exporter = Exporter {
            out: Some(open(path, event_schema)?),
            reader,
            registry: registry.clone(),
            filters: filters.clone(),
            counts: counts.clone(),
            last_ts: HashMap::new(),
            show: show.clone(),
            shutdown: shutdown.clone(),
        };
        Ok::<_, StageError>((exporter, Source::Ranges(source)))
    };
    let health = tidings_core::shutdown::StageHealth::default();
    tidings_core::stage::run("export", &health, shutdown, start).await?;
    let c = counts.lock().expect("lock").clone();
    Ok(c)
}

fn io(e: impl std::fmt::Display) -> StageError {
    StageError::configuration(format!("writing the export: {e}"))
}

impl Exporter {
    async fn take(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        let ts = m.timestamp().to_millis();
        let out_of_order = matches!((ts, self.last_ts.get(&m.partition())), (Some(t), Some(&l)) if t < l);
        if let Some(t) = ts {
            let e = self.last_ts.entry(m.partition()).or_insert(t);
            *e = (*e).max(t);
        }
        {
            let mut c = self.counts.lock().expect("lock");
            c.read += 1;
            c.out_of_order += u64::from(out_of_order);
            self.show.at(c.read);
        }
        if !self.filters.raw_match(m) {
            self.counts.lock().expect("lock").filtered_out += 1;
            return Ok(());
        }
        let decoded = match m.payload() {
            None => Err("record has no value".to_string()),
            Some(payload) => match until_done(
                &self.shutdown,
                || "Decoding through the schema registry".to_string(),
                (Duration::from_millis(200), Duration::from_secs(30)),
                || self.registry.decode(payload, self.reader),
                DecodeError::is_retriable,
            )
            .await
            {
                Ok(v) => Ok(v),
                Err(GaveUp::Failed(e)) => Err(format!("{}: {e}", e.reason_code())),
                Err(GaveUp::ShutDown(e)) => {
                    return Err(StageError::external(System::SchemaRegistry, true, e.to_string()))
                }
            },
        };
        if !self.filters.event_types.is_empty() {
            let kind = decoded.as_ref().ok().and_then(|v| event_type(self.reader, v));
            if !kind.is_some_and(|k| self.filters.event_types.contains(&k)) {
                self.counts.lock().expect("lock").filtered_out += 1;
                return Ok(());
            }
        }
        let headers: Vec<(String, Option<Vec<u8>>)> = m
            .headers()
            .map(|h| h.iter().map(|h| (h.key.to_string(), h.value.map(<[u8]>::to_vec))).collect())
            .unwrap_or_default();
        match self.out.as_mut().expect("open until finished") {
            Out::Jsonl(w) => {
                let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
                let line = serde_json::json!({
                    "topic": m.topic(), "partition": m.partition(), "offset": m.offset(), "timestamp_ms": ts,
                    "key": m.key().map(text),
                    "headers": headers.iter().map(|(k, v)| serde_json::json!({"name": k, "value": v.as_deref().map(text)})).collect::<Vec<_>>(),
                    "value": decoded.as_ref().ok().map(avro_to_json),
                    "error": decoded.as_ref().err(),
                });
                serde_json::to_writer(&mut *w, &line).map_err(io)?;
                w.write_all(b"\n").map_err(io)?;
            }
            Out::Avro(w) => {
                let opt = |v: Option<Value>| match v {
                    Some(v) => Value::Union(1, Box::new(v)),
                    None => Value::Union(0, Box::new(Value::Null)),
                };
                let record = Value::Record(vec![
                    ("topic".into(), Value::String(m.topic().into())),
                    ("partition".into(), Value::Int(m.partition())),
                    ("offset".into(), Value::Long(m.offset())),
                    ("timestamp_ms".into(), opt(ts.map(Value::Long))),
                    ("key".into(), opt(m.key().map(|k| Value::Bytes(k.to_vec())))),
                    (
                        "headers".into(),
                        Value::Array(
                            headers
                                .into_iter()
                                .map(|(k, v)| {
                                    Value::Record(vec![
                                        ("name".into(), Value::String(k)),
                                        ("value".into(), opt(v.map(Value::Bytes))),
                                    ])
                                })
                                .collect(),
                        ),
                    ),
                    ("value".into(), opt(decoded.as_ref().ok().cloned())),
                    ("error".into(), opt(decoded.as_ref().err().map(|e| Value::String(e.clone())))),
                ]);
                w.append_value(record).map_err(io)?;
            }
        }
        Ok(())
    }
}

/// A record's event type: a notification's `kind`, else the branch of its `payload` union.
fn event_type(schema: &Schema, v: &Value) -> Option<String> {
    if let Value::Record(fields) = v {
        if let Some((_, Value::String(k))) = fields.iter().find(|(n, _)| n == "kind") {
            return Some(k.clone());
        }
    }
    union_branch_name(schema, v, "payload").map(str::to_string)
}

impl Processor for Exporter {
    type Due = ();

    async fn process(&mut self, m: &BorrowedMessage<'_>) -> Result<(), StageError> {
        self.take(m).await
    }

    fn due(&mut self) -> impl std::future::Future<Output = ()> + Send {
        std::future::pending()
    }

    async fn on_due(&mut self, (): ()) -> Result<(), StageError> {
        Ok(())
    }

    async fn finish(mut self, ended: Result<(), StageError>) -> Result<(), StageError> {
        match self.out.take() {
            Some(Out::Jsonl(mut w)) => w.flush().map_err(io)?,
            Some(Out::Avro(w)) => {
                w.into_inner().map_err(io)?.flush().map_err(io)?;
            }
            None => {}
        }
        ended
    }
}
