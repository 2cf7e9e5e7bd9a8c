"""LoRA in every stage: the reward/value heads on a peft-wrapped sequence classifier,
merged saving that plain transformers loads, and PPO's reference model as the policy
with its adapters disabled (one full model copy fewer)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

from rlhf.config import DistributedConfig, LoraConfig, ModelConfig, PPOConfig
from rlhf.models import pair_scores, save_model, sequence_scores, token_values, train_tokenizer
from rlhf.models.loading import apply_lora
from rlhf.models.rollout import generate, response_logprobs
from rlhf.stages.contract import Runtime
from rlhf.train.distributed import Dist

LORA = ModelConfig(lora=LoraConfig(enabled=True, r=4))
CPU = Dist(0, 1, 0, 0, torch.device("cpu"), False)


def _config(vocab: int = 300, **kw) -> LlamaConfig:
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128, pad_token_id=0,
                      eos_token_id=1, bos_token_id=None, **kw)
    cfg._attn_implementation = "sdpa"
    return cfg


def _perturb_adapters(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (the adapters change nothing); give them a real effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)


def test_reward_heads_work_on_a_lora_model_and_merge_on_save(tmp_path):
    """With LoRA on, the reward stage's scoring (sequence, per-token, packed pairs) goes
    through the adapters and the trained head (it raised AttributeError before), and
    the merged, saved model gives the same scores under plain transformers."""
    torch.manual_seed(0)
    model = apply_lora(LlamaForSequenceClassification(_config(num_labels=1)), LORA, "SEQ_CLS")
    _perturb_adapters(model)
    ids = torch.tensor([[5, 6, 7, 8, 9], [10, 11, 12, 0, 0]])
    mask = (ids != 0).long()
    scores = sequence_scores(model, ids, mask)
    assert scores.shape == (2,) and token_values(model, ids, mask).shape == (2, 5)
    c, r = pair_scores(model, [([5, 6, 7, 8, 9], [5, 6, 7, 20]), ([10, 11, 12], [10, 13])], 0, "cpu")
    torch.testing.assert_close(c[0], scores[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(c[1], scores[1], atol=1e-5, rtol=1e-5)
    plain = LlamaForSequenceClassification(_config(num_labels=1))
    plain.load_state_dict(model.get_base_model().state_dict(), strict=False)  # base weights without adapters
    assert not torch.allclose(sequence_scores(plain, ids, mask), scores, atol=1e-3)  # the adapters count
    tok = train_tokenizer(["hello world"] * 4, 300)
    out = save_model(model, tok, tmp_path / "rm")
    loaded = AutoModelForSequenceClassification.from_pretrained(out, use_safetensors=True)
    assert not any("lora" in k for k in loaded.state_dict())
    torch.testing.assert_close(sequence_scores(loaded, ids, mask), scores, atol=1e-5, rtol=1e-5)
    assert r.shape == (2,)


@pytest.fixture(scope="module")
def stage_inputs(tmp_path_factory):
    """What PPO loads: an SFT model and a reward model, saved the way the stages save them."""
    root = tmp_path_factory.mktemp("ppo_inputs")
    tok = train_tokenizer(["the quick brown fox jumps over the lazy dog"] * 20, 300)
    torch.manual_seed(0)
    save_model(LlamaForCausalLM(_config(len(tok))), tok, root / "sft")
    save_model(LlamaForSequenceClassification(_config(len(tok), num_labels=1)), tok, root / "reward")
    return {"sft/model": root / "sft", "reward/model": root / "reward"}


def _ppo_models(dirs, mcfg: ModelConfig):
    from rlhf.stages.ppo_models import load_models

    ctx = SimpleNamespace(config=PPOConfig(rollout_batch_size=8, minibatch_size=4), model=mcfg,
                          runtime=Runtime("cpu", None, DistributedConfig()),
                          store=SimpleNamespace(get_dir=lambda key: dirs[key]))
    return load_models(ctx, CPU, opt_steps=10)


def full_copies(models) -> int:
    """Distinct sets of transformer weights PPO holds (by the storage of their embeddings)."""
    def embedding(m):
        inner = m.get_base_model() if hasattr(m, "peft_config") else m
        return inner.get_input_embeddings().weight.data_ptr()

    held = [models.policy.module, models.value.module, models.reward] + ([models.ref] if models.ref is not None else [])
    return len({embedding(m) for m in held})


def test_lora_ppo_holds_one_full_copy_fewer_and_its_reference_is_sft(stage_inputs):
    full = _ppo_models(stage_inputs, ModelConfig())
    lora = _ppo_models(stage_inputs, LORA)
    assert full_copies(full) == 4 and full.ref is not None  # policy, reference, value, reward
    assert full_copies(lora) == 3 and lora.ref is None  # the reference is the policy without its adapters
    assert hasattr(lora.value.module, "peft_config")  # the value model trains adapters too
    trainable = sum(p.numel() for p in lora.policy.params)
    assert trainable < 0.2 * sum(p.numel() for p in lora.policy.module.parameters())

    _perturb_adapters(lora.policy.module)  # as after some PPO steps
    torch.manual_seed(0)
    ro = generate(lora.policy.module, lora.tok, [[5, 6, 7], [8, 9]], 5, 1.0, "cpu")
    m = ro.response_mask.bool()
    policy_before = response_logprobs(lora.policy.module, ro, 1.0)[m]
    ref = lora.reference_logprobs(ro, 1.0)
    sft = response_logprobs(full.ref, ro, 1.0)  # the separate SFT copy of a full run
    torch.testing.assert_close(ref[m], sft[m], atol=1e-5, rtol=1e-5)
    policy_after = response_logprobs(lora.policy.module, ro, 1.0)[m]
    assert not torch.allclose(policy_before, sft[m], atol=1e-3)  # the adapters count...
    torch.testing.assert_close(policy_after, policy_before)  # ...and are on again after the reference forward
