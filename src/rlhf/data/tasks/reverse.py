"""Reverse a sequence of letters: `reverse: c a d` -> ` d a c`."""

from __future__ import annotations

import random

from rlhf.data.tasks.base import TaskFamily, register

LETTERS = list("abcdefgh")


@register
class Reverse(TaskFamily):
    name = "reverse"
    prompt_prefix = "reverse:"

    def alphabet(self) -> list[str]:
        return LETTERS

    def make_items(self, rng: random.Random, n: int) -> list[str]:
        return [rng.choice(LETTERS) for _ in range(n)]

    def target(self, items: list[str]) -> list[str]:
        return items[::-1]
