#!/usr/bin/env bash
# Fetches the Apache Kafka broker (KRaft) for tests and benchmarks: the jars of compose/kafka/pom.xml
# and their dependencies, copied by Maven into $KAFKA_HOME_DIR/libs. Once per machine; idempotent.
# Needs Java 17+ and Maven (both on these machines); tarball downloads are not reachable here, Maven
# Central is.
#
#   bash compose/install-kafka.sh        # prints the folder of jars on stdout
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
KAFKA_HOME_DIR="${KAFKA_HOME_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/tidings-kafka}"
version="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/kafka/pom.xml")"
libs="$KAFKA_HOME_DIR/$version/libs"

if ! command -v java >/dev/null 2>&1; then
    echo "error: java is not on PATH; Apache Kafka $version needs Java 17 or newer (apt-get install -y openjdk-17-jre-headless)" >&2
    exit 1
fi
java_major="$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | head -n 1)"
if [ -z "$java_major" ] || [ "$java_major" -lt 17 ]; then
    echo "error: Apache Kafka $version needs Java 17 or newer; java -version says ${java_major:-nothing}" >&2
    exit 1
fi

if [ -f "$libs/kafka_2.13-$version.jar" ] && [ -f "$libs/.complete" ]; then
    echo "Apache Kafka $version already installed in $libs" >&2
    echo "$libs"
    exit 0
fi

if ! command -v mvn >/dev/null 2>&1; then
    echo "Maven is not on PATH; installing it from Debian." >&2
    apt-get install -y maven >&2
fi

echo "Fetching Apache Kafka $version with Maven into $libs ..." >&2
rm -rf "$libs"
mkdir -p "$libs"
mvn -q -B -f "$here/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$libs" >&2
touch "$libs/.complete"
echo "Apache Kafka $version installed: $(ls "$libs" | wc -l) jars in $libs" >&2
echo "$libs"
