"""Every Kafka client setting mailmeta uses, in one place: connection and security, then the
producer, consumer and admin defaults. Stages ask here; none writes a client config inline.

Security comes from settings (``MAILMETA_KAFKA_SECURITY_PROTOCOL``, ``…_SASL_MECHANISM``,
``…_SASL_USERNAME``, ``…_SASL_PASSWORD`` or ``…_SASL_PASSWORD_FILE``, ``…_SSL_CA_FILE``, and
``…_SSL_CERT_FILE``/``…_SSL_KEY_FILE`` for mutual TLS). Secrets are read when a client is made
and never logged: error messages name the setting, not its value.
"""

from __future__ import annotations

import logging
import ssl
from typing import Any

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient

from mailmeta.config import Settings

log = logging.getLogger("mailmeta.kafka")
_quiet = logging.getLogger("mailmeta.kafka.probe")
_quiet.addHandler(logging.NullHandler())
_quiet.propagate = False


class KafkaConfigError(RuntimeError):
    """The Kafka connection settings are wrong (bad credentials, unreadable file, no broker)."""


def _password(settings: Settings) -> str:
    if settings.kafka_sasl_password_file is not None:
        try:
            return settings.kafka_sasl_password_file.read_text().strip()
        except OSError as exc:
            raise KafkaConfigError(
                f"MAILMETA_KAFKA_SASL_PASSWORD_FILE cannot be read: {exc.strerror}"
            ) from None
    return settings.kafka_sasl_password.get_secret_value()


def connection(settings: Settings) -> dict[str, Any]:
    """librdkafka's connection and security settings (shared by every confluent client)."""
    conf: dict[str, Any] = {
        "bootstrap.servers": settings.kafka_bootstrap,
        "security.protocol": settings.kafka_security_protocol,
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        conf["sasl.mechanism"] = settings.kafka_sasl_mechanism
        conf["sasl.username"] = settings.kafka_sasl_username
        conf["sasl.password"] = _password(settings)
    if settings.kafka_ssl_ca_file is not None:
        conf["ssl.ca.location"] = str(settings.kafka_ssl_ca_file)
    if settings.kafka_ssl_cert_file is not None:
        conf["ssl.certificate.location"] = str(settings.kafka_ssl_cert_file)
    if settings.kafka_ssl_key_file is not None:
        conf["ssl.key.location"] = str(settings.kafka_ssl_key_file)
    return conf


def producer_config(settings: Settings, **overrides: Any) -> dict[str, Any]:
    """Idempotent, acks from every in-sync replica: a record is acknowledged once it is safe."""
    return {
        **connection(settings),
        "enable.idempotence": True,
        "acks": "all",
        "linger.ms": 5,
        # Java's (and aiokafka's) partitioner: a key lands where other clients put it.
        "partitioner": "murmur2_random",
        **overrides,
    }


def consumer_config(settings: Settings, group_id: str, **overrides: Any) -> dict[str, Any]:
    """Manual commits (after the work is done), from the earliest offset for a new group."""
    return {
        **connection(settings),
        "group.id": group_id,
        "enable.auto.commit": False,
        "auto.offset.reset": "earliest",
        # Kafka's default (45 s) on real clusters; `mailmeta up` and the tests set 6 s, since a
        # group join waits about half of it (DESIGN: Tansu).
        "session.timeout.ms": settings.session_timeout_ms,
        "heartbeat.interval.ms": max(100, min(3000, settings.session_timeout_ms // 3)),
        **overrides,
    }


def admin(settings: Settings) -> AdminClient:
    conf = connection(settings)
    conf["logger"] = _quiet
    return AdminClient(conf)


def faust_broker_options(settings: Settings) -> dict[str, Any]:
    """faust/aiokafka: the broker URL and, with security on, its credentials."""
    import faust  # deferred: only the redaction worker needs faust

    options: dict[str, Any] = {"broker": f"kafka://{settings.kafka_bootstrap}"}
    protocol = settings.kafka_security_protocol
    context = None
    if protocol.endswith("SSL"):
        context = ssl.create_default_context(
            cafile=str(settings.kafka_ssl_ca_file) if settings.kafka_ssl_ca_file else None
        )
        if settings.kafka_ssl_cert_file is not None:
            context.load_cert_chain(
                str(settings.kafka_ssl_cert_file),
                str(settings.kafka_ssl_key_file) if settings.kafka_ssl_key_file else None,
            )
    if protocol.startswith("SASL"):
        options["broker_credentials"] = faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=_password(settings),
            mechanism=settings.kafka_sasl_mechanism,
            ssl_context=context,
        )
    elif context is not None:
        options["broker_credentials"] = faust.SSLCredentials(context)
    return options


def check_connection(settings: Settings, timeout: float = 15.0) -> bool:
    """Fail at start, naming the setting, when the broker refuses these credentials.

    Returns whether the broker answered; a broker that is only unreachable is not an error
    here (stages wait for it: ingest spools, consumers retry).
    """
    seen: list[KafkaError] = []
    conf = connection(settings)
    conf.update(logger=_quiet, error_cb=seen.append)
    client = AdminClient(conf)
    try:
        client.list_topics(timeout=timeout)
        return True
    except KafkaException as exc:
        err = exc.args[0]
        client.poll(1.0)  # serve the queued error callbacks: a refused login is only there
        errors = [*seen, err] if isinstance(err, KafkaError) else seen
        if any(e.code() == KafkaError._AUTHENTICATION for e in errors):
            raise KafkaConfigError(
                f"Kafka at {settings.kafka_bootstrap} refused the credentials of "
                f"MAILMETA_KAFKA_SASL_USERNAME={settings.kafka_sasl_username!r} "
                f"({settings.kafka_sasl_mechanism}): check the user and its password"
            ) from None
        reason = err.str() if isinstance(err, KafkaError) else str(err)
        log.warning("Kafka at %s not reachable yet: %s", settings.kafka_bootstrap, reason)
        return False
