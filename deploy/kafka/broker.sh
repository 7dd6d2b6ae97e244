#!/bin/sh
# Starts one Kafka node of compose.yaml (the image's entrypoint replaced): server.properties
# with this node's id, host name and the broker user's password, a storage format on first
# start that also creates the SCRAM users (KRaft keeps them in its metadata log), then Kafka.
# NODE_ID, NODE_HOST, CLUSTER_ID come from compose.yaml; the passwords from its secrets.
set -eu
: "${NODE_ID:?}" "${NODE_HOST:?}" "${CLUSTER_ID:?}"
broker_password="$(cat /run/secrets/kafka_broker_password)"
client_password="$(cat /run/secrets/kafka_password)"
props=/tmp/server.properties
# The passwords are hex (make-secrets.sh): nothing in them needs escaping for sed or JAAS.
sed -e "s/@NODE_ID@/$NODE_ID/" -e "s/@HOST@/$NODE_HOST/" -e "s/@BROKER_PASSWORD@/$broker_password/" \
  /etc/kafka/mailmeta/server.properties >"$props"
# What the health check's admin client uses: the broker user, the compose CA.
cat >/tmp/client.properties <<PROPS
security.protocol=SASL_SSL
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=org.apache.kafka.common.security.scram.ScramLoginModule required username="broker" password="$broker_password";
ssl.truststore.type=PEM
ssl.truststore.location=/run/secrets/kafka_ca
PROPS
# Once per data volume (--ignore-formatted): a later change of a password in the secret files
# does not reach Kafka; change it with kafka-configs.sh --alter --add-config (deploy/README.md).
/opt/kafka/bin/kafka-storage.sh format --ignore-formatted --cluster-id "$CLUSTER_ID" --config "$props" \
  --add-scram "SCRAM-SHA-512=[name=broker,password=$broker_password]" \
  --add-scram "SCRAM-SHA-512=[name=mailmeta,password=$client_password]" >/dev/null
exec /opt/kafka/bin/kafka-server-start.sh "$props"
