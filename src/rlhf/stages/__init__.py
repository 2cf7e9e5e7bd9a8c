"""Pipeline stages. Each is `run(cfg, store, tracker, ...) -> dict` and never imports kfp."""

STAGES = ["prep", "sft", "reward", "ppo", "eval"]
