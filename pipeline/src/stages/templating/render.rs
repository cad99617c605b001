//! Templates and recipients: compiles every template of the topology once, picks the locale,
//! and turns one decoded event into the list of (recipient, title, body, link) it produces.

use minijinja::{Environment, Value as Tpl};
use serde_json::Value as Json;
use std::collections::HashMap;

use crate::topology::{Recipients, TemplateSpec, Topology};

/// Why an event produced no notifications although it has a template.
#[derive(Debug, thiserror::Error)]
pub enum RenderError {
    #[error("missing recipient: {0}")]
    MissingRecipient(String),
    #[error("missing field: {0}")]
    MissingField(String),
    #[error("template error in {name}: {message}")]
    Template { name: String, message: String },
}

impl RenderError {
    /// Reason code for dead-letter headers.
    pub fn reason_code(&self) -> &'static str {
        match self {
            RenderError::MissingRecipient(_) => "missing-recipient",
            RenderError::MissingField(_) => "missing-field",
            RenderError::Template { .. } => "template-error",
        }
    }
}

/// Who to notify, as far as the event alone says; segments and rooms are expanded from the store.
#[derive(Debug, PartialEq, Eq)]
pub enum Audience {
    Users(Vec<String>),
    Segment(String),
    Room { room: String, exclude: Option<String> },
}

struct Compiled {
    spec: TemplateSpec,
    /// Whether any text mentions `recipient`; if not, texts are rendered once per event.
    per_recipient: bool,
}

/// All templates of a topology, compiled.
pub struct Renderer {
    env: Environment<'static>,
    /// Keyed by logical topic, then event name, so per-event lookups borrow instead of allocating.
    by_event: HashMap<String, HashMap<String, Compiled>>,
    /// Largest title or body in bytes (`stages.templating.max_rendered_bytes`).
    max_text: usize,
    truncated_title: metrics::Counter,
    truncated_body: metrics::Counter,
}

/// Ends a text cut at the rendered-size limit, so readers see it was cut.
pub const TRUNCATED: &str = "…[truncated]";

/// `text` if it fits in `max` bytes, else its longest prefix that ends on a character boundary
/// and leaves room for [`TRUNCATED`], followed by it (never more than `max` bytes, unless `max`
/// is smaller than the marker itself: then the marker alone). `None` when it fitted.
pub fn truncate(text: &str, max: usize) -> Option<String> {
    if text.len() <= max {
        return None;
    }
    let mut cut = max.saturating_sub(TRUNCATED.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(cut + TRUNCATED.len());
    out.push_str(&text[..cut]);
    out.push_str(TRUNCATED);
    Some(out)
}

/// Texts rendered for one recipient (or for all, when they do not depend on the recipient).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rendered {
    pub kind: String,
    pub title: String,
    pub body: String,
    pub link: Option<String>,
    /// The event as JSON, when the template asks for it (`data: event`).
    pub data: Option<String>,
    pub inbox: bool,
    /// The template's category (what preferences opt out of).
    pub category: String,
}

fn name(topic: &str, event: &str, locale: &str, part: &str) -> String {
    format!("{topic}/{event}/{locale}/{part}")
}

/// Formats microseconds since the epoch as RFC 3339 (UTC), for templates: `{{ occurred_at | datetime }}`.
fn datetime(micros: i64) -> String {
    chrono::DateTime::from_timestamp_micros(micros)
        .map(|t| t.format("%Y-%m-%d %H:%M UTC").to_string())
        .unwrap_or_else(|| micros.to_string())
}

/// Formats an amount in minor units: `{{ payload.amount_cents | money(payload.currency) }}`.
fn money(cents: i64, currency: Option<String>) -> String {
    let sign = if cents < 0 { "-" } else { "" };
    let c = cents.unsigned_abs();
    let cur = currency.unwrap_or_default();
    // Currencies without minor units in everyday use.
    if matches!(cur.as_str(), "KRW" | "JPY") {
        format!("{sign}{c} {cur}")
    } else {
        format!("{sign}{}.{:02} {cur}", c / 100, c % 100)
    }
}

impl Renderer {
    /// Compiles every template; the topology was checked, so errors here are unexpected but reported.
    pub fn new(topology: &Topology) -> Result<Self, RenderError> {
        let mut env = Environment::new();
        env.set_undefined_behavior(minijinja::UndefinedBehavior::Strict);
        env.add_filter("datetime", datetime);
        env.add_filter("money", money);
        let mut by_event: HashMap<String, HashMap<String, Compiled>> = HashMap::new();
        for spec in &topology.templates {
            let mut texts: Vec<(String, &str)> = vec![
                (name(&spec.topic, &spec.event, "", "title"), spec.title.as_str()),
                (name(&spec.topic, &spec.event, "", "body"), spec.body.as_str()),
            ];
            if let Some(link) = &spec.link {
                texts.push((name(&spec.topic, &spec.event, "", "link"), link.as_str()));
            }
            for (locale, t) in &spec.locales {
                texts.push((name(&spec.topic, &spec.event, locale, "title"), t.title.as_str()));
                texts.push((name(&spec.topic, &spec.event, locale, "body"), t.body.as_str()));
            }
            let mut per_recipient = false;
            for (n, src) in texts {
                env.add_template_owned(n.clone(), src.to_owned())
                    .map_err(|e| RenderError::Template { name: n.clone(), message: e.to_string() })?;
                let t = env
                    .get_template(&n)
                    .map_err(|e| RenderError::Template { name: n.clone(), message: e.to_string() })?;
                per_recipient |= t.undeclared_variables(false).contains("recipient");
            }
            by_event
                .entry(spec.topic.clone())
                .or_default()
                .insert(spec.event.clone(), Compiled { spec: spec.clone(), per_recipient });
        }
        let max_text = topology.stages.templating.max_rendered_bytes;
        let truncated = |part: &'static str| metrics::counter!("tidings_templating_truncated_total", "part" => part);
        Ok(Renderer { env, by_event, max_text, truncated_title: truncated("title"), truncated_body: truncated("body") })
    }

    fn compiled(&self, topic: &str, event: &str) -> Option<&Compiled> {
        self.by_event.get(topic)?.get(event)
    }

    /// Who the event is for, as the template's `recipients` says.
    pub fn audience(&self, topic: &str, event: &str, json: &Json) -> Result<Option<Audience>, RenderError> {
        let Some(c) = self.compiled(topic, event) else { return Ok(None) };
        Ok(Some(match &c.spec.recipients {
            Recipients::User(p) => {
                let u = lookup(json, p).and_then(Json::as_str).filter(|s| !s.is_empty());
                Audience::Users(vec![u
                    .ok_or_else(|| RenderError::MissingRecipient(format!("no user id at `{p}`")))?
                    .to_string()])
            }
            Recipients::Users(p) => Audience::Users(string_array(json, p)?),
            Recipients::Audience(p) => {
                let a =
                    lookup(json, p).ok_or_else(|| RenderError::MissingRecipient(format!("no audience at `{p}`")))?;
                if let Some(seg) = a.get("segment").and_then(Json::as_str) {
                    Audience::Segment(seg.to_string())
                } else {
                    Audience::Users(string_array(a, "user_ids")?)
                }
            }
            Recipients::Room { room, exclude } => Audience::Room {
                room: lookup(json, room)
                    .and_then(Json::as_str)
                    .ok_or_else(|| RenderError::MissingRecipient(format!("no room id at `{room}`")))?
                    .to_string(),
                exclude: exclude.as_ref().and_then(|p| lookup(json, p)).and_then(Json::as_str).map(str::to_string),
            },
        }))
    }

    /// Renders the texts for each recipient. Texts that do not mention `recipient` are rendered
    /// once and shared, which is what makes a 100,000-user campaign cheap.
    pub fn render(
        &self,
        topic: &str,
        event: &str,
        json: &Json,
        recipients: &[String],
    ) -> Result<Vec<Rendered>, RenderError> {
        let Some(c) = self.compiled(topic, event) else { return Ok(Vec::new()) };
        let locale = json.get("locale").and_then(Json::as_str);
        let loc_key = locale
            .and_then(|tag| {
                if c.spec.locales.contains_key(tag) {
                    Some(tag)
                } else {
                    let primary = tag.split(['-', '_']).next().unwrap_or(tag);
                    c.spec.locales.get_key_value(primary).map(|(k, _)| k.as_str())
                }
            })
            .unwrap_or("");
        let base = Tpl::from_serialize(json);
        // The same for every recipient: serialized once per event.
        let data = c.spec.data.map(|_| {
            let mut event_json = json.clone();
            if let Some(obj) = event_json.as_object_mut() {
                obj.insert("event_type".into(), Json::String(event.to_string()));
            }
            event_json.to_string()
        });
        let render_one = |recipient: &str| -> Result<Rendered, RenderError> {
            let ctx = minijinja::context! { event_type => event, recipient => recipient, ..base.clone() };
            let r = |part: &str, loc: &str| -> Result<String, RenderError> {
                let n = name(topic, event, loc, part);
                let t = self
                    .env
                    .get_template(&n)
                    .map_err(|e| RenderError::Template { name: n.clone(), message: e.to_string() })?;
                t.render(&ctx).map_err(|e| RenderError::Template { name: n.clone(), message: format!("{e:#}") })
            };
            Ok(Rendered {
                kind: c.spec.kind.clone(),
                title: self.bounded(r("title", loc_key)?, &self.truncated_title),
                body: self.bounded(r("body", loc_key)?, &self.truncated_body),
                link: if c.spec.link.is_some() { Some(r("link", "")?) } else { None },
                data: data.clone(),
                inbox: c.spec.inbox,
                category: c.spec.category.clone(),
            })
        };
        if c.per_recipient {
            recipients.iter().map(|u| render_one(u)).collect()
        } else {
            let one = render_one(recipients.first().map(String::as_str).unwrap_or(""))?;
            Ok(vec![one; recipients.len().min(1)])
        }
    }
}

impl Renderer {
    /// `text` cut to the configured size, counted in `counter` when it was.
    fn bounded(&self, text: String, counter: &metrics::Counter) -> String {
        match truncate(&text, self.max_text) {
            Some(cut) => {
                counter.increment(1);
                cut
            }
            None => text,
        }
    }
}

/// Follows a dot-separated path through JSON objects.
pub fn lookup<'a>(json: &'a Json, path: &str) -> Option<&'a Json> {
    path.split('.').try_fold(json, |v, key| v.get(key))
}

fn string_array(json: &Json, path: &str) -> Result<Vec<String>, RenderError> {
    let arr = lookup(json, path)
        .and_then(Json::as_array)
        .ok_or_else(|| RenderError::MissingRecipient(format!("no list of user ids at `{path}`")))?;
    arr.iter()
        .map(|v| {
            v.as_str()
                .map(str::to_string)
                .ok_or_else(|| RenderError::MissingRecipient(format!("`{path}` holds a non-string user id")))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn topology() -> Topology {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        Topology::load(&dir.join("topology.yaml")).unwrap()
    }

    #[test]
    fn renders_order_placed_in_the_buyers_language() {
        let r = Renderer::new(&topology()).unwrap();
        let mut ev = json!({"event_id": "e1", "occurred_at": 0, "order_id": "o-7", "buyer_id": "u1", "locale": "ko-KR",
            "payload": {"amount_cents": 1250, "currency": "EUR", "items": [{"sku": "a", "name": "n", "quantity": 1, "unit_price_cents": 1250}]}});
        assert_eq!(r.audience("orders", "OrderPlaced", &ev).unwrap(), Some(Audience::Users(vec!["u1".into()])));
        let ko = r.render("orders", "OrderPlaced", &ev, &["u1".into()]).unwrap();
        assert_eq!(ko.len(), 1);
        assert!(ko[0].title.contains("o-7") && ko[0].title.contains("주문"), "{:?}", ko[0]);
        ev["locale"] = Json::Null;
        let en = r.render("orders", "OrderPlaced", &ev, &["u1".into()]).unwrap();
        assert!(en[0].title.contains("o-7") && !en[0].title.contains("주문"), "{:?}", en[0]);
        assert_eq!(en[0].link.as_deref(), Some("/orders/o-7"));
    }

    #[test]
    fn missing_buyer_is_a_missing_recipient() {
        let r = Renderer::new(&topology()).unwrap();
        let ev = json!({"order_id": "o", "buyer_id": "", "payload": {}});
        assert!(matches!(r.audience("orders", "OrderPaid", &ev), Err(RenderError::MissingRecipient(_))));
    }

    #[test]
    fn campaign_audience_inline_or_segment() {
        let r = Renderer::new(&topology()).unwrap();
        let inline = json!({"payload": {"audience": {"user_ids": ["a", "b"]}}});
        assert_eq!(
            r.audience("coupons", "CampaignLaunched", &inline).unwrap(),
            Some(Audience::Users(vec!["a".into(), "b".into()]))
        );
        let seg = json!({"payload": {"audience": {"segment": "vip"}}});
        assert_eq!(r.audience("coupons", "CampaignLaunched", &seg).unwrap(), Some(Audience::Segment("vip".into())));
    }

    #[test]
    fn claim_decisions_reach_the_claimant_rejections_live_only() {
        let r = Renderer::new(&topology()).unwrap();
        let rejected = json!({"event_id": "e1", "coupon_id": "c-1", "locale": "ko",
            "payload": {"user_id": "u1", "claim_id": "k1", "reason": "sold_out"}});
        assert_eq!(
            r.audience("coupons", "ClaimRejected", &rejected).unwrap(),
            Some(Audience::Users(vec!["u1".into()]))
        );
        let ko = r.render("coupons", "ClaimRejected", &rejected, &["u1".into()]).unwrap();
        assert!(ko[0].body.contains("소진"), "{:?}", ko[0]);
        assert!(!ko[0].inbox, "a rejection is shown live, not kept in the inbox");
        let data: Json = serde_json::from_str(ko[0].data.as_deref().unwrap()).unwrap();
        assert_eq!(
            (data["event_type"].as_str(), data["payload"]["claim_id"].as_str()),
            (Some("ClaimRejected"), Some("k1"))
        );
        for (reason, text) in [
            ("already_claimed", "already hold"),
            ("not_open", "not opened"),
            ("closed", "closed"),
            ("unknown_coupon", "no such"),
        ] {
            let ev = json!({"coupon_id": "c-1", "payload": {"user_id": "u1", "claim_id": "k1", "reason": reason}});
            let en = r.render("coupons", "ClaimRejected", &ev, &["u1".into()]).unwrap();
            assert!(en[0].body.contains(text), "{reason}: {:?}", en[0]);
        }
        let issued = json!({"coupon_id": "c-1", "payload": {"user_id": "u1", "code": "ABC", "discount_percent": 10,
            "expires_at": 0, "claim_id": "k1"}});
        let texts = r.render("coupons", "CouponIssued", &issued, &["u1".into()]).unwrap();
        assert!(texts[0].inbox && texts[0].body.contains("ABC"), "{:?}", texts[0]);
        let redeemed = json!({"coupon_id": "c-1", "payload": {"user_id": "u1", "code": "ABC", "order_id": "o-9"}});
        let texts = r.render("coupons", "RedemptionAccepted", &redeemed, &["u1".into()]).unwrap();
        assert!(texts[0].inbox && texts[0].body.contains("o-9"), "{:?}", texts[0]);
        let mut refused = redeemed.clone();
        refused["payload"]["reason"] = json!("already_redeemed");
        let texts = r.render("coupons", "RedemptionRefused", &refused, &["u1".into()]).unwrap();
        assert!(!texts[0].inbox && texts[0].body.contains("another order"), "{:?}", texts[0]);
    }

    #[test]
    fn a_chat_message_is_a_delivery_only_copy_to_the_whole_room_carrying_the_event() {
        let r = Renderer::new(&topology()).unwrap();
        let ev =
            json!({"room_id": "r1", "event_id": "e1", "payload": {"sender_id": "s", "message_id": "m", "text": "hi"}});
        // The sender too: their other tabs show their own messages.
        assert_eq!(
            r.audience("chat", "MessageSent", &ev).unwrap(),
            Some(Audience::Room { room: "r1".into(), exclude: None })
        );
        let texts = r.render("chat", "MessageSent", &ev, &["a".into(), "s".into()]).unwrap();
        assert_eq!(texts.len(), 1, "one text shared by every member");
        assert!(!texts[0].inbox, "not an inbox row");
        let data: Json = serde_json::from_str(texts[0].data.as_deref().unwrap()).unwrap();
        assert_eq!(data["event_type"], "MessageSent");
        assert_eq!(data["payload"]["text"], "hi");
        assert_eq!(data["room_id"], "r1");
        let order = json!({"order_id": "o", "buyer_id": "u", "payload": {"carrier": "DHL", "tracking_number": "T"}});
        let texts = r.render("orders", "OrderShipped", &order, &["u".into()]).unwrap();
        assert!(texts[0].inbox && texts[0].data.is_none(), "order notifications stay inbox rows without data");
    }

    #[test]
    fn a_template_referring_to_a_missing_field_is_an_error() {
        let r = Renderer::new(&topology()).unwrap();
        let ev = json!({"order_id": "o", "buyer_id": "u", "payload": {}});
        let err = r.render("orders", "OrderShipped", &ev, &["u".into()]).unwrap_err();
        assert_eq!(err.reason_code(), "template-error", "{err}");
    }

    #[test]
    fn truncation_cuts_at_a_char_boundary_and_marks_the_cut() {
        assert_eq!(truncate("short", 64), None, "a text that fits is left alone");
        assert_eq!(truncate(&"a".repeat(64), 64), None, "exactly the limit fits");
        let cut = truncate(&"a".repeat(100), 64).unwrap();
        assert_eq!(cut.len(), 64);
        assert!(cut.ends_with(TRUNCATED) && cut.starts_with(&"a".repeat(64 - TRUNCATED.len())));
        // Three-byte characters: the cut may not split one, so it ends up to two bytes short.
        let korean = "주".repeat(100);
        for max in 40..60 {
            let cut = truncate(&korean, max).unwrap();
            assert!(cut.len() <= max && cut.len() + 2 >= max, "{max}: {} bytes", cut.len());
            let kept = cut.strip_suffix(TRUNCATED).unwrap();
            assert!(kept.chars().all(|c| c == '주'), "{max}: {kept:?}");
        }
        assert_eq!(truncate("abcdef", 2).as_deref(), Some(TRUNCATED), "a limit below the marker keeps only it");
    }

    #[test]
    fn rendered_titles_and_bodies_are_bounded_by_the_topology() {
        let mut topo = topology();
        topo.stages.templating.max_rendered_bytes = 1024;
        let r = Renderer::new(&topo).unwrap();
        let code = "X".repeat(3000);
        let ev = json!({"order_id": code, "buyer_id": "u", "payload": {"carrier": "DHL", "tracking_number": code}});
        let t = &r.render("orders", "OrderShipped", &ev, &["u".into()]).unwrap()[0];
        assert_eq!((t.title.len(), t.body.len()), (1024, 1024));
        assert!(t.title.ends_with(TRUNCATED) && t.body.ends_with(TRUNCATED));
        assert!(t.title.starts_with("Order XXX") && t.body.starts_with("Your order is on its way"));
        // The default leaves ordinary texts alone.
        let r = Renderer::new(&topology()).unwrap();
        let t = &r.render("orders", "OrderShipped", &ev, &["u".into()]).unwrap()[0];
        assert!(!t.title.contains(TRUNCATED) && t.title.len() > 3000);
    }

    #[test]
    fn money_and_datetime_filters() {
        assert_eq!(money(1250, Some("EUR".into())), "12.50 EUR");
        assert_eq!(money(-5, Some("USD".into())), "-0.05 USD");
        assert_eq!(money(15000, Some("KRW".into())), "15000 KRW");
        assert_eq!(datetime(0), "1970-01-01 00:00 UTC");
    }
}
