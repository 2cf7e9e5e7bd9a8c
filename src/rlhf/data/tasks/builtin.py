"""Generate the built-in task's raw datasets: demonstrations, comparisons, prompts.

The output is ordinary JSONL in the formats users bring, so the built-in task goes
through exactly the same readers, cleaning and splits as user data.

Simulated labelers compare two answers by the gold score with Bradley-Terry noise:
P(a preferred) = sigmoid((gold_a - gold_b) / temperature); exact gold ties are a
coin flip, as for a human who sees no difference. Ranking several answers, a labeler
orders them by gold / temperature plus standard Gumbel noise (Plackett-Luce): one
consistent order whose every pair is chosen with exactly those Bradley-Terry odds
(the difference of two standard Gumbel draws is standard logistic).
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from rlhf.config import TaskConfig
from rlhf.data.tasks.plugins import resolve_families

CANDIDATE_CORRECT_RATE = 0.5
"""Answers shown to labelers come from several imperfect writers: half are exact."""


class BuiltinTask:
    def __init__(self, cfg: TaskConfig, seed: int):
        self.cfg = cfg
        self.families = resolve_families(cfg.families, cfg.plugins)
        self.seed = seed

    def _prompt(self, rng: random.Random) -> str:
        fam = rng.choice(self.families)
        n = rng.randint(self.cfg.min_items, self.cfg.max_items)
        return fam.prompt(fam.make_items(rng, n))

    def _family(self, prompt: str):
        return next(f for f in self.families if f.parse_prompt(prompt) is not None)

    def demonstrations(self, rng: random.Random) -> list[dict]:
        rows = []
        for _ in range(self.cfg.num_demonstrations):
            p = self._prompt(rng)
            c = self._family(p).respond(rng, p, self.cfg.demo_correct_rate, self.cfg.demo_verbose_rate)
            rows.append({"prompt": p, "completion": c})
        return rows

    def comparisons(self, rng: random.Random) -> list[dict]:
        rows = []
        while len(rows) < self.cfg.num_comparisons:
            p = self._prompt(rng)
            fam = self._family(p)
            a = fam.respond(rng, p, CANDIDATE_CORRECT_RATE, self.cfg.demo_verbose_rate)
            b = fam.respond(rng, p, CANDIDATE_CORRECT_RATE, self.cfg.demo_verbose_rate)
            if a == b:
                continue
            chosen, rejected = self.label(rng, p, a, b)
            rows.append({"prompt": p, "chosen": chosen, "rejected": rejected})
        return rows

    def label(self, rng: random.Random, prompt: str, a: str, b: str) -> tuple[str, str]:
        """A simulated labeler's choice: (chosen, rejected) with Bradley-Terry noise."""
        fam = self._family(prompt)
        diff = fam.gold_score(prompt, a) - fam.gold_score(prompt, b)
        p_a = 1.0 / (1.0 + math.exp(-diff / self.cfg.labeler_temperature))
        return (a, b) if rng.random() < p_a else (b, a)

    def rank(self, rng: random.Random, prompt: str, answers: list[str]) -> list[str]:
        """A simulated labeler's ranking of `answers`, best first (Plackett-Luce on the gold score)."""
        fam = self._family(prompt)
        t = self.cfg.labeler_temperature
        keys = [fam.gold_score(prompt, a) / t - math.log(max(rng.expovariate(1.0), 1e-300)) for a in answers]
        return [a for _, a in sorted(zip(keys, answers), key=lambda x: -x[0])]

    def prompts(self, rng: random.Random) -> list[dict]:
        return [{"prompt": self._prompt(rng)} for _ in range(self.cfg.num_prompts)]

    def write(self, folder: Path) -> dict[str, Path]:
        """Write sft.jsonl, preferences.jsonl, prompts.jsonl; return their paths."""
        folder.mkdir(parents=True, exist_ok=True)
        out = {}
        for i, (name, fn) in enumerate([("sft", self.demonstrations), ("preference", self.comparisons),
                                        ("prompt", self.prompts)]):
            rng = random.Random(f"{self.seed}-{name}-{i}")
            path = folder / f"{name}.jsonl"
            with open(path, "w") as f:
                for row in fn(rng):
                    f.write(json.dumps(row) + "\n")
            out[name] = path
        return out
