#!/usr/bin/env bash
# Fetch a pinned Apache Kafka broker (KRaft) for tests and benchmarks into .tools/kafka-<version>/:
# its jars from Maven Central with the machine's `mvn`, and a small log4j2 config. Idempotent.
# The version is the one pinned in tests/tools/kafka-pom.xml. Run by `make test`.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
POM="$HERE/kafka-pom.xml"
DEST="${1:-.tools}"
VERSION="$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$POM")"
[[ -n "$VERSION" ]] || { echo "fetch_kafka: no <kafka.version> in $POM" >&2; exit 1; }
mkdir -p "$DEST"
DEST="$(cd "$DEST" && pwd)"
HOME_DIR="$DEST/kafka-$VERSION"
# The stamp is written last, so a fetch cut short is redone, never half-used.
if [[ -f "$HOME_DIR/.complete" ]]; then exit 0; fi
command -v mvn >/dev/null || { echo "fetch_kafka: Maven (mvn) is needed to fetch Kafka" >&2; exit 1; }
command -v java >/dev/null || [[ -n "${JAVA_HOME:-}" ]] \
  || { echo "fetch_kafka: a Java 17+ runtime is needed to run Kafka" >&2; exit 1; }
work="$(mktemp -d "$DEST/.kafka-fetch.XXXXXX")"
trap 'rm -rf "$work"' EXIT
mvn -q -B -f "$POM" dependency:copy-dependencies \
  -DincludeScope=runtime -DoutputDirectory="$work/libs"
test -f "$work/libs/kafka_2.13-$VERSION.jar"
mkdir -p "$work/config"
cp "$HERE/kafka-log4j2.properties" "$work/config/log4j2.properties"
echo "$VERSION" > "$work/VERSION"
rm -rf "$HOME_DIR"
mv "$work" "$HOME_DIR"
touch "$HOME_DIR/.complete"
echo "Apache Kafka $VERSION in $HOME_DIR"
