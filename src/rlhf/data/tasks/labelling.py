"""Simulated labelling of the policy's own samples (built-in task).

InstructGPT's labelers ranked outputs of the SFT model; a reward model trained only
on offline pairs misjudges the errors the policy actually makes. So before the
reward model trains, `k` SFT samples per prompt are drawn and ranked by the task's
simulated labelers (`BuiltinTask.rank`: the gold score with Gumbel noise, whose
pairwise choices are the Bradley-Terry ones of `BuiltinTask.label`), and every pair
of distinct samples of a prompt, C(k, 2) of them, becomes a comparison, as in
InstructGPT (K = 4 to 9 there). One sampled answer then serves k - 1 comparisons
instead of one: k = 4 needs a third of the samples of k = 2 for as many pairs.
The comparisons are committed to the store (`reward/comparisons`) once; a resumed or
distributed stage reads them back instead of sampling again.
"""

from __future__ import annotations

import json
import random
import tempfile
from itertools import combinations
from pathlib import Path

from rlhf.data.processing import read_jsonl_rows, write_jsonl
from rlhf.data.schema import PreferenceRow

COMPARISONS = "reward/comparisons"
BATCH = 256


def policy_comparisons(task, load_policy, fmt, prompts: dict[str, list], counts: dict[str, int], *, seed: int,
                       max_new_tokens: int, store, device, k: int = 2) -> dict[str, list[PreferenceRow]]:
    """For each split ("train", "eval"): about `counts[split]` comparisons of the
    policy that `load_policy()` loads (prompts in the chat format `fmt`), from prompt
    rows drawn from `prompts[split]`: `k` samples each (temperature 1), ranked by the
    task's labeler, every pair of distinct non-empty samples a comparison (rows of one
    prompt stay together, so a split never shares a prompt's ranking). Committed once,
    then reused (the policy is loaded only to sample)."""
    from rlhf.models.rollout import decode_responses, generate

    if store.is_committed(COMPARISONS):
        return read_comparisons(store)
    policy = load_policy()
    tok = fmt.tok
    per_prompt = k * (k - 1) // 2
    out = {}
    for split, count in counts.items():
        rng = random.Random(f"{seed}-policy-comparisons-{split}")
        chosen = [rng.choice(prompts[split]) for _ in range(-(-count // per_prompt))]
        rows = []
        step = max(1, BATCH // k)
        for i in range(0, len(chosen), step):
            batch = chosen[i:i + step]
            ids = [fmt.prompt_ids(p) for p in batch for _ in range(k)]
            texts = decode_responses(tok, generate(policy, tok, ids, max_new_tokens, 1.0, device))
            for j, p in enumerate(batch):
                answers = list(dict.fromkeys(t for t in texts[j * k:(j + 1) * k] if t.strip()))
                ranked = task.rank(rng, p.prompt, answers) if len(answers) > 1 else []
                rows += [PreferenceRow(prompt=p.prompt, chosen=a, rejected=b, messages=p.messages)
                         for a, b in combinations(ranked, 2)]
        out[split] = rows
    with tempfile.TemporaryDirectory() as tmp:
        for name, rows in out.items():
            write_jsonl(rows, Path(tmp) / f"{name}.jsonl")
        (Path(tmp) / "info.json").write_text(json.dumps({"k": k, **{name: len(v) for name, v in out.items()}}))
        store.put_dir(Path(tmp), COMPARISONS)
    return out


def read_comparisons(store) -> dict[str, list[PreferenceRow]]:
    d = store.get_dir(COMPARISONS)
    return {k: read_jsonl_rows(d / f"{k}.jsonl", "preference") for k in ("train", "eval")}
