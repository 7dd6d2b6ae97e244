"""deploy/ validated as far as these machines allow (no Docker engine, ClickHouse server or
Kubernetes here): the compose file against the Compose Specification's JSON schema and its own
cross-references, the Helm chart through `helm lint` and `helm template | kubeconform -strict`,
the alert rules through `promtool check rules`, every MAILMETA_* name against the settings,
every command against the CLI and stage modules, and every metric in the dashboard and the
rules against the metrics mailmeta's modules register. Tools: tests/tools/fetch_deploy_tools.sh
(`make test` runs it)."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import pkgutil
import re
import shlex
import shutil
import ssl
import subprocess
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import jsonschema
import pytest
import typer.main
import yaml
from pydantic import SecretStr

import mailmeta
from mailmeta.cli import app as cli_app
from mailmeta.config import Settings
from tests.conftest import REPO

DEPLOY = REPO / "deploy"
CHART = DEPLOY / "helm" / "mailmeta"
TOOLS = REPO / ".tools"
KNOWN = {f"MAILMETA_{name.upper()}" for name in Settings.model_fields}
# The Kubernetes release whose API schemas the rendered chart must satisfy.
K8S_VERSION = "1.33.0"
DUMMY_DSN = "http://mailmeta:secret@clickhouse:8123/default"
MAILMETA_STAGES = {"ingest", "streams", "sinks", "api"}


def tool(name: str) -> Path:
    path = TOOLS / "bin" / name
    if not os.access(path, os.X_OK):
        pytest.fail(f"{path} missing: run tests/tools/fetch_deploy_tools.sh (make test does)")
    return path


def run(*cmd: str | Path, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(c) for c in cmd], capture_output=True, text=True, timeout=120, **kw)


def compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    return doc


def mailmeta_services(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in doc["services"].items() if s.get("image", "").startswith("mailmeta")}


# --- compose -------------------------------------------------------------------------------


def test_compose_matches_the_compose_specification() -> None:
    schema_file = TOOLS / "share" / "compose-spec.json"
    if not schema_file.exists():
        pytest.fail(f"{schema_file} missing: run tests/tools/fetch_deploy_tools.sh")
    schema = json.loads(schema_file.read_text())
    validator = jsonschema.Draft202012Validator(schema)
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(compose())]
    assert not errors, "\n".join(errors)
    # The schema is strict enough to catch a misspelt key (it would otherwise prove little).
    broken = compose()
    broken["services"]["ingest"]["healthchek"] = broken["services"]["ingest"].pop("healthcheck")
    assert not validator.is_valid(broken)


def test_docker_compose_config() -> None:
    docker = shutil.which("docker")
    if docker is None or run(docker, "compose", "version").returncode != 0:
        pytest.skip("no `docker compose` plugin on this machine (the schema test covers the file)")
    secrets = DEPLOY / "secrets"
    # The files make-secrets.sh would create must exist for compose to resolve `secrets:`.
    names = [Path(e["file"]).name for e in compose()["secrets"].values()]
    missing = [f for f in names if not (secrets / f).exists()]
    try:
        for f in missing:
            (secrets / f).write_text("placeholder")
        res = run(docker, "compose", "-f", DEPLOY / "compose.yaml", "config", "-q")
        assert res.returncode == 0, res.stderr
    finally:
        for f in missing:
            (secrets / f).unlink()


def test_compose_cross_references_hold() -> None:
    doc = compose()
    services = doc["services"]
    for name, spec in services.items():
        for dep in spec.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"
        for secret in spec.get("secrets", []):
            assert secret in doc["secrets"], f"{name}: undeclared secret {secret}"
        for config in spec.get("configs", []):
            assert config["source"] in doc["configs"], f"{name}: undeclared config {config}"
        for volume in spec.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: bind source {source} missing"
            elif ":" in volume:
                assert source in doc["volumes"], f"{name}: undeclared volume {source}"
    for entry in [*doc["configs"].values()]:
        assert (DEPLOY / entry["file"]).is_file(), entry
    # Secrets come from files make-secrets.sh creates, and are never committed.
    script = (DEPLOY / "make-secrets.sh").read_text()
    for entry in doc["secrets"].values():
        assert entry["file"].startswith("./secrets/")
        assert Path(entry["file"]).name in script
    assert (DEPLOY / "secrets" / ".gitignore").read_text().splitlines()[-2:] == [
        "*",
        "!.gitignore",
    ]
    # Published host ports never collide (ranges give each replica its own).
    published: list[int] = []
    for spec in services.values():
        for port in spec.get("ports", []):
            host = port.rsplit(":", 1)[0].split(":")[-1]
            lo, _, hi = host.partition("-")
            published += range(int(lo), int(hi or lo) + 1)
    assert len(published) == len(set(published))


def test_compose_runs_a_production_shaped_cluster() -> None:
    doc = compose()
    services = doc["services"]
    brokers = {n: s for n, s in services.items() if s.get("image", "").startswith("apache/kafka")}
    assert len(brokers) == 3
    props = kafka_properties()
    voters = {
        v.split("@")[1].split(":")[0]: int(v.split("@")[0])
        for v in props["controller.quorum.voters"].split(",")
    }
    for name, spec in brokers.items():
        env = spec["environment"]
        assert voters[name] == env["NODE_ID"] and env["NODE_HOST"] == name
        assert "./kafka:/etc/kafka/mailmeta:ro" in spec["volumes"]
    assert props["default.replication.factor"] == "3" and props["min.insync.replicas"] == "2"
    assert props["auto.create.topics.enable"] == "false"
    bootstrap = services["ingest"]["environment"]["MAILMETA_KAFKA_BOOTSTRAP"].split(",")
    assert sorted(h.split(":")[0] for h in bootstrap) == sorted(brokers)

    # ClickHouse: every server of cluster.xml is a compose service with its shard and replica
    # macros; the keepers of cluster.xml are the Raft members of keeper.xml and compose.
    cluster = ET.parse(DEPLOY / "clickhouse" / "cluster.xml").getroot()
    shards = cluster.findall("./remote_servers/mailmeta/shard")
    assert len(shards) == 2
    for number, shard in enumerate(shards, 1):
        hosts = [r.findtext("host") for r in shard.findall("replica")]
        assert len(hosts) == 2
        replicas = set()
        for host in hosts:
            env = services[str(host)]["environment"]
            assert env["CLICKHOUSE_SHARD"] == str(number)
            replicas.add(env["CLICKHOUSE_REPLICA"])
            assert "clickhouse" in services[str(host)]["networks"]["default"]["aliases"]
        assert len(replicas) == 2
    keepers = {n.findtext("host") for n in cluster.findall("./zookeeper/node")}
    raft = ET.parse(DEPLOY / "clickhouse" / "keeper.xml").getroot()
    members = {
        s.findtext("hostname"): int(str(s.findtext("id")))
        for s in raft.findall("./keeper_server/raft_configuration/server")
    }
    assert keepers == set(members) and len(members) == 3
    for host, server_id in members.items():
        assert services[str(host)]["environment"]["KEEPER_SERVER_ID"] == server_id

    # Every stage: >= 2 replicas, a health check, a restart policy, resource limits, and it
    # starts only after the topics and the schema exist.
    for stage in MAILMETA_STAGES:
        spec = services[stage]
        assert spec["deploy"]["replicas"] >= 2, stage
        assert spec["healthcheck"]["test"][0] == "CMD", stage
        assert spec["restart"] == "unless-stopped", stage
        assert {"cpus", "memory"} <= set(spec["deploy"]["resources"]["limits"]), stage
        assert spec["depends_on"]["init-kafka"]["condition"] == "service_completed_successfully"
        assert spec["depends_on"]["init-store"]["condition"] == "service_completed_successfully"
    for name, spec in services.items():
        assert "healthcheck" in spec or name.startswith("init-"), name
        assert {"cpus", "memory"} <= set(spec["deploy"]["resources"]["limits"]), name
    # No password is written into the file: processes get the DSN from a secret file.
    for spec in mailmeta_services(doc).values():
        assert "MAILMETA_CLICKHOUSE_DSN" not in spec["environment"]
    assert "PASSWORD:" not in (DEPLOY / "compose.yaml").read_text().replace("PASSWORD_FILE:", "")


def kafka_properties() -> dict[str, str]:
    lines = (DEPLOY / "kafka" / "server.properties").read_text().splitlines()
    return dict(ln.split("=", 1) for ln in lines if ln and not ln.startswith("#"))


def mounted_secret(spec: dict[str, Any], path: str) -> str:
    """The compose secret a service mounts at ``path`` (/run/secrets/NAME)."""
    name = path.removeprefix("/run/secrets/")
    assert path.startswith("/run/secrets/") and name in spec.get("secrets", []), path
    return name


def test_compose_runs_kafka_with_sasl_ssl_and_ingest_with_starttls() -> None:
    """Every connection to Kafka is SASL_SSL (SCRAM over TLS) or TLS; no PLAINTEXT listener
    is left; every stage authenticates with files from secrets it mounts; ingest offers
    STARTTLS with a mounted certificate and key."""
    doc = compose()
    props = kafka_properties()
    protocols = dict(p.split(":") for p in props["listener.security.protocol.map"].split(","))
    assert protocols == {"SASL_SSL": "SASL_SSL", "CONTROLLER": "SSL"}
    listeners = props["listeners"] + "," + props["advertised.listeners"]
    assert {x.split("://")[0] for x in listeners.split(",")} <= set(protocols)
    assert props["inter.broker.listener.name"] == "SASL_SSL"
    assert props["listener.name.controller.ssl.client.auth"] == "required"
    assert props["sasl.enabled.mechanisms"] == "SCRAM-SHA-512"
    brokers = [s for s in doc["services"].values() if s["image"].startswith("apache/kafka")]
    for spec in brokers:
        for key in ("ssl.keystore.location", "ssl.truststore.location"):
            mounted_secret(spec, props[key])
    script = (DEPLOY / "kafka" / "broker.sh").read_text()
    for path in re.findall(r"/run/secrets/\w+", script):
        for spec in brokers:
            mounted_secret(spec, path)
    # The stages' user is one broker.sh creates, with the password file the stages read.
    assert "name=mailmeta,password=$client_password" in script
    assert 'client_password="$(cat /run/secrets/kafka_password)"' in script
    for name, spec in mailmeta_services(doc).items():
        settings = settings_from(spec["environment"])
        assert settings.kafka_security_protocol == "SASL_SSL", name
        assert settings.kafka_sasl_mechanism == props["sasl.enabled.mechanisms"], name
        assert settings.kafka_sasl_username == "mailmeta", name
        assert mounted_secret(spec, str(settings.kafka_sasl_password_file)) == "kafka_password"
        assert mounted_secret(spec, str(settings.kafka_ssl_ca_file)) == "kafka_ca"
    ingest = settings_from(doc["services"]["ingest"]["environment"])
    assert mounted_secret(doc["services"]["ingest"], ingest.tls_cert) == "smtp_tls_cert"
    assert mounted_secret(doc["services"]["ingest"], ingest.tls_key) == "smtp_tls_key"
    assert doc["secrets"]["kafka_ca"]["file"] == "./secrets/kafka_ca"


def test_compose_deploys_the_versions_the_tests_run() -> None:
    """Kafka: the release tests/tools/kafka-pom.xml pins (the broker every test runs on);
    ClickHouse and its Keeper: the engine release of chdb, the store's tests' engine."""
    import chdb

    pom = ET.parse(REPO / "tests" / "tools" / "kafka-pom.xml").getroot()
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    kafka = pom.findtext("./m:properties/m:kafka.version", namespaces=ns)
    assert kafka and re.fullmatch(r"\d+\.\d+\.\d+", kafka)
    clickhouse = ".".join(chdb.engine_version.split(".")[:2])
    images = {s["image"] for s in compose()["services"].values()}
    assert {i for i in images if i.startswith("apache/kafka:")} == {f"apache/kafka:{kafka}"}
    assert {i.split("/")[1] for i in images if i.startswith("clickhouse/")} == {
        f"clickhouse-server:{clickhouse}",
        f"clickhouse-keeper:{clickhouse}",
    }


def test_compose_serves_the_api_only_through_the_tls_proxy() -> None:
    doc = compose()
    services = doc["services"]
    assert "ports" not in services["api"] and "ports" not in services["sinks"]
    proxy = services["api-tls"]
    assert proxy["ports"] == ["8443:8443"]
    (config,) = proxy["configs"]
    assert config["target"] == "/etc/nginx/nginx.conf"
    conf = (DEPLOY / doc["configs"][config["source"]]["file"]).read_text()
    assert conf == (CHART / "files" / "api-tls-nginx.conf").read_text()  # one configuration
    assert re.findall(r"^\s*listen (\S+)( ssl)?;", conf, re.M) == [
        ("8443", " ssl"),
        ("127.0.0.1:8080", ""),
    ]
    for directive in ("ssl_certificate", "ssl_certificate_key"):
        (path,) = re.findall(rf"^\s*{directive} (\S+);", conf, re.M)
        assert mounted_secret(proxy, path).startswith("api_tls_")
    # The upstream: the api replicas (a network alias), on the port their settings serve.
    (upstream,) = re.findall(r"^\s*server ([\w-]+):(\d+);", conf, re.M)
    assert upstream[0] in services["api"]["networks"]["default"]["aliases"]
    port = services["api"]["environment"].get("MAILMETA_API_PORT", Settings().api_port)
    assert int(upstream[1]) == int(port)
    assert proxy["healthcheck"]["test"][-1] == "http://127.0.0.1:8080/healthz"


def nginx() -> str:
    """Debian's nginx, unpacked into .tools/ by tests/tools/fetch.sh (make test runs it)."""
    found = TOOLS / "usr" / "sbin" / "nginx"
    if not found.exists():
        pytest.fail("no .tools/usr/sbin/nginx: run tests/tools/fetch.sh .tools (make test does)")
    return str(found)


def test_api_tls_proxy_serves_the_api_over_https(tmp_path: Path) -> None:
    """The proxy's configuration, run by a real nginx with make-secrets.sh's certificate in
    front of a real API: HTTPS that verifies against the compose CA, the bearer token passed
    through, the health check on the loopback port."""
    import httpx

    from mailmeta.local.process import free_port
    from tests.api_helpers import ApiServer

    shutil.copy(DEPLOY / "make-secrets.sh", tmp_path / "make-secrets.sh")
    assert run("sh", tmp_path / "make-secrets.sh").returncode == 0
    secrets = tmp_path / "secrets"
    api = ApiServer(tmp_path)  # started once nginx accepts the configuration
    https_port, health_port = free_port(), free_port()
    conf = (CHART / "files" / "api-tls-nginx.conf").read_text()
    # The deployment's paths, ports and upstream name, pointed at this machine's.
    for old, new in [
        ("/tmp/", f"{tmp_path}/"),
        ("/run/secrets/api_tls_cert;", f"{secrets}/api_tls_cert.pem;"),
        ("/run/secrets/api_tls_key;", f"{secrets}/api_tls_key.pem;"),
        ("listen 8443 ssl;", f"listen 127.0.0.1:{https_port} ssl;"),
        ("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{health_port};"),
        ("server mailmeta-api:8025;", f"server 127.0.0.1:{api.port};"),
    ]:
        assert conf.count(old) >= 1, old
        conf = conf.replace(old, new)
    (tmp_path / "nginx.conf").write_text(conf)
    cmd = [nginx(), "-e", "stderr", "-p", str(tmp_path), "-c", str(tmp_path / "nginx.conf")]
    check = run(*cmd, "-t")
    assert check.returncode == 0, check.stderr
    api.start()
    log = tmp_path / "nginx.log"
    with log.open("w") as err, subprocess.Popen([*cmd, "-g", "daemon off;"], stderr=err) as proc:
        try:
            base = f"https://localhost:{https_port}"
            ca = ssl.create_default_context(cafile=secrets / "ca.pem")
            deadline = time.monotonic() + 15
            while True:
                assert proc.poll() is None, log.read_text()
                try:
                    with httpx.Client(verify=ca, timeout=5) as c:
                        r = c.get(
                            f"{base}/v1/me", headers={"Authorization": f"Bearer {api.operator}"}
                        )
                    break
                except httpx.ConnectError:
                    assert time.monotonic() < deadline, "nginx not serving within 15 s"
                    time.sleep(0.05)
            assert r.status_code == 200, r.text
            assert r.headers["strict-transport-security"] == "max-age=31536000"
            with httpx.Client(verify=ca, timeout=5) as c:
                assert c.get(f"{base}/v1/me").status_code == 401  # no token: the API's answer
            # A client that does not trust the compose CA refuses the connection.
            with pytest.raises(httpx.ConnectError), httpx.Client(timeout=5) as c:
                c.get(f"{base}/v1/me")
            health = httpx.get(f"http://127.0.0.1:{health_port}/healthz", timeout=5)
            assert health.status_code == 200
        finally:
            proc.terminate()
            proc.wait(10)
            api.stop()


def test_compose_health_checks_probe_the_ports_the_stages_serve() -> None:
    """Each stage's health check targets the port its settings make it serve."""
    services = compose()["services"]
    expected = {
        "ingest": ("MAILMETA_SMTP_PORT", Settings.model_fields["smtp_port"].default),
        "streams": ("MAILMETA_STREAMS_METRICS_PORT", None),
        "sinks": ("MAILMETA_API_PORT", Settings.model_fields["api_port"].default),
        "api": ("MAILMETA_API_PORT", Settings.model_fields["api_port"].default),
    }
    for stage, (var, default) in expected.items():
        env = services[stage]["environment"]
        port = int(env.get(var, default))
        assert f"127.0.0.1:{port}" in services[stage]["healthcheck"]["test"][-1] or (
            f"'127.0.0.1', {port}" in services[stage]["healthcheck"]["test"][-1]
        ), stage


# --- names: settings, modules, CLI commands -----------------------------------------------


def deploy_files() -> Iterator[Path]:
    for path in sorted(DEPLOY.rglob("*")):
        if path.is_file() and "secrets" not in path.relative_to(DEPLOY).parts:
            yield path


def test_every_mailmeta_variable_named_in_deploy_is_a_setting() -> None:
    # Comments and docs count too: telling an operator to set a variable nothing reads is a bug.
    named: dict[str, set[str]] = {}
    for path in [*deploy_files(), REPO / ".dockerignore"]:
        for var in re.findall(r"MAILMETA_[A-Z0-9_]*[A-Z0-9]", path.read_text()):
            named.setdefault(var, set()).add(str(path.relative_to(REPO)))
    # MAILMETA_X_FILE: a path setting of its own, or a value secret deploy/entrypoint.sh reads.
    from_files = {f"{v}_FILE" for v in entrypoint_value_secrets()}
    unknown = {v: sorted(f) for v, f in named.items() if v not in KNOWN | from_files}
    assert not unknown, f"not mailmeta settings: {unknown}"
    assert len(named) >= 8  # the scan did find the names in use


def settings_from(env: dict[str, Any]) -> Settings:
    """The settings a container with this environment would run with."""
    values = {}
    from_files = {f"{v}_FILE" for v in entrypoint_value_secrets()}
    for key, value in env.items():
        # The entrypoint reads these from their files; every other *_FILE stays a path.
        key = key.removesuffix("_FILE") if key in from_files else key
        if key == "MAILMETA_CLICKHOUSE_DSN":
            value = DUMMY_DSN  # from a secret file or a Secret in the real deployment
        values[key.removeprefix("MAILMETA_").lower()] = value
    return Settings(**values)


def test_compose_environments_parse_as_settings() -> None:
    for name, spec in mailmeta_services(compose()).items():
        env = spec["environment"]
        assert set(env) <= KNOWN | {f"{v}_FILE" for v in entrypoint_value_secrets()}, name
        settings = settings_from(env)
        assert settings.kafka_bootstrap.count(",") == 2, name
        if "MAILMETA_CLICKHOUSE_DSN_FILE" in env:
            assert settings.resolved_dsn() == DUMMY_DSN
            assert "clickhouse_dsn" in spec["secrets"], name


def cli_commands() -> set[tuple[str, ...]]:
    """Every runnable (non-group) command of the `mailmeta` CLI, as word tuples."""
    found: set[tuple[str, ...]] = set()

    def walk(cmd: click.Command, path: tuple[str, ...]) -> None:
        # Duck-typed: Typer's groups are not click.Group subclasses in every Typer release.
        subs: dict[str, click.Command] | None = getattr(cmd, "commands", None)
        if subs is not None:
            for name, sub in subs.items():
                walk(sub, (*path, name))
        else:
            found.add(path)

    walk(typer.main.get_command(cli_app), ())
    return found


def check_command(argv: list[str], where: str) -> None:
    """A container command runs a stage module or a CLI command that exists."""
    if argv[:2] == ["sh", "-c"]:
        for part in re.split(r"\|\||&&|;", argv[2]):
            words = shlex.split(part)
            words = words[1:] if words[:1] == ["exec"] else words
            if words[:1] == ["mailmeta"]:
                check_command(words, where)
        return
    if argv[:2] == ["python", "-m"]:
        assert importlib.util.find_spec(argv[2] + ".__main__") is not None, (where, argv)
        return
    assert argv[0] == "mailmeta", (where, argv)
    words = tuple(argv[1:])
    commands = cli_commands()
    assert any(words[:n] in commands for n in range(1, len(words) + 1)), (
        f"{where}: `{' '.join(argv)}` is not a mailmeta command"
    )


def test_every_command_is_a_stage_module_or_cli_command() -> None:
    doc = compose()
    for name, spec in mailmeta_services(doc).items():
        check_command(spec["command"], f"compose {name}")
    init = [spec["command"] for n, spec in doc["services"].items() if n.startswith("init-")]
    flat = " ".join(" ".join(c) for c in init)
    for needed in ("mailmeta kafka init", "mailmeta store migrate", "mailmeta token bootstrap"):
        assert needed in flat
    for doc_ in helm_render():
        for container in containers(doc_):
            if container["image"].startswith("mailmeta:"):  # not the TLS proxy's nginx
                check_command(container["command"], f"helm {doc_['kind']} {container['name']}")


# --- the entrypoint and the secrets script: run for real ----------------------------------


def entrypoint_value_secrets() -> list[str]:
    text = (DEPLOY / "entrypoint.sh").read_text()
    (line,) = re.findall(r'^VALUE_SECRETS="([^"]*)"$', text, re.M)
    return line.split()


def run_entrypoint(env: dict[str, str]) -> tuple[subprocess.CompletedProcess[str], dict[str, str]]:
    """Run the entrypoint on a command that prints the environment it was given, as JSON."""
    probe = "import json, os; print(json.dumps(dict(os.environ)))"
    full = {"PATH": os.environ["PATH"], **env}
    res = run("sh", DEPLOY / "entrypoint.sh", "python3", "-c", probe, env=full)
    seen = json.loads(res.stdout) if res.returncode == 0 else {}
    return res, seen


def test_entrypoint_reads_only_value_secrets_from_files() -> None:
    """The allow-list holds settings whose value is a secret and that have no `_file`
    setting of their own; every setting mailmeta reads as a path is outside it."""
    listed = entrypoint_value_secrets()
    assert listed == ["MAILMETA_CLICKHOUSE_DSN"]
    for var in listed:
        field = var.removeprefix("MAILMETA_").lower()
        assert field in Settings.model_fields, var
        assert f"{field}_file" not in Settings.model_fields, f"{var}_FILE is a path setting"
    # Every secret-typed setting can come from a file: natively, or through the entrypoint.
    for name, field in Settings.model_fields.items():
        if field.annotation is SecretStr:
            assert f"{name}_file" in Settings.model_fields or f"MAILMETA_{name.upper()}" in listed


def test_entrypoint_keeps_path_settings_and_reads_value_secrets(tmp_path: Path) -> None:
    dsn = tmp_path / "dsn"
    dsn.write_text(DUMMY_DSN + "\n")
    ca, password = tmp_path / "ca.pem", tmp_path / "sasl-password"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    password.write_text("hunter2")
    paths = {
        "MAILMETA_KAFKA_SSL_CA_FILE": str(ca),
        "MAILMETA_KAFKA_SSL_CERT_FILE": str(tmp_path / "client.pem"),  # not there (yet): fine
        "MAILMETA_KAFKA_SSL_KEY_FILE": str(tmp_path / "client.key"),
        "MAILMETA_KAFKA_SASL_PASSWORD_FILE": str(password),
        "MAILMETA_RELAY_TLS_CA_FILE": str(ca),
        "MAILMETA_TLS_CERT": str(tmp_path / "smtp.pem"),
        "MAILMETA_TLS_KEY": str(tmp_path / "smtp.key"),
        # Written by the sink on its first start: absent when the container starts.
        "MAILMETA_OPERATOR_TOKEN_FILE": str(tmp_path / "absent" / "operator-token"),
    }
    res, seen = run_entrypoint({**paths, "MAILMETA_CLICKHOUSE_DSN_FILE": str(dsn)})
    assert res.returncode == 0, res.stderr
    for var, value in paths.items():
        assert seen[var] == value, var  # the path itself, not the file's content
    assert seen["MAILMETA_CLICKHOUSE_DSN"] == DUMMY_DSN  # the value, trailing newline dropped
    assert "MAILMETA_CLICKHOUSE_DSN_FILE" not in seen
    assert "MAILMETA_KAFKA_SSL_CA" not in seen and "MAILMETA_KAFKA_SASL_PASSWORD" not in seen
    # What the container's process then runs with: every path where mailmeta expects it.
    settings = Settings(**{k.removeprefix("MAILMETA_").lower(): v for k, v in seen.items()
                           if k.startswith("MAILMETA_")})  # fmt: skip
    assert settings.kafka_ssl_ca_file == ca and settings.kafka_sasl_password_file == password
    assert settings.relay_tls_ca_file == str(ca) and settings.resolved_dsn() == DUMMY_DSN
    # Without any *_FILE the environment passes through unchanged.
    res, seen = run_entrypoint({"MAILMETA_CLICKHOUSE_DSN": DUMMY_DSN})
    assert res.returncode == 0 and seen["MAILMETA_CLICKHOUSE_DSN"] == DUMMY_DSN


@pytest.mark.parametrize(
    "case, message",
    [
        (
            "absent",
            "MAILMETA_CLICKHOUSE_DSN_FILE={file}: no readable file there (is the secret mounted?)",
        ),
        ("empty", "MAILMETA_CLICKHOUSE_DSN_FILE={file} is empty"),
        ("both", "both MAILMETA_CLICKHOUSE_DSN and MAILMETA_CLICKHOUSE_DSN_FILE are set: give one"),
    ],
)
def test_entrypoint_refuses_a_value_secret_it_cannot_read(
    tmp_path: Path, case: str, message: str
) -> None:
    file = tmp_path / "dsn"
    env = {"MAILMETA_CLICKHOUSE_DSN_FILE": str(file)}
    if case == "empty":
        file.write_text("")
    elif case == "both":
        file.write_text(DUMMY_DSN)
        env["MAILMETA_CLICKHOUSE_DSN"] = DUMMY_DSN
    res, _ = run_entrypoint(env)
    assert res.returncode == 2 and res.stdout == ""  # the command never ran
    assert res.stderr.splitlines() == [f"mailmeta-entrypoint: {message.format(file=file)}"]


def test_make_secrets_creates_matching_secrets_once(tmp_path: Path) -> None:
    script = tmp_path / "make-secrets.sh"
    shutil.copy(DEPLOY / "make-secrets.sh", script)
    assert run("sh", script).returncode == 0
    secrets = tmp_path / "secrets"
    password = (secrets / "clickhouse_password").read_text()
    assert re.fullmatch(r"[0-9a-f]{48}", password)
    dsn = (secrets / "clickhouse_dsn").read_text()
    assert dsn == f"http://mailmeta:{password}@clickhouse:8123/default"
    assert Settings(clickhouse_dsn=dsn).resolved_dsn() == dsn
    cluster = (secrets / "clickhouse_cluster_secret").read_text()
    assert cluster != password
    for name in ("kafka_password", "kafka_broker_password"):
        assert re.fullmatch(r"[0-9a-f]{48}", (secrets / name).read_text())  # no escaping needed
    # Certificates of one CA: the brokers' for each broker's name (and localhost, for the
    # health check), STARTTLS and the API proxy's; each key matches its certificate.
    ca = secrets / "ca.pem"
    assert (secrets / "kafka_ca").read_text() == ca.read_text()
    for pem, hosts in [
        ("kafka_broker.pem", ["kafka-1", "kafka-2", "kafka-3", "localhost"]),
        ("smtp_tls_cert.pem", ["localhost"]),
        ("api_tls_cert.pem", ["localhost"]),
    ]:
        for host in hosts:
            res = run("openssl", "verify", "-CAfile", ca, "-verify_hostname", host, secrets / pem)
            assert res.returncode == 0, res.stdout + res.stderr
    bad = run(
        "openssl",
        "verify",
        "-CAfile",
        ca,
        "-verify_hostname",
        "kafka-4",
        secrets / "kafka_broker.pem",
    )
    assert bad.returncode != 0
    ssl.create_default_context().load_cert_chain(secrets / "kafka_broker.pem")  # key + chain
    for prefix in ("smtp_tls", "api_tls"):
        ssl.create_default_context().load_cert_chain(
            secrets / f"{prefix}_cert.pem", secrets / f"{prefix}_key.pem"
        )
    before = {f.name: f.read_bytes() for f in secrets.iterdir()}
    assert run("sh", script).returncode == 0
    assert {f.name: f.read_bytes() for f in secrets.iterdir()} == before  # kept, not replaced


def test_dockerignore_keeps_local_state_out_of_the_image() -> None:
    ignored = {
        line.strip().rstrip("/") for line in (REPO / ".dockerignore").read_text().splitlines()
    }
    assert {".mailmeta", ".venv", ".tools", ".git", "deploy/secrets"} <= ignored
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "COPY . /app" in dockerfile and "USER mailmeta" in dockerfile
    assert 'ENTRYPOINT ["mailmeta-entrypoint"]' in dockerfile
    assert "deploy/entrypoint.sh /usr/local/bin/mailmeta-entrypoint" in dockerfile


# --- Helm -----------------------------------------------------------------------------------

# Every secret the chart can mount, each from an existing Secret.
HELM_SECRETS = [
    *("--set", "kafka.securityProtocol=SASL_SSL", "--set", "kafka.saslUsername=mailmeta"),
    *("--set", "kafka.existingSecret=kafka", "--set", "kafka.keys.ca=ca.crt"),
    *("--set", "kafka.keys.cert=tls.crt", "--set", "kafka.keys.key=tls.key"),
    *("--set", "kafka.keys.saslPassword=sasl-password"),
    *("--set", "hmacKeys.existingSecret=hmac", "--set", "smtp.tls.existingSecret=smtp-tls"),
    *("--set", "api.tls.existingSecret=api-tls"),
]
HELM_SETS = [
    ["--set", f"clickhouse.dsn={DUMMY_DSN}"],
    [
        *("--set", "clickhouse.existingSecret=ch", "--set", "clickhouse.cluster=mailmeta"),
        *("--set-file", "customers=config/customers.example.yaml"),
    ],
    [
        *("--set", f"clickhouse.dsn={DUMMY_DSN}"),
        *("--set-file", "customers=config/customers.example.yaml"),
        *HELM_SECRETS,
    ],
]


def helm_render(extra: list[str] | None = None) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for sets in [extra] if extra is not None else HELM_SETS:
        res = run(tool("helm"), "template", "r", CHART, *sets, cwd=REPO)
        assert res.returncode == 0, res.stderr
        docs += [d for d in yaml.safe_load_all(res.stdout) if d]
    return docs


def containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if doc["kind"] not in ("Deployment", "StatefulSet", "Job"):
        return []
    pod = doc["spec"]["template"]["spec"]
    return [*pod.get("initContainers", []), *pod["containers"]]


def test_helm_lint() -> None:
    for sets in (HELM_SETS[0], HELM_SETS[2]):
        res = run(tool("helm"), "lint", "--strict", CHART, *sets, cwd=REPO)
        assert res.returncode == 0, res.stdout + res.stderr


def test_helm_refuses_to_render_without_a_store() -> None:
    res = run(tool("helm"), "template", "r", CHART)
    assert res.returncode != 0 and "set clickhouse.existingSecret" in res.stderr


def kubeconform_schemas(dest: Path, kinds: set[tuple[str, str]]) -> str:
    """Standalone Kubernetes JSON schemas (from the kubernetes-validate package, offline) in
    kubeconform's layout: each kind's schema with the shared definitions inlined."""
    import kubernetes_validate

    src = Path(kubernetes_validate.__file__).parent / "kubernetes-json-schema"
    src = src / f"v{K8S_VERSION}-local-strict"
    definitions = json.loads((src / "_definitions.json").read_text())["$defs"]
    for kind, api_version in kinds:
        group, _, version = api_version.rpartition("/")
        suffix = "-".join(p for p in (group.split(".")[0], version) if p)
        name = f"{kind.lower()}-{suffix}.json"
        schema = json.loads((src / name).read_text())
        schema["$defs"] = definitions
        text = json.dumps(schema).replace("/api/_definitions.json#/$defs/", "#/$defs/")
        (dest / name).write_text(text)
    return str(dest / "{{.ResourceKind}}{{.KindSuffix}}.json")


def test_helm_template_passes_kubeconform_strict(tmp_path: Path) -> None:
    docs = helm_render()
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Job", "PodDisruptionBudget", "Secret", "Service", "ConfigMap"} <= kinds
    assert "StatefulSet" in kinds
    location = kubeconform_schemas(tmp_path, {(d["kind"], d["apiVersion"]) for d in docs})
    manifests = tmp_path / "rendered.yaml"
    manifests.write_text(yaml.safe_dump_all(docs))
    cmd = [tool("kubeconform"), "-strict", "-summary", "-schema-location", location]
    res = run(*cmd, manifests)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"Valid: {len(docs)}, Invalid: 0, Errors: 0, Skipped: 0" in res.stdout
    # The same check rejects a manifest that is not valid Kubernetes.
    docs[0]["spec"]["bogus"] = 1
    manifests.write_text(yaml.safe_dump_all(docs))
    assert run(*cmd, manifests).returncode != 0


def test_helm_chart_has_the_cluster_shape() -> None:
    docs = helm_render(HELM_SETS[0])
    by_kind: dict[str, dict[str, dict[str, Any]]] = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    # The front end is a StatefulSet: each pod's spool (mail answered 250) has its own volume.
    deployments = {**by_kind["Deployment"], **by_kind["StatefulSet"]}
    assert {n.rsplit("-", 1)[1] for n in deployments} == MAILMETA_STAGES
    (ingest,) = by_kind["StatefulSet"].values()
    (claim,) = ingest["spec"]["volumeClaimTemplates"]
    pod = ingest["spec"]["template"]["spec"]
    assert claim["metadata"]["name"] == "state" not in {v["name"] for v in pod["volumes"]}
    assert {"name": "state", "mountPath": "/var/lib/mailmeta"} in pod["containers"][0][
        "volumeMounts"
    ]
    assert by_kind["Service"][ingest["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    for name, dep in deployments.items():
        assert dep["spec"]["replicas"] >= 2, name
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        assert container["readinessProbe"] and container["livenessProbe"], name
        assert container["resources"]["limits"], name
        env = {e["name"]: e for e in container["env"]}
        assert set(env) <= KNOWN, name
        settings_from({k: e.get("value", "") for k, e in env.items()})
        if "MAILMETA_CLICKHOUSE_DSN" in env:
            assert "secretKeyRef" in env["MAILMETA_CLICKHOUSE_DSN"]["valueFrom"]
        pdb = by_kind["PodDisruptionBudget"][name]
        assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
        labels = dep["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    # Probes aim at ports the stages serve: /healthz for the API, /metrics for the others.
    probes = {
        n.rsplit("-", 1)[1]: d["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]
        for n, d in deployments.items()
    }
    assert probes["api"]["httpGet"]["path"] == "/healthz"
    assert probes["sinks"]["httpGet"]["path"] == "/healthz"
    assert probes["streams"]["httpGet"]["path"] == "/metrics"
    assert probes["ingest"]["tcpSocket"]["port"] == "smtp"
    (job,) = by_kind["Job"].values()
    assert job["metadata"]["annotations"]["helm.sh/hook"] == "pre-install,pre-upgrade"
    services = by_kind["Service"]
    smtp, api = services["r-mailmeta-smtp"], services["r-mailmeta-api"]
    assert (
        smtp["spec"]["selector"]
        == deployments["r-mailmeta-ingest"]["spec"]["selector"]["matchLabels"]
    )
    assert (
        api["spec"]["selector"] == deployments["r-mailmeta-api"]["spec"]["selector"]["matchLabels"]
    )
    assert smtp["spec"]["externalTrafficPolicy"] == "Local"
    assert (by_kind["Secret"]["r-mailmeta-store"]["stringData"]["dsn"]) == DUMMY_DSN
    assert "PROXY protocol" in (CHART / "values.yaml").read_text()


def pods(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """name -> pod template of every workload (stages and the init Job)."""
    return {
        d["metadata"]["name"]: d["spec"]["template"]
        for d in docs
        if d["kind"] in ("Deployment", "StatefulSet", "Job")
    }


def test_helm_keeps_secrets_out_of_configmaps() -> None:
    """A customers file with HMAC keys goes into a Secret; no ConfigMap holds a key, a
    password, a private key or the customers file."""
    customers = (REPO / "config" / "customers.example.yaml").read_text()
    assert "hmac_key:" in customers  # the example holds a key: the case that matters
    docs = helm_render(HELM_SETS[2])
    configmaps = [d for d in docs if d["kind"] == "ConfigMap"]
    assert configmaps  # the TLS proxy's configuration: no secret in it
    for cm in configmaps:
        text = json.dumps(cm["data"])
        for secret in ("hmac_key", "demo-hmac-key", "PRIVATE KEY", "password", DUMMY_DSN):
            assert secret not in text, (cm["metadata"]["name"], secret)
    secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
    assert secrets["r-mailmeta-customers"]["stringData"]["customers.yaml"].strip() == (
        customers.strip()
    )


def test_helm_mounts_every_secret_read_only_where_the_settings_point() -> None:
    docs = helm_render(HELM_SETS[2])
    expected = {"kafka", "hmac", "r-mailmeta-customers", "smtp-tls", "api-tls"}
    mounted: dict[str, set[str]] = {}
    for name, pod in pods(docs).items():
        volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
        files: set[str] = set()  # every file a Secret puts into this pod
        for container in containers({"kind": "Job", "spec": {"template": pod}}):
            for mount in container["volumeMounts"]:
                # (the ingest spool's "state" comes from a claim template, not a volume)
                secret = volumes.get(mount["name"], {}).get("secret")
                if secret is None:
                    continue
                assert mount.get("readOnly") is True, (name, container["name"], mount)
                mounted.setdefault(secret["secretName"], set()).add(name)
                keys = [i["path"] for i in secret.get("items", [])] or ["*"]
                base = mount["mountPath"]
                files |= {f"{base}/{k}" for k in keys}
            # Each path setting names a file of a mounted Secret.
            env = {e["name"]: e.get("value", "") for e in container.get("env", [])}
            settings = settings_from(env)
            for field in (
                "kafka_ssl_ca_file",
                "kafka_ssl_cert_file",
                "kafka_ssl_key_file",
                "kafka_sasl_password_file",
                "tls_cert",
                "tls_key",
            ):
                path = getattr(settings, field) if env else None
                if path:
                    star = str(path).rsplit("/", 1)[0] + "/*"
                    assert str(path) in files or star in files, (name, field, path)
            if env:
                assert settings.kafka_sasl_password_file is not None, name
                assert str(settings.config) == "/etc/mailmeta/customers.yaml", name
    assert set(mounted) == expected
    every = set(pods(docs))
    for secret in ("kafka", "hmac", "r-mailmeta-customers"):
        assert mounted[secret] == every, secret
    assert mounted["smtp-tls"] == {"r-mailmeta-ingest"}
    assert mounted["api-tls"] == {"r-mailmeta-api"}
    # The API Service reaches the TLS proxy only.
    (api,) = [
        d for d in docs if d["kind"] == "Service" and d["metadata"]["name"] == "r-mailmeta-api"
    ]
    assert [p["targetPort"] for p in api["spec"]["ports"]] == ["https"]
    proxy = next(
        c for c in pods(docs)["r-mailmeta-api"]["spec"]["containers"] if c["name"] == "api-tls"
    )
    assert {"name": "https", "containerPort": 8443} in proxy["ports"]
    cm = next(d for d in docs if d["kind"] == "ConfigMap")
    assert cm["data"]["nginx.conf"] == (CHART / "files" / "api-tls-nginx.conf").read_text()


def test_helm_checksum_annotation_rolls_the_pods_on_a_config_change(tmp_path: Path) -> None:
    other_customers = tmp_path / "customers.yaml"
    other_customers.write_text("customers: []\n")

    def checksums(*extra: str) -> set[str]:
        docs = helm_render([*HELM_SETS[2], *extra])
        return {p["metadata"]["annotations"]["checksum/config"] for p in pods(docs).values()}

    (base,) = checksums()  # one checksum, on every pod
    assert checksums() == {base}  # the same values render the same
    changed = [
        ["--set-file", f"customers={other_customers}"],
        ["--set", "settings.LOG_LEVEL=debug"],
        ["--set", "clickhouse.dsn=http://mailmeta:other@clickhouse:8123/default"],
        ["--set", "kafka.keys.saslPassword=other-key"],
    ]
    for extra in changed:
        (other,) = checksums(*extra)
        assert other != base, extra


# --- Prometheus and Grafana -----------------------------------------------------------------


def exported_metrics() -> dict[str, set[str]]:
    """Sample names mailmeta exports -> label names, from the registry once every module of
    the package is imported (metrics register at import)."""
    from prometheus_client import REGISTRY

    skip = {"tests", "bench", "__main__"}
    for module in pkgutil.walk_packages(mailmeta.__path__, "mailmeta."):
        if not skip & set(module.name.split(".")):
            importlib.import_module(module.name)
    suffixes = {
        "counter": ["_total", "_created"],
        "gauge": [""],
        "histogram": ["_bucket", "_count", "_sum", "_created"],
        "summary": ["", "_count", "_sum", "_created"],
        "info": ["_info"],
    }
    labels = {
        getattr(c, "_name", None): set(getattr(c, "_labelnames", ()))
        for c in list(REGISTRY._collector_to_names)
    }
    names: dict[str, set[str]] = {}
    for family in REGISTRY.collect():
        if family.name.startswith("mailmeta_"):
            for suffix in suffixes[family.type]:
                own = labels.get(family.name, set())
                names[family.name + suffix] = own | ({"le"} if suffix == "_bucket" else set())
    return names


_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
_SELECTOR = re.compile(r"(?<![\w.])([A-Za-z_:][A-Za-z0-9_:]*)\s*(\{[^}]*\})?\s*(\()?")
_KEYWORDS = {"and", "or", "unless", "bool", "offset"}


def promql_names(expr: str) -> tuple[list[tuple[str, set[str]]], set[str]]:
    """(metric, labels matched in its selector) pairs, and grouping labels, of a PromQL expr."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # strings: label values
    text = re.sub(r"\[[^\]]*\]", " ", text)  # range durations, $__rate_interval
    grouping = {w.strip() for g in _GROUPING.findall(text) for w in g.split(",") if w.strip()}
    text = _GROUPING.sub(" ", text)
    selectors = []
    for name, matchers, call in _SELECTOR.findall(text):
        if call or name in _KEYWORDS:
            continue  # functions and aggregations, operators
        selectors.append((name, set(re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers))))
    return selectors, grouping


def deploy_promql() -> dict[str, str]:
    exprs: dict[str, str] = {}
    rules = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())
    for group in rules["groups"]:
        for rule in group["rules"]:
            exprs[f"alert {rule['alert']}"] = rule["expr"]
    dashboard = json.loads((DEPLOY / "grafana" / "mailmeta.json").read_text())
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            exprs[f"panel {panel['title']} {target['refId']}"] = target["expr"]
    return exprs


def test_promql_parser_finds_metrics_and_labels() -> None:
    selectors, grouping = promql_names(
        'histogram_quantile(0.99, sum by (le, pod) (rate(a_b_bucket{x="1", y=~"b|c"}[5m])))'
        " / clamp_min(sum(rate(c_total[$__rate_interval])), 1e-9) > 0 and absent(d)"
    )
    assert selectors == [("a_b_bucket", {"x", "y"}), ("c_total", set()), ("d", set())]
    assert grouping == {"le", "pod"}


def test_dashboard_and_alerts_name_only_metrics_mailmeta_exports() -> None:
    exported = exported_metrics()
    assert "mailmeta_ingest_messages_total" in exported  # the registry scan works
    exprs = deploy_promql()
    used: set[str] = set()
    for where, expr in exprs.items():
        selectors, grouping = promql_names(expr)
        assert selectors, f"{where}: no metric in {expr!r}"
        allowed = {"instance", "job"}
        for name, labels in selectors:
            assert name in exported, f"{where}: {name} is not a metric mailmeta exports"
            allowed |= exported[name]
            assert labels <= exported[name] | {"instance", "job"}, (where, name, labels)
            used.add(name)
        assert grouping <= allowed, (where, grouping - allowed)
    # What the issue asks the operator to see: accept/451 rates, spool depth, dead letters.
    for needed in (
        "mailmeta_ingest_messages_total",
        "mailmeta_ingest_spool_records",
        "mailmeta_redaction_dead_letters_total",
        # The sink: lag, unstored age, insert latency and errors.
        "mailmeta_sink_consumer_lag",
        "mailmeta_sink_oldest_unstored_age_seconds",
        "mailmeta_sink_insert_seconds_bucket",
        "mailmeta_sink_store_errors_total",
        # The one that predicts losing acknowledged mail (raw retention deletes it).
        "mailmeta_streams_raw_backlog_age_seconds",
        # The API: its 5xx share and bursts of failed token checks.
        "mailmeta_api_requests_total",
        "mailmeta_api_token_failures_total",
    ):
        assert needed in used


def test_raw_backlog_alerts_match_the_deployed_raw_retention() -> None:
    """The raw-backlog alerts fire at shares of the raw retention compose and the chart
    deploy: a warning where the worker itself warns (WARN_FRACTION), a page before the
    retention deletes acknowledged, unredacted mail."""
    from mailmeta.streams._metrics import WARN_FRACTION

    hours = {compose()["services"]["streams"]["environment"]["MAILMETA_RAW_RETENTION_HOURS"]}
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    hours.add(values["settings"]["RAW_RETENTION_HOURS"])
    (retention,) = {int(h) * 3600 for h in hours}
    rules = {
        r["alert"]: r
        for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
        for r in g["rules"]
    }
    thresholds = {}
    for name in ("MailmetaRawBacklogAging", "MailmetaRawBacklogNearRetention"):
        expr = rules[name]["expr"].strip()
        metric, threshold = re.fullmatch(r"max\((\w+)\) > (\d+)", expr).groups()  # type: ignore[union-attr]
        assert metric == "mailmeta_streams_raw_backlog_age_seconds"
        thresholds[name] = int(threshold)
    assert thresholds["MailmetaRawBacklogAging"] == WARN_FRACTION * retention
    assert rules["MailmetaRawBacklogAging"]["labels"]["severity"] == "warning"
    page = thresholds["MailmetaRawBacklogNearRetention"]
    assert thresholds["MailmetaRawBacklogAging"] < page < retention
    assert rules["MailmetaRawBacklogNearRetention"]["labels"]["severity"] == "page"
    # The dashboard draws the same lines.
    dashboard = json.loads((DEPLOY / "grafana" / "mailmeta.json").read_text())
    (panel,) = [
        p
        for p in dashboard["panels"]
        if p["targets"][0]["expr"] == "max(mailmeta_streams_raw_backlog_age_seconds)"
    ]
    steps = panel["fieldConfig"]["defaults"]["thresholds"]["steps"]
    assert [s["value"] for s in steps[1:]] == [thresholds["MailmetaRawBacklogAging"], page]


def test_promtool_checks_the_alert_rules() -> None:
    res = run(tool("promtool"), "check", "rules", DEPLOY / "prometheus" / "alerts.yaml")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_api_alerts_fire_on_5xx_and_token_failure_bursts(tmp_path: Path) -> None:
    """`promtool test rules`: the API alerts fire on a 5xx share and a burst of failed token
    checks, and stay quiet on a healthy API that refuses a few bad tokens."""
    rules = {
        r["alert"]: r
        for g in yaml.safe_load((DEPLOY / "prometheus" / "alerts.yaml").read_text())["groups"]
        for r in g["rules"]
    }

    def annotations(alert: str, instance: str = "") -> dict[str, str]:
        texts = rules[alert]["annotations"].items()
        return {k: v.replace("{{ $labels.instance }}", instance) for k, v in texts}

    tests = {
        "rule_files": [str(DEPLOY / "prometheus" / "alerts.yaml")],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": [
                    {  # 100 req/min, 10 of them 500 from minute 0 on the failing instance
                        "series": 'mailmeta_api_requests_total{instance="a",route="/v1/messages",'
                        'method="GET",status="200"}',
                        "values": "0+90x20",
                    },
                    {
                        "series": 'mailmeta_api_requests_total{instance="a",route="/v1/messages",'
                        'method="GET",status="500"}',
                        "values": "0+10x20",
                    },
                    {  # 40 failures a minute on instance a, 1 on b
                        "series": 'mailmeta_api_token_failures_total{instance="a",reason="invalid"}',
                        "values": "0+40x20",
                    },
                    {
                        "series": 'mailmeta_api_token_failures_total{instance="b",reason="invalid"}',
                        "values": "0+1x20",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "4m", "alertname": "MailmetaApiErrors", "exp_alerts": []},
                    {
                        "eval_time": "12m",
                        "alertname": "MailmetaApiErrors",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "page"},
                                "exp_annotations": annotations("MailmetaApiErrors"),
                            }
                        ],
                    },
                    {
                        "eval_time": "10m",
                        "alertname": "MailmetaApiTokenFailureBurst",
                        "exp_alerts": [
                            {
                                "exp_labels": {"severity": "warning", "instance": "a"},
                                "exp_annotations": annotations("MailmetaApiTokenFailureBurst", "a"),
                            }
                        ],
                    },
                ],
            },
            {
                "interval": "1m",
                "input_series": [
                    {
                        "series": 'mailmeta_api_requests_total{instance="a",route="/v1/messages",'
                        'method="GET",status="200"}',
                        "values": "0+100x20",
                    },
                    {
                        "series": 'mailmeta_api_requests_total{instance="a",route="/v1/messages",'
                        'method="GET",status="401"}',
                        "values": "0+20x20",
                    },
                    {
                        "series": 'mailmeta_api_token_failures_total{instance="a",reason="invalid"}',
                        "values": "0+10x20",
                    },
                ],
                "alert_rule_test": [
                    {"eval_time": "15m", "alertname": "MailmetaApiErrors", "exp_alerts": []},
                    {
                        "eval_time": "15m",
                        "alertname": "MailmetaApiTokenFailureBurst",
                        "exp_alerts": [],
                    },
                ],
            },
        ],
    }
    path = tmp_path / "api-alerts-test.yaml"
    path.write_text(yaml.safe_dump(tests))
    res = run(tool("promtool"), "test", "rules", path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "SUCCESS" in res.stdout


def test_prometheus_scrapes_the_ports_the_stages_serve() -> None:
    """promtool accepts the scrape config (and its rule file), and it scrapes every stage's
    replicas in compose on the metrics port that stage's settings give it."""
    config = DEPLOY / "prometheus" / "prometheus.yml"
    res = run(tool("promtool"), "check", "config", config)
    assert res.returncode == 0, res.stdout + res.stderr
    services = compose()["services"]
    ports = {
        "ingest": "MAILMETA_INGEST_METRICS_PORT",
        "streams": "MAILMETA_STREAMS_METRICS_PORT",
        "sinks": "MAILMETA_SINK_METRICS_PORT",
        "api": "MAILMETA_SINK_METRICS_PORT",
    }
    targets = {
        t
        for job in yaml.safe_load(config.read_text())["scrape_configs"]
        for sc in job["static_configs"]
        for t in sc["targets"]
    }
    for stage, var in ports.items():
        port = services[stage]["environment"][var]
        replicas = services[stage]["deploy"]["replicas"]
        for i in range(1, replicas + 1):
            assert f"mailmeta-{stage}-{i}:{port}" in targets, (stage, i)
    # The chart annotates each stage's pods with the port its container serves /metrics on.
    for doc in helm_render(HELM_SETS[0]):
        if doc["kind"] in ("Deployment", "StatefulSet"):
            pod = doc["spec"]["template"]
            (container,) = pod["spec"]["containers"]
            metrics = {p["name"]: p["containerPort"] for p in container["ports"]}["metrics"]
            assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(metrics)
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert str(metrics) in env.values(), doc["metadata"]["name"]
