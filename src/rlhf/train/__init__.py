"""The training layer beneath the stages: processes and devices (`distributed`),
trained models with their optimiser and schedule (`Trainable`), the loop driver
(`loop`), schedules and batch orders, throughput, and checkpoints (`checkpoint`).

May import: torch, `rlhf.math`, `rlhf.config` and the adapters it is handed. Never a
stage, kfp or the CLI. A stage says what a batch is and what the loss is; everything
else about stepping lives here.
"""
