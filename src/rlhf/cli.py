"""`rlhf` command line.

    rlhf run [--preset P] [--config F] [--set k=v ...] [--output DIR|s3://...] [--stack]
    rlhf stage prep|sft|reward|ppo|eval|all [--preset P] [--config F] [--set k=v ...] [--output DIR] [--quiet]
    rlhf config show [--preset P] [--config F] [--set k=v ...]
    rlhf compile [--output pipeline.yaml]
    rlhf models list | pull NAME@ALIAS --to DIR
    rlhf stack up|down|status

`run` executes the Kubeflow pipeline itself on this machine (kfp.local); `stage` runs
one engine stage directly. Both read and write through the artifact store (a local
folder or s3://) and log to MLflow: MLFLOW_TRACKING_URI, else the embedded sqlite
database $RLHF_HOME/mlflow.db. The config is validated before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path

import yaml

from rlhf.config import ConfigError, PipelineConfig, load_config
from rlhf.settings import Settings

STAGE_MODULES = {"prep": "prep", "sft": "sft", "reward": "reward", "ppo": "ppo", "eval": "evaluate"}


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="demo", help="Config preset (demo, instructgpt, tiny).")
    p.add_argument("--config", default=None, help="YAML file deep-merged over the preset.")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="Override one field, e.g. --set ppo.kl.init_coef=0.05 (repeatable).")


def run_stage(name: str, cfg: PipelineConfig, output: str, quiet: bool, settings: Settings) -> dict:
    from rlhf.store import open_store
    from rlhf.tracking import make_tracker

    store = open_store(output)
    # the exact config every stage ran with, next to its outputs
    store.write_bytes(f"{name}/config.yaml", yaml.safe_dump(cfg.model_dump(), sort_keys=False).encode())
    tracker = make_tracker(cfg, settings)
    module = importlib.import_module(f"rlhf.stages.{STAGE_MODULES[name]}")
    return module.run(cfg, store, tracker, quiet=quiet)


def _cmd_stage(args, cfg: PipelineConfig, settings: Settings) -> int:
    output = args.output or str(settings.home / "demo")
    quiet = args.quiet or settings.quiet
    names = list(STAGE_MODULES) if args.name == "all" else [args.name]
    for name in names:
        result = run_stage(name, cfg, output, quiet, settings)
        short = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        print(json.dumps({"stage": name, "output": str(output), **short}, indent=2, default=str))
    if args.name in ("all", "eval"):
        from rlhf.tracking import tracking_uri_for

        print(f"summary: {output.rstrip('/')}/summary.json\nMLflow: {tracking_uri_for(cfg, settings)}")
    return 0


def _cmd_run(args, cfg: PipelineConfig, settings: Settings) -> int:
    """The whole DAG through kfp.local (embedded default, or the local stack with --stack)."""
    from rlhf.pipelines.local import default_output, run_local, summary_lines
    from rlhf.tracking import tracking_uri_for

    env: dict[str, str] = {}
    if args.stack:
        from rlhf.stack import Stack

        stack = Stack(settings.stack_dir)
        stack.up()
        env = stack.env()
        settings = Settings.from_env({**os.environ, **env})
    output = args.output or default_output(args.preset or "run", settings)
    print(f"running the pipeline through kfp.local; artifacts in {output}", flush=True)
    summary = run_local(cfg, output, settings, env)
    print("\n".join(summary_lines(summary, output, tracking_uri_for(cfg, settings))))
    return 0


def _cmd_compile(args, settings: Settings) -> int:
    from rlhf.pipelines import compile_pipeline
    from rlhf.profiles import load_profile

    profile = load_profile(args.profile) if args.profile else None
    print(f"wrote {compile_pipeline(args.output, profile)}" + (f" (profile {profile.name})" if profile else ""))
    return 0


def _cmd_models(args, settings: Settings) -> int:
    from rlhf.registry import Registry, pull
    from rlhf.tracking import embedded_tracking_uri

    uri = args.tracking_uri or settings.mlflow_tracking_uri or embedded_tracking_uri(settings.home)
    if args.action == "list":
        rows = Registry(uri).list_models(args.prefix or "")
        if not rows:
            print(f"no registered models in {uri}")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    pr = sub.add_parser("run", help="Run the whole pipeline DAG locally through kfp.local.")
    _config_args(pr)
    pr.add_argument("--output", default=None,
                    help="Run folder (local path or s3://bucket/prefix/name). Default: $RLHF_ARTIFACT_ROOT or "
                         "$RLHF_HOME, plus <preset>-<time>.")
    pr.add_argument("--stack", action="store_true",
                    help="Start (if needed) and use the local stack: SeaweedFS S3 + mlflow server.")

    ps = sub.add_parser("stage", help="Run one pipeline stage (no KFP).")
    ps.add_argument("name", choices=[*STAGE_MODULES, "all"], help="A stage, or `all` for the five in order.")
    _config_args(ps)
    ps.add_argument("--output", default=None, help="Output folder or s3:// prefix (artifact store root). Default: $RLHF_HOME/demo.")
    ps.add_argument("--quiet", action="store_true", help="No progress bars.")

    pc = sub.add_parser("config", help="Show the resolved config.")
    pc.add_argument("action", choices=["show"])
    _config_args(pc)

    pk = sub.add_parser("compile", help="Compile the pipeline to a KFP v2 YAML spec.")
    pk.add_argument("--output", default="pipeline.yaml", help="Where to write the spec.")
    pk.add_argument("--profile", default=None,
                    help="Cluster profile YAML: node pools, GPUs, resources, /dev/shm, secrets (see profiles/).")

    pm = sub.add_parser("models", help="Registered models: list them, or pull one as a Hugging Face folder.")
    pm.add_argument("action", choices=["list", "pull"])
    pm.add_argument("ref", nargs="?", help="For pull: NAME@ALIAS (e.g. rlhf-demo-policy@champion) or NAME/VERSION.")
    pm.add_argument("--to", default=None, help="For pull: destination folder.")
    pm.add_argument("--prefix", default=None, help="For list: only names starting with this.")
    pm.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else embedded).")

    from rlhf import stack as stack_mod

    stack_mod.add_cli(sub)

    args = parser.parse_args(argv)
    settings = Settings.from_env()
    from rlhf.data.readers import DataError
    from rlhf.models import ModelLoadError
    from rlhf.registry import RegistryError
    from rlhf.stages.common import CheckpointMismatch
    from rlhf.store import StoreError

    known = (DataError, ConfigError, CheckpointMismatch, ModelLoadError, StoreError, RegistryError)
    try:
        if args.cmd == "compile":
            return _cmd_compile(args, settings)
        if args.cmd == "models":
            return _cmd_models(args, settings)
        if args.cmd == "stack":
            return stack_mod.handle_cli(args, settings)
        cfg = load_config(args.preset, args.config, args.overrides)
        if args.cmd == "config":
            print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
            return 0
        if args.cmd == "run":
            from rlhf.pipelines.local import PipelineFailed

            try:
                return _cmd_run(args, cfg, settings)
            except PipelineFailed as e:
                print(f"error: {e}", file=sys.stderr)
                return 1
        return _cmd_stage(args, cfg, settings)
    except known as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
