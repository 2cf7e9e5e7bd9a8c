"""`rlhf` command line.

    rlhf run [--preset P] [--config F] [--set k=v ...] [--output DIR|s3://...] [--stack] [--quiet|--verbose]
    rlhf stage prep|sft|reward|ppo|eval|all [--preset P] [--config F] [--set k=v ...] [--output DIR] [--quiet]
    rlhf config show [--preset P] [--config F] [--set k=v ...]
    rlhf compile [--pipeline rlhf|experiment] [--output pipeline.yaml] [--profile F [--preset P] [--config F] [--set k=v ...]]
    rlhf plan [--preset P] [--config F] [--set k=v ...] [--profile F] [--model HUB_ID|DIR|s3://...|config.json]
    rlhf submit --host URL [--experiment E] [--profile F] [--param k=v ...]
    rlhf schedule --host URL --cron "0 3 * * *" [--experiment E] [--param k=v ...] [--no-catchup]
    rlhf runs --host URL [--experiment E]
    rlhf models list | pull NAME@ALIAS --to DIR
    rlhf experiment kl|size|tax [--quick] [--seeds 0,1,2] [--output DIR] [--results docs/RESULTS.md] [--kfp]
    rlhf stack up|down|status
    rlhf gc ROOT|s3://... [--older-than 24h] [--dry-run]
    rlhf --insecure ...   (credentials over plain http to hosts off this machine and cluster)

`run` executes the Kubeflow pipeline itself on this machine (kfp.local); `stage` runs
one engine stage directly. Both read and write through the artifact store (a local
folder or s3://) and log to MLflow: MLFLOW_TRACKING_URI, else the embedded sqlite
database $RLHF_HOME/mlflow.db. The config is validated before any work starts.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml

from rlhf.config import ConfigError, PipelineConfig, load_config
from rlhf.adapters.settings import Settings
from rlhf.redaction import check_transport, display_uri, guard_streams, redact

def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", help="Config preset (demo, instructgpt, tiny).")
    p.add_argument("--config", default=None, help="YAML file deep-merged over the preset.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one field, e.g. --set ppo.kl.init_coef=0.05 (repeatable).")


def _cmd_gc(args, settings: Settings) -> int:
    from rlhf.adapters.store import open_store
    from rlhf.ops.gc import collect, parse_age

    try:
        age = parse_age(args.older_than)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    store = open_store(args.root, settings)
    found = collect(store, age, dry_run=args.dry_run)
    for item in found:
        print(f"{'would remove' if args.dry_run else 'removed'} {store.uri(item.prefix)}: {item.why} "
              f"({item.files} files, {item.bytes} bytes, {item.age_s / 3600:.1f} h old)")
    total = sum(i.bytes for i in found)
    print(f"{len(found)} leftovers, {total} bytes{' (dry run: nothing removed)' if args.dry_run else ''}; "
          f"committed artifacts untouched")
    return 0


def _cmd_stage(args, cfg: PipelineConfig, settings: Settings) -> int:
    """One stage (or prep..eval) in the output store, through the one dispatcher."""
    from rlhf.dispatch import StageRequest, dispatch
    from rlhf.stages.table import STAGES

    output = args.output or str(settings.home / "demo")
    quiet = args.quiet or settings.quiet
    names = [n for n, s in STAGES.items() if s.standalone] if args.name == "all" else [args.name]
    for name in names:
        result = dispatch(StageRequest(name, output, output, quiet=quiet), cfg, settings)
        short = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        print(json.dumps({"stage": name, "output": str(output), **short}, indent=2, default=str))
    if args.name in ("all", "eval"):
        from rlhf.adapters.tracking import tracking_uri_for

        print(f"summary: {output.rstrip('/')}/summary.json\nMLflow: {display_uri(tracking_uri_for(cfg, settings))}")
    return 0


def _cmd_run(args, cfg: PipelineConfig, settings: Settings) -> int:
    """The whole DAG through kfp.local (embedded default, or the local stack with --stack)."""
    from rlhf.pipelines.local import default_output, run_local, step_log_path, summary_lines
    from rlhf.adapters.tracking import tracking_uri_for

    env: dict[str, str] = {}
    if args.stack:
        from rlhf.ops.stack import Stack

        stack = Stack(settings=settings)
        stack.up()
        env = stack.env()
        settings = Settings.from_env({**os.environ, **env})
    output = args.output or default_output(args.preset or "run", settings)
    mode = "verbose" if args.verbose else "quiet" if args.quiet else "progress"
    print(f"running the pipeline through kfp.local; artifacts in {output}", flush=True)
    if mode != "verbose":
        log = step_log_path(output, settings)
        copied = f" (copied to {output.rstrip('/')}/pipeline.log at the end)" if output.startswith("s3://") else ""
        print(f"step logs: {log}{copied}; --verbose shows them here", flush=True)
    summary = run_local(cfg, output, settings, env, output_mode=mode)
    print("\n".join(summary_lines(summary, output, tracking_uri_for(cfg, settings))))
    return 0


def _cmd_compile(args, settings: Settings) -> int:
    from rlhf.pipelines import compile_pipeline
    from rlhf.ops.profiles import load_profile

    profile = load_profile(args.profile) if args.profile else None
    if args.pipeline == "experiment":
        from rlhf.pipelines.experiment import compile_experiment_pipeline

        print(f"wrote {compile_experiment_pipeline(args.output, profile)}" + (
            f" (profile {profile.name})" if profile else ""))
        return 0
    print(f"wrote {compile_pipeline(args.output, profile)}" + (f" (profile {profile.name})" if profile else ""))
    if profile is not None:  # will the stages fit the profile's GPUs? (a warning: the run's config may differ)
        cfg = load_config(args.preset, args.config, args.overrides)
        rows, _ = _plan(cfg, profile, None, settings)
        for row in rows:
            if row["fits"] is False:
                print(f"warning: {row['stage']}: {row['verdict']} (rlhf plan --profile {args.profile} shows the "
                      "estimate)", file=sys.stderr)
    return 0


def _plan(cfg: PipelineConfig, profile, model: str | None, settings: Settings, seq_len: int | None = None):
    from rlhf.ops.plan import ModelShape, plan

    source = model or cfg.model.name_or_path
    try:
        if source:
            from rlhf.adapters.store import LocalStore

            shape = ModelShape.from_pretrained(source, LocalStore(settings.home, settings), cfg.model.revision)
        else:
            shape = ModelShape.of_built(cfg)
    except ValueError as e:
        raise ConfigError(f"rlhf plan: {e}") from None
    return plan(cfg, shape, profile, seq_len=seq_len)


def _cmd_plan(args, cfg: PipelineConfig, settings: Settings) -> int:
    """Per-stage peak memory per GPU against the profile's accelerators."""
    from rlhf.ops.profiles import load_profile

    profile = load_profile(args.profile) if args.profile else None
    rows, report = _plan(cfg, profile, args.model, settings, args.seq_len)
    print(json.dumps(rows, indent=2) if args.json else report)
    return 1 if any(r["fits"] is False for r in rows) else 0


def _cluster_args(p: argparse.ArgumentParser, *, pipeline: bool = True) -> None:
    from rlhf.ops.cluster import DEFAULT_EXPERIMENT, DEFAULT_PIPELINE

    p.add_argument("--host", default=None, help="Kubeflow Pipelines URL, e.g. http://localhost:8080 through "
                                                "`kubectl port-forward -n kubeflow svc/ml-pipeline-ui 8080:80` "
                                                "(default: KF_PIPELINES_ENDPOINT).")
    p.add_argument("--namespace", default=None, help="Kubernetes namespace (multi-user Kubeflow: your profile).")
    p.add_argument("--token-file", default=None, help="File with the bearer token (default: KF_PIPELINES_TOKEN, "
                                                      "else the pod's KF_PIPELINES_SA_TOKEN_PATH).")
    if not pipeline:
        p.add_argument("--experiment", default=None, help="Only the runs of this KFP experiment.")
        return
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="KFP experiment (created when missing).")
    p.add_argument("--pipeline-name", default=DEFAULT_PIPELINE, help="KFP pipeline that gets the new version.")
    p.add_argument("--profile", default=None, help="Cluster profile YAML compiled in; its service_account runs the pods.")
    p.add_argument("--package", default=None, help="Upload this compiled spec instead of compiling one.")
    p.add_argument("--service-account", default=None, help="Service account of the run (overrides the profile's).")
    p.add_argument("--param", dest="params", action="append", default=[], metavar="KEY=VALUE",
                   help="Pipeline parameter, typed as the pipeline declares it, e.g. --param ppo_updates=100 (repeatable).")


def _cmd_cluster(args, settings: Settings) -> int:
    from rlhf.ops import cluster

    host = args.host or settings.kfp_host
    token = cluster.read_token(args.token_file, settings)
    check_transport(host, bool(token), settings.insecure, "Kubeflow Pipelines host")
    if args.cmd == "runs":
        rows = cluster.list_runs(host, experiment=args.experiment, namespace=args.namespace, token=token)
        if not rows:
            print("no runs" + (f" in experiment {args.experiment}" if args.experiment else ""))
        if rows:
            print(f"{'RUN ID':38s} {'STATE':10s} {'CREATED':27s} NAME")
        for r in rows:
            print(f"{r['id']:38s} {str(r['state'] or '-'):10s} {str(r['created_at'] or '-'):27s} {r['name']}")
        return 0
    common = dict(experiment=args.experiment, pipeline_name=args.pipeline_name,
                  params=cluster.parse_param_pairs(args.params), profile_path=args.profile,
                  namespace=args.namespace, token=token, package_path=args.package,
                  service_account=args.service_account)
    if args.cmd == "submit":
        out = cluster.submit(host, run_name=args.run_name, **common)
        print(f"submitted run {out['run_id']} (pipeline {args.pipeline_name} version {out['version_name']}, "
              f"experiment {args.experiment})\n{out['url']}")
        return 0
    out = cluster.schedule(host, cron=args.cron, schedule_name=args.schedule_name,
                           max_concurrency=args.max_concurrency, no_catchup=args.no_catchup, **common)
    print(f"{'replaced' if out['replaced'] else 'created'} recurring run {out['recurring_run_id']} "
          f"(cron {out['cron']!r}, version {out['version_name']})\n{out['url']}")
    return 0


def _cmd_models(args, settings: Settings) -> int:
    from rlhf.adapters.registry import Registry, pull
    from rlhf.adapters.tracking import check_reachable, embedded_tracking_uri

    uri = settings.check_tracking_transport(
        args.tracking_uri or settings.mlflow_tracking_uri or embedded_tracking_uri(settings.home))
    check_reachable(uri)  # seconds, not the client's minutes of retries, when the server is away
    if args.action == "list":
        rows = Registry(uri).list_models(args.prefix or "")
        if not rows:
            print(f"no registered models in {display_uri(uri)}")
        for r in rows:
            aliases = ", ".join(f"@{a}=v{v}" for a, v in sorted(r["aliases"].items())) or "-"
            print(f"{r['name']:40s} versions={r['versions']:<4d} latest=v{r['latest_version']}  {aliases}")
        return 0
    if not args.ref or not args.to:
        print("error: rlhf models pull NAME@ALIAS --to DIR", file=sys.stderr)
        return 2
    dest = pull(uri, args.ref, Path(args.to))
    print(f"pulled {args.ref} into {dest} (safetensors + tokenizer; AutoModelForCausalLM.from_pretrained({str(dest)!r}))")
    return 0


def _cmd_experiment(args, settings: Settings, argv: list[str] | None) -> int:
    from rlhf.config import read_yaml_mapping
    from rlhf.ops.experiment import parse_seeds, run_experiment

    seeds = parse_seeds(args.seeds or ("0" if args.quick else "0,1,2"))
    output = args.output or str(settings.home / f"experiment-{args.kind}")
    command = "rlhf " + " ".join(sys.argv[1:] if argv is None else argv)
    config = read_yaml_mapping(Path(args.config), "config file", "sections (task, data, model, sft, ...)") \
        if args.config else None
    if args.kfp:
        from rlhf.pipelines.local import PipelineFailed, run_experiment_local

        try:
            report = run_experiment_local(args.kind, preset=args.preset, quick=args.quick, seeds=seeds,
                                          sets=args.overrides, output=output, settings=settings,
                                          config_dict=config, results=args.results)
        except PipelineFailed as e:
            print(f"error: {redact(e)}", file=sys.stderr)
            return 1
    else:
        report = run_experiment(args.kind, preset=args.preset, quick=args.quick, seeds=seeds, sets=args.overrides,
                                output=output, settings=settings, results=args.results, command=command,
                                config_dict=config)
    print(json.dumps({k: v for k, v in report.items() if k != "rows"}, indent=1, default=str))
    print(f"table: {output}/{args.kind}.md")
    return 0


def main(argv: list[str] | None = None) -> int:
    guard_streams()  # whatever this command prints or logs passes through the one redaction
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--insecure", action="store_true",
                        help="Allow a token or password over plain http to a host outside this machine or the "
                             "cluster (same as RLHF_INSECURE=1; https is the safe choice).")
    sub = parser.add_subparsers(dest="cmd", required=True)

    pr = sub.add_parser("run", help="Run the whole pipeline DAG locally through kfp.local.")
    _config_args(pr)
    pr.add_argument("--output", default=None,
                    help="Run folder (local path or s3://bucket/prefix/name). Default: $RLHF_ARTIFACT_ROOT or "
                         "$RLHF_HOME, plus <preset>-<time>.")
    pr.add_argument("--stack", action="store_true",
                    help="Start (if needed) and use the local stack: SeaweedFS S3 + mlflow server.")
    shown = pr.add_mutually_exclusive_group()
    shown.add_argument("--quiet", action="store_true",
                       help="Print only the summary (and a failing step's error); the steps' logs go to the run "
                            "folder's pipeline.log.")
    shown.add_argument("--verbose", action="store_true",
                       help="Stream every step's log (kfp.local's executor output) here as it runs. By default they "
                            "go to the run folder's pipeline.log and a line per finished step is printed.")

    ps = sub.add_parser("stage", help="Run one pipeline stage (no KFP).")
    from rlhf.stages.table import STAGES

    standalone = [n for n, s in STAGES.items() if s.standalone]
    ps.add_argument("name", choices=[*standalone, "all"], help=f"A stage, or `all` for {', '.join(standalone)} in order.")
    _config_args(ps)
    ps.add_argument("--output", default=None, help="Output folder or s3:// prefix (artifact store root). Default: $RLHF_HOME/demo.")
    ps.add_argument("--quiet", action="store_true", help="No progress bars.")

    pc = sub.add_parser("config", help="Show the resolved config.")
    pc.add_argument("action", choices=["show"])
    _config_args(pc)

    pk = sub.add_parser("compile", help="Compile the pipeline to a KFP v2 YAML spec.")
    pk.add_argument("--output", default="pipeline.yaml", help="Where to write the spec.")
    pk.add_argument("--pipeline", choices=["rlhf", "experiment"], default="rlhf",
                    help="rlhf: the training DAG; experiment: `rlhf experiment` (seeds and arms as ParallelFor).")
    pk.add_argument("--profile", default=None,
                    help="Cluster profile YAML: node pools, GPUs, resources, /dev/shm, secrets (see profiles/); "
                         "warns when a stage's estimated memory (rlhf plan) exceeds its GPUs.")
    _config_args(pk)

    pp = sub.add_parser("plan", help="Estimate each stage's peak memory per GPU and whether it fits the profile.")
    _config_args(pp)
    pp.add_argument("--profile", default=None, help="Cluster profile YAML whose GPUs the estimates are checked against.")
    pp.add_argument("--model", default=None, help="The model: hub id, local folder, s3:// folder or config.json "
                                                  "(default: model.name_or_path, or the model built from the config).")
    pp.add_argument("--seq-len", type=int, default=None, help="Tokens per sequence (default: data.max_total_tokens, "
                                                              "else the model's context capped at 2048).")
    pp.add_argument("--json", action="store_true", help="Print the rows as JSON.")

    psu = sub.add_parser("submit", help="Upload the pipeline as a new version and start one run on Kubeflow Pipelines.")
    _cluster_args(psu)
    psu.add_argument("--run-name", default=None, help="Run name (default: pipeline name and UTC time).")

    psc = sub.add_parser("schedule", help="Create or replace the recurring run of a new pipeline version.")
    _cluster_args(psc)
    psc.add_argument("--cron", required=True, help="Cron: 5 fields (minute hour dom month dow, e.g. '0 3 * * *'), "
                                                   "or KFP's 6 with seconds first.")
    psc.add_argument("--schedule-name", default=None, help="Recurring run name (default: <pipeline-name>-schedule).")
    psc.add_argument("--max-concurrency", type=int, default=1, help="Most runs of the schedule at once.")
    psc.add_argument("--no-catchup", action="store_true", help="Skip missed intervals instead of backfilling them.")

    pe = sub.add_parser("experiment", help="Reproduce the InstructGPT claims on this task: kl (beta sweep, reward "
                                          "hacking), size (small PPO policy vs an 8x larger SFT model), tax (PPO-ptx).")
    pe.add_argument("kind", choices=["kl", "size", "tax"])
    _config_args(pe)
    pe.add_argument("--quick", action="store_true", help="A smaller base and shorter PPO (within 20 minutes on 2 cores).")
    pe.add_argument("--seeds", default=None, help="Comma-separated seeds (default: 0 with --quick, else 0,1,2).")
    pe.add_argument("--output", default=None, help="Experiment folder (default: $RLHF_HOME/experiment-<kind>).")
    pe.add_argument("--results", default=None, help="Also write the table and plot into this RESULTS.md section.")
    pe.add_argument("--kfp", action="store_true", help="Run the experiment's KFP pipeline through kfp.local (the DAG "
                                                       "a cluster runs: seeds and arms as ParallelFor loops).")

    pru = sub.add_parser("runs", help="List the latest runs on Kubeflow Pipelines.")
    _cluster_args(pru, pipeline=False)

    pm = sub.add_parser("models", help="Registered models: list them, or pull one as a Hugging Face folder.")
    pm.add_argument("action", choices=["list", "pull"])
    pm.add_argument("ref", nargs="?", help="For pull: NAME@ALIAS (e.g. rlhf-demo-policy@champion) or NAME/VERSION.")
    pm.add_argument("--to", default=None, help="For pull: destination folder.")
    pm.add_argument("--prefix", default=None, help="For list: only names starting with this.")
    pm.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else embedded).")

    pg = sub.add_parser("gc", help="Remove what interrupted writes left in a run root (staging folders, temp files, "
                                   "uncommitted checkpoints and uploads); never a committed artifact.")
    pg.add_argument("root", help="A run root or artifact root: local folder or s3://bucket/prefix.")
    pg.add_argument("--older-than", default="24h",
                    help="Only leftovers whose newest file is older than this (e.g. 30m, 24h, 7d; default 24h), so "
                         "writes in progress are left alone.")
    pg.add_argument("--dry-run", action="store_true", help="List what would be removed; remove nothing.")

    from rlhf.ops import stack as stack_mod

    stack_mod.add_cli(sub)

    args = parser.parse_args(argv)
    if args.insecure:  # before the settings are read, and inherited by the pipeline's steps
        os.environ["RLHF_INSECURE"] = "1"
    settings = Settings.from_env()
    try:
        if args.cmd == "compile":
            return _cmd_compile(args, settings)
        if args.cmd == "models":
            return _cmd_models(args, settings)
        if args.cmd in ("submit", "schedule", "runs"):
            return _cmd_cluster(args, settings)
        if args.cmd == "stack":
            return stack_mod.handle_cli(args, settings)
        if args.cmd == "gc":
            return _cmd_gc(args, settings)
        cfg = load_config(args.preset, args.config, args.overrides)
        if args.cmd == "config":
            print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
            return 0
        if args.cmd == "plan":
            return _cmd_plan(args, cfg, settings)
        if cfg.uses_builtin_task:  # a missing task plugin fails here, before anything starts
            from rlhf.data.tasks.plugins import resolve_families

            resolve_families(cfg.task.families, cfg.task.plugins)
        if args.cmd == "experiment":
            return _cmd_experiment(args, settings, argv)
        if args.cmd == "run":
            from rlhf.pipelines.local import PipelineFailed

            try:
                return _cmd_run(args, cfg, settings)
            except PipelineFailed as e:
                print(f"error: {redact(e)}", file=sys.stderr)
                return 1
        return _cmd_stage(args, cfg, settings)
    except Exception as e:
        if not isinstance(e, _known_errors()):
            raise
        print(f"error: {redact(e)}", file=sys.stderr)
        return 2


def _known_errors() -> tuple[type[Exception], ...]:
    """Errors that carry their own clear message (no traceback). Imported only when
    something failed: several live next to torch, and `rlhf run` need not load it."""
    from rlhf.ops.cluster import ClusterError
    from rlhf.data.readers import DataError
    from rlhf.train.distributed import DistributedError
    from rlhf.models import ModelLoadError
    from rlhf.adapters.registry import RegistryError
    from rlhf.train.checkpoint import CheckpointMismatch
    from rlhf.redaction import InsecureTransport
    from rlhf.adapters.tracking import TrackingUnreachable
    from rlhf.train.loop import TrainingDiverged
    from rlhf.adapters.store import StoreError
    from rlhf.ops.trainjob import TrainJobError

    return (DataError, ConfigError, CheckpointMismatch, ModelLoadError, StoreError, RegistryError, ClusterError,
            DistributedError, TrainJobError, InsecureTransport, TrackingUnreachable,
            TrainingDiverged)


if __name__ == "__main__":
    sys.exit(main())
