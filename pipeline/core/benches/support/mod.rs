//! The `main` every benchmark binary shares (`harness = false` benches of tidings-core, tidings-store,
//! tidings-pipeline and tidings): its arguments, its environment settings, one JSON line, the exit status.
//!
//! Included with `#[path]` by each bench rather than exported by a library: it is bench-only code,
//! it would otherwise sit in tidings-core's public API (every crate's benches reach core, and core's
//! own bench can reach nothing above it), and it needs nothing but std, tokio and serde_json.

use std::future::Future;
use std::process::ExitCode;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Runs one benchmark: `name` is its bench target (`--bench <name>`); `source` the bench's own
/// file (`include_str!`), whose leading `//!` lines are its `--help`; `runtime` the tokio runtime
/// it runs on; `bench` prints nothing on stdout and returns the one JSON line (`cargo bench`
/// output and diagnostics go to stderr, so `.ci/bench` reads stdout). Exit status 0 with the line, 1 if the bench failed, 2 for an unknown argument.
///
/// Arguments, as `cargo bench -p <crate> --bench <name> -- <args>` passes them: `--bench` (cargo
/// adds it) is accepted; `-h`/`--help` prints the help; other words are name filters, as for
/// libtest benches: with any given, the bench runs only if its name contains one of them.
pub fn main<F, Fut>(name: &str, source: &str, mut runtime: tokio::runtime::Builder, bench: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: Future<Output = Result<serde_json::Value, BoxError>>,
{
    let mut filters = Vec::new();
    for arg in std::env::args().skip(1) {
        match arg.as_str() {
            "--bench" => {}
            "-h" | "--help" => {
                println!("{}", help(name, source));
                return ExitCode::SUCCESS;
            }
            flag if flag.starts_with('-') => {
                eprintln!("{name} bench: unknown argument {flag:?}\n\n{}", help(name, source));
                return ExitCode::from(2);
            }
            _ => filters.push(arg.clone()),
        }
    }
    if !filters.is_empty() && !filters.iter().any(|f| name.contains(f.as_str())) {
        eprintln!("{name} bench: not selected by {filters:?}; nothing run");
        return ExitCode::SUCCESS;
    }
    let rt = match runtime.enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("{name} bench: tokio runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(bench()) {
        Ok(json) => {
            println!("{json}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{name} bench failed: {e}");
            ExitCode::FAILURE
        }
    }
}

/// A positive integer setting from the environment (0 counts as 1), or `default` when unset; a
/// value that does not parse is an error naming it, not a silent default.
pub fn env_usize(name: &str, default: usize) -> Result<usize, BoxError> {
    match std::env::var(name) {
        Ok(v) => Ok(v.parse::<usize>().map_err(|e| format!("{name}={v:?}: {e}"))?.max(1)),
        Err(_) => Ok(default),
    }
}

/// The bench's module documentation (its leading `//!` lines) and how to run it.
fn help(name: &str, source: &str) -> String {
    let doc: Vec<&str> =
        source.lines().map_while(|l| l.strip_prefix("//!")).map(|l| l.strip_prefix(' ').unwrap_or(l)).collect();
    format!(
        "{}\n\nUsage: cargo bench -p <crate> --bench {name} [-- [-h|--help] [FILTER...]]\n\
         Settings are environment variables; stdout carries one JSON line.",
        doc.join("\n")
    )
}
