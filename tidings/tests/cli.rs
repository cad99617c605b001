//! The `tidings` command line without infrastructure: help, and `topology check` reporting every
//! error of a broken file at once with its location, and a usage exit code.

use std::process::Command;

fn tidings(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_tidings")).args(args).output().expect("run tidings")
}

fn repo() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

#[test]
fn help_names_every_subcommand() {
    let out = tidings(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["up", "topology", "produce", "demo", "inbox", "stats", "segment"] {
        assert!(text.contains(cmd), "--help lacks {cmd}:\n{text}");
    }
}

#[test]
fn topology_check_accepts_the_project_file() {
    let path = repo().join("topology.yaml");
    let out = tidings(&["topology", "check", "--topology", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("OK"));
}

#[test]
fn topology_check_reports_all_errors_with_locations() {
    let good = std::fs::read_to_string(repo().join("topology.yaml")).unwrap();
    // Three independent mistakes in different places of the file.
    let bad = good
        .replacen("partitions: 6", "partitions: 0", 1)
        .replacen("output: notifications", "output: notificationz", 1)
        .replacen("event: OrderShipped", "event: OrderTeleported", 1);
    assert_ne!(bad, good);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("schemas")).unwrap();
    for f in std::fs::read_dir(repo().join("schemas")).unwrap() {
        let f = f.unwrap();
        std::fs::copy(f.path(), dir.path().join("schemas").join(f.file_name())).unwrap();
    }
    let path = dir.path().join("topology.yaml");
    std::fs::write(&path, bad).unwrap();
    let out = tidings(&["topology", "check", "--topology", path.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(2), "invalid topology exits with the usage code");
    let err = String::from_utf8_lossy(&out.stderr);
    for needle in ["partitions", "notificationz", "OrderTeleported"] {
        assert!(err.contains(needle), "missing the {needle} error in:\n{err}");
    }
    // Every diagnostic names the file and a line.
    let lines: Vec<&str> = err.lines().filter(|l| l.contains("topology.yaml:")).collect();
    assert!(lines.len() >= 3, "expected located diagnostics:\n{err}");
}
