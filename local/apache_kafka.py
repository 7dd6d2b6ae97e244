"""Apache Kafka (KRaft) on 127.0.0.1 for tests and benchmarks: one node or a small cluster.

The broker is the pinned release that ``tests/tools/fetch_kafka.sh`` puts in
``.tools/kafka-<version>/`` (``make test`` runs it; docs/kafka.md has the pin and measured
figures). Each node is one JVM started directly as ``java -cp '<home>/libs/*' kafka.Kafka
server.properties`` in KRaft combined mode (broker and controller in one process), with its own
data dir, formatted once by ``kafka.tools.StorageTool`` so that a restart on the same dir keeps
every record. Nodes are stopped by PID: :meth:`KafkaNode.kill` sends SIGKILL, :meth:`KafkaNode.stop`
SIGTERM then, after a bounded wait, SIGKILL.

Example::

    with KafkaCluster(tmp_path, n=3) as cluster:
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap})
        ...
        cluster.leader_of("raw", 0).kill()

Opt-in SCRAM: ``KafkaNode(path, scram_users={"alice": "secret"})`` adds a SASL_PLAINTEXT listener
(:attr:`KafkaNode.sasl_bootstrap`) that accepts SCRAM-SHA-512 for those users; the credentials are
written into the metadata log when the storage is formatted.
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from confluent_kafka.admin import AdminClient

__all__ = [
    "DEFAULT_JVM_OPTS",
    "SCRAM_MECHANISM",
    "THROUGHPUT_JVM_OPTS",
    "KafkaCluster",
    "KafkaNode",
    "KafkaNotFound",
    "free_ports",
    "java_bin",
    "kafka_home",
]

SCRAM_MECHANISM = "SCRAM-SHA-512"
HOME_ENV = "MAILMETA_KAFKA_HOME"

# A small heap and the serial collector: a test broker holds little, and on a 2-core machine a
# parallel or concurrent collector only competes with the code under test. C1 only: half the
# start-to-ready time on a loaded 2-core machine, for less peak throughput (docs/kafka.md).
THROUGHPUT_JVM_OPTS: tuple[str, ...] = (
    "-Xms64m",
    "-Xmx320m",
    "-XX:+UseSerialGC",
    "-XX:MaxDirectMemorySize=128m",
    "-XX:+ExitOnOutOfMemoryError",
    "-Djava.awt.headless=true",
)
DEFAULT_JVM_OPTS: tuple[str, ...] = (*THROUGHPUT_JVM_OPTS, "-XX:TieredStopAtLevel=1")

_REPO = Path(__file__).resolve().parent.parent
_log = logging.getLogger(__name__)

# Connection-refused noise while a broker boots or after it was killed is expected.
_probe_log = logging.getLogger("mailmeta.local.apache_kafka.probe")
_probe_log.addHandler(logging.NullHandler())
_probe_log.propagate = False


class KafkaNotFound(RuntimeError):
    """No fetched Apache Kafka or no Java runtime: the message says how to get it."""


def _version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", path.name.removeprefix("kafka-")))


def kafka_home() -> Path:
    """The Apache Kafka to run: ``$MAILMETA_KAFKA_HOME``, else the newest complete
    ``.tools/kafka-*`` (in the repository or the working directory).

    Raises :class:`KafkaNotFound` with the command that fetches it when there is none.
    """
    env = os.environ.get(HOME_ENV)
    if env:
        home = Path(env)
        if not (home / "libs").is_dir():
            raise KafkaNotFound(f"{HOME_ENV}={env} has no libs/ folder of Kafka jars")
        return home
    found: list[Path] = []
    for tools in dict.fromkeys([_REPO / ".tools", Path.cwd() / ".tools"]):
        # .complete is written last by fetch_kafka.sh: a fetch cut short is never used.
        found += [p.parent for p in tools.glob("kafka-*/.complete")]
    if not found:
        raise KafkaNotFound(
            f"Apache Kafka not found: run tests/tools/fetch_kafka.sh (or `make test`), "
            f"or set {HOME_ENV} to a folder with libs/*.jar"
        )
    return max(found, key=_version_key)


def java_bin() -> Path:
    """The ``java`` to run Kafka with: ``$JAVA_HOME/bin/java``, else ``java`` on PATH."""
    java_home = os.environ.get("JAVA_HOME")
    if java_home:
        path = Path(java_home, "bin", "java")
        if not os.access(path, os.X_OK):
            raise KafkaNotFound(f"JAVA_HOME={java_home} has no executable bin/java")
        return path
    found = shutil.which("java")
    if found is None:
        raise KafkaNotFound("no Java runtime: install Java 17+ or set JAVA_HOME")
    return Path(found)


def free_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that are free now.

    All are held open together, so none is handed out twice; SO_REUSEADDR lets the broker bind a
    port whose previous connections are still in TIME_WAIT (Java sets it on its listeners too).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [int(s.getsockname()[1]) for s in socks]
    finally:
        for s in socks:
            s.close()


def _new_cluster_id() -> str:
    """Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's ``Uuid.randomUuid`` it never starts with ``-``, which command lines would take
    for an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


def _die_with_parent() -> None:
    # If the Python process that started the broker dies, the broker gets SIGTERM (Linux only).
    with contextlib.suppress(OSError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _admin(bootstrap: str, **extra: Any) -> AdminClient:
    conf: dict[str, Any] = {"bootstrap.servers": bootstrap, "logger": _probe_log, **extra}
    return AdminClient(conf)


class KafkaNode:
    """One Apache Kafka KRaft node (broker + controller) on 127.0.0.1, stopped by PID.

    :param base_dir: the node's folder: ``server.properties``, ``data/`` (the log dirs, kept across
        restarts) and ``kafka.log`` (the JVM's output, appended across restarts).
    :param node_id: KRaft ``node.id``.
    :param port: PLAINTEXT client port (a free one if ``None``).
    :param controller_port: KRaft controller port (a free one if ``None``).
    :param voters: ``controller.quorum.voters`` (``id@host:port,...``); ``None`` for a
        single node that is its own quorum. :class:`KafkaCluster` sets it.
    :param cluster_id: the KRaft cluster id written at format time (new if ``None``).
    :param replication: the cluster's broker count: internal topics get replication factor
        ``min(3, replication)`` and min.insync.replicas ``min(2, replication)``.
    :param scram_users: opt-in SASL_PLAINTEXT listener with SCRAM-SHA-512 for these
        ``{username: password}``; credentials are created when the storage is formatted.
    :param sasl_port: port of that listener (a free one if ``None``).
    :param overrides: extra or replacing ``server.properties`` entries.
    :param jvm_opts: JVM options (heap, GC, JIT); :data:`DEFAULT_JVM_OPTS` (fast start) if
        ``None``; benchmarks pass :data:`THROUGHPUT_JVM_OPTS` (full JIT).
    :param home: the Kafka to run (:func:`kafka_home` if ``None``).
    :param die_with_parent: SIGTERM the broker if this Python process dies.
    """

    def __init__(
        self,
        base_dir: Path,
        *,
        node_id: int = 1,
        port: int | None = None,
        controller_port: int | None = None,
        voters: str | None = None,
        cluster_id: str | None = None,
        replication: int = 1,
        scram_users: Mapping[str, str] | None = None,
        sasl_port: int | None = None,
        overrides: Mapping[str, str | int | bool] | None = None,
        jvm_opts: Sequence[str] | None = None,
        home: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if node_id < 0:
            raise ValueError(f"node_id must be >= 0, got {node_id}")
        if replication < 1:
            raise ValueError(f"replication must be >= 1, got {replication}")
        for user, password in (scram_users or {}).items():
            # The storage tool's --add-scram syntax cannot quote these characters.
            if not user or re.search(r"[\s,=\[\]\"]", user):
                raise ValueError(f'SCRAM username {user!r}: not empty, no spaces or , = [ ] "')
            if not password or re.search(r"[\s,\[\]\"]", password):
                raise ValueError(f'SCRAM password of {user!r}: not empty, no spaces or , [ ] "')
        self.base_dir = Path(base_dir).resolve()
        self.node_id = node_id
        self.home = home if home is not None else kafka_home()
        self.java = java_bin()
        want = [p is None for p in (port, controller_port)] + [bool(scram_users) and not sasl_port]
        picked = iter(free_ports(sum(want)))
        self.port: int = port if port is not None else next(picked)
        self.controller_port: int = controller_port if controller_port is not None else next(picked)
        self.scram_users: dict[str, str] = dict(scram_users or {})
        self.sasl_port: int | None = (sasl_port or next(picked)) if self.scram_users else None
        self.voters = voters or f"{node_id}@127.0.0.1:{self.controller_port}"
        self.cluster_id = cluster_id or _new_cluster_id()
        self.replication = replication
        self.overrides: dict[str, str | int | bool] = dict(overrides or {})
        self.jvm_opts: list[str] = list(DEFAULT_JVM_OPTS if jvm_opts is None else jvm_opts)
        self.die_with_parent = die_with_parent
        self._proc: subprocess.Popen[bytes] | None = None

    # -- paths and addresses -------------------------------------------------------------------

    @property
    def data_dir(self) -> Path:
        """The node's log dirs (topic data and the KRaft metadata log)."""
        return self.base_dir / "data"

    @property
    def config_path(self) -> Path:
        return self.base_dir / "server.properties"

    @property
    def log_path(self) -> Path:
        """The JVM's stdout and stderr (log4j2 writes to stdout), appended across restarts."""
        return self.base_dir / "kafka.log"

    @property
    def bootstrap(self) -> str:
        """``127.0.0.1:PORT`` of the PLAINTEXT listener."""
        return f"127.0.0.1:{self.port}"

    @property
    def sasl_bootstrap(self) -> str | None:
        """``127.0.0.1:PORT`` of the SASL_PLAINTEXT/SCRAM listener, if there is one."""
        return f"127.0.0.1:{self.sasl_port}" if self.sasl_port else None

    @property
    def pid(self) -> int | None:
        """PID of the running JVM, ``None`` when not started or exited."""
        return self._proc.pid if self.running and self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def sasl_client_config(self, username: str, password: str) -> dict[str, str]:
        """confluent-kafka settings for the SCRAM listener (add ``group.id`` etc. yourself)."""
        if self.sasl_bootstrap is None:
            raise ValueError("this node has no SCRAM listener: pass scram_users=")
        return {
            "bootstrap.servers": self.sasl_bootstrap,
            "security.protocol": "SASL_PLAINTEXT",
            "sasl.mechanism": SCRAM_MECHANISM,
            "sasl.username": username,
            "sasl.password": password,
        }

    # -- configuration -------------------------------------------------------------------------

    def properties(self) -> dict[str, str]:
        """The ``server.properties`` this node runs with (defaults tuned for loopback tests)."""
        rf = min(3, self.replication)
        isr = min(2, self.replication)
        listeners = [f"PLAINTEXT://127.0.0.1:{self.port}"]
        protocols = ["PLAINTEXT:PLAINTEXT", "CONTROLLER:PLAINTEXT"]
        if self.sasl_port:
            listeners.append(f"SASL_PLAINTEXT://127.0.0.1:{self.sasl_port}")
            protocols.append("SASL_PLAINTEXT:SASL_PLAINTEXT")
        props: dict[str, str | int | bool] = {
            "process.roles": "broker,controller",
            "node.id": self.node_id,
            "controller.quorum.voters": self.voters,
            "controller.listener.names": "CONTROLLER",
            "listeners": ",".join([*listeners, f"CONTROLLER://127.0.0.1:{self.controller_port}"]),
            "advertised.listeners": ",".join(listeners),
            "listener.security.protocol.map": ",".join(protocols),
            "inter.broker.listener.name": "PLAINTEXT",
            "log.dirs": str(self.data_dir),
            "auto.create.topics.enable": False,
            "num.partitions": 1,
            "default.replication.factor": rf,
            "offsets.topic.replication.factor": rf,
            # Fewer internal partitions: creating 50 x RF replicas on a loaded 2-core machine is
            # what makes the first consumer group slow to start.
            "offsets.topic.num.partitions": 5,
            "transaction.state.log.replication.factor": rf,
            "transaction.state.log.min.isr": isr,
            "transaction.state.log.num.partitions": 5,
            "share.coordinator.state.topic.replication.factor": rf,
            "share.coordinator.state.topic.min.isr": isr,
            "group.initial.rebalance.delay.ms": 0,
            # A SIGKILLed broker is fenced (and loses its leaderships) after this, not 9 s.
            "broker.session.timeout.ms": 4000,
            "broker.heartbeat.interval.ms": 500,
            # Threads and buffers sized for a test box: the cleaner's 128 MB default dedupe buffer
            # alone would not fit in the small heap.
            "num.network.threads": 2,
            "num.io.threads": 4,
            "background.threads": 4,
            "log.cleaner.threads": 1,
            "log.cleaner.dedupe.buffer.size": 8 * 1024 * 1024,
        }
        if self.sasl_port:
            props["sasl.enabled.mechanisms"] = SCRAM_MECHANISM
            props[f"listener.name.sasl_plaintext.{SCRAM_MECHANISM.lower()}.sasl.jaas.config"] = (
                "org.apache.kafka.common.security.scram.ScramLoginModule required;"
            )
        props.update(self.overrides)
        return {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in props.items()}

    def _write_config(self) -> None:
        self.base_dir.mkdir(parents=True, exist_ok=True)
        lines = [f"{k}={v}" for k, v in self.properties().items()]
        self.config_path.write_text("\n".join(lines) + "\n")

    def _java_cmd(self, main: str, *args: str) -> list[str]:
        cmd = [str(self.java), *self.jvm_opts]
        log4j = self.home / "config" / "log4j2.properties"
        if log4j.exists():
            cmd.append(f"-Dlog4j2.configurationFile={log4j}")
        return [*cmd, "-cp", str(self.home / "libs" / "*"), main, *args]

    @property
    def formatted(self) -> bool:
        return (self.data_dir / "meta.properties").exists()

    def format(self, timeout: float = 60.0) -> None:
        """Format the data dir once (cluster id, node id, SCRAM users); a no-op when done."""
        self._write_config()
        if self.formatted:
            return
        # --opt=value: a value starting with "-" must not be read as an option.
        args = ["format", f"--cluster-id={self.cluster_id}", f"--config={self.config_path}"]
        for user, password in self.scram_users.items():
            args.append(f"--add-scram={SCRAM_MECHANISM}=[name={user},password={password}]")
        # The tool's own JVM needs only a small heap.
        cmd = self._java_cmd("kafka.tools.StorageTool", *args)
        cmd = [c for c in cmd if not c.startswith(("-Xmx", "-Xms"))]
        cmd.insert(1, "-Xmx128m")
        done = subprocess.run(cmd, capture_output=True, timeout=timeout, check=False)
        if done.returncode != 0:
            # The tool prints its whole config (tab-indented) first: keep the rest.
            text = (done.stdout + done.stderr).decode(errors="replace")
            out = "\n".join(ln for ln in text.splitlines() if not ln.startswith("\t"))[-3000:]
            # Never echo SCRAM passwords back in an error message.
            for password in self.scram_users.values():
                out = out.replace(password, "***")
            raise RuntimeError(f"formatting {self.data_dir} failed ({done.returncode}):\n{out}")

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self, *, wait: bool = True, timeout: float = 60.0) -> KafkaNode:
        """Format if needed, start the JVM and (if ``wait``) wait until the broker answers.

        A cluster starts every node with ``wait=False`` first: no node can be ready before a
        majority of the controllers is up.
        """
        if self.running:
            raise RuntimeError(f"node {self.node_id} is already running (pid {self.pid})")
        self.format()
        with open(self.log_path, "ab") as out:
            out.write(f"\n==== start {time.strftime('%Y-%m-%d %H:%M:%S')} ====\n".encode())
            out.flush()
            self._proc = subprocess.Popen(
                self._java_cmd("kafka.Kafka", str(self.config_path)),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.base_dir,
                # Own session: a Ctrl-C in a terminal does not reach the broker directly.
                start_new_session=True,
                preexec_fn=_die_with_parent if self.die_with_parent else None,
            )
        _log.debug("kafka node %s pid %s on %s", self.node_id, self._proc.pid, self.bootstrap)
        if wait:
            try:
                self.wait_ready(timeout)
            except BaseException:
                self.kill()
                raise
        return self

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Poll metadata on this node's listener until it answers and lists itself (bounded).

        Raises ``RuntimeError`` if the JVM exits and ``TimeoutError`` at the deadline, both with
        the tail of :attr:`log_path`.
        """
        admin = _admin(self.bootstrap)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            if self._proc is None or self._proc.poll() is not None:
                code = None if self._proc is None else self._proc.returncode
                raise RuntimeError(
                    f"kafka node {self.node_id} exited with code {code}\n{self.log_tail()}"
                )
            try:
                md = admin.list_topics(timeout=1)
                if self.node_id in md.brokers:
                    return
                last = f"node {self.node_id} not yet in metadata brokers {sorted(md.brokers)}"
            except Exception as exc:  # KafkaException while the listener is not yet open
                last = exc
            time.sleep(0.1)
        raise TimeoutError(
            f"kafka node {self.node_id} on {self.bootstrap} not ready within {timeout}s: {last}\n"
            f"{self.log_tail()}"
        )

    def log_tail(self, lines: int = 40) -> str:
        """The last ``lines`` lines of :attr:`log_path` (for error messages)."""
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return f"(no log at {self.log_path})"
        return f"--- last lines of {self.log_path} ---\n" + "\n".join(text.splitlines()[-lines:])

    def kill(self, timeout: float = 10.0) -> None:
        """SIGKILL the JVM by PID and reap it (a crash: no controlled shutdown, no flush)."""
        proc = self._proc
        if proc is None:
            return
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout)

    def signal_stop(self) -> None:
        """Send SIGTERM (controlled shutdown) without waiting; :meth:`stop` finishes it."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, wait up to ``timeout`` s for the controlled shutdown, then SIGKILL."""
        proc = self._proc
        if proc is None:
            return
        self.signal_stop()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            _log.warning("kafka node %s did not stop in %ss: SIGKILL", self.node_id, timeout)
            self.kill()

    def restart(self, *, kill: bool = False, timeout: float = 60.0) -> KafkaNode:
        """Stop (SIGKILL if ``kill``) if running, then start on the same data dir and ports."""
        if kill:
            self.kill()
        else:
            self.stop()
        return self.start(timeout=timeout)

    def rss_kib(self) -> int | None:
        """Resident memory of the JVM (``VmRSS`` from /proc), KiB; ``None`` if not running."""
        pid = self.pid
        if pid is None:
            return None
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return None

    def __enter__(self) -> KafkaNode:
        return self if self.running else self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"KafkaNode(id={self.node_id}, bootstrap={self.bootstrap}, pid={self.pid})"


class KafkaCluster:
    """``n`` KRaft combined nodes on 127.0.0.1 forming one cluster (every node is a voter).

    Internal topics get replication factor ``min(3, n)`` and min.insync.replicas ``min(2, n)``.
    Keyword arguments other than ``n`` are passed to every :class:`KafkaNode`.
    """

    def __init__(
        self,
        base_dir: Path,
        n: int = 3,
        *,
        scram_users: Mapping[str, str] | None = None,
        overrides: Mapping[str, str | int | bool] | None = None,
        jvm_opts: Sequence[str] | None = None,
        home: Path | None = None,
        die_with_parent: bool = True,
    ) -> None:
        if n < 1:
            raise ValueError(f"a cluster needs at least one node, got n={n}")
        per_node = 3 if scram_users else 2
        ports = iter(free_ports(n * per_node))
        plan = [(i + 1, next(ports), next(ports)) for i in range(n)]
        voters = ",".join(f"{i}@127.0.0.1:{cport}" for i, _, cport in plan)
        cluster_id = _new_cluster_id()
        home = home if home is not None else kafka_home()
        self.nodes: list[KafkaNode] = [
            KafkaNode(
                Path(base_dir) / f"node-{i}",
                node_id=i,
                port=port,
                controller_port=cport,
                voters=voters,
                cluster_id=cluster_id,
                replication=n,
                scram_users=scram_users,
                sasl_port=next(ports) if scram_users else None,
                overrides=overrides,
                jvm_opts=jvm_opts,
                home=home,
                die_with_parent=die_with_parent,
            )
            for i, port, cport in plan
        ]

    @property
    def bootstrap(self) -> str:
        """Comma-separated PLAINTEXT addresses of all nodes."""
        return ",".join(n.bootstrap for n in self.nodes)

    @property
    def sasl_bootstrap(self) -> str | None:
        """Comma-separated SCRAM listener addresses, if the cluster has them."""
        addrs = [n.sasl_bootstrap for n in self.nodes if n.sasl_bootstrap]
        return ",".join(addrs) or None

    def node(self, node_id: int) -> KafkaNode:
        """The node with KRaft ``node.id`` ``node_id``."""
        for n in self.nodes:
            if n.node_id == node_id:
                return n
        raise KeyError(f"no node with id {node_id} in {[n.node_id for n in self.nodes]}")

    def start(self, timeout: float = 90.0) -> KafkaCluster:
        """Start every node, then wait until each answers and all brokers are registered."""
        try:
            for n in self.nodes:
                if not n.running:
                    n.start(wait=False)
            self.wait_ready(timeout)
        except BaseException:
            self.stop(timeout=10)
            raise
        return self

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Every running node answers metadata and lists every running node as a broker."""
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            if n.running:
                n.wait_ready(max(1.0, deadline - time.monotonic()))
        want = {n.node_id for n in self.nodes if n.running}
        admin = _admin(self.bootstrap)
        seen: set[int] = set()
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                seen = set(admin.list_topics(timeout=1).brokers)
                if want <= seen:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"cluster brokers {sorted(seen)} within {timeout}s, want {want}")

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM every node at once, wait (bounded) for all, SIGKILL any still running.

        All at once: stopped one by one, the last nodes would wait for a controller quorum
        that is already gone.
        """
        for n in self.nodes:
            n.signal_stop()
        deadline = time.monotonic() + timeout
        for n in self.nodes:
            n.stop(max(0.1, deadline - time.monotonic()))

    def leader_of(self, topic: str, partition: int = 0, timeout: float = 10.0) -> KafkaNode:
        """The node that leads ``topic``/``partition`` now (asked of the running nodes).

        Polls (bounded) while the partition has no leader, e.g. right after a leader was killed.
        """
        running = ",".join(n.bootstrap for n in self.nodes if n.running)
        if not running:
            raise RuntimeError("no node of the cluster is running")
        admin = _admin(running)
        deadline = time.monotonic() + timeout
        last: object = None
        while time.monotonic() < deadline:
            try:
                md = admin.list_topics(topic, timeout=2)
                part = md.topics[topic].partitions.get(partition)
                if md.topics[topic].error is not None:
                    last = md.topics[topic].error
                elif part is None:
                    raise ValueError(f"topic {topic!r} has no partition {partition}")
                elif part.leader >= 0:
                    return self.node(part.leader)
                else:
                    last = f"{topic}/{partition} has no leader"
            except ValueError:
                raise
            except Exception as exc:
                last = exc
            time.sleep(0.1)
        raise TimeoutError(f"no leader for {topic}/{partition} within {timeout}s: {last}")

    def isr_of(self, topic: str, partition: int = 0) -> list[int]:
        """In-sync replica ids of ``topic``/``partition`` as the running nodes report them."""
        running = ",".join(n.bootstrap for n in self.nodes if n.running)
        md = _admin(running).list_topics(topic, timeout=5)
        return list(md.topics[topic].partitions[partition].isrs)

    def __iter__(self) -> Iterator[KafkaNode]:
        return iter(self.nodes)

    def __enter__(self) -> KafkaCluster:
        return self.start()

    def __exit__(
        self, typ: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
