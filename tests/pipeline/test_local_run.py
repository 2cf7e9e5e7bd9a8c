"""`rlhf run`: the whole DAG through kfp.local on the embedded default (sqlite MLflow,
local artifact folder), with the promotion gate and the failure paths.

One RLHF_HOME (one registry) for the module; the runs build on each other:
  1. a first run whose PPO step is killed (SIGKILL) once: the retried task resumes
     from its checkpoint; the run registers three models and becomes @champion
  2. the same config again: an identical policy does not beat the champion, so its
     version is registered with the reasons and the alias stays
  3. a run killed right after moving the alias: the exit handler puts the alias back
     and removes the run's versions
  4. bad data: prep fails with file:line; nothing registered
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

NAME = "pipe-test"
TINY = ["--preset", "tiny", "--set", "num_threads=1", "--set", "gate.min_decisive_win_rate=0.0",
        "--set", f"tracking.registered_model={NAME}", "--set", "tracking.experiment=pipeline-test"]


@pytest.fixture(scope="module")
def home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("home")


def rlhf(home: Path, *args: str, env: dict | None = None, timeout: int = 600) -> subprocess.CompletedProcess:
    full = {**os.environ, "RLHF_HOME": str(home), "RLHF_RETRY_BACKOFF": "1s", **(env or {})}
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=full, capture_output=True, text=True,
                          timeout=timeout)


def client(home: Path) -> mlflow.MlflowClient:
    uri = f"sqlite:///{home / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return mlflow.MlflowClient(uri)


def versions(home: Path, kind: str) -> list[str]:
    return sorted(v.version for v in client(home).search_model_versions(f"name = '{NAME}-{kind}'"))


def champion(home: Path) -> str | None:
    v = client(home).get_registered_model(f"{NAME}-policy").aliases.get("champion")
    return None if v is None else str(v)


@pytest.fixture(scope="module")
def first(home):
    """Run 1, with PPO killed after update 2 (its checkpoint) on the first attempt."""
    r = rlhf(home, "run", *TINY, "--output", str(home / "run1"), env={"RLHF_FAULT_KILL_AT_STEP": "ppo:2"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r, json.loads((home / "run1" / "summary.json").read_text())


def test_first_run_is_promoted(home, first):
    r, summary = first
    for key in ("rm/accuracy", "eval/win_rate_vs_sft", "eval/gold_delta", "eval/kl_vs_sft", "eval/alignment_tax",
                "promoted", "registered_model", "policy_model_uri", "registered_versions", "wall_s"):
        assert key in summary, key
    assert summary["promoted"] is True
    assert summary["registered_model"] == f"{NAME}-policy"
    assert summary["policy_model_uri"] == f"models:/{NAME}-policy@champion"
    assert summary["registered_versions"] == {f"{NAME}-sft": "1", f"{NAME}-reward": "1", f"{NAME}-policy": "1"}
    assert {"sft", "reward", "ppo", "eval", "promote", "total"} <= set(summary["wall_s"])
    assert champion(home) == "1"
    assert "promoted: true" in r.stdout and "MLflow UI: mlflow ui --backend-store-uri sqlite:///" in r.stdout
    assert f"step logs: {home / 'run1' / 'pipeline.log'}" in r.stdout
    assert len(r.stdout.splitlines()) < 40  # a line per step and the summary, not the executor JSON


def test_killed_ppo_task_resumed_from_its_checkpoint(home, first):
    r, _ = first
    ppo = json.loads((home / "run1" / "ppo" / "result.json").read_text())
    assert ppo["resumed_from"] == 2 and ppo["updates"] == 3  # continued at 2, not restarted at 0
    # one line per finished step on the terminal, the killed attempt included; every step's log in the run folder
    assert "  train-ppo: failure (" in r.stdout and "  train-ppo: success (" in r.stdout, r.stdout
    assert "Executing task" not in r.stdout + r.stderr and "executor_input" not in r.stdout + r.stderr
    log = (home / "run1" / "pipeline.log").read_text()
    assert log.count("Executing task \x1b[96m'train-ppo'") == 2 and "Got executor_input" in log
    c = client(home)
    run = c.get_run(ppo["mlflow_run_id"])
    assert run.data.tags.get("rlhf.resumed") == "true" and run.info.status == "FINISHED"
    steps = [m.step for m in c.get_metric_history(run.info.run_id, "ppo/kl")]
    assert sorted(set(steps)) == [1, 2, 3]


def test_parent_run_with_nested_stage_runs(home, first):
    c = client(home)
    exp = c.get_experiment_by_name("pipeline-test")
    runs = c.search_runs([exp.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("rlhf.stage") == "pipeline" and r.info.run_name == "run1")
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["rlhf.git_sha"] and parent.data.tags["rlhf.data_key"]
    assert parent.data.params["ppo.updates"] == "3"
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert sorted(r.data.tags["rlhf.stage"] for r in children) == ["eval", "ppo", "promote", "reward", "sft"]
    assert all(r.info.status == "FINISHED" for r in children)
    arts = {a.path for a in c.list_artifacts(parent.info.run_id, "plots")}
    assert "plots/pipeline.png" in arts
    v = c.get_model_version(f"{NAME}-policy", "1")
    assert v.tags["rlhf.parent_run_id"] == parent.info.run_id and v.tags["rlhf.sft_version"] == "1"
    assert v.tags["rlhf.gate"] == "passed"


def kfp_outputs(home: Path, run: str) -> Path:
    """The kfp.local outputs (`$RLHF_HOME/.kfp/outputs/<pipeline run>/<task>/`) of the
    pipeline run whose start step opened the run folder `run`."""
    for d in sorted((home / ".kfp" / "outputs").iterdir()):
        start = d / "start-run" / "executor_output.json"
        if start.exists() and json.loads(start.read_text())["parameterValues"]["run_root"] == str(home / run):
            return d
    raise AssertionError(f"no kfp.local outputs for {run}")


def artifact(outputs: Path, task: str, name: str) -> dict:
    """One output artifact of a task as the KFP executor recorded it (uri, metadata)."""
    return json.loads((outputs / task / "executor_output.json").read_text())["artifacts"][name]["artifacts"][0]


def test_each_step_outputs_its_headline_metrics_for_the_kubeflow_ui(home, first):
    """dsl.Metrics of every stage step, as kfp.local recorded them, agree with the run's
    summary.json and results; every name is one KFP accepts."""
    import re

    _, summary = first
    out, run = kfp_outputs(home, "run1"), home / "run1"
    metrics = {task: artifact(out, task, "metrics")["metadata"]
               for task in ("prep-data", "train-sft", "train-reward", "train-ppo", "evaluate")}
    assert all(re.fullmatch(r"[A-Za-z][A-Za-z0-9_]*", k) for m in metrics.values() for k in m), metrics
    key = json.loads((run / "pipeline.json").read_text())["data_key"]
    sizes = json.loads((home / "_datasets" / key / "prep" / "report.json").read_text())["sizes"]
    assert {k[len("prep_sizes_"):]: v for k, v in metrics["prep-data"].items() if k.startswith("prep_sizes_")} == sizes
    assert metrics["prep-data"]["prep_rejected_sft"] == 0
    sft = json.loads((run / "sft" / "result.json").read_text())
    assert metrics["train-sft"]["sft_best_eval_loss"] == summary["sft/best_eval_loss"]
    assert metrics["train-sft"]["sft_steps"] == sft["steps"] and metrics["train-sft"]["sft_tokens_per_s"] > 0
    rm = metrics["train-reward"]
    assert rm["rm_accuracy"] == summary["rm/accuracy"] and rm["rm_label_accuracy"] == summary["rm/label_accuracy"]
    ppo = metrics["train-ppo"]
    assert ppo["ppo_selected_update"] == summary["ppo/selected_update"] and ppo["ppo_updates"] == 3
    assert ppo["ppo_judge_best_score"] == summary["ppo/judge_best_score"] and "ppo_kl" in ppo and "ppo_reward" in ppo
    ev = metrics["evaluate"]
    for k in ("decisive_win_rate_vs_sft", "decisive_win_rate_lower_vs_sft", "tie_rate_vs_sft",
              "rm_decisive_win_rate_vs_sft", "kl_vs_sft", "judge_delta", "alignment_tax", "alignment_tax_rel"):
        assert ev[f"eval_{k}"] == summary[f"eval/{k}"], k
    assert [ev["eval_judge_delta_ci95_lo"], ev["eval_judge_delta_ci95_hi"]] == summary["eval/judge_delta_ci95"]
    assert ev["gate_passed"] == 1.0 and summary["gate/passed"] is True


def test_reward_step_outputs_its_heldout_pairs_as_classification_metrics(home, first):
    """The confusion matrix covers the pairs rm/accuracy is measured on (the gold judge's
    untied held-out pairs) and its diagonal is rm/accuracy; the ROC curve runs (0,0)->(1,1)."""
    _, summary = first
    pairs = artifact(kfp_outputs(home, "run1"), "train-reward", "heldout_pairs")["metadata"]
    result = json.loads((home / "run1" / "reward" / "result.json").read_text())
    cm = pairs["confusionMatrix"]
    assert [a["displayName"] for a in cm["annotationSpecs"]] == ["chosen better", "rejected better"]
    rows = [r["row"] for r in cm["rows"]]
    assert sum(map(sum, rows)) == result["rm/gold_pairs"] == pairs["pairs"] and pairs["truth"] == "judge"
    assert (rows[0][0] + rows[1][1]) / pairs["pairs"] == pytest.approx(summary["rm/accuracy"])
    if rows[1] != [0, 0]:  # the judge disagrees with some labels: both classes, so a curve
        roc = pairs["confidenceMetrics"]
        assert (roc[0]["falsePositiveRate"], roc[0]["recall"]) == (0, 0)
        assert (roc[-1]["falsePositiveRate"], roc[-1]["recall"]) == (1, 1)
        assert pairs["auc"] == result["rm/auc"]


def test_eval_step_outputs_a_markdown_report(home, first):
    """The eval step's dsl.Markdown: the gate's verdict, the win rates with their intervals,
    KL and tax, the PPO curves as an embedded PNG (from ppo/history.json, whole though PPO
    was killed and resumed), and the samples table."""
    import base64
    import re

    _, summary = first
    report = artifact(kfp_outputs(home, "run1"), "evaluate", "report")
    text = Path(report["uri"]).read_text()
    assert text == (home / "run1" / "eval" / "report.md").read_text()
    assert "**Gate: passed.**" in text and "✗" not in text
    lo, hi = summary["eval/decisive_win_rate_lower_vs_sft"], summary["eval/decisive_win_rate_upper_vs_sft"]
    assert f"**{summary['eval/decisive_win_rate_vs_sft']:.3f}** [{lo:.3f}, {hi:.3f}]" in text
    assert f"**{summary['eval/kl_vs_sft']:.4f}**" in text and f"{summary['eval/alignment_tax']:+.4f}" in text
    assert "None: no `@champion` was registered" in text  # the first run of this registry
    png = re.search(r"\(data:image/png;base64,([A-Za-z0-9+/=]+)\)", text)
    assert png and base64.b64decode(png.group(1))[:4] == b"\x89PNG"
    history = json.loads((home / "run1" / "ppo" / "history.json").read_text())
    assert [r["step"] for r in history] == [0, 1, 2, 3]  # killed after update 2, resumed: each update once
    assert all({"ppo/reward", "ppo/kl", "ppo/beta"} <= set(r) for r in history[1:])
    samples = json.loads((home / "run1" / "eval" / "samples.json").read_text())
    table = text.split("## Samples")[1]
    assert len(re.findall(r"^\| \d+ \|", table, flags=re.M)) == len(samples) > 0


def test_models_list_and_pull_and_plain_mlflow_load(home, first, tmp_path):
    r = rlhf(home, "models", "list", "--prefix", NAME)
    assert r.returncode == 0, r.stderr
    assert f"{NAME}-policy" in r.stdout and "@champion=v1" in r.stdout
    r = rlhf(home, "models", "pull", f"{NAME}-policy@champion", "--to", str(tmp_path / "pulled"))
    assert r.returncode == 0, r.stderr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tmp_path / "pulled")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "pulled", use_safetensors=True)
    ids = tok("reverse: a b c", return_tensors="pt")["input_ids"]
    assert model.generate(ids, max_new_tokens=4, do_sample=False).shape[1] > ids.shape[1]
    client(home)
    gen = mlflow.transformers.load_model(f"models:/{NAME}-policy@champion")
    out = gen("sort: 3 1 2", max_new_tokens=4, do_sample=False)
    assert isinstance(out[0]["generated_text"], str)


def test_rerunning_promote_changes_nothing(home, first, monkeypatch):
    from rlhf import runs

    pipeline = json.loads((home / "run1" / "pipeline.json").read_text())
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}")
    before = {k: versions(home, k) for k in ("sft", "reward", "policy")}
    result = runs.stage("promote", json.dumps(pipeline["config"]), str(home / "run1"), pipeline["parent_run_id"],
                        str(home / "_datasets" / pipeline["data_key"]), promote=True)
    assert result["promoted"] is True and result["registered_versions"][f"{NAME}-policy"] == "1"
    assert {k: versions(home, k) for k in ("sft", "reward", "policy")} == before
    assert champion(home) == "1"


def test_second_run_not_better_keeps_champion(home, first):
    r = rlhf(home, "run", *TINY, "--output", str(home / "run2"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = json.loads((home / "run2" / "summary.json").read_text())
    assert summary["champion/version"] == "1"
    assert summary["champion/win_rate"] == 0.5 and summary["champion/tie_rate"] == 1.0  # same policy: all ties
    assert summary["promoted"] is False and summary["gate_passed"] is False
    assert any("does not beat champion" in x for x in summary["gate_reasons"])
    assert champion(home) == "1"
    v2 = client(home).get_model_version(f"{NAME}-policy", "2")
    assert v2.tags["rlhf.gate"] == "failed" and "champion" in v2.tags["rlhf.gate_reasons"]
    # the eval step's report says why, with the champion comparison
    from rlhf.stages.report import escape

    text = Path(artifact(kfp_outputs(home, "run2"), "evaluate", "report")["uri"]).read_text()
    assert "**Gate: refused.**" in text and "## Against the champion (version 1)" in text
    assert all(escape(reason) in text for reason in summary["gate_reasons"])
    assert "✗ **fail**" in text


def test_killed_after_moving_the_alias_leaves_registry_untouched(home, first):
    """A fresh model name: no champion, so the gate passes and promote moves the alias;
    killed right after, the exit handler must take the alias back and the versions away."""
    before = {k: versions(home, k) for k in ("sft", "reward", "policy")}
    other = [*TINY, "--set", "tracking.registered_model=pipe-other"]
    r = rlhf(home, "run", *other, "--output", str(home / "run3"), env={"RLHF_FAULT_KILL_AT_STEP": "promote:2"})
    assert r.returncode == 1
    assert "did not finish" in r.stderr
    c = client(home)
    assert c.search_model_versions("name = 'pipe-other-policy'") == []
    assert c.search_model_versions("name = 'pipe-other-sft'") == []
    assert c.get_registered_model("pipe-other-policy").aliases == {}
    assert {k: versions(home, k) for k in ("sft", "reward", "policy")} == before and champion(home) == "1"
    parent = c.search_runs([c.get_experiment_by_name("pipeline-test").experiment_id],
                           "attributes.run_name = 'run3'")[0]
    assert parent.info.status == "FAILED"
    # the folder belongs to that run now: a new run must not reuse it
    r = rlhf(home, "run", *TINY, "--output", str(home / "run3"))
    assert r.returncode == 1 and "already holds a pipeline run" in r.stderr


def test_bad_data_fails_in_prep_with_file_and_line(home, first, tmp_path):
    bad = tmp_path / "sft.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\nnot json\n')
    prefs = tmp_path / "prefs.jsonl"
    prefs.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    before = versions(home, "policy")
    r = rlhf(home, "run", *TINY, "--set", f"data.sft_path={bad}", "--set", f"data.preference_path={prefs}",
             "--output", str(home / "run4"))
    assert r.returncode == 1
    assert "step 'prep' failed" in r.stderr and f"{bad}:2" in r.stderr, r.stderr[-2000:]
    assert versions(home, "policy") == before
    assert not (home / "run4" / "sft").exists()


def test_ctrl_c_closes_the_parent_run(home, first):
    import signal
    import time

    full = {**os.environ, "RLHF_HOME": str(home)}
    full.pop("MLFLOW_TRACKING_URI", None)
    # a shell that starts jobs in the background ignores SIGINT, and children inherit that: restore the
    # default so the command gets its KeyboardInterrupt as in a terminal
    proc = subprocess.Popen([sys.executable, "-m", "rlhf.cli", "run", *TINY, "--output", str(home / "run5")],
                            env=full, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    deadline = time.monotonic() + 120
    while not (home / "run5" / "pipeline.json").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert (home / "run5" / "pipeline.json").exists()
    time.sleep(3)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    c = client(home)
    parent = c.search_runs([c.get_experiment_by_name("pipeline-test").experiment_id],
                           "attributes.run_name = 'run5'")[0]
    assert parent.info.status == "FAILED" and "interrupted" in parent.data.tags["rlhf.error"]


def test_training_steps_in_two_processes(home, first):
    """The pipeline's sft, reward and ppo steps each start 2 DeepSpeed processes
    (torchrun); rank 0 alone logs, saves and registers."""
    args = [*TINY, "--set", "tracking.registered_model=pipe-dist", "--set", "distributed.num_processes=2"]
    r = rlhf(home, "run", *args, "--output", str(home / "run6"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    for stage in ("sft", "reward", "ppo"):
        assert json.loads((home / "run6" / stage / "result.json").read_text())["processes"] == 2
    c = client(home)
    parent = c.search_runs([c.get_experiment_by_name("pipeline-test").experiment_id],
                           "attributes.run_name = 'run6'")[0]
    children = c.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert sorted(ch.info.run_name for ch in children) == ["eval", "ppo", "promote", "reward", "sft"]
    ppo = next(ch for ch in children if ch.info.run_name == "ppo")
    assert [m.step for m in c.get_metric_history(ppo.info.run_id, "ppo/kl")] == [1, 2, 3]  # once per update
    assert [str(v.version) for v in c.search_model_versions("name = 'pipe-dist-policy'")] == ["1"]
