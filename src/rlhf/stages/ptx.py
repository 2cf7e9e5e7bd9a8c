"""PPO-ptx's data (InstructGPT eq. 2): the demonstrations, or the text of
`data.ptx_path`, whose SFT loss each policy step of PPO also takes, times `ppo.ptx_coef`,
in the same optimizer step (`rlhf.train.loop.Auxiliary`)."""

from __future__ import annotations

from rlhf.data.prepared import PrepData
from rlhf.models.chat import ChatFormat
from rlhf.stages.contract import StageContext
from rlhf.stages.ppo_models import PPOModels
from rlhf.stages.scoring import batch_loss, loss_tokens
from rlhf.train.distributed import Dist
from rlhf.train.loop import Auxiliary, Batches, StepLoss


class PtxData:
    """PPO-ptx's data: demonstrations (prep's SFT train split) or the text rows of
    `data.ptx_path` (no chat template: the loss covers every token), cut to the run's
    `max_total_tokens`, in batches of `ptx_batch_size` (default a quarter of the minibatch)
    whose order is fixed by the seed."""

    def __init__(self, rows: list, fmt: ChatFormat, pcfg, seed: int, max_tokens: int, dist: Dist):
        plain = ChatFormat(fmt.tok, fmt.mcfg.model_copy(update={"wrap_plain_rows": False}), stops=fmt.stops)
        data = []
        for r in rows:
            ids, targets = (plain if r.prompt == "" and not r.messages else fmt).demonstration(r)
            data.append((ids[:max_tokens], targets if isinstance(targets, int) else targets[:max_tokens]))
        self.coef, self.pad_id, self.device = pcfg.ptx_coef, fmt.tok.pad_token_id, dist.device
        self.batches = Batches(data, pcfg.ptx_batch_size or max(1, pcfg.minibatch_size // 4), seed, [len(d[0]) for d in data],
                               False, dist)
        self.policy = None

    def objective(self, policy_step: int) -> Auxiliary:
        return Auxiliary(self.batches(policy_step), self.loss, loss_tokens, self.coef, "ptx_loss")

    def loss(self, batch) -> StepLoss:
        return StepLoss(batch_loss(self.policy, batch, self.pad_id, self.device, packed=False)[0], 0.0)


def ptx_data(ctx: StageContext, prep: PrepData, models: PPOModels, dist: Dist) -> PtxData | None:
    """PPO-ptx's data (None when `ptx_coef` is 0)."""
    if not ctx.config.ptx_coef:
        return None
    name = "ptx_train" if prep.has("ptx_train") else "sft_train"
    max_tokens = prep.manifest.get("length_limits", {}).get("max_total_tokens") or 10**9
    ptx = PtxData(prep.rows(name), models.fmt, ctx.config, ctx.seed + 4, max_tokens, dist)
    ptx.policy = models.policy
    return ptx
