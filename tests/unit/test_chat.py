"""Chat templates (`rlhf.models.chat`): rows rendered with a hub tokenizer's own template,
checked token by token against `apply_chat_template` and the template's own assistant
mask, on a Qwen2-style (ChatML, default system prompt, no BOS) and a Llama 3-style
(header tokens, BOS written by the template and added by the tokenizer) stand-in."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer, GenerationConfig

from rlhf.config import ModelConfig
from rlhf.data.readers import normalize_record
from rlhf.data.schema import PreferenceRow, PromptRow, SFTRow
from rlhf.models.batching import tokenize_pair
from rlhf.models.chat import ChatFormat, chat_format, targets_mask

CONVO = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 2?"},
         {"role": "assistant", "content": "4."}, {"role": "user", "content": "And the capital of France?"},
         {"role": "assistant", "content": "Paris."}]


def _template(tok, messages) -> tuple[list[int], list[int]]:
    """The template's own ids and assistant mask (its {% generation %} markers)."""
    out = tok.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def _through_last_stop(ids: list[int], fmt: ChatFormat) -> int:
    return max(i for i, t in enumerate(ids) if t in fmt.stops) + 1


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("turns", ["final", "all"])
def test_demonstration_ids_and_loss_mask_match_the_template(stand_ins, arch, turns):
    tok = AutoTokenizer.from_pretrained(stand_ins[arch])
    fmt = chat_format(tok, ModelConfig(), str(stand_ins[arch]), all_turns=turns == "all")
    assert fmt.templated and len(fmt.stops) == 2  # the tokenizer's EOS and generation_config's end-of-text
    row = normalize_record({"messages": CONVO}, "sft")
    ids, targets = fmt.demonstration(row)
    want_ids, want_mask = _template(tok, CONVO)
    end = _through_last_stop(want_ids, fmt)  # the answer ends at its end-of-turn token, where generation stops
    assert ids == want_ids[:end]
    mask = targets_mask(ids, targets)
    if turns == "final":  # only the last assistant span of the template's mask
        first = max(i for i in range(end) if want_mask[i] and not want_mask[i - 1])
        want_mask = [0] * first + want_mask[first:end]
    assert mask == want_mask[:end]
    assert sum(mask) > 0 and tok.decode([t for t, m in zip(ids, mask) if m]).replace(tok.eos_token, "|").count(
        "Paris.") == 1
    if arch == "llama":
        assert ids.count(tok.bos_token_id) == 1  # the template's BOS, not a second one from the tokenizer


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_prompts_end_in_the_generation_prompt_and_pairs_share_them(stand_ins, arch):
    tok = AutoTokenizer.from_pretrained(stand_ins[arch])
    fmt = chat_format(tok, ModelConfig(), str(stand_ins[arch]))
    turns = CONVO[:-1]
    prompt = normalize_record({"messages": turns}, "prompt")
    assert fmt.prompt_ids(prompt) == list(tok.apply_chat_template(turns, tokenize=True, add_generation_prompt=True,
                                                                  return_dict=True)["input_ids"])
    pref = normalize_record({"chosen": CONVO, "rejected": CONVO[:-1] + [{"role": "assistant", "content": "Rome."}]},
                            "preference")
    chosen, rejected = fmt.pair(pref)
    n = len(fmt.prompt_ids(prompt))
    assert chosen[:n] == rejected[:n] == fmt.prompt_ids(prompt)
    assert chosen[-1] in fmt.stops and rejected[-1] in fmt.stops
    assert fmt.lengths(pref) == (n, max(len(chosen), len(rejected)))


def test_plain_rows_are_wrapped_as_one_turn_or_kept_as_text(stand_ins):
    tok = AutoTokenizer.from_pretrained(stand_ins["qwen2"])
    row = SFTRow(prompt="reverse: a b c", completion=" c b a")
    wrapped = ChatFormat(tok, ModelConfig()).demonstration(row)
    as_turns = ChatFormat(tok, ModelConfig()).demonstration(
        SFTRow(prompt="x", completion="c b a", messages=normalize_record(
            {"messages": [{"role": "user", "content": "reverse: a b c"}, {"role": "assistant", "content": "c b a"}]},
            "sft").messages))
    assert wrapped == as_turns
    assert tok.decode(wrapped[0]).startswith("<|im_start|>system\nYou are a helpful assistant.")
    for mcfg in (ModelConfig(wrap_plain_rows=False), ModelConfig(chat_template="off")):
        assert ChatFormat(tok, mcfg).demonstration(row) == tokenize_pair(tok, row.prompt, row.completion)
    # HH text rows: their turns are parsed, so an instruct model sees its own format
    hh = normalize_record({"prompt": "\n\nHuman: reverse: a b c\n\nAssistant:", "completion": " c b a"}, "sft")
    assert ChatFormat(tok, ModelConfig()).demonstration(hh) == wrapped
    assert ChatFormat(tok, ModelConfig()).prompt_ids(PromptRow(prompt="reverse: a b c")) == wrapped[0][:wrapped[1]]


def test_a_tokenizer_without_a_template_keeps_hh_text(stand_ins):
    from rlhf.models import train_tokenizer

    tok = train_tokenizer(["reverse: a b c c b a"] * 10, 300)
    fmt = ChatFormat(tok, ModelConfig())
    row = PreferenceRow(prompt="reverse: a b", chosen=" b a", rejected=" a b")
    assert not fmt.templated
    assert fmt.pair(row) == (tokenize_pair(tok, row.prompt, row.chosen)[0], tokenize_pair(tok, row.prompt,
                                                                                          row.rejected)[0])


def test_generation_stops_on_any_stop_id_and_ignores_the_checkpoints_sampling_defaults(stand_ins, monkeypatch):
    import torch
    from transformers import AutoModelForCausalLM

    from rlhf.models.rollout import generate

    model = AutoModelForCausalLM.from_pretrained(stand_ins["qwen2"])
    tok = AutoTokenizer.from_pretrained(stand_ins["qwen2"])
    assert model.generation_config.repetition_penalty == 1.05 and model.generation_config.top_k == 20
    seen = {}
    real = model.generate

    def spy(*a, **kw):
        seen["cfg"] = kw["generation_config"]
        seen["model_default"] = model.generation_config
        return real(*a, **kw)

    monkeypatch.setattr(model, "generate", spy)
    torch.manual_seed(0)
    ro = generate(model, tok, [[5, 6, 7]] * 4, 6, 1.0, "cpu", logprobs=True)
    cfg: GenerationConfig = seen["cfg"]
    assert cfg.top_k == 0 and cfg.top_p == 1.0 and cfg.repetition_penalty in (None, 1.0)
    assert seen["model_default"] is cfg  # nothing of the checkpoint's defaults to merge in
    assert sorted(cfg.eos_token_id) == sorted([tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")])
    assert model.generation_config.repetition_penalty == 1.05  # restored afterwards
    # a response ends at the first of either stop id
    resp = ro.responses
    for row, m in zip(resp.tolist(), ro.response_mask.tolist()):
        n = sum(m)
        assert all(t not in cfg.eos_token_id for t in row[:n - 1])
