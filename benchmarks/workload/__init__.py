"""The fixed CPU workload of the TRL comparison (../shared/benchmarks/WORKLOAD.md), in code.

Everything both sides of the benchmark need and nothing else: the tokenizer (the exact
file, checked by sha256), the model config, the three data generators and the stage
hyper-parameters. `tests/unit/test_benchmark_workload.py` checks it against the page's
own numbers (token totals, prompt lengths, parameter counts), so a comparison built on
it runs the workload TRL was measured on.
"""

from __future__ import annotations

import hashlib
import json
import random
import resource
import sys
import time
from pathlib import Path

NAME = "1m"
"""This workload's name (`--workload`); `get("25m")` is the compute-bound one (`w25m.py`)."""
TOKENIZER_FILE = Path(__file__).with_name("tokenizer.json")
TOKENIZER_SHA256 = "f4d530fbf89e4827e7ace1bfec802c5e625182afc2be6473cfe9b6d56fa0f6f1"
THREADS = 2
SEED = 42

# Stage settings (WORKLOAD.md, "Stage 1..3")
SFT = {"rows": 960, "batch_size": 16, "steps": 60, "lr": 5e-4, "grad_clip": 1.0, "untimed_steps": 2}
RM = {"pairs": 960, "batch_size": 16, "steps": 60, "lr": 1e-4, "grad_clip": 1.0, "untimed_steps": 2}
PPO = {"prompts": 192, "prompt_items": 16, "episodes_per_update": 16, "updates": 12, "untimed_updates": 2,
       "minibatches": 4, "ppo_epochs": 1, "lr": 1e-5, "temperature": 0.7, "new_tokens": 24, "kl_coef": 0.05,
       "gamma": 1.0, "lam": 0.95, "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "policy_seed": 42,
       "reward_seed": 43}


def tokenizer():
    """The workload's byte-level BPE (vocab 512, <pad>=0, <eos>=1, no BOS), verified."""
    from transformers import PreTrainedTokenizerFast

    data = TOKENIZER_FILE.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != TOKENIZER_SHA256:
        raise ValueError(f"{TOKENIZER_FILE}: sha256 {digest}, expected {TOKENIZER_SHA256}: not the workload's tokenizer")
    from tokenizers import Tokenizer

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(data.decode()), pad_token="<pad>",
                                   eos_token="<eos>")


MODEL = {"hidden_size": 128, "num_hidden_layers": 4, "num_attention_heads": 4, "intermediate_size": 384,
         "max_position_embeddings": 256}
MAX_LENGTH = 128
"""TRL's max_length (never reached: the longest SFT/RM sequence is 123 tokens)."""
EVAL_ROWS = 32
"""Held-out rows of our side's prep (its evaluations fall outside the timed steps)."""


def get(name: str):
    """The workload module called `name`: "1m" (this one) or "25m"."""
    if name == NAME:
        return sys.modules[__name__]
    if name == "25m":
        from workload import w25m

        return w25m
    raise ValueError(f"unknown workload {name!r}: expected 1m or 25m")


def build_config(model: dict):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=512, num_key_value_heads=model["num_attention_heads"], hidden_act="silu",
                       rms_norm_eps=1e-6, rope_theta=10000, initializer_range=0.02, tie_word_embeddings=False,
                       attention_bias=False, mlp_bias=False, attention_dropout=0.0, pad_token_id=0, eos_token_id=1,
                       bos_token_id=None, attn_implementation="sdpa", **model)


def model_config():
    return build_config(MODEL)


def example(rng: random.Random, n: int) -> tuple[str, list[int]]:
    xs = [rng.randint(0, 99) for _ in range(n)]
    return "sort: " + " ".join(map(str, xs)), sorted(xs)


def fmt(ys: list[int]) -> str:
    return " " + " ".join(map(str, ys))


def corrupt(rng: random.Random, ys: list[int]) -> list[int]:
    """Swap one pair of unequal items (pairs i<j in lexicographic order); with none, bump one."""
    ys = list(ys)
    pairs = [(i, j) for i in range(len(ys)) for j in range(i + 1, len(ys)) if ys[i] != ys[j]]
    if pairs:
        i, j = pairs[rng.randrange(len(pairs))]
        ys[i], ys[j] = ys[j], ys[i]
    else:
        k = rng.randrange(len(ys))
        ys[k] = (ys[k] + 1) % 100
    return ys


def items(rng: random.Random) -> int:
    """List length of an SFT row or RM pair."""
    return rng.randint(4, 60)


def make_sft_rows(count: int, draw) -> list[dict[str, str]]:
    rng = random.Random(1)
    rows = []
    for _ in range(count):
        p, ys = example(rng, draw(rng))
        rows.append({"prompt": p, "completion": fmt(ys)})
    return rows


def make_rm_rows(count: int, draw) -> list[dict[str, str]]:
    rng = random.Random(2)
    rows = []
    for _ in range(count):
        p, ys = example(rng, draw(rng))
        rows.append({"prompt": p, "chosen": fmt(ys), "rejected": fmt(corrupt(rng, ys))})
    return rows


def make_ppo_prompts(count: int, n: int) -> list[str]:
    rng = random.Random(3)
    return [example(rng, n)[0] for _ in range(count)]


def sft_rows() -> list[dict[str, str]]:
    return make_sft_rows(SFT["rows"], items)


def rm_rows() -> list[dict[str, str]]:
    return make_rm_rows(RM["pairs"], items)


def ppo_prompts() -> list[str]:
    return make_ppo_prompts(PPO["prompts"], PPO["prompt_items"])


def emit(stage: str, result: dict, began: float, versions: dict, json_path: Path | None) -> dict:
    """The end of a side script (`ours_side.py`, `trl_side.py`): the measurement plus peak RSS of
    the whole process, run time, versions and threads, printed as the one JSON line on stdout and
    written to `json_path` when given."""
    import torch

    result = {
        "stage": stage, **result,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "run_s": time.perf_counter() - began,
        "versions": {**versions, "torch": torch.__version__},
        "threads": torch.get_num_threads(),
    }
    line = json.dumps(result)
    print(line, flush=True)
    if json_path:
        Path(json_path).write_text(line + "\n")
    return result
