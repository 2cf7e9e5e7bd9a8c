"""Models: the byte-level tokenizer, seeded builds, scalar heads, safe loading."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForSequenceClassification

from rlhf.config import ModelConfig
from rlhf.models import (
    ModelLoadError,
    build_causal_lm,
    last_token_index,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    Segment,
    pack,
    pair_scores,
    Group,
    group_scores,
    tree_segment,
    position_ids_from_mask,
    resolve_source,
    save_model,
    sequence_scores,
    token_values,
    train_tokenizer,
)
from rlhf.models import loading

CORPUS = [
    "reverse: a b c d", " d c b a", "sort: 3 1 2 17", " 1 2 3 17", " sure , here it is : a b",
    " a b , hope this helps", "reverse: h g f e", " e f g h",
] * 40

TINY = ModelConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, vocab_size=300)


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tok):
    """A tiny causal LM saved with save_model, and its weights."""
    model = build_causal_lm(TINY, tok, seed=0)
    out = save_model(model, tok, tmp_path_factory.mktemp("saved") / "model")
    return out, {k: v.clone() for k, v in model.state_dict().items()}


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_special_ids(tok):
    assert tok.pad_token_id == 0
    assert tok.eos_token_id == 1
    assert tok.convert_ids_to_tokens([0, 1]) == ["<pad>", "<eos>"]
    assert tok.bos_token_id is None
    assert tok.padding_side == "right"


def test_tokenizer_vocab_size_bounded(tok):
    assert len(tok) <= 300
    assert len(tok) > 256  # the full byte alphabet plus specials plus some merges


@pytest.mark.parametrize("text", [
    "reverse: a b c d", " d c b a , hope this helps", "sure , here it is : d c",
    "héllo wörld 日本語 🤖 — ünseen!", "a  b\n\tc  ", " it 's don 't", "QQQ ZZZ ~`^|{}", "",
])
def test_tokenizer_round_trips_any_text(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text


def test_tokenizer_adds_no_special_tokens(tok):
    # prompt_ids + completion_ids must be exactly the concatenation.
    p, c = "reverse: a b", " b a"
    ids_p, ids_c = tok(p)["input_ids"], tok(c)["input_ids"]
    assert 0 not in ids_p + ids_c and 1 not in ids_p + ids_c
    assert tok.decode(ids_p + ids_c) == p + c


def test_tokenizer_learns_merges(tok):
    # Frequent corpus text takes fewer tokens than bytes.
    text = " sure , here it is : a b"
    assert len(tok(text)["input_ids"]) < len(text.encode())


def test_tokenizer_saved_and_reloaded(tmp_path):
    tok = train_tokenizer(CORPUS, vocab_size=280, out_dir=tmp_path / "tok")
    again = load_tokenizer(str(tmp_path / "tok"), ModelConfig())
    text = " a b , done — ünseen 🤖"
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.decode(again(text)["input_ids"]) == text
    assert again.pad_token_id == 0 and again.eos_token_id == 1


# ----------------------------------------------------------------------------- build


def test_build_is_deterministic_for_seed(tok):
    a = build_causal_lm(TINY, tok, seed=3)
    b = build_causal_lm(TINY, tok, seed=3)
    c = build_causal_lm(TINY, tok, seed=4)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_build_shapes_follow_config_and_tokenizer(tok):
    m = build_causal_lm(TINY, tok, seed=0)
    assert m.config.vocab_size == len(tok)
    assert m.get_input_embeddings().weight.shape == (len(tok), 32)
    assert m.get_output_embeddings().weight.shape == (len(tok), 32)
    assert m.config.num_hidden_layers == 1
    assert m.config.num_attention_heads == 2
    assert m.config.intermediate_size == 64
    assert m.config.pad_token_id == 0 and m.config.eos_token_id == 1
    logits = m(input_ids=torch.tensor([[2, 3, 4]])).logits
    assert logits.shape == (1, 3, len(tok))


# ----------------------------------------------------------------------------- heads


def test_last_token_index_right_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    assert last_token_index(mask).tolist() == [2, 4, 0]


def test_last_token_index_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [4, 4, 4]


def test_last_token_index_bool_mask():
    mask = torch.tensor([[True, True, False], [False, True, True]])
    assert last_token_index(mask).tolist() == [1, 2]


def test_position_ids_skip_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    pos = position_ids_from_mask(mask)
    assert pos.tolist() == [[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]]
    # Right padding: real tokens still count from 0.
    assert position_ids_from_mask(torch.tensor([[1, 1, 0]])).tolist()[0][:2] == [0, 1]


@pytest.fixture(scope="module")
def rm():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=300, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=64,
                      num_labels=1, pad_token_id=0)
    cfg._attn_implementation = "sdpa"
    model = LlamaForSequenceClassification(cfg).eval()
    with torch.no_grad():  # a head that is not ~0, so differences show
        model.score.weight.normal_(0, 1.0)
    return model


SEQS = [[5, 6, 7, 8, 9], [10, 11, 12], [13]]


def _pad(seqs, side):
    T = max(map(len, seqs))
    ids, mask = [], []
    for s in seqs:
        pad = [0] * (T - len(s))
        ids.append(pad + s if side == "left" else s + pad)
        mask.append([0] * len(pad) + [1] * len(s) if side == "left" else [1] * len(s) + [0] * len(pad))
    return torch.tensor(ids), torch.tensor(mask)


def _reference(model, seq):
    """Head applied at the last token of the unpadded sequence."""
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state
        return model.score(hidden[0, -1]).squeeze(-1)


def test_sequence_scores_is_head_at_last_real_token(rm):
    ids, mask = _pad(SEQS, "right")
    with torch.no_grad():
        scores = sequence_scores(rm, ids, mask)
    assert scores.shape == (3,)
    ref = torch.stack([_reference(rm, s) for s in SEQS])
    torch.testing.assert_close(scores, ref, atol=1e-5, rtol=1e-5)
    # Not just any position: the last padded position gives something else.
    with torch.no_grad():
        at_end = token_values(rm, ids, mask)[:, -1]
    assert not torch.allclose(at_end[1:], ref[1:], atol=1e-3)


def test_sequence_scores_same_for_left_and_right_padding(rm):
    with torch.no_grad():
        right = sequence_scores(rm, *_pad(SEQS, "right"))
        left = sequence_scores(rm, *_pad(SEQS, "left"))
    assert torch.isfinite(left).all()
    torch.testing.assert_close(left, right, atol=1e-5, rtol=1e-5)


def test_token_values_shape_and_dtype(rm):
    ids, mask = _pad(SEQS, "left")
    with torch.no_grad():
        v = token_values(rm, ids, mask)
    assert v.shape == ids.shape
    assert v.dtype == torch.float32


def test_head_missing_raises(tok):
    lm = build_causal_lm(TINY, tok, seed=0)
    ids, mask = _pad(SEQS, "right")
    with pytest.raises(TypeError, match="scalar head"):
        sequence_scores(lm, ids, mask)


# ----------------------------------------------------------------------------- loading


def test_trust_remote_code_off_by_default():
    assert ModelConfig().trust_remote_code is False


def test_pickle_only_folder_refused(tmp_path, saved):
    d = tmp_path / "pickle_model"
    d.mkdir()
    (d / "config.json").write_text((saved[0] / "config.json").read_text())
    torch.save({"x": torch.zeros(1)}, d / "pytorch_model.bin")
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_causal_lm(str(d), ModelConfig())
    with pytest.raises(ModelLoadError, match="safetensors"):
        load_reward_model(str(d), ModelConfig(), pad_token_id=0)


def test_save_model_writes_safetensors_only(saved):
    out, _ = saved
    assert list(out.glob("*.safetensors"))
    assert not list(out.glob("*.bin")) and not list(out.glob("*.pt"))
    assert (out / "tokenizer.json").is_file()


def test_saved_model_loads_back_equal(saved):
    out, weights = saved
    model = load_causal_lm(str(out), ModelConfig())
    sd = model.state_dict()
    assert sd.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(sd[k], v), k


def test_reward_model_from_causal_lm(saved):
    out, weights = saved
    rm = load_reward_model(str(out), ModelConfig(), pad_token_id=0)
    assert rm.config.num_labels == 1
    assert rm.config.pad_token_id == 0
    assert rm.score.weight.shape == (1, 32)
    # The backbone is the SFT model's.
    torch.testing.assert_close(rm.model.embed_tokens.weight, weights["model.embed_tokens.weight"])


def test_loaded_tokenizer_matches(saved, tok):
    out, _ = saved
    again = load_tokenizer(str(out), ModelConfig())
    text = "reverse: a b c , ünseen"
    assert again(text)["input_ids"] == tok(text)["input_ids"]


def test_load_passes_trust_remote_code_from_config(monkeypatch, saved):
    seen = []
    real = loading.AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(loading.AutoModelForCausalLM, "from_pretrained", spy)
    load_causal_lm(str(saved[0]), ModelConfig())
    assert seen[-1]["trust_remote_code"] is False
    assert seen[-1]["use_safetensors"] is True


def test_folder_without_weights_is_model_load_error(tmp_path, saved):
    (tmp_path / "config.json").write_text((saved[0] / "config.json").read_text())
    with pytest.raises(ModelLoadError, match="cannot load"):
        load_causal_lm(str(tmp_path), ModelConfig())


def test_empty_folder_is_model_load_error(tmp_path):
    with pytest.raises(ModelLoadError):
        load_causal_lm(str(tmp_path), ModelConfig())


def test_s3_source_needs_store():
    with pytest.raises(ModelLoadError, match="store"):
        resolve_source("s3://bucket/model")
    assert resolve_source("some/local/path") == "some/local/path"


PAIRS = [
    ([5, 6, 7, 8, 9, 1], [5, 6, 7, 9, 8, 1]),  # swapped items: 3 tokens shared
    ([10, 11, 12, 1], [10, 11, 13, 14, 15, 1]),  # different lengths
    ([20, 21, 1], [20, 21, 1]),  # identical: each side still keeps its last token
    ([30, 1], [31, 32, 33, 1]),  # nothing shared
]


def test_tree_segment_layout():
    seg, (ic, ir) = tree_segment(list(PAIRS[0]))
    assert seg.ids == [5, 6, 7, 8, 9, 1, 9, 8, 1]  # chosen, then rejected after the shared "5 6 7"
    assert seg.pos == [0, 1, 2, 3, 4, 5, 3, 4, 5] and (ic, ir) == (5, 8)
    assert seg.mask[6, :3].all() and not seg.mask[6, 3:6].any() and seg.mask[6, 6]  # prefix and itself only
    seg, ends = tree_segment(list(PAIRS[2]))  # identical: one path, scored at the same token
    assert seg.ids == [20, 21, 1] and seg.pos == [0, 1, 2] and ends == [2, 2]
    # four answers to one prompt: each distinct prefix once; a sequence may end inside another
    seg, ends = tree_segment([[3, 4, 5, 1], [3, 4, 6, 1], [3, 4, 5, 7, 1], [3, 4]])
    assert seg.ids == [3, 4, 5, 1, 6, 1, 7, 1] and seg.pos == [0, 1, 2, 3, 2, 3, 3, 4] and ends == [3, 5, 7, 1]
    anc = {i: set(torch.nonzero(seg.mask[i]).flatten().tolist()) for i in range(len(seg.ids))}
    assert anc[5] == {0, 1, 4, 5} and anc[7] == {0, 1, 2, 6, 7} and anc[1] == {0, 1}
    assert torch.equal(seg.mask, seg.mask.tril())  # ancestors come first


def test_pack_first_fit_with_block_diagonal_attention():
    segs = [Segment([1] * 6), Segment([2] * 2), Segment([3] * 3), Segment([4] * 4)]
    b = pack(segs, pad_id=0)
    assert b["input_ids"].shape == (3, 6)  # 6 | 4+2 | 3 (first-fit decreasing into rows of the longest)
    assert b["where"] == [(0, 0), (1, 4), (2, 0), (1, 0)]
    assert b["input_ids"][1].tolist() == [4, 4, 4, 4, 2, 2] and b["position_ids"][1].tolist() == [0, 1, 2, 3, 0, 1]
    m = b["attention_mask"][1, 0]
    assert m[4, 4] and not m[4, :4].any() and m[5, 4:6].all()  # the second sequence sees only itself
    assert b["attention_mask"][2, 0, 4].tolist() == [False] * 4 + [True, False]  # a pad sees only itself
    assert pack(segs, pad_id=0, packed=False)["input_ids"].shape == (4, 6)  # one segment per row


@pytest.mark.parametrize("share,packed", [(True, True), (True, False), (False, True)])
def test_pair_scores_equal_separate_forwards_with_gradients(rm, share, packed):
    """One packed forward gives each side's score (and gradient) of its own forward."""
    model = rm.train()
    try:
        c, r = pair_scores(model, PAIRS, pad_id=0, device="cpu", share_prefix=share, packed=packed)
        (c.sum() - 2 * r.sum()).backward()
        packed_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref_c = torch.stack([_reference_grad(model, a) for a, _ in PAIRS])
        ref_r = torch.stack([_reference_grad(model, b) for _, b in PAIRS])
        (ref_c.sum() - 2 * ref_r.sum()).backward()
        torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r, ref_r, atol=1e-5, rtol=1e-5)
        for g, p in zip(packed_grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    finally:
        model.zero_grad()
        model.eval()


GROUPS = [
    Group([[3, 4, 5, 1], [3, 4, 6, 1], [3, 4, 5, 7, 1], [3, 4]], [(0, 1), (0, 2), (2, 1), (3, 1), (0, 3), (2, 3)]),
    Group([[8, 9, 1], [8, 1]], [(1, 0)]),
]


@pytest.mark.parametrize("share,packed", [(True, True), (True, False), (False, True)])
def test_group_scores_equal_separate_forwards_with_gradients(rm, share, packed):
    """Every sequence of a group is scored once in one forward, with its own forward's
    score and gradient, and each pair takes its two sides' scores."""
    model = rm.train()
    try:
        c, r = group_scores(model, GROUPS, pad_id=0, device="cpu", share_prefix=share, packed=packed)
        assert c.shape == r.shape == (7,)
        (c.sum() - 2 * r.sum()).backward()
        grouped_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        ref = [[_reference_grad(model, q) for q in g.seqs] for g in GROUPS]
        ref_c = torch.stack([ref[k][i] for k, g in enumerate(GROUPS) for i, _ in g.pairs])
        ref_r = torch.stack([ref[k][j] for k, g in enumerate(GROUPS) for _, j in g.pairs])
        (ref_c.sum() - 2 * ref_r.sum()).backward()
        torch.testing.assert_close(c, ref_c, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(r, ref_r, atol=1e-5, rtol=1e-5)
        for g, p in zip(grouped_grads, model.parameters()):
            torch.testing.assert_close(g, p.grad, atol=1e-5, rtol=1e-4)
    finally:
        model.zero_grad()
        model.eval()


def _reference_grad(model, seq):
    hidden = model.model(input_ids=torch.tensor([seq])).last_hidden_state
    return model.score(hidden[0, -1]).squeeze(-1)
