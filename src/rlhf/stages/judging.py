"""The independent judge of a run: who decides eval's win rates, the gate, and PPO's
checkpoint selection. It is never the reward model PPO optimised against:

  - `gold`: the task's own judge (built-in families, plugins) when it scores every answer;
  - `heldout_reward_model`: without one, a reward model trained on the disjoint share
    `reward.judge_fraction` of the comparisons, which the PPO reward model never saw
    (`reward/judge_model` in the run's store);
  - `reward_model`: neither (user data with `reward.judge_fraction: 0`): the proxy
    itself, named as such in the summary and the gate's reasons.
"""

from __future__ import annotations

import numpy as np
import torch

from rlhf.models import load_reward_model
from rlhf.models.chat import ChatFormat
from rlhf.stages.scoring import score_responses

JUDGE_MODEL_KEY = "reward/judge_model"
"""Where the reward stage commits the held-out reward model."""


class IndependentJudge:
    """Scores (prompt row, response text) pairs: by the task's judge, or by a reward model
    (in the policy's format, `fmt`)."""

    def __init__(self, name: str, task_judge=None, rm=None, fmt: ChatFormat | None = None, device=None):
        self.name, self.task_judge, self.rm, self.fmt, self.device = name, task_judge, rm, fmt, device

    def scores(self, rows: list, texts: list[str]) -> np.ndarray:
        if self.rm is None:
            return np.array([self.task_judge.score(r.prompt, t) for r, t in zip(rows, texts)], dtype=float)
        return np.array(score_responses(self.rm, self.fmt, rows, texts, self.device), dtype=float)


def scores_everything(task_judge, rows: list) -> bool:
    """Whether the task's judge has an opinion on every one of these prompts."""
    return task_judge is not None and all(task_judge.score(r.prompt, "") is not None for r in rows)


def independent_judge(ctx, fmt: ChatFormat, rows: list, device, dtype=None, proxy=None) -> IndependentJudge:
    """The run's independent judge for these prompt `rows`: gold, else the held-out reward
    model when the reward stage trained one, else the proxy reward model `proxy`."""
    if scores_everything(ctx.judge, rows):
        return IndependentJudge("gold", task_judge=ctx.judge)
    if ctx.store.is_committed(JUDGE_MODEL_KEY):
        rm = load_reward_model(str(ctx.store.get_dir(JUDGE_MODEL_KEY)), ctx.model, fmt.tok.pad_token_id,
                               dtype=dtype or torch.float32).to(device).eval()
        for p in rm.parameters():
            p.requires_grad_(False)
        return IndependentJudge("heldout_reward_model", rm=rm, fmt=fmt, device=device)
    return IndependentJudge("reward_model", rm=proxy, fmt=fmt, device=device)
