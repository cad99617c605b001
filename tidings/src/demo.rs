//! `tidings demo`: a realistic mixed stream (orders moving through their lifecycle, coupons,
//! a campaign) sent through the gateway's HTTP ingest, and a chat room talked in through the chat
//! API (dev mode: demo users' tokens are minted with the dev secret), so a newcomer sees
//! notifications and messages land within seconds.

use anyhow::Context;
use clap::Args;
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use crate::endpoints::Endpoints;

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// HTTP ingest base URL. Default: the one a running `tidings up` wrote to its endpoints file.
    #[arg(long, env = "TIDINGS_INGEST_URL")]
    pub ingest: Option<String>,
    /// Public gateway base URL, for the chat API. Default: the one in the endpoints file.
    #[arg(long, env = "TIDINGS_GATEWAY_URL")]
    pub gateway: Option<String>,
    /// Service token for ingest. Default: the dev token a `tidings up --dev` wrote there.
    #[arg(long, env = "TIDINGS_INGEST_TOKEN", hide_env_values = true)]
    pub ingest_token: Option<String>,
    /// How many events to send.
    #[arg(long, default_value_t = 500)]
    pub events: u32,
    /// Events per second.
    #[arg(long, default_value_t = 100)]
    pub rate: u32,
    /// Number of distinct users.
    #[arg(long, default_value_t = 50)]
    pub users: u32,
    #[arg(long, env = "TIDINGS_DATA_DIR", default_value = "tidings-data")]
    pub data_dir: std::path::PathBuf,
}

fn user(i: u32) -> String {
    format!("u{:04}", i + 1)
}

fn now_micros() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

fn envelope(extra: Value) -> Value {
    let mut v = json!({ "event_id": uuid::Uuid::new_v4().to_string(), "occurred_at": now_micros() });
    if let (Some(o), Value::Object(e)) = (v.as_object_mut(), extra) {
        o.extend(e);
    }
    v
}

/// The next event: a weighted pick over the domain, keeping per-order lifecycle state.
struct Gen {
    rng: SmallRng,
    users: u32,
    open_orders: Vec<(String, String, u8)>,
    seq: u32,
}

impl Gen {
    fn next(&mut self) -> (&'static str, Value) {
        self.seq += 1;
        let roll = self.rng.random_range(0..100);
        let u = user(self.rng.random_range(0..self.users));
        let locale = if self.rng.random_bool(0.3) { json!("ko") } else { json!("en") };
        if roll < 55 {
            // Advance an open order, or place a new one.
            if !self.open_orders.is_empty() && self.rng.random_bool(0.7) {
                let i = self.rng.random_range(0..self.open_orders.len());
                let (order, buyer, stage) = self.open_orders[i].clone();
                let payload = match stage {
                    0 => json!({"OrderPaid": {"amount_cents": 4200, "currency": "EUR", "payment_method": "card"}}),
                    1 => json!({"OrderShipped": {"carrier": "DHL", "tracking_number": format!("TRK{}", self.seq)}}),
                    2 => json!({"OrderDelivered": {"delivered_to": "front door"}}),
                    _ => json!({"OrderCancelled": {"reason": "changed my mind"}}),
                };
                if stage >= 2 {
                    self.open_orders.swap_remove(i);
                } else {
                    self.open_orders[i].2 += 1;
                }
                return (
                    "orders",
                    envelope(json!({"order_id": order, "buyer_id": buyer, "locale": locale, "payload": payload})),
                );
            }
            let order = format!("o-{}", self.seq);
            self.open_orders.push((order.clone(), u.clone(), 0));
            let qty = self.rng.random_range(1..4);
            (
                "orders",
                envelope(json!({"order_id": order, "buyer_id": u, "locale": locale, "payload": {"OrderPlaced": {
                "amount_cents": 1400 * qty, "currency": "EUR",
                "items": [{"sku": "tea-01", "name": "Green tea", "quantity": qty, "unit_price_cents": 1400}]}}})),
            )
        } else if roll < 75 {
            let expires = now_micros() + 7 * 86_400_000_000;
            let payload = if self.rng.random_bool(0.7) {
                json!({"CouponIssued": {"user_id": u, "code": format!("SAVE{}", self.seq), "discount_percent": 10, "expires_at": expires}})
            } else {
                json!({"CouponExpiring": {"user_id": u, "code": format!("SAVE{}", self.seq), "expires_at": expires}})
            };
            ("coupons", envelope(json!({"coupon_id": format!("c-{}", self.seq), "locale": locale, "payload": payload})))
        } else if roll < 78 {
            let audience: Vec<String> = (0..self.users).map(user).collect();
            (
                "coupons",
                envelope(json!({"coupon_id": format!("camp-{}", self.seq), "payload": {"CampaignLaunched": {
                "campaign_id": format!("camp-{}", self.seq), "title": "Weekend sale", "discount_percent": 20,
                "audience": {"InlineAudience": {"user_ids": audience}}}}})),
            )
        } else {
            // Sent through the chat API as `sender`, not through ingest.
            let sender = user(self.rng.random_range(0..5));
            ("chat", json!({"sender": sender, "text": format!("hello #{}", self.seq)}))
        }
    }
}

pub async fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let running = Endpoints::read(&args.data_dir);
    let base =
        match args.ingest {
            Some(url) => url,
            None => running.as_ref().map(|e| e.ingest.clone()).filter(|u| !u.is_empty()).context(
                "no --ingest URL given and no running `tidings up` with HTTP ingest found (its endpoints.json)",
            )?,
        };
    let token = args
        .ingest_token
        .or_else(|| running.as_ref().and_then(|e| e.ingest_token.clone()))
        .context("no --ingest-token (TIDINGS_INGEST_TOKEN) given, and the running `tidings up` is not in --dev mode")?;
    // Chat needs user tokens; the demo mints them only for a `tidings up --dev` (the dev secret).
    let dev = running.as_ref().is_some_and(|e| e.ingest_token.is_some());
    let gateway = args.gateway.or_else(|| running.as_ref().map(|e| e.http.clone())).filter(|u| !u.is_empty());
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let send = |topic: &'static str, body: Value| {
        let (http, token) = (http.clone(), token.clone());
        let url = format!("{base}/v1/events/{topic}");
        async move {
            let resp = http
                .post(&url)
                .bearer_auth(token)
                .json(&body)
                .send()
                .await
                .with_context(|| format!("POST {url} (is `tidings up` running?)"))?;
            let status = resp.status();
            if !status.is_success() {
                let text = resp.text().await.unwrap_or_default();
                anyhow::bail!("POST {url}: {status}: {text}");
            }
            anyhow::Ok(())
        }
    };
    let chat = match (&gateway, dev) {
        (Some(gw), true) => Some(Chat::open(&http, gw, &(0..args.users.min(10)).map(user).collect::<Vec<_>>()).await?),
        _ => {
            eprintln!("No chat: it needs a `tidings up --dev` gateway (demo users' tokens use the dev secret).");
            None
        }
    };
    let mut g = Gen { rng: SmallRng::seed_from_u64(7), users: args.users.max(1), open_orders: Vec::new(), seq: 0 };
    let started = Instant::now();
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate.max(1)));
    for i in 0..args.events {
        let (topic, ev) = g.next();
        match (topic, &chat) {
            ("chat", Some(chat)) => chat.say(&http, &ev).await?,
            ("chat", None) => {}
            _ => send(topic, ev).await?,
        }
        if (i + 1) % 100 == 0 {
            eprintln!("{} events sent", i + 1);
        }
        let due = started + interval * (i + 1);
        tokio::time::sleep_until(due.into()).await;
    }
    println!(
        "Sent {} events in {:.1}s. See them: `tidings inbox --user u0001` or `tidings stats`.",
        args.events + 1,
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// The demo's chat room, talked in through the chat API.
struct Chat {
    base: String,
    room: String,
}

fn dev_token(user: &str) -> anyhow::Result<String> {
    let secret = tidings_gateway::auth::DEV_SECRET.as_bytes();
    Ok(tidings_gateway::auth::mint_hs256(secret, user, Duration::from_secs(3600), None, None)?)
}

async fn call(http: &reqwest::Client, url: &str, user: &str, body: &Value) -> anyhow::Result<Value> {
    let resp =
        http.post(url).bearer_auth(dev_token(user)?).json(body).send().await.with_context(|| format!("POST {url}"))?;
    let status = resp.status();
    let json: Value = resp.json().await.unwrap_or(Value::Null);
    if !status.is_success() {
        anyhow::bail!("POST {url}: {status}: {json}");
    }
    Ok(json)
}

impl Chat {
    /// A "Lobby" group room (tag `lobby`) created by the first of `members`, joined by the rest.
    async fn open(http: &reqwest::Client, base: &str, members: &[String]) -> anyhow::Result<Chat> {
        let rooms = format!("{base}/v1/rooms");
        let room =
            call(http, &rooms, &members[0], &json!({"kind": "group", "name": "Lobby", "tags": ["lobby"]})).await?;
        let id = room["room_id"].as_str().context("the created room has no id")?.to_string();
        for m in &members[1..] {
            call(http, &format!("{rooms}/{id}/members"), m, &Value::Null).await?;
        }
        Ok(Chat { base: base.to_string(), room: id })
    }

    async fn say(&self, http: &reqwest::Client, ev: &Value) -> anyhow::Result<()> {
        let sender = ev["sender"].as_str().unwrap_or("u0001");
        let url = format!("{}/v1/rooms/{}/messages", self.base, self.room);
        call(http, &url, sender, &json!({"text": ev["text"]})).await.map(|_| ())
    }
}
