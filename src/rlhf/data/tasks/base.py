"""The task-family interface and the pieces every family shares.

A family says three things: how to draw a prompt (`make_items` + `prompt_prefix`),
what the ideal answer is (`target`), and how good any answer is (`gold_score`, the
judge the reward model never sees). Noisy human behaviour (mistakes, verbosity) is
shared here so every family gets the same kinds of imperfection.

Answers are item sequences written as " x y z" (leading space, single spaces).
The gold score is edit similarity to the target, 1 - levenshtein(answer, target) /
max(len): how much of the answer is right, counted in the edits needed to fix it
(1.0 only when exact), minus `VERBOSITY_PENALTY` when the answer carries filler
words: labelers, like InstructGPT's, prefer answers that are correct and to the point.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod

VERBOSITY_PENALTY = 0.5
FILLER_PREFIXES = ["sure , here it is :", "ok :", "the answer is", "let me think . it is"]
FILLER_SUFFIXES = ["hope this helps", "done", "that is all", "easy"]

FAMILIES: dict[str, "TaskFamily"] = {}


def register(cls):
    """Class decorator: make a family available by its `name`."""
    inst = cls()
    if inst.name in FAMILIES:
        raise ValueError(f"task family {inst.name!r} is registered twice")
    FAMILIES[inst.name] = inst
    return cls


def families(names: list[str]) -> list["TaskFamily"]:
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown task families {unknown}; available: {sorted(FAMILIES)}")
    return [FAMILIES[n] for n in names]


def find_family(prompt: str) -> "TaskFamily | None":
    for fam in FAMILIES.values():
        if fam.parse_prompt(prompt) is not None:
            return fam
    return None


def gold_score(prompt: str, completion: str) -> float | None:
    """Gold score of a completion, or None when no built-in family owns the prompt."""
    fam = find_family(prompt)
    return None if fam is None else fam.gold_score(prompt, completion)


def levenshtein(a: list[str], b: list[str]) -> int:
    """Fewest insertions, deletions and substitutions turning a into b."""
    prev = list(range(len(b) + 1))
    for i, x in enumerate(a, 1):
        cur = [i]
        for j, y in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (x != y)))
        prev = cur
    return prev[-1]


def edit_similarity(answer: list[str], target: list[str]) -> float:
    """1 - edit distance / length of the longer sequence (1.0 only when equal)."""
    n = max(len(answer), len(target))
    return 1.0 if n == 0 else 1.0 - levenshtein(answer, target) / n


class TaskFamily(ABC):
    name: str = ""
    prompt_prefix: str = ""

    @abstractmethod
    def alphabet(self) -> list[str]:
        """Every item that may appear in prompts and answers."""

    @abstractmethod
    def make_items(self, rng: random.Random, n: int) -> list[str]:
        """The items of one task instance."""

    @abstractmethod
    def target(self, items: list[str]) -> list[str]:
        """The ideal answer's items."""

    # -- shared behaviour -------------------------------------------------------

    def prompt(self, items: list[str]) -> str:
        return f"{self.prompt_prefix} " + " ".join(items)

    def parse_prompt(self, prompt: str) -> list[str] | None:
        head = self.prompt_prefix + " "
        if not prompt.startswith(head):
            return None
        items = prompt[len(head):].split()
        allowed = set(self.alphabet())
        return items if items and all(i in allowed for i in items) else None

    def format_answer(self, items: list[str]) -> str:
        return " " + " ".join(items)

    def gold_score(self, prompt: str, completion: str) -> float:
        items = self.parse_prompt(prompt)
        if items is None:
            raise ValueError(f"prompt does not belong to task family {self.name!r}: {prompt!r}")
        allowed = set(self.alphabet())
        words = completion.split()
        answer = [w for w in words if w in allowed]
        verbose = len(answer) != len(words)
        score = edit_similarity(answer, self.target(items))
        return score - VERBOSITY_PENALTY * verbose

    def mistake(self, rng: random.Random, items: list[str], answer: list[str]) -> list[str]:
        """A human-like mistake: swap neighbours, drop, repeat, replace, or skip the work."""
        out = list(answer)
        kind = rng.choice(["swap", "drop", "repeat", "replace", "lazy"])
        if kind == "lazy" and out != items:
            return list(items)
        i = rng.randrange(len(out))
        if kind in ("swap", "lazy") and len(out) > 1:
            j = i + 1 if i + 1 < len(out) else i - 1
            out[i], out[j] = out[j], out[i]
        elif kind == "drop" and len(out) > 1:
            del out[i]
        elif kind == "repeat":
            out.insert(i, out[i])
        else:
            choices = [a for a in self.alphabet() if a != out[i]]
            out[i] = rng.choice(choices)
        return out if out != answer else out + [out[-1]]

    def respond(self, rng: random.Random, prompt: str, correct_rate: float, verbose_rate: float) -> str:
        """One imperfect human answer: exact with `correct_rate`; otherwise verbose
        (right but padded with filler) with `verbose_rate`, else a mistake (which may
        itself be verbose)."""
        items = self.parse_prompt(prompt)
        answer = self.target(items)
        if rng.random() < correct_rate:
            return self.format_answer(answer)
        if rng.random() < verbose_rate:
            return self._verbose(rng, answer)
        wrong = self.mistake(rng, items, answer)
        return self._verbose(rng, wrong) if rng.random() < 0.3 else self.format_answer(wrong)

    def _verbose(self, rng: random.Random, answer: list[str]) -> str:
        text = " ".join(answer)
        if rng.random() < 0.5:
            return f" {rng.choice(FILLER_PREFIXES)} {text}"
        return f" {text} , {rng.choice(FILLER_SUFFIXES)}"
