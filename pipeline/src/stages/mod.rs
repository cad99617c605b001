//! The stages that run on Kafka: templating (domain events → notifications), claims
//! (coupon claims and redemptions → decisions on `coupons`) and the scheduler (held records
//! released at their time). The persistence
//! stage lives in the `tidings-sinks` crate, the delivery stage in `tidings-gateway`.

pub mod claims;
pub mod scheduler;
pub mod templating;
