"""The promotion gate: thresholds, and the champion/challenger comparison."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

import numpy as np

from rlhf.config import ConfigError, GateConfig, ModelConfig, load_config
from rlhf.data.schema import PromptRow
from rlhf.models import build_causal_lm, train_tokenizer
from rlhf.models.chat import ChatFormat
from rlhf.data.tasks.judge import build_judge
from rlhf.stages.evaluate import champion_comparison, compare
from rlhf.stages.gate import gate_checks, gate_decision, wilson_interval
from rlhf.stages.judging import IndependentJudge

GOOD = {"eval/decisive_win_rate_vs_sft": 0.7, "eval/decisive_win_rate_lower_vs_sft": 0.6,
        "eval/decisive_comparisons_vs_sft": 100, "eval/judge": "gold", "eval/judge_delta": 0.1,
        "eval/kl_vs_sft": 1.0, "eval/alignment_tax": 0.05}


def test_gate_passes_when_every_threshold_holds():
    assert gate_decision(GOOD, GateConfig()) == (True, [])


@pytest.mark.parametrize("key,value,words", [
    ("eval/decisive_win_rate_lower_vs_sft", 0.49, "gate.min_decisive_win_rate"),
    ("eval/judge_delta", -0.01, "gate.min_gold_delta"),
    ("eval/kl_vs_sft", 12.0, "gate.max_kl"),
    ("eval/alignment_tax", 0.9, "gate.max_alignment_tax"),
    # a diverged policy: NaN fails every check instead of slipping through a comparison
    ("eval/kl_vs_sft", float("nan"), "gate.max_kl"),
    ("eval/alignment_tax", float("nan"), "gate.max_alignment_tax"),
    ("eval/judge_delta", float("nan"), "gate.min_gold_delta"),
    ("eval/decisive_win_rate_lower_vs_sft", float("nan"), "gate.min_decisive_win_rate"),
    # infinite numbers fail too, either side (a -inf KL or +inf delta would pass a comparison)
    ("eval/kl_vs_sft", float("-inf"), "gate.max_kl"),
    ("eval/kl_vs_sft", float("inf"), "gate.max_kl"),
    ("eval/judge_delta", float("inf"), "gate.min_gold_delta"),
    ("eval/alignment_tax", float("-inf"), "gate.max_alignment_tax"),
    # any other score, loss or rate eval reports
    ("eval/policy_judge_mean", float("nan"), "eval/policy_judge_mean is nan"),
    ("eval/rm_win_rate_vs_sft", float("inf"), "eval/rm_win_rate_vs_sft is inf"),
])
def test_gate_names_the_failed_threshold(key, value, words):
    passed, reasons = gate_decision({**GOOD, key: value}, GateConfig())
    assert not passed and len(reasons) == 1 and words in reasons[0]


def test_gate_checks_are_the_verdict_item_by_item():
    """Each check (for eval's report) with its value and rule; the failed ones' reasons are
    the verdict's, in order."""
    checks = gate_checks(GOOD, GateConfig())
    assert all(c.passed and not c.reason for c in checks)
    assert [c.value for c in checks[1:5]] == [0.6, 0.1, 1.0, 0.05] and "gate.max_kl" in checks[3].rule
    bad = {**GOOD, "eval/kl_vs_sft": 12.0, "eval/rm_win_rate_vs_sft": float("nan"), "champion/version": "3",
           "champion/decisive_win_rate_lower": 0.4}
    checks = gate_checks(bad, GateConfig())
    assert [c.reason for c in checks if not c.passed] == gate_decision(bad, GateConfig())[1]
    assert [c.name for c in checks if not c.passed] == ["KL(policy ‖ SFT) per response", "eval/rm_win_rate_vs_sft",
                                                        "decisive win rate vs champion v3, lower bound"]


def test_gate_without_a_judge_delta_skips_that_threshold():
    assert gate_decision({**GOOD, "eval/judge_delta": None}, GateConfig())[0]


def test_wilson_interval_matches_known_values():
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    assert wilson_interval(50, 50)[1] == 1.0


def test_gate_does_not_move_with_the_tie_rate():
    """The other task's refused run: 78.5% ties, decisive 0.709 on 400 prompts. Ties as half
    gave 0.545 (below the old 0.55 bar, out of reach for any policy beyond 0.61); on the
    decisive comparisons the win is significant."""
    rng = np.random.default_rng(0)
    n, ties, wins = 400, 314, 61  # 86 decisive: 61 wins, 25 losses
    sft = rng.random(n)
    pol = sft.copy()
    pol[ties:ties + wins] += 0.1
    pol[ties + wins:] -= 0.1
    c = compare(pol, sft)
    assert c["win_rate"] == pytest.approx(0.5 + 0.5 * (wins - (n - ties - wins)) / n)
    assert c["decisive_comparisons"] == 86 and c["decisive_win_rate"] == pytest.approx(61 / 86)
    s = {**GOOD, **{f"eval/{k}_vs_sft": v for k, v in c.items()}}
    assert c["decisive_win_rate_lower"] > 0.6 and gate_decision(s, GateConfig())[0]
    # the same test on a coin flip: no
    c = compare(np.array([1.0] * 43 + [0.0] * 43 + [0.5] * 314), np.full(400, 0.5))
    assert not gate_decision({**GOOD, **{f"eval/{k}_vs_sft": v for k, v in c.items()}}, GateConfig())[0]


@pytest.mark.parametrize("wins,losses,margin,passed", [(50, 50, 0.0, False), (57, 43, 0.0, False),
                                                       (75, 25, 0.0, True), (75, 25, 0.2, False)])
def test_gate_requires_beating_the_champion_significantly(wins, losses, margin, passed):
    c = compare(np.array([1.0] * wins + [0.0] * losses), np.full(wins + losses, 0.5))
    s = {**GOOD, "champion/version": "3", **{f"champion/{k}": v for k, v in c.items()}}
    ok, reasons = gate_decision(s, GateConfig(champion_margin=margin))
    assert ok is passed
    if not passed:
        assert "does not beat champion version 3" in reasons[0]


def test_the_old_ties_as_half_threshold_is_named_on_use():
    with pytest.raises(ConfigError, match="gate.min_win_rate was replaced by gate.min_decisive_win_rate"):
        load_config("tiny", overrides=["gate.min_win_rate=0.5"])


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
    fmt = ChatFormat(tok, cfg.model)
    proxy = IndependentJudge("reward_model", rm=rm_new, fmt=fmt, device=torch.device("cpu"))
    out = champion_comparison(cfg.eval, cfg.gate.champion_prompts, cfg.seed, champ, rows, policy_texts, rm_new,
                              fmt, torch.device("cpu"), proxy, load=load)
    assert loaded == ["models:/r/1"]
    assert out["champion/version"] == "4" and out["champion/prompts"] == 6
    assert out["champion/compared_by"] == "reward_model+champion_reward_model"
    # the verdict is the stricter of the two judges
    assert out["champion/decisive_win_rate_lower"] == min(
        out["champion/reward_model_decisive_win_rate_lower"],
        out["champion/champion_reward_model_decisive_win_rate_lower"])


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
                              ChatFormat(tok, cfg.model), torch.device("cpu"),
                              IndependentJudge("gold", task_judge=build_judge(cfg)), load=load)
    assert out["champion/compared_by"] == "gold"
    assert out["champion/gold_score_policy"] == 1.0
    # an untrained champion cannot match exact answers: the policy wins
    assert out["champion/win_rate"] > 0.5
