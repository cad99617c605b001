//! Helpers for tests in every crate: the broker under test, and a test CA and a server certificate
//! for 127.0.0.1/localhost made with the `openssl` command (Debian's, on every machine that builds
//! tidings).

use std::path::{Path, PathBuf};
use std::process::Command;

/// The broker under test (`TIDINGS_TEST_BROKERS`), or `None` (after saying so) when the test should
/// be skipped. Under CI a missing broker is an error, so the suite cannot pass by skipping everything.
pub fn brokers_or_skip() -> Option<String> {
    match std::env::var("TIDINGS_TEST_BROKERS") {
        Ok(b) if !b.trim().is_empty() => Some(b.trim().to_string()),
        _ => {
            if std::env::var_os("CI").is_some() {
                panic!(
                    "TIDINGS_TEST_BROKERS is not set but CI is: start a broker (compose/start-kafka.sh) and export it"
                );
            }
            eprintln!("skipped: TIDINGS_TEST_BROKERS not set");
            None
        }
    }
}

/// PEM files in the directory given to [`certificates`].
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    /// The server key, unencrypted PKCS#8 (what Kafka's PEM keystore and native-tls take).
    pub key_pkcs8: PathBuf,
}

/// A new CA named `name` and a server certificate it signed for IP 127.0.0.1 and DNS localhost.
/// Panics (with openssl's output) when a step fails: for tests only.
pub fn certificates(dir: &Path, name: &str) -> TestCerts {
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).current_dir(dir).output().expect("running openssl");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let f = |suffix: &str| format!("{name}-{suffix}");
    let (ca_key, ca, key, csr, cert, pk8, ext) =
        (f("ca.key"), f("ca.pem"), f("server.key"), f("server.csr"), f("server.pem"), f("server.pk8"), f("san.ext"));
    let subject = format!("/CN={name} test CA");
    run(&[
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", &ca_key, "-out", &ca, "-days", "2", "-subj",
        &subject,
    ]);
    run(&["req", "-newkey", "rsa:2048", "-nodes", "-keyout", &key, "-out", &csr, "-subj", "/CN=localhost"]);
    std::fs::write(dir.join(&ext), "subjectAltName=IP:127.0.0.1,DNS:localhost\n").expect("writing the SAN file");
    run(&[
        "x509",
        "-req",
        "-in",
        &csr,
        "-CA",
        &ca,
        "-CAkey",
        &ca_key,
        "-CAcreateserial",
        "-out",
        &cert,
        "-days",
        "2",
        "-extfile",
        &ext,
    ]);
    run(&["pkcs8", "-topk8", "-nocrypt", "-in", &key, "-out", &pk8]);
    TestCerts { ca: dir.join(ca), cert: dir.join(cert), key_pkcs8: dir.join(pk8) }
}
