//! `tidings up`'s settings, checked before anything starts: every refusal is reported at once and
//! `up` exits with EX_USAGE (64) before it creates a topic, registers a schema, writes a file or
//! binds a port. Also the strength rules for the secrets it is given.

use tidings_core::kafka::KafkaConfig;
use tidings_core::RegistryEndpoint;
use tidings_gateway::auth::{AuthConfig, Key, DEV_SECRET};
use tidings_gateway::browser::BrowserAccess;
use tidings_gateway::delivery::owners::RedirectAllow;
use tidings_gateway::service_auth::{ServiceTokens, DEV_SERVICE_TOKEN};
use tidings_pipeline::topology::Topology;

use crate::up::{load_topology, UpArgs};

/// sysexits.h's EX_USAGE: the command was used incorrectly (a setting is refused).
pub const EX_USAGE: u8 = 64;

/// Shortest HS256 secret accepted: RFC 7518 §3.2 asks for a key as long as the hash (256 bits).
pub const MIN_HS256_SECRET_BYTES: usize = 32;

/// Shortest write token accepted for the embedded registry (a generated one has 64 characters).
pub const MIN_REGISTRY_WRITE_TOKEN_LEN: usize = 32;

/// The stages `up` knows.
pub const STAGES: [&str; 6] = ["templating", "persistence", "gateway", "ingest", "claims", "scheduler"];

/// Refuses an HS256 secret anyone could know or guess: an empty one (an unset variable of a
/// deployment template) always; the public dev secret and short ones unless `dev`.
pub fn check_hs256_secret(secret: &str, dev: bool) -> Result<(), String> {
    if secret.is_empty() {
        return Err("is empty: an HS256 key anyone can sign with (an unset variable?)".into());
    }
    if dev {
        return Ok(());
    }
    if secret == DEV_SECRET {
        return Err(format!(
            "is the public dev secret {DEV_SECRET:?}: anyone can mint tokens with it (only with --dev)"
        ));
    }
    if secret.len() < MIN_HS256_SECRET_BYTES {
        return Err(format!(
            "is {} bytes; an HS256 secret needs at least {MIN_HS256_SECRET_BYTES} (e.g. `openssl rand -base64 48`)",
            secret.len()
        ));
    }
    Ok(())
}

/// Refuses a stream-credential secret short enough to guess (it signs every browser's stream
/// session on every gateway). Checked here with every other setting; `auth_config` relies on it.
pub fn check_stream_secret(secret: &str) -> Result<(), String> {
    match secret.len() < MIN_HS256_SECRET_BYTES {
        true => Err(format!("needs at least {MIN_HS256_SECRET_BYTES} characters")),
        false => Ok(()),
    }
}

/// Refuses a registry write token that is empty (basic auth with an empty password would match
/// it) or short enough to guess.
pub fn check_registry_write_token(token: &str) -> Result<(), String> {
    if token.is_empty() {
        return Err("is empty: it would let anyone write (unset it to have one generated)".into());
    }
    if token.len() < MIN_REGISTRY_WRITE_TOKEN_LEN {
        return Err(format!(
            "is {} characters; it needs at least {MIN_REGISTRY_WRITE_TOKEN_LEN} (e.g. `openssl rand -hex 32`)",
            token.len()
        ));
    }
    Ok(())
}

/// Refuses a URL other processes or browsers are sent to unless it is http(s) with a host.
pub fn check_http_url(url: &str) -> Result<(), String> {
    match reqwest::Url::parse(url) {
        Ok(u) if matches!(u.scheme(), "http" | "https") && u.host_str().is_some_and(|h| !h.is_empty()) => Ok(()),
        Ok(u) => Err(format!("{url:?} is not an http(s) URL with a host (scheme {:?})", u.scheme())),
        Err(e) => Err(format!("{url:?} is not a URL: {e}")),
    }
}

/// What `up` runs with, once every setting was accepted.
pub struct Settings {
    pub topology: Topology,
    pub database_url: String,
    /// The broker-independent Kafka settings; `brokers` is filled in when known.
    pub kafka: KafkaConfig,
    /// The external registry (`--schema-registry-url`); `None` serves the embedded one.
    pub external_registry: Option<RegistryEndpoint>,
    /// The operator's write token for the embedded registry; `None` has one generated.
    pub registry_write_token: Option<String>,
    /// The user-token keys: always when the gateway runs; for ingest alone only when set.
    pub auth: Option<AuthConfig>,
    pub ingest_tokens: ServiceTokens,
    pub redirect_allow: RedirectAllow,
    pub cors_allow: RedirectAllow,
}

/// Checks every setting `up` can check without side effects; all refusals at once, each naming
/// its setting.
pub fn check(args: &UpArgs) -> Result<Settings, Vec<String>> {
    // The config file's refusals (unknown keys, values of the wrong type) come first.
    let mut errors = args.config_file.errors.clone();
    let mut ok = |r: Result<(), String>, setting: &str| {
        if let Err(e) = r {
            errors.push(format!("{setting}: {e}"));
        }
    };

    let unknown: Vec<&str> = args.stages.iter().map(String::as_str).filter(|s| !STAGES.contains(s)).collect();
    ok(
        if unknown.is_empty() {
            Ok(())
        } else {
            Err(format!(
                "unknown stage(s) {unknown:?} (expected templating, persistence, gateway, ingest, claims or scheduler)"
            ))
        },
        "--stages (TIDINGS_STAGES)",
    );
    let runs = |name: &str| args.stages.iter().any(|s| s == name);

    // User-token keys: each one's strength, then the set the gateway needs.
    let mut keys_ok = true;
    if let Some(secret) = &args.jwt.jwt_secret {
        let r = check_hs256_secret(secret, args.dev);
        keys_ok &= r.is_ok();
        ok(r, "--jwt-secret (TIDINGS_JWT_SECRET)");
    }
    if let Some(path) = &args.jwt.jwt_public_key_file {
        let r = std::fs::read(path)
            .map_err(|e| format!("cannot read {}: {e}", path.display()))
            .and_then(|pem| Key::from_public_pem(&pem).map(drop).map_err(|e| format!("{}: {e}", path.display())));
        keys_ok &= r.is_ok();
        ok(r, "--jwt-public-key-file (TIDINGS_JWT_PUBLIC_KEY_FILE)");
    }
    if let Some(secret) = &args.jwt.stream_secret {
        let r = check_stream_secret(secret);
        keys_ok &= r.is_ok();
        ok(r, "--stream-secret (TIDINGS_STREAM_SECRET)");
    }
    let needs_keys = runs("gateway") || runs("ingest");
    let auth = match (keys_ok && needs_keys).then(|| args.jwt.auth_config(args.dev)) {
        Some(Ok(auth)) => Some(auth),
        Some(Err(e)) if runs("gateway") => {
            ok(Err(format!("{e:#}")), "user-token keys");
            None
        }
        // Ingest alone uses keys only to tell a user token from an unknown one.
        Some(Err(_)) | None => None,
    };

    let mut tokens: Vec<&str> = args.ingest_tokens.iter().map(String::as_str).collect();
    if args.dev {
        tokens.push(DEV_SERVICE_TOKEN);
    }
    let ingest_tokens = ServiceTokens::new(tokens).unwrap_or_else(|e| {
        ok(Err(e), "--ingest-token (TIDINGS_INGEST_TOKENS)");
        ServiceTokens::default()
    });

    if let Some(token) = &args.registry_write_token {
        ok(check_registry_write_token(token), "--registry-write-token (TIDINGS_REGISTRY_WRITE_TOKEN)");
    }
    for host in &args.registry_allow_hosts {
        ok(BrowserAccess::check_domain(host.trim()), "--registry-allow-host (TIDINGS_REGISTRY_ALLOW_HOSTS)");
    }
    let external_registry = match &args.infra.schema_registry_url {
        Some(url) => match check_http_url(url) {
            Ok(()) => args.infra.registry(url.clone()).map_err(|e| ok(Err(format!("{e:#}")), "schema registry")).ok(),
            Err(e) => {
                ok(Err(e), "--schema-registry-url (TIDINGS_SCHEMA_REGISTRY_URL)");
                None
            }
        },
        None => None,
    };

    let redirect_allow = RedirectAllow::new(args.sse.redirect_allow.iter().map(String::as_str)).unwrap_or_else(|e| {
        ok(Err(e), "--redirect-allow (TIDINGS_REDIRECT_ALLOW)");
        RedirectAllow::default()
    });
    let cors_allow = RedirectAllow::new(args.sse.cors_allow_origins.iter().map(String::as_str)).unwrap_or_else(|e| {
        ok(Err(e), "--cors-allow-origin (TIDINGS_CORS_ALLOW_ORIGINS)");
        RedirectAllow::default()
    });
    if let Some(url) = &args.sse.advertise_url {
        ok(check_http_url(url), "--advertise-url (TIDINGS_ADVERTISE_URL)");
    }
    if let Some(d) = &args.sse.cookie_domain {
        ok(BrowserAccess::check_domain(d), "--cookie-domain (TIDINGS_COOKIE_DOMAIN)");
    }
    if let Some(url) = args.otlp_endpoint.as_deref().filter(|u| !u.trim().is_empty()) {
        ok(check_http_url(url.trim()), "--otlp-endpoint (OTEL_EXPORTER_OTLP_ENDPOINT)");
    }

    let database_url = args
        .infra
        .database_url
        .clone()
        .unwrap_or_else(|| format!("sqlite://{}/tidings.db", args.infra.data_dir.display()));
    let known_scheme = ["sqlite:", "postgres://", "postgresql://"].iter().any(|s| database_url.starts_with(s));
    ok(
        if known_scheme { Ok(()) } else { Err("must start with sqlite:, postgres:// or postgresql://".into()) },
        "--database-url (TIDINGS_DATABASE_URL)",
    );

    if let Some(path) = &args.infra.kafka_ssl_ca_location {
        // librdkafka would fail on it only when the first client is created, after the data
        // directory and the embedded registry's listener.
        let r = std::fs::File::open(path).map(drop).map_err(|e| format!("cannot read {}: {e}", path.display()));
        ok(r, "--kafka-ssl-ca-location (TIDINGS_KAFKA_SSL_CA_LOCATION)");
    }
    let kafka = args.infra.kafka(String::new()).map_err(|e| ok(Err(format!("{e:#}")), "Kafka settings")).ok();

    let topology = match load_topology(&args.infra) {
        Ok(t) => Some(t),
        Err(e) => {
            ok(Err(format!("{e:#}")), "--topology (TIDINGS_TOPOLOGY)");
            None
        }
    };
    if let (Some(topo), true) = (&topology, runs("gateway")) {
        if !topo.topics.contains_key(&args.sse.owners_topic) {
            ok(
                Err(format!(
                    "{:?} is not declared in {}; add it (1 partition, cleanup_policy: compact)",
                    args.sse.owners_topic,
                    args.infra.topology.display()
                )),
                "--owners-topic (TIDINGS_OWNERS_TOPIC)",
            );
        }
    }

    if let (Some(topo), true) = (&topology, runs("claims")) {
        use tidings_pipeline::stages::claims::{INPUT, OUTPUT};
        let dead_letter = topo.stages.claims.dead_letter.as_str();
        for (topic, schema) in [(INPUT, true), (OUTPUT, true), (dead_letter, false)] {
            let missing = match schema {
                true => topo.schema_text(topic).is_none(),
                false => !topo.topics.contains_key(topic),
            };
            if missing {
                let what = if schema { "topic with a schema" } else { "topic" };
                ok(
                    Err(format!(
                        "the claim stage needs the {what} {topic:?} in {} (or leave claims out of --stages)",
                        args.infra.topology.display()
                    )),
                    "--stages (TIDINGS_STAGES)",
                );
            }
        }
    }

    if let (Some(topo), true) = (&topology, runs("scheduler")) {
        let stage = &topo.stages.scheduler;
        for topic in [&stage.input, &stage.dead_letter] {
            if !topo.topics.contains_key(topic) {
                ok(
                    Err(format!(
                        "the scheduler needs the topic {topic:?} in {} (or leave scheduler out of --stages)",
                        args.infra.topology.display()
                    )),
                    "--stages (TIDINGS_STAGES)",
                );
            }
        }
    }
    if let (Some(path), false) = (&args.clock_file, args.dev) {
        ok(
            Err(format!(
                "{} would replace the scheduler's clock: only for tests, with --dev (TIDINGS_DEV)",
                path.display()
            )),
            "--clock-file (TIDINGS_CLOCK_FILE)",
        );
    }

    match (topology, kafka) {
        (Some(topology), Some(kafka)) if errors.is_empty() => Ok(Settings {
            topology,
            database_url,
            kafka,
            external_registry,
            registry_write_token: args.registry_write_token.clone(),
            auth,
            ingest_tokens,
            redirect_allow,
            cors_allow,
        }),
        _ => Err(errors),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hs256_secrets_need_32_bytes_and_not_the_dev_secret_outside_dev() {
        let long = "k".repeat(MIN_HS256_SECRET_BYTES);
        assert_eq!(check_hs256_secret(&long, false), Ok(()));
        let short = check_hs256_secret(&long[1..], false).unwrap_err();
        assert!(short.contains("31 bytes") && short.contains("32"), "{short}");
        assert!(check_hs256_secret(DEV_SECRET, false).unwrap_err().contains("dev secret"));
        assert!(check_hs256_secret("", false).unwrap_err().contains("empty"));
        // --dev accepts the dev secret and short ones, never an empty one.
        assert_eq!(check_hs256_secret(DEV_SECRET, true), Ok(()));
        assert_eq!(check_hs256_secret("short", true), Ok(()));
        assert!(check_hs256_secret("", true).is_err());
    }

    #[test]
    fn registry_write_tokens_need_32_characters() {
        assert_eq!(check_registry_write_token(&"t".repeat(MIN_REGISTRY_WRITE_TOKEN_LEN)), Ok(()));
        assert!(check_registry_write_token("").unwrap_err().contains("empty"));
        let short = check_registry_write_token("0123456789abcdef").unwrap_err();
        assert!(short.contains("16 characters"), "{short}");
    }

    /// Files that must be readable and URLs that must be http(s) are refused before anything
    /// starts, together.
    #[test]
    fn unreadable_files_and_bad_urls_are_refused_together() {
        let topology = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
        let argv: Vec<std::ffi::OsString> = [
            "tidings",
            "up",
            "--dev",
            "--topology",
            topology.to_str().unwrap(),
            "--kafka-ssl-ca-location",
            "/nonexistent/ca.pem",
            "--advertise-url",
            "gw-1.example.com:8080",
            "--schema-registry-url",
            "ftp://registry.example.com",
            "--otlp-endpoint",
            "collector:4318",
        ]
        .map(Into::into)
        .into();
        let (crate::Cli { command: crate::Command::Up(args) }, _) = crate::config_file::parse_from::<crate::Cli>(argv)
        else {
            unreachable!("parsed `up`")
        };
        let errors = check(&args).err().expect("refused").join("\n");
        for named in ["--kafka-ssl-ca-location", "--advertise-url", "--schema-registry-url", "--otlp-endpoint"] {
            assert!(errors.contains(named), "{named} not reported:\n{errors}");
        }
        assert_eq!(check_http_url("https://gw-1.example.com"), Ok(()));
        assert_eq!(check_http_url("http://10.0.0.5:8080/"), Ok(()));
        assert!(check_http_url("https://").is_err());
    }

    /// `--stages claims` is refused, naming the topics, by a topology without the claim stage's
    /// topics; the same topology is accepted without it.
    #[test]
    fn the_claim_stage_needs_its_topics() {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(root.join("schemas"), dir.path().join("schemas")).unwrap();
        let yaml = std::fs::read_to_string(root.join("topology.yaml")).unwrap();
        // A topology from before the claim stage: neither its topics nor its `stages.claims`.
        // `stages.claims` ends at the next top-level line (a key or comment at column 0).
        let start = yaml.find("\n  claims:\n").expect("stages.claims");
        let end = yaml[start + 1..]
            .match_indices('\n')
            .map(|(i, _)| start + 1 + i)
            .find(|&i| yaml[i + 1..].starts_with(|c: char| c == '#' || c.is_ascii_alphabetic()))
            .expect("a section after stages");
        let yaml = format!("{}{}", &yaml[..start], &yaml[end..]);
        let without: String = yaml
            .lines()
            .filter(|l| !l.contains("coupon-claims:") && !l.contains("tidings.dlq.claims:"))
            .map(|l| format!("{l}\n"))
            .collect();
        let topology = dir.path().join("topology.yaml");
        std::fs::write(&topology, without).unwrap();
        let check_with = |stages: &str| {
            let argv: Vec<std::ffi::OsString> =
                ["tidings", "up", "--dev", "--topology", topology.to_str().unwrap(), "--stages", stages]
                    .map(Into::into)
                    .into();
            let (crate::Cli { command: crate::Command::Up(args) }, _) =
                crate::config_file::parse_from::<crate::Cli>(argv)
            else {
                unreachable!("parsed `up`")
            };
            check(&args).err().map(|e| e.join("\n"))
        };
        let errors = check_with("templating,claims").expect("refused");
        assert!(errors.contains("\"coupon-claims\"") && errors.contains("\"tidings.dlq.claims\""), "{errors}");
        assert!(!errors.contains("\"coupons\""), "{errors}");
        assert_eq!(check_with("templating"), None);
    }

    /// `--clock-file` replaces the scheduler's clock: refused without --dev, naming itself.
    #[test]
    fn a_clock_file_needs_dev() {
        let topology = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../topology.yaml");
        let check_with = |dev: bool| {
            let mut argv = vec!["tidings", "up", "--topology", topology.to_str().unwrap(), "--clock-file", "/tmp/now"];
            argv.extend(["--stages", "scheduler"]);
            if dev {
                argv.push("--dev");
            }
            let argv: Vec<std::ffi::OsString> = argv.into_iter().map(Into::into).collect();
            let (crate::Cli { command: crate::Command::Up(args) }, _) =
                crate::config_file::parse_from::<crate::Cli>(argv)
            else {
                unreachable!("parsed `up`")
            };
            check(&args).err().map(|e| e.join("\n"))
        };
        let errors = check_with(false).expect("refused without --dev");
        assert!(errors.contains("--clock-file (TIDINGS_CLOCK_FILE)") && errors.contains("--dev"), "{errors}");
        assert_eq!(check_with(true), None);
    }
}
