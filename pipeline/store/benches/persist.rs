//! Persistence throughput: rows/s of `Store::write_batch` into PostgreSQL beside a raw `\copy` of
//! the same rows through `psql`, on the same server in the same run, so the ratio says how much the
//! staging + de-duplicating insert + offsets cost over the fastest bulk load PostgreSQL offers.
//! Then the same batches into a fresh SQLite file (the embedded default), timed the same way.
//! Prints one JSON line. Env: BENCH_ROWS (default 500000), BENCH_BATCH (default 20000).

// The benches' shared `main`, kept beside tidings-core's bench (see its module documentation).
#[path = "../../core/benches/support/mod.rs"]
mod support;

use std::io::Write;
use std::path::Path;
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

use support::{env_usize, BoxError};
use tidings_core::Notification;
use tidings_store::{Batch, OffsetUpdate, Store, StoredNotification};

/// Partitions of the `notifications` topic in topology.yaml; rows are spread over them.
const PARTITIONS: i32 = 12;
const USERS: u64 = 1_000;
const CONSUMER: &str = "tidings-persistence";
const TOPIC: &str = "notifications";
/// Best-of count; raw COPY and tidings alternate so drift (autovacuum, checkpoints) hits both.
const RUNS: usize = 2;
const COLUMNS: &str = "id, user_id, kind, title, body, link, source_event_id, occurred_at, \
                       source_topic, source_partition, source_offset, stream_partition, stream_offset";

/// splitmix64: deterministic, dependency-free variety for the generated rows.
fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Row `i`: an order, coupon or campaign notification like the templating stage emits, with
/// ~30-character titles, ~80-character bodies and a link, for one of 1,000 users.
fn row(i: u64) -> StoredNotification {
    let r = mix(i);
    let user = format!("u{:05}", r % USERS);
    let order = format!("o-{:07}", (r >> 10) % 10_000_000);
    let source_event_id = uuid::Uuid::from_u128(u128::from(mix(r)) << 64 | u128::from(i)).to_string();
    let cents = 500 + (r >> 20) % 50_000;
    let (kind, source_topic, title, body, link) = match (r >> 40) % 4 {
        0 => (
            "order.placed",
            "orders",
            format!("Order {order} placed for you"),
            format!(
                "We received your order of {} item(s) for {}.{:02} EUR. Thank you!",
                1 + (r >> 50) % 5,
                cents / 100,
                cents % 100
            ),
            format!("/orders/{order}"),
        ),
        1 => (
            "order.paid",
            "orders",
            format!("Payment received: {order}"),
            format!("We received {}.{:02} EUR by card for order {order}; it ships soon.", cents / 100, cents % 100),
            format!("/orders/{order}"),
        ),
        2 => (
            "order.shipped",
            "orders",
            format!("Order {order} has shipped"),
            format!("Your order is on its way with DHL. Tracking number: TRK{:010}.", (r >> 8) % 10_000_000_000),
            format!("/orders/{order}"),
        ),
        _ => (
            "coupon.issued",
            "coupons",
            format!("You got a {}% coupon today", 5 + (r >> 50) % 40),
            format!("Use code SAVE{:06} at checkout before it expires next week. Enjoy!", (r >> 12) % 1_000_000),
            format!("/coupons/c-{:07}", (r >> 14) % 10_000_000),
        ),
    };
    let i_signed = i64::try_from(i).unwrap_or(i64::MAX);
    StoredNotification {
        notification: Notification {
            notification_id: Notification::id_for(&source_event_id, &user),
            user_id: user,
            kind: kind.to_string(),
            title,
            body,
            link: Some(link),
            source_event_id,
            occurred_at: 1_700_000_000_000_000 + i_signed * 1_000,
            source_topic: source_topic.to_string(),
            source_partition: (r % 6) as i32,
            source_offset: i_signed / 6,
            data: None,
            inbox: true,
            category: String::new(),
            recipients: vec![],
        },
        stream_partition: (i % PARTITIONS as u64) as i32,
        stream_offset: i_signed / i64::from(PARTITIONS),
    }
}

/// Rows `start..end` as one batch, with the next offset per partition the stage would store.
fn batch(start: u64, end: u64) -> Batch {
    let notifications: Vec<StoredNotification> = (start..end).map(row).collect();
    let mut next = [None::<i64>; PARTITIONS as usize];
    for n in &notifications {
        let slot = &mut next[n.stream_partition as usize];
        *slot = Some(slot.unwrap_or(0).max(n.stream_offset + 1));
    }
    let offsets = next
        .iter()
        .enumerate()
        .filter_map(|(p, o)| {
            o.map(|next_offset| OffsetUpdate { topic: TOPIC.to_string(), partition: p as i32, next_offset })
        })
        .collect();
    Batch { notifications, offsets, ..Batch::default() }
}

/// A CSV field, always quoted (bodies contain commas), with quotes doubled.
fn csv_text(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        if c == '"' {
            out.push('"');
        }
        out.push(c);
    }
    out.push('"');
}

/// Writes rows `0..rows` as CSV in `COLUMNS` order (an unquoted empty field is NULL).
fn write_csv(path: &Path, rows: u64) -> Result<(), BoxError> {
    let mut w = std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?);
    let mut line = String::with_capacity(512);
    for i in 0..rows {
        let s = row(i);
        let n = &s.notification;
        line.clear();
        let at = chrono::DateTime::from_timestamp_micros(n.occurred_at)
            .ok_or("occurred_at out of range")?
            .format("%Y-%m-%d %H:%M:%S%.6f+00");
        line.push_str(&format!("{},", n.notification_id));
        for t in [&n.user_id, &n.kind, &n.title, &n.body] {
            csv_text(&mut line, t);
            line.push(',');
        }
        if let Some(l) = &n.link {
            csv_text(&mut line, l);
        }
        line.push(',');
        csv_text(&mut line, &n.source_event_id);
        line.push_str(&format!(",{at},"));
        csv_text(&mut line, &n.source_topic);
        line.push_str(&format!(
            ",{},{},{},{}\n",
            n.source_partition, n.source_offset, s.stream_partition, s.stream_offset
        ));
        w.write_all(line.as_bytes())?;
    }
    w.flush()?;
    Ok(())
}

async fn exec(store: &Store, sql: &str) -> Result<(), BoxError> {
    match store {
        Store::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop)?,
        Store::Sqlite(pool) => sqlx::raw_sql(sql).execute(pool).await.map(drop)?,
    }
    Ok(())
}

async fn count(store: &Store, table: &str) -> Result<i64, BoxError> {
    let sql = format!("SELECT count(*) FROM {table}");
    Ok(match store {
        Store::Postgres(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await?,
        Store::Sqlite(pool) => sqlx::query_scalar(&sql).fetch_one(pool).await?,
    })
}

/// Every batch through `write_batch` into empty tables; only the writes are timed (row
/// generation is not).
async fn run_tidings(store: &Store, rows: u64, batch_size: u64) -> Result<Duration, BoxError> {
    match store {
        Store::Postgres(_) => exec(store, "TRUNCATE notifications; TRUNCATE sink_offsets; CHECKPOINT").await?,
        Store::Sqlite(_) => exec(store, "DELETE FROM notifications; DELETE FROM sink_offsets").await?,
    }
    let mut spent = Duration::ZERO;
    let mut inserted = 0u64;
    let mut start = 0;
    while start < rows {
        let end = (start + batch_size).min(rows);
        let b = batch(start, end);
        let t = Instant::now();
        inserted += store.write_batch(CONSUMER, &b).await?.notifications_inserted;
        spent += t.elapsed();
        start = end;
    }
    let stored = count(store, "notifications").await?;
    if inserted != rows || stored != rows as i64 {
        return Err(format!("tidings wrote {inserted} rows ({stored} stored), expected {rows}").into());
    }
    Ok(spent)
}

/// `psql … -c "\copy …"` as a subprocess, timed from spawn to exit.
async fn run_psql(store: &Store, url: &str, csv: &Path, rows: u64) -> Result<Duration, BoxError> {
    exec(store, "TRUNCATE notifications_raw; CHECKPOINT").await?;
    let copy = format!("\\copy notifications_raw ({COLUMNS}) FROM '{}' WITH (FORMAT csv)", csv.display());
    let t = Instant::now();
    let out = Command::new("psql").args([url, "-X", "-q", "-v", "ON_ERROR_STOP=1", "-c", &copy]).output()?;
    let spent = t.elapsed();
    if !out.status.success() {
        return Err(format!("psql failed: {}", String::from_utf8_lossy(&out.stderr)).into());
    }
    let stored = count(store, "notifications_raw").await?;
    if stored != rows as i64 {
        return Err(format!("psql copied {stored} rows, expected {rows}").into());
    }
    Ok(spent)
}

async fn bench() -> Result<serde_json::Value, BoxError> {
    let rows = env_usize("BENCH_ROWS", 500_000)? as u64;
    let batch_size = env_usize("BENCH_BATCH", 20_000)? as u64;
    let (store, url) = tidings_store::testing::fresh_postgres().await?;
    let result = async {
        exec(&store, "CREATE TABLE notifications_raw (LIKE notifications INCLUDING ALL)").await?;
        let dir = tempfile::tempdir()?;
        let csv = dir.path().join("notifications.csv");
        write_csv(&csv, rows)?;

        let (mut best_psql, mut best_tidings) = (Duration::MAX, Duration::MAX);
        for _ in 0..RUNS {
            best_psql = best_psql.min(run_psql(&store, &url, &csv, rows).await?);
            best_tidings = best_tidings.min(run_tidings(&store, rows, batch_size).await?);
        }
        let sqlite_dir = tempfile::tempdir()?;
        let sqlite_url = format!("sqlite://{}", sqlite_dir.path().join("bench.db").display());
        let sqlite = Store::connect(&sqlite_url).await?;
        let sqlite_spent = run_tidings(&sqlite, rows, batch_size).await?;
        let per_s = |d: Duration| rows as f64 / d.as_secs_f64();
        let (tidings, psql) = (per_s(best_tidings), per_s(best_psql));
        Ok::<_, BoxError>(serde_json::json!({
            "bench": "persistence",
            "rows": rows,
            "batch": batch_size,
            "tidings_rows_per_s": tidings.round(),
            "psql_copy_rows_per_s": psql.round(),
            "ratio": (tidings / psql * 1000.0).round() / 1000.0,
            "backend": store.backend(),
            "runs": RUNS,
            "sqlite_rows_per_s": per_s(sqlite_spent).round(),
        }))
    }
    .await;
    let dropped = tidings_store::testing::drop_postgres(store, &url).await;
    let json = result?;
    dropped?;
    Ok(json)
}

fn main() -> ExitCode {
    let runtime = tokio::runtime::Builder::new_multi_thread();
    support::main("persist", include_str!("persist.rs"), runtime, bench)
}
