"""Settings, customers and their redaction policies, validated on load."""

from mailmeta.config._load import ConfigError, Customers, load_customers
from mailmeta.config._models import (
    POLICY_FIELDS,
    STRICT_DEFAULT_POLICY,
    Action,
    Customer,
    Policy,
    allowed_actions,
)
from mailmeta.config._settings import Settings

__all__ = [
    "POLICY_FIELDS",
    "STRICT_DEFAULT_POLICY",
    "Action",
    "ConfigError",
    "Customer",
    "Customers",
    "Policy",
    "Settings",
    "allowed_actions",
    "load_customers",
]
