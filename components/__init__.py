"""KFP v2 components: one per stage, thin wrappers around `rlhf.runs` / `rlhf.stages`.

Each is a lightweight Python component on the training image, with
`install_kfp_package=False` (the image already has kfp and this package), so
`kfp.local.SubprocessRunner` runs the very same functions on one machine. A body
only maps KFP inputs/outputs to one engine call; KFP serialises the function source
alone, so every import is inside the body.

Outputs are small manifests (store URI, sha256, MLflow run and model ids); models,
checkpoints and datasets stay in the artifact store and never pass through the
KFP launcher. So that a run explains itself in the Kubeflow UI, each step also
outputs its headline numbers (`metrics`: dsl.Metrics), the reward step its held-out
pairs as a confusion matrix and ROC curve (`heldout_pairs`: dsl.ClassificationMetrics)
and eval a Markdown report (`report`: the gate's verdict and reasons, win rates,
KL, tax, champion, PPO's curves, samples); `rlhf.runs.publish_outputs` fills them.

Installed as the `rlhf.components` package (see pyproject.toml).
"""


from typing import List, NamedTuple

from kfp import dsl
from kfp.dsl import ClassificationMetrics, Dataset, Input, Markdown, Metrics, Model, Output

from rlhf.adapters.settings import Settings

IMAGE = Settings.from_env().image
"""The training image (RLHF_IMAGE at compile time); see images/."""


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def start_run(preset: str, config_json: str, base_model: str, sft_data: str, preference_data: str,
              prompt_data: str, seed: int, sft_max_steps: int, reward_epochs: int, ppo_updates: int,
              kl_coef: float, min_decisive_win_rate: float, max_kl: float, champion_margin: float,
              experiment_name: str, registered_model_name: str, artifact_root: str, run_name: str,
              kfp_run_id: str) -> NamedTuple("Started", config_json=str, prep_config_json=str, run_root=str,
                                             parent_run_id=str, data_key=str):
    """Resolve and validate the config, fingerprint the data, open the MLflow parent run.

    The parameters are the rows of rlhf.params.PARAMS (a test keeps them equal) plus
    kfp_run_id; KFP needs them literal here, the body takes them from locals()."""
    given = dict(locals())
    from rlhf import params, runs

    out = runs.start(preset, config_json, params.overrides(given), artifact_root, run_name, kfp_run_id)
    return (out["config_json"], out["prep_config_json"], out["run_root"], out["parent_run_id"], out["data_key"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def prep_data(prep_config_json: str, artifact_root: str, data_key: str, dataset: Output[Dataset],
              metrics: Output[Metrics]):
    """Read, clean, split and tokenise the data into <artifact_root>/_datasets/<data_key>."""
    from rlhf import runs

    runs.prep(prep_config_json, artifact_root, data_key, dataset=dataset, metrics=metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_sft(config_json: str, run_root: str, parent_run_id: str, dataset: Input[Dataset], model: Output[Model],
              metrics: Output[Metrics]):
    """Supervised fine-tuning on demonstrations (resumes from its checkpoints on retry)."""
    from rlhf import runs

    runs.stage("sft", config_json, run_root, parent_run_id, dataset.metadata["root"], manifest=model, metrics=metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_reward(config_json: str, run_root: str, parent_run_id: str, dataset: Input[Dataset],
                 sft_model: Input[Model], model: Output[Model], metrics: Output[Metrics],
                 heldout_pairs: Output[ClassificationMetrics]):
    """Reward model on preference comparisons, initialised from SFT."""
    from rlhf import runs

    runs.stage("reward", config_json, run_root, parent_run_id, dataset.metadata["root"], manifest=model,
               metrics=metrics, heldout_pairs=heldout_pairs)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def train_ppo(config_json: str, run_root: str, parent_run_id: str, dataset: Input[Dataset],
              sft_model: Input[Model], reward_model: Input[Model], model: Output[Model], metrics: Output[Metrics]):
    """PPO against the reward model with a KL penalty to SFT."""
    from rlhf import runs

    runs.stage("ppo", config_json, run_root, parent_run_id, dataset.metadata["root"], manifest=model, metrics=metrics)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate(config_json: str, run_root: str, parent_run_id: str, dataset: Input[Dataset],
             policy: Input[Model], metrics: Output[Metrics], report: Output[Markdown]) -> bool:
    """Policy vs SFT and vs the current champion on held-out prompts; returns the gate verdict."""
    from rlhf import runs

    return bool(runs.stage("eval", config_json, run_root, parent_run_id, dataset.metadata["root"], metrics=metrics,
                           report=report)["gate/passed"])


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def promote(config_json: str, run_root: str, parent_run_id: str, dataset: Input[Dataset],
            policy: Input[Model], move_alias: bool, summary: Output[Dataset]):
    """Register <name>-sft/-reward/-policy; with move_alias=True move @champion to the policy."""
    from rlhf import runs

    runs.stage("promote", config_json, run_root, parent_run_id, dataset.metadata["root"], promote=move_alias,
               manifest=summary)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def finish_run(preset: str, config_json: str, experiment_name: str, registered_model_name: str,
               artifact_root: str, run_name: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit handler: close the MLflow parent run FINISHED/FAILED; after a failure, remove
    the versions this run registered so the registry is as the run found it."""
    given = dict(locals())
    from rlhf import params, runs

    runs.finish(preset, config_json, params.overrides(given), artifact_root, run_name, kfp_run_id,
                status.state, status.error_message or "")


# ----------------------------------------------------------------------------- rlhf experiment (pipelines/experiment.py)
# Loop items are plain dicts (the experiment's folder and the seed or arm); everything
# else is in the experiment's store, so no step passes a task output into a loop.


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def experiment_start(kind: str, preset: str, quick: bool, seeds: str, overrides: str, config_json: str,
                     artifact_root: str, run_name: str, kfp_run_id: str) -> List[dict]:
    """Validate and record the experiment, open its MLflow parent run; one item per seed."""
    from rlhf import runs

    return runs.experiment_start(kind, preset, quick, seeds, overrides, config_json, artifact_root, run_name,
                                 kfp_run_id)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def experiment_bases(spec: dict) -> List[dict]:
    """One seed's shared base (prep, SFT, reward model); one item per arm."""
    from rlhf import runs

    return runs.experiment_bases(spec)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def experiment_arm(spec: dict, result: Output[Metrics]):
    """One arm: its overrides over its base (PPO, eval); resumes from its checkpoints on retry."""
    from rlhf import runs

    for k, v in runs.experiment_arm(spec).items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            result.log_metric(k.replace("/", "_"), v)


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def experiment_report(artifact_root: str, run_name: str, kfp_run_id: str, status: dsl.PipelineTaskFinalStatus):
    """Exit step: the table, plot and claims into the store and the MLflow parent run
    (closed FINISHED), or the parent run closed FAILED."""
    from rlhf import runs

    runs.experiment_finish(artifact_root, run_name, kfp_run_id, status.state, status.error_message or "")
