"""Warm step processes for `rlhf run`: each KFP step forks from a process that has
already imported torch, transformers, MLflow and the engine.

kfp.local's SubprocessRunner starts a fresh Python for every step, and each one spends
5-7 s importing the training stack before its first useful line, then 1-2 s tearing
the interpreter down. Over the eight steps of a run that was most of the pipeline's
overhead (`benchmarks/overhead.py`). A cluster pays it per pod, where it is small
next to scheduling a pod; on one machine it is not.

How: the runner's `sys.executable` (the Python that kfp.local puts in each step's
command, `use_venv=False`) is pointed at a small client for the duration of the run.
The client sends the step's argv, environment and working directory, with its
stdin/stdout/stderr as file descriptors, to a server over a Unix socket. The server
(started by `rlhf run`, preloaded once) forks; the child takes the descriptors,
environment and directory, and runs `python -m kfp.dsl.executor_main ...` exactly as
the cold process would, then exits without the slow interpreter teardown (atexit
handlers still run). The client exits with the child's status, a signal included,
so KFP retries, fault injection and the error file behave as before.

The child starts cold (execs a fresh Python with the same argv) when the step's
environment differs from the server's in a variable a library may read at import
time, or when its command is not `-m <module>`. Machines with NVIDIA devices always
start steps cold: CUDA does not survive fork. `RLHF_WARM_STEPS=0` turns it off.
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
import runpy
import shlex
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path

from rlhf.stages.table import STAGES

PRELOAD_LIGHT = ("kfp.dsl.executor_main", "rlhf.runs", "rlhf.adapters.tracking", "mlflow", "mlflow.store.tracking.sqlalchemy_store")
"""What the server imports first: enough for the start and finish steps."""
PRELOAD_HEAVY = (
    "torch", "transformers", "transformers.models.llama.modeling_llama", "mlflow.transformers",
    "deepspeed",  # transformers' save_pretrained imports it when it is installed
    "rlhf.adapters.registry", "rlhf.dispatch", *(s.module for s in STAGES.values()),
)
"""Then the training stack; every later step forks with it loaded."""

PYTHON = sys.executable
"""The interpreter itself (sys.executable points at the client while a server runs)."""

RUNTIME_ENV_PREFIXES = ("RLHF_", "MLFLOW_", "AWS_", "KFP_", "_KFP_", "KF_PIPELINES_")
"""Variables read when used, not at import: a step may differ from the server in these
and still start warm."""
RUNTIME_ENV = {"PWD", "OLDPWD", "SHLVL", "_", "COLUMNS", "LINES", "PYTEST_CURRENT_TEST"}
"""The same for single variables: what `sh` sets, the terminal size, pytest's marker."""

CLIENT = '''\
import json, os, signal, socket, struct, sys

def main(sock_path, python, argv):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        s.connect(sock_path)
    except OSError:  # no server (it failed to start, or has exited): start cold
        os.execv(python, [python, *argv])
    body = json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode()
    socket.send_fds(s, [struct.pack("!Q", len(body))], [0, 1, 2])
    s.sendall(body)
    status = b""
    while len(status) < 8:
        chunk = s.recv(8 - len(status))
        if not chunk:
            sys.stderr.write("rlhf warm step server went away before the step ended\\n")
            sys.exit(1)
        status += chunk
    code = struct.unpack("!q", status)[0]
    if code < 0:  # the step died of a signal: die of the same one
        if -code not in (signal.SIGKILL, signal.SIGSTOP):
            signal.signal(-code, signal.SIG_DFL)
        os.kill(os.getpid(), -code)
    sys.exit(code)

main(sys.argv[1], sys.argv[2], sys.argv[3:])
'''


def available() -> bool:
    """Fork-based warm starts: POSIX, and no NVIDIA devices (CUDA cannot be used in a
    child forked from a process that touched it, and a preload may)."""
    return hasattr(os, "fork") and hasattr(socket, "send_fds") and not Path("/dev/nvidiactl").exists()


@contextmanager
def warm_steps():
    """For the duration of the block, kfp.local starts its steps through the warm server.
    Yields True when warm starts are on; on any trouble the steps start cold. (The
    socket lives in the system temp folder: its path must stay under 108 bytes.)"""
    tmp = Path(tempfile.mkdtemp(prefix="rlhf-warm-"))
    sock, client, log = tmp / "s", tmp / "client.py", tmp / "server.log"
    client.write_text(CLIENT)
    real, previous = PYTHON, sys.executable
    with open(log, "wb") as log_f:
        server = subprocess.Popen([real, "-m", "rlhf.pipelines.local.warm", str(sock)], stdin=subprocess.DEVNULL,
                                  stdout=log_f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists() and server.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if not sock.exists():  # it would not start: say why and go on cold
            why = log.read_text(errors="replace").strip()[-2000:] or f"exit status {server.poll()}"
            print(f"warm step server did not start, so steps start cold:\n{why}", file=sys.stderr)
            yield False
            return
        sys.executable = " ".join(shlex.quote(p) for p in (real, "-S", str(client), str(sock), real))
        try:
            yield True
        finally:
            sys.executable = previous
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        for p in (sock, client, log):
            p.unlink(missing_ok=True)
        tmp.rmdir()


def serve(sock_path: str) -> None:
    """Listen first (clients queue while the preload runs), preload, then serve steps
    one at a time (kfp.local runs them one at a time) until the parent goes away.

    The first step (start: config, data hash, MLflow parent run) needs no torch, so a
    step that is already waiting once the light modules are in is forked then, and the
    heavy preload goes on beside it."""
    parent = os.getppid()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the steps themselves; `rlhf run` stops us
    signal.signal(signal.SIGTERM, _stop)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sock_path + ".tmp")
    listener.listen(16)
    os.rename(sock_path + ".tmp", sock_path)
    base_env = dict(os.environ)  # what a cold step would start with (the preload adds some)
    _preload(PRELOAD_LIGHT)
    early = None
    listener.settimeout(0)
    try:
        step = _fork_step(listener, listener.accept()[0], base_env)
    except (BlockingIOError, socket.timeout):
        step = None
    if step:  # its status goes back as soon as it ends; joined before the next fork (no thread is forked)
        early = threading.Thread(target=_report, args=step)
        early.start()
    _preload(PRELOAD_HEAVY)
    if early:
        early.join()
    listener.settimeout(1.0)
    while os.getppid() == parent:
        try:
            conn = listener.accept()[0]
        except socket.timeout:
            continue
        step = _fork_step(listener, conn, base_env)
        if step:
            _report(*step)


RUNNING: set[int] = set()
"""Steps forked and not yet reaped."""


def _stop(*_) -> None:
    """`rlhf run` is done or was interrupted: no step outlives it."""
    for pid in list(RUNNING):  # a copy: the early step's reporting thread may discard from it meanwhile
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    os._exit(0)


def _preload(names: tuple[str, ...]) -> None:
    for name in names:
        try:
            importlib.import_module(name)
        except Exception as e:  # an optional package missing: the step imports what it needs
            print(f"preload {name}: {type(e).__name__}: {e}", flush=True)
    sys.stdout.flush()
    sys.stderr.flush()


def _fork_step(listener: socket.socket, conn: socket.socket, base_env: dict[str, str]):
    """Read one request and fork its step; returns (pid, conn), or None for a bad request."""
    conn.settimeout(None)
    try:
        request, fds = _receive(conn)
    except (OSError, ValueError) as e:
        print(f"bad request: {e}", flush=True)
        conn.close()
        return None
    added = {k: v for k, v in os.environ.items() if k not in base_env}
    server = os.getpid()
    pid = os.fork()
    if pid == 0:
        _die_with(server)
        _child(listener, conn, fds, request, base_env, added)
    RUNNING.add(pid)
    for fd in fds:
        os.close(fd)
    return pid, conn


def _die_with(server: int) -> None:
    """The step gets SIGTERM when the server ends however it ends, also by SIGKILL after
    `_stop` had no chance to run (a server busy in its preload past `rlhf run`'s wait):
    Linux's parent-death signal. Elsewhere `_stop` alone ends the steps."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != server:  # the server went between the fork and the prctl
        os.kill(os.getpid(), signal.SIGTERM)


def _report(pid: int, conn: socket.socket) -> None:
    """Wait for the step and send its exit status (negative: the signal that ended it)."""
    _, status = os.waitpid(pid, 0)
    RUNNING.discard(pid)
    try:
        conn.sendall(struct.pack("!q", os.waitstatus_to_exitcode(status)))
    except OSError:  # the client is gone (interrupted): nothing to report to
        pass
    finally:
        conn.close()


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
    head, fds, _, _ = socket.recv_fds(conn, 8, 3)
    if len(head) != 8 or len(fds) != 3:
        for fd in fds:
            os.close(fd)
        raise ValueError(f"expected an 8-byte header and 3 descriptors, got {len(head)} bytes, {len(fds)} fds")
    size, body = struct.unpack("!Q", head)[0], b""
    while len(body) < size:
        chunk = conn.recv(min(size - len(body), 1 << 20))
        if not chunk:
            raise ValueError("request cut short")
        body += chunk
    return json.loads(body), fds


def cold_reason(request: dict, base_env: dict[str, str]) -> str | None:
    """Why a step must start cold, or None: its command is not `-m <module>`, or its
    environment differs from the server's in a variable that is not known to be read at
    run time (threads, devices, library switches are often read once, at import)."""
    argv, env = request["argv"], request["env"]
    if len(argv) < 2 or argv[0] != "-m":
        return f"command {argv[:2]} is not -m <module>"
    changed = sorted(k for k in set(env) | set(base_env) if env.get(k) != base_env.get(k)
                     and not k.startswith(RUNTIME_ENV_PREFIXES) and k not in RUNTIME_ENV)
    return f"environment differs in {changed}" if changed else None


def _child(listener: socket.socket, conn: socket.socket, fds: list[int], request: dict,
           base_env: dict[str, str], added: dict[str, str]) -> None:
    """The step: the client's descriptors, directory and environment (plus what the
    preload's imports set in the environment, as they would in a cold step), then
    `python -m <module> args`."""
    code = 1
    try:
        listener.close()
        conn.close()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
        for fd in fds:
            if fd > 2:
                os.close(fd)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        argv, env, cwd = request["argv"], request["env"], request["cwd"]
        os.chdir(cwd)
        reason = cold_reason(request, base_env)
        if reason:
            print(f"rlhf warm steps: starting {argv[:2]} cold: {reason}", file=sys.stderr, flush=True)
            os.execve(sys.executable, [sys.executable, *argv], env)
        os.environ.clear()
        os.environ.update({**added, **env})
        sys.path[0] = cwd  # as `python -m` puts the working directory first
        sys.stdout.reconfigure(line_buffering=True)
        sys.argv = [argv[1], *argv[2:]]
        try:
            runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
            if not isinstance(e.code, (int, type(None))):
                print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - report it as Python would, then exit 1
        traceback.print_exc()
        code = 1
    finally:
        try:
            atexit._run_exitfuncs()  # MLflow, logging: what a normal exit would do
        finally:
            for stream in (sys.stdout, sys.stderr):
                try:
                    stream.flush()
                except Exception:  # noqa: BLE001 - a closed pipe: nothing more to say
                    pass
            os._exit(code)


if __name__ == "__main__":
    serve(sys.argv[1])
