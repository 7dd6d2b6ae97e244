#!/bin/sh
# The image's entrypoint: reads the value secrets listed below from files, then runs the command.
#
# Only settings whose value IS the secret and that mailmeta cannot read from a file itself are
# listed: for each name X, X_FILE=path becomes X=<the file's content>
# (compose `secrets:` and Kubernetes Secret volumes mount files). Every other variable passes
# through untouched; in particular the settings that are themselves paths
# (MAILMETA_KAFKA_SSL_CA_FILE, _CERT_FILE, _KEY_FILE, MAILMETA_KAFKA_SASL_PASSWORD_FILE,
# MAILMETA_RELAY_TLS_CA_FILE, MAILMETA_TLS_CERT / _KEY, MAILMETA_OPERATOR_TOKEN_FILE, ...) stay
# paths, and a path to a file not yet written is not an error here.
# tests/test_deploy.py checks this list against config/_settings.py.
set -eu
VALUE_SECRETS="MAILMETA_CLICKHOUSE_DSN"

for name in $VALUE_SECRETS; do
  file="$(printenv "${name}_FILE" || true)"
  [ -n "$file" ] || continue
  if [ -n "$(printenv "$name" || true)" ]; then
    echo "mailmeta-entrypoint: both $name and ${name}_FILE are set: give one" >&2
    exit 2
  fi
  if [ ! -f "$file" ] || [ ! -r "$file" ]; then
    echo "mailmeta-entrypoint: ${name}_FILE=$file: no readable file there (is the secret mounted?)" >&2
    exit 2
  fi
  # $(...) drops trailing newlines, as a secret file written with `echo` has one.
  value="$(cat "$file")"
  if [ -z "$value" ]; then
    echo "mailmeta-entrypoint: ${name}_FILE=$file is empty" >&2
    exit 2
  fi
  export "$name=$value"
  unset "${name}_FILE"
done
exec "$@"
