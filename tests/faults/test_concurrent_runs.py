"""Issue 14, acceptance 5: two `rlhf run --stack` on the same data at once.

Both use the session's local stack (SeaweedFS + MLflow server), the same artifact root
and the same registered model; their PPO settings differ, so their policies differ
while their data (and its content key) is the same. A barrier at promote
(RLHF_FAULT_PROMOTE_BARRIER) makes both evals finish before either moves the alias, so
every time one run loses the race for `@champion` and must compare itself again with
the version the other promoted. Checked: both complete; the dataset was prepared once;
the registry holds each run's three versions; the champion is the winner of that
head-to-head, and the loser's result says what happened.

Each run's output goes to a file: a pipe that nobody reads while the other run is waited
for fills up and stalls that run, and with it the barrier."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid

import mlflow
import pytest

from rlhf.adapters.store import S3Store


@pytest.fixture(scope="module")
def two_runs(local_stack, tmp_path_factory):
    root = f"s3://rlhf/race-{uuid.uuid4().hex[:8]}"
    name = f"race-{uuid.uuid4().hex[:6]}"
    barrier = tmp_path_factory.mktemp("barrier")
    env = {**os.environ, "RLHF_STACK_DIR": str(local_stack.dir), "RLHF_RETRY_BACKOFF": "1s",
           "RLHF_FAULT_PROMOTE_BARRIER": str(barrier)}
    env.pop("MLFLOW_TRACKING_URI", None)
    common = ["--preset", "tiny", "--set", "num_threads=1", "--set", "gate.min_decisive_win_rate=0.0",
              "--set", f"tracking.registered_model={name}", "--set", f"tracking.experiment={name}"]
    variants = {"a": ["--set", "ppo.updates=3"], "b": ["--set", "ppo.updates=2", "--set", "ppo.lr=0.0002"]}
    procs, logs = {}, tmp_path_factory.mktemp("logs")
    for key, extra in variants.items():
        home = tmp_path_factory.mktemp(f"home-{key}")
        with open(logs / f"{key}.out", "w") as stdout, open(logs / f"{key}.err", "w") as stderr:
            procs[key] = subprocess.Popen(
                [sys.executable, "-m", "rlhf.cli", "run", "--stack", *common, *extra, "--output", f"{root}/{key}"],
                env={**env, "RLHF_HOME": str(home)}, stdout=stdout, stderr=stderr, text=True)
    out = {}
    for key, p in procs.items():
        p.wait(timeout=1200)
        out[key] = {"rc": p.returncode, "stdout": (logs / f"{key}.out").read_text(errors="replace"),
                    "stderr": (logs / f"{key}.err").read_text(errors="replace")}
    settings = local_stack.settings()
    for key in variants:
        assert out[key]["rc"] == 0, (key, out[key]["stdout"][-3000:], out[key]["stderr"][-3000:])
        store = S3Store(f"{root}/{key}", settings)
        out[key]["summary"] = store.read_json("summary.json")
        out[key]["log"] = store.read_bytes("pipeline.log").decode(errors="replace")  # every step's log
        out[key]["promote"] = store.read_json("promote/result.json")
    return {"root": root, "name": name, "runs": out, "settings": settings,
            "tracking_uri": local_stack.env()["MLFLOW_TRACKING_URI"]}


def test_both_complete_and_the_data_is_prepared_once(two_runs):
    runs = two_runs["runs"]
    prepared = [k for k, r in runs.items() if '"prepared_here": true' in r["log"]]
    reused = [k for k, r in runs.items() if '"prepared_here": false' in r["log"]]
    assert len(prepared) == 1 and len(reused) == 1, (prepared, reused)
    datasets = S3Store(f"{two_runs['root']}/_datasets", two_runs["settings"]).list_dirs("")
    assert len(datasets) == 1  # one content key, committed once


def test_the_champion_is_the_winner_of_the_compare_and_swap(two_runs):
    runs, name = two_runs["runs"], two_runs["name"]
    client = mlflow.MlflowClient(two_runs["tracking_uri"])
    versions = {k: r["promote"]["registered_versions"][f"{name}-policy"] for k, r in runs.items()}
    for kind in ("sft", "reward", "policy"):  # each run's three versions, nothing else
        assert sorted(v.version for v in client.search_model_versions(f"name = '{name}-{kind}'")) == ["1", "2"]
    champion = str(client.get_registered_model(f"{name}-policy").aliases["champion"])

    raced = [k for k, r in runs.items() if r["promote"]["champion_race"]]
    assert len(raced) == 1, {k: r["promote"]["champion_race"] for k, r in runs.items()}
    loser = raced[0]
    winner = "b" if loser == "a" else "a"
    note = runs[loser]["promote"]["champion_race"]
    assert f"the champion moved to version {versions[winner]} after eval compared against none" in note
    assert f"compared again with version {versions[winner]}" in note  # re-ran the comparison, said so
    assert runs[winner]["promote"]["promoted"] is True or champion == versions[loser]
    if "better, promoted" in note:  # the loser of the race beat the new champion head to head
        assert champion == versions[loser] and runs[loser]["promote"]["promoted"] is True
    else:
        assert "not better, not promoted" in note
        assert champion == versions[winner] and runs[loser]["promote"]["promoted"] is False
        assert any("does not beat champion version" in r for r in runs[loser]["promote"]["gate_reasons"])
        tags = client.get_model_version(f"{name}-policy", versions[loser]).tags
        assert tags["rlhf.gate"] == "failed" and "compared again" in tags["rlhf.champion_race"]
