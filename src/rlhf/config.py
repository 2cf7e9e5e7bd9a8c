"""Configuration: one pydantic model per stage, nested in one `PipelineConfig`.

Configs come from a preset, optionally a YAML file deep-merged on top, and then
`--set dotted.key=value` overrides (values parsed as YAML scalars). Everything is
validated before any work starts; errors name the field and the fix.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from rlhf.redaction import redact


class ConfigError(ValueError):
    """A config that cannot be used; the message names the field and the fix."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def exact_div(a: int, b: int, what: str) -> int:
    """a // b, or a clear error when b does not divide a (cleanrl-style derived sizes)."""
    if b <= 0 or a % b:
        raise ConfigError(f"{what}: {a} is not divisible by {b}; pick sizes that divide exactly")
    return a // b


# ----------------------------------------------------------------------------- task


class TaskConfig(_Model):
    """The built-in synthetic instruction task (used when no dataset paths are given)."""

    families: list[str] = Field(["reverse", "sort"], description="Task families to mix: the built-in `reverse` and `sort`, or plugins' (see `plugins`).")
    plugins: list[str] = Field([], description="Modules to import in every process that runs a stage (CLI, KFP steps, torchrun workers, Trainer pods) before the task is built: each registers its task families (`rlhf.data.tasks.register`, with their gold judges). They must be importable there (installed, or on PYTHONPATH). Installed distributions with an entry point in the `rlhf.tasks` group load without being named here.")
    min_items: int = Field(3, ge=1, description="Fewest items in a task instance.")
    max_items: int = Field(8, ge=1, description="Most items in a task instance.")
    num_demonstrations: int = Field(8000, ge=10, description="Human demonstrations written for SFT (few, on purpose).")
    num_comparisons: int = Field(6000, ge=10, description="Preference comparisons collected from simulated labelers.")
    num_prompts: int = Field(5000, ge=10, description="Prompts for PPO rollouts (and, after the split, eval).")
    demo_correct_rate: float = Field(0.75, ge=0.7, le=1.0, description="Share of demonstrations that are exactly correct and concise (>= 0.7 keeps SFT a fair baseline).")
    demo_verbose_rate: float = Field(0.4, ge=0.0, le=1.0, description="Of the imperfect demonstrations, the share that are right but verbose; the rest carry mistakes.")
    labeler_temperature: float = Field(0.05, gt=0.0, description="Bradley-Terry noise: P(a preferred over b) = sigmoid((gold_a - gold_b) / temperature).")

    @field_validator("plugins")
    @classmethod
    def _modules(cls, v: list[str]) -> list[str]:
        for i, name in enumerate(v):
            if not re.fullmatch(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*", name):
                raise ValueError(f"plugins[{i}] = {name!r} is not a module name: give a dotted import path such as "
                                 "my_tasks.rotate (not a file path)")
        return v

    @model_validator(mode="after")
    def _check(self):
        if self.min_items > self.max_items:
            raise ValueError(f"min_items ({self.min_items}) must be <= max_items ({self.max_items})")
        return self


# ----------------------------------------------------------------------------- data


DEFAULT_MAX_TOTAL_TOKENS = 2048
"""The cap on `data.max_total_tokens` when it follows the model's context length."""


class DataConfig(_Model):
    """Where datasets come from and how they are cleaned. Empty paths mean the built-in task."""

    sft_path: str | None = Field(None, description="Demonstrations: JSONL path, s3:// URI or HF dataset name.")
    preference_path: str | None = Field(None, description="Preference pairs: JSONL path, s3:// URI or HF dataset name.")
    prompt_path: str | None = Field(None, description="PPO prompts: JSONL path, s3:// URI or HF dataset name. Defaults to the SFT prompts.")
    hf_split: str = Field("train", description="Split to read from Hugging Face datasets (one source can say its own: hf://org/name?split=test).")
    hf_config: str | None = Field(None, description="Configuration (subset) name of Hugging Face datasets, e.g. the 'harmless-base' of a multi-subset dataset; a source can say its own: hf://org/name?config=x.")
    hf_revision: str | None = Field(None, description="Revision (commit sha recommended, or a branch/tag) of Hugging Face datasets; a source can say its own: hf://org/name?revision=abc123.")
    eval_fraction: float = Field(0.1, gt=0.0, lt=0.5, description="Share of prompts held out for evaluation (split by prompt hash).")
    max_reject_rate: float = Field(0.02, ge=0.0, le=1.0, description="Stage fails, writing nothing, if more than this share of rows is bad.")
    max_chars: int = Field(20000, gt=0, description="Rows longer than this (characters) are rejected as over-long.")
    max_prompt_tokens: int | None = Field(None, gt=0, description="Rows whose prompt (as the model sees it, chat template included) exceeds this many tokens are dropped and counted; empty = half of max_total_tokens.")
    max_total_tokens: int | None = Field(None, gt=0, description="Rows whose prompt + answer (with its end-of-turn token) exceeds this many tokens are dropped and counted; empty = the model's context length (max_position_embeddings), capped at 2048.")
    ptx_path: str | None = Field(None, description="PPO-ptx text: JSONL rows {text} (all tokens trained on) or demonstrations {prompt, completion} / {messages}, s3:// URI or HF dataset name; empty = the SFT demonstrations.")
    split_salt: str = Field("rlhf-split-v1", description="Salt of the prompt-hash train/eval split. Fixed per dataset (not the seed), so runs with other seeds, and the champion, hold out the same prompts.")
    max_truncate_rate: float = Field(0.05, ge=0.0, le=1.0, description="Prep fails, writing nothing, when more than this share of a dataset's rows is over-long (dropped by the two limits above), naming the fix; the share is always in the prep report.")


# ----------------------------------------------------------------------------- model


class LoraConfig(_Model):
    enabled: bool = Field(False, description="Train LoRA adapters (peft) instead of all weights; merged on save.")
    r: int = Field(8, gt=0, description="LoRA rank.")
    alpha: int = Field(16, gt=0, description="LoRA scaling alpha.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="LoRA dropout.")
    target_modules: list[str] = Field(["q_proj", "k_proj", "v_proj", "o_proj"], description="Module names to adapt.")


class ModelConfig(_Model):
    """The base model: a pretrained one (hub id, local path, s3://) or one built from a config."""

    name_or_path: str | None = Field(None, description="Hub id, local folder or s3:// URI of a causal LM; empty builds one from the fields below.")
    trust_remote_code: bool = Field(False, description="Allow model code from the hub. Off by default: only opt in for sources you trust.")
    revision: str | None = Field(None, description="Hub revision (commit sha recommended) when loading by hub id.")
    vocab_size: int = Field(512, ge=260, description="Vocabulary of the tokenizer trained in data prep (models built from config).")
    hidden_size: int = Field(128, gt=0, description="Hidden size of a model built from config.")
    num_layers: int = Field(4, gt=0, description="Transformer layers of a model built from config.")
    num_heads: int = Field(4, gt=0, description="Attention heads of a model built from config.")
    intermediate_size: int = Field(384, gt=0, description="MLP width of a model built from config.")
    max_position_embeddings: int = Field(256, gt=0, description="Longest sequence of a model built from config.")
    chat_template: Literal["auto", "off"] = Field("auto", description="auto: when the tokenizer has a chat template (an instruct model's), conversations, prompts and answers are rendered with it (apply_chat_template; prompts with add_generation_prompt), answers end at the template's end-of-turn token; off: HH-style text (\\n\\nHuman: ... \\n\\nAssistant:), as for tokenizers that prep trains or that have no template.")
    wrap_plain_rows: bool = Field(True, description="With a chat template, plain {prompt, completion} rows become one user turn and one assistant turn; false: they stay raw text (prompt + completion + EOS).")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Optional LoRA adapters.")

    @model_validator(mode="after")
    def _check(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


# ----------------------------------------------------------------------------- stages

PTX_COEF = 1.0
"""Default `ppo.ptx_coef` (see PPOConfig)."""

CHECKPOINT_EVERY_S = 600.0
"""Default `checkpoint_every_s` of the training stages: on GPU steps of seconds to
minutes, a checkpoint at least every 10 minutes bounds what a preemption without a
grace period (or a crash) loses; SIGTERM itself always checkpoints the step in flight.
"""


def checkpoint_every_s_field():
    """The `checkpoint_every_s` field every training stage's section has."""
    return Field(CHECKPOINT_EVERY_S, gt=0, description="Seconds between resumable checkpoints beside the step-based "
                 "ones (a preempted or crashed step loses at most this much work on slow steps); empty: by steps only.")


class OptimConfig(_Model):
    """AdamW and its learning-rate schedule: the fields every trained stage shares
    (`rlhf.train.trainable.make_trainable` reads them)."""

    lr: float = Field(1e-3, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up steps.")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient norm clip; empty = no clipping.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("cosine", description="cosine: linear warm-up, then cosine decay to 0.1x peak; linear: warm-up, then linear decay to 0 (the Hugging Face Trainer default); constant: warm-up, then flat.")
    grad_accum_steps: int = Field(1, gt=0, description="Micro-batches per optimizer step: each process's share of a batch is split into this many forwards whose gradients add up (losses weighted by their tokens or pairs, so the step equals one large batch's). The batch size stays the optimizer batch; it must divide by processes x grad_accum_steps.")


class SFTConfig(OptimConfig):
    """Supervised fine-tuning on demonstrations (loss on response tokens only)."""

    max_epochs: int = Field(30, gt=0, description="Upper bound on epochs; the cosine schedule spans them, and early stopping usually ends sooner. 30 rather than 10 (demo, seed 0): 10 epochs reached a lower held-out loss (0.641 against 0.669) in fewer steps, but the reward model trained from that backbone was worse (rm/accuracy 0.787 against 0.827, offline pairs 0.852 against 0.868) and PPO on it won 0.656 of decisive comparisons.")
    batch_size: int = Field(64, gt=0, description="Sequences per optimizer step.")
    lr: float = Field(1.5e-3, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    packing: bool = Field(True, description="Lay each batch's sequences out in fewer rows (first-fit, rows as long as the batch's longest) with block-diagonal attention and positions restarting per sequence: the same batch and loss (to float rounding), no compute spent on padding. Checked against the padded batch on the first step; models that ignore custom masks fall back.")
    group_by_length: bool = Field(False, description="Batch demonstrations of similar length together (shuffled batches of a length-sorted shuffle, like the Hugging Face Trainer's group_by_length): even less padding, but batches are no longer random samples, which slowed SFT on the demo task (best held-out loss 0.85 instead of 0.72), so off by default.")
    assistant_turns: Literal["final", "all"] = Field("final", description="With a chat template: the loss covers the assistant tokens of the final turn (final) or of every assistant turn of the conversation (all), each through its end-of-turn token.")
    eval_every: int = Field(100, gt=0, description="Steps between held-out loss evaluations.")
    patience: int = Field(3, gt=0, description="Stop after this many evaluations without held-out improvement; the best weights are kept.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between resumable checkpoints.")
    checkpoint_every_s: float | None = checkpoint_every_s_field()
    max_steps: int | None = Field(None, gt=0, description="Hard cap on optimizer steps (for tests).")

    @model_validator(mode="after")
    def _check(self):
        exact_div(self.batch_size, self.grad_accum_steps, "sft.batch_size / sft.grad_accum_steps")
        return self


class RewardConfig(OptimConfig):
    """Reward model: SFT backbone + scalar head, pairwise loss -log sigmoid(r_w - r_l - margin)."""

    epochs: int = Field(2, gt=0, description="Passes over the preference pairs.")
    batch_size: int = Field(32, gt=0, description="Comparisons per optimizer step, on average: a step takes whole groups (the comparisons of one prompt, each distinct answer scored once), as many as hold this many comparisons at the data's mean group size.")
    lr: float = Field(5e-4, gt=0, description="Peak AdamW learning rate.")
    warmup_steps: int = Field(20, ge=0, description="Linear warm-up steps.")
    share_prefix: bool = Field(True, description="Score chosen and rejected as one segment that holds their common prefix (the prompt and more) once, with a block attention mask: the same scores to float rounding, less compute. Checked against separate rows on the first step; models that ignore custom masks fall back.")
    packing: bool = Field(True, description="Lay the batch's segments out in fewer rows (first-fit) with block-diagonal attention: no compute spent on padding, the same scores.")
    group_by_length: bool = Field(False, description="Batch pairs of similar length together (less padding, but batches are no longer random samples).")
    margin: float | None = Field(None, description="Optional fixed margin in the pairwise loss.")
    policy_comparisons: int = Field(20000, ge=0, description="Built-in task only: comparisons of SFT samples (all pairs of `comparison_k` samples of a prompt, drawn until about this many), labelled by the simulated labelers (as InstructGPT's labelers ranked SFT outputs), added to the preference data; pairs of identical samples are dropped, so fewer remain.")
    comparison_k: int = Field(4, ge=2, le=9, description="Built-in task only: SFT samples drawn per prompt for those comparisons; the labelers rank them and every pair of distinct samples is a comparison, C(k, 2) per prompt, as InstructGPT's labelers ranked K = 4 to 9 outputs. 2 = one pair per two samples.")
    judge_fraction: float = Field(0.2, ge=0, lt=0.9, description="Without a gold judge (user data): the share of the training comparisons (split by prompt hash, the same for every seed) that trains a second, held-out reward model instead of the PPO reward model. It is the run's independent judge: PPO's checkpoint selection, eval's win rates and the gate use it, never the reward model PPO optimised against. 0 = no held-out judge (eval and the gate then fall back to the PPO reward model, and say so).")
    comparison_max_new_tokens: int | None = Field(None, gt=0, description="Most tokens in each SFT sample of those comparisons; empty = ppo.max_new_tokens (the reward model then judges responses as long as the policy's). Filled in when the config is validated.")
    checkpoint_every: int = Field(100, gt=0, description="Steps between resumable checkpoints.")
    checkpoint_every_s: float | None = checkpoint_every_s_field()
    max_steps: int | None = Field(None, gt=0, description="Hard cap on optimizer steps (for tests).")

    @model_validator(mode="after")
    def _check(self):
        exact_div(self.batch_size, self.grad_accum_steps, "reward.batch_size / reward.grad_accum_steps")
        return self


class KLConfig(_Model):
    """KL penalty against the SFT (reference) policy."""

    init_coef: float = Field(0.1, ge=0, description="beta: initial (or fixed) KL coefficient.")
    adaptive: bool = Field(True, description="Adapt beta toward a target KL (Ziegler et al. 2019).")
    target: float = Field(1.0, gt=0, description="Target KL per sequence (nats) for the adaptive controller.")
    horizon: int = Field(10000, gt=0, description="Adaptive controller horizon (episodes).")
    estimator: Literal["k1", "k3"] = Field("k1", description="Per-token KL estimator in the reward.")


class PPOConfig(OptimConfig):
    """PPO against reward - beta * KL(policy || SFT)."""

    updates: int = Field(80, gt=0, description="PPO updates (each: one rollout batch, then optimisation).")
    rollout_batch_size: int = Field(128, gt=0, description="Episodes generated per update.")
    minibatch_size: int = Field(32, gt=0, description="Episodes per optimizer step (split into grad_accum_steps micro-batches).")
    generation_batch_size: int | None = Field(None, gt=0, description="Prompts generated together (one KV cache) by each process; empty = its whole share of the rollout batch at once.")
    forward_batch_size: int | None = Field(None, gt=0, description="Episodes per no-grad forward while scoring a rollout (old log-probs, reference, value and reward model): with it set, PPO's peak memory follows it and the generation batch instead of rollout_batch_size. Empty = twice the training micro-batch (2 x minibatch_size / processes / grad_accum_steps), which holds no more than a training step. Splitting these forwards does not change their results (bitwise, on CPU, measured).")
    ppo_epochs: int = Field(2, gt=0, description="Passes over each rollout batch. 2 rather than 4: half of PPO's compute for the same quality on the demo (seed 0, one reward model: decisive win rate 0.831 with 2, 0.801 with 4), which keeps `rlhf run --preset demo` within 10 minutes on 2 cores.")
    lr: float = Field(5e-5, gt=0, description="Policy AdamW learning rate. 5e-5 (demo, seed 0, one reward model, 80 updates): decisive win rate 0.834 and KL 0.58, against 0.793 and KL 0.34 at 2e-5 and 0.815 and KL 0.83 at 1e-4; at 2e-4 the judge plateaued lower and the alignment tax turned positive (+3%).")
    value_lr: float = Field(3e-4, gt=0, description="Value model AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay (policy and value).")
    warmup_steps: int = Field(0, ge=0, description="Linear warm-up optimizer steps (policy and value).")
    grad_clip: float | None = Field(1.0, gt=0, description="Gradient norm clip (policy and value); empty = no clipping.")
    lr_schedule: Literal["cosine", "linear", "constant"] = Field("constant", description="Over all optimizer steps of the stage. cosine: cosine decay to 0.1x peak; linear: linear decay to 0 (the Hugging Face Trainer default); constant: flat.")
    clip_eps: float = Field(0.2, gt=0, description="PPO ratio clip.")
    value_clip_eps: float = Field(0.2, gt=0, description="Value clip.")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount.")
    lam: float = Field(0.95, ge=0, le=1, description="GAE lambda.")
    whiten_advantages: bool = Field(True, description="Whiten advantages per rollout batch.")
    reward_clip: float | None = Field(None, gt=0, description="Clip reward-model scores to [-c, c].")
    normalize_reward: bool = Field(True, description="Normalise reward-model scores with statistics measured on SFT samples before training.")
    kl: KLConfig = Field(default_factory=KLConfig, description="KL penalty.")
    max_new_tokens: int = Field(24, gt=0, description="Most tokens generated per response.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature for rollouts.")
    logprobs_from_generation: bool = Field(True, description="Take the rollout's old log-probs from the logits generation already computed (KV cache) instead of a second policy forward; equal to float rounding.")
    missing_eos_penalty: float = Field(1.0, ge=0, description="Subtracted from the score of responses that never emit EOS.")
    value_init: Literal["reward", "sft"] = Field("reward", description="Initialise the value model from the reward model (InstructGPT) or the SFT backbone.")
    gold_log_every: int = Field(5, gt=0, description="Every N updates, log the gold score of rollouts beside the proxy reward (monitoring only).")
    ptx_coef: float = Field(PTX_COEF, ge=0, description="PPO-ptx (InstructGPT eq. 2, its gamma): each policy step also takes ptx_coef x the mean token NLL of a batch of pretraining / demonstration text (data.ptx_path, default the SFT demonstrations), which keeps the policy's language-model quality (the alignment tax) near SFT's; 0 = plain PPO.")
    ptx_batch_size: int | None = Field(None, gt=0, description="Demonstrations (or text rows) in each policy step's ptx batch; empty = a quarter of minibatch_size (demo, seed 0: relative alignment tax -6.2% with batches of 8, -7.0% with 32, at a quarter of the extra compute; different reward models).")
    judge_every: int | None = Field(5, gt=0, description="Every N updates (and before the first, and at the last), sample the fixed judge prompt set with the policy and score it with the run's independent judge (gold, or the held-out reward model; never the PPO reward model): ppo/judge_score beside ppo/judge_proxy and ppo/judge_sqrt_kl on the same samples. Empty = no judge evaluations during PPO (no checkpoint selection or early stop: `select` must be `last`), as TRL's PPOTrainer with num_sample_generations=0; eval still judges the saved policy.")
    judge_prompts: int = Field(128, gt=0, description="Size of the fixed prompt set the judge scores (PPO training prompts, the same ones and the same sampling seed every time).")
    select: Literal["judge", "last"] = Field("judge", description="Which policy the stage saves: the one the judge scored best (checkpoint selection against over-optimisation; its update is in the summary as ppo/selected_update) or the last.")
    patience: int | None = Field(4, gt=0, description="Stop early after this many judge evaluations in a row below the best judge score by more than the evaluation's standard error, while the proxy (PPO reward model) score is above its value at that best: reward hacking has set in. Empty = never stop early.")
    checkpoint_every: int = Field(20, gt=0, description="Updates between resumable checkpoints.")
    checkpoint_every_s: float | None = checkpoint_every_s_field()

    @model_validator(mode="after")
    def _check(self):
        exact_div(self.rollout_batch_size, self.minibatch_size, "ppo.rollout_batch_size / ppo.minibatch_size")
        exact_div(self.minibatch_size, self.grad_accum_steps, "ppo.minibatch_size / ppo.grad_accum_steps")
        if self.judge_every is None and self.select == "judge":
            raise ValueError("ppo.select=judge picks the policy the judge scored best, but ppo.judge_every is empty "
                             "(no judge evaluations): set ppo.judge_every (e.g. 5) or ppo.select=last")
        return self


class EvalConfig(_Model):
    """Held-out comparison of the PPO policy against SFT."""

    num_prompts: int = Field(400, gt=0, description="Held-out prompts to evaluate (fewer if the split has fewer).")
    samples_per_prompt: int = Field(1, gt=0, description="Responses per prompt and model.")
    temperature: float = Field(1.0, ge=0, description="Decoding for both models (0 = greedy); same seed for both.")
    max_new_tokens: int = Field(24, gt=0, description="Most tokens generated per response.")
    bootstrap: int = Field(2000, gt=0, description="Bootstrap resamples for confidence intervals.")
    table_rows: int = Field(50, ge=0, description="Rows in the samples table logged to MLflow.")
    batch_size: int = Field(128, gt=0, description="Prompts per generation batch.")


class TrackingConfig(_Model):
    experiment: str = Field("rlhf", description="MLflow experiment name.")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; empty uses MLFLOW_TRACKING_URI, else the embedded sqlite database $RLHF_HOME/mlflow.db.")
    log_models: bool = Field(True, description="Log trained models with mlflow.transformers.")
    registered_model: str = Field("rlhf-demo", description="Base name for registered models (<name>-sft, -reward, -policy).")
    outage_tolerance_s: float = Field(900.0, gt=0, description="How long a stage keeps training (metrics wait in order, saved in the run's store) and starting or finishing a stage's run keeps retrying while the MLflow tracking server does not answer; past it the stage fails with a clear error and its KFP retry resumes.")

    @field_validator("tracking_uri")
    @classmethod
    def _no_credentials(cls, v):
        if v and re.search(r"//[^/@]+@", v):
            raise ValueError("the URI carries credentials, which would be logged with the config: remove "
                             "user:password@ and set MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD "
                             "(or MLFLOW_TRACKING_TOKEN) in the environment instead")
        return v


class GateConfig(_Model):
    """Promotion gate: the new policy becomes `@champion` only if it is better than SFT by a
    significance test on the decisive comparisons (the independent judge's), stays within
    the KL and alignment-tax limits, AND beats the current champion by the same test on the
    same held-out prompts."""

    confidence: float = Field(0.95, gt=0.5, lt=1, description="Level of the Wilson interval of decisive win rates (and of the bootstrap interval of the judge delta).")
    min_decisive_win_rate: float = Field(0.5, ge=0, le=1, description="The lower bound of the decisive win rate's interval vs SFT (wins / (wins + losses) by the independent judge; ties left out, so the bar does not move with the tie rate) must reach this.")
    min_gold_delta: float = Field(0.0, description="Least mean judge-score gain over SFT (the gold judge's, or the held-out reward model's).")
    max_kl: float = Field(10.0, gt=0, description="Most KL(policy || SFT) per response, in nats.")
    max_alignment_tax: float = Field(0.5, description="Most increase of held-out demonstration loss over SFT (nats per token).")
    champion_margin: float = Field(0.0, ge=0, lt=0.5, description="The lower bound of the decisive win rate's interval against the current champion must be above 0.5 + margin.")
    champion_prompts: int = Field(200, gt=0, description="Held-out prompts for the champion/challenger comparison.")

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data):
        if isinstance(data, dict) and "min_win_rate" in data:
            raise ValueError("gate.min_win_rate was replaced by gate.min_decisive_win_rate: the gate tests the "
                             "decisive comparisons (the lower bound of their Wilson interval at gate.confidence), "
                             "because a ties-as-half threshold can be out of reach when most comparisons tie")
        return data


class DistributedConfig(_Model):
    """How sft, reward and ppo spread over the GPUs of a node (one process per GPU).

    With more than one process (or `engine: deepspeed`) a stage trains with DeepSpeed:
    data-parallel ZeRO, optional CPU offload, bf16; its DeepSpeed config is generated
    from the stage's own batch size, learning rate, weight decay and gradient clip."""

    num_processes: int = Field(0, ge=0, description="Processes per node for sft, reward and ppo: 0 = one per visible GPU (1 without GPUs). Each stage's batch sizes must divide by the total process count.")
    engine: Literal["auto", "torch", "deepspeed"] = Field("auto", description="auto: DeepSpeed when a stage runs in more than one process, plain torch otherwise; deepspeed: DeepSpeed even in one process.")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage: 2 partitions optimizer states and gradients, 3 also the parameters.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states and step on the CPU (DeepSpeed's CPU Adam).")
    offload_params: bool = Field(False, description="ZeRO-3 only: parameters live on the CPU between uses.")
    bf16: bool | None = Field(None, description="Older spelling of train.precision (true = bf16, false = fp32); empty = train.precision decides. Setting both to different values is an error.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass of trained models (less memory, ~30% more compute).")
    compile: bool = Field(False, description="torch.compile the trained models' forward and backward (inductor, dynamic shapes; DeepSpeed's engine.compile under DeepSpeed). Off by default: on 2 CPU cores it made SFT steps 8% faster but cost 25-85 s of compiling per process (benchmarks/RESULTS.md), a loss for short runs; worth trying for long GPU runs.")
    zero3_generation: Literal["gather", "synced"] = Field("gather", description="PPO rollouts under ZeRO-3: gather the whole policy on every GPU while generating (fast; the policy must fit one GPU), or generate with layer-by-layer gathering in lockstep (synced_gpus).")

    @model_validator(mode="after")
    def _check(self):
        if self.offload_params and self.zero_stage != 3:
            raise ValueError("distributed.offload_params needs distributed.zero_stage: 3 (only ZeRO-3 partitions parameters)")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("distributed.offload_optimizer needs distributed.zero_stage 1, 2 or 3")
        return self


class TrainConfig(_Model):
    """How every trained stage computes, on the plain-torch path and under DeepSpeed."""

    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="fp32; bf16 or fp16 mixed precision: the forward and backward under autocast with fp32 master weights (plus a dynamic loss scaler for fp16) on the plain-torch path, DeepSpeed's bf16 / fp16 under DeepSpeed; the frozen models (reference, reward) are kept in that precision. auto: bf16 on a GPU that supports it, fp32 otherwise.")


class PipelineConfig(_Model):
    """The whole pipeline: every stage's config, plus run-wide settings."""

    seed: int = Field(0, description="Seed for data generation, model init and training.")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where to train.")
    num_threads: int | None = Field(None, gt=0, description="torch CPU threads (default: torch's choice).")
    task: TaskConfig = Field(default_factory=TaskConfig, description="Built-in task (when no dataset paths are set).")
    data: DataConfig = Field(default_factory=DataConfig, description="Datasets and cleaning.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Base model.")
    sft: SFTConfig = Field(default_factory=SFTConfig, description="SFT stage.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward model stage.")
    ppo: PPOConfig = Field(default_factory=PPOConfig, description="PPO stage.")
    eval: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation stage.")
    tracking: TrackingConfig = Field(default_factory=TrackingConfig, description="MLflow.")
    gate: GateConfig = Field(default_factory=GateConfig, description="Promotion gate.")
    distributed: DistributedConfig = Field(default_factory=DistributedConfig, description="Multi-GPU training (DeepSpeed).")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Numerics of every trained stage.")

    @model_validator(mode="after")
    def _check_data_paths(self):
        if bool(self.data.sft_path) != bool(self.data.preference_path):
            raise ValueError("data.sft_path and data.preference_path must be set together "
                             "(or both left empty for the built-in task)")
        return self

    @model_validator(mode="after")
    def _resolve_defaults(self):
        """Defaults that follow another section, resolved once here so that each stage reads
        only its own section."""
        if self.reward.comparison_max_new_tokens is None:
            self.reward.comparison_max_new_tokens = self.ppo.max_new_tokens
        if self.distributed.bf16 is not None:
            legacy = "bf16" if self.distributed.bf16 else "fp32"
            if self.train.precision not in ("auto", legacy):
                raise ValueError(f"distributed.bf16={self.distributed.bf16} contradicts train.precision="
                                 f"{self.train.precision}: drop distributed.bf16 (train.precision replaces it)")
        return self

    @property
    def uses_builtin_task(self) -> bool:
        return self.data.sft_path is None and self.data.preference_path is None


# ----------------------------------------------------------------------------- presets

PRESETS: dict[str, dict[str, Any]] = {
    # Tiny model, built-in task, 2 CPU cores: the embedded demo and the test bed.
    "demo": {},
    # InstructGPT's PPO hyper-parameters (arXiv 2203.02155, appendix C): fixed beta 0.02,
    # clip 0.2, gamma 1, lambda 0.95, value function initialised from the reward model.
    "instructgpt": {
        "ppo": {
            "clip_eps": 0.2, "gamma": 1.0, "lam": 0.95, "value_init": "reward",
            "kl": {"init_coef": 0.02, "adaptive": False},
        },
    },
    # Seconds, not minutes: for tests and smoke runs.
    "tiny": {
        "task": {"num_demonstrations": 200, "num_comparisons": 200, "num_prompts": 200, "max_items": 5},
        "model": {"vocab_size": 300, "hidden_size": 32, "num_layers": 1, "num_heads": 2, "intermediate_size": 64},
        "sft": {"max_epochs": 1, "batch_size": 16, "eval_every": 5, "checkpoint_every": 5, "warmup_steps": 2},
        "reward": {"epochs": 1, "batch_size": 16, "checkpoint_every": 5, "warmup_steps": 2, "policy_comparisons": 64},
        "ppo": {"updates": 3, "rollout_batch_size": 16, "minibatch_size": 8, "ppo_epochs": 1, "max_new_tokens": 8, "checkpoint_every": 2, "gold_log_every": 1},
        "eval": {"num_prompts": 16, "max_new_tokens": 8, "bootstrap": 100, "table_rows": 5},
        "tracking": {"log_models": True},
    },
}


def _deep_merge(base: dict, update: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def apply_override(d: dict, assignment: str) -> dict:
    """Apply one `dotted.key=value` override; the value is parsed as a YAML scalar."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. --set ppo.kl.init_coef=0.05")
    key, raw = assignment.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({e})") from None
    out = copy.deepcopy(d)
    node = out
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"--set {assignment!r}: {p!r} is a value, not a section")
        node = nxt
    node[parts[-1]] = value
    return out


def _format_validation_error(e: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for err in e.errors():
        loc = ".".join(str(x) for x in err["loc"]) or "(root)"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown field; check the spelling (see `rlhf config show` for all fields)"
        got = err.get("input")
        got_s = "" if isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc}: {msg}{got_s}")
    return "\n".join(lines)


def read_yaml_mapping(path: Path, what: str, of: str) -> dict:
    """A YAML file whose top level is a mapping, with errors that name the file."""
    if not path.is_file():
        raise ConfigError(f"{what} not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of {of}")
    return loaded


def load_config(preset: str | None = "demo", config_file: str | Path | None = None,
                overrides: list[str] | None = None, config_dict: dict | None = None) -> PipelineConfig:
    """preset -> YAML file -> config dict (deep-merged) -> --set overrides, validated once at the end."""
    data: dict[str, Any] = {}
    origin = []
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset {preset!r}; choose one of: {', '.join(sorted(PRESETS))}")
        data = _deep_merge(data, PRESETS[preset])
        origin.append(f"preset {preset}")
    if config_file:
        path = Path(config_file)
        loaded = read_yaml_mapping(path, "config file", "sections (task, data, model, sft, ...)")
        data = _deep_merge(data, loaded)
        origin.append(str(path))
    if config_dict:
        if not isinstance(config_dict, dict):
            raise ConfigError("the config JSON must be an object of sections (task, data, model, sft, ...)")
        data = _deep_merge(data, config_dict)
        origin.append("config JSON")
    for item in overrides or []:
        data = apply_override(data, item)
    if overrides:
        origin.append("--set " + " ".join(overrides))
    try:
        return PipelineConfig.model_validate(data)
    except ValidationError as e:
        # the message repeats the overrides and the rejected values: never a password in them
        raise ConfigError(redact(_format_validation_error(e, ", ".join(origin) or "defaults"))) from None


def flatten(cfg: BaseModel | dict, prefix: str = "") -> dict[str, Any]:
    """Flatten a config to dotted keys (MLflow params)."""
    d = cfg.model_dump() if isinstance(cfg, BaseModel) else cfg
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
