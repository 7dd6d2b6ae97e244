"""Shared fixtures: real local brokers (by PID), settings with free loopback ports."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from mailmeta.config import Settings, load_customers
from mailmeta.kafka import ensure_topics
from mailmeta.local.apache_kafka import KafkaNode
from mailmeta.local.brokers import LocalBroker
from mailmeta.local.process import free_port

# Local-mode group timing for every Settings() and every stage subprocess: a group join waits
# about half the session timeout on Tansu, and real clusters' 45 s would slow every test.
os.environ.setdefault("MAILMETA_SESSION_TIMEOUT_MS", "6000")
# The shared test brokers are single nodes; the cluster tests say otherwise in their settings.
os.environ.setdefault("MAILMETA_KAFKA_SINGLE_NODE", "true")

REPO = Path(__file__).resolve().parent.parent
EXAMPLE_CONFIG = REPO / "config" / "customers.example.yaml"


def _start(kind: str, tmp_path_factory: pytest.TempPathFactory) -> LocalBroker:
    data = tmp_path_factory.mktemp(f"{kind}-data") if kind == "noida" else None
    log = tmp_path_factory.mktemp(f"{kind}-log") / "broker.log"
    return LocalBroker(kind, free_port(), data_dir=data, log_path=log).start()  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def tansu(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = _start("tansu", tmp_path_factory)
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def noida(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBroker]:
    broker = _start("noida", tmp_path_factory)
    yield broker
    broker.stop()


# Apache Kafka fixtures (one node, a 3-broker cluster), shared by every module.
pytest_plugins = ["tests.kafka_cluster"]

BROKER_FIXTURES = {"kafka": "apache_kafka", "tansu": "tansu", "noida": "noida"}


def _broker_kinds(metafunc: pytest.Metafunc) -> list[str]:
    """Apache Kafka is the broker every behaviour is proven on; Tansu runs too only where
    broker compatibility is the subject (``@pytest.mark.broker_compat``)."""
    if metafunc.definition.get_closest_marker("broker_compat") is not None:
        return ["kafka", "tansu"]
    return ["kafka"]


def _names_broker(metafunc: pytest.Metafunc, name: str) -> bool:
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0] if mark.args else mark.kwargs.get("argnames", "")
        if name in (names.split(",") if isinstance(names, str) else names):
            return True
    return False


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """A test on a broker runs on Apache Kafka (and Tansu when marked ``broker_compat``),
    unless it names its own (``@pytest.mark.parametrize('broker', ['noida'], indirect=True)``)."""
    kinds = _broker_kinds(metafunc)
    if "broker" in metafunc.fixturenames and not _names_broker(metafunc, "broker"):
        metafunc.parametrize("broker", kinds, indirect=True)
    if "module_broker" in metafunc.fixturenames and not _names_broker(metafunc, "module_broker"):
        metafunc.parametrize("module_broker", kinds, indirect=True, scope="module")


@pytest.fixture
def broker(request: pytest.FixtureRequest) -> LocalBroker | KafkaNode:
    """The broker a test runs on (see pytest_generate_tests)."""
    kind = getattr(request, "param", "kafka")
    return request.getfixturevalue(BROKER_FIXTURES[kind])  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def module_broker(request: pytest.FixtureRequest) -> LocalBroker | KafkaNode:
    """For module-scoped fixtures (a sink shared by a module's tests); parametrised like
    ``broker`` (see pytest_generate_tests)."""
    kind = getattr(request, "param", "kafka")
    return request.getfixturevalue(BROKER_FIXTURES[kind])  # type: ignore[no-any-return]


# The fast tier (`make test-fast`) is every test that starts nothing heavy: no broker, no
# cluster, no Postfix, no `mailmeta up`, no stage subprocess. Marked here from what a test
# uses, so a new test cannot forget its marker.
_HEAVY_FIXTURES = frozenset(
    {"apache_kafka", "kafka_cluster", "tansu", "noida", "broker", "module_broker", "postfix"}
)
_HEAVY_CALLS = (
    "mailmeta_up(",
    "LocalBroker(",
    "KafkaNode(",
    "KafkaCluster(",
    "run_stage(",
    "Postfix(",
    "sys.executable",
)


def _starts_something_heavy(item: pytest.Item) -> bool:
    if _HEAVY_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    function = getattr(item, "function", None)
    try:
        source = inspect.getsource(function) if function is not None else ""
    except (OSError, TypeError):
        return False
    return any(call in source for call in _HEAVY_CALLS)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if _starts_something_heavy(item):
            item.add_marker(pytest.mark.heavy)


_topic_seq = 0


@pytest.fixture
def settings(broker: LocalBroker | KafkaNode, tmp_path: Path) -> Settings:
    """Settings for one test: its own topics on the shared broker, its own data dir and ports."""
    global _topic_seq
    _topic_seq += 1
    prefix = f"t{_topic_seq}-{tmp_path.name[-12:]}"
    s = Settings(
        config=EXAMPLE_CONFIG,
        data_dir=tmp_path / "data",
        kafka_bootstrap=broker.bootstrap,
        raw_topic=f"{prefix}.raw",
        redacted_topic=f"{prefix}.redacted",
        deadletter_topic=f"{prefix}.deadletter",
        policies_topic=f"{prefix}.policies",
        policy_status_topic=f"{prefix}.policy-status",
        smtp_port=free_port(),
        api_port=free_port(),
        # The API requires tokens, as in every deployment: the sink writes the operator's here.
        operator_token_file=tmp_path / "data" / "operator-token",
    )
    ensure_topics(s, load_customers(s.config).shortest_retention_days)
    return s
