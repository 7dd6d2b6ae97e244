"""Region pinning end to end: `mailmeta up` runs the default region and region `eu` side by
side (each its own broker, store, worker, sink + API and front end). No event of the EU
customer is ever on a topic or in a store of the default region, nor the other way round."""

from __future__ import annotations

import os
import smtplib
import subprocess
import uuid
from email.message import EmailMessage
from pathlib import Path

import httpx
import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient

from tests.kafka_helpers import files_containing, wait_until
from tests.up_helpers import MAILMETA, Up, dump_clickhouse, mailmeta_up

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

STEP = 1000  # region eu's ports: the default region's + 1000

CONFIG = """
regions:
  eu:
    api_url: http://eu.api.invalid
    smtp_host: mx.eu.invalid
customers:
  - id: demo
    domains: [demo.example]
    retention_days: 60
    hmac_key: "demo-hmac-key-change-me-0123456789"
    policy: {subject: keep, message_id: keep, mail_from: keep, rcpt_to: keep, sender_ip: keep}
  - id: acme-eu
    region: eu
    domains: [acme-eu.example]
    retention_days: 30
    hmac_key: "acme-hmac-key-change-me-0123456789"
    policy: {subject: keep, message_id: keep, mail_from: keep, rcpt_to: keep, sender_ip: keep}
"""


class Mail:
    """One message whose every stored field is recognisable in raw bytes."""

    def __init__(self, tag: str, rcpts: list[str]) -> None:
        self.id = f"<{tag}-{uuid.uuid4().hex}@sender.example>"
        self.subject = f"{tag}-subject-{uuid.uuid4().hex[:12]}"
        self.sender = f"{tag}-{uuid.uuid4().hex[:8]}@sender.example"
        self.rcpts = rcpts

    def needles(self) -> list[bytes]:
        return [self.id.strip("<>").encode(), self.subject.encode(), self.sender.encode()]

    def send(self, port: int) -> dict[str, tuple[int, bytes]]:
        """Send it; the recipients refused (code, text), as smtplib reports them."""
        m = EmailMessage()
        m["From"], m["To"], m["Subject"] = self.sender, ", ".join(self.rcpts), self.subject
        m["Message-ID"] = self.id
        m.set_content("body\n")
        with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
            return s.send_message(m, from_addr=self.sender, to_addrs=self.rcpts)


def _refused(port: int, rcpt: str) -> tuple[int, bytes]:
    with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
        s.ehlo()
        s.mail("x@sender.example")
        return s.rcpt(rcpt)


def _every_record(bootstrap: str) -> bytes:
    """Every record (key, value, headers) of every topic, internal ones included."""
    admin = AdminClient({"bootstrap.servers": bootstrap})
    topics = admin.list_topics(timeout=10).topics
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{uuid.uuid4().hex}",
                  "enable.auto.commit": False})  # fmt: skip
    out: list[bytes] = []
    try:
        for name, md in topics.items():
            for p in md.partitions:
                lo, hi = c.get_watermark_offsets(TopicPartition(name, p), timeout=10)
                if hi <= lo:
                    continue
                c.assign([TopicPartition(name, p, lo)])
                seen = lo
                while seen < hi:
                    m = c.poll(5)
                    assert m is not None, f"{name}[{p}] stopped at {seen} of {hi}"
                    if m.error() is None:
                        out += [m.key() or b"", m.value() or b"", repr(m.headers()).encode()]
                        seen = m.offset() + 1
    finally:
        c.close()
    return b"\n".join(out)


def _messages(api: str, token_file: Path, customer: str) -> httpx.Response:
    token = token_file.read_text().strip()
    return httpx.get(
        f"{api}/v1/messages",
        params={"customer": customer, "limit": "100"},
        headers={"Authorization": f"Bearer {token}"},
        timeout=10,
    )


def _ids(r: httpx.Response) -> set[str]:
    r.raise_for_status()
    return {str(row["message_id"]) for row in r.json()["messages"]}


def test_no_event_of_an_eu_customer_leaves_the_eu_region(tmp_path: Path) -> None:
    cfg = tmp_path / "customers.yaml"
    cfg.write_text(CONFIG)
    data = tmp_path / "mm"
    with mailmeta_up(data, config=cfg, region_port_step=STEP) as up:
        up.wait_line("region eu:")
        eu_smtp, eu_api = up.smtp_port + STEP, f"http://127.0.0.1:{up.api_port + STEP}"
        eu_token = data / "regions" / "eu" / "operator-token"

        home = Mail("home", ["jane@demo.example"])
        eu = Mail("eu", ["bob@acme-eu.example"])
        mixed = Mail("mixed", ["carl@acme-eu.example", "jane@demo.example"])
        assert home.send(up.smtp_port) == {}
        assert eu.send(eu_smtp) == {}
        # Each front end takes only its own region's recipients, before any data is read.
        refused = mixed.send(eu_smtp)
        assert list(refused) == ["jane@demo.example"]
        assert refused["jane@demo.example"][0] == 450
        code, text = _refused(up.smtp_port, "bob@acme-eu.example")
        assert (code, b"eu" in text, b"mx.eu.invalid" in text) == (450, True, True), text

        wait_until(lambda: _ids(_messages(eu_api, eu_token, "acme-eu")) >= {eu.id, mixed.id},
                   60, what="the EU customer's mail in the EU store")  # fmt: skip
        wait_until(lambda: home.id in _ids(up.messages_response("demo")), 60, what="home mail")
        # Each API answers only for its own region's customers: 421, naming where to ask.
        wrong = up.messages_response("acme-eu")
        assert wrong.status_code == 421 and "eu.api.invalid" in wrong.text, wrong.text
        assert _messages(eu_api, eu_token, "demo").status_code == 421
        # The operator CLI, pointed at one region, says where the other one is.
        wrong_cli = _cli(data, up.api, "policy", "show", "acme-eu")
        assert wrong_cli.returncode == 1 and "served in region 'eu'" in wrong_cli.stderr
        right_cli = _cli(data / "regions" / "eu", eu_api, "policy", "show", "acme-eu")
        assert right_cli.returncode == 0, right_cli.stderr

        home_topics = _every_record(_bootstrap(up, 0))
        eu_topics = _every_record(_bootstrap(up, 1))
    eu_dir = data / "regions" / "eu"
    home_store, eu_store = dump_clickhouse(data), dump_clickhouse(eu_dir)
    eu_only = [*eu.needles(), *mixed.needles(), b"acme-eu.example"]
    for needle in eu_only:
        assert needle not in home_topics, needle
        assert needle not in home_store, needle
    for needle in home.needles():
        assert needle in home_topics and needle in home_store  # the checks can see rows…
        assert needle not in eu_topics and needle not in eu_store  # …and none crossed over
    for needle in eu.needles():
        assert needle in eu_topics and needle in eu_store
    assert b"jane@demo.example" not in eu_topics + eu_store  # the refused recipient of `mixed`
    # The brokers' own files: every topic, internal ones included.
    for needle in eu_only:
        assert files_containing(data / "kafka", needle) == [], needle
    assert files_containing(eu_dir / "kafka", eu.needles()[0])
    for needle in (b"bob@acme-eu.example", b"carl@acme-eu.example"):
        assert files_containing(data / "logs", needle) == [], needle


def _cli(data_dir: Path, api: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "MAILMETA_DATA_DIR": str(data_dir)}
    return subprocess.run(
        [*MAILMETA, *args, "--api", api], env=env, capture_output=True, text=True, timeout=60
    )


def _bootstrap(up: Up, index: int) -> str:
    """The broker of the index-th region, as `mailmeta up` printed it."""
    lines = [ln for ln in up.lines if " broker " in f" {ln.strip()} " and "127.0.0.1:" in ln]
    found = sorted({ln.split("127.0.0.1:")[1].split()[0] for ln in lines}, key=int)
    assert len(found) == 2, up.output[-3000:]
    return f"127.0.0.1:{found[index]}"
