"""The benchmark workload in code matches ../shared/benchmarks/WORKLOAD.md's own numbers."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def w():
    spec = importlib.util.spec_from_file_location("workload", ROOT / "benchmarks" / "workload" / "__init__.py")
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
