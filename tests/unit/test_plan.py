"""`rlhf plan` (rlhf.ops.plan): parameter counts exact for hub-shaped configs, the parts
each setting changes, and the verdict against a profile's GPUs."""

from __future__ import annotations

import json

import pytest
import yaml

from rlhf.cli import main
from rlhf.config import load_config
from rlhf.ops.plan import GIB, ModelShape, estimate_stage, gpu_memory, plan
from rlhf.ops.profiles import Profile

LLAMA3_8B = {"model_type": "llama", "vocab_size": 128256, "hidden_size": 4096, "num_hidden_layers": 32,
             "num_attention_heads": 32, "num_key_value_heads": 8, "intermediate_size": 14336,
             "tie_word_embeddings": False, "max_position_embeddings": 8192}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_parameter_count_is_exact_for_hub_shaped_checkpoints(stand_ins, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    shape = ModelShape.from_pretrained(stand_ins[arch])
    assert shape.params == sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(stand_ins[arch]).parameters())
    rm = AutoModelForSequenceClassification.from_pretrained(stand_ins[arch], num_labels=1)
    assert shape.classifier_params() == sum(p.numel() for p in rm.parameters())


def test_llama3_8b_shape_and_lora_count(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(LLAMA3_8B))
    shape = ModelShape.from_pretrained(tmp_path / "config.json")
    assert shape.params == 8_030_261_248  # Meta-Llama-3-8B
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    small = {**LLAMA3_8B, "vocab_size": 1000, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "intermediate_size": 160}
    s = ModelShape.from_config(small)
    peft_model = get_peft_model(LlamaForCausalLM(LlamaConfig(**{k: v for k, v in small.items() if k != "model_type"})),
                                LoraConfig(r=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    assert s.lora_params(8, ["q_proj", "k_proj", "v_proj", "o_proj"]) == sum(
        p.numel() for p in peft_model.parameters() if p.requires_grad)


def _cfg(*sets):
    return load_config("demo", overrides=["train.precision=bf16", "sft.batch_size=64", *sets])


def test_each_setting_lowers_the_part_it_should():
    shape = ModelShape.from_config(LLAMA3_8B)
    base = estimate_stage("sft", _cfg(), shape, world=8, seq_len=2048)
    zero3 = estimate_stage("sft", _cfg("distributed.zero_stage=3"), shape, world=8, seq_len=2048)
    assert zero3.parts["weights"] == pytest.approx(base.parts["weights"] / 8)
    offload = estimate_stage("sft", _cfg("distributed.offload_optimizer=true"), shape, world=8, seq_len=2048)
    assert offload.parts["optimizer"] == 0 and base.parts["optimizer"] > 0
    ckpt = estimate_stage("sft", _cfg("distributed.gradient_checkpointing=true"), shape, world=8, seq_len=2048)
    assert ckpt.parts["activations"] < base.parts["activations"] / 3  # the logits of a 128k vocabulary stay
    accum = estimate_stage("sft", _cfg("sft.grad_accum_steps=8"), shape, world=8, seq_len=2048)
    assert accum.parts["activations"] < base.parts["activations"] / 7
    lora = estimate_stage("sft", _cfg("model.lora.enabled=true"), shape, world=8, seq_len=2048)
    assert lora.parts["optimizer"] < base.parts["optimizer"] / 50
    fp32 = estimate_stage("sft", _cfg("train.precision=fp32", "distributed.engine=deepspeed"), shape, world=8,
                          seq_len=2048)
    assert fp32.parts["weights"] == pytest.approx(2 * base.parts["weights"])
    # PPO: four models, three with a LoRA policy (its reference is the policy without adapters)
    full_ppo = estimate_stage("ppo", _cfg("ppo.generation_batch_size=16"), shape, world=8)
    lora_ppo = estimate_stage("ppo", _cfg("ppo.generation_batch_size=16", "model.lora.enabled=true"), shape, world=8)
    assert "4 full models" in full_ppo.notes[0] and "3 full models" in lora_ppo.notes[0]


PROFILE = {"stages": {s: {"accelerator_type": "nvidia.com/gpu", "accelerator_count": 1,
                          "node_selector": {"cloud.google.com/gke-accelerator": "nvidia-h100-80gb"}}
                      for s in ("sft", "reward", "ppo", "eval")}}


def test_verdict_names_the_first_setting_to_change():
    profile = Profile.model_validate(PROFILE)
    assert gpu_memory(profile.stages["sft"]) == 80
    assert gpu_memory(Profile.model_validate({"stages": {"sft": {"accelerator_count": 1,
                                                                 "accelerator_memory": "24Gi"}}}).stages["sft"]) == 24
    rows, report = plan(_cfg(), ModelShape.from_config(LLAMA3_8B), profile, seq_len=2048)
    sft = rows[0]
    assert sft["fits"] is False and "sft.grad_accum_steps" in sft["verdict"], sft
    assert "DOES NOT FIT" in report
    small = ModelShape.from_config({**LLAMA3_8B, "hidden_size": 512, "num_hidden_layers": 4, "num_attention_heads": 8,
                                    "intermediate_size": 1024, "vocab_size": 32000})
    rows, _ = plan(_cfg("sft.grad_accum_steps=8"), small, profile, seq_len=512)
    assert all(r["fits"] for r in rows), rows


def test_cli_plan_and_the_compile_warning(tmp_path, capsys):
    (tmp_path / "llama.json").write_text(json.dumps(LLAMA3_8B))
    (tmp_path / "profile.yaml").write_text(yaml.safe_dump(PROFILE))
    assert main(["plan", "--model", str(tmp_path / "llama.json"), "--profile", str(tmp_path / "profile.yaml"),
                 "--set", "train.precision=bf16"]) == 1
    out = capsys.readouterr().out
    assert "8,030,261,248 parameters" in out and "DOES NOT FIT" in out
    assert main(["compile", "--output", str(tmp_path / "p.yaml"), "--profile", str(tmp_path / "profile.yaml"),
                 "--set", f"model.name_or_path={tmp_path}/llama.json"]) == 0
    err = capsys.readouterr().err
    assert "warning: sft: DOES NOT FIT" in err and (tmp_path / "p.yaml").is_file()
    assert main(["plan"]) == 0  # the demo's model built from the config, no profile
    assert "no GPU memory known" in capsys.readouterr().out
    assert main(["plan", "--model", str(tmp_path / "missing")]) == 2
    assert GIB == 2**30
