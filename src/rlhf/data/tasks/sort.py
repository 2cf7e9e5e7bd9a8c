"""Sort numbers ascending: `sort: 7 2 9` -> ` 2 7 9`."""

from __future__ import annotations

import random

from rlhf.data.tasks.base import TaskFamily, register

NUMBERS = [str(i) for i in range(20)]


@register
class Sort(TaskFamily):
    name = "sort"
    prompt_prefix = "sort:"

    def alphabet(self) -> list[str]:
        return NUMBERS

    def make_items(self, rng: random.Random, n: int) -> list[str]:
        return [str(rng.randrange(20)) for _ in range(n)]

    def target(self, items: list[str]) -> list[str]:
        return sorted(items, key=int)
