//! The one stage skeleton: consume → process → dead-letter → commit, restarted after transient
//! failures with a shutdown-aware backoff, reporting readiness and per-stage metrics. Templating,
//! persistence and delivery are each a [`Processor`] that [`run`] drives; none has a loop of its own.
//! An attempt reads a [`Source`]: a group subscription, or fixed offset ranges that end the run.
//! Whether a failed attempt restarts is the [`StageError`]'s to say, not the stage's.

mod error;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use metrics::Counter;
use rdkafka::client::{ClientContext, DefaultClientContext};
use rdkafka::consumer::{ConsumerContext, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message, ToBytes};
use rdkafka::producer::future_producer::Delivery;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use tokio_util::sync::CancellationToken;

use crate::kafka::{dlq_headers, header_str, H_DLQ_REPLAY_COUNT};
use crate::shutdown::StageHealth;
pub use crate::source::{IntoSource, OffsetRange, RangeError, RangeSource, Source};
use crate::source::{Progress, Verdict};
pub use error::{BoxError, Domain, StageError, System};

/// What a stage does with its records. [`run`] owns the loop around it.
pub trait Processor: Send {
    /// Work a stage waits for besides records (a batch deadline, a timer, its acknowledger).
    type Due: Send;

    /// Handles one record: produces its outputs or its dead-letter copy ([`DeadLetters`]). Its
    /// offset is the processor's to store or commit, once those outputs are safe.
    fn process(&mut self, msg: &BorrowedMessage<'_>) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Resolves when something other than a record needs doing. Must be cancel-safe: it is
    /// dropped whenever a record or shutdown comes first.
    fn due(&mut self) -> impl Future<Output = Self::Due> + Send;

    /// Does what [`Processor::due`] announced.
    fn on_due(&mut self, due: Self::Due) -> impl Future<Output = Result<(), StageError>> + Send;

    /// Ends an attempt with how its loop ended (`Ok` = shutdown): makes what was processed durable
    /// (drain acknowledgements, store the last batch, commit) and releases what the attempt holds.
    fn finish(self, ended: Result<(), StageError>) -> impl Future<Output = Result<(), StageError>> + Send;
}

/// The counters every stage reports, labelled `stage`.
struct StageMetrics {
    records_in: Counter,
    /// Seconds from a record's CreateTime to its consumption here: the hop into this stage.
    age: metrics::Histogram,
    /// Seconds the stage spent on each record ([`Processor::process`]) and each due piece of work
    /// ([`Processor::on_due`]: a batch's write, a commit).
    processing: metrics::Histogram,
    consumer_errors: Counter,
    restarts: Counter,
}

impl StageMetrics {
    fn new(stage: &'static str) -> Self {
        StageMetrics {
            records_in: metrics::counter!("tidings_stage_records_in_total", "stage" => stage),
            age: metrics::histogram!("tidings_stage_record_age_seconds", "stage" => stage),
            processing: metrics::histogram!("tidings_stage_processing_seconds", "stage" => stage),
            consumer_errors: metrics::counter!("tidings_stage_consumer_errors_total", "stage" => stage),
            restarts: metrics::counter!("tidings_stage_restarts_total", "stage" => stage),
        }
    }
}

/// What a stage wrote: `records` outputs (templating's acknowledged records, persistence's rows
/// stored), counted in `tidings_stage_records_out_total{stage}`. Stages whose outputs have a
/// counter of their own with more labels are not counted twice: delivery's stream writes
/// (`tidings_gateway_events_delivered_total`), the scheduler's releases
/// (`tidings_scheduler_released_total{to}`), claims' decisions (`tidings_claims_decisions_total`).
pub fn records_out(stage: &'static str, records: u64) {
    records_out_counter(stage).increment(records);
}

/// The [`records_out`] counter, for a loop that counts often.
pub fn records_out_counter(stage: &'static str) -> Counter {
    metrics::counter!("tidings_stage_records_out_total", "stage" => stage)
}

/// A batch of `records` input records made durable together (a database transaction, a commit),
/// observed in the `tidings_stage_batch_records{stage}` histogram.
pub fn batch(stage: &'static str, records: usize) {
    metrics::histogram!("tidings_stage_batch_records", "stage" => stage).record(records as f64);
}

/// Where an event's end-to-end latency ends: `stored` in the database, or `delivered` (written to
/// a browser's stream).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reached {
    Stored,
    Delivered,
}

impl Reached {
    pub fn as_str(self) -> &'static str {
        match self {
            Reached::Stored => "stored",
            Reached::Delivered => "delivered",
        }
    }

    /// The `tidings_end_to_end_seconds{to}` histogram: an event's `occurred_at` to now.
    pub fn histogram(self) -> metrics::Histogram {
        metrics::histogram!("tidings_end_to_end_seconds", "to" => self.as_str())
    }

    /// Observes, for each `occurred_at` (microseconds since the epoch, as notifications carry it),
    /// the seconds until now. Clocks of other hosts can be ahead: a negative age counts as 0.
    pub fn observe(self, occurred_at_micros: impl IntoIterator<Item = i64>) {
        let h = self.histogram();
        let now = chrono::Utc::now().timestamp_micros();
        for at in occurred_at_micros {
            h.record((now - at).max(0) as f64 / 1e6);
        }
    }
}

/// Runs a stage until `shutdown`: each attempt `start`s a processor and its [`Source`] (or a
/// subscribed consumer) and drives them; a failure that [`StageError::is_retriable`] (an outside
/// system's, when its error says so) restarts the attempt (from the stored offsets; a range source
/// from its starts) after a backoff capped at 30 s; any other (configuration, a bug, a refusal)
/// ends the stage with it. Failures after shutdown began count as a clean stop, and so does a
/// range source read to its ends. `health` is up only while an attempt runs.
pub async fn run<P, Src, S, Fut>(
    stage: &'static str,
    health: &StageHealth,
    shutdown: &CancellationToken,
    mut start: S,
) -> Result<(), StageError>
where
    P: Processor,
    Src: IntoSource,
    S: FnMut() -> Fut,
    Fut: Future<Output = Result<(P, Src), StageError>>,
{
    let metrics = StageMetrics::new(stage);
    let mut delays = crate::retry::schedule(Duration::from_millis(500), Duration::from_secs(30));
    loop {
        health.set(true);
        let result = match start().await {
            Ok((processor, source)) => drive(stage, processor, source.into_source(), shutdown, &metrics).await,
            Err(e) => Err(e),
        };
        health.set(false);
        match result {
            Ok(()) => return Ok(()),
            Err(_) if shutdown.is_cancelled() => return Ok(()),
            Err(e) if e.is_retriable() => {
                metrics.restarts.increment(1);
                let backoff = delays.next().unwrap_or(Duration::from_secs(30));
                tracing::warn!(error = %e, "The {stage} stage failed; restarting from its stored offsets in {backoff:?}.");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(backoff) => {}
                }
            }
            Err(e) => return Err(e),
        }
    }
}

enum Next<'a, D> {
    Due(D),
    Record(Result<BorrowedMessage<'a>, KafkaError>),
}

async fn drive<P: Processor, C: ConsumerContext + 'static>(
    stage: &'static str,
    mut processor: P,
    source: Source<C>,
    shutdown: &CancellationToken,
    metrics: &StageMetrics,
) -> Result<(), StageError> {
    let (consumer, mut ranges): (Arc<StreamConsumer<C>>, Option<Progress>) = match source {
        Source::Consumer(c) => (c, None),
        Source::Ranges(r) => {
            let (c, p) = r.into_parts();
            (c, Some(p))
        }
    };
    let ended = loop {
        if ranges.as_ref().is_some_and(Progress::is_done) {
            tracing::info!("The {stage} stage read every offset range it was given.");
            break Ok(());
        }
        let next = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break Ok(()),
            due = processor.due() => Next::Due(due),
            msg = consumer.recv() => Next::Record(msg),
        };
        let done = match next {
            Next::Due(due) => {
                let started = std::time::Instant::now();
                let done = processor.on_due(due).await;
                metrics.processing.record(started.elapsed().as_secs_f64());
                done
            }
            Next::Record(Ok(msg))
                if ranges.as_mut().is_some_and(|r| {
                    r.verdict(&consumer, msg.topic(), msg.partition(), msg.offset()) == Verdict::Skip
                }) =>
            {
                Ok(())
            }
            Next::Record(Err(KafkaError::PartitionEOF(partition))) if ranges.is_some() => {
                if let Some(r) = ranges.as_mut() {
                    r.at_end_of(&consumer, partition);
                }
                Ok(())
            }
            Next::Record(Ok(msg)) => {
                metrics.records_in.increment(1);
                if let Some(created) = msg.timestamp().to_millis() {
                    metrics.age.record(crate::kafka::age_secs(created));
                }
                let started = std::time::Instant::now();
                let done = processor.process(&msg).await;
                metrics.processing.record(started.elapsed().as_secs_f64());
                done
            }
            Next::Record(Err(e)) => {
                // librdkafka reports broker trouble here and recovers by itself; the stage goes on.
                metrics.consumer_errors.increment(1);
                tracing::warn!(error = %e, "The {stage} stage's Kafka consumer reported an error; continuing.");
                Ok(())
            }
        };
        if let Err(e) = done {
            break Err(e);
        }
    };
    processor.finish(ended).await
}

/// A stage's dead-letter topic: a record that cannot be processed goes there with why, so its
/// partition moves on and nothing is dropped silently.
pub struct DeadLetters<C: ClientContext + 'static = DefaultClientContext> {
    producer: FutureProducer<C>,
    topic: String,
    stage: &'static str,
}

impl<C: ClientContext + 'static> DeadLetters<C> {
    pub fn new(producer: FutureProducer<C>, topic: String, stage: &'static str) -> Self {
        DeadLetters { producer, topic, stage }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Produces a copy of `msg` (key, payload, headers) with the reason headers. The returned
    /// delivery must be acknowledged before the record's offset is stored.
    pub async fn send<M: Message + Sync>(
        &self,
        msg: &M,
        reason: &'static str,
        error: &str,
    ) -> Result<DeliveryFuture, KafkaError> {
        self.send_copy(msg, reason, error, DeadCopy::Whole).await
    }

    /// Produces as much of `msg` as `copy` says, with the reason headers. A smaller copy is for
    /// a record whose larger one the dead-letter topic can never take ([`unproducible`]).
    pub async fn send_copy<M: Message + Sync>(
        &self,
        msg: &M,
        reason: &'static str,
        error: &str,
        copy: DeadCopy,
    ) -> Result<DeliveryFuture, KafkaError> {
        if copy == DeadCopy::Whole {
            tracing::warn!(
                stage = self.stage,
                reason,
                topic = msg.topic(),
                partition = msg.partition(),
                offset = msg.offset(),
                "Record sent to the dead-letter topic {}: {error}",
                self.topic
            );
            metrics::counter!("tidings_dead_letters_total", "stage" => self.stage, "reason" => reason).increment(1);
        } else {
            tracing::warn!(
                stage = self.stage,
                reason,
                topic = msg.topic(),
                partition = msg.partition(),
                offset = msg.offset(),
                ?copy,
                "The dead-letter topic {} refused the record's copy; sending a smaller one that names it.",
                self.topic
            );
        }
        let original = if copy == DeadCopy::Coordinates { None } else { msg.headers() };
        // The re-drive count survives even the smallest copy: it is what stops a record that keeps
        // failing from being re-driven for ever.
        let replay_count = msg.headers().and_then(|h| header_str(h, H_DLQ_REPLAY_COUNT));
        let headers =
            dlq_headers(original, replay_count, self.stage, reason, error, msg.topic(), msg.partition(), msg.offset());
        let mut rec: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(&self.topic).headers(headers);
        if let (Some(p), DeadCopy::Whole) = (msg.payload(), copy) {
            rec = rec.payload(p);
        }
        if let (Some(k), DeadCopy::Whole | DeadCopy::NoPayload) = (msg.key(), copy) {
            rec = rec.key(k);
        }
        enqueue(&self.producer, rec).await
    }
}

/// How much of a record its dead-letter copy carries: the whole record, then, if the dead-letter
/// topic cannot take that, less, so that the record's partition always moves on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadCopy {
    /// Key, payload and headers.
    Whole,
    /// Key and headers: the payload stays in the source topic, at the coordinates in the headers.
    NoPayload,
    /// Only the reason and the source coordinates.
    Coordinates,
}

impl DeadCopy {
    /// The next smaller copy, if any.
    pub fn smaller(self) -> Option<DeadCopy> {
        match self {
            DeadCopy::Whole => Some(DeadCopy::NoPayload),
            DeadCopy::NoPayload => Some(DeadCopy::Coordinates),
            DeadCopy::Coordinates => None,
        }
    }
}

/// The reason a produce error says the record can never be written, by error code: sending it
/// again (or restarting the stage) fails the same way, so the record is an outcome for the dead-
/// letter topic, not a stage failure. `None` for errors a retry may fix.
pub fn unproducible(e: &KafkaError) -> Option<&'static str> {
    match e.rdkafka_error_code()? {
        RDKafkaErrorCode::MessageSizeTooLarge
        | RDKafkaErrorCode::MessageBatchTooLarge
        | RDKafkaErrorCode::InvalidMessageSize => Some("output-too-large"),
        RDKafkaErrorCode::InvalidRecord | RDKafkaErrorCode::InvalidMessage | RDKafkaErrorCode::BadMessage => {
            Some("output-invalid")
        }
        _ => None,
    }
}

/// Enqueues a record, waiting while the producer's local queue is full. Keeps trying through
/// shutdown: the record's input is consumed and must be produced before its offset is stored; the
/// process's grace timeout bounds how long this can take.
pub async fn enqueue<'a, C: ClientContext + 'static, K: ToBytes + ?Sized, P: ToBytes + ?Sized>(
    producer: &FutureProducer<C>,
    mut rec: FutureRecord<'a, K, P>,
) -> Result<DeliveryFuture, KafkaError> {
    loop {
        match producer.send_result(rec) {
            Ok(d) => return Ok(d),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                rec = r;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}

/// Awaits a produced record's acknowledgement: where the broker appended it.
pub async fn acknowledged(delivery: DeliveryFuture) -> Result<Delivery, KafkaError> {
    match delivery.await {
        Ok(Ok(d)) => Ok(d),
        Ok(Err((e, _))) => Err(e),
        Err(_) => Err(KafkaError::Canceled),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::mocking::MockCluster;
    use rdkafka::producer::{BaseProducer, Producer};
    use rdkafka::ClientConfig;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// What a broker outage looks like to a stage: a retriable Kafka error.
    fn broker_went_away() -> StageError {
        KafkaError::MessageProduction(RDKafkaErrorCode::AllBrokersDown).into()
    }

    /// Counts records; fails its first attempt after the first record.
    struct Counting {
        seen: Arc<AtomicUsize>,
        attempt: usize,
        finished: Arc<AtomicUsize>,
    }

    impl Processor for Counting {
        type Due = ();

        async fn process(&mut self, _msg: &BorrowedMessage<'_>) -> Result<(), StageError> {
            self.seen.fetch_add(1, Ordering::SeqCst);
            if self.attempt == 0 {
                return Err(broker_went_away());
            }
            Ok(())
        }

        fn due(&mut self) -> impl Future<Output = ()> + Send {
            std::future::pending()
        }

        async fn on_due(&mut self, _: ()) -> Result<(), StageError> {
            Ok(())
        }

        async fn finish(self, ended: Result<(), StageError>) -> Result<(), StageError> {
            self.finished.fetch_add(1, Ordering::SeqCst);
            ended
        }
    }

    /// Runs a `Counting` stage.
    fn spawn_run<S, Fut>(
        health: &StageHealth,
        shutdown: &CancellationToken,
        start: S,
    ) -> tokio::task::JoinHandle<Result<(), StageError>>
    where
        S: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = Result<(Counting, Arc<StreamConsumer>), StageError>> + Send,
    {
        let (health, shutdown) = (health.clone(), shutdown.clone());
        tokio::spawn(async move { run("test", &health, &shutdown, start).await })
    }

    /// A re-driven record (with `tidings.dlq.replay-count`) that fails again: its dead letter keeps
    /// the count, whatever copy the dead-letter topic could take, and names the source as Kafka
    /// Connect and Spring do.
    #[tokio::test]
    async fn a_dead_letter_carries_the_replay_count_and_the_connect_and_spring_headers() {
        use crate::kafka::{H_CONNECT_OFFSET, H_SPRING_OFFSET, H_SPRING_PARTITION};
        use rdkafka::message::{Header, Headers, OwnedHeaders, OwnedMessage, Timestamp};
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("dlq", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: FutureProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        let dead = DeadLetters::new(producer, "dlq".into(), "test");
        let headers = OwnedHeaders::new().insert(Header { key: H_DLQ_REPLAY_COUNT, value: Some("2") });
        let msg = OwnedMessage::new(
            Some(b"v".to_vec()),
            Some(b"k".to_vec()),
            "orders".into(),
            Timestamp::NotAvailable,
            5,
            77,
            Some(headers),
        );
        for copy in [DeadCopy::Whole, DeadCopy::Coordinates] {
            dead.send_copy(&msg, "unknown-schema-id", "boom", copy).await.unwrap().await.unwrap().unwrap();
        }
        let consumer: rdkafka::consumer::BaseConsumer =
            ClientConfig::new().set("bootstrap.servers", &brokers).set("group.id", "r").create().unwrap();
        let mut tpl = rdkafka::TopicPartitionList::new();
        tpl.add_partition_offset("dlq", 0, rdkafka::Offset::Beginning).unwrap();
        rdkafka::consumer::Consumer::assign(&consumer, &tpl).unwrap();
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        while got.len() < 2 && std::time::Instant::now() < deadline {
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
                let h = m.headers().expect("headers").detach();
                got.push(h);
            }
        }
        assert_eq!(got.len(), 2, "both copies read back");
        for h in &got {
            let value = |k: &str| h.iter().find(|x| x.key == k).and_then(|x| x.value).map(<[u8]>::to_vec);
            assert_eq!(value(H_DLQ_REPLAY_COUNT), Some(b"2".to_vec()));
            assert_eq!(value(H_CONNECT_OFFSET), Some(b"77".to_vec()));
            assert_eq!(value(H_SPRING_PARTITION), Some(5i32.to_be_bytes().to_vec()));
            assert_eq!(value(H_SPRING_OFFSET), Some(77i64.to_be_bytes().to_vec()));
            assert_eq!(h.iter().filter(|x| x.key == H_DLQ_REPLAY_COUNT).count(), 1);
        }
    }

    #[tokio::test]
    async fn a_failed_attempt_finishes_restarts_and_health_follows_it() {
        let cluster = MockCluster::new(1).unwrap();
        cluster.create_topic("t", 1, 1).unwrap();
        let brokers = cluster.bootstrap_servers();
        let producer: BaseProducer = ClientConfig::new().set("bootstrap.servers", &brokers).create().unwrap();
        for i in 0..3 {
            producer
                .send(rdkafka::producer::BaseRecord::<str, str>::to("t").key("k").payload(&format!("{i}")))
                .unwrap();
        }
        producer.flush(Duration::from_secs(5)).unwrap();

        let (seen, finished) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
        let attempts = Arc::new(AtomicUsize::new(0));
        let (seen2, finished2, attempts2) = (seen.clone(), finished.clone(), attempts.clone());
        let task = spawn_run(&health, &shutdown, move || {
            let attempt = attempts2.fetch_add(1, Ordering::SeqCst);
            let (seen, finished, brokers) = (seen2.clone(), finished2.clone(), brokers.clone());
            async move {
                let consumer: StreamConsumer = ClientConfig::new()
                    .set("bootstrap.servers", &brokers)
                    .set("group.id", "g")
                    .set("auto.offset.reset", "earliest")
                    .set("enable.auto.commit", "false")
                    .create()?;
                // Assigned, not subscribed: no group rebalance to wait for between attempts.
                let mut tpl = rdkafka::TopicPartitionList::new();
                tpl.add_partition_offset("t", 0, rdkafka::Offset::Beginning)?;
                rdkafka::consumer::Consumer::assign(&consumer, &tpl)?;
                Ok((Counting { seen, attempt, finished }, Arc::new(consumer)))
            }
        });
        // Nothing is committed, so the second attempt reads all three records again.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        while seen.load(Ordering::SeqCst) < 4 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(seen.load(Ordering::SeqCst), 4, "1 record in the failed attempt + 3 after the restart");
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert_eq!(finished.load(Ordering::SeqCst), 1, "the failed attempt was finished before the restart");
        assert!(health.is_up(), "the second attempt runs");
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert_eq!(finished.load(Ordering::SeqCst), 2, "the stopped attempt was finished too");
        assert!(!health.is_up());
    }

    #[test]
    fn produce_errors_no_retry_can_fix_are_classified_by_code() {
        let produce = |code| KafkaError::MessageProduction(code);
        assert_eq!(unproducible(&produce(RDKafkaErrorCode::MessageSizeTooLarge)), Some("output-too-large"));
        assert_eq!(unproducible(&produce(RDKafkaErrorCode::MessageBatchTooLarge)), Some("output-too-large"));
        assert_eq!(unproducible(&produce(RDKafkaErrorCode::InvalidRecord)), Some("output-invalid"));
        assert_eq!(unproducible(&produce(RDKafkaErrorCode::InvalidMessage)), Some("output-invalid"));
        for transient in [
            RDKafkaErrorCode::QueueFull,
            RDKafkaErrorCode::MessageTimedOut,
            RDKafkaErrorCode::NotLeaderForPartition,
            RDKafkaErrorCode::BrokerTransportFailure,
        ] {
            assert_eq!(unproducible(&produce(transient)), None, "{transient:?}");
        }
        assert_eq!(unproducible(&KafkaError::Canceled), None);
        assert_eq!(DeadCopy::Whole.smaller(), Some(DeadCopy::NoPayload));
        assert_eq!(DeadCopy::NoPayload.smaller(), Some(DeadCopy::Coordinates));
        assert_eq!(DeadCopy::Coordinates.smaller(), None);
    }

    /// Runs a stage whose every start fails with `error()`: how many attempts were made before
    /// the stage ended, and with what. A stage that restarts instead runs into the timeout
    /// (paused time passes it at once).
    async fn attempts_until_the_stage_ends(error: fn() -> StageError) -> (usize, StageError) {
        let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
        let attempts = AtomicUsize::new(0);
        let ended = tokio::time::timeout(
            Duration::from_secs(600),
            run::<Counting, Arc<StreamConsumer>, _, _>("test", &health, &shutdown, || {
                attempts.fetch_add(1, Ordering::SeqCst);
                async move { Err(error()) }
            }),
        )
        .await;
        let attempts = attempts.load(Ordering::SeqCst);
        let Ok(Err(e)) = ended else { panic!("the stage did not end after {attempts} attempts: {ended:?}") };
        assert!(!health.is_up());
        (attempts, e)
    }

    #[tokio::test(start_paused = true)]
    async fn an_error_no_retry_can_fix_ends_the_stage() {
        let (attempts, e) =
            attempts_until_the_stage_ends(|| StageError::configuration("input topic has no schema")).await;
        assert_eq!(attempts, 1, "a configuration error is not retried");
        assert_eq!(e.domain(), Domain::Configuration);
        assert!(e.to_string().contains("input topic has no schema"), "{e}");
    }

    #[tokio::test(start_paused = true)]
    async fn an_internal_error_ends_the_stage() {
        let (attempts, e) = attempts_until_the_stage_ends(|| StageError::internal("acknowledger stopped")).await;
        assert_eq!(attempts, 1, "a bug is not retried");
        assert_eq!(e.domain(), Domain::Internal);
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_by_kafka_ends_the_stage() {
        let refused = || KafkaError::ConsumerCommit(RDKafkaErrorCode::GroupAuthorizationFailed).into();
        let (attempts, e) = attempts_until_the_stage_ends(refused).await;
        assert_eq!(attempts, 1, "an authorization failure is not retried");
        assert_eq!(e.domain(), Domain::External(System::Kafka));
    }

    #[tokio::test(start_paused = true)]
    async fn health_is_down_while_a_stage_waits_to_restart() {
        let (health, shutdown) = (StageHealth::default(), CancellationToken::new());
        let attempts = Arc::new(AtomicUsize::new(0));
        let attempts2 = attempts.clone();
        let task = spawn_run(&health, &shutdown, move || {
            let n = attempts2.fetch_add(1, Ordering::SeqCst);
            async move {
                if n == 0 {
                    return Err(broker_went_away());
                }
                // Never connects (nothing listens there): the attempt just runs.
                let consumer: StreamConsumer =
                    ClientConfig::new().set("bootstrap.servers", "127.0.0.1:1").set("group.id", "g").create()?;
                let counting = Counting { seen: Default::default(), attempt: 1, finished: Default::default() };
                Ok((counting, Arc::new(consumer)))
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 1);
        assert!(!health.is_up(), "up while waiting out the backoff after a failure");
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(attempts.load(Ordering::SeqCst), 2);
        assert!(health.is_up(), "down while the second attempt runs");
        shutdown.cancel();
        task.await.unwrap().unwrap();
        assert!(!health.is_up(), "up after the stage stopped");
    }
}
