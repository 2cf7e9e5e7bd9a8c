"""`rlhf plan`: will each stage fit on the profile's GPUs, and if not, what to change first.

The model is read from its `config.json` (a hub id, a local folder, an s3:// folder, or
the file itself; a model built from the config needs nothing). For every stage the
estimate is per process (per GPU) and sums:

- weights: every model the stage holds (PPO: policy, value, reward model, and the
  reference unless the policy is LoRA, where the reference is the policy without its
  adapters), in the stored precision; under ZeRO-3 the trained ones split over GPUs,
  with parameter offload on the CPU;
- optimizer: AdamW's two fp32 states per trained parameter (LoRA: the adapters only),
  and the fp32 master weights of a 16-bit DeepSpeed run; split over GPUs from ZeRO-1,
  on the CPU with optimizer offload;
- gradients: one per trained parameter, split over GPUs from ZeRO-2;
- autocast's 16-bit copies of the weights (plain-torch bf16/fp16: the weights stay fp32);
- activations of one micro-batch (`batch / processes / grad_accum_steps` sequences of
  the planned length) kept for the backward pass: per token and layer, the hidden
  states, attention and MLP intermediates of a Llama/Qwen2-style block, plus the
  attention probabilities where attention is computed explicitly (CPU; on GPUs SDPA's
  fused kernels keep none), or only each layer's input with gradient checkpointing;
  plus the logits, their fp32 log-softmax and its gradient;
- generation (PPO, eval): the KV cache of one generation batch.

The peak of a training step is the weights plus the larger of what the forward and
backward hold (activations, autocast copies) and what the optimizer step holds
(gradients and optimizer states). `benchmarks/plan_check.py` checks these estimates
against measured peaks on the CPU, `benchmarks/gpu_check.sh` on a GPU.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rlhf.config import PipelineConfig

GIB = 2**30
ADAM_STATE_BYTES = 8  # exp_avg + exp_avg_sq, fp32
# Bytes the forward keeps for the backward pass per token and layer, per unit of
# (hidden + intermediate / 4): the hidden-sized tensors (norms, attention, residual branches,
# RoPE) and the MLP's (gate, up, silu, product) of a Llama/Qwen2 block, in fp32 and under
# 16-bit autocast (where norms and softmax stay fp32). Full fine-tuning keeps more per hidden
# unit than LoRA (the inputs of every weight's gradient). Per token and vocabulary entry: the
# logits, their fp32 log-softmax and its gradient. Calibrated by benchmarks/plan_check.py on
# the ~1M and ~10M stand-ins (one SFT step, batch 8 x 256, CPU) and checked on the ~50M one.
ACT_BYTES = {"fp32": 29.7, "half": 20.95}
FULL_FT_BYTES = {"fp32": 20.0, "half": 9.5}  # per token, layer and hidden unit
LOGIT_BYTES = {"fp32": 14.0, "half": 15.1}  # per token and vocabulary entry
KNOWN_GPU_MEMORY = {  # node-selector / instance-type fragments -> GiB per GPU
    "h200": 141, "h100": 80, "a100-80gb": 80, "a100-40gb": 40, "a100": 40, "l4": 24, "a10g": 24, "t4": 16,
    "v100": 16, "p5.48xlarge": 80, "p5e.48xlarge": 141, "p4de.24xlarge": 80, "p4d.24xlarge": 40,
    "g5.": 24, "g6.": 24,
}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs of a decoder-only transformer (Llama / Qwen2 / Mistral style)."""

    vocab: int
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie_embeddings: bool
    qkv_bias: bool = False
    max_positions: int = 2048

    @classmethod
    def from_config(cls, c: dict) -> "ModelShape":
        missing = [k for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                               "intermediate_size") if k not in c]
        if missing:
            raise ValueError(f"config.json lacks {', '.join(missing)}: rlhf plan estimates Llama/Qwen2/Mistral-style "
                             "decoder-only models")
        return cls(vocab=c["vocab_size"], hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                   heads=c["num_attention_heads"], kv_heads=c.get("num_key_value_heads") or c["num_attention_heads"],
                   intermediate=c["intermediate_size"], tie_embeddings=bool(c.get("tie_word_embeddings", False)),
                   qkv_bias=c.get("model_type") == "qwen2" or bool(c.get("attention_bias", False)),
                   max_positions=c.get("max_position_embeddings", 2048))

    @classmethod
    def from_pretrained(cls, source: str | Path, store=None, revision: str | None = None) -> "ModelShape":
        """From a config.json file, a folder holding one, an s3:// folder or a hub id."""
        src = str(source)
        if src.startswith("s3://"):
            if store is None:
                raise ValueError(f"{src}: reading an s3:// model needs the artifact store settings")
            return cls.from_config(json.loads(store.read_bytes(src.rstrip("/") + "/config.json")))
        p = Path(src)
        if p.is_file():
            return cls.from_config(json.loads(p.read_text()))
        if (p / "config.json").is_file():
            return cls.from_config(json.loads((p / "config.json").read_text()))
        from transformers import AutoConfig

        try:
            return cls.from_config(AutoConfig.from_pretrained(src, revision=revision).to_dict())
        except OSError as e:
            raise ValueError(f"{src}: no config.json found (a local folder or file, s3://, or a hub id the hub "
                             f"can serve): {e}") from None

    @classmethod
    def of_built(cls, cfg: PipelineConfig) -> "ModelShape":
        m = cfg.model
        return cls(vocab=m.vocab_size, hidden=m.hidden_size, layers=m.num_layers, heads=m.num_heads,
                   kv_heads=m.num_heads, intermediate=m.intermediate_size, tie_embeddings=False,
                   max_positions=m.max_position_embeddings)

    @property
    def kv_dim(self) -> int:
        return self.hidden // self.heads * self.kv_heads

    @property
    def layer_linear_params(self) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return h * h + 2 * h * kv + h * h + 3 * h * i + ((h + 2 * kv) if self.qkv_bias else 0)

    @property
    def params(self) -> int:
        """Causal LM parameters (tied embeddings counted once)."""
        emb = self.vocab * self.hidden * (1 if self.tie_embeddings else 2)
        return emb + self.layers * (self.layer_linear_params + 2 * self.hidden) + self.hidden

    def classifier_params(self) -> int:
        """The same backbone with a one-output head instead of the LM head."""
        return self.vocab * self.hidden + self.layers * (self.layer_linear_params + 2 * self.hidden) + 2 * self.hidden

    def lora_params(self, r: int, targets: list[str]) -> int:
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        shapes = {"q_proj": (h, h), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (h, h), "gate_proj": (h, i),
                  "up_proj": (h, i), "down_proj": (i, h)}
        return self.layers * sum(r * (a + b) for name, (a, b) in shapes.items() if name in targets)


@dataclass
class Estimate:
    stage: str
    params: int
    parts: dict[str, float] = field(default_factory=dict)  # bytes per process
    peak: float = 0.0
    notes: list[str] = field(default_factory=list)

    def row(self) -> str:
        gib = lambda k: self.parts.get(k, 0.0) / GIB  # noqa: E731
        return (f"{self.stage:7} {gib('weights'):8.2f} {gib('optimizer'):9.2f} {gib('gradients'):9.2f} "
                f"{gib('activations'):11.2f} {gib('kv_cache'):8.2f} {self.peak / GIB:8.2f}")


def _precision(cfg: PipelineConfig, device: str) -> str:
    p = cfg.train.precision
    if p == "auto":
        if cfg.distributed.bf16 is not None:
            return "bf16" if cfg.distributed.bf16 else "fp32"
        return "bf16" if device == "cuda" else "fp32"
    return p


def activation_bytes(shape: ModelShape, tokens: int, rows: int, row_len: int, precision: str, *, device: str,
                     checkpointing: bool, lm_head: bool, full_ft: bool) -> float:
    """What the forward keeps for the backward pass, one micro-batch."""
    kind = "fp32" if precision == "fp32" else "half"
    per_token_layer = ACT_BYTES[kind] * (shape.hidden + shape.intermediate / 4)
    if full_ft:
        per_token_layer += FULL_FT_BYTES[kind] * shape.hidden
    # the block attention mask; on the CPU attention is explicit and keeps its probabilities
    attn = rows * row_len * row_len * (1 + (shape.heads * (4 if kind == "fp32" else 2) if device == "cpu" else 0))
    layer = tokens * per_token_layer + attn
    act_bytes = 4 if kind == "fp32" else 2
    acts = tokens * shape.hidden * act_bytes * shape.layers + layer if checkpointing else layer * shape.layers
    head = tokens * shape.vocab * LOGIT_BYTES[kind] if lm_head else 0
    return acts + head


def estimate_stage(stage: str, cfg: PipelineConfig, shape: ModelShape, *, device: str = "cuda", world: int = 1,
                   seq_len: int | None = None) -> Estimate:
    """Peak bytes per process of one stage (see the module doc)."""
    d, m = cfg.distributed, cfg.model
    precision = _precision(cfg, device)
    deepspeed = world > 1 or d.engine == "deepspeed"
    half = precision in ("bf16", "fp16")
    w_bytes = 2 if (half and deepspeed) else 4
    act = 2 if half else 4
    seq = seq_len or min(cfg.data.max_total_tokens or shape.max_positions, shape.max_positions)
    lora = m.lora.enabled
    est = Estimate(stage, shape.params)

    def trained(n_params: int, lora_params: int) -> dict[str, float]:
        """Weights, gradients and optimizer of one trained model."""
        t = lora_params if lora else n_params
        zero = d.zero_stage if deepspeed else 0
        split = lambda x, from_stage: x / world if zero >= from_stage else x  # noqa: E731
        weights = 0.0 if (deepspeed and d.offload_params) else split(n_params * w_bytes, 3)
        opt = t * ADAM_STATE_BYTES + (t * 4 if (half and deepspeed) else 0)  # + fp32 master weights
        opt = 0.0 if (deepspeed and d.offload_optimizer) else split(opt, 1)
        grads = split(t * 4, 2)  # fp32 (DeepSpeed's bf16 / fp16 optimizers keep fp32 gradients too)
        head = shape.vocab * shape.hidden if n_params == shape.params else shape.hidden
        cast = (shape.layers * shape.layer_linear_params + head) * 2 if (half and not deepspeed) else 0
        return {"weights": weights, "optimizer": opt, "gradients": grads, "autocast": cast}

    def frozen(n_params: int) -> float:
        return n_params * (2 if half else 4)

    lora_lm = shape.lora_params(m.lora.r, m.lora.target_modules) if lora else 0
    if stage in ("sft", "reward"):
        scfg = getattr(cfg, stage)
        micro = max(1, scfg.batch_size // (world * scfg.grad_accum_steps))
        rows = micro * (2 if stage == "reward" else 1)
        tr = trained(shape.params if stage == "sft" else shape.classifier_params(), lora_lm)
        acts = activation_bytes(shape, rows * seq, rows, seq, precision, device=device,
                                checkpointing=d.gradient_checkpointing, lm_head=stage == "sft", full_ft=not lora)
        est.parts = {"weights": tr["weights"], "optimizer": tr["optimizer"], "gradients": tr["gradients"],
                     "activations": acts + tr["autocast"]}
        # the backward holds the activations, autocast's copies and the gradients; the step the
        # gradients and AdamW's states
        est.peak = tr["weights"] + max(acts + tr["autocast"] + tr["gradients"], tr["gradients"] + tr["optimizer"])
    elif stage == "ppo":
        p = cfg.ppo
        micro = max(1, p.minibatch_size // (world * p.grad_accum_steps))
        gen = p.generation_batch_size or max(1, p.rollout_batch_size // world)
        fwd = p.forward_batch_size or micro
        prompt = (cfg.data.max_prompt_tokens or seq // 2)
        length = min(prompt + p.max_new_tokens, shape.max_positions)
        pol, val = trained(shape.params, lora_lm), trained(shape.classifier_params(), lora_lm)
        held = {"policy": pol["weights"], "value": val["weights"], "reward": frozen(shape.classifier_params()),
                "reference": 0.0 if lora else frozen(shape.params)}
        weights = sum(held.values())
        opt = pol["optimizer"] + val["optimizer"]
        grads = pol["gradients"] + val["gradients"]
        train_acts = activation_bytes(shape, micro * length, micro, length, precision, device=device,
                                      checkpointing=d.gradient_checkpointing, lm_head=True,
                                      full_ft=not lora) + pol["autocast"]
        kv = 2 * shape.layers * gen * length * shape.kv_dim * act + gen * p.max_new_tokens * shape.vocab * 4
        score = fwd * length * (shape.hidden * 4 + shape.vocab * 4 * 2)  # one no-grad forward's widest tensors
        est.parts = {"weights": weights, "optimizer": opt, "gradients": grads, "activations": train_acts,
                     "kv_cache": kv}
        est.peak = weights + opt + max(train_acts + grads, kv + score)
        est.notes.append(f"holds {sum(1 for v in held.values() if v)} full models"
                         + (" (LoRA: the reference is the policy without adapters)" if lora else ""))
    elif stage == "eval":  # one process: the policy, SFT and the reward model, in the run's precision
        e = cfg.eval
        length = min((cfg.data.max_prompt_tokens or seq // 2) + e.max_new_tokens, shape.max_positions)
        weights = 2 * frozen(shape.params) + frozen(shape.classifier_params())
        kv = 2 * shape.layers * e.batch_size * length * shape.kv_dim * act + e.batch_size * e.max_new_tokens * \
            shape.vocab * 4
        est.parts = {"weights": weights, "kv_cache": kv}
        est.peak = weights + kv
    else:
        raise ValueError(f"no estimate for stage {stage!r} (sft, reward, ppo, eval)")
    return est


def gpu_memory(stage_profile) -> float | None:
    """GiB per GPU of a profile's stage: `accelerator_memory`, or known from its node selector."""
    if stage_profile is None or not stage_profile.accelerator_count:
        return None
    if getattr(stage_profile, "accelerator_memory", None):
        from rlhf.ops.profiles import quantity_bytes

        return quantity_bytes(stage_profile.accelerator_memory) / GIB
    text = " ".join(str(v).lower() for v in (stage_profile.node_selector or {}).values())
    for key, gib in sorted(KNOWN_GPU_MEMORY.items(), key=lambda kv: -len(kv[0])):
        if key in text:
            return float(gib)
    return None


def first_change(stage: str, cfg: PipelineConfig, world: int, est: Estimate) -> str:
    """The first setting to change when a stage does not fit: for the largest part of its
    estimate, the cheapest setting that shrinks it."""
    d, parts = cfg.distributed, est.parts
    largest = max(("activations", "kv_cache", "weights", "optimizer"), key=lambda k: parts.get(k, 0.0) + (
        parts.get("gradients", 0.0) if k == "optimizer" else 0.0))
    if stage == "eval":
        return "lower eval.batch_size" if largest == "kv_cache" else (
            "set train.precision=bf16 (eval keeps three models)" if cfg.train.precision in ("fp32", "auto") else
            "use GPUs with more memory (eval keeps the policy, SFT and the reward model on one)")
    if largest == "kv_cache":
        return "lower ppo.generation_batch_size (generation's KV cache)"
    if largest == "activations":
        section = getattr(cfg, stage)
        batch = section.minibatch_size if stage == "ppo" else section.batch_size
        micro = batch // (world * section.grad_accum_steps)
        if micro > 1:
            return f"raise {stage}.grad_accum_steps (micro-batch of {micro} sequences per GPU)"
        if not d.gradient_checkpointing:
            return "set distributed.gradient_checkpointing=true"
        return "lower data.max_total_tokens (sequence length)"
    if largest == "optimizer" and not cfg.model.lora.enabled:
        return "set model.lora.enabled=true (or distributed.zero_stage=3 / offload_optimizer)"
    if d.zero_stage < 3 and world > 1:
        return "set distributed.zero_stage=3"
    if largest == "optimizer" and not d.offload_optimizer:
        return "set distributed.offload_optimizer=true (needs zero_stage >= 1)"
    if stage == "ppo" and not cfg.model.lora.enabled:
        return "set model.lora.enabled=true (PPO then keeps no separate reference model)"
    return "use GPUs with more memory, or more of them (distributed.num_processes / the profile's nodes)"


def plan(cfg: PipelineConfig, shape: ModelShape, profile=None, stages: tuple[str, ...] | None = None,
         seq_len: int | None = None) -> tuple[list[dict], str]:
    """Every stage's estimate (the trained stages and eval) against the profile's GPUs:
    (rows, printable report)."""
    from rlhf.stages.table import STAGES

    stages = stages or (*(n for n, s in STAGES.items() if s.trains), "eval")
    rows = []
    lines = [f"model: {shape.params:,} parameters (hidden {shape.hidden}, {shape.layers} layers, vocab "
             f"{shape.vocab:,}); precision {cfg.train.precision}; LoRA "
             f"{'r=' + str(cfg.model.lora.r) if cfg.model.lora.enabled else 'off'}; ZeRO-{cfg.distributed.zero_stage}"
             f"{', gradient checkpointing' if cfg.distributed.gradient_checkpointing else ''}",
             f"{'stage':7} {'weights':>8} {'optimizer':>9} {'gradients':>9} {'activations':>11} {'kv cache':>8} "
             f"{'peak GiB':>8}  verdict"]
    for stage in stages:
        sp = profile.stages.get(stage) if profile is not None else None
        world = max(1, (sp.accelerator_count or 1) * (sp.nodes or 1)) if sp is not None else 1
        if cfg.distributed.num_processes:
            world = cfg.distributed.num_processes * ((sp.nodes or 1) if sp is not None else 1)
        est = estimate_stage(stage, cfg, shape, device="cuda", world=world, seq_len=seq_len)
        mem = gpu_memory(sp)
        if mem is None:
            verdict, fits = "no GPU memory known (set accelerator_memory in the profile)", None
        elif est.peak / GIB <= 0.9 * mem:
            verdict, fits = f"fits ({est.peak / GIB:.1f} of {mem:g} GiB)", True
        else:
            change = first_change(stage, cfg, world, est)
            verdict, fits = f"DOES NOT FIT ({est.peak / GIB:.1f} of {mem:g} GiB): {change}", False
        rows.append({"stage": stage, "peak_gib": est.peak / GIB, "gpu_gib": mem, "fits": fits, "verdict": verdict,
                     "processes": world, "parts_gib": {k: v / GIB for k, v in est.parts.items()}, "notes": est.notes})
        lines.append(f"{est.row()}  {verdict}" + (f"; {'; '.join(est.notes)}" if est.notes else ""))
    lines.append("estimates per GPU; 10% of each GPU is kept for the CUDA context and allocator fragmentation")
    return rows, "\n".join(lines)
