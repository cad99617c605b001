//! The claim stage: decides the claims and redemptions of limited-stock coupons in log order, one
//! writer per `coupon-claims` partition, and writes each decision to `coupons`.
//! - `decide`: the decisions, with no I/O.

pub mod decide;
