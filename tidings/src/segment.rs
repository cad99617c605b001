//! `tidings segment import|append|remove|list|show|delete`: audience segments from CSV files, streamed
//! into the store in bounded batches (a file of any size is never held), with a progress bar on a
//! terminal and plain progress lines otherwise.

use anyhow::Context;
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};
use tidings_store::segments::{self, Column, CsvRules, OnError, Progress, SegmentChange, SegmentError};
use tidings_store::Store;

use crate::endpoints::database_url;
use crate::Infra;

/// Exit code of an import refused for its data (bad rows, no id column): EX_DATAERR.
const EXIT_BAD_DATA: u8 = 65;

#[derive(Subcommand)]
pub enum SegmentCmd {
    /// Replace a segment's members with the user ids of a CSV file, atomically: a campaign reading the
    /// segment sees all of the old members or all of the new ones. Exit 65 if the file is refused.
    Import {
        /// Segment name (A-Z a-z 0-9 . _ : -), as a campaign's `SegmentAudience.segment` names it.
        name: String,
        /// The CSV file (`-`: standard input).
        file: PathBuf,
        #[command(flatten)]
        csv: CsvArgs,
    },
    /// Add the user ids of a CSV file (same format as import) to a segment, creating it if needed.
    Append {
        /// Segment name.
        name: String,
        /// The CSV file (`-` or none: standard input; with --no-header, one user id per line).
        #[arg(default_value = "-")]
        file: PathBuf,
        #[command(flatten)]
        csv: CsvArgs,
    },
    /// Remove the user ids of a CSV file (same format as import) from a segment.
    Remove {
        /// Segment name.
        name: String,
        /// The CSV file (`-` or none: standard input).
        #[arg(default_value = "-")]
        file: PathBuf,
        #[command(flatten)]
        csv: CsvArgs,
    },
    /// List the segments with their sizes.
    List {
        #[command(flatten)]
        infra: Infra,
    },
    /// Show a segment's size and when it last changed.
    Show {
        /// Segment name.
        name: String,
        #[command(flatten)]
        infra: Infra,
    },
    /// Delete a segment.
    Delete {
        /// Segment name.
        name: String,
        /// How long campaigns already reading the segment may still read it, in seconds.
        #[arg(long, env = "TIDINGS_SEGMENT_KEEP_REPLACED_SECS", default_value_t = 3600)]
        keep_replaced_secs: u64,
        #[command(flatten)]
        infra: Infra,
    },
}

/// How a CSV file is read and loaded.
#[derive(Args)]
pub struct CsvArgs {
    /// The user id column: a name in the header row, or a position counted from 1.
    #[arg(long, default_value = "user_id")]
    column: String,
    /// The file has no header row (the column must then be a position).
    #[arg(long)]
    no_header: bool,
    /// Bad rows (wrong column count, empty, too long, NUL, not UTF-8): `refuse` changes nothing and
    /// lists them; `skip` loads the other rows and lists them.
    #[arg(long, value_enum, default_value = "refuse")]
    on_error: OnErrorArg,
    /// Longest user id accepted, in bytes.
    #[arg(long, env = "TIDINGS_SEGMENT_MAX_ID_BYTES", default_value_t = segments::csv::DEFAULT_MAX_ID_BYTES)]
    max_id_bytes: usize,
    /// User ids per batch written to the store: bounds the memory of an import of any size.
    #[arg(long, env = "TIDINGS_SEGMENT_BATCH_ROWS", default_value_t = 50_000)]
    batch_rows: usize,
    /// Bad rows listed at most (all are counted).
    #[arg(long, default_value_t = 100)]
    max_reported_errors: usize,
    /// How long a replaced version stays readable for campaigns already reading it, in seconds.
    #[arg(long, env = "TIDINGS_SEGMENT_KEEP_REPLACED_SECS", default_value_t = 3600)]
    keep_replaced_secs: u64,
    #[command(flatten)]
    infra: Infra,
}

/// `tidings up`'s segment endpoints (`/v1/segments…` on the gateway, service tokens as ingest).
#[derive(Args, Clone, Debug)]
pub struct SegmentApiArgs {
    /// Largest body of `PUT`/`POST /v1/segments/{name}`, in bytes (413 beyond); larger files go
    /// through `tidings segment import`.
    #[arg(long, env = "TIDINGS_SEGMENT_MAX_BODY_BYTES", default_value_t = 16 * 1024 * 1024)]
    pub segment_max_body_bytes: usize,
    /// Longest user id the segment endpoints accept, in bytes.
    #[arg(long, env = "TIDINGS_SEGMENT_MAX_ID_BYTES", default_value_t = segments::csv::DEFAULT_MAX_ID_BYTES)]
    pub segment_max_id_bytes: usize,
    /// How long a replaced or deleted segment version stays readable for campaigns already reading
    /// it, in seconds.
    #[arg(long, env = "TIDINGS_SEGMENT_KEEP_REPLACED_SECS", default_value_t = 3600)]
    pub segment_keep_replaced_secs: u64,
}

impl SegmentApiArgs {
    /// The endpoints' state; `None` (not served) without a service token.
    pub fn state(
        &self,
        store: Store,
        tokens: tidings_gateway::service_auth::ServiceTokens,
        users: Option<std::sync::Arc<tidings_gateway::AuthConfig>>,
    ) -> Option<std::sync::Arc<tidings_gateway::segments::SegmentsState>> {
        if tokens.is_empty() {
            tracing::info!("The segment API is off: no --ingest-token (TIDINGS_INGEST_TOKENS) is set.");
            return None;
        }
        let config = tidings_gateway::segments::SegmentsConfig {
            max_body_bytes: self.segment_max_body_bytes,
            max_id_bytes: self.segment_max_id_bytes,
            keep_replaced: Duration::from_secs(self.segment_keep_replaced_secs),
            ..Default::default()
        };
        Some(std::sync::Arc::new(tidings_gateway::segments::SegmentsState { store, tokens, users, config }))
    }
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum OnErrorArg {
    Refuse,
    Skip,
}

/// `--column`: digits are a position from 1, anything else a header name.
pub fn parse_column(s: &str) -> Result<Column, String> {
    match s.parse::<usize>() {
        Ok(0) => Err("column positions count from 1".into()),
        Ok(n) => Ok(Column::Index(n - 1)),
        Err(_) if s.is_empty() => Err("empty column name".into()),
        Err(_) => Ok(Column::Name(s.to_string())),
    }
}

pub async fn run(cmd: SegmentCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        SegmentCmd::Import { name, file, csv } => load(&name, &file, csv, SegmentChange::Replace).await,
        SegmentCmd::Append { name, file, csv } => load(&name, &file, csv, SegmentChange::Append).await,
        SegmentCmd::Remove { name, file, csv } => load(&name, &file, csv, SegmentChange::Remove).await,
        SegmentCmd::List { infra } => {
            let store = Store::connect(&database_url(&infra)).await?;
            let mut after: Option<String> = None;
            loop {
                let page = store.segments(after.as_deref(), 500).await?;
                for s in &page {
                    println!("{}\t{}\t{}", s.name, s.size, when(s.updated_at));
                }
                match page.last() {
                    Some(last) if page.len() == 500 => after = Some(last.name.clone()),
                    _ => break,
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        SegmentCmd::Show { name, infra } => {
            let store = Store::connect(&database_url(&infra)).await?;
            let s = store.segment(&name).await?.with_context(|| format!("no segment {name:?}"))?;
            println!("segment {}: {} user(s), updated {}", s.name, s.size, when(s.updated_at));
            Ok(ExitCode::SUCCESS)
        }
        SegmentCmd::Delete { name, keep_replaced_secs, infra } => {
            let store = Store::connect(&database_url(&infra)).await?;
            if !store.delete_segment(&name, Duration::from_secs(keep_replaced_secs)).await? {
                anyhow::bail!("no segment {name:?}");
            }
            println!("segment {name}: deleted");
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn when(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros).map(|t| t.to_rfc3339()).unwrap_or_default()
}

async fn load(name: &str, file: &Path, args: CsvArgs, change: SegmentChange) -> anyhow::Result<ExitCode> {
    segments::check_name(name)?;
    let column = parse_column(&args.column).map_err(|e| anyhow::anyhow!("--column: {e}"))?;
    let rules = CsvRules { column, header: !args.no_header, max_id_bytes: args.max_id_bytes };
    let (input, total): (Box<dyn std::io::Read + Send>, Option<u64>) = if file == Path::new("-") {
        (Box::new(std::io::stdin()), None)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
        let len = f.metadata().ok().map(|m| m.len());
        // 1 MiB reads: the CSV reader's own buffer is small.
        (Box::new(std::io::BufReader::with_capacity(1 << 20, f)), len)
    };
    let store = Store::connect(&database_url(&args.infra)).await?;
    let on_error = match args.on_error {
        OnErrorArg::Refuse => OnError::Refuse,
        OnErrorArg::Skip => OnError::Skip,
    };
    let batches = segments::read_in_background(input, rules, args.batch_rows.max(1));
    let mut progress = Reporter::new(name, total);
    let started = Instant::now();
    let keep = Duration::from_secs(args.keep_replaced_secs);
    let result =
        segments::import(&store, name, change, batches, on_error, args.max_reported_errors, keep, |p| progress.show(p))
            .await;
    progress.done();
    let secs = started.elapsed().as_secs_f64();
    match result {
        Ok(done) => {
            for b in &done.bad {
                eprintln!("line {}: {} (skipped)", b.line, b.problem);
            }
            if done.bad_total > done.bad.len() as u64 {
                eprintln!("… {} more bad row(s) skipped", done.bad_total - done.bad.len() as u64);
            }
            let verb = match change {
                SegmentChange::Replace => "replaced with",
                SegmentChange::Append => "added",
                SegmentChange::Remove => "removed",
            };
            println!(
                "segment {name}: {} row(s) read in {secs:.1}s ({:.0} rows/s), {verb} {} user(s), {} skipped; now {} user(s).",
                done.rows + done.bad_total,
                (done.rows + done.bad_total) as f64 / secs.max(1e-9),
                done.changed.changed,
                done.bad_total,
                done.changed.info.size
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(SegmentError::BadRows { total, first }) => {
            for b in &first {
                eprintln!("line {}: {}", b.line, b.problem);
            }
            if total > first.len() as u64 {
                eprintln!("… {} more bad row(s)", total - first.len() as u64);
            }
            eprintln!("segment {name}: {total} bad row(s); nothing changed (--on-error skip loads the other rows).");
            Ok(ExitCode::from(EXIT_BAD_DATA))
        }
        Err(e @ SegmentError::Header(_)) => {
            eprintln!("{}: {e}; nothing changed.", file.display());
            Ok(ExitCode::from(EXIT_BAD_DATA))
        }
        Err(e) => Err(e.into()),
    }
}

/// A progress bar with rate and ETA on a terminal; a plain line every few seconds otherwise.
struct Reporter {
    bar: Option<ProgressBar>,
    name: String,
    total: Option<u64>,
    started: Instant,
    last_line: Instant,
}

/// Seconds between plain progress lines.
const PLAIN_EVERY: Duration = Duration::from_secs(2);

impl Reporter {
    fn new(name: &str, total: Option<u64>) -> Self {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = match total {
                Some(len) => ProgressBar::new(len).with_style(
                    ProgressStyle::with_template("{bar:30} {percent:>3}% {msg} ETA {eta}")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                ),
                None => ProgressBar::new_spinner().with_style(
                    ProgressStyle::with_template("{spinner} {msg}")
                        .unwrap_or_else(|_| ProgressStyle::default_spinner()),
                ),
            };
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        let now = Instant::now();
        Reporter { bar, name: name.to_string(), total, started: now, last_line: now }
    }

    fn show(&mut self, p: Progress) {
        let rate = p.rows as f64 / self.started.elapsed().as_secs_f64().max(1e-9);
        if let Some(bar) = &self.bar {
            bar.set_position(p.bytes);
            bar.set_message(format!("{} rows, {rate:.0} rows/s", p.rows));
            return;
        }
        if self.last_line.elapsed() < PLAIN_EVERY {
            return;
        }
        self.last_line = Instant::now();
        let share = match self.total {
            Some(t) if t > 0 => {
                let done = p.bytes as f64 / t as f64;
                let eta = self.started.elapsed().as_secs_f64() * (1.0 - done) / done.max(1e-9);
                format!(" ({:.0}%, ETA {eta:.0}s)", done * 100.0)
            }
            _ => String::new(),
        };
        eprintln!("segment {}: {} rows read{share}, {rate:.0} rows/s", self.name, p.rows);
    }

    fn done(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn columns_are_names_or_positions_from_one() {
        assert_eq!(parse_column("user_id"), Ok(Column::Name("user_id".into())));
        assert_eq!(parse_column("1"), Ok(Column::Index(0)));
        assert_eq!(parse_column("3"), Ok(Column::Index(2)));
        assert!(parse_column("0").is_err() && parse_column("").is_err());
    }
}
