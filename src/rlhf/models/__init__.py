"""Models: loading (hub id, local path, s3://), tokenizers and chat templates,
reward/value heads and packing, batching (`batching.py`), generation (`rollout.py`).

May import: `rlhf.math`, `rlhf.config`. See docs/architecture.md.
"""

from rlhf.models.heads import (
    Group, Segment, group_scores, last_token_index, pack, pair_scores, position_ids_from_mask, sequence_scores,
    token_values, tree_segment,
)
from rlhf.models.loading import (
    ModelLoadError,
    build_causal_lm,
    load_causal_lm,
    load_reward_model,
    load_tokenizer,
    resolve_source,
    save_model,
)
from rlhf.models.tokenizer import train_tokenizer

__all__ = [
    "ModelLoadError", "build_causal_lm", "load_causal_lm", "load_reward_model", "load_tokenizer",
    "resolve_source", "save_model", "train_tokenizer", "last_token_index", "position_ids_from_mask",
    "sequence_scores", "token_values", "pair_scores", "group_scores", "tree_segment", "Group", "pack",
    "Segment",
]
