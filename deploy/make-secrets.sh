#!/usr/bin/env sh
# Creates the secret files compose.yaml reads (deploy/secrets/, git-ignored), once: existing
# files are kept, so running it again never changes a password or certificate a cluster
# already uses. Needs openssl.
#   ClickHouse: password, DSN, inter-server secret.
#   Kafka (SASL_SSL): passwords of the SCRAM users "mailmeta" (the stages) and "broker"
#   (replication, health checks); a CA and the brokers' key and certificate (kafka_broker_pem).
#   STARTTLS on ingest and HTTPS on the API proxy: keys and certificates from the same CA
#   (ca.pem: give it to clients, e.g. curl --cacert). For a public MX, replace smtp_tls_*.pem
#   with a certificate of a public CA for the MX host name; for the API, one your users trust.
set -eu
dir="$(cd "$(dirname "$0")" && pwd)/secrets"
mkdir -p "$dir"
cd "$dir"
# Hex only: the password also goes into a URL (the DSN), Kafka's JAAS configuration and
# kafka-storage's --add-scram syntax, and must need no escaping in any of them.
random() { od -An -N24 -tx1 /dev/urandom | tr -d ' \n'; }
if [ ! -s clickhouse_password ]; then
  random >clickhouse_password
  rm -f clickhouse_dsn
fi
if [ ! -s clickhouse_dsn ]; then
  # "clickhouse" is a network alias of all four ClickHouse servers (compose.yaml).
  printf 'http://mailmeta:%s@clickhouse:8123/default' "$(cat clickhouse_password)" >clickhouse_dsn
fi
[ -s clickhouse_cluster_secret ] || random >clickhouse_cluster_secret
[ -s kafka_password ] || random >kafka_password
[ -s kafka_broker_password ] || random >kafka_broker_password

# The CA; a new one invalidates every certificate it signed.
if [ ! -s ca.pem ] || [ ! -s ca.key ]; then
  openssl req -x509 -new -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650 \
    -subj "/CN=mailmeta compose CA" 2>/dev/null
  rm -f kafka_broker.pem smtp_tls_cert.pem smtp_tls_key.pem api_tls_cert.pem api_tls_key.pem
fi
# leaf NAME CN SUBJECT_ALT_NAMES: NAME_key.pem and NAME_cert.pem, signed by the CA.
leaf() {
  [ -s "$1_cert.pem" ] && [ -s "$1_key.pem" ] && return 0
  printf 'basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth,clientAuth\nsubjectAltName=%s\n' "$3" >"$1.ext"
  openssl req -new -newkey rsa:2048 -nodes -keyout "$1_key.pem" -out "$1.csr" -subj "/CN=$2" 2>/dev/null
  openssl x509 -req -in "$1.csr" -CA ca.pem -CAkey ca.key -set_serial "0x$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')" -days 825 \
    -extfile "$1.ext" -out "$1_cert.pem" 2>/dev/null
  rm -f "$1.csr" "$1.ext"
}
# Brokers: each compose host name, and localhost for the health check inside the container.
# Kafka reads key and certificate from one PEM file (ssl.keystore.type=PEM).
if [ ! -s kafka_broker.pem ]; then
  leaf kafka_broker kafka "DNS:kafka-1,DNS:kafka-2,DNS:kafka-3,DNS:localhost"
  cat kafka_broker_key.pem kafka_broker_cert.pem >kafka_broker.pem
  rm -f kafka_broker_key.pem kafka_broker_cert.pem
fi
cp ca.pem kafka_ca
leaf smtp_tls mx.example "DNS:mx.example,DNS:localhost,IP:127.0.0.1"
leaf api_tls localhost "DNS:localhost,DNS:api-tls,IP:127.0.0.1"
# Containers run as other users than the one running compose (compose mounts secret files
# as they are): they must be able to read these. The CA's key is not mounted anywhere.
chmod 0644 clickhouse_password clickhouse_dsn clickhouse_cluster_secret kafka_password \
  kafka_broker_password kafka_ca kafka_broker.pem smtp_tls_cert.pem smtp_tls_key.pem \
  api_tls_cert.pem api_tls_key.pem ca.pem
chmod 0600 ca.key
echo "secrets in $dir"
