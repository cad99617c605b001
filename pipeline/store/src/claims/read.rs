//! What the coupon API reads of the claim stage's tables: coupons with their stock left, and a
//! user's decided claim. Read-only; only the claim stage writes these tables.

use super::super::{Dialect, Store};
use crate::error::StoreError;

const COUPON: &str = include_str!("../sql/claims_coupon.sql");
const OPEN_COUPONS: &str = include_str!("../sql/claims_open_coupons.sql");
const HOLDER: &str = include_str!("../sql/claims_holder.sql");
const USER_REJECTION: &str = include_str!("../sql/claims_user_rejection.sql");
const CLAIM_REJECTION: &str = include_str!("../sql/claims_claim_rejection.sql");

/// A coupon's definition and how many were issued, as committed. Times are microseconds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CouponRow {
    pub coupon_id: String,
    pub title: String,
    pub discount_percent: i32,
    pub stock: i32,
    pub opens_at: i64,
    pub closes_at: i64,
    pub valid_for: i64,
    /// Coupons issued so far.
    pub issued: u64,
}

impl CouponRow {
    /// Coupons that can still be issued.
    pub fn stock_left(&self) -> u64 {
        u64::try_from(self.stock).unwrap_or(0).saturating_sub(self.issued)
    }
}

/// The coupon issued to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeldCoupon {
    pub claim_id: String,
    pub code: String,
    pub expires_at: i64,
    pub redeemed: bool,
}

/// A user's decided claim of a coupon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecidedClaim {
    Issued(HeldCoupon),
    Rejected { claim_id: String, reason: String },
}

type CouponTuple = (String, String, i32, i32, i64, i64, i64, i64);

fn coupon_row(t: CouponTuple) -> CouponRow {
    let (coupon_id, title, discount_percent, stock, opens_at, closes_at, valid_for, issued) = t;
    CouponRow {
        coupon_id,
        title,
        discount_percent,
        stock,
        opens_at,
        closes_at,
        valid_for,
        issued: super::super::count(issued),
    }
}

impl Store {
    /// Coupon `coupon_id` with its issued count, if it is defined.
    pub async fn coupon(&self, coupon_id: &str) -> Result<Option<CouponRow>, StoreError> {
        let row: Option<CouponTuple> =
            on_pool!(self, |pool, Db| sqlx::query_as(COUPON).bind(Db::text(coupon_id)).fetch_optional(pool).await?);
        Ok(row.map(coupon_row))
    }

    /// Coupons whose claim window has not closed at `now` (microseconds), newest opening first,
    /// at most `limit`.
    pub async fn open_coupons(&self, now: i64, limit: u32) -> Result<Vec<CouponRow>, StoreError> {
        let rows: Vec<CouponTuple> = on_pool!(self, |pool, _Db| {
            sqlx::query_as(OPEN_COUPONS).bind(now).bind(i64::from(limit)).fetch_all(pool).await?
        });
        Ok(rows.into_iter().map(coupon_row).collect())
    }

    /// `user_id`'s decided claim of `coupon_id`: the coupon they hold, else a rejection. With
    /// `claim_id`, only that claim's decision (`None` while it is undecided); without, the held
    /// coupon or the most final of their rejections.
    pub async fn decided_claim(
        &self,
        coupon_id: &str,
        user_id: &str,
        claim_id: Option<&str>,
    ) -> Result<Option<DecidedClaim>, StoreError> {
        let held: Option<(String, String, i64, bool)> = on_pool!(self, |pool, Db| {
            sqlx::query_as(HOLDER).bind(Db::text(coupon_id)).bind(Db::text(user_id)).fetch_optional(pool).await?
        });
        if let Some((held_claim, code, expires_at, redeemed)) = held {
            if claim_id.is_none_or(|c| c == held_claim) {
                return Ok(Some(DecidedClaim::Issued(HeldCoupon { claim_id: held_claim, code, expires_at, redeemed })));
            }
        }
        let rejected: Option<(String, String)> = on_pool!(self, |pool, Db| match claim_id {
            Some(c) => {
                sqlx::query_as(CLAIM_REJECTION)
                    .bind(Db::text(coupon_id))
                    .bind(Db::text(user_id))
                    .bind(Db::text(c))
                    .fetch_optional(pool)
                    .await?
            }
            None => {
                sqlx::query_as(USER_REJECTION)
                    .bind(Db::text(coupon_id))
                    .bind(Db::text(user_id))
                    .fetch_optional(pool)
                    .await?
            }
        });
        Ok(rejected.map(|(claim_id, reason)| DecidedClaim::Rejected { claim_id, reason }))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{ClaimRows, DefinitionRow, HolderRow, RedemptionRow, RejectionRow};
    use super::*;

    on_both_backends!(coupons_are_read_with_stock_left, a_users_decided_claim_is_found);

    fn definition(id: &str, opens_at: i64, closes_at: i64) -> DefinitionRow {
        DefinitionRow {
            coupon_id: id.into(),
            title: format!("{id} title"),
            discount_percent: 15,
            stock: 3,
            opens_at,
            closes_at,
            valid_for: 60,
        }
    }

    fn holder(coupon: &str, user: &str) -> HolderRow {
        HolderRow {
            coupon_id: coupon.into(),
            user_id: user.into(),
            claim_id: format!("k-{user}"),
            code: format!("C-{user}"),
            expires_at: 99,
        }
    }

    fn rejection(coupon: &str, user: &str, claim: &str, reason: &str) -> RejectionRow {
        RejectionRow { coupon_id: coupon.into(), user_id: user.into(), claim_id: claim.into(), reason: reason.into() }
    }

    async fn commit(store: &Store, rows: ClaimRows) {
        let owner = store.assign_claim_partition("g", 0).await.unwrap();
        store.commit_claims("g", 0, owner.epoch, &rows, 1).await.unwrap();
    }

    async fn coupons_are_read_with_stock_left(store: &Store) {
        let rows = ClaimRows {
            definitions: vec![definition("a", 10, 100), definition("b", 30, 200), definition("old", 0, 20)],
            holders: vec![holder("a", "u1"), holder("a", "u2"), holder("b", "u1")],
            ..ClaimRows::default()
        };
        commit(store, rows).await;
        let a = store.coupon("a").await.unwrap().unwrap();
        assert_eq!((a.stock, a.issued, a.stock_left(), a.opens_at, a.closes_at), (3, 2, 1, 10, 100));
        assert_eq!(a.title, "a title");
        assert_eq!(store.coupon("nope").await.unwrap(), None);
        assert_eq!(store.coupon("a\0").await.unwrap(), None, "a NUL in an id is no error");
        let open: Vec<String> = store.open_coupons(20, 100).await.unwrap().into_iter().map(|c| c.coupon_id).collect();
        assert_eq!(open, ["b", "a"], "not closed at 20, newest opening first");
        assert_eq!(store.open_coupons(20, 1).await.unwrap().len(), 1);
        assert_eq!(store.open_coupons(150, 100).await.unwrap()[0].stock_left(), 2);
    }

    async fn a_users_decided_claim_is_found(store: &Store) {
        let rows = ClaimRows {
            definitions: vec![definition("a", 0, 100)],
            holders: vec![holder("a", "u1")],
            rejections: vec![
                rejection("a", "u1", "again", "already_claimed"),
                rejection("a", "u2", "early", "not_open"),
                rejection("a", "u2", "late", "sold_out"),
            ],
            redemptions: vec![RedemptionRow { coupon_id: "a".into(), code: "C-u1".into(), order_id: "o".into() }],
        };
        commit(store, rows).await;
        let issued = |redeemed| {
            Some(DecidedClaim::Issued(HeldCoupon {
                claim_id: "k-u1".into(),
                code: "C-u1".into(),
                expires_at: 99,
                redeemed,
            }))
        };
        assert_eq!(store.decided_claim("a", "u1", None).await.unwrap(), issued(true));
        assert_eq!(store.decided_claim("a", "u1", Some("k-u1")).await.unwrap(), issued(true));
        let rejected =
            |claim: &str, reason: &str| Some(DecidedClaim::Rejected { claim_id: claim.into(), reason: reason.into() });
        assert_eq!(store.decided_claim("a", "u1", Some("again")).await.unwrap(), rejected("again", "already_claimed"));
        assert_eq!(store.decided_claim("a", "u1", Some("pending")).await.unwrap(), None);
        assert_eq!(store.decided_claim("a", "u2", None).await.unwrap(), rejected("late", "sold_out"), "most final");
        assert_eq!(store.decided_claim("a", "u2", Some("early")).await.unwrap(), rejected("early", "not_open"));
        assert_eq!(store.decided_claim("a", "u3", None).await.unwrap(), None);
        let not_redeemed = ClaimRows { holders: vec![holder("a", "u4")], ..ClaimRows::default() };
        commit(store, not_redeemed).await;
        let held = store.decided_claim("a", "u4", None).await.unwrap();
        assert!(matches!(held, Some(DecidedClaim::Issued(HeldCoupon { redeemed: false, .. }))), "{held:?}");
    }
}
