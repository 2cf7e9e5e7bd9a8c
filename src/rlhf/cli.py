"""`rlhf` command line.

    rlhf stage prep|sft|reward|ppo|eval [--preset P] [--config F] [--set k=v ...] [--output DIR] [--quiet]
    rlhf config show [--preset P] [--config F] [--set k=v ...]

Each stage reads and writes through the artifact store rooted at --output (a local
folder here) and logs one MLflow run (embedded sqlite in that folder unless
MLFLOW_TRACKING_URI is set). The config is validated before any work starts.
"""

from __future__ import annotations

import argparse
import importlib
import json
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


def _save_config(cfg: PipelineConfig, out: Path, stage: str) -> None:
    """Keep the exact config every stage ran with, next to its outputs."""
    (out / stage).mkdir(parents=True, exist_ok=True)
    (out / stage / "config.yaml").write_text(yaml.safe_dump(cfg.model_dump(), sort_keys=False))


def run_stage(name: str, cfg: PipelineConfig, output: Path, quiet: bool, settings: Settings) -> dict:
    from rlhf.store import open_store
    from rlhf.tracking import make_tracker

    store = open_store(output)
    _save_config(cfg, Path(store.root), name)
    tracker = make_tracker(cfg, Path(store.root), settings)
    module = importlib.import_module(f"rlhf.stages.{STAGE_MODULES[name]}")
    return module.run(cfg, store, tracker, quiet=quiet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rlhf", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    ps = sub.add_parser("stage", help="Run one pipeline stage.")
    ps.add_argument("name", choices=[*STAGE_MODULES, "all"], help="A stage, or `all` for the five in order.")
    _config_args(ps)
    ps.add_argument("--output", default=None, help="Output folder (artifact store root). Default: $RLHF_HOME/demo.")
    ps.add_argument("--quiet", action="store_true", help="No progress bars.")

    pc = sub.add_parser("config", help="Show the resolved config.")
    pc.add_argument("action", choices=["show"])
    _config_args(pc)

    args = parser.parse_args(argv)
    settings = Settings.from_env()
    try:
        cfg = load_config(args.preset, args.config, args.overrides)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    if args.cmd == "config":
        print(yaml.safe_dump(cfg.model_dump(), sort_keys=False), end="")
        return 0

    output = Path(args.output) if args.output else settings.home / "demo"
    quiet = args.quiet or settings.quiet
    from rlhf.data.readers import DataError
    from rlhf.models import ModelLoadError
    from rlhf.stages.common import CheckpointMismatch
    from rlhf.store import StoreError

    names = list(STAGE_MODULES) if args.name == "all" else [args.name]
    for name in names:
        try:
            result = run_stage(name, cfg, output, quiet, settings)
        except (DataError, ConfigError, CheckpointMismatch, ModelLoadError, StoreError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        short = {k: v for k, v in result.items() if not isinstance(v, (list, dict))}
        print(json.dumps({"stage": name, "output": str(output), **short}, indent=2, default=str))
    if args.name in ("all", "eval"):
        print(f"summary: {output / 'summary.json'}\nMLflow UI: mlflow ui --backend-store-uri sqlite:///{output.resolve() / 'mlflow.db'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
