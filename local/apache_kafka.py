"""Apache Kafka (KRaft) on 127.0.0.1: the node `mailmeta up` runs, and tests and benchmarks too
(the tests' 3-node cluster, ``KafkaCluster``, is in tests/kafka_cluster.py).

The broker is the pinned release that ``tests/tools/fetch_kafka.sh`` puts in
``.tools/kafka-<version>/`` (``make test`` runs it; docs/kafka.md has the pin and measured
figures). Each node is one JVM started directly as ``java -cp '<home>/libs/*' kafka.Kafka
server.properties`` in KRaft combined mode (broker and controller in one process), with its own
data dir, formatted once by ``kafka.tools.StorageTool`` so that a restart on the same dir keeps
every record. Nodes are stopped by PID: :meth:`KafkaNode.kill` sends SIGKILL, :meth:`KafkaNode.stop`
SIGTERM then, after a bounded wait, SIGKILL.

Example::

    with KafkaNode(tmp_path) as node:
        admin = AdminClient({"bootstrap.servers": node.bootstrap})
        ...
        node.kill()

Opt-in SCRAM: ``KafkaNode(path, scram_users={"alice": "secret"})`` adds a SASL_PLAINTEXT listener
(:attr:`KafkaNode.sasl_bootstrap`) that accepts SCRAM-SHA-512 for those users; the credentials are
written into the metadata log when the storage is formatted.
"""

from __future__ import annotations

import base64
import contextlib
import logging
import os
import re
import shutil
import signal
import subprocess
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType

from confluent_kafka.admin import ClusterMetadata

from mailmeta.local.brokers import wait_answering
from mailmeta.local.process import die_with_parent, free_ports

__all__ = [
    "DEFAULT_JVM_OPTS",
    "SCRAM_MECHANISM",
    "THROUGHPUT_JVM_OPTS",
    "KafkaNode",
    "KafkaNotFound",
    "java_bin",
    "kafka_home",
    "new_cluster_id",
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


def new_cluster_id() -> str:
    """Kafka's Uuid text form: 16 random bytes, URL-safe base64 without padding.

    Like Kafka's ``Uuid.randomUuid`` it never starts with ``-``, which command lines would take
    for an option.
    """
    while True:
        cid = base64.urlsafe_b64encode(uuid.uuid4().bytes).rstrip(b"=").decode()
        if not cid.startswith("-"):
            return cid


class KafkaNode:
    """One Apache Kafka KRaft node (broker + controller) on 127.0.0.1, stopped by PID.

    :param base_dir: the node's folder: ``server.properties``, ``data/`` (the log dirs, kept across
        restarts) and ``kafka.log`` (the JVM's output, appended across restarts).
    :param node_id: KRaft ``node.id``.
    :param port: PLAINTEXT client port (a free one if ``None``).
    :param controller_port: KRaft controller port (a free one if ``None``).
    :param voters: ``controller.quorum.voters`` (``id@host:port,...``); ``None`` for a
        single node that is its own quorum (a cluster sets it).
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
        self.cluster_id = cluster_id or new_cluster_id()
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

    @property
    def label(self) -> str:
        return "apache kafka (local, durable)"

    @property
    def memory_only(self) -> bool:
        return False

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
                preexec_fn=die_with_parent if self.die_with_parent else None,
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
        if self._proc is None:
            raise RuntimeError(f"kafka node {self.node_id} is not started")

        def lists_itself(md: ClusterMetadata) -> str | None:
            if self.node_id in md.brokers:
                return None
            return f"node {self.node_id} not yet in metadata brokers {sorted(md.brokers)}"

        wait_answering(
            self.bootstrap,
            timeout,
            proc=self._proc,
            name=f"kafka node {self.node_id}",
            until=lists_itself,
            detail=lambda: "\n" + self.log_tail(),
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
