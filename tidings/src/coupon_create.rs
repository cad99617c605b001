//! `tidings coupon create`: defines a coupon by producing its CouponDefined record straight to
//! `coupon-claims`, checked exactly as `POST /v1/coupons` checks a definition (the gateway's own
//! checks and record builder); every bad flag is reported at once, exit 64.

use anyhow::Context;
use clap::Args;
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde_json::{json, Map, Value};
use std::process::ExitCode;
use std::time::Duration;
use tidings_core::json_avro::json_to_avro;
use tidings_core::{FramedEncoder, RegistryClient};
use tidings_gateway::coupons::records;
use tidings_pipeline::stages::claims::INPUT;

use crate::settings::EX_USAGE;
use crate::tools::{brokers, registry_url, topology_with_running_prefix};
use crate::Infra;

/// A coupon definition from flags. Numbers are taken as text so that every bad value is
/// reported by the same checks as the API's, all at once.
#[derive(Args, Debug)]
pub struct CreateArgs {
    /// Coupon id: 1 to 128 characters of A-Z, a-z, 0-9, '.', '_', '-'.
    #[arg(long)]
    pub id: String,
    /// What the claimant sees.
    #[arg(long)]
    pub title: String,
    /// Discount, 1 to 100.
    #[arg(long)]
    pub discount_percent: String,
    /// How many coupons are issued at most, 1 to 10,000,000.
    #[arg(long)]
    pub stock: String,
    /// When claiming opens (RFC 3339). Default: now.
    #[arg(long)]
    pub opens_at: Option<String>,
    /// When claiming closes (RFC 3339), after it opens.
    #[arg(long)]
    pub closes_at: String,
    /// How long an issued coupon stays valid, in seconds.
    #[arg(long)]
    pub valid_for_secs: String,
    #[command(flatten)]
    pub infra: Infra,
}

/// A number when the text is one (else the text, which the checks then name).
fn number(s: &str) -> Value {
    s.trim().parse::<i64>().map_or_else(|_| Value::String(s.to_string()), Value::from)
}

/// The `POST /v1/coupons` body the flags say.
fn body(a: &CreateArgs) -> Value {
    let mut m = Map::new();
    m.insert("id".into(), json!(a.id));
    m.insert("title".into(), json!(a.title));
    m.insert("discount_percent".into(), number(&a.discount_percent));
    m.insert("stock".into(), number(&a.stock));
    if let Some(o) = &a.opens_at {
        m.insert("claim_opens_at".into(), json!(o));
    }
    m.insert("claim_closes_at".into(), json!(a.closes_at));
    m.insert("valid_for_secs".into(), number(&a.valid_for_secs));
    Value::Object(m)
}

/// The flag of a body field.
fn flag(field: &str) -> String {
    match field {
        "claim_opens_at" => "--opens-at".into(),
        "claim_closes_at" => "--closes-at".into(),
        other => format!("--{}", other.replace('_', "-")),
    }
}

pub async fn run(args: &CreateArgs) -> anyhow::Result<ExitCode> {
    let now = chrono::Utc::now().timestamp_micros();
    let coupon = match records::new_coupon(&body(args), now) {
        Ok(c) => c,
        Err(errors) => {
            eprintln!("error: `tidings coupon create` refuses {} flag(s); nothing was produced:", errors.len());
            for e in errors {
                eprintln!("  - {}: {}", flag(&e.field), e.message);
            }
            return Ok(ExitCode::from(EX_USAGE));
        }
    };
    let infra = &args.infra;
    let topo = topology_with_running_prefix(infra)?;
    anyhow::ensure!(
        topo.topics.contains_key(INPUT),
        "the topology {} declares no {INPUT} topic, which the claim stage reads",
        infra.topology.display()
    );
    let topic = topo.topic_name(INPUT);
    let registry = RegistryClient::new(infra.registry(registry_url(infra)?)?)?;
    let (id, schema) =
        registry.latest(&format!("{topic}-value")).await.with_context(|| format!("the schema of {topic}"))?;
    let payload = FramedEncoder::new(id, schema)?.encode(json_to_avro(schema, &coupon.record(now))?)?;
    let producer: FutureProducer = infra.kafka(brokers(infra)?)?.producer().create()?;
    let rec: FutureRecord<'_, str, [u8]> = FutureRecord::to(&topic).key(coupon.id.as_str()).payload(payload.as_slice());
    let delivery = producer.send(rec, Duration::from_secs(10)).await.map_err(|(e, _)| anyhow::anyhow!("{e}"))?;
    println!(
        "coupon {} defined on {topic} (partition {}, offset {}); the claim stage takes it unless another \
         definition holds the id (the same one again is a retry).",
        coupon.id, delivery.partition, delivery.offset
    );
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> CreateArgs {
        crate::tools::parse_flags(args)
    }

    #[test]
    fn flags_become_the_apis_body_and_bad_ones_are_named_by_flag() {
        let good = parse(&[
            "--id",
            "drop-1",
            "--title",
            "Drop",
            "--discount-percent",
            "15",
            "--stock",
            "10",
            "--closes-at",
            "2099-01-01T00:00:00Z",
            "--valid-for-secs",
            "60",
        ]);
        let c = records::new_coupon(&body(&good), 0).unwrap();
        assert_eq!((c.id.as_str(), c.discount_percent, c.stock, c.valid_for_secs), ("drop-1", 15, 10, 60));
        let bad = parse(&[
            "--id",
            "drop 1",
            "--title",
            "Drop",
            "--discount-percent",
            "lots",
            "--stock",
            "10",
            "--opens-at",
            "2099-02-01T00:00:00Z",
            "--closes-at",
            "2099-01-01T00:00:00Z",
            "--valid-for-secs",
            "0",
        ]);
        let flags: Vec<String> =
            records::new_coupon(&body(&bad), 0).unwrap_err().iter().map(|e| flag(&e.field)).collect();
        assert_eq!(flags, ["--id", "--discount-percent", "--valid-for-secs", "--closes-at"]);
    }
}
