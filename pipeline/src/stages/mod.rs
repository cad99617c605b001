//! The stages that run on Kafka: templating (domain events → notifications). The persistence
//! stage lives in the `tidings-sinks` crate, the delivery stage in `tidings-gateway`.

pub mod templating;
