"""Offline CLI commands (no running pipeline needed)."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from argon2 import PasswordHasher
from click.testing import Result
from typer.testing import CliRunner

from mailmeta.cli import app
from mailmeta.config import MAX_INPUT_BYTES, load_yaml
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


# --- hostile or broken input files and URLs: one line on stderr and an exit code ---------


def _alias_bomb() -> str:
    """ "Billion laughs": < 1 KB that a YAML loader expanding aliases turns into 10^9 strings."""
    doc = 'a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n'
    for prev, name in zip("abcdefghi", "bcdefghij", strict=True):
        doc += f"{name}: &{name} [{','.join(['*' + prev] * 9)}]\n"
    assert len(doc.encode()) < 1024
    return doc


def _inputs(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """Each broken input file and the words its one-line error must hold."""
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("customers:\n  - id: k\xf6ln\n".encode("latin-1"))
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    big = tmp_path / "big.yaml"
    big.write_text("# padding\n" * (MAX_INPUT_BYTES // 10 + 1))
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 20_000)
    return {
        "non-utf8": (latin1, "not UTF-8 text (byte 0xf6 at offset 20)"),
        "alias-bomb": (bomb, "anchors and aliases (& and *) are not allowed"),
        "oversize": (big, "larger than the limit of 1048576 bytes"),
        "nested": (deep, "nested too deeply"),
    }


def _one_line_error(res: Result, path: Path, words: str) -> None:
    assert not isinstance(res.exception, Exception) or isinstance(res.exception, SystemExit), (
        res.exception
    )
    assert res.exit_code == 2, res.output
    assert res.stdout == ""
    assert res.stderr.count("\n") == 1, res.stderr  # one line, no traceback
    assert res.stderr.startswith(f"mailmeta: {path}: ") and words in res.stderr, res.stderr


@pytest.mark.parametrize("case", ["non-utf8", "alias-bomb", "oversize", "nested"])
def test_a_broken_input_file_is_one_line_and_exit_2_for_every_command(
    tmp_path: Path, case: str
) -> None:
    path, words = _inputs(tmp_path)[case]
    # Nothing is listening on port 9: the file is refused before anything is sent.
    api = ["--api", "http://127.0.0.1:9"]
    commands = [
        ["config", "validate", str(path)],
        ["policy", "validate", str(path)],
        ["policy", "preview", "demo", str(path), *api],
        ["policy", "set", "demo", str(path), *api],
        ["up", "--config", str(path), "--data-dir", str(tmp_path / "mm")],
    ]
    for argv in commands:
        t0 = time.monotonic()
        res = runner.invoke(app, argv)
        assert time.monotonic() - t0 < 5, f"{argv} took {time.monotonic() - t0:.1f} s"
        _one_line_error(res, path, words)
    assert not (tmp_path / "mm").exists()  # `up` started nothing


def test_an_alias_bomb_ends_fast_in_the_real_process(tmp_path: Path) -> None:
    """The installed entry point (no CliRunner): bounded time, one line, exit 2."""
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(_alias_bomb())
    t0 = time.monotonic()
    res = subprocess.run(
        [sys.executable, "-m", "mailmeta", "config", "validate", str(bomb)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert time.monotonic() - t0 < 30
    assert res.returncode == 2, res.stderr
    assert res.stderr == (
        f"mailmeta: {bomb}: not valid YAML: anchors and aliases (& and *) are not allowed "
        "(line 1, column 4)\n"
    )


def test_the_customers_format_still_loads_without_anchors() -> None:
    """What refusing anchors costs: nothing the bundled example uses."""
    assert load_yaml(EXAMPLE_CONFIG)["customers"]
    assert "&" not in EXAMPLE_CONFIG.read_text()


@pytest.mark.parametrize(
    "url", ["http://[::1", "http://127.0.0.1:99999", "ftp://127.0.0.1", "127.0.0.1:8025"]
)
def test_an_invalid_api_url_is_one_line_and_exit_2(
    url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for argv in (["retention", "show", "--api", url], ["policy", "list", "--api", url]):
        res = runner.invoke(app, argv)
        assert isinstance(res.exception, SystemExit), res.exception
        assert res.exit_code == 2 and res.stdout == ""
        assert res.stderr.count("\n") == 1 and res.stderr.startswith(
            f"mailmeta: --api / MAILMETA_API: {url!r} is not"
        ), res.stderr
    monkeypatch.setenv("MAILMETA_API", url)  # the same check for the environment variable
    res = runner.invoke(app, ["token", "list"])
    assert res.exit_code == 2 and "MAILMETA_API" in res.stderr


def test_webhooks_command_refuses_a_bad_allow_list_naming_the_setting() -> None:
    r = CliRunner().invoke(
        app, ["webhooks"], env={"MAILMETA_WEBHOOK_ALLOW_NETWORKS": "10.0.0.0/8,nonsense"}
    )
    assert r.exit_code == 2
    assert "MAILMETA_WEBHOOK_ALLOW_NETWORKS: 'nonsense' is not a network" in r.output
