#!/usr/bin/env sh
# Creates the secret files compose.yaml reads (deploy/secrets/, git-ignored), once: existing
# files are kept, so running it again never changes a password a cluster already uses.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
# Hex only: the password also goes into a URL (the DSN) and must need no escaping there.
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
if [ ! -s "$dir/clickhouse_password" ]; then
  random >"$dir/clickhouse_password"
  rm -f "$dir/clickhouse_dsn"
fi
if [ ! -s "$dir/clickhouse_dsn" ]; then
  # "clickhouse" is a network alias of all four ClickHouse servers (compose.yaml).
  printf 'http://mailmeta:%s@clickhouse:8123/default' "$(cat "$dir/clickhouse_password")" \
    >"$dir/clickhouse_dsn"
fi
[ -s "$dir/clickhouse_cluster_secret" ] || random >"$dir/clickhouse_cluster_secret"
# Containers run as other users than the one running compose: they must be able to read these.
chmod 0644 "$dir/clickhouse_password" "$dir/clickhouse_dsn" "$dir/clickhouse_cluster_secret"
echo "secrets in $dir"
