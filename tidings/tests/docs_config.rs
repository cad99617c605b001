//! docs/configuration.md is generated from the binary's own output: every fenced block after a
//! `<!-- generated: tidings <args> -->` marker must equal what `tidings <args>` prints (the help
//! of each command, the config file example). `TIDINGS_UPDATE_DOCS=1` rewrites the blocks.

use std::path::PathBuf;
use std::process::Command;

const MARKER: &str = "<!-- generated: tidings ";
/// A block's opening fence, with its language (`text` for help, `toml` for the config file).
const FENCE_OPEN: &str = "```";
const FENCE_CLOSE: &str = "```";

fn doc_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/configuration.md")
}

/// The help text as a reader sees it with nothing configured: no `TIDINGS_*` value of the test's
/// environment may show up as `[env: X=value]`, and a fixed width keeps the wrapping the same on
/// every terminal.
fn help(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .env_clear()
        .env("COLUMNS", "100")
        .output()
        .expect("run tidings");
    assert!(out.status.success(), "tidings {} failed: {}", args.join(" "), String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("help is UTF-8").trim_end().to_string()
}

/// One generated block: the marker's arguments and the line range of the block's body.
struct Block {
    args: Vec<String>,
    body: std::ops::Range<usize>,
}

fn blocks(lines: &[&str]) -> Vec<Block> {
    let mut found = Vec::new();
    let mut i = 0;
    while i < lines.len() {
        if let Some(rest) = lines[i].trim().strip_prefix(MARKER) {
            let args: Vec<String> = rest.trim_end_matches("-->").split_whitespace().map(String::from).collect();
            let open = lines.get(i + 1).map(|l| l.trim()).unwrap_or_default();
            assert!(
                open.starts_with(FENCE_OPEN) && open.len() > FENCE_OPEN.len(),
                "line {}: marker not followed by a fence with a language ({FENCE_OPEN}text, {FENCE_OPEN}toml)",
                i + 1
            );
            let start = i + 2;
            let end = (start..lines.len())
                .find(|&j| lines[j].trim() == FENCE_CLOSE)
                .unwrap_or_else(|| panic!("line {}: generated block never closed", i + 1));
            found.push(Block { args, body: start..end });
            i = end;
        }
        i += 1;
    }
    found
}

/// The first line where the two texts differ, shown with a line of each.
fn first_difference(want: &str, have: &str) -> String {
    let (w, h): (Vec<&str>, Vec<&str>) = (want.lines().collect(), have.lines().collect());
    let n = (0..w.len().max(h.len())).find(|&k| w.get(k) != h.get(k)).unwrap_or(0);
    format!(
        "first difference at line {} of the block:\n  docs:   {:?}\n  binary: {:?}",
        n + 1,
        h.get(n).copied().unwrap_or("<end of block>"),
        w.get(n).copied().unwrap_or("<end of output>")
    )
}

#[test]
fn configuration_reference_matches_the_binary_help() {
    let path = doc_path();
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let lines: Vec<&str> = text.lines().collect();
    let found = blocks(&lines);
    let documented: Vec<String> = found.iter().map(|b| b.args.join(" ")).collect();
    assert!(
        documented.iter().any(|d| d == "up --help"),
        "docs/configuration.md has no generated block for `tidings up --help`"
    );
    assert!(
        documented.iter().any(|d| d == "config-example"),
        "docs/configuration.md has no generated block for `tidings config-example` (the config file's keys)"
    );

    let update = std::env::var("TIDINGS_UPDATE_DOCS").is_ok_and(|v| v == "1");
    let mut out: Vec<String> = Vec::with_capacity(lines.len());
    let mut stale = Vec::new();
    let mut next = 0;
    for block in &found {
        out.extend(lines[next..block.body.start].iter().map(|l| l.to_string()));
        let args: Vec<&str> = block.args.iter().map(String::as_str).collect();
        let want = help(&args);
        let have = lines[block.body.clone()].join("\n");
        if want != have {
            stale.push(format!("`tidings {}`: {}", block.args.join(" "), first_difference(&want, &have)));
        }
        out.extend(want.lines().map(String::from));
        next = block.body.end;
    }
    out.extend(lines[next..].iter().map(|l| l.to_string()));

    if stale.is_empty() {
        return;
    }
    if update {
        std::fs::write(&path, out.join("\n") + "\n").unwrap_or_else(|e| panic!("writing {}: {e}", path.display()));
        eprintln!("rewrote {} ({} block(s))", path.display(), stale.len());
        return;
    }
    panic!(
        "docs/configuration.md is out of date with the binary's help:\n{}\n\nRegenerate it with \
         `TIDINGS_UPDATE_DOCS=1 cargo test -p tidings --test docs_config` and commit the result.",
        stale.join("\n")
    );
}
