"""Offline CLI commands (no running pipeline needed)."""

from __future__ import annotations

from pathlib import Path

from argon2 import PasswordHasher
from typer.testing import CliRunner

from mailmeta.cli import app
from tests.conftest import EXAMPLE_CONFIG

runner = CliRunner()


def test_config_validate_ok_and_bad(tmp_path: Path) -> None:
    ok = runner.invoke(app, ["config", "validate", str(EXAMPLE_CONFIG)])
    assert ok.exit_code == 0 and "1 customer(s) OK" in ok.output
    bad = tmp_path / "c.yaml"
    bad.write_text("customers:\n  - {id: a, domains: [a.example], retention_days: 0}\n")
    res = runner.invoke(app, ["config", "validate", str(bad)])
    assert res.exit_code == 2
    assert "customer 'a': field 'retention_days'" in res.output


def test_hash_password_prints_a_verifiable_argon2_hash() -> None:
    res = runner.invoke(app, ["config", "hash-password"], input="s3cret-pass\ns3cret-pass\n")
    assert res.exit_code == 0, res.output
    digest = res.output.strip().splitlines()[-1]
    assert digest.startswith("$argon2")
    assert PasswordHasher().verify(digest, "s3cret-pass")
    short = runner.invoke(app, ["config", "hash-password"], input="short\nshort\n")
    assert short.exit_code == 2 and "password" in short.output


def test_operator_commands_name_the_unreachable_api() -> None:
    res = runner.invoke(app, ["retention", "show", "--api", "http://127.0.0.1:9"])
    assert res.exit_code == 1
    assert "cannot reach the mailmeta API at http://127.0.0.1:9" in res.output


def test_config_validate_says_which_region_serves_whom(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "regions: {eu: {}}\ncustomers:\n"
        "  - {id: a, domains: [a.example], retention_days: 30}\n"
        "  - {id: b, domains: [b.example], retention_days: 30, region: eu}\n"
    )
    res = runner.invoke(app, ["config", "validate", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "region default: a\n  region eu: b\n" in res.output
    cfg.write_text(cfg.read_text().replace("region: eu", "region: ue"))
    res = runner.invoke(app, ["config", "validate", str(cfg)])
    assert res.exit_code == 2 and "field 'region': 'ue' is not declared" in res.output
