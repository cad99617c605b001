//! The `campaigns` records (CampaignEvent of schemas/campaign_event.avsc, as JSON for the topic's
//! registered schema): CampaignLaunched, whose event id `campaign:<id>` is the same on every retry,
//! and CampaignCancelled.

use serde_json::{json, Value};

use super::validation::Definition;

/// The CampaignLaunched record of `def`, launched by `launched_by` at `now` (microseconds).
pub fn launched(def: &Definition, launched_by: &str, now: i64) -> Value {
    let locales: Vec<Value> =
        def.locales.iter().map(|(l, t)| json!({"locale": l, "title": t.title, "body": t.body})).collect();
    json!({
        "event_id": def.event_id(),
        "occurred_at": now,
        "campaign_id": def.campaign_id,
        "payload": {"CampaignLaunched": {
            "category": def.category,
            "title": def.title,
            "body": def.body,
            "link": def.link,
            "default_locale": def.default_locale,
            "locales": locales,
            "segments": def.audience.segments,
            "user_ids": def.audience.user_ids,
            "send_at": def.send_at_micros(),
            "launched_by": launched_by,
        }},
    })
}

/// The CampaignCancelled record of campaign `id` at `now` (microseconds). Its event id is new each
/// time: a cancel is applied once whatever its repeats.
pub fn cancelled(id: &str, reason: Option<&str>, now: i64) -> Value {
    json!({
        "event_id": format!("campaign-cancel:{id}:{}", uuid::Uuid::new_v4()),
        "occurred_at": now,
        "campaign_id": id,
        "payload": {"CampaignCancelled": {"reason": reason}},
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::campaigns::{validation, CampaignsConfig};
    use crate::preferences::Category;

    /// Both records fit the schema the topic is registered with.
    #[test]
    fn records_fit_the_campaign_event_schema() {
        let text =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../schemas/campaign_event.avsc")).unwrap();
        let schema = apache_avro::Schema::parse_str(&text).unwrap();
        let cats = [Category { name: "campaigns".into(), critical: false, description: String::new() }];
        let body = json!({"campaign_id": "c1", "category": "campaigns", "title": "t", "body": "b", "link": "/x",
            "locales": {"ko": {"title": "kt", "body": "kb"}}, "audience": {"segments": ["s"], "user_ids": ["u"]},
            "send_at": "2099-01-01T00:00:00Z"});
        let def = validation::check(&body, &cats, &CampaignsConfig::default(), 0).unwrap().definition;
        let rec = launched(&def, "api", 7);
        let avro = tidings_core::json_avro::json_to_avro(&schema, &rec).unwrap();
        assert!(avro.validate(&schema));
        assert_eq!(rec["event_id"], "campaign:c1");
        assert_eq!(rec["payload"]["CampaignLaunched"]["send_at"], 4_070_908_800_000_000i64);
        assert_eq!(rec["payload"]["CampaignLaunched"]["locales"][0]["locale"], "ko");
        let c = cancelled("c1", Some("typo"), 8);
        assert!(tidings_core::json_avro::json_to_avro(&schema, &c).unwrap().validate(&schema));
        assert!(tidings_core::json_avro::json_to_avro(&schema, &cancelled("c1", None, 8)).is_ok());
    }
}
