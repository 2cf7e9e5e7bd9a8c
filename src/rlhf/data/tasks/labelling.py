"""Simulated labelling of the policy's own samples (built-in task).

InstructGPT's labelers ranked outputs of the SFT model; a reward model trained only
on offline pairs misjudges the errors the policy actually makes. So before the
reward model trains, two SFT samples per prompt are drawn and ordered by the task's
simulated labelers (`BuiltinTask.label`: Bradley-Terry noise on the gold score).
The comparisons are committed to the store (`reward/comparisons`) once; a resumed
or distributed stage reads them back instead of sampling again.
"""

from __future__ import annotations

import json
import random
import tempfile
from pathlib import Path

from rlhf.data.processing import read_jsonl_rows, write_jsonl
from rlhf.data.schema import PreferenceRow

COMPARISONS = "reward/comparisons"
BATCH = 256


def policy_comparisons(task, load_policy, fmt, prompts: dict[str, list], counts: dict[str, int], *, seed: int,
                       max_new_tokens: int, store, device) -> dict[str, list[PreferenceRow]]:
    """For each split ("train", "eval"): `counts[split]` prompt rows drawn from
    `prompts[split]`, two samples each (temperature 1) of the policy that
    `load_policy()` loads (prompts in the chat format `fmt`), ordered by the task's
    labeler; identical or empty pairs are dropped. Committed once, then reused (the
    policy is loaded only to sample)."""
    from rlhf.models.rollout import decode_responses, generate

    if store.is_committed(COMPARISONS):
        return read_comparisons(store)
    policy = load_policy()
    out = {}
    for split, count in counts.items():
        rng = random.Random(f"{seed}-policy-comparisons-{split}")
        chosen = [rng.choice(prompts[split]) for _ in range(count)]
        rows = []
        for i in range(0, count, BATCH):
            batch = chosen[i:i + BATCH]
            ids = [fmt.prompt_ids(p) for p in batch]
            tok = fmt.tok
            a = decode_responses(tok, generate(policy, tok, ids, max_new_tokens, 1.0, device))
            b = decode_responses(tok, generate(policy, tok, ids, max_new_tokens, 1.0, device))
            for p, x, y in zip(batch, a, b):
                if x != y and x.strip() and y.strip():
                    c, r = task.label(rng, p.prompt, x, y)
                    rows.append(PreferenceRow(prompt=p.prompt, chosen=c, rejected=r, messages=p.messages))
        out[split] = rows
    with tempfile.TemporaryDirectory() as tmp:
        for k, rows in out.items():
            write_jsonl(rows, Path(tmp) / f"{k}.jsonl")
        (Path(tmp) / "info.json").write_text(json.dumps({k: len(v) for k, v in out.items()}))
        store.put_dir(Path(tmp), COMPARISONS)
    return out


def read_comparisons(store) -> dict[str, list[PreferenceRow]]:
    d = store.get_dir(COMPARISONS)
    return {k: read_jsonl_rows(d / f"{k}.jsonl", "preference") for k in ("train", "eval")}
