"""Reward model on preference pairs (InstructGPT step 2).

The SFT backbone with a scalar head (AutoModelForSequenceClassification, one label),
trained with the pairwise loss -log sigmoid(r(x, y_w) - r(x, y_l) - margin)
(InstructGPT eq. 1). The comparisons of one prompt form a group (`group_pairs`): its
distinct answers go through the forward once, however many pairs each is in, as one
segment over their shared prefixes, segments packed into few rows with block
attention (`models.heads.group_scores`) when the model honours custom masks, as
separate padded rows otherwise. InstructGPT trained on all C(K, 2) comparisons of a
prompt as one batch element for the same reasons: one forward per answer, and no
answer seen K - 1 times an epoch (which over-fitted).

Held-out accuracy is reported twice: against the labels in the data (`rm/label_accuracy`)
and, when the run has a judge, against the judge on the pairs it does not tie
(`rm/accuracy`): the labels are noisy, the judge is the truth. The same pairs, as a
confusion matrix and an ROC curve of the margins (`rm/classification`, ROC area `rm/auc`;
`rlhf.stages.report.pair_classification`), are the step's `dsl.ClassificationMetrics`.

Without a gold judge (user data), `judge_fraction` of the training comparisons (by
prompt hash) train a second reward model that the PPO reward model never saw: the
run's independent judge (`rlhf.stages.judging`), saved as `reward/judge_model`, its
held-out accuracy reported as `rm/judge_accuracy`.

For the built-in task, comparisons of the SFT model's own samples are collected from
the task's simulated labelers first (`rlhf.data.tasks.labelling`).

On several GPUs each process trains on its slice of every batch; stepping,
checkpoints and resume belong to `rlhf.train.loop`.
"""

from __future__ import annotations

import torch

from rlhf.data.prepared import PrepData
from rlhf.data.tasks.labelling import policy_comparisons
from rlhf.math import pairwise_reward_loss
from rlhf.models import group_scores, load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.chat import ChatFormat, chat_format
from rlhf.models.loading import apply_lora
from rlhf.data.processing import split_by_hash
from rlhf.data.readers import DataError
from rlhf.stages.comparisons import encode_pairs, group_pairs, groups_per_step, n_pairs, separate_scores
from rlhf.stages.contract import StageContext, StageResult
from rlhf.stages.judging import JUDGE_MODEL_KEY, scores_everything
from rlhf.stages.report import pair_classification
from rlhf.stages.scoring import score_sequences
from rlhf.train.distributed import check_divisible, setup
from rlhf.train.loop import Batches, Evaluation, Loop, StepLoss, fit
from rlhf.train.packing import packed_layout_works
from rlhf.train.progress import Timer
from rlhf.train.seed import seed_everything
from rlhf.train.trainable import make_trainable, save_trained


def heldout_scores(model, rows, pairs, pad_id: int, device, judge) -> tuple[torch.Tensor, list]:
    """Each held-out pair's margin r(chosen) - r(rejected), (P,), and whether the judge
    scores the chosen answer higher (None where it has no score or ties)."""
    model.eval()
    r_c = score_sequences(model, [p[0] for p in pairs], pad_id, device)
    r_r = score_sequences(model, [p[1] for p in pairs], pad_id, device)
    model.train()
    better = []
    for row in rows:
        g_c, g_r = judge.score(row.prompt, row.chosen), judge.score(row.prompt, row.rejected)
        better.append(None if g_c is None or g_c == g_r else g_c > g_r)
    return r_c - r_r, better


def heldout_accuracy(margins: torch.Tensor, better: list) -> dict[str, float]:
    """Label accuracy and loss; accuracy against the judge on the pairs it does not tie."""
    metrics = {"rm/label_accuracy": float((margins > 0).float().mean()),
               "rm/eval_loss": float(-torch.nn.functional.logsigmoid(margins).mean())}
    judged = [(m > 0) == b for m, b in zip(margins.tolist(), better) if b is not None]
    if judged:
        metrics["rm/accuracy"] = sum(judged) / len(judged)
        metrics["rm/gold_pairs"] = float(len(judged))
    else:  # no judge: the labels are all we have
        metrics["rm/accuracy"] = metrics["rm/label_accuracy"]
    return metrics


def classification(margins: torch.Tensor, better: list) -> dict:
    """The held-out pairs as a confusion matrix and ROC curve (`rlhf.stages.report.pair_classification`):
    the truth is the judge on the pairs it does not tie, as in `rm/accuracy`, or the labels without one."""
    judged = [(m, b) for m, b in zip(margins.tolist(), better) if b is not None]
    if judged:
        return pair_classification([m for m, _ in judged], [b for _, b in judged], "judge")
    return pair_classification(margins.tolist(), [True] * len(better), "labels")


class RewardSteps:
    """What the reward model adds to the loop: the pairwise loss over every comparison of a batch of groups."""

    def __init__(self, model, pad_id: int, device, dist, rcfg, state: dict | None = None):
        self.model, self.pad_id, self.device, self.dist, self.rcfg = model, pad_id, device, dist, rcfg
        # the layout decided on the stage's first step, kept in the loop state (checkpointed), so a
        # resumed process scores in the same layout instead of probing again on another batch
        self.state = {} if state is None else state
        self.packed = self.state.get("packed")

    def scores(self, batch, packed: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """Every pair's chosen and rejected score from one forward: each group packed over its
        shared prefixes, or every answer as a padded row."""
        if packed:
            return group_scores(self.model.module, batch, self.pad_id, self.device, self.rcfg.share_prefix,
                                 self.rcfg.packing)
        return separate_scores(self.model.module, batch, self.pad_id, self.device)  # (P,) each

    def loss(self, batch) -> StepLoss:
        if self.packed is None:  # first step of the stage: does the model take packed rows?
            self.packed = (self.rcfg.share_prefix or self.rcfg.packing) and packed_layout_works(
                "reward: packed scoring", lambda: self.scores(batch, True), lambda: self.scores(batch, False),
                self.dist, rtol=1e-3, atol=1e-3, fallback="scoring chosen and rejected as separate padded rows")
            self.state["packed"] = bool(self.packed)
        loss, stats = pairwise_reward_loss(*self.scores(batch, self.packed), self.rcfg.margin)
        metrics = {"rm/train_accuracy": self.dist.mean(stats["accuracy"].item()),
                   "rm/margin": self.dist.mean(stats["margin_mean"].item())}
        return StepLoss(loss, n_pairs(batch) * self.dist.world, metrics, {"acc": f"{stats['accuracy'].item():.2f}"})


def labelled_samples(ctx: StageContext, prep: PrepData, fmt: ChatFormat, sft_dir: str, dist) -> dict[str, list]:
    """Comparisons of SFT samples (all pairs of `comparison_k` per prompt) from the task's simulated labelers:
    `policy_comparisons` from train prompts, a held-out share from eval prompts. Rank 0
    samples and commits them; the other ranks read them back."""
    n = ctx.config.policy_comparisons
    args = (ctx.task, lambda: load_causal_lm(sft_dir, ctx.model).to(dist.device).eval(), fmt,
            {s: prep.rows(f"prompt_{s}") for s in ("train", "eval")},
            {"train": n, "eval": max(200, int(n * prep.eval_fraction))})
    kw = dict(seed=ctx.seed, max_new_tokens=ctx.config.comparison_max_new_tokens, store=ctx.store, device=dist.device,
              k=ctx.config.comparison_k)
    if dist.main:
        policy_comparisons(*args, **kw)
    dist.barrier()
    return policy_comparisons(*args, **kw)


def fit_reward_model(ctx: StageContext, name: str, sft_dir: str, tok, fmt: ChatFormat, train_rows: list,
                     eval_sets: dict, dist) -> tuple:
    """Train one reward model (SFT backbone + scalar head) on `train_rows` as the loop
    `name` (its checkpoints and resume); returns it, its loop, its held-out accuracy
    on every evaluation set (labels and judge) and the main set's `classification`."""
    rcfg, device = ctx.config, dist.device
    seed_everything(ctx.seed + 1)
    model = apply_lora(load_reward_model(sft_dir, ctx.model, tok.pad_token_id), ctx.model, "SEQ_CLS")
    check_divisible({"reward.batch_size": rcfg.batch_size}, dist.world, rcfg.grad_accum_steps)
    train = group_pairs(train_rows, encode_pairs(fmt, train_rows))
    per_step = groups_per_step(rcfg.batch_size, train, dist.world * rcfg.grad_accum_steps)
    batches = Batches(train, per_step, ctx.seed + 1, [sum(map(len, g.seqs)) for g in train],
                      rcfg.group_by_length, dist)
    total = rcfg.epochs * batches.steps_per_epoch
    if rcfg.max_steps:
        total = min(total, rcfg.max_steps)

    # optimiser + schedule (DeepSpeed across GPUs); resume; train
    model = make_trainable(model, dist, ctx.runtime.distributed, rcfg, total_steps=total,
                           batch_size=per_step, precision=ctx.runtime.precision)
    loop = Loop(name, total=total, checkpoint_every=rcfg.checkpoint_every,
                checkpoint_every_s=rcfg.checkpoint_every_s, models={"model": model}, state={},
                store=ctx.store, tracker=ctx.tracker, dist=dist, faults=ctx.faults, fingerprint=ctx.fingerprint,
                quiet=ctx.quiet)
    loop.resume()

    def accuracy(step: int) -> dict[str, float]:
        return heldout_accuracy(*heldout_scores(model.module, *eval_sets[""], tok.pad_token_id, device, ctx.judge))

    prefix = "rm" if name == ctx.name else "rm_judge"
    steps = RewardSteps(model, tok.pad_token_id, device, dist, rcfg, loop.state)
    due = lambda step: step % batches.steps_per_epoch == 0 or step == total  # noqa: E731
    fit(loop, model, batches, steps.loss, prefix=prefix, evaluation=Evaluation(due=due, run=accuracy, unit="pairs"),
        weigh=n_pairs)
    final = {f"{prefix}/groups": float(len(train)), f"{prefix}/groups_per_step": float(per_step)}
    for suffix, (rows, pairs) in eval_sets.items():
        with model.autocast():
            scored = heldout_scores(model.module, rows, pairs, tok.pad_token_id, device, ctx.judge)
        final.update({f"{k}{suffix}": v for k, v in heldout_accuracy(*scored).items()})
        if not suffix:
            classes = classification(*scored)
    if classes["auc"] is not None:
        final["rm/auc"] = classes["auc"]
    model.module.config.problem_type = "regression"  # pipelines return the raw score, no sigmoid
    return model, loop, final, classes


def judge_split(ctx: StageContext, train_rows: list, eval_rows: list) -> tuple[list, list]:
    """(the PPO reward model's comparisons, the held-out judge's): a disjoint share
    `judge_fraction` by prompt hash when the run has no gold judge, else none."""
    if not ctx.config.judge_fraction or scores_everything(ctx.judge, eval_rows[:50]):
        return train_rows, []
    proxy, held = split_by_hash(train_rows, ctx.config.judge_fraction, salt="rlhf-judge-v1")
    if not proxy or not held:
        raise DataError(f"reward.judge_fraction={ctx.config.judge_fraction}: {len(proxy)} comparisons for the PPO "
                        f"reward model and {len(held)} for the held-out judge; add comparisons or set "
                        "reward.judge_fraction=0")
    return proxy, held


def run(ctx: StageContext) -> StageResult:
    timer, rcfg = Timer(), ctx.config
    dist = setup(ctx.runtime, ctx.settings)
    prep = PrepData(ctx.prep_store)
    with ctx.tracker.stage_run(ctx.name, ctx.params, store=ctx.store):
        # 1. the SFT model's tokenizer and format
        sft_dir = str(ctx.store.get_dir("sft/model"))
        tok = load_tokenizer(sft_dir, ctx.model)
        fmt = chat_format(tok, ctx.model, sft_dir)

        # 2. data: offline pairs, plus labelled comparisons of SFT samples (built-in task);
        #    without a gold judge, a disjoint share of the pairs for the held-out judge
        train_rows, eval_rows = prep.rows("preference_train"), prep.rows("preference_eval")
        policy_eval_rows = []
        seed_everything(ctx.seed + 1)  # the same samples in every attempt (a resumed one reads them back)
        if ctx.task is not None and rcfg.policy_comparisons:
            comp = labelled_samples(ctx, prep, fmt, sft_dir, dist)
            train_rows, policy_eval_rows = train_rows + comp["train"], comp["eval"]
        train_rows, judge_rows = judge_split(ctx, train_rows, eval_rows)
        eval_sets = {"": eval_rows + policy_eval_rows, "_offline": eval_rows, "_policy_samples": policy_eval_rows}
        eval_sets = {k: (rows, encode_pairs(fmt, rows)) for k, rows in eval_sets.items() if rows}

        # 3. the PPO reward model; 4. the held-out judge (its accuracy as rm/judge_*)
        model, loop, final, classes = fit_reward_model(ctx, ctx.name, sft_dir, tok, fmt, train_rows, eval_sets, dist)
        if judge_rows:
            judge, _, jfinal, _ = fit_reward_model(ctx, f"{ctx.name}_judge", sft_dir, tok, fmt, judge_rows,
                                                {"": eval_sets[""]}, dist)
            final.update({"rm/judge_accuracy": jfinal["rm/accuracy"], "rm/judge_label_accuracy":
                          jfinal["rm/label_accuracy"], "rm/judge_pairs": float(len(judge_rows))})
        ctx.tracker.log_metrics(final, step=loop.step)

        # 5. save (the judge beside it, in the run's store only)
        model_uri = save_trained(model, tok, ctx.store, "reward/model", ctx.tracker, "reward")
        if judge_rows:
            save_trained(judge, tok, ctx.store, JUDGE_MODEL_KEY, None, "reward")
        elif dist.main and ctx.store.is_committed(JUDGE_MODEL_KEY):
            ctx.store.delete(JUDGE_MODEL_KEY)  # an earlier attempt's judge, not this config's
    return StageResult({"wall_s": timer(), "tracking_s": ctx.tracker.seconds, **loop.result("pairs"), **final,
                        "rm/classification": classes, "proxy_pairs": len(train_rows), "judge_pairs": len(judge_rows),
                        "model_uri": model_uri, "mlflow_run_id": ctx.tracker.run_id})
