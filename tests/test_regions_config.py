"""Region pinning in the configuration: declared regions, pinned customers, and the topics and
consumer groups a process of a region uses."""

from __future__ import annotations

from typing import Any

import pytest

from mailmeta.config import DEFAULT_REGION, ConfigError, Settings, parse_customers


def _file(**extra: Any) -> dict[str, Any]:
    return {
        "regions": {"eu": {"api_url": "https://eu.api.example", "smtp_host": "mx.eu.example"}},
        "customers": [
            {"id": "here", "domains": ["here.example"], "retention_days": 30},
            {"id": "acme", "domains": ["acme.example"], "retention_days": 60, "region": "eu"},
        ],
        **extra,
    }


def test_each_process_sees_every_customer_and_serves_only_its_region() -> None:
    customers = parse_customers(_file(), "c.yaml")
    assert customers.region == DEFAULT_REGION
    assert [c.id for c in customers.here()] == ["here"]
    acme = customers.served_elsewhere("acme")
    assert acme is not None and acme.region == "eu"
    assert customers.served_elsewhere("here") is None
    assert customers.served_elsewhere("nobody") is None  # not this file's to judge
    eu = customers.serving("eu")
    assert [c.id for c in eu.here()] == ["acme"]
    here = eu.served_elsewhere("here")
    assert here is not None and here.region == DEFAULT_REGION
    assert here.reason() == "customer 'here' is served in region 'default', not in 'eu'"
    assert eu.served_elsewhere("acme") is None
    assert [c.id for c in eu.regional()] == ["acme"]
    assert eu.shortest_retention_days == 60  # its own customers' (the EU topics' retention)
    assert acme.where() == "region 'eu' (https://eu.api.example, mx.eu.example)"
    assert (acme.api_url, acme.smtp_host) == ("https://eu.api.example", "mx.eu.example")


def test_a_customer_in_an_undeclared_region_is_refused_naming_it() -> None:
    data = _file()
    data["customers"][1]["region"] = "ue"
    with pytest.raises(ConfigError, match="customer 'acme': field 'region': 'ue' is not declared"):
        parse_customers(data, "c.yaml")


@pytest.mark.parametrize("name", ["EU", "eu_west", "-eu", "a" * 17, ""])
def test_region_names_are_short_lowercase_words(name: str) -> None:
    data = _file()
    data["customers"][1]["region"] = name
    with pytest.raises(ConfigError, match="customer 'acme': field 'region'"):
        parse_customers(data, "c.yaml")


def test_the_default_region_may_declare_where_it_is() -> None:
    data = _file(regions={"eu": {}, "default": {"smtp_host": "mx.example"}})
    customers = parse_customers(data, "c.yaml").serving("eu")
    assert customers.region_names() == ["default", "eu"]
    here = customers.served_elsewhere("here")
    assert here is not None and here.where() == "region 'default' (mx.example)"


def test_a_process_of_an_unknown_region_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"MAILMETA_REGION=.us. is not a region of c\.yaml"):
        parse_customers(_file(), "c.yaml").serving("us")


def test_a_region_gets_its_own_topics_and_groups(monkeypatch: pytest.MonkeyPatch) -> None:
    plain = Settings()
    monkeypatch.setenv("MAILMETA_REGION", "eu")
    monkeypatch.setenv("MAILMETA_DEADLETTER_TOPIC", "ops.dead.eu")
    eu = Settings()
    assert eu.raw_topic == f"{plain.raw_topic}.eu"
    assert eu.redacted_topic == f"{plain.redacted_topic}.eu"
    assert eu.policies_topic == f"{plain.policies_topic}.eu"
    assert eu.policy_status_topic == f"{plain.policy_status_topic}.eu"
    assert eu.deadletter_topic == "ops.dead.eu"  # set explicitly: used as given
    assert eu.group_id("mailmeta-sink") == "mailmeta-sink.eu"
    assert plain.group_id("mailmeta-sink") == "mailmeta-sink"
