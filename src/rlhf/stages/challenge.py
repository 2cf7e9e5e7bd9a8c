"""Champion/challenger: this run's policy against the registered `@champion`.

Eval compares them on the same held-out prompts, decoded the same way, by the run's
independent judge (`champion_comparison`). Promote moves the alias by compare-and-swap
under the registry's lease (`champion_lease`): when the champion changed after eval
compared against it (another run promoted meanwhile), `rechallenge` runs the same
comparison against the new champion, so the alias ends on the better of the two.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf.models.chat import ChatFormat, stop_ids
from rlhf.models.rollout import decode_responses, generate
from rlhf.stages.gate import wilson_interval
from rlhf.stages.judging import IndependentJudge
from rlhf.stages.scoring import score_responses
from rlhf.train.seed import seed_everything


def compare(a: np.ndarray, b: np.ndarray, confidence: float = 0.95) -> dict[str, float]:
    """Policy (a) vs another model (b): win rate with ties as half, tie rate, decisive win
    rate (wins / (wins + losses)) with its Wilson interval and the number of decisive
    comparisons."""
    wins, losses = int((a > b).sum()), int((a < b).sum())
    decisive = wins + losses
    lo, hi = wilson_interval(wins, decisive, confidence)
    return {"win_rate": float((a > b).mean() + 0.5 * (a == b).mean()), "tie_rate": float((a == b).mean()),
            "decisive_win_rate": wins / decisive if decisive else 0.5, "decisive_win_rate_lower": lo,
            "decisive_win_rate_upper": hi, "decisive_comparisons": decisive}


def decode_same_way(model, fmt: ChatFormat, rows: list, ecfg, seed: int, device):
    """Rollouts of `model` on the prompt `rows` (in `fmt`) in eval's batches, each batch
    seeded as eval seeds it, so two models differ only because they are different models."""
    for b, start in enumerate(range(0, len(rows), ecfg.batch_size)):
        ids = [fmt.prompt_ids(r) for r in rows[start:start + ecfg.batch_size]]
        seed_everything(seed * 7919 + b)
        yield generate(model, fmt.tok, ids, ecfg.max_new_tokens, ecfg.temperature, device)


def _loaded(parts: dict, device, mcfg):
    """A registered model (its own tokenizer, chat template and stop tokens) and its format."""
    model, tok = parts["model"].to(device).eval(), parts["tokenizer"]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, ChatFormat(tok, mcfg, stops=stop_ids(tok, model))


@torch.no_grad()
def champion_comparison(ecfg, n_prompts: int, seed: int, champ: dict, rows: list, policy_texts: list[str],
                        rm, fmt: ChatFormat, device, judge: IndependentJudge, load=None,
                        confidence: float = 0.95) -> dict:
    """The new policy against the current champion on the first `n_prompts` held-out
    prompts, decoded as in eval. The champion keeps its own tokenizer (it may come from
    another run). Compared by the run's independent judge (gold, or the held-out reward
    model). Without one, by reward models: this run's favours the policy trained against
    it, so the champion's own reward model (its lineage tag, loaded with `load`) judges
    too, and the comparison with the lower bound decides."""
    n = min(n_prompts, len(rows))
    cmodel, cfmt = _loaded(champ, device, fmt.mcfg)
    covered = rows[:-(-n // ecfg.batch_size) * ecfg.batch_size]  # eval's batches that hold the first n prompts
    texts = [t for ro in decode_same_way(cmodel, cfmt, covered, ecfg, seed, device)
             for t in decode_responses(cfmt.tok, ro)]
    rs, mine, texts = rows[:n], policy_texts[:n], texts[:n]
    judges = []  # (name, policy scores, champion scores)
    if judge.name != "reward_model":
        judges.append((judge.name, judge.scores(rs, mine), judge.scores(rs, texts)))
    else:
        judges.append(("reward_model", np.array(score_responses(rm, fmt, rs, mine, device)),
                       np.array(score_responses(rm, fmt, rs, texts, device))))
        crm_uri = champ.get("tags", {}).get("rlhf.reward_model_uri")
        if crm_uri and load is not None:
            m, mfmt = _loaded(load(crm_uri), device, fmt.mcfg)
            judges.append(("champion_reward_model", np.array(score_responses(m, mfmt, rs, mine, device)),
                           np.array(score_responses(m, mfmt, rs, texts, device))))
    out = {"champion/version": champ["version"], "champion/prompts": n,
           "champion/compared_by": "+".join(j[0] for j in judges)}
    cmps = {name: compare(a, c, confidence) for name, a, c in judges}
    for name, a, c in judges:
        out.update({f"champion/{name}_score_champion": float(c.mean()),
                    f"champion/{name}_score_policy": float(a.mean()),
                    **{f"champion/{name}_{k}": v for k, v in cmps[name].items()}})
    worst = min(cmps.values(), key=lambda c: c["decisive_win_rate_lower"])
    out.update({f"champion/{k}": v for k, v in worst.items()})
    return out




def eval_rows(prep, ecfg) -> list:
    """Eval's prompt rows: the held-out prompts, each `samples_per_prompt` times."""
    return [r for r in prep.rows("prompt_eval")[: ecfg.num_prompts] for _ in range(ecfg.samples_per_prompt)]


CHAMPION_WAIT_S = 3600.0
"""How long promote waits for another run's promotion (holding the champion lease) to end."""


def champion_lease(ctx, policy_name: str):
    """The lease that serialises moves of `@champion` of `policy_name`: beside the
    embedded sqlite registry (every run of this RLHF_HOME), else in the artifact root
    above the run's folder (every run that shares that root and tracking server)."""
    from pathlib import Path

    from rlhf.adapters.lease import Lease, owner_id
    from rlhf.adapters.store import LocalStore, open_store

    uri = ctx.tracker.tracking_uri or ""
    if uri.startswith("sqlite:///"):
        store = LocalStore(Path(uri[len("sqlite:///"):]).parent / "_registry")
    else:
        store = open_store(ctx.store.uri("").rstrip("/").rsplit("/", 1)[0] + "/_registry", ctx.settings)
    return Lease(store, f"{policy_name}.champion.lease", owner_id())


@torch.no_grad()
def rechallenge(ctx) -> dict:
    """Promote, after the champion moved since eval: this run's policy against the new
    `@champion`, exactly as eval compares them (its prompts, decoding, seeds and
    independent judge; the policy's answers decoded again, identical to eval's)."""
    from rlhf.adapters.registry import CHAMPION, model_name
    from rlhf.data.prepared import PrepData
    from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
    from rlhf.models.chat import chat_format
    from rlhf.stages.judging import independent_judge
    from rlhf.train.distributed import setup_one_process
    from rlhf.train.trainable import DTYPES, resolve_precision

    ecfg, gate = ctx.section("eval"), ctx.config
    device = setup_one_process(ctx.runtime)
    sft_dir = str(ctx.store.get_dir("sft/model"))
    tok = load_tokenizer(sft_dir, ctx.model)
    dtype = DTYPES[resolve_precision(ctx.runtime.precision, ctx.runtime.distributed, device)]
    policy = load_causal_lm(str(ctx.store.get_dir("ppo/model")), ctx.model, dtype=dtype).to(device).eval()
    rm = load_reward_model(str(ctx.store.get_dir("reward/model")), ctx.model, tok.pad_token_id,
                           dtype=dtype).to(device).eval()
    fmt = chat_format(tok, ctx.model, sft_dir)
    rows = eval_rows(PrepData(ctx.prep_store), ecfg)
    covered = rows[:-(-min(gate.champion_prompts, len(rows)) // ecfg.batch_size) * ecfg.batch_size]
    texts = [t for ro in decode_same_way(policy, fmt, covered, ecfg, ctx.seed, device)
             for t in decode_responses(fmt.tok, ro)]
    judge = independent_judge(ctx, fmt, rows, device, dtype, proxy=rm)
    champ = ctx.tracker.load_registered(model_name(ctx.registered_model, "policy"), CHAMPION)
    return champion_comparison(ecfg, gate.champion_prompts, ctx.seed, champ, rows, texts, rm, fmt, device, judge,
                               load=ctx.tracker.load_components, confidence=gate.confidence)
