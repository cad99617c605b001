//! Campaigns (topic `campaigns`, schema `tidings.campaigns.CampaignEvent`): a CampaignLaunched is
//! fanned out page by page over the merge of its segments and inline users, its own templates
//! rendered once per locale, each page checkpointed in `campaign_progress` once acknowledged so
//! a restart resumes after it; a later `send_at` holds the whole record on the scheduled topic.

use std::collections::BTreeMap;

use apache_avro::Schema;
use minijinja::Environment;
use serde_json::Value as Json;
use tidings_core::StageError;
use tidings_store::audience::Recipient;
use tidings_store::campaign_progress::CampaignProgress;
use tokio_util::sync::CancellationToken;
use tracing::info;

use super::audience::Merge;
use super::render::{truncate, RenderError};
use super::{dead, retry, Fanout, Outcome, RecordRef, Rendered, Rest, Schedule, Templater, SEGMENT_PAGE};

/// The full name of the campaign events' schema.
pub const CAMPAIGN_SCHEMA: &str = "tidings.campaigns.CampaignEvent";

/// The kind of every campaign notification.
pub const KIND: &str = "campaign";

/// Whether `schema` is the campaign events' (its topic's records are campaigns, not templated events).
pub fn is_campaign_schema(schema: &Schema) -> bool {
    matches!(schema, Schema::Record(r) if r.name.fullname(None) == CAMPAIGN_SCHEMA)
}

/// The campaign event as consumed: its record and the instant it is judged at.
pub(super) struct Source<'a> {
    pub rec: RecordRef<'a>,
    /// The record's timestamp (microseconds): `send_at` and quiet hours are judged at it.
    pub at: i64,
    /// The scheduler released it: its `send_at` has come.
    pub released: bool,
    pub event_id: &'a str,
    pub occurred_at: i64,
}

/// A campaign being fanned out: its compiled texts, where its audience merge stands and its
/// counters (the next checkpoint).
pub struct CampaignRest {
    campaign_id: String,
    event_id: String,
    category: String,
    /// A critical category: no opt-out, no quiet hours.
    critical: bool,
    default_locale: String,
    /// The locales with texts of their own, in the event's order (template names `title.<i>`).
    locales: Vec<String>,
    has_link: bool,
    env: Environment<'static>,
    /// Whether a text mentions `recipient` (else each locale's text is rendered once per page).
    per_recipient: bool,
    merge: Merge,
    versions: BTreeMap<String, i64>,
    produced: i64,
    held: i64,
    suppressed: i64,
    started_at: i64,
    /// The launch record's timestamp: quiet hours of every page are judged at it.
    at: i64,
}

impl std::fmt::Debug for CampaignRest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CampaignRest")
            .field("campaign_id", &self.campaign_id)
            .field("merge", &self.merge)
            .field("versions", &self.versions)
            .field("produced", &self.produced)
            .field("held", &self.held)
            .field("suppressed", &self.suppressed)
            .finish_non_exhaustive()
    }
}

/// The users of a page who get one text (a locale's), all produced or all held, and their
/// release times when held (same order): one fan-out.
type Bucket = (Vec<String>, Vec<i64>);

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn missing(what: &str) -> Outcome {
    Outcome::Dead { reason: "missing-field", error: format!("CampaignLaunched has no {what}") }
}

/// `outcome`, a dead letter of campaign `campaign_id`'s launch, with the checkpoint that records
/// it finished and failed (from `progress` when one exists, keeping its cursor and counters).
fn failed(outcome: Outcome, campaign_id: &str, event_id: &str, progress: Option<CampaignProgress>) -> Outcome {
    let Outcome::Dead { reason, error } = outcome else { return outcome };
    let now = now_micros();
    let base = progress.unwrap_or_else(|| CampaignProgress {
        campaign_id: campaign_id.to_owned(),
        event_id: event_id.to_owned(),
        cursor: None,
        segment_versions: "{}".to_owned(),
        produced: 0,
        held: 0,
        suppressed: 0,
        started_at: now,
        updated_at: now,
        finished_at: None,
        cancelled_at: None,
        failed_reason: None,
    });
    let checkpoint = CampaignProgress {
        updated_at: now,
        finished_at: Some(now),
        failed_reason: Some(format!("{reason}: {error}")),
        ..base
    };
    Outcome::CampaignFailed { reason, error, checkpoint }
}

fn strings(v: &Json) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(Json::as_str).map(str::to_owned).collect()).unwrap_or_default()
}

impl CampaignRest {
    /// The text a user with `locale` gets: the index of the campaign's locale matching it (exactly,
    /// else by its primary subtag: `ko-KR` → `ko`), `None` for the default text.
    fn pick(&self, locale: Option<&str>) -> Option<usize> {
        let tag = locale?;
        if tag == self.default_locale {
            return None;
        }
        let primary = tag.split(['-', '_']).next().unwrap_or(tag);
        self.locales.iter().position(|l| l == tag).or_else(|| self.locales.iter().position(|l| l == primary))
    }

    fn locale_tag(&self, text: Option<usize>) -> &str {
        text.map_or(self.default_locale.as_str(), |i| self.locales[i].as_str())
    }

    /// Renders the text `text` for `recipient`.
    fn render(&self, text: Option<usize>, recipient: &str, max: usize) -> Result<Rendered, RenderError> {
        let ctx = minijinja::context! {
            campaign_id => self.campaign_id, category => self.category, recipient => recipient,
            locale => self.locale_tag(text),
        };
        let r = |name: String| -> Result<String, RenderError> {
            let t = self
                .env
                .get_template(&name)
                .map_err(|e| RenderError::Template { name: name.clone(), message: e.to_string() })?;
            t.render(&ctx).map_err(|e| RenderError::Template { name: name.clone(), message: format!("{e:#}") })
        };
        let suffix = text.map(|i| format!(".{i}")).unwrap_or_default();
        let bounded = |s: String| truncate(&s, max).unwrap_or(s);
        Ok(Rendered {
            kind: KIND.to_owned(),
            title: bounded(r(format!("title{suffix}"))?),
            body: bounded(r(format!("body{suffix}"))?),
            link: Some(if self.has_link { r("link".to_owned())? } else { format!("/campaigns/{}", self.campaign_id) }),
            data: None,
            inbox: true,
            category: self.category.clone(),
        })
    }

    /// The checkpoint after the page just built (`finished`: it was the last).
    fn progress(&self, finished: bool) -> CampaignProgress {
        let now = now_micros();
        CampaignProgress {
            campaign_id: self.campaign_id.clone(),
            event_id: self.event_id.clone(),
            cursor: self.merge.cursor().map(str::to_owned),
            segment_versions: serde_json::to_string(&self.versions).unwrap_or_else(|_| "{}".to_owned()),
            produced: self.produced,
            held: self.held,
            suppressed: self.suppressed,
            started_at: self.started_at,
            updated_at: now,
            finished_at: finished.then_some(now),
            cancelled_at: None,
            failed_reason: None,
        }
    }
}

/// Compiles the launch's templates: (environment, whether any mentions `recipient`).
fn compile(p: &Json, locales: &[(String, String, String)]) -> Result<(Environment<'static>, bool), RenderError> {
    let mut env = Environment::new();
    env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
    let mut texts: Vec<(String, String)> = vec![
        ("title".into(), p.get("title").and_then(Json::as_str).unwrap_or_default().to_owned()),
        ("body".into(), p.get("body").and_then(Json::as_str).unwrap_or_default().to_owned()),
    ];
    if let Some(link) = p.get("link").and_then(Json::as_str) {
        texts.push(("link".into(), link.to_owned()));
    }
    for (i, (_, title, body)) in locales.iter().enumerate() {
        texts.push((format!("title.{i}"), title.clone()));
        texts.push((format!("body.{i}"), body.clone()));
    }
    let mut per_recipient = false;
    for (name, src) in texts {
        env.add_template_owned(name.clone(), src)
            .map_err(|e| RenderError::Template { name: name.clone(), message: e.to_string() })?;
        let t = env
            .get_template(&name)
            .map_err(|e| RenderError::Template { name: name.clone(), message: e.to_string() })?;
        per_recipient |= t.undeclared_variables(false).contains("recipient");
    }
    Ok((env, per_recipient))
}

impl Templater {
    /// What a campaign event turns into: a launch's first page (or its hold until `send_at`,
    /// or nothing once finished), a cancel recorded.
    pub(super) async fn campaign(
        &self,
        src: Source<'_>,
        event: &str,
        json: &Json,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, StageError> {
        let Some(campaign_id) = json.get("campaign_id").and_then(Json::as_str).filter(|s| !s.is_empty()) else {
            return Ok(missing("campaign_id"));
        };
        let base = Fanout {
            event_id: src.event_id.to_owned(),
            occurred_at: src.occurred_at,
            source_topic: src.rec.topic.to_owned(),
            source_partition: src.rec.partition,
            source_offset: src.rec.offset,
            ..Fanout::default()
        };
        match event {
            "CampaignLaunched" => {}
            "CampaignCancelled" => {
                let launch = format!("campaign:{campaign_id}");
                let cancel = || self.store.cancel_campaign_progress(campaign_id, &launch, src.at);
                retry(shutdown, "campaign cancel", cancel, |e| e.is_retriable()).await??;
                info!(campaign = %campaign_id, "Campaign {campaign_id} cancelled: its fan-out stops before its next page.");
                return Ok(Outcome::Notifications(base));
            }
            // A campaign event added later: nothing for templating to do.
            _ => return Ok(Outcome::Notifications(base)),
        }
        let p = &json["payload"];
        let Some(category) = p.get("category").and_then(Json::as_str).filter(|s| !s.is_empty()) else {
            return Ok(failed(missing("category"), campaign_id, src.event_id, None));
        };
        let locales: Vec<(String, String, String)> = p
            .get("locales")
            .and_then(Json::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|t| {
                        let s = |k: &str| t.get(k).and_then(Json::as_str).map(str::to_owned);
                        Some((s("locale")?, s("title")?, s("body")?))
                    })
                    .collect()
            })
            .unwrap_or_default();
        let (env, per_recipient) = match compile(p, &locales) {
            Ok(c) => c,
            Err(e) => return Ok(failed(dead(e), campaign_id, src.event_id, None)),
        };
        if let (Some(send_at), Some(_)) = (p.get("send_at").and_then(Json::as_i64), &self.scheduled) {
            if send_at > src.at && !src.released {
                let schedule = Schedule {
                    key: campaign_id.to_owned(),
                    release_at: send_at,
                    release_to: src.rec.topic.to_owned(),
                    release_id: src.event_id.to_owned(),
                };
                info!(campaign = %campaign_id, send_at, "Campaign {campaign_id} is held until its send_at.");
                return Ok(Outcome::Notifications(Fanout { schedule: Some(schedule), ..base }));
            }
        }
        let progress =
            retry(shutdown, "campaign progress", || self.store.campaign_progress(campaign_id), |e| e.is_retriable())
                .await??;
        if progress.as_ref().is_some_and(|p| p.finished_at.is_some()) {
            info!(campaign = %campaign_id, "Campaign {campaign_id} is finished already: nothing produced again.");
            return Ok(Outcome::Notifications(base));
        }
        let segments = strings(&p["segments"]);
        // Versions pinned by the first page, so a resumed fan-out reads the audience it started on.
        let pinned: BTreeMap<String, i64> =
            progress.as_ref().and_then(|p| serde_json::from_str(&p.segment_versions).ok()).unwrap_or_default();
        let mut versions = BTreeMap::new();
        for seg in &segments {
            let version = match pinned.get(seg) {
                Some(&v) => v,
                None => {
                    let info =
                        retry(shutdown, "segment lookup", || self.store.segment(seg), |e| e.is_retriable()).await??;
                    match info {
                        Some(i) => i.version,
                        None => {
                            let unknown = dead(RenderError::MissingRecipient(format!(
                                "campaign {campaign_id}: audience segment {seg:?} is unknown"
                            )));
                            return Ok(failed(unknown, campaign_id, src.event_id, progress));
                        }
                    }
                }
            };
            versions.insert(seg.clone(), version);
        }
        let cursor = progress.as_ref().and_then(|p| p.cursor.clone());
        if let Some(c) = &cursor {
            info!(campaign = %campaign_id, "Campaign {campaign_id} resumes after user {c:?}.");
        }
        let rest = CampaignRest {
            campaign_id: campaign_id.to_owned(),
            event_id: src.event_id.to_owned(),
            category: category.to_owned(),
            critical: self.topology.is_critical(category),
            default_locale: p.get("default_locale").and_then(Json::as_str).unwrap_or("en").to_owned(),
            locales: locales.into_iter().map(|(l, _, _)| l).collect(),
            has_link: p.get("link").and_then(Json::as_str).is_some(),
            env,
            per_recipient,
            merge: Merge::new(&segments, &strings(&p["user_ids"]), cursor),
            versions,
            produced: progress.as_ref().map_or(0, |p| p.produced),
            held: progress.as_ref().map_or(0, |p| p.held),
            suppressed: progress.as_ref().map_or(0, |p| p.suppressed),
            started_at: progress.as_ref().map_or_else(now_micros, |p| p.started_at),
            at: src.at,
        };
        self.campaign_page(base, Box::new(rest), shutdown).await
    }

    /// The next page of campaign `c` (at most [`SEGMENT_PAGE`] users), as `base` (its coordinates)
    /// and siblings per locale and for the held users; its checkpoint rides on the last of them.
    /// A cancelled campaign ends here, finished, with nothing more produced; one that cannot go on
    /// (a segment version gone, a text that fails to render) ends finished and failed.
    pub(super) async fn campaign_page(
        &self,
        mut base: Fanout,
        mut c: Box<CampaignRest>,
        shutdown: &CancellationToken,
    ) -> Result<Outcome, StageError> {
        let cancelled = retry(
            shutdown,
            "campaign cancel check",
            || self.store.campaign_cancelled(&c.campaign_id),
            |e| e.is_retriable(),
        )
        .await??;
        if cancelled {
            info!(campaign = %c.campaign_id, produced = c.produced,
                "Campaign {} is cancelled: its fan-out stops after {} notification(s).", c.campaign_id, c.produced);
            base.checkpoint = Some(c.progress(true));
            return Ok(Outcome::Notifications(base));
        }
        // A failed page records the checkpoint of the pages before it, with the failure.
        let before = c.progress(false);
        let fail = |outcome: Outcome| failed(outcome, &before.campaign_id, &before.event_id, Some(before.clone()));
        let limit = SEGMENT_PAGE as usize;
        let mut page = Vec::with_capacity(limit);
        loop {
            while let Some(r) = c.merge.needs() {
                let version = c.versions.get(&r.segment).copied().unwrap_or_default();
                let read = || self.store.segment_version_page(version, r.after.as_deref(), SEGMENT_PAGE);
                match retry(shutdown, "segment page", read, |e| e.is_retriable()).await?? {
                    Some(members) => {
                        let full = members.len() == limit;
                        c.merge.refill(&r, members, full);
                    }
                    None => {
                        return Ok(fail(Outcome::Dead {
                            reason: "segment-version-gone",
                            error: format!(
                                "campaign {}: segment {:?} version {version} was deleted during the fan-out, after user {:?}",
                                c.campaign_id, r.segment, r.after
                            ),
                        }))
                    }
                }
            }
            if page.len() == limit || c.merge.is_done() {
                break;
            }
            c.merge.take(limit, &mut page);
        }
        let done = c.merge.is_done();
        let prefs = if page.is_empty() {
            Default::default()
        } else {
            self.page_preferences(&c.category, &page, shutdown).await?
        };
        let mut buckets: BTreeMap<(Option<usize>, bool), Bucket> = BTreeMap::new();
        let (mut produced, mut held, mut suppressed) = (0u64, 0u64, 0u64);
        for user in page {
            if !c.critical && prefs.opted_out.contains(&user) {
                suppressed += 1;
                continue;
            }
            let saved: Option<&Recipient> = prefs.saved.get(&user);
            let text = c.pick(saved.and_then(|s| s.locale.as_deref()));
            let release = if c.critical { None } else { self.hold_until(saved, c.at, &c.event_id, &user) };
            let bucket = buckets.entry((text, release.is_some())).or_default();
            bucket.0.push(user);
            if let Some(at) = release {
                bucket.1.push(at);
                held += 1;
            } else {
                produced += 1;
            }
        }
        let max = self.topology.stages.templating.max_rendered_bytes;
        let mut parts = Vec::with_capacity(buckets.len());
        for ((text, _), (users, release)) in buckets {
            let texts: Result<Vec<Rendered>, RenderError> = if c.per_recipient {
                users.iter().map(|u| c.render(text, u, max)).collect()
            } else {
                c.render(text, &users[0], max).map(|t| vec![t])
            };
            match texts {
                Ok(texts) => parts.push((users, texts, release)),
                Err(e) => return Ok(fail(dead(e))),
            }
        }
        c.produced += produced as i64;
        c.held += held as i64;
        c.suppressed += suppressed as i64;
        let count = |outcome: &'static str, n: u64| {
            if n > 0 {
                metrics::counter!("tidings_campaign_notifications_total", "outcome" => outcome).increment(n);
            }
        };
        count("produced", produced);
        count("held", held);
        count("suppressed", suppressed);
        if suppressed > 0 {
            metrics::counter!("tidings_notifications_suppressed_total", "category" => c.category.clone(), "reason" => "opted_out")
                .increment(suppressed);
        }
        if held > 0 {
            metrics::counter!("tidings_notifications_held_total", "category" => c.category.clone()).increment(held);
        }
        let mut parts = parts.into_iter();
        if let Some((users, texts, release)) = parts.next() {
            base.recipients = users;
            base.texts = texts;
            base.hold = release;
        }
        base.siblings = parts.map(|(users, texts, release)| base.sibling(users, texts, release)).collect();
        base.checkpoint = Some(c.progress(done));
        if done {
            info!(campaign = %c.campaign_id, produced = c.produced, held = c.held, suppressed = c.suppressed,
                "Campaign {} fanned out: {} produced, {} held for quiet hours, {} opted out.",
                c.campaign_id, c.produced, c.held, c.suppressed);
        } else {
            base.rest = Some(Rest::Campaign(c));
        }
        Ok(Outcome::Notifications(base))
    }
}
