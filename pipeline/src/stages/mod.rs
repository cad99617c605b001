//! The stages that run on Kafka: templating (domain events → notifications) and claims
//! (coupon claims and redemptions → decisions on `coupons`). The persistence
//! stage lives in the `tidings-sinks` crate, the delivery stage in `tidings-gateway`.

pub mod claims;
pub mod templating;
