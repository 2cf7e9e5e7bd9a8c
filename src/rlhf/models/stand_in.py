"""A stand-in for a Hugging Face hub checkpoint, built offline.

Hub weights cannot be downloaded everywhere this project is tested, so this builds a
model folder laid out the way a hub checkpoint is, with random weights:

- `config.json` of a Qwen2 or Llama architecture (any size: a few layers for tests,
  Qwen2-0.5B's shape for the GPU check);
- a byte-level BPE tokenizer with the architecture's special tokens and a real chat
  template (ChatML with a default system prompt for Qwen2; Llama 3's header tokens, with
  the BOS the template writes and the tokenizer also adds, for Llama), the
  instruct model's end-of-turn token as EOS;
- `model.safetensors`;
- `generation_config.json` with several stop ids and the sampling defaults hub
  instruct models ship (top_p, top_k, repetition_penalty), which RLHF sampling must
  not inherit.

The templates mark assistant text with `{% generation %}`, so
`apply_chat_template(..., return_assistant_tokens_mask=True)` gives the template's own
assistant mask to test against; the pipeline does not rely on those markers (most hub
templates have none).

    python -m rlhf.models.stand_in OUT [--arch qwen2|llama] [--hidden-size 64] [--layers 2] ...
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast

QWEN2_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

LLAMA3_TEMPLATE = (
    "{{- bos_token }}"
    "{%- for message in messages %}"
    "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
    "{%- if message['role'] == 'assistant' %}"
    "{% generation %}{{- message['content'] | trim + '<|eot_id|>' }}{% endgeneration %}"
    "{%- else %}"
    "{{- message['content'] | trim + '<|eot_id|>' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

ARCHS = {
    # special tokens, the tokenizer's eos / pad / bos, the stop ids of generation_config, the template
    "qwen2": {"special": ["<|endoftext|>", "<|im_start|>", "<|im_end|>"], "eos": "<|im_end|>",
              "pad": "<|endoftext|>", "bos": None, "stops": ["<|im_end|>", "<|endoftext|>"],
              "template": QWEN2_TEMPLATE},
    "llama": {"special": ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                          "<|eot_id|>"], "eos": "<|eot_id|>", "pad": None, "bos": "<|begin_of_text|>",
              "stops": ["<|eot_id|>", "<|end_of_text|>"], "template": LLAMA3_TEMPLATE},
}

QWEN2_0_5B = {"hidden_size": 896, "num_layers": 24, "num_heads": 14, "num_kv_heads": 2, "intermediate_size": 4864,
              "embedding_rows": 151936, "max_position_embeddings": 32768, "tie_word_embeddings": True}
"""Qwen2-0.5B's shape (its config.json), for the GPU check."""


def default_corpus(n: int = 3000, seed: int = 0) -> list[str]:
    """Text to train the stand-in's tokenizer on: instructions like the built-in task's
    (reverse / sort a few items) and plain English, so both tokenize into real
    multi-character tokens."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:
            items = [rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 8))]
            out.append(f"reverse: {' '.join(items)} {' '.join(reversed(items))}")
        else:
            items = [str(rng.randint(0, 20)) for _ in range(rng.randint(3, 8))]
            out.append(f"sort: {' '.join(items)} {' '.join(sorted(items, key=int))}")
    words = ("the a of to and in is it you that was for on are with as I his they be at one have this from "
             "what which their time if will way about many then them write would like so these her long make "
             "thing see him two has look more day could go come did number sound no most people my over know "
             "water than call first who may down side been now find answer question capital city colour planet "
             "hello thanks please sure fine cat dog red blue Paris Mars four cold hot").split()
    out += [" ".join(rng.choice(words) for _ in range(rng.randint(4, 16))) + rng.choice([".", "?", "!"])
            for _ in range(n)]
    return out


def build_tokenizer(arch: str, vocab_size: int, corpus: list[str]) -> PreTrainedTokenizerFast:
    spec = ARCHS[arch]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=spec["special"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(corpus, trainer=trainer)
    if spec["bos"]:  # Llama 3's tokenizer adds BOS itself (and its template writes one too)
        bos = spec["bos"]
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
                                                           special_tokens=[(bos, tok.token_to_id(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=spec["eos"], pad_token=spec["pad"],
                                 bos_token=spec["bos"], additional_special_tokens=[
                                     t for t in spec["special"] if t not in (spec["eos"], spec["pad"], spec["bos"])])
    hf.chat_template = spec["template"]
    hf.padding_side = "left" if arch == "qwen2" else "right"
    return hf


def build_stand_in(out_dir: str | Path, arch: str = "qwen2", *, hidden_size: int = 64, num_layers: int = 2,
                   num_heads: int = 4, num_kv_heads: int = 2, intermediate_size: int | None = None,
                   vocab_size: int = 1000, max_position_embeddings: int = 1024, tie_word_embeddings: bool | None = None,
                   seed: int = 0, corpus: list[str] | None = None, dtype: str = "float32",
                   embedding_rows: int | None = None) -> Path:
    """Write the stand-in checkpoint to `out_dir` (see the module doc); returns it.
    `embedding_rows`: pad the embedding to this many rows, as hub models do (Qwen2's 151,936
    rows hold a 151,665-token vocabulary); the tokenizer's size otherwise."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    spec = ARCHS[arch]
    tok = build_tokenizer(arch, vocab_size, corpus or default_corpus())
    ids = {t: tok.convert_tokens_to_ids(t) for t in spec["special"]}
    common = dict(vocab_size=max(len(tok), embedding_rows or 0), hidden_size=hidden_size, num_hidden_layers=num_layers,
                  num_attention_heads=num_heads, num_key_value_heads=num_kv_heads,
                  intermediate_size=intermediate_size or 4 * hidden_size,
                  max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-6, initializer_range=0.02,
                  tie_word_embeddings=(arch == "qwen2") if tie_word_embeddings is None else tie_word_embeddings)
    if arch == "qwen2":
        config = Qwen2Config(**common, rope_theta=1000000.0, use_sliding_window=False, bos_token_id=None,
                             eos_token_id=ids["<|endoftext|>"], pad_token_id=None)
        model_cls = Qwen2ForCausalLM
    else:
        config = LlamaConfig(**common, rope_theta=500000.0, bos_token_id=ids["<|begin_of_text|>"],
                             eos_token_id=ids["<|end_of_text|>"], pad_token_id=None)
        model_cls = LlamaForCausalLM
    config.dtype = dtype
    torch.manual_seed(seed)
    model = model_cls(config).to(getattr(torch, dtype))
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=[ids[t] for t in spec["stops"]],
        pad_token_id=ids[spec["pad"]] if spec["pad"] else None, do_sample=True, temperature=0.7, top_p=0.8,
        top_k=20, repetition_penalty=1.05)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    (out / "README.md").write_text(f"Stand-in {arch} checkpoint ({sum(p.numel() for p in model.parameters()):,} "
                                   "parameters, random weights) built by rlhf.models.stand_in.\n")
    return out


def parameter_count(path: str | Path) -> int:
    """Parameters stored in a checkpoint folder's safetensors files."""
    import math

    from safetensors import safe_open

    total = 0
    for f in Path(path).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            total += sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    return total


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m rlhf.models.stand_in", description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen2")
    ap.add_argument("--hidden-size", type=int, default=64)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--intermediate-size", type=int)
    ap.add_argument("--vocab-size", type=int, default=1000)
    ap.add_argument("--max-positions", type=int, default=1024)
    ap.add_argument("--embedding-rows", type=int, help="pad the embedding to this many rows (hub models do)")
    ap.add_argument("--qwen2-0.5b", dest="qwen05", action="store_true", help="Qwen2-0.5B's shape (random weights)")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    if a.qwen05:
        out = build_stand_in(a.out, "qwen2", vocab_size=a.vocab_size, seed=a.seed, **QWEN2_0_5B)
    else:
        out = build_stand_in(a.out, a.arch, hidden_size=a.hidden_size, num_layers=a.layers, num_heads=a.heads,
                             num_kv_heads=a.kv_heads, intermediate_size=a.intermediate_size, vocab_size=a.vocab_size,
                             max_position_embeddings=a.max_positions, seed=a.seed, embedding_rows=a.embedding_rows)
    print(json.dumps({"path": str(out), "arch": a.arch, "parameters": parameter_count(out)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
