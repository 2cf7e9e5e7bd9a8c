"""Training stages across processes with DeepSpeed, for real, on CPU (gloo).

The same code path a GPU node takes (torchrun, one process per device, DeepSpeed
engines, rank-0 logging and saving, collective checkpoints), with two CPU processes:
- one DeepSpeed process trains exactly like the plain torch loop (same loss);
- two processes under ZeRO-3 run SFT, reward and PPO (PPO generation under ZeRO-3
  both with gathered weights and with synced layer-by-layer gathering); ZeRO-2 runs
  the whole pipeline in tests/pipeline/test_local_run.py;
- a ZeRO-2 job killed with SIGKILL resumes from its checkpoint to the same weights as
  an uninterrupted job, and refuses to resume with another process count;
- a rank's error reaches the user's terminal.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError
from safetensors.torch import load_file

from rlhf.config import DistributedConfig, PipelineConfig, load_config
from rlhf.ops.launch import launcher_for
from rlhf.train.distributed import Dist, DistributedError, check_divisible
from rlhf.train.trainable import deepspeed_config
from rlhf.adapters.settings import Settings

TINY = ["--preset", "tiny", "--set", "num_threads=1", "--set", "tracking.log_models=false",
        "--set", "sft.max_epochs=2", "--set", "sft.patience=100"]
TWO = ["--set", "distributed.num_processes=2"]


def rlhf(*args, env_extra=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "RLHF_QUIET": "1", **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=env, capture_output=True, text=True,
                          timeout=600)


def stage(out: Path, name: str, *extra, env_extra=None) -> dict:
    r = rlhf("stage", name, *TINY, *extra, "--output", str(out), env_extra=env_extra)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads((out / name / "result.json").read_text())


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    """prep, sft, reward once in one plain process; each test copies what it needs."""
    root = tmp_path_factory.mktemp("base")
    for name in ("prep", "sft", "reward"):
        stage(root, name)
    return root


def inputs(base: Path, dest: Path, *stages: str) -> Path:
    dest.mkdir(parents=True)
    for s in stages:
        shutil.copytree(base / s, dest / s, ignore=shutil.ignore_patterns("checkpoints", "mlflow_run_id"))
    return dest


def weights(out: Path, name: str) -> dict[str, torch.Tensor]:
    return load_file(str(out / name / "model" / "model.safetensors"))


# ----------------------------------------------------------------------------- config generation


def test_deepspeed_config_comes_from_the_stage_config():
    cfg = load_config("tiny")
    ds = deepspeed_config(cfg.distributed, batch_size=cfg.sft.batch_size, world=4, grad_clip=cfg.sft.grad_clip,
                          lr=cfg.sft.lr, weight_decay=cfg.sft.weight_decay)
    assert ds["train_batch_size"] == 16 and ds["train_micro_batch_size_per_gpu"] == 4
    assert ds["gradient_accumulation_steps"] == 1 and ds["gradient_clipping"] == cfg.sft.grad_clip
    assert ds["zero_optimization"]["stage"] == 2 and ds["zero_optimization"]["overlap_comm"] is True
    assert "offload_optimizer" not in ds["zero_optimization"] and "optimizer" not in ds  # our torch AdamW
    assert ds["bf16"] == {"enabled": False} and ds["fp16"]["enabled"] is False
    # train.precision and grad_accum_steps map onto DeepSpeed's settings
    acc = deepspeed_config(cfg.distributed, batch_size=64, world=4, grad_clip=1.0, lr=1e-3, precision="fp16",
                           grad_accum=4)
    assert (acc["train_micro_batch_size_per_gpu"], acc["gradient_accumulation_steps"]) == (4, 4)
    assert acc["fp16"] == {"enabled": True, "loss_scale": 0, "initial_scale_power": 16}  # dynamic loss scaling


def test_deepspeed_config_zero3_offload_bf16():
    d = DistributedConfig(zero_stage=3, offload_optimizer=True, offload_params=True, bf16=True)
    ds = deepspeed_config(d, batch_size=64, world=8, grad_clip=0.5, lr=2e-5, weight_decay=0.1, eps=1e-5,
                          precision="bf16")
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["stage3_gather_16bit_weights_on_model_save"] is True
    assert z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    # ZeRO-Offload steps on the CPU with DeepSpeed's Adam: the optimizer comes from the config
    assert ds["optimizer"] == {"type": "AdamW", "params": {"lr": 2e-5, "weight_decay": 0.1, "eps": 1e-5,
                                                           "betas": [0.9, 0.999]}}
    assert ds["bf16"] == {"enabled": True} and ds["train_micro_batch_size_per_gpu"] == 8
    assert ds["gradient_clipping"] == 0.5


def test_distributed_config_rejects_impossible_combinations():
    with pytest.raises(ValidationError, match="offload_params needs distributed.zero_stage: 3"):
        PipelineConfig.model_validate({"distributed": {"zero_stage": 2, "offload_params": True}})
    with pytest.raises(ValidationError, match="offload_optimizer needs"):
        PipelineConfig.model_validate({"distributed": {"zero_stage": 0, "offload_optimizer": True}})
    with pytest.raises(ValidationError):
        PipelineConfig.model_validate({"distributed": {"zero_stage": 4}})


def test_shard_gives_every_rank_an_equal_non_empty_slice():
    items = list(range(10))
    slices = [Dist(rank=r, world=4).shard(items) for r in range(4)]
    assert [len(s) for s in slices] == [3, 3, 3, 3]
    assert sorted(set(sum(slices, []))) == items  # all covered; the two fill-ins repeat the first items
    assert sum(slices, []) == items + [0, 1]
    assert [Dist(rank=r, world=2).shard([7]) for r in range(2)] == [[7], [7]]  # an epoch's last, single item
    assert Dist().shard(items) is items


def test_batch_sizes_must_divide_by_the_process_count():
    check_divisible({"sft.batch_size": 16}, 4)
    with pytest.raises(DistributedError, match=r"sft.batch_size=18 must divide by the 4 training processes"):
        check_divisible({"sft.batch_size": 18, "reward.batch_size": 16}, 4)


def test_which_launcher_a_stage_needs(tmp_path):
    plain = load_config("tiny")
    two = load_config("tiny", overrides=["distributed.num_processes=2"])
    ds_one = load_config("tiny", overrides=["distributed.engine=deepspeed"])
    s = Settings.from_env({"RLHF_HOME": str(tmp_path)})
    assert launcher_for("sft", plain, s) is None  # one process, plain torch: in this process
    assert launcher_for("ppo", two, s) == "torchrun"
    assert launcher_for("reward", ds_one, s) == "torchrun"  # DeepSpeed wants its launcher's variables
    assert launcher_for("eval", two, s) is None  # eval and promote never spread
    worker = Settings.from_env({"RLHF_HOME": str(tmp_path), "RLHF_STAGE_REQUEST": "{}"})
    assert launcher_for("sft", two, worker) is None  # already one of the processes
    multi_node = Settings.from_env({"RLHF_HOME": str(tmp_path), "RLHF_TRAINJOB": "{}"})
    assert launcher_for("sft", plain, multi_node) == "trainjob"


# ----------------------------------------------------------------------------- real processes


def test_one_deepspeed_process_trains_like_plain_torch(base, tmp_path):
    """ZeRO-2 in fp32 with our AdamW: the same computation as the torch loop."""
    out = inputs(base, tmp_path / "ds", "prep")
    r = stage(out, "sft", "--set", "distributed.engine=deepspeed")
    ref = json.loads((base / "sft" / "result.json").read_text())
    assert r["steps"] == ref["steps"]
    assert r["best_eval_loss"] == pytest.approx(ref["best_eval_loss"], rel=1e-5)
    assert [s for s, _ in r["eval_curve"]] == [s for s, _ in ref["eval_curve"]]
    for name, t in weights(base, "sft").items():
        assert torch.allclose(weights(out, "sft")[name], t, atol=1e-5), name


def test_two_processes_run_every_training_stage_under_zero3(base, tmp_path):
    """ZeRO-3 (parameters partitioned too); ZeRO-2, the default, runs every stage in
    tests/pipeline/test_local_run.py::test_training_steps_in_two_processes and below."""
    out = inputs(base, tmp_path / "zero3", "prep")
    z = ["--set", "distributed.zero_stage=3"]
    sft = stage(out, "sft", *TWO, *z)
    ref = json.loads((base / "sft" / "result.json").read_text())
    assert sft["steps"] == ref["steps"]
    # each rank averages its own tokens, so the loss is close to one process's, not equal
    assert sft["best_eval_loss"] == pytest.approx(ref["best_eval_loss"], rel=0.02)
    rm = stage(out, "reward", *TWO, *z)
    # whole groups (one prompt's comparisons), an equal number per process, about batch_size pairs a step
    assert rm["rm/groups_per_step"] % 2 == 0 and rm["steps"] == -(-rm["rm/groups"] // rm["rm/groups_per_step"])
    ppo = stage(out, "ppo", *TWO, *z)
    assert ppo["updates"] == 3 and ppo["resumed_from"] is None
    assert 0 < ppo["last_metrics"]["ppo/response_length"] <= 8
    for name in ("sft", "reward", "ppo"):  # rank 0 saved whole (gathered) weights
        w = weights(out, name)
        assert all(torch.isfinite(t).all() for t in w.values())
        assert {k: tuple(t.shape) for k, t in w.items()} == {k: tuple(t.shape) for k, t in weights(base, name if name != "ppo" else "sft").items()}
    assert not torch.equal(weights(out, "ppo")["lm_head.weight"], weights(out, "sft")["lm_head.weight"])


def test_ppo_generates_under_zero3_with_synced_gpus(base, tmp_path):
    out = inputs(base, tmp_path / "synced", "prep", "sft", "reward")
    ppo = stage(out, "ppo", *TWO, "--set", "distributed.zero_stage=3", "--set", "distributed.zero3_generation=synced",
                "--set", "distributed.gradient_checkpointing=true")
    assert ppo["updates"] == 3
    assert all(v == v for v in ppo["last_metrics"].values())  # no NaN


def test_killed_zero2_job_resumes_to_the_same_weights(base, tmp_path):
    ckpt = ["--set", "sft.checkpoint_every=5", "--set", "sft.max_epochs=1"]  # one epoch: about 12 steps
    clean = inputs(base, tmp_path / "clean", "prep")
    crashed = inputs(base, tmp_path / "crashed", "prep")
    stage(clean, "sft", *TWO, *ckpt)
    total = json.loads((clean / "sft" / "result.json").read_text())["steps"]
    assert total > 7

    r = rlhf("stage", "sft", *TINY, *TWO, *ckpt, "--output", str(crashed),
             env_extra={"RLHF_FAULT_KILL_AT_STEP": "sft:7"})  # rank 0 dies like kill -9 after step 7
    assert r.returncode != 0
    assert not (crashed / "sft" / "result.json").exists()
    done = sorted(p.name for p in (crashed / "sft" / "checkpoints").iterdir() if (p / "_COMMITTED").exists()
                  or (p / "MANIFEST.json").exists())
    assert done == ["step-00000005"], done

    one = rlhf("stage", "sft", *TINY, *ckpt, "--output", str(crashed))
    assert one.returncode != 0
    assert "written by 2 training processes and this run has 1" in one.stderr

    resumed = stage(crashed, "sft", *TWO, *ckpt)
    assert resumed["resumed_from"] == 5 and resumed["steps"] == total
    a, b = weights(clean, "sft"), weights(crashed, "sft")
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=0, atol=1e-6), name


def test_a_failing_rank_says_why(base, tmp_path):
    out = inputs(base, tmp_path / "bad", "prep")
    r = rlhf("stage", "sft", *TINY, *TWO, "--set", "sft.batch_size=15", "--output", str(out))
    assert r.returncode != 0
    last = r.stderr.strip().splitlines()[-1]
    assert "stage 'sft' failed in 2 processes" in last
    assert "sft.batch_size=15 must divide by the 2 training processes" in last
    assert not (out / "sft" / "model").exists()


def test_advantages_are_whitened_over_the_global_batch():
    """Two ranks' slices whitened with the shared statistics equal one process whitening it all."""
    from rlhf.math import masked_whiten

    g = torch.Generator().manual_seed(0)
    adv = torch.randn(8, 5, generator=g, dtype=torch.float64)
    mask = (torch.rand(8, 5, generator=g) > 0.3).double()
    halves = [(adv[:4], mask[:4]), (adv[4:], mask[4:])]

    class TwoRanks:  # all_reduce of the two slices' sums, without processes
        world = 2

        def sum_dict(self, _values):
            return {k: sum(float(v) for v in vs) for k, vs in zip(
                ("sum", "sq", "n"), zip(*[((a * m).sum(), (a * a * m).sum(), m.sum()) for a, m in halves]))}

    both = torch.cat([masked_whiten(a, m, reduce=TwoRanks().sum_dict) for a, m in halves])
    assert torch.allclose(both, masked_whiten(adv, mask), atol=1e-7)
