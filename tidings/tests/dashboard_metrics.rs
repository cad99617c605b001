//! Every metric the Grafana dashboard (`compose/grafana/tidings.json`) and the Prometheus rules
//! (`compose/prometheus/rules.yml`) name is served on `/metrics` by a running tidings (a core
//! process and a gateway on Apache Kafka and PostgreSQL) once an order, a streamed notification and
//! a dead letter have gone through; a `_bucket` name's family is a histogram there, not a summary.

mod common;

use common::{eventually, Tidings, Up};
use rdkafka::producer::{FutureProducer, FutureRecord};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// Series Prometheus makes itself (scrape health), which no process exports.
const MADE_BY_PROMETHEUS: &[&str] = &["up"];

/// Reports every 100 ms, so the lag gauges show within a scrape or two.
const STATS: (&str, &str) = ("TIDINGS_KAFKA_OPTS", "statistics.interval.ms=100");

fn repo_file(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(path)
}

// ---- PromQL: the metric names of an expression ----

/// PromQL words that are not metric names (case-insensitive, as in PromQL): aggregation
/// operators (which may be followed by `by (…)` instead of their argument), set and comparison
/// operators and modifiers, and the number literals.
const KEYWORDS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
    "and",
    "or",
    "unless",
    "atan2",
    "bool",
    "offset",
    "inf",
    "nan",
];

/// Modifiers followed by a parenthesised list of label names (`sum by (le, to) (…)`,
/// `/ on (stage) group_left (reason) …`): the list is skipped, as labels are not metrics.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

fn is_ident_start(c: char) -> bool {
    c.is_ascii_alphabetic() || c == '_' || c == ':'
}

fn is_ident(c: char) -> bool {
    is_ident_start(c) || c.is_ascii_digit()
}

/// The index just past the string literal that opens at `i` (`"…"` and `'…'` with backslash
/// escapes, `` `…` `` raw).
fn skip_string(s: &[char], i: usize) -> usize {
    let quote = s[i];
    let mut j = i + 1;
    while j < s.len() && s[j] != quote {
        j += if s[j] == '\\' && quote != '`' { 2 } else { 1 };
    }
    j + 1
}

/// The index just past the `close` that ends the group opening at `i`, stepping over string
/// literals (a label value may hold a `}`) and nested groups.
fn skip_group(s: &[char], i: usize, close: char) -> usize {
    let open = s[i];
    let (mut depth, mut j) = (0, i);
    while j < s.len() {
        match s[j] {
            '"' | '\'' | '`' => {
                j = skip_string(s, j);
                continue;
            }
            c if c == open => depth += 1,
            c if c == close => {
                depth -= 1;
                if depth == 0 {
                    return j + 1;
                }
            }
            _ => {}
        }
        j += 1;
    }
    j
}

/// The metric names in a PromQL expression, in order of appearance: identifiers that are not a
/// function call (followed by `(`), not a keyword, and not inside what holds no metric: label
/// matchers `{…}`, ranges `[…]`, label lists after `by`/`on`/…, strings, comments, numbers and
/// durations, and Grafana variables (`$instance`, `${datasource}`, `$__rate_interval`).
fn metric_names(expr: &str) -> Vec<String> {
    let s: Vec<char> = expr.chars().collect();
    let next_non_space = |mut j: usize| {
        while j < s.len() && s[j].is_whitespace() {
            j += 1;
        }
        j
    };
    let mut names = Vec::new();
    let mut i = 0;
    while i < s.len() {
        let c = s[i];
        i = match c {
            '#' => s[i..].iter().position(|&c| c == '\n').map_or(s.len(), |n| i + n),
            '"' | '\'' | '`' => skip_string(&s, i),
            '{' => skip_group(&s, i, '}'),
            '[' => skip_group(&s, i, ']'),
            '$' if s.get(i + 1) == Some(&'{') => skip_group(&s, i + 1, '}'),
            '$' => i + 1 + s[i + 1..].iter().take_while(|&&c| is_ident(c)).count(),
            // A number, a duration (`5m`, `1h30m`) or an exponent (`1e3`): never a name.
            c if c.is_ascii_digit() || (c == '.' && s.get(i + 1).is_some_and(char::is_ascii_digit)) => {
                i + s[i..].iter().take_while(|&&c| c.is_ascii_alphanumeric() || c == '.').count()
            }
            c if is_ident_start(c) => {
                let end = i + s[i..].iter().take_while(|&&c| is_ident(c)).count();
                let word: String = s[i..end].iter().collect();
                let lower = word.to_ascii_lowercase();
                let after = next_non_space(end);
                if LABEL_LISTS.contains(&lower.as_str()) {
                    // `group_left` may stand without a list; the others always have one.
                    if s.get(after) == Some(&'(') {
                        skip_group(&s, after, ')')
                    } else {
                        end
                    }
                } else {
                    let call = s.get(after) == Some(&'(');
                    if !call && !KEYWORDS.contains(&lower.as_str()) {
                        names.push(word);
                    }
                    end
                }
            }
            _ => i + 1,
        };
    }
    names
}

/// The PromQL inside a Grafana template variable's query: `label_values(<selector>, <label>)`
/// holds a selector before its last argument (none when it only names a label), and
/// `query_result(<expr>)` an expression; anything else is PromQL as it stands.
fn grafana_query_promql(query: &str) -> Option<String> {
    let q = query.trim();
    let inner = |prefix: &str| q.strip_prefix(prefix).and_then(|r| r.strip_suffix(')')).map(str::trim);
    if let Some(args) = inner("label_values(") {
        // The last top-level comma separates the label: commas inside `{…}` or `(…)` do not.
        let chars: Vec<char> = args.chars().collect();
        let (mut depth, mut last_comma) = (0i32, None);
        let mut j = 0;
        while j < chars.len() {
            match chars[j] {
                '"' | '\'' | '`' => {
                    j = skip_string(&chars, j);
                    continue;
                }
                '{' | '(' | '[' => depth += 1,
                '}' | ')' | ']' => depth -= 1,
                ',' if depth == 0 => last_comma = Some(j),
                _ => {}
            }
            j += 1;
        }
        return last_comma.map(|k| chars[..k].iter().collect());
    }
    if let Some(expr) = inner("query_result(") {
        return Some(expr.to_string());
    }
    Some(q.to_string())
}

// ---- The files: each expression with where it is used ----

#[derive(Deserialize)]
struct RuleFile {
    groups: Vec<RuleGroup>,
}

#[derive(Deserialize)]
struct RuleGroup {
    name: String,
    rules: Vec<Rule>,
}

/// One rule; its labels, annotations and `for` do not name metrics.
#[derive(Deserialize)]
struct Rule {
    record: Option<String>,
    alert: Option<String>,
    expr: String,
}

/// The PromQL expressions of the dashboard: each panel's targets (rows nest panels) and the
/// template variables' queries, with a label saying where each is.
fn dashboard_exprs(dashboard: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("untitled");
            for t in p["targets"].as_array().into_iter().flatten() {
                if let Some(expr) = t["expr"].as_str() {
                    out.push((format!("tidings.json panel {title:?}"), expr.to_string()));
                }
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dashboard["panels"], &mut out);
    for v in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        // Grafana stores a query variable's query as a string or as {"query": "…"}.
        let query = v["query"]["query"].as_str().or(v["query"].as_str()).unwrap_or_default();
        if let Some(expr) = grafana_query_promql(query) {
            out.push((format!("tidings.json variable ${}", v["name"].as_str().unwrap_or("?")), expr));
        }
    }
    out
}

/// The rules' expressions with where each is, and the names the recording rules define.
fn rule_exprs(rules: &RuleFile) -> (Vec<(String, String)>, HashSet<String>) {
    let mut out = Vec::new();
    let mut recorded = HashSet::new();
    for g in &rules.groups {
        for r in &g.rules {
            let name = r.alert.as_deref().or(r.record.as_deref()).unwrap_or("?");
            out.push((format!("rules.yml group {} rule {name}", g.name), r.expr.clone()));
            if let Some(rec) = &r.record {
                recorded.insert(rec.clone());
            }
        }
    }
    (out, recorded)
}

/// Every metric name the dashboard and the rules use, with where each is used; the recording
/// rules' own names and [`MADE_BY_PROMETHEUS`] are left out (Prometheus makes those series).
fn named_metrics() -> BTreeMap<String, BTreeSet<String>> {
    let dash_path = repo_file("compose/grafana/tidings.json");
    let rules_path = repo_file("compose/prometheus/rules.yml");
    let dashboard: Value =
        serde_json::from_str(&std::fs::read_to_string(&dash_path).expect("reading the dashboard")).expect("its JSON");
    let rules: RuleFile =
        serde_yaml::from_str(&std::fs::read_to_string(&rules_path).expect("reading the rules")).expect("their YAML");
    let (rule_exprs, recorded) = rule_exprs(&rules);
    let mut named: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (place, expr) in dashboard_exprs(&dashboard).into_iter().chain(rule_exprs) {
        for name in metric_names(&expr) {
            if !recorded.contains(&name) && !MADE_BY_PROMETHEUS.contains(&name.as_str()) {
                named.entry(name).or_default().insert(place.clone());
            }
        }
    }
    named
}

// ---- /metrics ----

/// What one process's `/metrics` holds: its sample names (a histogram's `_bucket`, `_sum`,
/// `_count` lines each) and each family's `# TYPE`.
#[derive(Default)]
struct Exposition {
    samples: HashSet<String>,
    types: HashMap<String, String>,
}

fn parse_exposition(text: &str) -> Exposition {
    let mut e = Exposition::default();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                e.types.insert(name.to_string(), kind.to_string());
            }
        } else if !line.starts_with('#') && !line.trim().is_empty() {
            let name: String = line.chars().take_while(|&c| is_ident(c)).collect();
            e.samples.insert(name);
        }
    }
    e
}

/// The named metrics no exposition serves, each with why and where it is used. A name is served
/// when a process has samples of exactly that name; a `_bucket` name also needs its family to be
/// a histogram (`histogram_quantile` over a summary's quantiles answers nothing).
fn missing(named: &BTreeMap<String, BTreeSet<String>>, expositions: &[(&str, Exposition)]) -> Vec<String> {
    let mut out = Vec::new();
    for (name, places) in named {
        let served = expositions.iter().any(|(_, e)| e.samples.contains(name));
        let problem = if !served {
            Some("not served".to_string())
        } else if let Some(family) = name.strip_suffix("_bucket") {
            let kinds: BTreeSet<&str> =
                expositions.iter().filter_map(|(_, e)| e.types.get(family).map(String::as_str)).collect();
            (!kinds.contains("histogram")).then(|| format!("{family} is not a histogram (# TYPE {kinds:?})"))
        } else {
            None
        };
        if let Some(problem) = problem {
            out.push(format!("{name}: {problem} (used by {})", places.iter().cloned().collect::<Vec<_>>().join("; ")));
        }
    }
    out
}

async fn scrape(http: &reqwest::Client, url: &str) -> Result<Exposition, String> {
    let resp = http.get(format!("{url}/metrics")).send().await.map_err(|e| format!("{url}: {e}"))?;
    let text = resp.text().await.map_err(|e| format!("{url}: {e}"))?;
    Ok(parse_exposition(&text))
}

// ---- Tests ----

#[test]
fn the_tokenizer_finds_metrics_and_skips_functions_labels_keywords_and_strings() {
    let names = |e: &str| metric_names(e);
    assert_eq!(
        names(
            r#"histogram_quantile(0.99, sum by (le, to) (rate(tidings_end_to_end_seconds_bucket{to="delivered", instance=~"$instance"}[$__rate_interval])))"#
        ),
        ["tidings_end_to_end_seconds_bucket"]
    );
    assert_eq!(
        names("sum without (instance) (a_total) / on (stage) group_left b_total offset 5m > bool 0.5 or vector(1e3)"),
        ["a_total", "b_total"]
    );
    // Keywords in any case, a `}` inside a label value, a comment, recording-rule names with colons.
    assert_eq!(
        names("count_values(\"x\", foo{a=\"}\"}) AND Sum By(le)(rate(bar[1m])) # not_a_metric\n- job:x:rate5m"),
        ["foo", "bar", "job:x:rate5m"]
    );
    assert_eq!(
        names("sum by (stage, reason) (tidings_dead_letters_total > 0 unless tidings_dead_letters_total offset 5m)"),
        ["tidings_dead_letters_total", "tidings_dead_letters_total"]
    );
    assert_eq!(names("max(x{instance=~\"${instance:regex}\"}) or vector(0)"), ["x"]);
    assert_eq!(
        grafana_query_promql(r#"label_values(up{job=~"$job", a="x,y"}, instance)"#).as_deref(),
        Some(r#"up{job=~"$job", a="x,y"}"#)
    );
    assert_eq!(grafana_query_promql("label_values(job)"), None);
}

/// The files name what they should: guards the live test against a tokenizer that finds nothing.
#[test]
fn the_dashboard_and_rules_name_the_operators_metrics() {
    let named = named_metrics();
    for name in [
        "kafka_consumergroup_lag_sum",
        "kafka_consumergroup_lag_seconds_max",
        "tidings_end_to_end_seconds_bucket",
        "tidings_stage_records_in_total",
        "tidings_stage_processing_seconds_bucket",
        "tidings_dead_letters_total",
        "tidings_stage_restarts_total",
        "tidings_gateway_connections",
    ] {
        assert!(named.contains_key(name), "{name} is not among the names found: {:?}", named.keys());
    }
    for name in named.keys() {
        assert!(name.starts_with("tidings_") || name.starts_with("kafka_"), "{name} looks like no metric of ours");
    }
}

/// Every dashboard query is PromQL that Prometheus accepts: each, with its Grafana variables
/// replaced, as a recording rule for `promtool check rules` (installed by .ci/run).
#[test]
fn the_dashboard_queries_parse_as_promql() {
    if std::process::Command::new("promtool").arg("--version").output().is_err() {
        assert!(std::env::var_os("CI").is_none(), "promtool is missing but CI is set (.ci/run installs it)");
        eprintln!("skipped: no promtool (Debian's prometheus package has it)");
        return;
    }
    let text = std::fs::read_to_string(repo_file("compose/grafana/tidings.json")).unwrap();
    let exprs = dashboard_exprs(&serde_json::from_str(&text).unwrap());
    let rules: Vec<Value> = exprs
        .iter()
        .enumerate()
        .map(|(i, (_, e))| {
            let e = e.replace("$__rate_interval", "1m").replace("$instance", ".*").replace("$job", "tidings");
            json!({"record": format!("dashboard_query_{i}"), "expr": e})
        })
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("dashboard_queries.yml");
    // JSON is YAML: promtool reads it as a rule file.
    std::fs::write(&file, json!({"groups": [{"name": "dashboard", "rules": rules}]}).to_string()).unwrap();
    let out = std::process::Command::new("promtool").arg("check").arg("rules").arg(&file).output().unwrap();
    let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool refused a dashboard query:\n{said}\n{exprs:#?}");
    assert!(said.contains(&format!("{} rules found", exprs.len())), "{said}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_metric_the_dashboard_and_rules_name_is_exported() {
    let named = named_metrics();
    let Some(brokers) = common::brokers_or_skip() else { return };
    let (_pool, db) = common::fresh_pg().await;
    let prefix = common::unique_prefix();
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap();

    // A core process (templating, persistence, HTTP ingest, the registry) serving /metrics on
    // --metrics-listen, and a gateway serving it on its public port.
    let core_metrics = format!("127.0.0.1:{}", common::free_port());
    let mut core = Tidings::spawn_env(
        "core",
        &Up::core(&brokers, &db, &prefix),
        &[STATS, ("TIDINGS_METRICS_LISTEN", &core_metrics)],
    );
    let ep = core.endpoints(Duration::from_secs(60)).await;
    let mut gateway =
        Tidings::spawn_env("gateway", &Up::gateway(&brokers, &db, &prefix, &ep.schema_registry_url), &[STATS]);
    let gw = gateway.endpoints(Duration::from_secs(60)).await.http;
    let core_url = format!("http://{core_metrics}");
    common::await_ready(&http, &core_url, &[&core, &gateway]).await;
    common::await_ready(&http, &gw, &[&core, &gateway]).await;

    // A connected stream receives an order placed over HTTP ingest (ingest, templating,
    // persistence, delivery, end to end to `stored` and `delivered`) ...
    let user = "dash-buyer";
    let stream = common::open_stream(&http, &gw, user, None).await;
    let order = json!({"event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": chrono::Utc::now().timestamp_micros(),
        "order_id": "o-dash-1", "buyer_id": user, "locale": "en",
        "payload": {"OrderPlaced": {"amount_cents": 1250, "currency": "EUR", "items": []}}});
    common::accept(&http, &ep.ingest, "orders", &order, &core).await;
    eventually(
        "the order's notification on the stream",
        Duration::from_secs(60),
        Duration::from_millis(100),
        &[&core, &gateway],
        || async {
            match stream.names() {
                names if names.is_empty() => Err("no event yet".to_string()),
                _ => Ok(()),
            }
        },
    )
    .await;
    // ... and a record templating cannot decode goes to its dead-letter topic.
    let producer: FutureProducer = tidings_core::kafka::KafkaConfig::new(brokers.clone()).producer().create().unwrap();
    let orders = format!("{prefix}orders");
    let garbage = FutureRecord::<str, [u8]>::to(&orders).key("o-dash-bad").payload(b"not avro");
    producer.send(garbage, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("producing a bad record");

    let procs = [&core, &gateway];
    eventually("every named metric served", Duration::from_secs(60), Duration::from_millis(500), &procs, || async {
        let expositions = [("core", scrape(&http, &core_url).await?), ("gateway", scrape(&http, &gw).await?)];
        match missing(&named, &expositions) {
            m if m.is_empty() => Ok(()),
            m => Err(format!("\n  {}", m.join("\n  "))),
        }
    })
    .await;
    eprintln!("{} metrics named by the dashboard and the rules, all served: {:?}", named.len(), named.keys());
    for p in [&mut gateway, &mut core] {
        common::sigterm(p).await;
    }
}
