"""The models of PPO: the trained policy and value model, the frozen reference and
reward model, how the policy samples, and how a rollout is scored in micro-batches.

With a LoRA policy there is no separate reference model: the reference is the policy
with its adapters disabled (the SFT weights the adapters were added to).
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from rlhf.math import AdaptiveKLController, FixedKLController, score_stats
from rlhf.models import load_causal_lm, load_reward_model, load_tokenizer
from rlhf.models.chat import ChatFormat, chat_format
from rlhf.models.loading import apply_lora
from rlhf.models.rollout import Rollout, generate, response_logprobs, response_values, rewards
from rlhf.stages.contract import StageContext
from rlhf.train.distributed import Dist
from rlhf.train.trainable import Trainable, frozen, make_trainable


@dataclass
class PPOModels:
    """The four models of PPO and how the policy samples. With a LoRA policy there is no
    separate reference model: the reference is the policy with its adapters disabled
    (the SFT weights it was built on), one full copy fewer in memory."""

    policy: Trainable
    value: Trainable
    ref: torch.nn.Module | None
    reward: torch.nn.Module
    tok: object
    synced: bool
    """ZeRO-3 "synced" generation: layers gathered in lockstep instead of the whole policy."""
    fmt: ChatFormat
    """How prompts become ids (the SFT model's chat template, or HH text)."""

    def rollout(self, prompts: list[list[int]], max_new_tokens: int, temperature: float,
                logprobs: bool = False, batch_size: int | None = None) -> Rollout:
        """Responses to `prompts`, generated `batch_size` prompts at a time (all at once for None)."""
        size = batch_size or len(prompts)
        parts = []
        with (contextlib.nullcontext() if self.synced else self.policy.gathered()):  # whole policy on each GPU
            for i in range(0, len(prompts), size):
                parts.append(generate(self.policy.module, self.tok, prompts[i:i + size], max_new_tokens, temperature,
                                      self.policy.dist.device, self.synced, logprobs=logprobs))
        return Rollout.concat(parts, self.tok.pad_token_id)

    def reference_logprobs(self, rollout: Rollout, temperature: float) -> torch.Tensor:
        """log pi_SFT(response token | prefix), (B, R)."""
        if self.ref is not None:
            return response_logprobs(self.ref, rollout, temperature)
        with self.policy.module.disable_adapter():
            return response_logprobs(self.policy.module, rollout, temperature)


def load_models(ctx: StageContext, dist: Dist, opt_steps: int) -> PPOModels:
    """Policy and reference from SFT, reward model frozen, value from the reward model."""
    pcfg, dcfg, mcfg = ctx.config, ctx.runtime.distributed, ctx.model
    sft_dir, rm_dir = str(ctx.store.get_dir("sft/model")), str(ctx.store.get_dir("reward/model"))
    tok = load_tokenizer(sft_dir, mcfg)
    mb, precision = pcfg.minibatch_size, ctx.runtime.precision
    policy = make_trainable(apply_lora(load_causal_lm(sft_dir, mcfg), mcfg), dist, dcfg, pcfg, total_steps=opt_steps,
                            batch_size=mb, eps=1e-5, precision=precision)
    ref = None if mcfg.lora.enabled else frozen(load_causal_lm(sft_dir, mcfg), dist, dcfg, precision)
    reward_model = frozen(load_reward_model(rm_dir, mcfg, tok.pad_token_id), dist, dcfg, precision)
    value_src = rm_dir if pcfg.value_init == "reward" else sft_dir
    value = make_trainable(apply_lora(load_reward_model(value_src, mcfg, tok.pad_token_id), mcfg, "SEQ_CLS"), dist,
                           dcfg, pcfg, total_steps=opt_steps, batch_size=mb, lr=pcfg.value_lr, eps=1e-5,
                           precision=precision)
    return PPOModels(policy, value, ref, reward_model, tok, policy.zero3 and dcfg.zero3_generation == "synced",
                     chat_format(tok, mcfg, sft_dir))


def forward_batch_size(pcfg, dist: Dist) -> int:
    """Episodes per no-grad forward: `ppo.forward_batch_size`, by default twice the training
    micro-batch (a process's share of the minibatch over `grad_accum_steps`): a training
    step holds the logits, their log-softmax and its gradient for its micro-batch, about
    what a no-grad forward holds for twice as many episodes, and keeps every layer's
    activations on top; fewer, larger forwards cost less per episode."""
    return pcfg.forward_batch_size or max(1, 2 * pcfg.minibatch_size // (dist.world * pcfg.grad_accum_steps))


@torch.no_grad()
def score_rollout(models: PPOModels, rollout: Rollout, pcfg) -> tuple[torch.Tensor, ...]:
    """Old log-probs, reference log-probs, values (B, R) and reward-model scores (B,) of
    a rollout, `forward_batch_size` episodes per forward."""
    out = []
    for part in rollout.parts(forward_batch_size(pcfg, models.policy.dist)):
        old = part.logprobs  # kept by generation, or one more policy forward:
        if old is None:
            old = response_logprobs(models.policy, part, pcfg.temperature)
        out.append((old, models.reference_logprobs(part, pcfg.temperature),
                    response_values(models.value.module, part), rewards(models.reward, part)))
    return tuple(torch.cat(x) for x in zip(*out))


@torch.no_grad()
def reward_norm(models: PPOModels, prompts: list[list[int]], pcfg, dist: Dist) -> tuple[float, float]:
    """Mean and std of the reward model's score on samples of the initial policy (SFT),
    which normalise every later score (Ziegler et al. 2019)."""
    with models.policy.autocast():
        rollout = models.rollout(prompts, pcfg.max_new_tokens, pcfg.temperature, batch_size=pcfg.generation_batch_size)
        parts = rollout.parts(forward_batch_size(pcfg, dist))
        scores = torch.cat([rewards(models.reward, part) for part in parts])  # (N,)
    return score_stats(scores, mean_reduce=dist.mean_dict if dist.world > 1 else None)


def kl_controller(kcfg):
    """Beta: adapted toward a target KL (Ziegler et al. 2019), or fixed."""
    return (AdaptiveKLController(kcfg.init_coef, kcfg.target, kcfg.horizon) if kcfg.adaptive
            else FixedKLController(kcfg.init_coef))
