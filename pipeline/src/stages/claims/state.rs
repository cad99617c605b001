//! A partition's coupons as stored ([`ClaimRows`]) and in memory ([`PartState`], bounded): loaded
//! when an owner takes the partition, the rejections a batch needs looked up per batch, and each
//! decision that changed a coupon as the rows its batch adds.

use std::collections::{HashMap, HashSet, VecDeque};
use tidings_store::claims::{ClaimRows, DefinitionRow, HolderRow, RedemptionRow, RejectionRow};

use super::decide::{CouponState, Decided, Decision, Definition, Issue, RejectReason, Request};

/// Every coupon of a partition by id, from its committed rows. A stored rejection reason this
/// build does not know is an error: deciding without it could answer a retried claim differently.
pub fn from_rows(rows: ClaimRows) -> Result<HashMap<String, CouponState>, String> {
    let mut coupons: HashMap<String, CouponState> = HashMap::new();
    for d in rows.definitions {
        coupons.entry(d.coupon_id).or_default().definition = Some(Definition {
            title: d.title,
            discount_percent: d.discount_percent,
            stock: u32::try_from(d.stock).unwrap_or(0),
            opens_at: d.opens_at,
            closes_at: d.closes_at,
            valid_for: d.valid_for,
        });
    }
    for h in rows.holders {
        let issue = Issue { claim_id: h.claim_id, code: h.code, expires_at: h.expires_at };
        coupons.entry(h.coupon_id).or_default().holders.insert(h.user_id, issue);
    }
    for r in rows.rejections {
        let reason = RejectReason::parse(&r.reason).ok_or_else(|| format!("unknown stored reason {:?}", r.reason))?;
        coupons.entry(r.coupon_id).or_default().rejected.insert((r.user_id, r.claim_id), reason);
    }
    for x in rows.redemptions {
        coupons.entry(x.coupon_id).or_default().redemptions.insert(x.code, x.order_id);
    }
    Ok(coupons)
}

/// A claim as the store keys its rejection: (coupon id, user id, claim id).
pub type ClaimKey = (String, String, String);

/// One owned partition's coupons in memory, bounded: definitions (at most `max_coupons`), their
/// holders (at most the stock) and redemptions (at most one per holder). Rejected claims are not
/// kept: they are in the store, and the records read are decided in groups, each looking up its
/// claims' rejections in one go ([`PartState::begin`], [`PartState::found`]) into the coupons'
/// `rejected`, which [`PartState::end`] empties again once the batch commits, keeping the most
/// recent in a bounded cache. So what memory holds beyond the bounded part is the uncommitted
/// batch's, at most `batch_size` records' worth. Since a decision
/// reads only its own claim's rejection, this decides exactly as if every rejection were kept.
#[derive(Debug)]
pub struct PartState {
    coupons: HashMap<String, CouponState>,
    /// Coupon ids this batch names that have no definition (unknown coupons): their claims'
    /// rejections, for this batch only.
    unknown: HashMap<String, CouponState>,
    recent: RecentRejections,
    max_coupons: usize,
}

impl PartState {
    /// The partition's state from its committed coupons (`rows`; rejections in it go to the
    /// cache). Coupons stored beyond `max_coupons` (the cap lowered since) are kept: they are
    /// defined, and forgetting them would answer their claims differently.
    pub fn new(rows: ClaimRows, max_coupons: usize, cache: usize) -> Result<Self, String> {
        let mut part = PartState {
            coupons: from_rows(rows)?,
            unknown: HashMap::new(),
            recent: RecentRejections::new(cache),
            max_coupons,
        };
        part.end();
        part.coupons.retain(|_, c| c.definition.is_some());
        Ok(part)
    }

    /// Starts deciding records of the batch, `(coupon id, request)`: the claims whose earlier rejection,
    /// if any, is neither in memory nor answered by a holder, to be looked up in the store and
    /// handed to [`PartState::found`] before the batch is decided.
    pub fn begin<'a>(&mut self, batch: impl IntoIterator<Item = (&'a str, &'a Request)>) -> Vec<ClaimKey> {
        let mut ask = Vec::new();
        let mut asked = HashSet::new();
        for (coupon_id, request) in batch {
            let Request::Claim { claim_id, user_id } = request else { continue };
            let key = (coupon_id.to_string(), user_id.clone(), claim_id.clone());
            let state = self.slot(coupon_id);
            let held = state.holders.get(user_id).is_some_and(|i| i.claim_id == *claim_id);
            if held || state.rejected.contains_key(&(key.1.clone(), key.2.clone())) || asked.contains(&key) {
                continue;
            }
            match self.recent.get(&key) {
                Some(reason) => {
                    self.slot(coupon_id).rejected.insert((key.1, key.2), reason);
                }
                None => {
                    asked.insert(key.clone());
                    ask.push(key);
                }
            }
        }
        ask
    }

    /// The stored rejections of the claims [`PartState::begin`] asked for. A stored reason this
    /// build does not know is an error: deciding without it could answer a retried claim differently.
    pub fn found(&mut self, rows: Vec<RejectionRow>) -> Result<(), String> {
        for r in rows {
            let reason =
                RejectReason::parse(&r.reason).ok_or_else(|| format!("unknown stored reason {:?}", r.reason))?;
            self.slot(&r.coupon_id).rejected.insert((r.user_id, r.claim_id), reason);
        }
        Ok(())
    }

    /// Decides one record of the batch begun. `Err` (nothing changes; the record is a dead
    /// letter with this reason): a new coupon's definition while the partition holds
    /// `max_coupons` already. Refusing it is simpler than evicting coupons and reloading them
    /// (their holders too) when a batch names them, and as exact: the count comes from the
    /// committed state and the log, so the same definition is refused again on every replay.
    pub fn decide(&mut self, coupon_id: &str, request: &Request, at: i64) -> Result<Decided, String> {
        if matches!(request, Request::Define(_))
            && !self.coupons.contains_key(coupon_id)
            && self.coupons.len() >= self.max_coupons
        {
            return Err(format!(
                "the partition holds {} coupons, its most (the claim stage's max coupons per partition)",
                self.coupons.len()
            ));
        }
        let decided = self.slot(coupon_id).decide(coupon_id, request, at);
        if let Some(defined) = self.unknown.remove_entry(coupon_id) {
            if defined.1.definition.is_some() {
                self.coupons.insert(defined.0, defined.1);
            } else {
                self.unknown.insert(defined.0, defined.1);
            }
        }
        Ok(decided)
    }

    /// Ends the batch once it is committed: its rejections leave the coupons for the bounded
    /// cache, unknown coupons are forgotten.
    pub fn end(&mut self) {
        for (coupon_id, state) in self.coupons.iter_mut().chain(self.unknown.iter_mut()) {
            for ((user_id, claim_id), reason) in state.rejected.drain() {
                self.recent.insert((coupon_id.clone(), user_id, claim_id), reason);
            }
        }
        self.unknown.clear();
    }

    /// The coupon's state, if it is defined.
    pub fn coupon(&self, coupon_id: &str) -> Option<&CouponState> {
        self.coupons.get(coupon_id).filter(|c| c.definition.is_some())
    }

    /// Entries held in memory (coupons, holders, redemptions, rejections of the batch and cached).
    pub fn entries(&self) -> usize {
        let coupon = |c: &CouponState| 1 + c.holders.len() + c.redemptions.len() + c.rejected.len();
        self.coupons.values().chain(self.unknown.values()).map(coupon).sum::<usize>() + self.recent.len()
    }

    fn slot(&mut self, coupon_id: &str) -> &mut CouponState {
        match self.coupons.contains_key(coupon_id) {
            true => self.coupons.get_mut(coupon_id).expect("present"),
            false => self.unknown.entry(coupon_id.to_string()).or_default(),
        }
    }
}

/// The most recently decided rejections, at most `cap` (oldest out first): retries come soon
/// after their claim, and each one found here is one less key in the batch's store look-up.
#[derive(Debug)]
struct RecentRejections {
    cap: usize,
    reasons: HashMap<ClaimKey, RejectReason>,
    order: VecDeque<ClaimKey>,
}

impl RecentRejections {
    fn new(cap: usize) -> Self {
        RecentRejections { cap, reasons: HashMap::new(), order: VecDeque::new() }
    }

    fn get(&self, key: &ClaimKey) -> Option<RejectReason> {
        self.reasons.get(key).copied()
    }

    fn insert(&mut self, key: ClaimKey, reason: RejectReason) {
        if self.cap == 0 || self.reasons.contains_key(&key) {
            return;
        }
        if self.order.len() >= self.cap {
            if let Some(old) = self.order.pop_front() {
                self.reasons.remove(&old);
            }
        }
        self.reasons.insert(key.clone(), reason);
        self.order.push_back(key);
    }

    fn len(&self) -> usize {
        self.reasons.len()
    }
}

/// Adds what `decided` changed in coupon `coupon_id` to a batch's `rows`.
pub fn add_rows(rows: &mut ClaimRows, coupon_id: &str, request: &Request, decided: &Decided) {
    if !decided.changed {
        return;
    }
    let coupon_id = coupon_id.to_string();
    match (&decided.decision, request) {
        (Decision::Defined, Request::Define(d)) => rows.definitions.push(DefinitionRow {
            coupon_id,
            title: d.title.clone(),
            discount_percent: d.discount_percent,
            stock: i32::try_from(d.stock).unwrap_or(i32::MAX),
            opens_at: d.opens_at,
            closes_at: d.closes_at,
            valid_for: d.valid_for,
        }),
        (Decision::Issued { user_id, issue }, _) => rows.holders.push(HolderRow {
            coupon_id,
            user_id: user_id.clone(),
            claim_id: issue.claim_id.clone(),
            code: issue.code.clone(),
            expires_at: issue.expires_at,
        }),
        (Decision::Rejected { user_id, claim_id, reason }, _) => rows.rejections.push(RejectionRow {
            coupon_id,
            user_id: user_id.clone(),
            claim_id: claim_id.clone(),
            reason: reason.as_str().to_string(),
        }),
        (Decision::Redeemed { code, order_id, .. }, _) => {
            rows.redemptions.push(RedemptionRow { coupon_id, code: code.clone(), order_id: order_id.clone() })
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stages::claims::decide::code_for;
    use proptest::prelude::Strategy;

    /// What a run of decisions wrote, loaded back, is the state the run ended with: an owner that
    /// takes over decides exactly as the one before would have.
    #[test]
    fn stored_rows_load_back_as_the_state_they_came_from() {
        let def =
            Definition { title: "t".into(), discount_percent: 5, stock: 2, opens_at: 0, closes_at: 100, valid_for: 10 };
        let claim = |u: &str, k: &str| Request::Claim { claim_id: k.into(), user_id: u.into() };
        let log = [
            ("c-0", claim("a", "k")),
            ("c-1", Request::Define(def.clone())),
            ("c-1", claim("a", "k")),
            ("c-1", claim("a", "k")),
            ("c-1", claim("a", "k2")),
            ("c-1", claim("b", "k")),
            ("c-1", claim("c", "k")),
            ("c-1", Request::Redeem { user_id: "a".into(), code: code_for("c-1", "a"), order_id: "o".into() }),
        ];
        let mut live: HashMap<String, CouponState> = HashMap::new();
        let mut rows = ClaimRows::default();
        for (coupon, req) in &log {
            let decided = live.entry(coupon.to_string()).or_default().decide(coupon, req, 50);
            add_rows(&mut rows, coupon, req, &decided);
        }
        assert_eq!((rows.definitions.len(), rows.holders.len(), rows.rejections.len()), (1, 2, 3));
        assert_eq!(from_rows(rows).unwrap(), live);
        let unknown = ClaimRows {
            rejections: vec![RejectionRow {
                coupon_id: "c".into(),
                user_id: "u".into(),
                claim_id: "k".into(),
                reason: "tired".into(),
            }],
            ..ClaimRows::default()
        };
        assert!(from_rows(unknown).is_err());
    }

    /// Many distinct users claim on many coupon ids (most never defined), many coupons are
    /// defined and a few users retry: the partition's memory stays under its bound, definitions
    /// past the cap are refused, and retries are still answered as before from the store.
    #[test]
    fn memory_stays_bounded_while_many_users_and_coupons_pass() {
        let (max_coupons, cache) = (3, 8);
        let def = |stock| Definition {
            title: "t".into(),
            discount_percent: 5,
            stock,
            opens_at: 0,
            closes_at: 1_000,
            valid_for: 10,
        };
        let mut part = PartState::new(ClaimRows::default(), max_coupons, cache).unwrap();
        let mut store: HashMap<ClaimKey, RejectReason> = HashMap::new();
        let mut first: HashMap<ClaimKey, Decision> = HashMap::new();
        let mut refused = 0;
        for b in 0..200 {
            let mut batch: Vec<(String, Request)> = Vec::new();
            for i in 0..25 {
                let n = b * 25 + i;
                let coupon = format!("c-{}", n % 40);
                batch.push(match n % 5 {
                    0 => (coupon, Request::Define(def(2))),
                    // A retry of a claim from long ago (batches back, so out of the cache).
                    1 => (
                        format!("c-{}", n % 7),
                        Request::Claim { claim_id: "k".into(), user_id: format!("u{}", n % 30) },
                    ),
                    _ => (coupon, Request::Claim { claim_id: format!("k{n}"), user_id: format!("u{n}") }),
                });
            }
            let ask = part.begin(batch.iter().map(|(c, r)| (c.as_str(), r)));
            let rows = ask
                .iter()
                .filter_map(|k| store.get(k).map(|r| (k, r)))
                .map(|(k, r)| RejectionRow {
                    coupon_id: k.0.clone(),
                    user_id: k.1.clone(),
                    claim_id: k.2.clone(),
                    reason: r.as_str().into(),
                })
                .collect();
            part.found(rows).unwrap();
            assert!(part.entries() <= max_coupons * 3 + cache + 2 * batch.len());
            for (coupon, request) in &batch {
                let Ok(decided) = part.decide(coupon, request, 10) else {
                    refused += 1;
                    continue;
                };
                if let Decision::Rejected { user_id, claim_id, reason } = &decided.decision {
                    store.insert((coupon.clone(), user_id.clone(), claim_id.clone()), *reason);
                }
                if let Request::Claim { claim_id, user_id } = request {
                    let key = (coupon.clone(), user_id.clone(), claim_id.clone());
                    let before = first.entry(key).or_insert_with(|| decided.decision.clone());
                    assert_eq!(*before, decided.decision, "a retried claim got another decision");
                }
            }
            part.end();
            // Three coupons with stock 2, each holder with no redemption, and the cache.
            assert!(part.entries() <= max_coupons * (1 + 2) + cache, "{} entries", part.entries());
        }
        assert_eq!(part.coupons.len(), max_coupons);
        assert!(refused > 0, "definitions past the cap are refused");
    }

    /// What the store keeps for a partition: every committed row.
    #[derive(Default)]
    struct Committed {
        rows: ClaimRows,
    }

    impl Committed {
        fn look_up(&self, ask: &[ClaimKey]) -> Vec<RejectionRow> {
            let ask: HashSet<&ClaimKey> = ask.iter().collect();
            let key = |r: &RejectionRow| (r.coupon_id.clone(), r.user_id.clone(), r.claim_id.clone());
            self.rows.rejections.iter().filter(|r| ask.contains(&key(r))).cloned().collect()
        }

        /// What an owner loads on taking the partition: no rejections.
        fn coupons(&self) -> ClaimRows {
            ClaimRows { rejections: Vec::new(), ..self.rows.clone() }
        }
    }

    fn request() -> impl Strategy<Value = (String, Request)> {
        let coupon = (0u8..3).prop_map(|c| format!("c-{c}"));
        let def = |stock| Definition {
            title: "t".into(),
            discount_percent: 5,
            stock,
            opens_at: 100,
            closes_at: 200,
            valid_for: 50,
        };
        proptest::prop_oneof![
            1 => (coupon.clone(), 0u32..4).prop_map(move |(c, stock)| (c, Request::Define(def(stock)))),
            10 => (coupon.clone(), 0u8..6, 0u8..3).prop_map(|(c, u, k)| {
                (c, Request::Claim { claim_id: format!("k{k}"), user_id: format!("u{u}") })
            }),
            2 => (coupon, 0u8..6, 0u8..2).prop_map(|(c, u, o)| {
                let code = code_for(&c, &format!("u{u}"));
                (c, Request::Redeem { user_id: format!("u{u}"), code, order_id: format!("o{o}") })
            }),
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(1000))]

        /// Decided in batches on the bounded state, with a tiny cache (or none), at most two
        /// coupons in memory and the owner restarted from the store at some batch ends, a log gets
        /// exactly the decisions the unbounded state gives it (retries answered alike after their
        /// rejection left the cache), and what is committed loads back as that state.
        #[test]
        fn bounded_batches_decide_as_the_unbounded_state(
            log in proptest::collection::vec((request(), 50i64..260), 0..120),
            cuts in proptest::collection::vec((1usize..12, 0u8..3), 1..40),
            cache in 0usize..3,
        ) {
            let max_coupons = 2;
            // The reference: every coupon's whole state in memory, definitions past the cap refused.
            let mut all: HashMap<String, CouponState> = HashMap::new();
            let mut expected = Vec::new();
            for ((coupon, request), at) in &log {
                let defined = all.values().filter(|c| c.definition.is_some()).count();
                let known = all.get(coupon).is_some_and(|c| c.definition.is_some());
                if matches!(request, Request::Define(_)) && !known && defined >= max_coupons {
                    expected.push(None);
                    continue;
                }
                expected.push(Some(all.entry(coupon.clone()).or_default().decide(coupon, request, *at)));
            }

            let mut store = Committed::default();
            let mut part = PartState::new(store.coupons(), max_coupons, cache).unwrap();
            let mut got = Vec::new();
            let mut rows = ClaimRows::default();
            let (mut from, mut cut) = (0, cuts.iter().cycle());
            while from < log.len() {
                let (len, then) = cut.next().expect("cycled");
                let batch = &log[from..(from + len).min(log.len())];
                from += batch.len();
                let ask = part.begin(batch.iter().map(|((c, r), _)| (c.as_str(), r)));
                part.found(store.look_up(&ask)).unwrap();
                for ((coupon, request), at) in batch {
                    let decided = part.decide(coupon, request, *at).ok();
                    if let Some(d) = &decided {
                        add_rows(&mut rows, coupon, request, d);
                    }
                    got.push(decided);
                }
                // 0: more of the batch is read and decided before it commits (its rejections
                // looked up again, uncommitted ones in memory); 1: it commits; 2: it commits and
                // the owner restarts from the store.
                if *then == 0 && from < log.len() {
                    continue;
                }
                part.end();
                let rows = std::mem::take(&mut rows);
                store.rows.definitions.extend(rows.definitions);
                store.rows.holders.extend(rows.holders);
                store.rows.rejections.extend(rows.rejections);
                store.rows.redemptions.extend(rows.redemptions);
                proptest::prop_assert!(part.recent.len() <= cache);
                proptest::prop_assert!(part.unknown.is_empty(), "unknown coupons outlive their batch");
                if *then == 2 {
                    part = PartState::new(store.coupons(), max_coupons, cache).unwrap();
                }
            }
            proptest::prop_assert_eq!(&got, &expected);
            for (coupon, state) in &part.coupons {
                let mut whole = all[coupon].clone();
                whole.rejected.clear();
                proptest::prop_assert_eq!(state, &whole);
            }
        }
    }
}
