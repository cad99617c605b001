//! `tidings campaign launch|list|show|cancel`: campaigns straight to the store and Kafka, checked
//! and counted exactly as `POST /v1/campaigns` does (the gateway's own `Campaigns`); every bad flag
//! is named at once with exit 64. Also `tidings up`'s campaign API settings.

use anyhow::Context;
use clap::{Args, Subcommand};
use rdkafka::producer::FutureProducer;
use serde_json::{json, Map, Value};
use std::process::ExitCode;
use std::sync::Arc;
use tidings_core::client_stats::ClientStats;
use tidings_core::RegistryClient;
use tidings_gateway::campaigns::{
    self, campaign_json, launched_json, CampaignError, Campaigns, CampaignsConfig, CampaignsState, Launched,
};
use tidings_gateway::preferences::{Category, Problem};
use tidings_gateway::produce::EventProducer;
use tidings_gateway::service_auth::ServiceTokens;
use tidings_gateway::AuthConfig;
use tidings_pipeline::topology::Topology;
use tidings_store::campaigns::{CampaignRow, CampaignStatus};
use tidings_store::Store;

use crate::endpoints::database_url;
use crate::settings::EX_USAGE;
use crate::tools::{brokers, registry_url, topology_with_running_prefix};
use crate::Infra;

#[derive(Subcommand)]
pub enum CampaignCmd {
    /// Launch a campaign (or, with --dry-run, count its audience): stored and produced to the
    /// campaigns topic, checked as `POST /v1/campaigns` checks it (exit 64 naming every bad flag).
    Launch(LaunchArgs),
    /// List campaigns, newest first, with their status and counts.
    List {
        /// Campaigns shown at most.
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Start after this campaign id (the last one of the previous page).
        #[arg(long)]
        after: Option<String>,
        /// Print JSON, as the API answers.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        infra: Infra,
    },
    /// Show a campaign: its definition, status and counts (produced, held, suppressed, stored, delivered).
    Show {
        campaign_id: String,
        /// Print JSON, as the API answers.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        infra: Infra,
    },
    /// Cancel a campaign: no notification is produced for it from now on (exit 1 once it is done).
    Cancel {
        campaign_id: String,
        /// Why, recorded with the cancel.
        #[arg(long)]
        reason: Option<String>,
        /// Print JSON, as the API answers.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        infra: Infra,
    },
}

/// A launch from flags. Everything is checked by the API's checks, so bad values are reported
/// together by flag.
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Campaign id (1 to 128 of A-Z a-z 0-9 . _ : -); launching the same id and definition again is
    /// a retry. Default: a new UUID.
    #[arg(long)]
    pub id: Option<String>,
    /// The notification category (topology.yaml `categories`); users who opted out get nothing.
    #[arg(long)]
    pub category: String,
    /// Title template (minijinja; context: campaign_id, category, recipient, locale).
    #[arg(long)]
    pub title: String,
    /// Body template.
    #[arg(long)]
    pub body: String,
    /// Link template. Default: /campaigns/<id>.
    #[arg(long)]
    pub link: Option<String>,
    /// The locale of --title and --body, which users without a matching locale get.
    #[arg(long, default_value = "en")]
    pub default_locale: String,
    /// Another locale's title, as LOCALE=TEMPLATE (repeatable; give its --locale-body too).
    #[arg(long = "locale-title", value_name = "LOCALE=TEMPLATE")]
    pub locale_titles: Vec<String>,
    /// Another locale's body, as LOCALE=TEMPLATE (repeatable).
    #[arg(long = "locale-body", value_name = "LOCALE=TEMPLATE")]
    pub locale_bodies: Vec<String>,
    /// A segment of the audience (repeatable); a user in several gets one notification.
    #[arg(long = "segment", value_name = "NAME")]
    pub segments: Vec<String>,
    /// A user of the audience (repeatable), with the segments' members.
    #[arg(long = "user", value_name = "USER_ID")]
    pub users: Vec<String>,
    /// When to send (RFC 3339). Default: now.
    #[arg(long)]
    pub send_at: Option<String>,
    /// Count the audience (after opt-outs; in quiet hours now) and the time to send; nothing is
    /// stored or produced.
    #[arg(long)]
    pub dry_run: bool,
    /// Print JSON, as the API answers.
    #[arg(long)]
    pub json: bool,
    /// Inline users (--user) a launch may name at most; larger audiences are segments.
    #[arg(long, env = "TIDINGS_CAMPAIGN_MAX_INLINE_USERS", default_value_t = 10_000)]
    pub max_inline_users: usize,
    /// Segments a launch may name at most.
    #[arg(long, env = "TIDINGS_CAMPAIGN_MAX_SEGMENTS", default_value_t = 100)]
    pub max_segments: usize,
    #[command(flatten)]
    pub infra: Infra,
}

/// `tidings up`'s campaign endpoints (`/v1/campaigns…` on the gateway, service tokens as ingest).
#[derive(Args, Clone, Debug)]
pub struct CampaignApiArgs {
    /// Largest body of `POST /v1/campaigns`, in bytes (413 beyond).
    #[arg(long, env = "TIDINGS_CAMPAIGN_MAX_BODY_BYTES", default_value_t = 4 * 1024 * 1024)]
    pub campaign_max_body_bytes: usize,
    /// Inline user ids (`audience.user_ids`) a campaign may name at most; larger audiences are segments.
    #[arg(long, env = "TIDINGS_CAMPAIGN_MAX_INLINE_USERS", default_value_t = 10_000)]
    pub campaign_max_inline_users: usize,
    /// Segments a campaign may name at most.
    #[arg(long, env = "TIDINGS_CAMPAIGN_MAX_SEGMENTS", default_value_t = 100)]
    pub campaign_max_segments: usize,
}

/// The topology's categories, as the preferences and campaign APIs show them.
pub fn categories(topo: &Topology) -> Vec<Category> {
    topo.category_list()
        .into_iter()
        .map(|(name, c)| Category { name, critical: c.critical, description: c.description })
        .collect()
}

impl CampaignApiArgs {
    /// The endpoints' state; `None` (not served) without a service token or a campaigns topic.
    pub fn state(
        &self,
        store: Store,
        topo: &Topology,
        events: Arc<EventProducer>,
        tokens: ServiceTokens,
        users: Option<Arc<AuthConfig>>,
    ) -> Option<Arc<CampaignsState>> {
        if tokens.is_empty() || !topo.topics.contains_key(campaigns::TOPIC) {
            tracing::info!("The campaign API is off: no --ingest-token (TIDINGS_INGEST_TOKENS) or no campaigns topic.");
            return None;
        }
        let config = CampaignsConfig {
            max_body_bytes: self.campaign_max_body_bytes,
            max_inline_users: self.campaign_max_inline_users,
            max_segments: self.campaign_max_segments,
            ..CampaignsConfig::default()
        };
        let campaigns = Campaigns {
            store,
            events: Some(events),
            topic: topo.topic_name(campaigns::TOPIC),
            categories: Arc::new(categories(topo)),
            config,
        };
        Some(Arc::new(CampaignsState { campaigns, tokens, users }))
    }
}

/// Who a launch from the command line is recorded as launched by.
fn launched_by() -> String {
    let user = std::env::var("USER").unwrap_or_default();
    if user.is_empty() {
        "cli".into()
    } else {
        format!("cli:{user}")
    }
}

/// The `POST /v1/campaigns` body the flags say; locale flags that are not LOCALE=TEMPLATE are
/// returned as problems.
fn body(a: &LaunchArgs) -> (Value, Vec<Problem>) {
    let mut problems = Vec::new();
    let mut locales: Map<String, Value> = Map::new();
    for (flag, field, values) in
        [("--locale-title", "title", &a.locale_titles), ("--locale-body", "body", &a.locale_bodies)]
    {
        for v in values {
            match v.split_once('=') {
                Some((locale, text)) => {
                    let entry = locales.entry(locale.to_string()).or_insert_with(|| json!({}));
                    entry[field] = json!(text);
                }
                None => problems.push(Problem { path: flag.into(), message: format!("{v:?} is not LOCALE=TEMPLATE") }),
            }
        }
    }
    let mut m = Map::new();
    if let Some(id) = &a.id {
        m.insert("campaign_id".into(), json!(id));
    }
    m.insert("category".into(), json!(a.category));
    m.insert("title".into(), json!(a.title));
    m.insert("body".into(), json!(a.body));
    if let Some(l) = &a.link {
        m.insert("link".into(), json!(l));
    }
    m.insert("default_locale".into(), json!(a.default_locale));
    m.insert("locales".into(), Value::Object(locales));
    m.insert("audience".into(), json!({"segments": a.segments, "user_ids": a.users}));
    if let Some(s) = &a.send_at {
        m.insert("send_at".into(), json!(s));
    }
    m.insert("dry_run".into(), json!(a.dry_run));
    (Value::Object(m), problems)
}

/// The flag (and its value, when the path points at one) a problem's body path came from.
fn flag(path: &str, a: &LaunchArgs) -> String {
    let indexed = |prefix: &str, values: &[String], flag: &str| -> Option<String> {
        let i: usize = path.strip_prefix(prefix)?.strip_suffix(']')?.parse().ok()?;
        Some(format!("{flag} {:?}", values.get(i)?))
    };
    if let Some(f) = indexed("audience.segments[", &a.segments, "--segment") {
        return f;
    }
    if let Some(f) = indexed("audience.user_ids[", &a.users, "--user") {
        return f;
    }
    match path {
        "campaign_id" => "--id".into(),
        "audience" => "--segment/--user".into(),
        "audience.segments" => "--segment".into(),
        "audience.user_ids" => "--user".into(),
        p if p.starts_with("locales.") => {
            let rest = &p["locales.".len()..];
            match rest.rsplit_once('.') {
                Some((locale, "title")) => format!("--locale-title {locale}=…"),
                Some((locale, "body")) => format!("--locale-body {locale}=…"),
                _ => format!("--locale-title/--locale-body {rest}=…"),
            }
        }
        p if p.starts_with("--") => p.into(),
        p => format!("--{}", p.replace('_', "-")),
    }
}

fn refuse(problems: &[Problem], a: &LaunchArgs) -> ExitCode {
    eprintln!("error: `tidings campaign launch` refuses {} flag(s); nothing was stored or produced:", problems.len());
    for p in problems {
        eprintln!("  - {}: {}", flag(&p.path, a), p.message);
    }
    ExitCode::from(EX_USAGE)
}

async fn store(infra: &Infra) -> anyhow::Result<Store> {
    let url = database_url(infra);
    Store::connect(&url).await.with_context(|| format!("the store at {url}"))
}

/// The campaign operations over `infra`; a producer only when `produce`.
async fn campaigns(infra: &Infra, produce: bool, config: CampaignsConfig) -> anyhow::Result<Campaigns> {
    let topo = topology_with_running_prefix(infra)?;
    anyhow::ensure!(
        topo.topics.contains_key(campaigns::TOPIC),
        "the topology {} declares no {} topic",
        infra.topology.display(),
        campaigns::TOPIC
    );
    let events = if produce { Some(producer(infra).await?) } else { None };
    Ok(Campaigns {
        store: store(infra).await?,
        events,
        topic: topo.topic_name(campaigns::TOPIC),
        categories: Arc::new(categories(&topo)),
        config,
    })
}

/// A producer of campaign records under the registry's schema.
async fn producer(infra: &Infra) -> anyhow::Result<Arc<EventProducer>> {
    let registry = RegistryClient::new(infra.registry(registry_url(infra)?)?)?;
    let producer: FutureProducer<ClientStats> =
        infra.kafka(brokers(infra)?)?.producer().create_with_context(ClientStats::new("campaign-cli"))?;
    Ok(Arc::new(EventProducer::new(registry, producer)))
}

/// One line of `list`.
fn line(c: &CampaignRow) -> String {
    let v = campaign_json(c, false);
    let counts = &v["counts"];
    format!(
        "{}\t{}\t{}\tsend_at={}\taudience_estimate={}\tproduced={} held={} suppressed={} stored={} delivered={}",
        c.campaign_id,
        v["status"].as_str().unwrap_or_default(),
        c.category,
        v["send_at"].as_str().unwrap_or("now"),
        c.audience_estimate.map_or("-".into(), |n| n.to_string()),
        counts["produced"],
        counts["held"],
        counts["suppressed"],
        counts["stored"],
        counts["delivered"],
    )
}

/// Exit 1 with the error's message (unknown, exists, finished, store or broker failures).
fn failed(e: CampaignError) -> anyhow::Result<ExitCode> {
    eprintln!("error: {e}");
    Ok(ExitCode::FAILURE)
}

pub async fn run(cmd: CampaignCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CampaignCmd::Launch(args) => launch(&args).await,
        CampaignCmd::List { limit, after, json, infra } => {
            let page = store(&infra).await?.campaigns(after.as_deref(), limit.clamp(1, 1000)).await?;
            if json {
                let list: Vec<Value> = page.iter().map(|c| campaign_json(c, false)).collect();
                println!("{}", serde_json::to_string_pretty(&json!({"campaigns": list}))?);
            } else {
                for c in &page {
                    println!("{}", line(c));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CampaignCmd::Show { campaign_id, json, infra } => {
            match store(&infra).await?.campaign(&campaign_id).await? {
                Some(row) if json => println!("{}", serde_json::to_string_pretty(&campaign_json(&row, true))?),
                Some(row) => {
                    println!("{}", line(&row));
                    if let Some(reason) = &row.failed_reason {
                        println!("failed: {reason}");
                    }
                    println!("definition: {}", row.definition);
                }
                None => return failed(CampaignError::Unknown(campaign_id)),
            }
            Ok(ExitCode::SUCCESS)
        }
        CampaignCmd::Cancel { campaign_id, reason, json, infra } => {
            // An unknown or finished campaign is reported as such, with or without a reachable Kafka.
            match store(&infra).await?.campaign(&campaign_id).await? {
                None => return failed(CampaignError::Unknown(campaign_id)),
                Some(row)
                    if matches!(
                        row.status(chrono::Utc::now().timestamp_micros()),
                        CampaignStatus::Done | CampaignStatus::Failed
                    ) =>
                {
                    return failed(CampaignError::Finished(campaign_id))
                }
                Some(_) => {}
            }
            let c = campaigns(&infra, true, CampaignsConfig::default()).await?;
            match c.cancel(&campaign_id, reason.as_deref()).await {
                Ok(row) if json => println!("{}", serde_json::to_string_pretty(&campaign_json(&row, false))?),
                Ok(row) => println!("campaign {} cancelled: {}", row.campaign_id, line(&row)),
                Err(e) => return failed(e),
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn launch(args: &LaunchArgs) -> anyhow::Result<ExitCode> {
    let (body, mut problems) = body(args);
    let config = CampaignsConfig {
        max_inline_users: args.max_inline_users,
        max_segments: args.max_segments,
        ..CampaignsConfig::default()
    };
    // Checked before Kafka is looked for: bad flags are named whatever is running.
    let mut c = campaigns(&args.infra, false, config).await?;
    match c.check(&body, chrono::Utc::now().timestamp_micros()).await {
        Err(CampaignError::Invalid(found)) => problems.extend(found),
        Err(e) => return failed(e),
        Ok(_) => {}
    }
    if !problems.is_empty() {
        return Ok(refuse(&problems, args));
    }
    if !args.dry_run {
        c.events = Some(producer(&args.infra).await?);
    }
    let outcome = c.launch(&body, &launched_by()).await;
    if let Err(CampaignError::Invalid(found)) = &outcome {
        return Ok(refuse(found, args));
    }
    let (answer, text) = match outcome {
        Err(e) => return failed(e),
        Ok(Launched::DryRun(def, counts)) => {
            let text = format!(
                "dry run of {}: audience {} user(s), {} opted out of {}, {} will receive it ({} in quiet hours now, \
                 held until their window ends); about {} ms to send. Nothing was stored or produced.",
                def.campaign_id,
                counts.audience,
                counts.opted_out,
                def.category,
                counts.will_receive,
                counts.in_quiet_hours_now,
                counts.estimated_send_ms
            );
            (counts.json(&def), text)
        }
        Ok(Launched::Created(def, counts)) => {
            let status = def.initial_status(chrono::Utc::now().timestamp_micros());
            let text = format!(
                "campaign {} launched ({status}): {} user(s) will receive it; see `tidings campaign show {}`.",
                def.campaign_id, counts.will_receive, def.campaign_id
            );
            (launched_json(&def, &counts, status), text)
        }
        Ok(Launched::Retried(row)) => {
            let text = format!("campaign {} was launched before with this definition: {}", row.campaign_id, line(&row));
            (campaign_json(&row, false), text)
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        println!("{text}");
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> LaunchArgs {
        crate::tools::parse_flags(args)
    }

    #[test]
    fn flags_become_the_apis_body_and_problems_are_named_by_flag() {
        let a = parse(&[
            "--category",
            "campaigns",
            "--title",
            "T",
            "--body",
            "B",
            "--locale-title",
            "ko=KT",
            "--locale-body",
            "ko=KB",
            "--locale-title",
            "broken",
            "--segment",
            "vip",
            "--segment",
            "bad name",
            "--user",
            "u1",
        ]);
        let (body, problems) = body(&a);
        assert_eq!(body["locales"], json!({"ko": {"title": "KT", "body": "KB"}}));
        assert_eq!(body["audience"], json!({"segments": ["vip", "bad name"], "user_ids": ["u1"]}));
        assert_eq!(problems.iter().map(|p| p.path.as_str()).collect::<Vec<_>>(), ["--locale-title"]);
        assert_eq!(flag("audience.segments[1]", &a), "--segment \"bad name\"");
        assert_eq!(flag("audience.user_ids[0]", &a), "--user \"u1\"");
        assert_eq!(flag("locales.ko.body", &a), "--locale-body ko=…");
        assert_eq!(flag("send_at", &a), "--send-at");
        assert_eq!(flag("campaign_id", &a), "--id");
    }
}
