"""The RLHF DAG as one KFP v2 pipeline, and its compiler.

    start -> prep -> SFT -> reward -> PPO -> eval -> If(gate) promote / Else register only
    all inside an ExitHandler whose exit task closes the MLflow parent run

The same pipeline function is compiled to YAML for Kubeflow (`rlhf compile`) and run
on one machine by `kfp.local.SubprocessRunner` (`rlhf run`, `pipelines/local/`). Its
parameters come from the table `rlhf.params.PARAMS`.
"""

from kfp import dsl

from rlhf import components as c
from rlhf import params
from rlhf.ops.profiles import SCRATCH_DIRS, STEP_LABEL, Profile, StageSpec
from rlhf.adapters.settings import Settings

TRAINING_RETRIES = 2
# the step of a multi-node stage only submits and watches its Trainer job: (request, limit)
LAUNCHER_CPU, LAUNCHER_MEMORY = ("1", "2"), ("2Gi", "4Gi")
LAUNCHER_MARGIN_S = 900  # it outlives its Trainer job's deadline, to report how the job ended
RETRY_BACKOFF = Settings.from_env().retry_backoff
FINISH_RETRIES = 5


def _training(task: dsl.PipelineTask, name: str) -> dsl.PipelineTask:
    """Training steps: retried (they resume from their checkpoints in the store), never
    cached (each run must produce its own, tracked models)."""
    task.set_display_name(name)
    task.set_caching_options(False)
    task.set_retry(num_retries=TRAINING_RETRIES, backoff_duration=RETRY_BACKOFF, backoff_factor=2.0)
    return task


def _place(task: dsl.PipelineTask, stage: str, profile: Profile | None) -> dsl.PipelineTask:
    """Apply a cluster profile to one step (kfp.kubernetes; ignored by kfp.local), and
    the hardening every cluster step gets. None (kfp.local's pipeline): nothing."""
    if profile is None:
        return task
    from kfp import kubernetes as k8s

    _harden(task, profile)
    spec = profile.for_stage(stage)
    if spec.nodes > 1:
        spec = _launch_trainjob(task, stage, profile)
    for key, value in spec.node_selector.items():
        k8s.add_node_selector(task, key, value)
    for t in spec.tolerations:
        k8s.add_toleration(task, key=t.key, operator=t.operator, value=t.value, effect=t.effect)
    if spec.accelerator_count:
        task.set_accelerator_type(spec.accelerator_type or "nvidia.com/gpu")
        task.set_accelerator_limit(spec.accelerator_count)
    for setter, value in ((task.set_cpu_request, spec.cpu_request), (task.set_cpu_limit, spec.cpu_limit),
                          (task.set_memory_request, spec.memory_request), (task.set_memory_limit, spec.memory_limit)):
        if value:
            setter(value)
    if spec.shm_size:
        k8s.empty_dir_mount(task, volume_name="dshm", mount_path="/dev/shm", medium="Memory", size_limit=spec.shm_size)
    if spec.timeout_s:
        k8s.set_timeout(task, spec.timeout_s)
    for secret in profile.secrets:
        k8s.use_secret_as_env(task, secret_name=secret.name, secret_key_to_env={v: k for k, v in secret.env.items()})
    for key, value in profile.env.items():
        task.set_env_variable(key, value)
    if profile.image_pull_secrets:
        k8s.set_image_pull_secrets(task, profile.image_pull_secrets)
    if profile.image_pull_policy:
        k8s.set_image_pull_policy(task, profile.image_pull_policy)
    return task


def _harden(task: dsl.PipelineTask, profile: Profile) -> None:
    """What kfp-kubernetes can say of a hardened pod: the non-root user, writable
    emptyDirs where the code writes (SCRATCH_DIRS; the rest of the root filesystem can
    then be read-only) and the step label. Its KubernetesExecutorConfig has no field for
    dropped capabilities, allowPrivilegeEscalation, seccomp or readOnlyRootFilesystem:
    the chart's MutatingAdmissionPolicy adds those to pods with STEP_LABEL (docs/deploy.md)."""
    from kfp import kubernetes as k8s

    k8s.set_security_context(task, run_as_user=profile.run_as_user, run_as_group=profile.run_as_user,
                             run_as_non_root=True)
    for name, path in SCRATCH_DIRS.items():
        k8s.empty_dir_mount(task, volume_name=name, mount_path=path)
    k8s.add_pod_label(task, *STEP_LABEL)


def _launch_trainjob(task: dsl.PipelineTask, stage: str, profile: Profile) -> StageSpec:
    """A multi-node step: the task submits a Kubeflow Trainer job and watches it
    (rlhf.ops.trainjob). The job's spec travels as RLHF_TRAINJOB (Secret names, no values).
    The GPUs belong to the job's pods, so the task itself is placed like a light step
    (the profile's `defaults` pool) with a modest CPU and memory and no GPU; it keeps
    the Secrets and env (it reads the store). Returns that placement."""
    from rlhf.ops.trainjob import trainjob_spec

    job = trainjob_spec(profile, stage, c.IMAGE)
    task.set_env_variable("RLHF_TRAINJOB", job.model_dump_json())
    task.set_env_variable("RLHF_IMAGE", job.image)
    return StageSpec(node_selector=profile.defaults.node_selector, tolerations=profile.defaults.tolerations,
                     cpu_request=LAUNCHER_CPU[0], cpu_limit=LAUNCHER_CPU[1],
                     memory_request=LAUNCHER_MEMORY[0], memory_limit=LAUNCHER_MEMORY[1],
                     timeout_s=job.timeout_s and job.timeout_s + LAUNCHER_MARGIN_S)


def build_pipeline(profile: Profile | None = None):
    """The pipeline, with a cluster profile applied to its steps (None: no Kubernetes
    settings at all, as kfp.local runs it)."""
    return dsl.pipeline(
        name="rlhf-instructgpt",
        description="InstructGPT-style RLHF: data prep, SFT, reward model, PPO with a KL penalty against SFT, "
                    "evaluation, and gated promotion in the MLflow Model Registry.",
    )(_pipeline_func(profile))


def _pipeline_func(profile: Profile | None):
    """The pipeline function: its signature and docstring (the Kubeflow UI form: names,
    types, defaults, descriptions) come from the one table, rlhf.params.PARAMS."""

    def rlhf_pipeline(*args, **kwargs):
        bound = rlhf_pipeline.__signature__.bind(*args, **kwargs)  # KFP passes them positionally
        bound.apply_defaults()
        form = bound.arguments  # name -> pipeline channel, one per row of rlhf.params.PARAMS
        finish = c.finish_run(**_taken_by(c.finish_run, form), kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        finish.set_display_name("finish").set_caching_options(False)
        # the exit task restores @champion after a failed run: it retries through an MLflow outage
        # (backoff doubling: about 15 minutes in all at the default 30 s); restoring is idempotent
        finish.set_retry(num_retries=FINISH_RETRIES, backoff_duration=RETRY_BACKOFF, backoff_factor=2.0)
        _place(finish, "finish", profile)
        with dsl.ExitHandler(finish, name="rlhf"):
            start = c.start_run(**form, kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)  # the whole form
            start.set_display_name("start").set_caching_options(False)
            _place(start, "start", profile)
            run = dict(config_json=start.outputs["config_json"], run_root=start.outputs["run_root"],
                       parent_run_id=start.outputs["parent_run_id"])

            # cacheable: its inputs (data hash, prep settings, root) fully determine its output
            prep = c.prep_data(prep_config_json=start.outputs["prep_config_json"], artifact_root=form["artifact_root"],
                               data_key=start.outputs["data_key"])
            prep.set_display_name("data prep").set_caching_options(True)
            _place(prep, "prep", profile)
            data = prep.outputs["dataset"]

            sft = _place(_training(c.train_sft(dataset=data, **run), "SFT"), "sft", profile)
            reward = _place(_training(c.train_reward(dataset=data, sft_model=sft.outputs["model"], **run), "reward model"),
                            "reward", profile)
            ppo = _place(_training(c.train_ppo(dataset=data, sft_model=sft.outputs["model"],
                                               reward_model=reward.outputs["model"], **run), "PPO"), "ppo", profile)
            ev = _place(_training(c.evaluate(dataset=data, policy=ppo.outputs["model"], **run), "eval"), "eval", profile)

            with dsl.If(ev.outputs["Output"] == True, name="gate-passed"):  # noqa: E712 - a KFP condition
                _place(c.promote(dataset=data, policy=ppo.outputs["model"], move_alias=True, **run)
                       .set_display_name("promote").set_caching_options(False), "promote", profile)
            with dsl.Else(name="gate-failed"):
                _place(c.promote(dataset=data, policy=ppo.outputs["model"], move_alias=False, **run)
                       .set_display_name("register (not promoted)").set_caching_options(False), "promote", profile)

    rlhf_pipeline.__signature__ = params.signature()
    rlhf_pipeline.__annotations__ = {q.name: q.type for q in params.PARAMS}
    rlhf_pipeline.__doc__ = params.docstring()
    return rlhf_pipeline


def _taken_by(component, args: dict) -> dict:
    """The pipeline parameters a component's signature names, by name, so the DAG holds
    no list of them. (start_run takes them all: a table row it lacks fails the compile.)"""
    return {name: value for name, value in args.items() if name in component.component_spec.inputs}


rlhf_pipeline = build_pipeline()


def compile_pipeline(path: str, profile: Profile | None = None) -> str:
    """Write the KFP v2 spec; with a profile, its placement and its image. Without one
    the steps are placed nowhere in particular but hardened all the same (an empty
    profile): the spec runs on a cluster either way."""
    from kfp import compiler

    compiler.Compiler().compile(build_pipeline(profile or Profile()), package_path=str(path))
    _set_image(path, profile)
    return str(path)


def _set_image(path: str, profile: Profile | None) -> None:
    """A profile's image on every step of a compiled spec."""
    import yaml

    if profile is None or not profile.image:
        return
    docs = list(yaml.safe_load_all(open(path)))
    for ex in docs[0]["deploymentSpec"]["executors"].values():
        ex["container"]["image"] = profile.image
    with open(path, "w") as f:
        yaml.safe_dump_all(docs, f, sort_keys=False)
