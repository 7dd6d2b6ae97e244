"""A real Postfix for tests: Debian's package unpacked in .tools/ (tests/tools/fetch.sh), run
as root from its own config and queue directories on loopback (docs: DESIGN.md, "A real
Postfix on these machines").

    with NextHop() as hop, Postfix(relayhost=hop.address) as pf:
        smtplib.SMTP("127.0.0.1", pf.port).sendmail(...)
        pf.maillog  # the log file Postfix writes (maillog_file)
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from mailmeta.local.process import free_port
from tests.kafka_helpers import wait_until
from tests.smtp_helpers import listening

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".tools"
POSTFIX = TOOLS / "usr" / "sbin" / "postfix"
LIBS = TOOLS / "usr" / "lib" / "postfix"
MAIL_OWNER = "mmpostfix"
SETGID_GROUP = "mmpostdrop"

# Every service the queue needs, chroot off (the unpacked tree is no chroot jail); the smtpd
# listener is added per instance on its own loopback port.
_MASTER = """\
pickup    unix  n       -       n       60      1       pickup
cleanup   unix  n       -       n       -       0       cleanup
qmgr      unix  n       -       n       300     1       qmgr
rewrite   unix  -       -       n       -       -       trivial-rewrite
tlsmgr    unix  -       -       n       1000?   1       tlsmgr
bounce    unix  -       -       n       -       0       bounce
defer     unix  -       -       n       -       0       bounce
trace     unix  -       -       n       -       0       bounce
verify    unix  -       -       n       -       1       verify
flush     unix  n       -       n       1000?   0       flush
proxymap  unix  -       -       n       -       -       proxymap
smtp      unix  -       -       n       -       -       smtp
relay     unix  -       -       n       -       -       smtp
showq     unix  n       -       n       -       -       showq
error     unix  -       -       n       -       -       error
retry     unix  -       -       n       -       -       error
discard   unix  -       -       n       -       -       discard
anvil     unix  -       -       n       -       1       anvil
scache    unix  -       -       n       -       1       scache
postlog   unix-dgram n  -       n       -       1       postlogd
"""


def available() -> bool:
    return POSTFIX.is_file() and os.geteuid() == 0


def ensure_mail_owner() -> None:
    """The dedicated mail owner and setgid group Postfix insists on (idempotent; needs root)."""
    if subprocess.run(["getent", "group", SETGID_GROUP], capture_output=True).returncode:
        subprocess.run(["groupadd", "-r", SETGID_GROUP], check=True, capture_output=True)
    try:
        pwd.getpwnam(MAIL_OWNER)
    except KeyError:
        subprocess.run(
            ["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", MAIL_OWNER],
            check=True,
            capture_output=True,
        )


class Postfix:
    """One Postfix instance in ``base``: smtpd on a free loopback port, mail relayed to
    ``relayhost`` ("HOST:PORT"), ``milter`` ("inet:HOST:PORT") attached when given;
    ``extra`` adds or overrides main.cf parameters, ``master_extra`` adds master.cf lines."""

    def __init__(
        self,
        *,
        relayhost: str,
        milter: str | None = None,
        extra: dict[str, str] | None = None,
        master_extra: str = "",
    ) -> None:
        # Not under pytest's tmp dir: its 0700 parents keep the mail owner out of the
        # queue and data directories.
        self.base = Path(tempfile.mkdtemp(prefix="mailmeta-postfix-"))
        self.base.chmod(0o755)
        self.conf = self.base / "conf"
        self.queue = self.base / "queue"
        self.data = self.base / "data"
        self.logdir = self.base / "log"
        self.maillog = self.logdir / "maillog"
        self.port = free_port()
        host, _, port = relayhost.rpartition(":")
        params: dict[str, str] = {
            "compatibility_level": "3.6",
            "queue_directory": str(self.queue),
            "data_directory": str(self.data),
            "command_directory": str(TOOLS / "usr" / "sbin"),
            "daemon_directory": str(LIBS / "sbin"),
            "shlib_directory": str(LIBS),
            "meta_directory": str(self.conf),
            "mail_owner": MAIL_OWNER,
            "setgid_group": SETGID_GROUP,
            # The `postfix` command scrubs the environment: without this the daemons cannot
            # load their unpacked shared libraries.
            "import_environment": (
                f"MAIL_CONFIG MAIL_DEBUG MAIL_LOGTAG TZ LANG=C LD_LIBRARY_PATH={LIBS}"
            ),
            "maillog_file": str(self.maillog),
            "maillog_file_prefixes": str(self.logdir),
            "inet_interfaces": "loopback-only",
            "inet_protocols": "ipv4",
            "myhostname": "postfix.test",
            "mydestination": "",
            "mynetworks": "127.0.0.0/8",
            "relayhost": f"[{host}]:{port}",
            "smtpd_peername_lookup": "no",
            "smtp_dns_support_level": "disabled",
            "alias_maps": "",
            "alias_database": "",
            "local_recipient_maps": "",
            "biff": "no",
            # Retries come fast, so deferred-then-delivered fits a test.
            "queue_run_delay": "1s",
            "minimal_backoff_time": "1s",
            "maximal_backoff_time": "2s",
            "smtp_connect_timeout": "5s",
        }
        if milter is not None:
            params["smtpd_milters"] = milter
            params["milter_default_action"] = "accept"
        params.update(extra or {})
        self.params = params
        self.master_extra = master_extra
        self.master_pid: int | None = None

    def _postfix(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        env = {**os.environ, "LD_LIBRARY_PATH": str(LIBS)}
        return subprocess.run(
            [str(POSTFIX), "-c", str(self.conf), *args],
            env=env,
            capture_output=True,
            text=True,
            check=check,
            timeout=60,
        )

    def start(self) -> Postfix:
        ensure_mail_owner()
        for d in (self.conf, self.queue, self.data, self.logdir):
            d.mkdir(parents=True, exist_ok=True)
        owner = pwd.getpwnam(MAIL_OWNER)
        os.chown(self.data, owner.pw_uid, owner.pw_gid)
        shutil.copy(TOOLS / "etc" / "postfix" / "postfix-files", self.conf / "postfix-files")
        (self.conf / "main.cf").write_text(
            "".join(f"{k} = {v}\n" for k, v in self.params.items()), encoding="utf-8"
        )
        (self.conf / "master.cf").write_text(
            f"127.0.0.1:{self.port} inet n - n - - smtpd\n" + _MASTER + self.master_extra,
            encoding="utf-8",
        )
        started = self._postfix("start", check=False)
        if started.returncode != 0:
            raise RuntimeError(f"postfix start failed: {started.stderr} {self.log_text()}")
        wait_until(lambda: listening(self.port), 30, "Postfix's smtpd listener")
        pid_file = self.queue / "pid" / "master.pid"
        self.master_pid = wait_until(
            lambda: pid_file.is_file() and int(pid_file.read_text().strip() or 0), 10, "master.pid"
        )
        return self

    def log_text(self) -> str:
        with contextlib.suppress(FileNotFoundError):
            return self.maillog.read_text(encoding="utf-8", errors="replace")
        return ""

    def reload(self) -> None:
        """Re-read the configuration; postlogd reopens maillog_file (log rotation)."""
        self._postfix("reload")

    def flush(self) -> None:
        """Attempt delivery of every queued message now (postqueue -f)."""
        self._postfix("flush")

    def stop(self) -> None:
        if self.master_pid is None:
            return
        self._postfix("stop", check=False)
        pid = self.master_pid
        wait_until(lambda: not Path(f"/proc/{pid}").exists(), 30, "Postfix's master to exit")
        self.master_pid = None

    def cleanup(self) -> None:
        shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> Postfix:
        try:
            return self.start()
        except BaseException:
            self.stop()
            self.cleanup()
            raise

    def __exit__(self, *exc: Any) -> None:
        try:
            self.stop()
        finally:
            self.cleanup()
