"""Settings, customers and their redaction policies, validated on load."""

from mailmeta.config._load import (
    MAX_INPUT_BYTES,
    ConfigError,
    Customers,
    Elsewhere,
    load_customers,
    load_yaml,
    parse_customers,
)
from mailmeta.config._models import (
    DEFAULT_REGION,
    MAX_POLICY_BYTES,
    MAX_REPLACE_RULES,
    POLICY_FIELDS,
    STRICT_DEFAULT_POLICY,
    Action,
    Customer,
    FieldRule,
    IPNetwork,
    Policy,
    Region,
    allowed_actions,
    parse_host_port,
    parse_networks,
)
from mailmeta.config._settings import TOPIC_SETTINGS, Settings
from mailmeta.config._webhooks import NetworkGuard, Refused, split_url

__all__ = [
    "DEFAULT_REGION",
    "MAX_INPUT_BYTES",
    "MAX_POLICY_BYTES",
    "MAX_REPLACE_RULES",
    "POLICY_FIELDS",
    "STRICT_DEFAULT_POLICY",
    "TOPIC_SETTINGS",
    "Action",
    "ConfigError",
    "Customer",
    "Customers",
    "Elsewhere",
    "FieldRule",
    "IPNetwork",
    "NetworkGuard",
    "Policy",
    "Refused",
    "Region",
    "Settings",
    "allowed_actions",
    "load_customers",
    "load_yaml",
    "parse_customers",
    "parse_host_port",
    "parse_networks",
    "split_url",
]
