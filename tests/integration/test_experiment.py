"""`rlhf experiment kl|size|tax` end to end on the tiny preset: every arm runs through the
dispatcher from a shared base, and the table, plot, claims, MLflow parent run and
RESULTS.md section come out. (The claims themselves are measured with --quick on the
demo; see docs/RESULTS.md.)"""

from __future__ import annotations

import json

import mlflow
import numpy as np
import pytest

from rlhf.cli import main
from rlhf.ops.experiment import gao_fit

TINY = ["--preset", "tiny", "--set", "num_threads=1", "--set", "tracking.log_models=false",
        "--set", "ppo.judge_every=1", "--set", "ppo.lr=1e-3"]


def test_gao_fit_recovers_the_functional_form():
    d = np.linspace(0.05, 3, 40)
    alpha, beta = gao_fit(d, d * (0.8 - 0.5 * np.log(d)))
    assert alpha == pytest.approx(0.8, abs=1e-6) and beta == pytest.approx(0.5, abs=1e-6)


@pytest.mark.parametrize("kind", ["kl", "tax", "size"])
def test_experiment_runs_every_arm_and_reports(kind, tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    out, results = tmp_path / "exp", tmp_path / "RESULTS.md"
    assert main(["experiment", kind, *TINY, "--seeds", "0", "--output", str(out), "--results", str(results)]) == 0
    report = json.loads((out / f"{kind}.json").read_text())
    assert report["rows"] and report["claims"] and report["wall_s"] >= report["stage_s"] > 0
    assert all(isinstance(v, bool) for v in report["claims"].values())
    if kind == "kl":
        assert sorted(r["beta"] for r in report["rows"]) == [0.0, 0.01, 0.03, 0.1, 0.3]
        assert all(r["sqrt_kl"] >= 0 for r in report["rows"]) and (out / "kl.png").is_file()
        beta0 = next(r for r in report["rows"] if r["beta"] == 0.0)
        assert beta0["sqrt_kl"] > next(r for r in report["rows"] if r["beta"] == 0.3)["sqrt_kl"]
    if kind == "tax":
        assert {r["ptx_coef"] for r in report["rows"]} == {0.0, 1.0}
        assert all(r["alignment_tax_rel"] is not None for r in report["rows"])
    if kind == "size":
        row = report["rows"][0]
        assert row["large_params"] >= 8 * row["small_params"] and 0 <= row["small_preferred"] <= 1
        assert row["lower95"] <= row["small_preferred"] <= row["upper95"]
    text = results.read_text()
    assert f"<!-- rlhf experiment {kind} -->" in text and f"rlhf experiment {kind}" in text
    # one MLflow parent run holds the table; the arms' stage runs nest under it
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("rlhf")
    parent = next(r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("rlhf.experiment") == kind)
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "experiment")} >= {
        f"experiment/{kind}.json", f"experiment/{kind}.md"}
    children = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    assert len(children) >= 3


def test_the_kfp_pipeline_gives_the_command_s_table(tmp_path, monkeypatch, capsys):
    """`rlhf experiment --kfp` runs the experiment's KFP pipeline (seeds and arms as
    ParallelFor loops, the report as the exit step) through kfp.local: the same table as
    the command in one process, the same MLflow parent run shape, RESULTS.md written."""
    import builtins

    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    args = ["experiment", "tax", *TINY, "--seeds", "0,1"]
    assert main([*args, "--output", str(tmp_path / "one")]) == 0
    real_print = builtins.print
    assert main([*args, "--kfp", "--output", str(tmp_path / "kfp"), "--results", str(tmp_path / "R.md")]) == 0
    assert builtins.print is real_print  # kfp.local's parallel loop threads leave no indenting print behind
    one, kfp = (json.loads((tmp_path / d / "tax.json").read_text()) for d in ("one", "kfp"))
    assert len(kfp["rows"]) == 4 and kfp["claims"].keys() == one["claims"].keys()
    for a, b in zip(one["rows"], kfp["rows"]):
        assert a["arm"] == b["arm"]
        assert {k: v for k, v in a.items() if k != "arm"} == pytest.approx(
            {k: v for k, v in b.items() if k != "arm"}, rel=1e-5), (a, b)
    assert "KFP pipeline rlhf-experiment" in kfp["command"] and "<!-- rlhf experiment tax -->" in (
        tmp_path / "R.md").read_text()
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    exp = client.get_experiment_by_name("rlhf")
    parents = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("rlhf.experiment") == "tax"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)
    for p in parents:
        kids = client.search_runs([exp.experiment_id], f"tags.`mlflow.parentRunId` = '{p.info.run_id}'")
        assert len(kids) == len(client.search_runs(
            [exp.experiment_id], f"tags.`mlflow.parentRunId` = '{parents[0].info.run_id}'"))
    # a second experiment into the same folder is refused, naming the folder
    capsys.readouterr()
    assert main([*args, "--kfp", "--output", str(tmp_path / "kfp")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "kfp") in err and "already holds an experiment" in err


def test_an_experiment_in_s3_with_the_tracking_server(local_stack, s3_store, tmp_path):
    """--output s3://...: bases, arms (models copied store to store, verified) and the
    report live in the bucket (SeaweedFS here); runs go to the mlflow server. This is the
    layout the KFP pipeline's pods share on a cluster."""
    import os
    import subprocess
    import sys

    from rlhf.adapters.store import S3Store

    out = s3_store.uri("exp")
    env = {**os.environ, **local_stack.env(), "RLHF_HOME": str(tmp_path), "RLHF_QUIET": "1"}
    r = subprocess.run([sys.executable, "-m", "rlhf.cli", "experiment", "tax", *TINY, "--seeds", "0",
                        "--output", out], env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    store = S3Store(out, local_stack.settings())
    report = store.read_json("tax.json")
    assert len(report["rows"]) == 2 and report["output"] == out
    for arm in ("ptx=0.0-s0", "ptx=1.0-s0"):
        assert store.is_committed(f"arms/{arm}/sft/model") and store.is_committed(f"arms/{arm}/ppo/model")
        assert not store.exists(f"arms/{arm}/prep/report.json")  # read from the base, not copied
    client = mlflow.MlflowClient(local_stack.env()["MLFLOW_TRACKING_URI"])
    parent = next(p for p in client.search_runs([client.get_experiment_by_name("rlhf").experiment_id])
                  if p.data.tags.get("rlhf.run") == store.uri(""))
    assert parent.info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(parent.info.run_id, "experiment")} >= {"experiment/tax.json"}


def test_start_records_resumes_and_refuses_another_experiment(tmp_path, monkeypatch):
    """Each experiment folder has its own MLflow parent run (two folders of the same name
    do not share one); starting again resumes it; another experiment there is refused."""
    from rlhf.adapters.settings import Settings
    from rlhf.ops import experiment

    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    settings = Settings.from_env()
    kw = dict(preset="tiny", quick=False, seeds=[0, 1], sets=["num_threads=1"], settings=settings)
    specs = experiment.start("kl", output=str(tmp_path / "a" / "exp"), **kw)
    assert [s["seed"] for s in specs] == [0, 1]
    experiment.start("kl", output=str(tmp_path / "b" / "exp"), **kw)
    first = json.loads((tmp_path / "a/exp/experiment.json").read_text())
    other = json.loads((tmp_path / "b/exp/experiment.json").read_text())
    assert first["parent_run_id"] != other["parent_run_id"]
    assert first["sets"] == [*experiment.DEFAULTS["kl"], "num_threads=1"]
    experiment.start("kl", output=str(tmp_path / "a" / "exp"), **kw)  # a resume: the same record
    assert json.loads((tmp_path / "a/exp/experiment.json").read_text()) == first
    with pytest.raises(ValueError, match="holds another experiment"):
        experiment.start("tax", output=str(tmp_path / "a" / "exp"), **kw)
    with pytest.raises(ValueError, match="unknown experiment"):
        experiment.start("nope", output=str(tmp_path / "c"), **kw)
    with pytest.raises(ValueError, match="comma-separated integers"):
        experiment.parse_seeds("0,a")
    with pytest.raises(ValueError, match="gold judge"):  # before any model is trained
        experiment.start("size", output=str(tmp_path / "d"), **{**kw, "sets": ["data.sft_path=x.jsonl", "data.preference_path=y.jsonl"]})
    assert not (tmp_path / "d" / "experiment.json").exists()
