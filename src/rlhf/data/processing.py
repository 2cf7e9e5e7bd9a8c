"""Deterministic processing of canonical rows: split, dedupe, length filter, JSONL hand-off, hashing."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

from pydantic import ValidationError

from rlhf.data.readers import DataError
from rlhf.data.schema import ROW_TYPES, DataKind, PreferenceRow, PromptRow, Row, SFTRow

__all__ = [
    "split_by_hash",
    "dedupe",
    "filter_by_length",
    "LengthFilter",
    "text_lengths",
    "canonical_line",
    "write_jsonl",
    "read_jsonl_rows",
    "iter_jsonl_rows",
    "JsonlSink",
    "ScoreRange",
    "row_score",
    "data_hash",
]


def _eval_score(prompt: str, salt: str) -> float:
    digest = hashlib.sha256((salt + prompt).encode("utf-8")).hexdigest()
    return int(digest[:16], 16) / 16**16


def split_key(row: Row) -> str:
    """What a row is split by: its prompt (rendered turns for conversations); a plain text
    row (`{"text": ...}`, no prompt) by its text, so such rows do not all hash alike."""
    return row.prompt or getattr(row, "completion", "")


def split_by_hash(rows: Sequence[Row], eval_fraction: float, salt: str = "") -> tuple[list[Row], list[Row]]:
    """Split into (train, eval) by a hash of ``salt + prompt`` (`split_key`).

    Deterministic and keyed by prompt: every row sharing a prompt lands on the same
    side, so no prompt leaks between train and eval. Order is kept within each side.
    With 0 < eval_fraction < 1 and at least two distinct prompts, neither side is left
    empty: a small dataset whose hashes all fall on one side gives its lowest-hashed
    prompt to eval (or its highest to train), still a function of the prompts alone.
    """
    if not 0.0 <= eval_fraction <= 1.0:
        raise ValueError(f"eval_fraction must be within [0, 1], got {eval_fraction}")
    score = {k: _eval_score(k, salt) for k in dict.fromkeys(split_key(r) for r in rows)}
    levels = ScoreRange()
    for v in score.values():
        levels.add(v)
    cut = levels.cut(eval_fraction)
    train: list[Row] = []
    evals: list[Row] = []
    for row in rows:
        (evals if score[split_key(row)] < cut else train).append(row)
    return train, evals


class ScoreRange:
    """The two lowest and two highest distinct prompt scores seen: all `split_by_hash`
    needs to place its cut, so a stream of rows can be split without holding them."""

    def __init__(self):
        self.low: list[float] = []
        self.high: list[float] = []

    def add(self, v: float) -> None:
        if v not in self.low:
            self.low = sorted([*self.low, v])[:2]
        if v not in self.high:
            self.high = sorted([*self.high, v])[-2:]

    def cut(self, eval_fraction: float) -> float:
        """Score below which a prompt is held out: `eval_fraction`, moved so that neither
        side is empty when there are two different prompts (see `split_by_hash`)."""
        if not 0.0 <= eval_fraction <= 1.0:
            raise ValueError(f"eval_fraction must be within [0, 1], got {eval_fraction}")
        cut = eval_fraction
        if 0.0 < eval_fraction < 1.0 and len(self.low) >= 2:
            if self.low[0] >= cut:  # nothing held out: the lowest-hashed prompt is
                cut = (self.low[0] + self.low[1]) / 2
            elif self.high[-1] < cut:  # nothing left to train on: the highest-hashed prompt trains
                cut = (self.high[-2] + self.high[-1]) / 2
        return cut


def row_score(row: Row, salt: str) -> float:
    """The hash score `split_by_hash` compares with its cut (eval below it)."""
    return _eval_score(split_key(row), salt)


def _key(row: Row) -> tuple:
    return (type(row).__name__, canonical_line(row))


def dedupe(rows: Iterable[Row]) -> tuple[list[Row], int]:
    """Drop exact duplicate rows (same type and fields), keeping the first; returns (rows, n_dropped)."""
    seen: set[tuple] = set()
    kept: list[Row] = []
    dropped = 0
    for row in rows:
        k = _key(row)
        if k in seen:
            dropped += 1
            continue
        seen.add(k)
        kept.append(row)
    return kept, dropped


def text_lengths(count_tokens: Callable[[str], int]) -> Callable[[Row], tuple[int, int]]:
    """`(prompt tokens, total tokens)` of a row as text: the prompt, plus its longest
    answer and one EOS (the prompt and one EOS for prompt rows)."""

    def measure(row: Row) -> tuple[int, int]:
        n_prompt = count_tokens(row.prompt)
        if isinstance(row, SFTRow):
            n_response = count_tokens(row.completion)
        elif isinstance(row, PreferenceRow):
            n_response = max(count_tokens(row.chosen), count_tokens(row.rejected))
        elif isinstance(row, PromptRow):
            n_response = 0
        else:
            raise TypeError(f"not a canonical row: {type(row).__name__}")
        return n_prompt, n_prompt + n_response + 1

    return measure


class LengthFilter:
    """Drops rows whose prompt or whole sequence is too long (in tokens, as
    `measure(row) -> (prompt, total)` counts them: `text_lengths`, or a chat format's),
    a row at a time: iterate `filter(rows)`, then read `counts`. A row with a too-long
    prompt counts only under ``dropped_prompt_too_long``; ``over_long_rate`` is the
    share of rows dropped."""

    def __init__(self, measure: Callable[[Row], tuple[int, int]], max_prompt_tokens: int, max_total_tokens: int):
        self.measure, self.max_prompt, self.max_total = measure, max_prompt_tokens, max_total_tokens
        self.seen = self.kept = self.too_long_prompt = self.too_long_total = 0

    def filter(self, rows: Iterable[Row]) -> Iterator[Row]:
        for row in rows:
            self.seen += 1
            n_prompt, n_total = self.measure(row)
            if n_prompt > self.max_prompt:
                self.too_long_prompt += 1
            elif n_total > self.max_total:
                self.too_long_total += 1
            else:
                self.kept += 1
                yield row

    @property
    def counts(self) -> dict[str, int | float]:
        dropped = self.too_long_prompt + self.too_long_total
        return {"kept": self.kept, "dropped_prompt_too_long": self.too_long_prompt,
                "dropped_total_too_long": self.too_long_total,
                "over_long_rate": dropped / self.seen if self.seen else 0.0}


def filter_by_length(
    rows: Iterable[Row],
    measure: Callable[[Row], tuple[int, int]],
    max_prompt_tokens: int,
    max_total_tokens: int,
) -> tuple[list[Row], dict[str, int | float]]:
    """`LengthFilter` over a whole list: (kept rows, counts)."""
    f = LengthFilter(measure, max_prompt_tokens, max_total_tokens)
    kept = list(f.filter(rows))
    return kept, f.counts


def canonical_line(row: Row) -> str:
    """The canonical JSON text of a row: sorted keys, compact, UTF-8 kept as is; a row
    without messages has no `messages` key (so plain rows hash as they always did)."""
    return json.dumps(row.model_dump(exclude_none=True), sort_keys=True, ensure_ascii=False, separators=(",", ":"))


def _canonical_bytes(rows: Iterable[Row]) -> bytes:
    return "".join(canonical_line(r) + "\n" for r in rows).encode("utf-8")


def data_hash(rows: Iterable[Row]) -> str:
    """sha256 over the canonical JSON lines; equals the sha256 of the file ``write_jsonl`` writes."""
    return hashlib.sha256(_canonical_bytes(rows)).hexdigest()


def write_jsonl(rows: Iterable[Row], path: str | os.PathLike) -> Path:
    """Write canonical rows as JSONL atomically (temp file in the same folder, then os.replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = _canonical_bytes(rows)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def read_jsonl_rows(path: str | os.PathLike, kind: DataKind) -> list[Row]:
    """Read a canonical JSONL file written by :func:`write_jsonl` (strict: exact fields only)."""
    return list(iter_jsonl_rows(path, kind))


def iter_jsonl_rows(path: str | os.PathLike, kind: DataKind) -> Iterator[Row]:
    """`read_jsonl_rows` one row at a time."""
    if kind not in ROW_TYPES:
        raise ValueError(f"unknown data kind {kind!r}")
    model = ROW_TYPES[kind]
    path = Path(path)
    if not path.is_file():
        raise DataError(f"file not found: {path}")
    with path.open("r", encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield model.model_validate_json(line)  # type: ignore[misc]
            except ValidationError as e:
                raise DataError(
                    f"{path}:{lineno}: not a canonical {kind} row: {e.errors()[0]['msg']} "
                    f"(this file should have been written by write_jsonl)"
                ) from e


class JsonlSink:
    """A canonical JSONL file written a row at a time, with its row count and the sha256
    of its bytes (`data_hash` of the rows written), optionally dropping exact duplicates
    (same type and fields: a 16-byte digest per row kept, not the row)."""

    def __init__(self, path: str | os.PathLike, dedupe: bool = False):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = self.path.open("w", encoding="utf-8")
        self._sha = hashlib.sha256()
        self._seen: set[bytes] | None = set() if dedupe else None
        self.rows = 0
        self.duplicates = 0

    def add(self, row: Row) -> bool:
        """Write `row` (False: an exact duplicate, dropped)."""
        line = canonical_line(row) + "\n"
        if self._seen is not None:
            digest = hashlib.blake2b(f"{type(row).__name__}\n{line}".encode("utf-8"), digest_size=16).digest()
            if digest in self._seen:
                self.duplicates += 1
                return False
            self._seen.add(digest)
        data = line.encode("utf-8")
        self._f.write(line)
        self._sha.update(data)
        self.rows += 1
        return True

    def close(self) -> "JsonlSink":
        self._f.close()
        self._seen = None
        return self

    @property
    def sha256(self) -> str:
        return self._sha.hexdigest()
