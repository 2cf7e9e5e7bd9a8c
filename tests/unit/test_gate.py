"""The promotion gate: thresholds, and the champion/challenger comparison."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf.config import GateConfig, ModelConfig, load_config
from rlhf.data.schema import PromptRow
from rlhf.models import build_causal_lm, train_tokenizer
from rlhf.models.chat import ChatFormat
from rlhf.data.tasks.judge import build_judge
from rlhf.stages.evaluate import champion_comparison
from rlhf.stages.gate import gate_decision

GOOD = {"eval/win_rate_vs_sft": 0.7, "eval/gold_delta": 0.1, "eval/kl_vs_sft": 1.0, "eval/alignment_tax": 0.05}


def test_gate_passes_when_every_threshold_holds():
    assert gate_decision(GOOD, GateConfig()) == (True, [])


@pytest.mark.parametrize("key,value,words", [
    ("eval/win_rate_vs_sft", 0.5, "gate.min_win_rate"),
    ("eval/gold_delta", -0.01, "gate.min_gold_delta"),
    ("eval/kl_vs_sft", 12.0, "gate.max_kl"),
    ("eval/alignment_tax", 0.9, "gate.max_alignment_tax"),
])
def test_gate_names_the_failed_threshold(key, value, words):
    passed, reasons = gate_decision({**GOOD, key: value}, GateConfig())
    assert not passed and len(reasons) == 1 and words in reasons[0]


def test_gate_without_gold_judge_skips_gold_threshold():
    assert gate_decision({**GOOD, "eval/gold_delta": None}, GateConfig())[0]


@pytest.mark.parametrize("win,margin,passed", [(0.5, 0.0, False), (0.51, 0.0, True), (0.55, 0.1, False)])
def test_gate_requires_beating_the_champion(win, margin, passed):
    s = {**GOOD, "champion/version": "3", "champion/win_rate": win}
    ok, reasons = gate_decision(s, GateConfig(champion_margin=margin))
    assert ok is passed
    if not passed:
        assert "does not beat champion version 3" in reasons[0]


CORPUS = ["question: how are you", " fine thanks", "question: what is it", " a cat", " a dog"] * 40


@pytest.fixture(scope="module")
def parts():
    tok = train_tokenizer(CORPUS, vocab_size=300)
    mcfg = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)

    def rm(seed):
        torch.manual_seed(seed)
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                          intermediate_size=64, num_labels=1, pad_token_id=tok.pad_token_id)
        return LlamaForSequenceClassification(cfg).eval()

    return tok, build_causal_lm(mcfg, tok, seed=1), rm(2), rm(3)


def test_champion_judged_by_both_reward_models_without_gold(parts):
    tok, champion_lm, rm_new, rm_champ = parts
    cfg = load_config("tiny", overrides=["gate.champion_prompts=6"])
    prompts = ["question: how are you", "question: what is it"] * 4
    policy_texts = [" fine thanks", " a cat"] * 4
    loaded = []

    def load(uri):
        loaded.append(uri)
        return {"model": rm_champ, "tokenizer": tok}

    champ = {"version": "4", "model": champion_lm, "tokenizer": tok, "tags": {"rlhf.reward_model_uri": "models:/r/1"}}
    rows = [PromptRow(prompt=p) for p in prompts]
    out = champion_comparison(cfg.eval, cfg.gate.champion_prompts, cfg.seed, champ, rows, policy_texts, rm_new,
                              ChatFormat(tok, cfg.model), torch.device("cpu"), build_judge(cfg), load=load)
    assert loaded == ["models:/r/1"]
    assert out["champion/version"] == "4" and out["champion/prompts"] == 6
    assert out["champion/compared_by"] == "reward_model+champion_reward_model"
    # the verdict is the stricter of the two judges
    assert out["champion/win_rate"] == min(out["champion/reward_model_win_rate"],
                                           out["champion/champion_reward_model_win_rate"])


def test_champion_judged_by_gold_for_the_builtin_task(parts):
    tok, champion_lm, rm_new, _ = parts
    cfg = load_config("tiny", overrides=["gate.champion_prompts=4"])
    prompts = ["reverse: a b c", "sort: 3 1 2"] * 2
    exact = [" c b a", " 1 2 3"] * 2

    def load(uri):
        raise AssertionError("gold needs no reward model")

    champ = {"version": "1", "model": champion_lm, "tokenizer": tok, "tags": {"rlhf.reward_model_uri": "models:/r/1"}}
    rows = [PromptRow(prompt=p) for p in prompts]
    out = champion_comparison(cfg.eval, cfg.gate.champion_prompts, cfg.seed, champ, rows, exact, rm_new,
                              ChatFormat(tok, cfg.model), torch.device("cpu"), build_judge(cfg), load=load)
    assert out["champion/compared_by"] == "gold"
    assert out["champion/gold_score_policy"] == 1.0
    # an untrained champion cannot match exact answers: the policy wins
    assert out["champion/win_rate"] > 0.5
