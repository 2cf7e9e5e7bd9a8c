"""`rlhf run`'s output (issue 15 item 6): a line per finished step on the terminal, every
line of every step (this process's and its children's, stdout and stderr) in the log."""

from __future__ import annotations

import subprocess
import sys

from rlhf.pipelines.local.steplog import progress_line, step_log

START = "15:00:00.000 - INFO - Executing task \x1b[96m'{}'\x1b[0m"
END = "15:00:09.000 - {} - Task \x1b[96m'{}'\x1b[0m finished with status \x1b[9{}m{}\x1b[0m"


def test_kfp_local_lines_become_a_line_per_finished_step():
    started: dict[str, float] = {}
    assert progress_line(START.format("train-ppo"), started, 100.0) is None
    assert progress_line("    [KFP Executor 2026-12-03 15:00:01,000 INFO]: Got executor_input:", started, 101.0) is None
    assert progress_line(END.format("ERROR", "train-ppo", 1, "FAILURE"), started, 107.4) == "  train-ppo: failure (7 s)"
    assert progress_line(START.format("train-ppo"), started, 108.0) is None  # the retry
    assert progress_line(END.format("INFO", "train-ppo", 2, "SUCCESS"), started, 148.0) == "  train-ppo: success (40 s)"


def test_every_line_goes_to_the_log_and_a_line_per_step_to_the_terminal(tmp_path, capfd):
    log = tmp_path / "run" / "pipeline.log"
    with step_log(log):
        print(START.format("train-sft"), flush=True)
        subprocess.run([sys.executable, "-c", "import sys; print('step stdout'); print('step stderr', file=sys.stderr)"],
                       check=True)
        print("this process's own stderr", file=sys.stderr, flush=True)
        print(END.format("INFO", "train-sft", 2, "SUCCESS"), flush=True)
    out, err = capfd.readouterr()
    assert out.splitlines() == ["  train-sft: success (0 s)"] and err == ""
    text = log.read_text()
    for line in ("Executing task", "step stdout", "step stderr", "this process's own stderr", "finished with status"):
        assert line in text, line
    print("after")  # the terminal is back
    assert capfd.readouterr().out == "after\n"


def test_quiet_prints_nothing_and_still_logs(tmp_path, capfd):
    log = tmp_path / "pipeline.log"
    with step_log(log, progress=False):
        print(START.format("prep-data"), flush=True)
        print(END.format("INFO", "prep-data", 2, "SUCCESS"), flush=True)
    assert capfd.readouterr() == ("", "")
    assert "prep-data" in log.read_text()
