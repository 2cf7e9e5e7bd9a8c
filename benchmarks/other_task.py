"""The demo preset on a task that is not the built-in one: does the recipe hold off
`reverse`/`sort`?

Two task families registered here as plugins, each with its own gold judge and its own
kind of human mistakes:
  - `rotate`: move the first item to the end (`rotate: a b c d` -> ` b c d a`); writers
    forget to move it, move the last item instead, or drop one;
  - `dedupe`: keep the first occurrence of each number in order (`dedupe: 3 1 3 2 1` ->
    ` 3 1 2`); writers keep a duplicate, sort the answer, or drop one.
Their gold score is edit similarity to the target minus the verbosity penalty, as the
base class gives; the mistakes (the noise the labelers see) are their own.

    python benchmarks/other_task.py --seed 0 --output /tmp/other-s0 [--set k=v ...]

runs the demo's own command on it, as a user with a plugin would:

    PYTHONPATH=benchmarks rlhf run --preset demo --set task.plugins=[other_task] \
        --set task.families=[rotate,dedupe] --set seed=0 --output /tmp/other-s0

(this module is the plugin: importing it registers both families), then prints the
summary's headline numbers as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys

from rlhf.data.tasks.base import TaskFamily, register

LETTERS = list("abcdefghij")
NUMBERS = [str(i) for i in range(12)]


@register
class Rotate(TaskFamily):
    name = "rotate"
    prompt_prefix = "rotate:"

    def alphabet(self) -> list[str]:
        return LETTERS

    def make_items(self, rng: random.Random, n: int) -> list[str]:
        return [rng.choice(LETTERS) for _ in range(n)]

    def target(self, items: list[str]) -> list[str]:
        return items[1:] + items[:1]

    def mistake(self, rng: random.Random, items: list[str], answer: list[str]) -> list[str]:
        kind = rng.choice(["copy", "wrong_end", "drop"])
        out = list(items) if kind == "copy" else items[-1:] + items[:-1] if kind == "wrong_end" else answer[:-1]
        return out if out != answer and out else answer + [answer[0]]


@register
class Dedupe(TaskFamily):
    name = "dedupe"
    prompt_prefix = "dedupe:"

    def alphabet(self) -> list[str]:
        return NUMBERS

    def make_items(self, rng: random.Random, n: int) -> list[str]:
        pool = rng.sample(NUMBERS, max(2, n - 2))
        return [rng.choice(pool) for _ in range(n)]

    def target(self, items: list[str]) -> list[str]:
        return list(dict.fromkeys(items))

    def mistake(self, rng: random.Random, items: list[str], answer: list[str]) -> list[str]:
        kind = rng.choice(["keep_dup", "sorted", "drop"])
        if kind == "keep_dup":
            out = answer + [rng.choice(answer)]
        elif kind == "sorted":
            out = sorted(answer, key=int)
        else:
            out = answer[:-1]
        return out if out != answer and out else answer + [answer[-1]]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--output", required=True)
    ap.add_argument("--set", action="append", default=[])
    args = ap.parse_args(argv)
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)}
    sets = ["task.plugins=[other_task]", "task.families=[rotate,dedupe]", f"seed={args.seed}", *args.set]
    code = subprocess.call([sys.executable, "-m", "rlhf.cli", "run", "--preset", "demo",
                            *[a for s in sets for a in ("--set", s)], "--output", args.output], env=env)
    if code:
        return code
    with open(f"{args.output}/summary.json") as f:
        s = json.load(f)
    keys = ["rm/accuracy", "eval/decisive_win_rate_vs_sft", "eval/decisive_win_rate_lower_vs_sft",
            "eval/tie_rate_vs_sft", "eval/gold_score_sft", "eval/gold_score_policy", "eval/gold_delta",
            "eval/gold_delta_ci95", "eval/kl_vs_sft", "eval/alignment_tax_rel", "ppo/selected_update", "ppo/updates",
            "gate/passed", "gate/reasons", "wall_s"]
    print(json.dumps({k: s.get(k) for k in keys}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
