"""Reward model on preference pairs (InstructGPT step 2).

The SFT backbone with a scalar head (AutoModelForSequenceClassification, one label),
trained with the pairwise loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin)
(InstructGPT eq. 1). Chosen and rejected go through one forward per step: each pair
as one segment over its shared prefix, segments packed into few rows with block
attention (`models.heads.pair_scores`) when the model honours custom masks, as
separate padded rows otherwise.

Held-out accuracy is reported twice: against the labels in the data (`rm/label_accuracy`)
and, when the task has a gold judge, against the judge on the pairs it does not tie
(`rm/accuracy`): the labels are noisy, the judge is the truth.

For the built-in task, comparisons of the SFT model's own samples are collected from
the simulated labelers first (InstructGPT's labelers ranked SFT outputs): a reward
model trained only on offline pairs misjudges the errors the policy actually makes.
They are committed to the store (`reward/comparisons`) so a resumed stage reuses them.

Steps:
  1. model from SFT + scalar head; comparisons of SFT samples; tokenise pairs
  2. optimiser + schedule; resume from the newest complete checkpoint
  3. train, checkpoint every `checkpoint_every`
  4. held-out accuracy (labels and gold judge)
  5. save, log the model
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import torch

from rlhf.config import PipelineConfig
from rlhf.train.distributed import Trainable, check_divisible, save_trained, setup
from rlhf.adapters.settings import maybe_inject_fault
from rlhf.data.tasks import gold_score
from rlhf.math import pairwise_reward_loss
from rlhf.models import load_reward_model, load_tokenizer, pair_scores, sequence_scores
from rlhf.models.loading import apply_lora
from rlhf.stages.common import (
    PrepData, StepClock, Timer, batch_order, lr_lambda, pad_right, progress, resume_checkpoint, save_checkpoint,
    seed_everything, tokenize_pair, write_result,
)


def encode_pairs(tok, rows) -> list[tuple[list[int], list[int]]]:
    return [(tokenize_pair(tok, r.prompt, r.chosen)[0], tokenize_pair(tok, r.prompt, r.rejected)[0]) for r in rows]


def score_texts(model, seqs: list[list[int]], pad_id: int, device, batch_size: int = 256) -> torch.Tensor:
    """Reward of each token sequence, (N,)."""
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i:i + batch_size]
            ids, attn = pad_right(chunk, pad_id)
            out.append(sequence_scores(model, ids.to(device), attn.to(device)).cpu())
    return torch.cat(out)


def collect_policy_comparisons(cfg: PipelineConfig, tok, sft_dir: str, prep, store, device) -> dict[str, list]:
    """Two SFT samples per prompt, ordered by a simulated labeler; train from train
    prompts, eval from held-out prompts. Committed once, then reused."""
    import json
    import random

    from rlhf.data.processing import read_jsonl_rows, write_jsonl
    from rlhf.data.schema import PreferenceRow
    from rlhf.data.tasks import BuiltinTask
    from rlhf.models import load_causal_lm
    from rlhf.stages.rollout import decode_responses, generate

    if store.is_committed("reward/comparisons"):
        d = store.get_dir("reward/comparisons")
        return {k: read_jsonl_rows(d / f"{k}.jsonl", "preference") for k in ("train", "eval")}
    policy = load_causal_lm(sft_dir, cfg.model).to(device).eval()
    task = BuiltinTask(cfg.task, cfg.seed)
    n = cfg.reward.policy_comparisons
    out = {}
    for split, count in (("train", n), ("eval", max(200, int(n * cfg.data.eval_fraction)))):
        prompts = [r.prompt for r in prep.rows(f"prompt_{split}")]
        rng = random.Random(f"{cfg.seed}-policy-comparisons-{split}")
        chosen = [rng.choice(prompts) for _ in range(count)]
        rows = []
        for i in range(0, count, 256):
            batch = chosen[i:i + 256]
            ids = [tok(p)["input_ids"] for p in batch]
            a = decode_responses(tok, generate(policy, tok, ids, cfg.ppo.max_new_tokens, 1.0, device))
            b = decode_responses(tok, generate(policy, tok, ids, cfg.ppo.max_new_tokens, 1.0, device))
            for p, x, y in zip(batch, a, b):
                if x != y and x.strip() and y.strip():
                    c, r = task.label(rng, p, x, y)
                    rows.append(PreferenceRow(prompt=p, chosen=c, rejected=r))
        out[split] = rows
    with tempfile.TemporaryDirectory() as tmp:
        for k, rows in out.items():
            write_jsonl(rows, Path(tmp) / f"{k}.jsonl")
        (Path(tmp) / "info.json").write_text(json.dumps({k: len(v) for k, v in out.items()}))
        store.put_dir(Path(tmp), "reward/comparisons")
    return out


def separate_scores(model, batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Chosen and rejected as separate rows of one forward, (B,) each."""
    seqs = [b[0] for b in batch] + [b[1] for b in batch]
    ids, attn = pad_right(seqs, pad_id)  # (2B, T)
    r = sequence_scores(model, ids.to(device), attn.to(device))  # (2B,)
    return r[: len(batch)], r[len(batch):]


def packed_scoring_works(model, batch, pad_id: int, device, dist, rcfg) -> bool:
    """Whether this model honours the block masks of `pair_scores` (custom 4D masks are
    a transformers feature some attention implementations ignore): both ways on one
    batch must agree; every rank must agree to use it."""
    with torch.no_grad():
        try:
            a = pair_scores(model, batch, pad_id, device, rcfg.share_prefix, rcfg.packing)
            b = separate_scores(model, batch, pad_id, device)
            ok = all(torch.allclose(x, y, rtol=1e-3, atol=1e-3) for x, y in zip(a, b))
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"reward: packed scoring unavailable ({type(e).__name__}: {e}); scoring chosen and "
                  "rejected as separate padded rows")
            ok = False
    return dist.sum(float(not ok)) == 0 if dist.world > 1 else ok


def heldout_accuracy(model, rows, pairs, pad_id: int, device) -> dict[str, float]:
    model.eval()
    r_c = score_texts(model, [p[0] for p in pairs], pad_id, device)
    r_r = score_texts(model, [p[1] for p in pairs], pad_id, device)
    model.train()
    metrics = {"rm/label_accuracy": float((r_c > r_r).float().mean()),
               "rm/eval_loss": float(-torch.nn.functional.logsigmoid(r_c - r_r).mean())}
    gold_right, gold_n = 0, 0
    for row, c, r in zip(rows, r_c.tolist(), r_r.tolist()):
        g_c, g_r = gold_score(row.prompt, row.chosen), gold_score(row.prompt, row.rejected)
        if g_c is None or g_c == g_r:
            continue
        gold_n += 1
        gold_right += (c > r) == (g_c > g_r)
    if gold_n:
        metrics["rm/accuracy"] = gold_right / gold_n
        metrics["rm/gold_pairs"] = float(gold_n)
    else:  # no gold judge: the labels are all we have
        metrics["rm/accuracy"] = metrics["rm/label_accuracy"]
    return metrics


def run(cfg: PipelineConfig, store, tracker, quiet: bool = False, prep_store=None) -> dict:
    timer = Timer()
    dist = setup(cfg)
    device = dist.device
    rcfg = cfg.reward
    prep = PrepData(prep_store or store)
    with tracker.stage_run("reward", cfg.model_dump(), store=store):
        # 1. model + data
        seed_everything(cfg.seed + 1)
        sft_dir = str(store.get_dir("sft/model"))
        tok = load_tokenizer(sft_dir, cfg.model)
        model = apply_lora(load_reward_model(sft_dir, cfg.model, tok.pad_token_id), cfg.model, "SEQ_CLS")
        train_rows, eval_rows = prep.rows("preference_train"), prep.rows("preference_eval")
        policy_eval_rows = []
        if cfg.uses_builtin_task and rcfg.policy_comparisons:
            if dist.main:  # sampled and committed once; the other ranks read them back
                collect_policy_comparisons(cfg, tok, sft_dir, prep, store, device)
            dist.barrier()
            comp = collect_policy_comparisons(cfg, tok, sft_dir, prep, store, device)
            train_rows = train_rows + comp["train"]
            policy_eval_rows = comp["eval"]
            seed_everything(cfg.seed + 1)
        eval_sets = {"": eval_rows + policy_eval_rows, "_offline": eval_rows, "_policy_samples": policy_eval_rows}
        train = encode_pairs(tok, train_rows)
        eval_sets = {k: (rows, encode_pairs(tok, rows)) for k, rows in eval_sets.items() if rows}
        bs = rcfg.batch_size
        steps_per_epoch = math.ceil(len(train) / bs)
        total = rcfg.epochs * steps_per_epoch
        if rcfg.max_steps:
            total = min(total, rcfg.max_steps)

        # 2. optimiser, schedule (DeepSpeed across GPUs), resume
        check_divisible({"reward.batch_size": bs}, dist.world)
        model = Trainable(model, dist, cfg.distributed, lr=rcfg.lr, weight_decay=rcfg.weight_decay,
                          grad_clip=rcfg.grad_clip, batch_size=bs, schedule=lr_lambda(rcfg.warmup_steps, total, rcfg.lr_schedule)).train()
        state = resume_checkpoint(store, "reward", {"model": model}, cfg, dist) or {"step": 0}

        # 3. train
        bar = progress(total, "reward", quiet or not dist.main)
        bar.update(state["step"])
        pairs_done, t_last = 0, Timer()
        clock = StepClock()  # steady-state throughput for the result (first 2 steps are warm-up)
        lengths, orders, packed = [len(c) + len(r) for c, r in train], {}, None
        while state["step"] < total:
            epoch, i = divmod(state["step"], steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: batch_order(lengths, bs, cfg.seed + 1, epoch, rcfg.group_by_length)}
            order = orders[epoch]
            batch = dist.shard([train[j] for j in order[i * bs:(i + 1) * bs]])  # this rank's slice
            if packed is None:  # first step of this process: does the model take packed rows?
                packed = (rcfg.share_prefix or rcfg.packing) and packed_scoring_works(
                    model.module, batch, tok.pad_token_id, device, dist, rcfg)
            # chosen and rejected in one forward: packed (over their shared prefix), or as padded rows
            if packed:
                r_c, r_r = pair_scores(model.module, batch, tok.pad_token_id, device, rcfg.share_prefix, rcfg.packing)
            else:
                r_c, r_r = separate_scores(model.module, batch, tok.pad_token_id, device)  # (B,) each
            loss, stats = pairwise_reward_loss(r_c, r_r, rcfg.margin)
            gnorm = model.step(loss)
            state["step"] += 1
            pairs_done += len(batch) * dist.world
            clock.tick(len(batch) * dist.world)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", acc=f"{stats['accuracy'].item():.2f}")
            metrics = {"rm/loss": dist.mean(loss.item()), "rm/train_accuracy": dist.mean(stats["accuracy"].item()),
                       "rm/margin": dist.mean(stats["margin_mean"].item()), "rm/grad_norm": gnorm, "rm/lr": model.lr()}
            if state["step"] % steps_per_epoch == 0 or state["step"] == total:
                metrics.update(heldout_accuracy(model.module, *eval_sets[""], tok.pad_token_id, device))
                metrics["perf/pairs_per_s"] = pairs_done / max(t_last(), 1e-9)
                pairs_done, t_last = 0, Timer()
            tracker.log_metrics(metrics, step=state["step"])
            if state["step"] % rcfg.checkpoint_every == 0:
                save_checkpoint(store, "reward", state["step"], {"model": model}, state, cfg, dist)
                tracker.flush()  # metrics up to a checkpoint survive a crash, like the weights
            maybe_inject_fault(state["step"], "reward")
        bar.close()

        # 4. held-out accuracy
        final = {}
        for suffix, (rows, pairs) in eval_sets.items():
            final.update({f"{k}{suffix}": v for k, v in heldout_accuracy(model.module, rows, pairs, tok.pad_token_id, device).items()})
        tracker.log_metrics(final, step=state["step"])

        # 5. save (problem_type "regression": pipelines return the raw score, no sigmoid)
        model.module.config.problem_type = "regression"
        model_uri = save_trained(model, tok, store, "reward/model", tracker, "reward")
        result = {"wall_s": timer(), "tracking_s": tracker.seconds, "steps": state["step"], "resumed_from": state.get("resumed_from"), **final,
                  "pairs_per_s": clock.rate(), "throughput": clock.summary("pairs"), "processes": dist.world, "model_uri": model_uri,
                  "mlflow_run_id": tracker.run_id}
    if dist.main:
        write_result(store, "reward", result)
    return result
