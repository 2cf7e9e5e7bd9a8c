"""InstructGPT-style RLHF engine: SFT -> reward model -> PPO (KL vs SFT) -> evaluation.

The engine runs on one machine with no KFP installed; `components/` and `pipelines/`
wrap it for Kubeflow.
"""

__version__ = "0.1.0"
