"""The compute-bound workload (`--workload 25m`, benchmarks/WORKLOAD-25M.md): a ~25M-parameter
Llama on rows of 256-512 tokens, beside the ~1M one on ~70-token rows (`workload/__init__.py`),
which stays as it is.

Same tokenizer, task (sorting lists of integers 0-99), seeds, optimizers and loss definitions as
the 1M workload; what changes is the model (hidden 512, 8 layers), the row lengths and the batch
sizes (smaller, so one step stays within seconds on 2 cores). Row lengths follow a log-normal
spread (median ~340 tokens), cut to 257-511 tokens, as real instruction data is skewed rather than
uniform. `tests/unit/test_benchmark_workload.py` checks the numbers the page states.
"""

from __future__ import annotations

import math
import random
from functools import partial

from workload import (  # noqa: F401 - the shared parts of both workloads
    SEED, THREADS, TOKENIZER_SHA256, build_config, corrupt, emit, example, fmt, make_ppo_prompts, make_rm_rows,
    make_sft_rows, tokenizer,
)

NAME = "25m"
MODEL = {"hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8, "intermediate_size": 1376,
         "max_position_embeddings": 1024}
MAX_LENGTH = 520
"""TRL's max_length (never reached: the longest SFT/RM sequence is 511 tokens)."""
EVAL_ROWS = 8
"""Held-out rows of our side's prep: fewer than the 1M workload's 32, its evaluations before and after
the timed steps costing 30x more per row."""
MIN_ITEMS, MAX_ITEMS = 127, 254  # an SFT/RM sequence is 2n+3 tokens: 257-511
MEDIAN_TOKENS, SIGMA = 340, 0.2

SFT = {"rows": 160, "batch_size": 8, "steps": 20, "lr": 5e-4, "grad_clip": 1.0, "untimed_steps": 2}
RM = {"pairs": 160, "batch_size": 8, "steps": 20, "lr": 1e-4, "grad_clip": 1.0, "untimed_steps": 2}
PPO = {"prompts": 96, "prompt_items": 200, "episodes_per_update": 8, "updates": 8, "untimed_updates": 2,
       "minibatches": 2, "ppo_epochs": 1, "lr": 1e-5, "temperature": 0.7, "new_tokens": 64, "kl_coef": 0.05,
       "gamma": 1.0, "lam": 0.95, "clip": 0.2, "value_clip": 0.2, "vf_coef": 0.1, "policy_seed": 42,
       "reward_seed": 43}


def items(rng: random.Random) -> int:
    """List length n of a row: its sequence (2n+3 tokens) log-normal around MEDIAN_TOKENS, cut to 257-511."""
    tokens = rng.lognormvariate(math.log(MEDIAN_TOKENS), SIGMA)
    return min(MAX_ITEMS, max(MIN_ITEMS, round((tokens - 3) / 2)))


def model_config():
    return build_config(MODEL)


sft_rows = partial(make_sft_rows, SFT["rows"], items)
rm_rows = partial(make_rm_rows, RM["pairs"], items)
ppo_prompts = partial(make_ppo_prompts, PPO["prompts"], PPO["prompt_items"])
