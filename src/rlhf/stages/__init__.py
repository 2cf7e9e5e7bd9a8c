"""The stages: prep, sft, reward, ppo, eval, promote (named in `table.STAGES`).

Each is `run(ctx: StageContext) -> StageResult` (`contract.py`), reads top to bottom
in numbered steps, and never imports kfp, the CLI or the adapters' constructors: what
it needs arrives in `ctx`. What a batch is and what the loss is belong here;
everything else about stepping belongs to `rlhf.train`.

May import: `rlhf.math`, `rlhf.models`, `rlhf.data`, `rlhf.train`, the adapter
modules' types and constants, and `stages.scoring` / `stages.gate` (shared helpers,
not stages). A stage never imports another stage.
"""
