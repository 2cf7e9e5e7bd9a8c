"""Load or build models. Safetensors only; `trust_remote_code` only when the user opts in.

A model source is a hub id, a local folder, or an `s3://` URI (fetched through the
artifact store into a local folder first: once per process, however many times the
stage loads its tokenizer and weights, and removed when the process exits).
"""

from __future__ import annotations

import atexit
import random
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from rlhf.config import ModelConfig


class ModelLoadError(RuntimeError):
    pass


_DOWNLOADS: dict[str, tuple[Path, Path]] = {}
"""s3:// model source -> (its local copy, the temp folder holding it) in this process
(one download per stage process)."""


def _remove_downloads() -> None:
    for _, tmp in _DOWNLOADS.values():
        shutil.rmtree(tmp, ignore_errors=True)
    _DOWNLOADS.clear()


atexit.register(_remove_downloads)


def resolve_source(source: str, store=None) -> str:
    """Local folder for s3:// sources (via the store, verified, fetched once per process
    and removed at its exit); other sources pass through."""
    if source.startswith("s3://"):
        if store is None:
            raise ModelLoadError(f"{source}: an s3:// model needs an artifact store configured")
        if source not in _DOWNLOADS or not _DOWNLOADS[source][0].is_dir():
            tmp = Path(tempfile.mkdtemp(prefix="rlhf-model-"))
            try:
                _DOWNLOADS[source] = (Path(store.fetch(source, tmp)), tmp)
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)  # a failed download leaves nothing behind
                raise
        return str(_DOWNLOADS[source][0])
    return source


def _check_safetensors(path: str) -> None:
    p = Path(path)
    if p.is_dir() and not list(p.glob("*.safetensors")) and (list(p.glob("*.bin")) or list(p.glob("*.pt"))):
        raise ModelLoadError(f"{path}: only pickle weights (.bin/.pt) found; convert the model to safetensors "
                             "(model.save_pretrained(dir, safe_serialization=True)) — pickle files can run code when loaded")


def load_tokenizer(source: str, mcfg: ModelConfig, store=None) -> PreTrainedTokenizerBase:
    path = resolve_source(source, store)
    tok = AutoTokenizer.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ModelLoadError(f"{source}: the tokenizer has neither a pad nor an EOS token")
        tok.pad_token = tok.eos_token
    return tok


def load_causal_lm(source: str, mcfg: ModelConfig, store=None, dtype=torch.float32):
    path = resolve_source(source, store)
    _check_safetensors(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            path, use_safetensors=True, trust_remote_code=mcfg.trust_remote_code,
            revision=mcfg.revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a causal LM from {source!r} (model.name_or_path): {e}") from None


def load_reward_model(source: str, mcfg: ModelConfig, pad_token_id: int, store=None, dtype=torch.float32):
    """Sequence classifier with one output; from a causal LM the head is freshly initialised."""
    path = resolve_source(source, store)
    _check_safetensors(path)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=1, use_safetensors=True, trust_remote_code=mcfg.trust_remote_code,
            revision=mcfg.revision, dtype=dtype)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot load a reward/value model from {source!r}: {e}") from None
    model.config.pad_token_id = pad_token_id
    return model


def build_causal_lm(mcfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> LlamaForCausalLM:
    """A small Llama built from the config, seeded so builds are reproducible."""
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=mcfg.hidden_size, num_hidden_layers=mcfg.num_layers,
        num_attention_heads=mcfg.num_heads, num_key_value_heads=mcfg.num_heads,
        intermediate_size=mcfg.intermediate_size, hidden_act="silu",
        max_position_embeddings=mcfg.max_position_embeddings, rms_norm_eps=1e-6, rope_theta=10000.0,
        initializer_range=0.02, tie_word_embeddings=False, attention_bias=False, mlp_bias=False,
        attention_dropout=0.0, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    random.seed(seed)
    return LlamaForCausalLM(config)


def apply_lora(model, mcfg: ModelConfig, task_type: str = "CAUSAL_LM"):
    """Wrap with peft LoRA adapters when enabled; `merge_lora` folds them back before saving."""
    if not mcfg.lora.enabled:
        return model
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    lcfg = PeftLoraConfig(r=mcfg.lora.r, lora_alpha=mcfg.lora.alpha, lora_dropout=mcfg.lora.dropout,
                          target_modules=mcfg.lora.target_modules, task_type=task_type)
    return get_peft_model(model, lcfg)


def merge_lora(model):
    return model.merge_and_unload() if hasattr(model, "merge_and_unload") else model


def save_model(model, tokenizer, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    merge_lora(model).save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return out_dir
