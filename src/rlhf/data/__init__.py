"""Data: row schemas, readers (JSONL, s3://, HF), cleaning and splits, the committed
prep output (`prepared.py`), and the task plugins with their judge
(`tasks/judge.py`) and simulated labelling (`tasks/labelling.py`).

May import: `rlhf.math`, `rlhf.models` (tokenizers, generation), `rlhf.config`.
See docs/architecture.md.
"""
