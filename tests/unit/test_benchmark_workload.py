"""The benchmark workloads in code match their pages' own numbers: ../shared/benchmarks/WORKLOAD.md
(1M) and benchmarks/WORKLOAD-25M.md (25M)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def w():
    folder = ROOT / "benchmarks" / "workload"
    spec = importlib.util.spec_from_file_location("workload", folder / "__init__.py",
                                                  submodule_search_locations=[str(folder)])
    mod = importlib.util.module_from_spec(spec)
    sys.modules["workload"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_tokenizer_is_the_workloads(w):
    tok = w.tokenizer()
    assert len(tok) == 512 and tok.pad_token_id == 0 and tok.eos_token_id == 1 and tok.bos_token_id is None
    assert len(tok("sort")["input_ids"]) == 1 and len(tok(" 57")["input_ids"]) == 1


def test_token_totals_match_the_page(w):
    tok = w.tokenizer()
    sft = [(tok(r["prompt"] + r["completion"])["input_ids"], tok(r["completion"])["input_ids"]) for r in w.sft_rows()]
    lengths = [len(ids) + 1 for ids, _ in sft]  # + EOS
    assert sum(lengths) == 65_318 and min(lengths) == 11 and max(lengths) == 123
    assert sum(len(c) + 1 for _, c in sft) == 32_179  # completion + EOS
    rm = [(len(tok(r["prompt"] + r["chosen"])["input_ids"]) + 1, len(tok(r["prompt"] + r["rejected"])["input_ids"]) + 1)
          for r in w.rm_rows()]
    assert all(c == r for c, r in rm) and sum(c + r for c, r in rm) == 127_444
    prompts = w.ppo_prompts()
    assert len(prompts) == 192 and {len(tok(p)["input_ids"]) for p in prompts} == {18}


def test_parameter_counts_match_the_page(w):
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    cfg = w.model_config()
    torch.manual_seed(42)
    assert sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) == 984_192
    cfg.num_labels = 1
    assert sum(p.numel() for p in LlamaForSequenceClassification(cfg).parameters()) == 918_784


def test_the_25m_workload_matches_its_page(w):
    """WORKLOAD-25M.md: 25.8M parameters, SFT/RM rows of 257-511 tokens (log-normal around 340),
    202-token PPO prompts; the shared parts (tokenizer, task, seeds) are the 1M workload's."""
    import torch
    from transformers import LlamaForCausalLM, LlamaForSequenceClassification

    big = w.get("25m")
    assert w.get("1m") is w and big.NAME == "25m" and big.tokenizer is w.tokenizer
    cfg = big.model_config()
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (512, 8, 8, 1376)
    torch.manual_seed(42)
    assert sum(p.numel() for p in LlamaForCausalLM(cfg).parameters()) == 25_829_888
    cfg.num_labels = 1
    assert sum(p.numel() for p in LlamaForSequenceClassification(cfg).parameters()) == 25_568_256
    tok = big.tokenizer()
    lengths = sorted(len(tok(r["prompt"] + r["completion"])["input_ids"]) + 1 for r in big.sft_rows())
    assert len(lengths) == 160 and sum(lengths) == 54_262 and (lengths[0], lengths[-1]) == (257, 511)
    assert (lengths[79] + lengths[80]) / 2 == 328 and lengths[40] < 310 < 360 < lengths[120]  # a spread
    rm = [(len(tok(r["prompt"] + r["chosen"])["input_ids"]) + 1, len(tok(r["prompt"] + r["rejected"])["input_ids"]) + 1)
          for r in big.rm_rows()]
    assert all(c == r for c, r in rm) and sum(c + r for c, r in rm) == 113_592
    assert {len(tok(p)["input_ids"]) for p in big.ppo_prompts()} == {202}
    assert max(lengths) < big.MAX_LENGTH <= cfg.max_position_embeddings
    ours = _load("ours_side").workload_config(big, "sft", 20, [])
    assert (ours.model.hidden_size, ours.model.num_layers, ours.model.intermediate_size) == (512, 8, 1376)
    assert (ours.sft.batch_size, ours.reward.batch_size, ours.ppo.rollout_batch_size, ours.ppo.minibatch_size,
            ours.ppo.max_new_tokens) == (8, 8, 8, 4, 64)


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_loss_check_passes_noise_and_catches_a_different_curve():
    import random

    check = _load("run").loss_check
    rng = random.Random(0)
    trend = [6.2 - 1.5 * (1 - 0.97 ** s) for s in range(60)]
    ours = [x + rng.gauss(0, 0.05) for x in trend]
    trl = [x + rng.gauss(0, 0.05) for x in trend]  # same computation, other batches
    ok = check(ours, trl)
    assert ok["ok"] and len(ok["windows"]) == 6 and ok["windows"][0]["steps"] == "1-10"
    assert not check([x + 0.2 for x in ours], trl)["ok"]  # a loss 0.2 higher is not noise
    assert not check([x * 0.97 for x in ours], trl)["ok"]  # nor a 3% scale


def test_workload_config_is_the_pages(w):
    """Our stages get the page's settings: batch, learning rates, linear decay, clipping."""
    cfg = _load("ours_side").workload_config(w, "ppo", 12, [])
    assert (cfg.seed, cfg.num_threads, cfg.device) == (42, 2, "cpu")
    assert (cfg.sft.batch_size, cfg.sft.lr, cfg.sft.warmup_steps, cfg.sft.lr_schedule) == (16, 5e-4, 0, "linear")
    assert (cfg.reward.batch_size, cfg.reward.lr, cfg.reward.margin, cfg.reward.policy_comparisons) == (16, 1e-4, None, 0)
    p = cfg.ppo
    assert (p.updates, p.rollout_batch_size, p.minibatch_size, p.ppo_epochs) == (12, 16, 4, 1)
    assert (p.lr, p.value_lr, p.grad_clip, p.weight_decay, p.temperature, p.max_new_tokens) == (1e-5, 1e-5, None, 0.0, 0.7, 24)
    assert (p.kl.init_coef, p.kl.adaptive, p.kl.estimator, p.normalize_reward, p.missing_eos_penalty) == (0.05, False, "k1", False, 0.0)
    assert not cfg.uses_builtin_task


def test_gpu_check_script_parses():
    """benchmarks/gpu_check.sh runs only where a GPU is lent: its bash and its embedded
    Python must at least parse here (GPU_CHECK_SMOKE=1 runs every row on the CPU)."""
    import re
    import subprocess
    from pathlib import Path

    script = Path(__file__).resolve().parents[2] / "benchmarks" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    bodies = re.findall(r"<<'EOF'\n(.*?)\nEOF\n", script.read_text(), re.S)
    assert len(bodies) == 2
    for body in bodies:
        compile(body, str(script), "exec")
