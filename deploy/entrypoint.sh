#!/bin/sh
# Secrets from files: for every MAILMETA_<NAME>_FILE=path, export MAILMETA_<NAME> with the
# file's content (compose `secrets:` and Kubernetes secret volumes mount files, and mailmeta
# reads settings from its environment). Then run the command.
set -eu
for var in $(env | sed -n 's/^\(MAILMETA_[A-Z0-9_]*\)_FILE=.*/\1/p'); do
  file="$(printenv "${var}_FILE")"
  if [ ! -r "$file" ]; then
    echo "mailmeta entrypoint: ${var}_FILE names $file, which cannot be read" >&2
    exit 2
  fi
  export "$var=$(cat "$file")"
  unset "${var}_FILE"
done
exec "$@"
