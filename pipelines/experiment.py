"""`rlhf experiment` as a KFP v2 pipeline: the InstructGPT claims on a cluster.

    start -> ParallelFor(seeds): bases (prep, SFT, reward model)
                 -> ParallelFor(arms of that seed): PPO (+ eval) with the arm's overrides
    all inside an ExitHandler whose exit step writes the report (table, plot, claims) to
    the experiment's folder and the MLflow parent run, or closes that run FAILED

The steps call the functions `rlhf experiment` runs in one process
(`rlhf.ops.experiment`, through `rlhf.runs`), so both give the same table. The
experiment's folder is `<artifact_root>/<run_name or KFP run id>`: on a cluster an
`s3://` prefix every step reads and writes (the loops pass only that folder and a seed
or arm name). Compile with `rlhf compile --pipeline experiment`.
"""

from kfp import dsl

from rlhf import components as c
from rlhf.ops.profiles import MULTI_NODE_STAGES, Profile
from rlhf.pipelines.dag import _place, _training


def build_experiment_pipeline(profile: Profile | None = None, parallelism: int = 0):
    """The pipeline; `profile` places the steps (bases like SFT, arms like PPO), and
    `parallelism` caps the arms that run at once (0: no cap)."""
    if profile is not None:
        wide = [s for s in MULTI_NODE_STAGES if profile.for_stage(s).nodes > 1]
        if wide:
            raise ValueError(f"profile {profile.name}: {wide} span several nodes; an experiment runs each base and "
                             "arm on one node, so give those stages nodes: 1 in the profile used for it")

    @dsl.pipeline(name="rlhf-experiment",
                  description="The InstructGPT claims as runs: kl (beta sweep, reward hacking), size (small PPO "
                              "policy vs an 8x larger SFT model), tax (alignment tax with and without PPO-ptx).")
    def rlhf_experiment(kind: str = "kl", preset: str = "demo", quick: bool = True, seeds: str = "0",
                        overrides: str = "", config_json: str = "", artifact_root: str = "s3://rlhf/experiments",
                        run_name: str = ""):
        """kind: kl | size | tax. preset: config preset. quick: the smaller base and shorter PPO.
        seeds: comma-separated, e.g. 0,1,2. overrides: space-separated key=value (as --set).
        config_json: a JSON object of config sections. artifact_root and run_name: the
        experiment's folder is <artifact_root>/<run_name or the KFP run id>."""
        report = c.experiment_report(artifact_root=artifact_root, run_name=run_name,
                                     kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
        report.set_display_name("report").set_caching_options(False)
        _place(report, "eval", profile)
        with dsl.ExitHandler(report, name="experiment"):
            start = c.experiment_start(kind=kind, preset=preset, quick=quick, seeds=seeds, overrides=overrides,
                                       config_json=config_json, artifact_root=artifact_root, run_name=run_name,
                                       kfp_run_id=dsl.PIPELINE_JOB_ID_PLACEHOLDER)
            start.set_display_name("start").set_caching_options(False)
            _place(start, "start", profile)
            with dsl.ParallelFor(start.output, name="seeds") as seed:
                bases = _place(_training(c.experiment_bases(spec=seed), "bases"), "sft", profile)
                with dsl.ParallelFor(bases.output, parallelism=parallelism, name="arms") as arm:
                    _place(_training(c.experiment_arm(spec=arm), "arm"), "ppo", profile)

    return rlhf_experiment


def compile_experiment_pipeline(path: str, profile: Profile | None = None) -> str:
    from kfp import compiler

    from rlhf.pipelines.dag import _set_image

    # no profile: placed nowhere in particular, hardened all the same (dag.compile_pipeline)
    compiler.Compiler().compile(build_experiment_pipeline(profile or Profile()), package_path=str(path))
    _set_image(path, profile)
    return str(path)
