//! `tidings segment` against SQLite and PostgreSQL: import with a header or `--column`, bad rows
//! refused by line with exit 65 and nothing changed, `--on-error skip`, append from stdin (the old
//! one-id-per-line form), remove, list and show.

use std::io::Write;
use std::process::{Command, Output, Stdio};

fn tidings(url: &str, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_tidings"))
        .args(args)
        .env("TIDINGS_DATABASE_URL", url)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run tidings");
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default().as_bytes()).unwrap();
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(o: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr))
}

fn write(dir: &std::path::Path, name: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, body).unwrap();
    path.to_str().unwrap().to_string()
}

fn check(url: &str) {
    let dir = tempfile::tempdir().unwrap();
    let run = |args: &[&str]| tidings(url, args, None);
    let show = || text(&run(&["segment", "show", "vip"]));

    let good = write(dir.path(), "good.csv", "plan,user_id\na,u1\nb,u2\nc,u3\n");
    let o = run(&["segment", "import", "vip", &good]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(show().contains("segment vip: 3 user(s)"), "{}", show());

    // Bad rows: exit 65, each line named, the segment as it was.
    let bad = write(dir.path(), "bad.csv", "plan,user_id\na,n1\nb,\nc,n2,extra\nd,n3\n");
    let o = run(&["segment", "import", "vip", &bad]);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("line 3: empty user id") && err.contains("line 4: 3 column(s), expected 2"), "{err}");
    assert!(err.contains("nothing changed"), "{err}");
    assert!(show().contains("3 user(s)"), "{}", show());
    let o = run(&["segment", "import", "vip", &good, "--column", "id"]);
    assert_eq!(o.status.code(), Some(65), "{}", text(&o));
    assert!(text(&o).contains("no column \"id\""), "{}", text(&o));

    // Skip mode: the good rows replace the segment, the bad ones are listed.
    let o = run(&["segment", "import", "vip", &bad, "--on-error", "skip"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("line 3: empty user id (skipped)"), "{}", text(&o));
    assert!(show().contains("segment vip: 2 user(s)"), "{}", show());

    // By position, without a header.
    let plain = write(dir.path(), "plain.csv", "x,p1\ny,p2\n");
    let o = run(&["segment", "import", "vip", &plain, "--no-header", "--column", "2"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("replaced with 2 user(s)"), "{}", text(&o));

    // Append from stdin, one id per line (the former `tidings segment NAME` form), then remove.
    let o = tidings(url, &["segment", "append", "vip", "--no-header", "--column", "1"], Some("p2\nq1\nq2\n"));
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("added 2 user(s)") && show().contains("4 user(s)"), "{}", text(&o));
    let gone = write(dir.path(), "gone.csv", "user_id\np1\nq2\nnever\n");
    let o = run(&["segment", "remove", "vip", &gone]);
    assert!(o.status.success() && text(&o).contains("removed 2 user(s)"), "{}", text(&o));
    assert!(show().contains("2 user(s)"), "{}", show());

    let o = tidings(url, &["segment", "append", "other", "-"], Some("user_id\nz\n"));
    assert!(o.status.success(), "{}", text(&o));
    let list = String::from_utf8_lossy(&run(&["segment", "list"]).stdout).to_string();
    let rows: Vec<(&str, &str)> =
        list.lines().map(|l| l.split('\t').collect::<Vec<_>>()).map(|f| (f[0], f[1])).collect();
    assert_eq!(rows, [("other", "1"), ("vip", "2")], "{list}");

    assert!(run(&["segment", "delete", "other"]).status.success());
    let o = run(&["segment", "show", "other"]);
    assert!(!o.status.success() && text(&o).contains("no segment \"other\""), "{}", text(&o));
    let o = run(&["segment", "remove", "nobody", &gone]);
    assert!(!o.status.success() && text(&o).contains("no segment \"nobody\""), "{}", text(&o));
    let o = run(&["segment", "import", "bad name", &good]);
    assert!(!o.status.success() && text(&o).contains("bad segment name"), "{}", text(&o));
}

#[test]
fn segment_commands_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    check(&format!("sqlite://{}/t.db", dir.path().display()));
}

#[tokio::test(flavor = "multi_thread")]
async fn segment_commands_on_postgres() {
    let (_store, url) = tidings_store::testing::fresh_postgres().await.unwrap();
    tokio::task::spawn_blocking(move || check(&url)).await.unwrap();
}
