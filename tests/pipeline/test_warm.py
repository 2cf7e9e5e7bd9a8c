"""Warm step processes (rlhf.pipelines.local.warm): a step started through the server behaves
like the cold `python -m ...` kfp.local would start: same output, exit status (signals
included), environment and working directory; and it really starts with the stack loaded."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from rlhf.pipelines.local import warm

PYTHON = sys.executable  # the fixture points sys.executable at the client while the server runs
pytestmark = pytest.mark.skipif(not warm.available(), reason="needs fork and no NVIDIA device")

STEP = textwrap.dedent("""
    import os, signal, sys
    print("argv", sys.argv[1:])
    print("pid", os.getpid())
    print("cwd", os.getcwd())
    print("env", os.environ.get("STEP_VAR"), os.environ.get("RLHF_STEP_VAR"))
    print("preloaded", "kfp.dsl.executor_main" in sys.modules)
    print("to stderr", file=sys.stderr)
    if sys.argv[1] == "die":
        os.kill(os.getpid(), signal.SIGKILL)
    if sys.argv[1] == "sleep":
        sys.stdout.flush()
        signal.pause()
    if sys.argv[1] == "raise":
        raise RuntimeError("step failed")
    sys.exit(int(sys.argv[1]))
""")


@pytest.fixture(scope="module")
def python():
    """The command that kfp.local puts in each step while the server runs."""
    with warm.warm_steps() as on:
        assert on
        yield sys.executable
    assert sys.executable == PYTHON  # restored afterwards


def step(python: str, cwd: Path, arg: str, env: dict | None = None) -> subprocess.CompletedProcess:
    """Run `python -m step_mod ARG` the way kfp.local does: inside `sh -ec`, output piped."""
    (cwd / "step_mod.py").write_text(STEP)
    return subprocess.run(["sh", "-ec", f"_KFP_RUNTIME=true {python} -m step_mod {arg}"], cwd=cwd,
                          env={**os.environ, **(env or {})}, capture_output=True, text=True, timeout=120)


def test_step_runs_warm_with_its_own_argv_cwd_env_and_exit_status(python, tmp_path):
    r = step(python, tmp_path, "3", {"RLHF_STEP_VAR": "x"})
    assert r.returncode == 3, r.stderr
    assert "argv ['3']" in r.stdout
    assert f"cwd {tmp_path}" in r.stdout
    assert "env None x" in r.stdout
    assert "preloaded True" in r.stdout  # forked from the preloaded server, not a fresh Python
    assert "to stderr" in r.stderr
    assert step(python, tmp_path, "0").returncode == 0


def test_step_killed_by_a_signal_reports_that_signal(python, tmp_path):
    r = step(python, tmp_path, "die")
    assert r.returncode == 128 + signal.SIGKILL  # as sh reports a child killed by SIGKILL


def test_uncaught_exception_prints_traceback_and_exits_1(python, tmp_path):
    r = step(python, tmp_path, "raise")
    assert r.returncode == 1
    assert "RuntimeError: step failed" in r.stderr


def test_step_with_an_import_time_variable_changed_starts_cold(python, tmp_path):
    r = step(python, tmp_path, "0", {"STEP_VAR": "changed"})
    assert r.returncode == 0, r.stderr
    assert "env changed None" in r.stdout
    assert "preloaded False" in r.stdout
    assert "cold: environment differs in ['STEP_VAR']" in r.stderr


def test_a_running_step_ends_with_the_server(tmp_path):
    """`rlhf run` stopping (done, failed or interrupted) stops the server, and the step it
    forked does not go on training in the background."""
    (tmp_path / "step_mod.py").write_text(STEP)
    with warm.warm_steps():
        proc = subprocess.Popen(["sh", "-ec", f"{sys.executable} -m step_mod sleep"], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
        pid = next(int(line.split()[1]) for line in proc.stdout if line.startswith("pid "))
        assert Path(f"/proc/{pid}").exists()
    proc.wait(timeout=30)
    assert proc.returncode == 1  # the client saw the server go before the step ended
    for _ in range(100):
        if not Path(f"/proc/{pid}").exists() or "\tZ" in Path(f"/proc/{pid}/status").read_text():
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"step {pid} still runs after the server stopped")


def test_a_step_ends_even_when_the_server_is_killed(tmp_path):
    """A server killed outright (as `rlhf run` does when it does not stop within 10 s, e.g.
    busy importing torch on a loaded machine) cannot send its steps SIGTERM: they get
    it from the kernel (the parent-death signal) and do not go on in the background."""
    (tmp_path / "step_mod.py").write_text(STEP)
    with warm.warm_steps():
        proc = subprocess.Popen(["sh", "-ec", f"{sys.executable} -m step_mod sleep"], cwd=tmp_path,
                                stdout=subprocess.PIPE, text=True)
        pid = next(int(line.split()[1]) for line in proc.stdout if line.startswith("pid "))
        server = int(Path(f"/proc/{pid}/status").read_text().split("PPid:")[1].split()[0])
        assert "pipelines.local.warm" in Path(f"/proc/{server}/cmdline").read_bytes().decode(errors="replace")
        os.kill(server, signal.SIGKILL)
        proc.wait(timeout=30)
        for _ in range(100):
            if not Path(f"/proc/{pid}").exists() or "\tZ" in Path(f"/proc/{pid}/status").read_text():
                break
            time.sleep(0.1)
        else:
            pytest.fail(f"step {pid} still runs after its server was killed")


def test_client_without_a_server_starts_cold(tmp_path):
    client = tmp_path / "client.py"
    client.write_text(warm.CLIENT)
    (tmp_path / "step_mod.py").write_text(STEP)
    r = subprocess.run([PYTHON, "-S", str(client), str(tmp_path / "no-socket"), PYTHON,
                        "-m", "step_mod", "4"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert r.returncode == 4, r.stderr
    assert "preloaded False" in r.stdout


def test_cold_reason():
    base = {"PATH": "/bin", "RLHF_QUIET": "1"}
    req = {"argv": ["-m", "kfp.dsl.executor_main"], "env": {**base, "RLHF_QUIET": "0", "_KFP_RUNTIME": "true",
                                                              "PWD": "/x", "MLFLOW_TRACKING_URI": "sqlite://"}}
    assert warm.cold_reason(req, base) is None
    assert "PATH" in warm.cold_reason({**req, "env": {**req["env"], "PATH": "/usr/bin"}}, base)
    assert "not -m" in warm.cold_reason({**req, "argv": ["script.py"]}, base)


def test_a_server_that_does_not_start_leaves_the_steps_cold(monkeypatch, capsys):
    before = sys.executable
    monkeypatch.setattr(warm, "PYTHON", "/bin/false")  # the server's interpreter fails at once
    with warm.warm_steps() as on:
        assert on is False and sys.executable == before
    assert "warm step server did not start, so steps start cold" in capsys.readouterr().err
