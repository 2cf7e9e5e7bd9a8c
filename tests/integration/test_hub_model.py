"""A hub-shaped checkpoint (`rlhf.models.stand_in`: Qwen2 / Llama 3 architecture, a
tokenizer with its chat template, safetensors, generation_config.json) through every
stage via `model.name_or_path`: from a local folder and from s3://, on conversational
data, in bf16 (autocast on CPU)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow

from rlhf.cli import main

TINY = ["--preset", "tiny", "--set", "num_threads=1"]
STAGES = ["prep", "sft", "reward", "ppo", "eval"]
CONVO = [("What is the capital of France?", "Paris."), ("Name a primary colour.", "Red."), ("What is 2 + 2?", "4."),
         ("Say hello.", "Hello!"), ("Which planet is red?", "Mars."), ("Opposite of hot?", "Cold.")]


def conversational_data(folder: Path) -> list[str]:
    """Multi-turn SFT conversations, conversational preference pairs and prompts."""
    folder.mkdir(parents=True, exist_ok=True)
    sft, pref, prompts = [], [], []
    for i in range(48):
        q, a = CONVO[i % len(CONVO)]
        q2, a2 = CONVO[(i + 1) % len(CONVO)]
        turns = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"{q} (case {i})"},
                 {"role": "assistant", "content": a}, {"role": "user", "content": q2}]
        sft.append({"messages": turns + [{"role": "assistant", "content": a2}]})
        pref.append({"prompt": turns, "chosen": [{"role": "assistant", "content": a2}],
                     "rejected": [{"role": "assistant", "content": "I do not know, sorry."}]})
        prompts.append({"messages": turns})
    paths = {}
    for name, rows in (("sft", sft), ("preference", pref), ("prompt", prompts)):
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return ["--set", f"data.sft_path={paths['sft']}", "--set", f"data.preference_path={paths['preference']}",
            "--set", f"data.prompt_path={paths['prompt']}", "--set", "data.eval_fraction=0.25"]


def rlhf(home: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "RLHF_HOME": str(home), "RLHF_QUIET": "1", **(env or {})}
    if not env or "MLFLOW_TRACKING_URI" not in env:
        full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=full, capture_output=True, text=True,
                          timeout=900)


def test_a_hub_checkpoint_with_its_chat_template_runs_every_stage_and_registers(stand_ins, tmp_path):
    """`rlhf run --preset tiny --set model.name_or_path=<Qwen2 stand-in>` on conversational
    data: every stage, the gate, and registered models that keep the chat template."""
    name = "hub-e2e"
    r = rlhf(tmp_path, "run", *TINY, "--set", f"model.name_or_path={stand_ins['qwen2']}",
             *conversational_data(tmp_path / "data"), "--set", "gate.min_decisive_win_rate=0.0",
             "--set", f"tracking.registered_model={name}", "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    run = tmp_path / "run"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["registered_versions"] == {f"{name}-policy": "1", f"{name}-reward": "1", f"{name}-sft": "1"}
    report = json.loads(next(tmp_path.glob("run/../**/prep/report.json")).read_text())
    assert report["tokenizer"] == {"trained": False, "vocab_size": report["tokenizer"]["vocab_size"],
                                   "chat_template": True}
    assert report["length_limits"] == {"max_total_tokens": 1024, "max_prompt_tokens": 512}  # the model's context
    # the registered policy is a plain transformers checkpoint with its template and stop ids
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    gen = mlflow.transformers.load_model(f"models:/{name}-policy/1")
    assert gen.tokenizer.chat_template and gen.tokenizer.eos_token == "<|im_end|>"
    prompt = gen.tokenizer.apply_chat_template([{"role": "user", "content": "Say hello."}], tokenize=False,
                                               add_generation_prompt=True)
    assert isinstance(gen(prompt, max_new_tokens=4, do_sample=False)[0]["generated_text"], str)
    saved = json.loads((run / "ppo/model/generation_config.json").read_text())
    assert len(saved["eos_token_id"]) == 2


def test_llama3_style_checkpoint_all_assistant_turns(stand_ins, tmp_path):
    """The Llama 3 stand-in (BOS from the template, header tokens), with the SFT loss on
    every assistant turn."""
    extra = ["--set", f"model.name_or_path={stand_ins['llama']}", "--set", "sft.assistant_turns=all",
             *conversational_data(tmp_path / "data")]
    for stage in STAGES:
        assert main(["stage", stage, *TINY, *extra, "--output", str(tmp_path / "out"), "--quiet"]) == 0, stage
    assert (tmp_path / "out/ppo/model/_COMMITTED").is_file()


def test_a_hub_checkpoint_from_s3(stand_ins, local_stack, s3_store, tmp_path):
    """model.name_or_path=s3://...: the folder is fetched through the store (SeaweedFS here)."""
    s3_store.put_dir(stand_ins["qwen2"], "hub/qwen2-stand-in")
    uri = s3_store.uri("hub/qwen2-stand-in")
    args = [*TINY, "--set", f"model.name_or_path={uri}", "--set", "sft.max_steps=3", "--set",
            "tracking.log_models=false", "--output", str(tmp_path / "out")]
    for stage in ("prep", "sft"):
        r = rlhf(tmp_path, "stage", stage, *args, env=local_stack.env())
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    report = json.loads(next((tmp_path / "out").glob("**/prep/report.json")).read_text())
    assert report["tokenizer"]["chat_template"] and (tmp_path / "out/sft/model/_COMMITTED").is_file()
    assert json.loads((tmp_path / "out/sft/model/config.json").read_text())["model_type"] == "qwen2"


def test_bf16_trains_every_stage_and_follows_the_fp32_loss_curve(stand_ins, tmp_path):
    """train.precision=bf16 on CPU (autocast, fp32 master weights): all stages train on the
    stand-in, and the first 50 SFT losses stay within 2% of the fp32 run's."""
    curves = {}
    for precision in ("fp32", "bf16"):
        out = tmp_path / precision
        args = [*TINY, "--set", f"model.name_or_path={stand_ins['qwen2']}", "--set", f"train.precision={precision}",
                "--set", "sft.max_epochs=10", "--set", "sft.max_steps=50", "--set", "sft.eval_every=1000",
                "--set", "sft.patience=1000", "--set", "tracking.log_models=false",
                "--set", f"tracking.experiment=precision-{precision}", "--output", str(out), "--quiet"]
        for stage in (STAGES if precision == "bf16" else ["prep", "sft"]):
            assert main(["stage", stage, *args]) == 0, (precision, stage)
        mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
        run = next(r for r in mlflow.search_runs(experiment_names=[f"precision-{precision}"], output_format="list")
                   if r.data.tags["rlhf.stage"] == "sft")
        assert run.data.params["train.precision"] == precision
        history = mlflow.MlflowClient().get_metric_history(run.info.run_id, "sft/loss")
        curves[precision] = [m.value for m in sorted(history, key=lambda m: m.step)]
    assert len(curves["fp32"]) == len(curves["bf16"]) == 50
    assert curves["fp32"][-1] < 0.8 * curves["fp32"][0]  # it learns
    worst = max(abs(b - f) / f for f, b in zip(curves["fp32"], curves["bf16"]))
    print(f"bf16 vs fp32, first 50 SFT losses: largest relative difference {worst:.3%} "
          f"(fp32 {curves['fp32'][0]:.4f} -> {curves['fp32'][-1]:.4f}, bf16 {curves['bf16'][0]:.4f} -> "
          f"{curves['bf16'][-1]:.4f})")
    assert worst < 0.02, f"bf16 differs from fp32 by up to {worst:.2%}"
    assert curves["bf16"] != curves["fp32"]  # it did compute in bf16
    assert (tmp_path / "bf16/ppo/model/_COMMITTED").is_file() and (tmp_path / "bf16/eval/result.json").is_file()


def test_a_row_the_chat_template_refuses_fails_prep_naming_the_data(stand_ins, tmp_path):
    """A template that raises on some conversations (as Llama 2's does for roles that do not
    alternate): prep fails with a DataError naming the data, the row and the fix, writing nothing."""
    import shutil

    model = tmp_path / "strict"
    shutil.copytree(stand_ins["qwen2"], model)
    template = ("{% for m in messages %}{% if m['role'] == 'system' %}"
                "{{ raise_exception('System role not supported') }}{% endif %}"
                "{{ m['role'] + ': ' + m['content'] + '\n' }}{% endfor %}"
                "{% if add_generation_prompt %}{{ 'assistant: ' }}{% endif %}")
    cfg_path = model / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.pop("chat_template", None)
    cfg_path.write_text(json.dumps(cfg))
    (model / "chat_template.jinja").write_text(template)
    out = tmp_path / "out"
    r = rlhf(tmp_path, "stage", "prep", *TINY, "--set", f"model.name_or_path={model}",
             *conversational_data(tmp_path / "data"), "--output", str(out))
    assert r.returncode != 0
    assert "the model's chat template cannot render the row" in r.stderr and "System role not supported" in r.stderr
    assert "model.chat_template=off" in r.stderr and str(tmp_path / "data") in r.stderr
    assert not (out / "prep" / "_COMMITTED").exists()
