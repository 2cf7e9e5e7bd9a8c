"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Loss is the mean NLL of response tokens (completion + EOS); prompt tokens are context
only. Training runs until the held-out loss stops improving for `patience`
evaluations (or `max_epochs`), and the best weights are kept, so PPO starts from a
fully trained SFT model and wins only by what preferences teach it.

Each batch is a random sample of demonstrations; its sequences are packed into fewer
rows with block-diagonal attention (`sft.packing`), so no compute goes to padding and
the loss is the padded batch's.

Steps:
  1. model + tokenizer (pretrained, or built from config with prep's tokenizer)
  2. tokenise demonstrations
  3. optimiser + schedule; resume from the newest complete checkpoint
  4. train: step, evaluate every `eval_every`, early-stop, checkpoint every `checkpoint_every`
  5. save the best weights, log the model

On several GPUs (distributed.py) each process trains on its slice of every batch
through a DeepSpeed engine, evaluates the whole held-out set, and rank 0 logs and saves.
"""

from __future__ import annotations

import math

import torch

from rlhf.config import PipelineConfig
from rlhf.train.distributed import Trainable, check_divisible, save_trained, setup
from rlhf.adapters.settings import maybe_inject_fault
from rlhf.math import sft_loss
from rlhf.models import Segment, build_causal_lm, load_causal_lm, load_tokenizer, pack
from rlhf.models.loading import apply_lora
from rlhf.stages.common import (
    PrepData, StepClock, Timer, batch_order, lr_lambda, pad_right, progress, resume_checkpoint, save_checkpoint,
    seed_everything, tokenize_pair, write_result,
)


def encode(tok, rows) -> list[tuple[list[int], int]]:
    return [tokenize_pair(tok, r.prompt, r.completion) for r in rows]


def collate(batch, pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ids, attn = pad_right([b[0] for b in batch], pad_id)  # (B, T)
    loss_mask = attn.clone()
    for i, (_, plen) in enumerate(batch):
        loss_mask[i, :plen] = 0  # (B, T) 1 on completion + EOS
    return ids.to(device), attn.to(device), loss_mask.to(device)


def collate_packed(batch, pad_id: int, device) -> tuple[dict, torch.Tensor, int]:
    """The batch packed into fewer rows (`models.heads.pack`): model inputs (ids, block
    attention mask, restarted positions), the loss mask, and the real token count. The
    first token of each sequence is never a label (as in the padded layout), so no loss
    crosses from one packed sequence into the next."""
    b = pack([Segment(ids) for ids, _ in batch], pad_id)
    loss_mask = torch.zeros_like(b["input_ids"])
    for (ids, plen), (r, o) in zip(batch, b["where"]):
        loss_mask[r, o + max(plen, 1):o + len(ids)] = 1
    inputs = {k: b[k].to(device) for k in ("input_ids", "attention_mask", "position_ids")}
    return inputs, loss_mask.to(device), sum(len(ids) for ids, _ in batch)


def batch_loss(model, batch, pad_id: int, device, packed: bool) -> tuple[torch.Tensor, int]:
    """SFT loss of a batch (packed or padded) and its real token count."""
    if packed:
        inputs, lm, n = collate_packed(batch, pad_id, device)
        return sft_loss(model(**inputs).logits, inputs["input_ids"], lm)[0], n
    ids, attn, lm = collate(batch, pad_id, device)
    return sft_loss(model(input_ids=ids, attention_mask=attn).logits, ids, lm)[0], int(attn.sum())


def packing_works(model, batch, pad_id: int, device, dist) -> bool:
    """Whether this model honours packed rows' block masks (custom 4D masks are a
    transformers feature some attention implementations ignore): the packed and the
    padded loss of one batch must agree, on every rank."""
    with torch.no_grad():
        try:
            a, _ = batch_loss(model, batch, pad_id, device, True)
            b, _ = batch_loss(model, batch, pad_id, device, False)
            ok = bool(torch.allclose(a, b, rtol=1e-4, atol=1e-5))
        except (RuntimeError, ValueError, TypeError) as e:
            print(f"sft: packed batches unavailable ({type(e).__name__}: {e}); padding instead")
            ok = False
    return dist.sum(float(not ok)) == 0 if dist.world > 1 else ok


@torch.no_grad()
def heldout_loss(model, data, pad_id: int, device, batch_size: int = 128) -> float:
    """Mean response-token NLL over a dataset (the SFT loss, aggregated by tokens)."""
    model.eval()
    nll, n = 0.0, 0.0
    for i in range(0, len(data), batch_size):
        ids, attn, lm = collate(data[i:i + batch_size], pad_id, device)
        _, stats = sft_loss(model(input_ids=ids, attention_mask=attn).logits, ids, lm)
        nll += stats["nll_sum"].item()
        n += stats["tokens"].item()
    model.train()
    return nll / max(n, 1.0)


def run(cfg: PipelineConfig, store, tracker, quiet: bool = False, prep_store=None) -> dict:
    timer = Timer()
    dist = setup(cfg)
    device = dist.device
    scfg = cfg.sft
    prep = PrepData(prep_store or store)
    with tracker.stage_run("sft", cfg.model_dump(), store=store):
        # 1. model + tokenizer
        seed_everything(cfg.seed)
        if cfg.model.name_or_path:
            tok = load_tokenizer(cfg.model.name_or_path, cfg.model, store)
            model = load_causal_lm(cfg.model.name_or_path, cfg.model, store)
        else:
            tok = load_tokenizer(str(prep.tokenizer_dir), cfg.model)
            model = build_causal_lm(cfg.model, tok, cfg.seed)
        model = apply_lora(model, cfg.model)

        # 2. data
        train = encode(tok, prep.rows("sft_train"))
        held = encode(tok, prep.rows("sft_eval"))
        steps_per_epoch = math.ceil(len(train) / scfg.batch_size)
        total = scfg.max_epochs * steps_per_epoch
        if scfg.max_steps:
            total = min(total, scfg.max_steps)

        # 3. optimiser, schedule (DeepSpeed across GPUs), resume
        check_divisible({"sft.batch_size": scfg.batch_size}, dist.world)
        model = Trainable(model, dist, cfg.distributed, lr=scfg.lr, weight_decay=scfg.weight_decay,
                          grad_clip=scfg.grad_clip, batch_size=scfg.batch_size,
                          schedule=lr_lambda(scfg.warmup_steps, total, scfg.lr_schedule)).train()
        best = model.state_dict()
        state = {"step": 0, "best_loss": float("inf"), "best_step": 0, "bad_evals": 0, "curve": [], "stopped": False}
        resumed = resume_checkpoint(store, "sft", {"model": model, "best": best}, cfg, dist)
        if resumed:
            state.update(resumed)
        if state["step"] == 0:
            loss0 = heldout_loss(model, held, tok.pad_token_id, device)
            state["curve"].append([0, loss0])
            tracker.log_metrics({"sft/eval_loss": loss0}, step=0)

        # 4. train
        bar = progress(total, "sft", quiet or not dist.main)
        bar.update(state["step"])
        tokens, t_last = 0, Timer()
        clock = StepClock()  # steady-state throughput for the result (first 2 steps are warm-up)
        lengths, orders, packed = [len(t[0]) for t in train], {}, None
        while state["step"] < total and not state["stopped"]:
            epoch, i = divmod(state["step"], steps_per_epoch)
            if epoch not in orders:
                orders = {epoch: batch_order(lengths, scfg.batch_size, cfg.seed, epoch, scfg.group_by_length)}
            order = orders[epoch]
            batch = [train[j] for j in order[i * scfg.batch_size:(i + 1) * scfg.batch_size]]
            batch = dist.shard(batch)  # this rank's slice
            if packed is None:  # first step of this process: does the model take packed rows?
                packed = scfg.packing and packing_works(model, batch, tok.pad_token_id, device, dist)
            loss, n_tok = batch_loss(model, batch, tok.pad_token_id, device, packed)
            gnorm = model.step(loss)
            state["step"] += 1
            step = state["step"]
            tokens += n_tok
            clock.tick(dist.sum(n_tok) if dist.world > 1 else n_tok)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", best=f"{state['best_loss']:.3f}")
            metrics = {"sft/loss": dist.mean(loss.item()), "sft/grad_norm": gnorm, "sft/lr": model.lr(),
                       "sft/epoch": step / steps_per_epoch}
            if step % scfg.eval_every == 0 or step == total:
                ev = heldout_loss(model, held, tok.pad_token_id, device)
                state["curve"].append([step, ev])
                metrics["sft/eval_loss"] = ev
                metrics["perf/tokens_per_s"] = dist.sum(tokens) / max(t_last(), 1e-9)
                tokens, t_last = 0, Timer()
                if ev < state["best_loss"] - 1e-4:
                    state.update(best_loss=ev, best_step=step, bad_evals=0)
                    best = model.state_dict()
                else:
                    state["bad_evals"] += 1
                    state["stopped"] = state["bad_evals"] >= scfg.patience
            tracker.log_metrics(metrics, step=step)
            if step % scfg.checkpoint_every == 0 or state["stopped"]:
                save_checkpoint(store, "sft", step, {"model": model, "best": best}, state, cfg, dist)
                tracker.flush()  # metrics up to a checkpoint survive a crash, like the weights
            maybe_inject_fault(state["step"], "sft")
        bar.close()

        # 5. save the best weights (rank 0; under ZeRO-3 every rank helps gather them)
        if state["best_step"] > 0:
            model.load_state_dict(best)
        model_uri = save_trained(model, tok, store, "sft/model", tracker, "policy")
        result = {"wall_s": timer(), "tracking_s": tracker.seconds, "steps": state["step"], "resumed_from": state.get("resumed_from"), "best_step": state["best_step"],
                  "best_eval_loss": state["best_loss"], "early_stopped": state["stopped"],
                  "tokens_per_s": clock.rate(), "throughput": clock.summary("tokens"), "processes": dist.world,
                  "eval_curve": state["curve"], "model_uri": model_uri, "mlflow_run_id": tracker.run_id}
        tracker.log_metrics({"sft/best_eval_loss": state["best_loss"]}, step=state["step"])
    if dist.main:
        write_result(store, "sft", result)
    return result
