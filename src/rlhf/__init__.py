"""InstructGPT-style RLHF engine: SFT -> reward model -> PPO (KL vs SFT) -> evaluation.

The engine runs on one machine with no KFP installed; `components/` and `pipelines/`
wrap it for Kubeflow. Rooms: math, models, data, train, stages (the engine); adapters
(store, tracking, registry, settings); ops (workers, Trainer jobs, profiles, stack);
`dispatch.py`, `runs.py` and `cli.py` on top. docs/architecture.md is the map.
"""

__version__ = "0.1.0"
