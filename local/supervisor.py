"""`mailmeta up`: run the whole pipeline on this machine, and stop it without losing events.

The broker is a single-node Apache Kafka with its log in the data dir (durable: a `250` is on
disk in the broker's log before it is sent, and survives any kill of any process); the
memory-only Tansu is there only when asked for (``--broker tansu``). Each stage is its own
process, started in data-path order from the end (sink, redaction worker, SMTP front end) so
nothing accepts mail before something can store it. A part that dies is restarted with
backoff. Shutdown runs the other way and drains: the front end stops accepting first, then a
drain marker is sent through every raw partition and the supervisor waits until the sink
reports it has stored everything before the marker, and only then stops the worker, the sink
and the broker. One run per data dir (an flock); parts left by a killed run are stopped first.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import httpx
from confluent_kafka import Producer

from mailmeta.config import DEFAULT_REGION, Settings, load_customers
from mailmeta.kafka import check_connection, ensure_topics, producer_config
from mailmeta.local._regions import cell_settings
from mailmeta.local._rundir import RunDir
from mailmeta.local.apache_kafka import KafkaNode, KafkaNotFound
from mailmeta.local.brokers import Broker, LocalBroker
from mailmeta.local.process import Spawned, free_ports
from mailmeta.schema import encode_drain_marker

STOP_BUDGET_S = 14.0  # the promise is 15 s from Ctrl-C to no process left
RESTART_BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 16.0, 30.0)
STABLE_AFTER_S = 60.0  # a part up this long has its backoff reset
PRIVATE_UMASK = 0o077  # files 0600, directories 0700 under the data dir

BrokerKind = Literal["kafka", "tansu"]


@dataclass(frozen=True)
class PostfixParts:
    """`mailmeta up --milter-port/--maillog`: the ways in for a Postfix the user runs."""

    NAMES = ("milter", "maillog")
    milter_port: int | None = None
    maillog: Path | None = None

    def parts(self, py: str, host: str) -> list[Part]:
        out = []
        if self.milter_port is not None:
            argv = [py, "-m", "mailmeta", "milter", "--host", host, "--port", str(self.milter_port)]
            where = f"milter inet:{host}:{self.milter_port}"
            out.append(Part("milter", argv, "listening on inet:", where))
        if self.maillog is not None:
            argv = [py, "-m", "mailmeta", "maillog", "--file", str(self.maillog)]
            out.append(Part("maillog", argv, "maillog: following", f"log {self.maillog}"))
        return out


@dataclass
class Part:
    """One stage of the pipeline, run as a child process and restarted with backoff."""

    name: str
    argv: list[str]
    ready_text: str
    where: str
    child: Spawned | None = None
    restarts: int = 0
    next_start: float = 0.0

    def start(self, env: dict[str, str], log_path: Path) -> None:
        self.child = Spawned(
            self.argv, ready_text=self.ready_text, env=env, log=log_path, own_session=True
        )

    @property
    def pid(self) -> int | None:
        return self.child.pid if self.child else None

    @property
    def started_at(self) -> float:
        return self.child.started_at if self.child else 0.0

    @property
    def returncode(self) -> int | None:
        return self.child.proc.returncode if self.child else None

    def alive(self) -> bool:
        return self.child is not None and self.child.alive()

    def wait_ready(self, timeout: float) -> bool:
        return self.child is not None and self.child.wait_ready(timeout)

    def terminate(self) -> None:
        if self.child is not None:
            self.child.terminate()

    def wait_stopped(self, timeout: float) -> None:
        if self.child is not None:
            self.child.wait_stopped(timeout)


class Supervisor:
    def __init__(
        self,
        settings: Settings,
        *,
        local_broker: bool,
        broker_port: int,
        broker_kind: BrokerKind = "kafka",
        out: Callable[[str], None] | None = None,
        postfix: PostfixParts | None = None,
    ) -> None:
        self.settings = settings
        self.postfix = postfix
        self.local_broker = local_broker
        self.broker_port = broker_port
        self.broker_kind: BrokerKind = broker_kind  # for _new_broker only
        say = out or (lambda line: print(line, flush=True))
        region = settings.region
        self.out = say if region == DEFAULT_REGION else (lambda line: say(_tagged(line, region)))
        self.broker: Broker | None = None
        self.parts: list[Part] = []
        self.data_dir = settings.data_dir.resolve()
        self.log_dir = self.data_dir / "logs"
        self.operator_token_file = self.data_dir / "operator-token"
        self.rundir = RunDir(self.data_dir)
        self._env_cache: dict[str, str] = {}

    # -- start -----------------------------------------------------------------------------

    def _env(self) -> dict[str, str]:
        s = self.settings
        # Local mode always requires API tokens; the sink writes the operator's token to
        # this file (0600) itself, so the clear token is never in env, argv or logs.
        local = s.model_copy(
            update={
                "data_dir": self.data_dir,
                "config": Path(s.config).resolve(),
                "api_auth": True,
                "operator_token_file": self.operator_token_file,
            }
        )
        env = local.to_env(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        return env

    def start(self) -> None:
        s = self.settings
        # Fails here, naming the field, before any process starts.
        customers = load_customers(s.config, s.region)
        # Clear metadata lives here (the raw topic's log, the store, logs): owner-only, also
        # when an earlier version left it open; the umask (run_up) keeps what is inside so.
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.data_dir.chmod(0o700)
        self.rundir.lock()
        for what in self.rundir.stop_leftovers():
            self.out(f"  stopped {what} left running by an earlier, unclean stop")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.local_broker:
            s.kafka_single_node = True  # its own one-node broker, on purpose
            self._start_broker()
        else:
            check_connection(s)  # refused credentials: fail before any stage starts
            self.out(f"  broker   external                    {s.kafka_bootstrap}")
        ensure_topics(s, customers.shortest_retention_days)
        py = sys.executable
        api = f"http://{s.api_host}:{s.api_port}"
        self.parts = [
            Part("sink", [py, "-m", "mailmeta.service"], "API listening", f"API {api}"),
            Part("streams", [py, "-m", "mailmeta.streams"], "Worker]: Ready", "redaction worker"),
            Part("ingest", [py, "-m", "mailmeta.ingest"], "SMTP listening", f"SMTP {s.smtp_host}:{s.smtp_port}"),
        ]  # fmt: skip
        if self.postfix is not None:
            self.parts += self.postfix.parts(py, s.smtp_host)
        self._env_cache = self._env()
        for part in self.parts:
            self._start_part(part)
            if not part.wait_ready(90):
                raise RuntimeError(
                    f"{part.name} did not start; see {self.log_dir / (part.name + '.log')}"
                )
            self.out(f"  {part.name:<8} {part.where:<35} pid {part.pid}  up")
            if part.name == "sink":
                self.out(f"  operator API token in {self.operator_token_file} (mode 0600)")

    def _start_part(self, part: Part) -> None:
        part.start(self._env_cache, self.log_dir / f"{part.name}.log")
        assert part.pid is not None
        self.rundir.record(part.name, part.pid)

    def _new_broker(self) -> Broker:
        if self.broker_kind == "kafka":
            return local_kafka(self.data_dir / "kafka", self.broker_port)
        return LocalBroker("tansu", self.broker_port, log_path=self.log_dir / "broker.log")

    def _start_broker(self) -> None:
        s = self.settings
        broker = self.broker = self._new_broker()
        broker.start(timeout=120)
        assert broker.pid is not None
        self.rundir.record("broker", broker.pid)
        s.kafka_bootstrap = broker.bootstrap
        self.out(f"  broker   {broker.label:<34} {s.kafka_bootstrap:<24} pid {broker.pid}")
        if broker.memory_only:
            self.out("  warning: with --broker tansu, mail answered 250 but not yet stored is "
                     "lost if the pipeline is killed (memory-only broker)")  # fmt: skip

    # -- run -------------------------------------------------------------------------------

    def restart_the_dead(self) -> bool:
        """Restart whatever died (parts after their backoff); False when the local broker
        cannot come back."""
        if self.broker is not None and not self.broker.running:
            self.out("mailmeta: the local broker exited unexpectedly; restarting it")
            try:
                self._restart_broker()
            except (RuntimeError, TimeoutError, OSError) as exc:
                self.out(f"mailmeta: the local broker could not restart: {exc}")
                return False
        for part in self.parts:
            if not part.alive():
                self._restart_later(part)
        return True

    def _restart_broker(self) -> None:
        assert self.broker is not None
        self.broker.stop(5)
        self._start_broker()
        if self.broker.memory_only:  # it lost its topics with its memory
            s = self.settings
            ensure_topics(s, load_customers(s.config, s.region).shortest_retention_days)

    def _restart_later(self, part: Part) -> None:
        """Restart a dead part once its backoff has passed (reset after a stable run)."""
        now = time.monotonic()
        if part.next_start == 0.0:
            code = part.returncode
            if now - part.started_at > STABLE_AFTER_S:
                part.restarts = 0
            delay = RESTART_BACKOFF_S[min(part.restarts, len(RESTART_BACKOFF_S) - 1)]
            part.next_start = now + delay
            self.out(f"mailmeta: {part.name} exited (code {code}); restarting in {delay:.0f} s")
            return
        if now < part.next_start:
            return
        part.wait_stopped(1)
        part.restarts += 1
        part.next_start = 0.0
        self._start_part(part)
        self.out(f"  {part.name:<8} restarted, pid {part.pid}")

    # -- stop ------------------------------------------------------------------------------

    def stop(self) -> None:
        deadline = time.monotonic() + STOP_BUDGET_S

        def left(cap: float) -> float:
            return max(0.1, min(cap, deadline - time.monotonic()))

        by_name = {p.name: p for p in self.parts}
        ingest, streams, sink = by_name.get("ingest"), by_name.get("streams"), by_name.get("sink")
        ways_in = [p for p in self.parts if p.name in PostfixParts.NAMES]
        for way in ways_in:  # like the front end: they stop first and flush their producers
            way.terminate()
        for way in ways_in:
            way.wait_stopped(left(5))
            self.out(f"  {way.name:<8} stopped")
        if ingest:
            ingest.terminate()  # stops accepting, finishes transactions, flushes its producer
            ingest.wait_stopped(left(5))
            self.out("  ingest   stopped")
        drained = False
        if streams and sink and streams.alive() and sink.alive():
            drained = self._drain(left(7))
            self.out("  drained: the sink stored every event in flight" if drained else
                     "  drain not confirmed in time; undelivered events stay in the broker")  # fmt: skip
        for part in (streams, sink):
            if part:
                part.terminate()
        for part in (streams, sink):
            if part:
                part.wait_stopped(left(5))
                self.out(f"  {part.name:<8} stopped")
        if self.broker is not None:
            # Kafka's controlled shutdown takes a few seconds; cut short it is still safe
            # (its log is recovered at the next start), so it gets what is left, at least 3 s.
            self.broker.stop(max(3.0, deadline - time.monotonic()))
            self.out("  broker   stopped")
        for part in self.parts:
            self.rundir.forget(part.name)
        self.rundir.forget("broker")
        self.rundir.unlock()

    def _drain(self, timeout: float) -> bool:
        s = self.settings
        nonce = uuid.uuid4().hex
        deadline = time.monotonic() + timeout
        producer = Producer(producer_config(s))
        for p in range(s.partitions):
            producer.produce(s.raw_topic, encode_drain_marker(nonce), partition=p)
        if producer.flush(max(0.1, deadline - time.monotonic())) != 0:
            return False
        url = f"http://{s.api_host}:{s.api_port}/internal/drain/{nonce}"
        try:  # the operator's token: the sink wrote it at its start
            token = self.operator_token_file.read_text().strip()
        except OSError:
            return False
        headers = {"Authorization": f"Bearer {token}"}
        with httpx.Client(timeout=1.0, headers=headers) as client:
            while time.monotonic() < deadline:
                try:
                    if client.get(url).json().get("drained"):
                        return True
                except (httpx.HTTPError, ValueError):
                    pass
                time.sleep(0.1)
        return False

    def kill_all(self) -> None:
        """Last resort on a failed start: stop whatever did start, newest first."""
        for part in reversed(self.parts):
            part.terminate()
            part.wait_stopped(3)
        if self.broker is not None:
            self.broker.stop(3)
        self.rundir.unlock()


def _tagged(line: str, region: str) -> str:
    """A line of a region's cell, marked with the region ("  [eu] sink ...")."""
    if line.startswith("  "):
        return f"  [{region}] {line[2:]}"
    return line.replace("mailmeta: ", f"mailmeta: [{region}] ", 1)


def local_kafka(base_dir: Path, port: int) -> KafkaNode:
    """The local single-node Kafka: its controller port is kept with its data across runs."""
    port_file = base_dir / "controller.port"
    controller = int(port_file.read_text()) if port_file.exists() else _other_free_port(port)
    try:
        node = KafkaNode(base_dir, port=port, controller_port=controller)
    except KafkaNotFound as exc:
        raise RuntimeError(
            f"{exc}\n`make up` fetches Apache Kafka (tests/tools/fetch_kafka.sh); "
            "or pass --broker tansu for the memory-only broker"
        ) from None
    base_dir.mkdir(parents=True, exist_ok=True)
    port_file.write_text(str(controller))
    return node


def _other_free_port(taken: int) -> int:
    """A free port that is not ``taken`` (the broker's own, chosen but not bound yet: the
    kernel may hand it out again)."""
    return next(p for p in free_ports(2) if p != taken)


def run_up(
    settings: Settings,
    *,
    local_broker: bool,
    broker_port: int,
    broker_kind: BrokerKind = "kafka",
    region_port_step: int = 100,
    postfix: PostfixParts | None = None,
) -> int:
    """Every region's cell (just the default one without `regions`), until a signal; the
    Postfix parts, when asked, in the first (a local Postfix serves one region)."""
    customers = load_customers(settings.config, settings.region)
    # Everything this run and its parts (broker JVM, chdb, front ends) create is owner-only:
    # every process started from here inherits the umask. Not restored: `mailmeta up` is
    # this process's whole life.
    os.umask(PRIVATE_UMASK)
    cells = [
        Supervisor(
            cell_settings(settings, region, i, region_port_step),
            local_broker=local_broker,
            broker_port=broker_port + i * region_port_step,
            broker_kind=broker_kind,
            postfix=postfix if i == 0 else None,
        )
        for i, region in enumerate(customers.region_names())
    ]
    print(f"mailmeta up — data in {cells[0].data_dir}, logs in {cells[0].log_dir}", flush=True)
    stop = threading.Event()
    old = {
        sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        started: list[Supervisor] = []
        try:
            for cell in cells:
                started.append(cell)
                cell.start()
        except BaseException:
            for cell in reversed(started):
                cell.kill_all()
            raise
        _say_up(cells)
        code = 0
        while code == 0 and not stop.wait(0.5):
            code = 0 if all(cell.restart_the_dead() for cell in cells) else 1
        print("mailmeta: stopping (draining in-flight events)…", flush=True)
        _stop_all(cells)
        print("mailmeta: stopped", flush=True)
        return code
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)


def _say_up(cells: list[Supervisor]) -> None:
    s = cells[0].settings
    print(
        f"mailmeta is up. Send mail to {s.smtp_host}:{s.smtp_port}; query "
        f"http://{s.api_host}:{s.api_port}/v1/messages?customer=ID. Ctrl-C stops.",
        flush=True,
    )
    for cell in cells[1:]:
        r = cell.settings
        print(
            f"  region {r.region}: SMTP {r.smtp_host}:{r.smtp_port}, API "
            f"http://{r.api_host}:{r.api_port}, token in {cell.operator_token_file}",
            flush=True,
        )


def _stop_all(cells: list[Supervisor]) -> None:
    """Cells stop side by side: the whole stop stays within one cell's budget."""
    threads = [threading.Thread(target=cell.stop, daemon=True) for cell in cells]
    for t in threads:
        t.start()
    for t in threads:
        t.join(STOP_BUDGET_S + 5)
