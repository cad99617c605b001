#!/usr/bin/env bash
# Starts one Apache Kafka node (KRaft, broker + controller in one JVM, 1 GiB heap) on 127.0.0.1 with
# fresh storage in a temp folder, waits until it serves requests, and prints the variables to export:
#
#   export $(bash compose/start-kafka.sh)    # progress on stderr; on stdout e.g.
#   TIDINGS_TEST_BROKERS=127.0.0.1:9092 TIDINGS_TEST_SASL_BROKERS=127.0.0.1:9094 ...
#
# Listeners (PORT defaults to 9092):
#   PORT      PLAINTEXT
#   PORT+1    CONTROLLER (KRaft, internal)
#   PORT+2    SASL_PLAINTEXT: SCRAM-SHA-256, SCRAM-SHA-512 and PLAIN; user $SASL_USER / $SASL_PASSWORD
#   PORT+3    SSL        } only when TLS_KEYSTORE_PEM names a PEM file holding an unencrypted PKCS#8
#   PORT+4    SASL_SSL   } key and its certificate chain (the TLS tests generate one and pass it)
# Reuses a broker this script already started on PORT. Stop it with compose/stop-kafka.sh (same PORT).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"

PORT="${PORT:-9092}"
HOST=127.0.0.1
WAIT_SECS="${WAIT_SECS:-90}"
HEAP="${KAFKA_HEAP:-1g}"
SASL_USER="${SASL_USER:-tidings}"
SASL_PASSWORD="${SASL_PASSWORD:-tidings-test-secret}"
STATE_DIR="${KAFKA_STATE_DIR:-${TMPDIR:-/tmp}/tidings-kafka-$PORT}"
PIDFILE="$STATE_DIR/kafka.pid"
LOG="$STATE_DIR/kafka.log"
CONTROLLER_PORT=$((PORT + 1))
SASL_PORT=$((PORT + 2))
SSL_PORT=$((PORT + 3))
SASL_SSL_PORT=$((PORT + 4))

port_open() { (exec 3<>"/dev/tcp/$HOST/$1") 2>/dev/null; }
alive() { [ -n "${1:-}" ] && kill -0 "$1" 2>/dev/null; }
announce() {
    local line="TIDINGS_TEST_BROKERS=$HOST:$PORT TIDINGS_TEST_SASL_BROKERS=$HOST:$SASL_PORT"
    line="$line TIDINGS_TEST_SASL_USER=$SASL_USER TIDINGS_TEST_SASL_PASSWORD=$SASL_PASSWORD"
    if [ -n "${TLS_KEYSTORE_PEM:-}" ]; then
        line="$line TIDINGS_TEST_SSL_BROKERS=$HOST:$SSL_PORT TIDINGS_TEST_SASL_SSL_BROKERS=$HOST:$SASL_SSL_PORT"
    fi
    echo "$line"
}

pid="$(cat "$PIDFILE" 2>/dev/null || true)"
if alive "$pid" && port_open "$PORT"; then
    echo "reusing Apache Kafka (pid $pid) already running on $HOST:$PORT; log: $LOG" >&2
    announce
    exit 0
fi
for p in "$PORT" "$CONTROLLER_PORT" "$SASL_PORT"; do
    if port_open "$p"; then
        echo "error: port $p is taken by a process this script did not start; pick another PORT" >&2
        exit 1
    fi
done

libs="$(bash "$here/install-kafka.sh")"

rm -rf "$STATE_DIR"
mkdir -p "$STATE_DIR/data"

listeners="PLAINTEXT://$HOST:$PORT,CONTROLLER://$HOST:$CONTROLLER_PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT"
advertised="PLAINTEXT://$HOST:$PORT,SASL_PLAINTEXT://$HOST:$SASL_PORT"
protocols="PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT,SASL_PLAINTEXT:SASL_PLAINTEXT"
tls=""
if [ -n "${TLS_KEYSTORE_PEM:-}" ]; then
    listeners="$listeners,SSL://$HOST:$SSL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT"
    advertised="$advertised,SSL://$HOST:$SSL_PORT,SASL_SSL://$HOST:$SASL_SSL_PORT"
    protocols="$protocols,SSL:SSL,SASL_SSL:SASL_SSL"
    tls="ssl.keystore.type=PEM
ssl.keystore.location=$TLS_KEYSTORE_PEM
ssl.client.auth=none"
fi

scram='org.apache.kafka.common.security.scram.ScramLoginModule required;'
plain="org.apache.kafka.common.security.plain.PlainLoginModule required user_$SASL_USER=\"$SASL_PASSWORD\";"
sasl=""
for l in sasl_plaintext sasl_ssl; do
    sasl="$sasl
listener.name.$l.sasl.enabled.mechanisms=SCRAM-SHA-256,SCRAM-SHA-512,PLAIN
listener.name.$l.scram-sha-256.sasl.jaas.config=$scram
listener.name.$l.scram-sha-512.sasl.jaas.config=$scram
listener.name.$l.plain.sasl.jaas.config=$plain"
done

cat >"$STATE_DIR/server.properties" <<PROPS
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@$HOST:$CONTROLLER_PORT
controller.listener.names=CONTROLLER
listeners=$listeners
advertised.listeners=$advertised
listener.security.protocol.map=$protocols
inter.broker.listener.name=PLAINTEXT
log.dirs=$STATE_DIR/data
num.partitions=1
auto.create.topics.enable=true
offsets.topic.replication.factor=1
offsets.topic.num.partitions=8
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
group.initial.rebalance.delay.ms=0
group.min.session.timeout.ms=1000
log.retention.hours=24
# Two cores run the broker, tidings and the load clients: fewer broker threads hand requests
# between fewer threads (Kafka's defaults, 3 network and 8 I/O threads, suit a dedicated host).
num.network.threads=${KAFKA_NETWORK_THREADS:-2}
num.io.threads=${KAFKA_IO_THREADS:-2}
$tls
$sasl
PROPS

cat >"$STATE_DIR/log4j2.properties" <<'LOG4J'
status = warn
appender.out.type = Console
appender.out.name = OUT
appender.out.layout.type = PatternLayout
appender.out.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = info
rootLogger.appenderRef.out.ref = OUT
logger.state.name = state.change.logger
logger.state.level = warn
LOG4J

# Shenandoah where the JVM has it (Debian's OpenJDK does), else G1. The broker allocates about
# 100 MB/s at 2,000 records/s; G1 (512 MiB heap, 20 ms pause goal) stopped it for 14-18 ms every
# ~3 s (-Xlog:gc), which is the p99 of a notification crossing two topics; Shenandoah's pauses are
# well under 1 ms. `bash .ci/bench-sse --scenarios ingest_latency` (then one round), p99: 14.5-18.0 ms in four runs
# with G1; 8.6-53.5 ms (median about 10) in eight with Shenandoah, five of them 8.6-10.2.
default_gc="-XX:+UseG1GC -XX:MaxGCPauseMillis=20"
if java -XX:+UseShenandoahGC -version >/dev/null 2>&1; then default_gc="-XX:+UseShenandoahGC"; fi
read -r -a gc_opts <<<"${KAFKA_GC_OPTS:-$default_gc}"
java_opts=(-Xms"$HEAP" -Xmx"$HEAP" "${gc_opts[@]}" -XX:+ExitOnOutOfMemoryError
    -Djava.awt.headless=true -Dlog4j2.configurationFile="$STATE_DIR/log4j2.properties")
# Extra JVM flags, e.g. KAFKA_JAVA_OPTS="-Xlog:gc:file=/tmp/gc.log" to see the broker's GC pauses.
read -r -a extra_java_opts <<<"${KAFKA_JAVA_OPTS:-}"
java_opts+=("${extra_java_opts[@]}")

# A fixed cluster id is fine: every start formats fresh storage.
echo "Formatting KRaft storage in $STATE_DIR/data ..." >&2
java "${java_opts[@]}" -cp "$libs/*" kafka.tools.StorageTool format \
    -t tidings-test-kafka-cA -c "$STATE_DIR/server.properties" \
    --add-scram "SCRAM-SHA-256=[name=$SASL_USER,password=$SASL_PASSWORD]" \
    --add-scram "SCRAM-SHA-512=[name=$SASL_USER,password=$SASL_PASSWORD]" \
    >"$STATE_DIR/format.log" 2>&1 || { cat "$STATE_DIR/format.log" >&2; exit 1; }

launcher=()
command -v setsid >/dev/null 2>&1 && launcher=(setsid)
"${launcher[@]}" nohup java "${java_opts[@]}" -cp "$libs/*" kafka.Kafka "$STATE_DIR/server.properties" \
    >"$LOG" 2>&1 </dev/null &
pid=$!
echo "$pid" >"$PIDFILE"

deadline=$((SECONDS + WAIT_SECS))
until grep -q "Kafka Server started" "$LOG" 2>/dev/null && port_open "$PORT"; do
    if ! alive "$pid"; then
        echo "error: Apache Kafka exited before it was ready; last log lines ($LOG):" >&2
        tail -n 40 "$LOG" >&2 || true
        rm -f "$PIDFILE"
        exit 1
    fi
    if [ "$SECONDS" -ge "$deadline" ]; then
        echo "error: Apache Kafka (pid $pid) was not ready within ${WAIT_SECS}s; last log lines ($LOG):" >&2
        tail -n 40 "$LOG" >&2 || true
        kill "$pid" 2>/dev/null || true
        rm -f "$PIDFILE"
        exit 1
    fi
    sleep 0.2
done
echo "Apache Kafka started (pid $pid) on $HOST:$PORT; log: $LOG" >&2
announce
