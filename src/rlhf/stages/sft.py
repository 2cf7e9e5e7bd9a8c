"""Supervised fine-tuning on demonstrations (InstructGPT step 1).

Loss is the mean NLL of response tokens (completion + EOS); prompt tokens are context
only. Training runs until the held-out loss stops improving for `patience`
evaluations (or `max_epochs`), and the best weights are kept, so PPO starts from a
fully trained SFT model and wins only by what preferences teach it.

Each batch is a random sample of demonstrations; its sequences are packed into fewer
rows with block-diagonal attention (`sft.packing`), so no compute goes to padding and
the loss is the padded batch's.

On several GPUs (train/distributed.py) each process trains on its slice of every
batch through a DeepSpeed engine, evaluates the whole held-out set, and rank 0 logs
and saves. Stepping, checkpoints and resume belong to `rlhf.train.loop`.
"""

from __future__ import annotations

import torch

from rlhf.data.prepared import PrepData
from rlhf.models import build_causal_lm, load_causal_lm, load_tokenizer
from rlhf.models.chat import ChatFormat, stop_ids
from rlhf.models.loading import apply_lora
from rlhf.stages.contract import StageContext, StageResult
from rlhf.stages.scoring import batch_loss, encode_demonstrations, heldout_loss, loss_tokens
from rlhf.train.distributed import check_divisible, setup
from rlhf.train.loop import Batches, Evaluation, Loop, StepLoss, fit
from rlhf.train.packing import packed_layout_works
from rlhf.train.progress import Timer
from rlhf.train.seed import seed_everything
from rlhf.train.trainable import make_trainable, save_trained


class SFTSteps:
    """What SFT adds to the loop: its batch loss and its early-stopping evaluation."""

    def __init__(self, model, held, pad_id: int, device, dist, scfg, state: dict, best: dict):
        self.model, self.held, self.pad_id, self.device, self.dist = model, held, pad_id, device, dist
        self.scfg, self.state, self.best = scfg, state, best
        self.packed = state.get("packed")  # decided on the stage's first step; checkpointed with the state

    def loss(self, batch) -> StepLoss:
        if self.packed is None:  # first step of the stage: does the model take packed rows?
            self.packed = self.scfg.packing and packed_layout_works(
                "sft: packed batches", lambda: [batch_loss(self.model, batch, self.pad_id, self.device, True)[0]],
                lambda: [batch_loss(self.model, batch, self.pad_id, self.device, False)[0]], self.dist,
                rtol=1e-4, atol=1e-5, fallback="padding instead")
            self.state["packed"] = bool(self.packed)
        loss, n_tok = batch_loss(self.model, batch, self.pad_id, self.device, self.packed)
        units = self.dist.sum(n_tok) if self.dist.world > 1 else n_tok
        return StepLoss(loss, units, postfix={"best": f"{self.state['best_loss']:.3f}"})

    def evaluate(self, step: int) -> dict[str, float]:
        """Held-out loss; keep the best weights; stop after `patience` evaluations without gain."""
        ev = heldout_loss(self.model, self.held, self.pad_id, self.device)
        self.state["curve"].append([step, ev])
        if ev < self.state["best_loss"] - 1e-4:
            self.state.update(best_loss=ev, best_step=step, bad_evals=0)
            self.best.clear()
            self.best.update(self.model.state_dict())
        else:
            self.state["bad_evals"] += 1
            self.state["stopped"] = self.state["bad_evals"] >= self.scfg.patience
        return {"sft/eval_loss": ev}


def run(ctx: StageContext) -> StageResult:
    timer, scfg = Timer(), ctx.config
    dist = setup(ctx.runtime, ctx.settings)
    prep = PrepData(ctx.prep_store)
    with ctx.tracker.stage_run(ctx.name, ctx.params, store=ctx.store):
        # 1. model + tokenizer (pretrained, or built from config with prep's tokenizer)
        seed_everything(ctx.seed)
        if ctx.model.name_or_path:
            tok = load_tokenizer(ctx.model.name_or_path, ctx.model, ctx.store)
            model = load_causal_lm(ctx.model.name_or_path, ctx.model, ctx.store)
        else:
            tok = load_tokenizer(str(prep.tokenizer_dir), ctx.model)
            model = build_causal_lm(ctx.model, tok, ctx.seed)
        fmt = ChatFormat(tok, ctx.model, stops=stop_ids(tok, model), all_turns=scfg.assistant_turns == "all",
                         source=ctx.model.name_or_path or "prep's tokenizer")
        model = apply_lora(model, ctx.model)

        # 2. data (rendered with the chat template when the tokenizer has one)
        train = encode_demonstrations(fmt, prep.rows("sft_train"))
        held = encode_demonstrations(fmt, prep.rows("sft_eval"))
        batches = Batches(train, scfg.batch_size, ctx.seed, [len(t[0]) for t in train], scfg.group_by_length, dist)
        total = scfg.max_epochs * batches.steps_per_epoch
        if scfg.max_steps:
            total = min(total, scfg.max_steps)

        # 3. optimiser + schedule (DeepSpeed across GPUs); resume from the newest checkpoint
        check_divisible({"sft.batch_size": scfg.batch_size}, dist.world, scfg.grad_accum_steps)
        model = make_trainable(model, dist, ctx.runtime.distributed, scfg, total_steps=total,
                               batch_size=scfg.batch_size, precision=ctx.runtime.precision)
        best = model.state_dict()
        loop = Loop(ctx.name, total=total, checkpoint_every=scfg.checkpoint_every,
                    checkpoint_every_s=scfg.checkpoint_every_s,
                    models={"model": model, "best": best},
                    state={"best_loss": float("inf"), "best_step": 0, "bad_evals": 0, "curve": [], "stopped": False},
                    store=ctx.store, tracker=ctx.tracker, dist=dist, faults=ctx.faults, fingerprint=ctx.fingerprint,
                    quiet=ctx.quiet)
        if not loop.resume():
            with model.autocast():
                loss0 = heldout_loss(model, held, tok.pad_token_id, dist.device)
            loop.state["curve"].append([0, loss0])
            ctx.tracker.log_metrics({"sft/eval_loss": loss0}, step=0)

        # 4. train: step, evaluate every `eval_every`, early-stop, checkpoint every `checkpoint_every`
        steps = SFTSteps(model, held, tok.pad_token_id, dist.device, dist, scfg, loop.state, best)
        fit(loop, model, batches, steps.loss, prefix="sft", log_epoch=True, weigh=loss_tokens, evaluation=Evaluation(
            due=lambda step: step % scfg.eval_every == 0 or step == total, run=steps.evaluate, unit="tokens"))

        # 5. save the best weights (rank 0; under ZeRO-3 every rank helps gather them)
        state = loop.state
        if state["best_step"] > 0:
            model.load_state_dict(best)
        model_uri = save_trained(model, tok, ctx.store, "sft/model", ctx.tracker, "policy")
        ctx.tracker.log_metrics({"sft/best_eval_loss": state["best_loss"]}, step=state["step"])
    return StageResult({
        "wall_s": timer(), "tracking_s": ctx.tracker.seconds, **loop.result("tokens"), "best_step": state["best_step"],
        "best_eval_loss": state["best_loss"], "early_stopped": state["stopped"], "eval_curve": state["curve"],
        "model_uri": model_uri, "mlflow_run_id": ctx.tracker.run_id})
