//! The claim stage's decisions, with no I/O: one coupon's state and `decide`, which turns one
//! record of `coupon-claims` into one decision. Time comes only from the record's timestamp and
//! codes and event ids are derived from the record, so deciding the same log again from the same
//! state gives the same decisions with the same ids.

use std::collections::HashMap;

/// Namespace of the UUIDv5 codes and decision event ids.
const CLAIMS_NAMESPACE: uuid::Uuid = uuid::Uuid::from_u128(0x2d7e_61c4_0f3b_4a8e_b5d9_1c6a_e07f_9342);

/// A coupon as its `CouponDefined` record declares it. Times are microseconds since the epoch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Definition {
    pub title: String,
    pub discount_percent: i32,
    /// Most coupons issued.
    pub stock: u32,
    /// Claims timestamped before this are `not_open`.
    pub opens_at: i64,
    /// Claims timestamped at or after this are `closed`.
    pub closes_at: i64,
    /// An issued coupon expires this long after its claim's timestamp.
    pub valid_for: i64,
}

impl Definition {
    /// Why this definition cannot be decided on, if it cannot. `per_user_limit` is the record's
    /// field: only 1 is supported, and saying more must not be silently ignored.
    pub fn check(&self, per_user_limit: i32) -> Result<(), String> {
        if per_user_limit != 1 {
            return Err(format!("per_user_limit is {per_user_limit}; only 1 is supported"));
        }
        if !(0..=100).contains(&self.discount_percent) {
            return Err(format!("discount_percent {} is not within 0..=100", self.discount_percent));
        }
        if self.opens_at >= self.closes_at {
            return Err(format!("the claim window [{}, {}) is empty", self.opens_at, self.closes_at));
        }
        if self.valid_for <= 0 {
            return Err(format!("valid_for_micros {} is not positive", self.valid_for));
        }
        Ok(())
    }
}

/// One record of `coupon-claims`, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    Define(Definition),
    /// `claim_id` is the request's idempotency key, scoped to `user_id`.
    Claim {
        claim_id: String,
        user_id: String,
    },
    Redeem {
        user_id: String,
        code: String,
        order_id: String,
    },
}

/// Why a claim is rejected (`ClaimRejectReason` in `schemas/coupon_event.avsc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RejectReason {
    SoldOut,
    AlreadyClaimed,
    NotOpen,
    Closed,
    UnknownCoupon,
}

impl RejectReason {
    pub const ALL: [RejectReason; 5] =
        [Self::SoldOut, Self::AlreadyClaimed, Self::NotOpen, Self::Closed, Self::UnknownCoupon];

    /// The Avro enum symbol (and the stored form).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SoldOut => "sold_out",
            Self::AlreadyClaimed => "already_claimed",
            Self::NotOpen => "not_open",
            Self::Closed => "closed",
            Self::UnknownCoupon => "unknown_coupon",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == s)
    }
}

/// Why a redemption is refused (`RedemptionRefuseReason` in `schemas/coupon_event.avsc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RefuseReason {
    UnknownCoupon,
    /// Not a code issued to this user for this coupon.
    UnknownCode,
    Expired,
    /// Already redeemed for another order.
    AlreadyRedeemed,
}

impl RefuseReason {
    /// The Avro enum symbol.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownCoupon => "unknown_coupon",
            Self::UnknownCode => "unknown_code",
            Self::Expired => "expired",
            Self::AlreadyRedeemed => "already_redeemed",
        }
    }
}

/// A coupon issued to a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Issue {
    pub claim_id: String,
    pub code: String,
    pub expires_at: i64,
}

/// What one record decides.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// The coupon's definition is taken (or is the same as the one already taken).
    Defined,
    /// A definition that cannot be taken: invalid, or a second one that differs from the first.
    /// The record is a dead letter with this reason; nothing changes.
    DefinitionRefused(String),
    Issued {
        user_id: String,
        issue: Issue,
    },
    Rejected {
        user_id: String,
        claim_id: String,
        reason: RejectReason,
    },
    Redeemed {
        user_id: String,
        code: String,
        order_id: String,
    },
    Refused {
        user_id: String,
        code: String,
        order_id: String,
        reason: RefuseReason,
    },
}

impl Decision {
    /// The id of the decision's event on `coupons`: derived from what was decided, so the same
    /// decision decided again (a replay after a crash, a retried request) repeats its id and
    /// downstream deduplicates it. `None` for decisions that produce no event.
    pub fn event_id(&self, coupon_id: &str) -> Option<uuid::Uuid> {
        let name = match self {
            Decision::Defined | Decision::DefinitionRefused(_) => return None,
            // One decision per claim, ever: the claim is the name.
            Decision::Issued { user_id, issue } => ["claim", coupon_id, user_id, &issue.claim_id].join("\0"),
            Decision::Rejected { user_id, claim_id, .. } => ["claim", coupon_id, user_id, claim_id].join("\0"),
            // A refusal is decided anew when retried and may turn out differently (a code issued
            // since): the outcome is part of the name, so a different outcome is a new event.
            Decision::Redeemed { code, order_id, .. } => ["redeem", coupon_id, code, order_id, "accepted"].join("\0"),
            Decision::Refused { code, order_id, reason, .. } => {
                ["redeem", coupon_id, code, order_id, reason.as_str()].join("\0")
            }
        };
        Some(uuid::Uuid::new_v5(&CLAIMS_NAMESPACE, name.as_bytes()))
    }
}

/// A decision and whether it changed the state (`false`: a retried request answered as before,
/// or a refusal; nothing to store, the event is produced again with the same id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decided {
    pub decision: Decision,
    pub changed: bool,
}

/// The code issued to `user_id` for `coupon_id`: derived, so a re-decided claim issues the same
/// code. Codes are not secrets; a redemption must name the user the code was issued to.
pub fn code_for(coupon_id: &str, user_id: &str) -> String {
    let name = ["code", coupon_id, user_id].join("\0");
    uuid::Uuid::new_v5(&CLAIMS_NAMESPACE, name.as_bytes()).simple().to_string().to_ascii_uppercase()
}

/// One coupon's state: its definition, who holds it, what was redeemed and every claim decided.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CouponState {
    pub definition: Option<Definition>,
    /// user id → the coupon issued to them. At most `stock` entries.
    pub holders: HashMap<String, Issue>,
    /// code → order id it was redeemed for. At most one per holder.
    pub redemptions: HashMap<String, String>,
    /// (user id, claim id) → the rejection it got; an issued claim is found in `holders`.
    pub rejected: HashMap<(String, String), RejectReason>,
}

impl CouponState {
    /// Coupons that can still be issued.
    pub fn stock_left(&self) -> u32 {
        self.definition.as_ref().map_or(0, |d| d.stock.saturating_sub(self.holders.len() as u32))
    }

    /// Decides `request` for coupon `coupon_id`, whose record has timestamp `at` (microseconds).
    pub fn decide(&mut self, coupon_id: &str, request: &Request, at: i64) -> Decided {
        match request {
            Request::Define(def) => self.define(def),
            Request::Claim { claim_id, user_id } => self.claim(coupon_id, claim_id, user_id, at),
            Request::Redeem { user_id, code, order_id } => self.redeem(user_id, code, order_id, at),
        }
    }

    fn define(&mut self, def: &Definition) -> Decided {
        match &self.definition {
            None => {
                self.definition = Some(def.clone());
                Decided { decision: Decision::Defined, changed: true }
            }
            Some(d) if d == def => Decided { decision: Decision::Defined, changed: false },
            Some(_) => Decided {
                decision: Decision::DefinitionRefused("the coupon is already defined differently".into()),
                changed: false,
            },
        }
    }

    fn claim(&mut self, coupon_id: &str, claim_id: &str, user_id: &str, at: i64) -> Decided {
        let user = user_id.to_string();
        if let Some(issue) = self.holders.get(user_id).filter(|i| i.claim_id == claim_id) {
            let decision = Decision::Issued { user_id: user, issue: issue.clone() };
            return Decided { decision, changed: false };
        }
        let key = (user, claim_id.to_string());
        if let Some(reason) = self.rejected.get(&key) {
            let decision = Decision::Rejected { user_id: key.0, claim_id: key.1, reason: *reason };
            return Decided { decision, changed: false };
        }
        let reason = match &self.definition {
            None => RejectReason::UnknownCoupon,
            Some(d) if at < d.opens_at => RejectReason::NotOpen,
            Some(d) if at >= d.closes_at => RejectReason::Closed,
            Some(_) if self.holders.contains_key(user_id) => RejectReason::AlreadyClaimed,
            Some(_) if self.stock_left() == 0 => RejectReason::SoldOut,
            Some(d) => {
                let issue = Issue {
                    claim_id: key.1,
                    code: code_for(coupon_id, user_id),
                    expires_at: at.saturating_add(d.valid_for),
                };
                self.holders.insert(key.0.clone(), issue.clone());
                return Decided { decision: Decision::Issued { user_id: key.0, issue }, changed: true };
            }
        };
        self.rejected.insert(key.clone(), reason);
        Decided { decision: Decision::Rejected { user_id: key.0, claim_id: key.1, reason }, changed: true }
    }

    fn redeem(&mut self, user_id: &str, code: &str, order_id: &str, at: i64) -> Decided {
        let refuse = |reason| Decided {
            decision: Decision::Refused {
                user_id: user_id.to_string(),
                code: code.to_string(),
                order_id: order_id.to_string(),
                reason,
            },
            changed: false,
        };
        if self.definition.is_none() {
            return refuse(RefuseReason::UnknownCoupon);
        }
        let Some(issue) = self.holders.get(user_id).filter(|i| i.code == code) else {
            return refuse(RefuseReason::UnknownCode);
        };
        let redeemed = |changed| Decided {
            decision: Decision::Redeemed {
                user_id: user_id.to_string(),
                code: code.to_string(),
                order_id: order_id.to_string(),
            },
            changed,
        };
        match self.redemptions.get(code) {
            Some(order) if order == order_id => redeemed(false),
            Some(_) => refuse(RefuseReason::AlreadyRedeemed),
            None if at >= issue.expires_at => refuse(RefuseReason::Expired),
            None => {
                self.redemptions.insert(code.to_string(), order_id.to_string());
                redeemed(true)
            }
        }
    }
}

#[cfg(test)]
mod tests;
