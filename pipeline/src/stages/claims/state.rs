//! A partition's coupons as stored ([`ClaimRows`]) and in memory ([`CouponState`]): loaded when an
//! owner takes the partition, and each decision that changed a coupon as the rows its batch adds.

use std::collections::HashMap;
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
}
