"""Read user datasets (JSONL file, store URI or Hugging Face dataset) into canonical rows.

Every record goes through :func:`normalize_record`, which accepts the supported
formats for a kind and raises :class:`RowError` with a reason naming the field
otherwise. :func:`read_rows` collects those failures as :class:`BadRow` entries
(``file:line: reason``) and raises :class:`DataError` when the share of bad rows is
above ``max_reject_rate`` or nothing usable is left; it never writes anything.

Accepted formats
----------------
Conversational rows (and prompts written as HH turns) also keep their turns before the
final answer as ``messages``, which a model with a chat template renders with it.

sft
    ``{"prompt": str, "completion": str}``, or ``{"messages": [...]}`` whose last
    message is from the assistant (its content, with a leading space, becomes the
    completion; the earlier messages render to the prompt ending in the assistant cue).
preference
    ``{"prompt": str, "chosen": str, "rejected": str}``;
    conversational ``{"chosen": [...], "rejected": [...]}`` with an optional
    ``"prompt": [...]`` message list (the prompt is the conversation shared by both
    sides before their final assistant message; with a string prompt and
    one-message sides, the string is the user turn);
    Anthropic HH ``{"chosen": str, "rejected": str}`` where both strings share the
    prefix up to and including the last ``"\\n\\nAssistant:"``.
prompt
    ``{"prompt": str}`` or ``{"messages": [...]}`` (rendered ending in the assistant cue;
    the last message must not be from the assistant).

Keys other than the ones a format uses are ignored, and a key whose value is
``None`` counts as missing (Hugging Face datasets fill absent columns with None).
A system message with empty content is dropped; any other empty content is an error.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from rlhf.data.schema import (
    ASSISTANT_CUE,
    ROLE_NAMES,
    DataKind,
    Message,
    PreferenceRow,
    PromptRow,
    Row,
    SFTRow,
    render_messages,
    row_chars,
)

__all__ = [
    "BadRow",
    "ReadReport",
    "DataError",
    "RowError",
    "normalize_record",
    "read_rows",
    "render_messages",
]

_KINDS = ("sft", "preference", "prompt", "ptx")
_BOM = b"\xef\xbb\xbf"
_URI_RE = re.compile(r"^([A-Za-z][A-Za-z0-9+.\-]*)://")
# A Hugging Face hub id: "name" or "org/name".
_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*(/[A-Za-z0-9][A-Za-z0-9_.\-]*)?$")
_FILE_SUFFIXES = (
    ".jsonl", ".json", ".ndjson", ".txt", ".csv", ".tsv", ".parquet", ".arrow",
    ".gz", ".bz2", ".xz", ".zst", ".zip",
)


# --------------------------------------------------------------------------- errors


class RowError(ValueError):
    """One record cannot be normalised; the message is the reason."""


class DataError(ValueError):
    """A data source cannot be used (not found, unreadable, or too many bad rows)."""


@dataclass
class BadRow:
    source: str
    line: int  # 1-based line in the file; row index + 1 for Hugging Face datasets
    reason: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.reason}"


@dataclass
class ReadReport:
    source: str
    kind: str
    total: int  # non-blank rows seen
    accepted: int
    bad: list[BadRow] = field(default_factory=list)

    @property
    def reject_rate(self) -> float:
        return len(self.bad) / self.total if self.total else 0.0

    def summary(self, max_rows: int = 20) -> str:
        lines = [
            f"{self.source} ({self.kind}): {self.accepted} of {self.total} rows accepted, "
            f"{len(self.bad)} rejected ({self.reject_rate:.1%})"
        ]
        lines += [f"  {b}" for b in self.bad[:max_rows]]
        if len(self.bad) > max_rows:
            lines.append(f"  ... and {len(self.bad) - max_rows} more")
        return "\n".join(lines)


# ----------------------------------------------------------------- normalisation


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _present(obj: dict, key: str) -> bool:
    return obj.get(key) is not None


def _get_str(obj: dict, key: str) -> str:
    if not _present(obj, key):
        raise RowError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, str):
        raise RowError(f"field '{key}' must be a string, got {_type_name(value)}")
    if not value.strip():
        raise RowError(f"field '{key}' is empty")
    return value


def _get_messages(obj: dict, key: str) -> list[dict[str, str]]:
    """Validate a message list; returns ``[{"role", "content"}]`` (empty system messages dropped)."""
    if not _present(obj, key):
        raise RowError(f"missing field '{key}'")
    value = obj[key]
    if not isinstance(value, list):
        raise RowError(f"field '{key}' must be a list of messages, got {_type_name(value)}")
    out: list[dict[str, str]] = []
    for i, message in enumerate(value):
        where = f"field '{key}[{i}]'"
        if not isinstance(message, dict):
            raise RowError(f"{where} must be an object with 'role' and 'content', got {_type_name(message)}")
        if message.get("role") is None:
            raise RowError(f"{where} is missing 'role'")
        if message.get("content") is None:
            raise RowError(f"{where} is missing 'content'")
        role, content = message["role"], message["content"]
        if not isinstance(role, str) or role not in ROLE_NAMES:
            raise RowError(f"{where} has unknown role {role!r} (expected system, user or assistant)")
        if not isinstance(content, str):
            raise RowError(f"{where} 'content' must be a string, got {_type_name(content)}")
        if not content.strip():
            if role == "system":
                continue
            raise RowError(f"{where} 'content' is empty")
        out.append({"role": role, "content": content})
    if not out:
        raise RowError(f"field '{key}' is empty")
    return out


def _as_messages(messages: list[dict[str, str]]) -> tuple[Message, ...]:
    return tuple(Message(role=m["role"], content=m["content"]) for m in messages)


_HH_TURN = re.compile(r"\n\n(Human|Assistant|System): ")


def hh_messages(prompt: str) -> tuple[Message, ...] | None:
    """The turns of an HH-style prompt (`\\n\\nHuman: ... \\n\\nAssistant:`), or None when
    it is not cleanly made of such turns (then it stays text)."""
    if not prompt.endswith(ASSISTANT_CUE):
        return None
    body = prompt[: -len(ASSISTANT_CUE)]
    parts = _HH_TURN.split(body)
    if parts[0] != "" or len(parts) < 3:
        return None
    roles = {"Human": "user", "Assistant": "assistant", "System": "system"}
    out = []
    for speaker, content in zip(parts[1::2], parts[2::2]):
        if not content.strip():
            return None
        out.append(Message(role=roles[speaker], content=content))
    return tuple(out) if out[-1].role == "user" else None


def _split_conversation(messages: list[dict[str, str]], key: str) -> tuple[list[dict[str, str]], str]:
    """Split into (messages before the final assistant turn, final assistant content)."""
    last = messages[-1]
    if last["role"] != "assistant":
        raise RowError(f"field '{key}': last message must be from the assistant, got {last['role']!r}")
    if len(messages) < 2:
        raise RowError(f"field '{key}': needs at least one message before the final assistant message")
    return messages[:-1], last["content"]


def _normalize_sft(obj: dict) -> SFTRow:
    if _present(obj, "messages"):
        context, answer = _split_conversation(_get_messages(obj, "messages"), "messages")
        return SFTRow(prompt=render_messages(context, add_generation_prompt=True), completion=" " + answer,
                      messages=_as_messages(context))
    prompt = _get_str(obj, "prompt")
    return SFTRow(prompt=prompt, completion=_get_str(obj, "completion"), messages=hh_messages(prompt))


def _hh_split(text: str, key: str) -> tuple[str, str]:
    idx = text.rfind(ASSISTANT_CUE)
    if idx < 0:
        raise RowError(
            f"field '{key}' has no '\\n\\nAssistant:' turn (no 'prompt' field, so HH format was assumed)"
        )
    cut = idx + len(ASSISTANT_CUE)
    return text[:cut], text[cut:]


def _normalize_preference(obj: dict) -> PreferenceRow:
    for key in ("chosen", "rejected"):
        if not _present(obj, key):
            raise RowError(f"missing field '{key}'")
    chosen, rejected = obj["chosen"], obj["rejected"]
    prompt = obj.get("prompt")

    if isinstance(chosen, list) or isinstance(rejected, list) or isinstance(prompt, list):
        # Conversational.
        for key in ("chosen", "rejected"):
            if not isinstance(obj[key], list):
                raise RowError(
                    f"field '{key}' must be a list of messages like the other fields, got {_type_name(obj[key])}"
                )
        chosen_msgs = _get_messages(obj, "chosen")
        rejected_msgs = _get_messages(obj, "rejected")
        if prompt is None:
            prompt_msgs: list[dict[str, str]] = []
        elif isinstance(prompt, list):
            prompt_msgs = _get_messages(obj, "prompt")
        elif isinstance(prompt, str):
            # A string prompt next to message lists: it is the user turn when the sides
            # hold only the answer; otherwise the sides are full conversations.
            single = len(chosen_msgs) == 1 and len(rejected_msgs) == 1
            prompt_msgs = [{"role": "user", "content": _get_str(obj, "prompt")}] if single else []
        else:
            raise RowError(f"field 'prompt' must be a string or a list of messages, got {_type_name(prompt)}")
        c_context, c_answer = _split_conversation(prompt_msgs + chosen_msgs, "chosen")
        r_context, r_answer = _split_conversation(prompt_msgs + rejected_msgs, "rejected")
        if c_context != r_context:
            raise RowError(
                "fields 'chosen' and 'rejected' do not share the same conversation before their final "
                "assistant message (no shared prompt)"
            )
        row = PreferenceRow(
            prompt=render_messages(c_context, add_generation_prompt=True),
            chosen=" " + c_answer,
            rejected=" " + r_answer,
            messages=_as_messages(c_context),
        )
    elif prompt is not None:
        text = _get_str(obj, "prompt")
        row = PreferenceRow(prompt=text, chosen=_get_str(obj, "chosen"), rejected=_get_str(obj, "rejected"),
                            messages=hh_messages(text))
    else:
        # Anthropic HH: the prompt is implicit in both strings.
        chosen, rejected = _get_str(obj, "chosen"), _get_str(obj, "rejected")
        c_prompt, c_answer = _hh_split(chosen, "chosen")
        r_prompt, r_answer = _hh_split(rejected, "rejected")
        if c_prompt != r_prompt:
            raise RowError(
                "fields 'chosen' and 'rejected' do not share a prompt prefix "
                "(HH format: everything up to the last '\\n\\nAssistant:' must be identical)"
            )
        for key, answer in (("chosen", c_answer), ("rejected", r_answer)):
            if not answer.strip():
                raise RowError(f"field '{key}' has an empty response after the last '\\n\\nAssistant:'")
        row = PreferenceRow(prompt=c_prompt, chosen=c_answer, rejected=r_answer, messages=hh_messages(c_prompt))

    if row.chosen == row.rejected:
        raise RowError("fields 'chosen' and 'rejected' are identical")
    return row


def _normalize_ptx(obj: dict) -> SFTRow:
    """PPO-ptx text: {text} (every token trained on: an SFT row with an empty prompt), or a
    demonstration in any SFT format."""
    if _present(obj, "text"):
        return SFTRow(prompt="", completion=_get_str(obj, "text"))
    if not any(_present(obj, k) for k in ("prompt", "completion", "messages")):
        raise RowError("a ptx row needs field 'text' (or a demonstration: 'prompt' + 'completion', or 'messages')")
    return _normalize_sft(obj)


def _normalize_prompt(obj: dict) -> PromptRow:
    if _present(obj, "messages") and not _present(obj, "prompt"):
        messages = _get_messages(obj, "messages")
        if messages[-1]["role"] == "assistant":
            raise RowError(
                "field 'messages': last message is from the assistant; a prompt must end with a user "
                "or system message"
            )
        return PromptRow(prompt=render_messages(messages, add_generation_prompt=True), messages=_as_messages(messages))
    prompt = _get_str(obj, "prompt")
    return PromptRow(prompt=prompt, messages=hh_messages(prompt))


def normalize_record(obj: Any, kind: DataKind, *, max_chars: int | None = None) -> Row:
    """Turn one parsed record into a canonical row, or raise :class:`RowError`."""
    if kind not in _KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(_KINDS)})")
    if not isinstance(obj, dict):
        raise RowError(f"row is not a JSON object (got {_type_name(obj)})")
    if kind == "sft":
        row: Row = _normalize_sft(obj)
    elif kind == "preference":
        row = _normalize_preference(obj)
    elif kind == "ptx":
        row = _normalize_ptx(obj)
    else:
        row = _normalize_prompt(obj)
    if max_chars is not None:
        n = row_chars(row)
        if n > max_chars:
            raise RowError(f"row too long: {n} characters > max_chars {max_chars}")
    return row


# -------------------------------------------------------------------- sources


def _load_hf(name: str, split: str, config: str | None = None, revision: str | None = None) -> Iterable[dict]:
    """Load a Hugging Face dataset split (tests replace this function)."""
    try:
        import datasets
    except ImportError as e:  # pragma: no cover - datasets is a dependency
        raise DataError(f"reading Hugging Face dataset {name!r} needs the 'datasets' package") from e
    return datasets.load_dataset(name, config, split=split, revision=revision)


_HF_OPTIONS = ("config", "split", "revision")


def hf_source(source: str, split: str, config: str | None, revision: str | None) -> tuple[str, dict]:
    """A dataset name and its load options: `name` or `name?config=x&split=y&revision=z`
    (the query wins over the run-wide data.hf_* settings)."""
    name, _, query = source.partition("?")
    opts = {"split": split, "config": config, "revision": revision}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if key not in _HF_OPTIONS or not eq or not value:
            raise DataError(f"{source}: unknown or empty dataset option {part!r}; use "
                            "hf://org/name?config=NAME&split=SPLIT&revision=SHA")
        opts[key] = unquote(value)
    return name.strip("/"), opts


def _looks_like_hub_id(source: str) -> bool:
    if source.startswith((".", "/", "~")) or "\\" in source:
        return False
    if source.lower().endswith(_FILE_SUFFIXES):
        return False
    return bool(_HUB_ID_RE.match(source.partition("?")[0]))


MAX_LINE_BYTES = 8 * 1024 * 1024
"""Longest JSONL line read (bytes, before decoding): a longer one is a bad row, not a
multi-GB string in memory."""
MAX_DEPTH = 64
"""Deepest nesting of arrays and objects in one row (rows are objects of strings and
message lists: 3 levels); deeper is a bad row, not a RecursionError."""


def _no_constant(name: str):
    raise RowError(f"non-finite number {name} (JSON has no NaN or Infinity)")


def _pairs(pairs: list[tuple[str, Any]]) -> dict:
    out = {}
    for k, v in pairs:
        if k in out:
            raise RowError(f"duplicate key {k!r} in one object (which one counts is ambiguous)")
        out[k] = v
    return out


def _nesting(text: str) -> int:
    """Deepest bracket nesting outside strings (a linear scan, run before parsing)."""
    depth = deepest = 0
    in_str = escaped = False
    for ch in text:
        if in_str:
            escaped, in_str = (False, True) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            in_str = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _check_text(obj: Any) -> None:
    """Every string (and key) must be encodable UTF-8: JSON escapes can spell lone
    surrogates (\\ud800) that no tokenizer, hash or file write accepts. Every number
    must be finite (1e999 parses as infinity)."""
    stack = [obj]
    while stack:
        x = stack.pop()
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError as e:
                raise RowError(f"invalid Unicode: a lone surrogate \\u{ord(x[e.start]):04x} "
                               "(an escape that is not a character)") from None
        elif isinstance(x, float) and not math.isfinite(x):
            raise RowError("a number out of range (it overflows to infinity)")
        elif isinstance(x, dict):
            stack += [*x.keys(), *x.values()]
        elif isinstance(x, list):
            stack += x


def parse_json_line(text: str) -> Any:
    """One JSONL line parsed strictly: RowError for bad JSON, nesting deeper than
    MAX_DEPTH, duplicate keys, NaN/Infinity, integers too long to convert, lone surrogates."""
    if text.count("[") + text.count("{") > MAX_DEPTH and _nesting(text) > MAX_DEPTH:  # counts: C speed
        raise RowError(f"nesting deeper than {MAX_DEPTH} levels")
    try:
        obj = json.loads(text, object_pairs_hook=_pairs, parse_constant=_no_constant)
    except json.JSONDecodeError as e:
        raise RowError(f"invalid JSON: {e.msg} (column {e.colno})") from None
    except RecursionError:
        raise RowError(f"nesting deeper than {MAX_DEPTH} levels") from None
    except RowError:
        raise
    except ValueError:  # an integer over Python's 4300-digit conversion limit
        raise RowError("a number too long to read (over 4300 digits)") from None
    _check_text(obj)
    return obj


def _iter_jsonl(data: bytes) -> Iterable[tuple[int, Any | RowError]]:
    """Yield (1-based line, parsed object or RowError) for each non-blank line."""
    return _iter_lines(data.split(b"\n"))


def _iter_lines(lines: Iterable[bytes]) -> Iterable[tuple[int, Any | RowError]]:
    """`_iter_jsonl` over lines without their newline (a BOM may open the first)."""
    for lineno, raw in enumerate(lines, start=1):
        if lineno == 1 and raw.startswith(_BOM):
            raw = raw[len(_BOM):]
        if raw.endswith(b"\r"):
            raw = raw[:-1]
        if len(raw) > MAX_LINE_BYTES:
            yield lineno, RowError(f"line is {len(raw)} bytes, over the {MAX_LINE_BYTES}-byte limit of one row")
            continue
        try:
            text = raw.decode("utf-8", errors="strict")
        except UnicodeDecodeError as e:
            yield lineno, RowError(f"invalid UTF-8 at byte {e.start} of the line")
            continue
        if not text.strip():
            continue
        try:
            yield lineno, parse_json_line(text)
        except RowError as e:
            yield lineno, e


def _check_local(path: Path, label: str) -> None:
    if not path.exists():
        raise DataError(f"file not found: {label}")
    if path.is_dir():
        raise DataError(f"{label} is a directory; give one JSONL file per data source")
    try:
        path.open("rb").close()
    except OSError as e:
        raise DataError(f"cannot read {label}: {e}") from e


def _iter_jsonl_file(path: Path, label: str) -> Iterable[tuple[int, Any | RowError]]:
    """`_iter_jsonl` over a local file, a line at a time: memory does not grow with the file."""
    _check_local(path, label)

    def lines() -> Iterable[bytes]:
        try:
            with path.open("rb") as f:
                for raw in f:
                    yield raw[:-1] if raw.endswith(b"\n") else raw
        except OSError as e:
            raise DataError(f"cannot read {label}: {e}") from e

    return _iter_lines(lines())


def check_report(report: ReadReport, max_reject_rate: float) -> None:
    """DataError (naming the first bad rows and the fix) when a source is empty or has
    more bad rows than `max_reject_rate` allows."""
    _check(report, max_reject_rate)


def _check(report: ReadReport, max_reject_rate: float) -> None:
    if report.total == 0:
        raise DataError(f"{report.source}: no rows found (the {report.kind} data source is empty)")
    too_many = report.reject_rate > max_reject_rate
    if not too_many and report.accepted > 0:
        return
    head = (
        f"{report.source}: {len(report.bad)} of {report.total} {report.kind} rows rejected "
        f"(reject rate {report.reject_rate:.2%}, allowed {max_reject_rate:.2%} via data.max_reject_rate)"
    )
    if not too_many:
        head += "; no rows were accepted"
    lines = [head, "first bad rows:"]
    lines += [f"  {b}" for b in report.bad[:20]]
    if len(report.bad) > 20:
        lines.append(f"  ... and {len(report.bad) - 20} more")
    lines.append(
        "fix: fix or remove these rows, or raise data.max_reject_rate "
        f"(currently {max_reject_rate}); nothing was written."
    )
    raise DataError("\n".join(lines))


def read_rows(
    source: str,
    kind: DataKind,
    *,
    max_reject_rate: float = 0.0,
    max_chars: int | None = None,
    read_bytes: Callable[[str], bytes] | None = None,
    hf_split: str = "train",
    hf_config: str | None = None,
    hf_revision: str | None = None,
) -> tuple[list[Row], ReadReport]:
    """Read one data source and normalise it to canonical rows of ``kind``.

    ``source`` is a local path or ``file://`` URI, any other ``scheme://`` URI (read
    through ``read_bytes``, e.g. a store's ``read_bytes``), ``hf://org/name``, or a bare
    hub id (``name`` / ``org/name``) that is not a local file.
    """
    if not 0.0 <= max_reject_rate <= 1.0:
        raise ValueError(f"max_reject_rate must be within [0, 1], got {max_reject_rate}")
    label, records = open_source(source, read_bytes=read_bytes, hf_split=hf_split, hf_config=hf_config,
                                 hf_revision=hf_revision)
    report = ReadReport(source=label, kind=kind, total=0, accepted=0)
    rows = list(iter_rows(records, kind, report, max_chars=max_chars))
    _check(report, max_reject_rate)
    return rows, report


def iter_rows(records: Iterable[tuple[int, Any]], kind: DataKind, report: ReadReport, *,
              max_chars: int | None = None) -> Iterable[Row]:
    """The canonical rows of `records` (from `open_source`), one at a time; every record
    counts in `report`, and a bad one goes to `report.bad` instead of out. Check the
    report (`check_report`) when the iteration has ended."""
    if kind not in _KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(_KINDS)})")
    for line, obj in records:
        report.total += 1
        try:
            if isinstance(obj, RowError):
                raise obj
            row = normalize_record(obj, kind, max_chars=max_chars)
        except RowError as e:
            report.bad.append(BadRow(source=report.source, line=line, reason=str(e)))
            continue
        except Exception as e:  # noqa: BLE001 - a row no rule foresaw is still a bad row, never a traceback
            reason = f"unreadable row ({type(e).__name__}: {e})"
            report.bad.append(BadRow(source=report.source, line=line, reason=reason))
            continue
        report.accepted += 1
        yield row


def open_source(source: str, *, read_bytes: Callable[[str], bytes] | None = None, hf_split: str = "train",
                hf_config: str | None = None, hf_revision: str | None = None
                ) -> tuple[str, Iterable[tuple[int, Any]]]:
    """(label, records) of one data source: (1-based line, parsed object or RowError).
    A local file is read a line at a time and a Hugging Face dataset a record at a
    time; a `scheme://` object through `read_bytes`, whole."""
    source = str(source)

    records: Iterable[tuple[int, Any]]
    m = _URI_RE.match(source)
    scheme = m.group(1).lower() if m else None
    hf_name: str | None = None
    if scheme == "hf":
        hf_name = source[len("hf://"):].strip("/")
        if not hf_name:
            raise DataError(f"{source}: missing dataset name after hf://")
    elif scheme == "file":
        parsed = urlparse(source)
        netloc = "" if parsed.netloc in ("", "localhost") else parsed.netloc
        label = source
        records = _iter_jsonl_file(Path(unquote(netloc + parsed.path)), label)
    elif scheme is not None:
        if read_bytes is None:
            raise DataError(
                f"{source}: reading a {scheme}:// source needs a store (pass read_bytes); "
                "configure the artifact store or copy the file locally"
            )
        try:
            data = read_bytes(source)
        except Exception as e:  # noqa: BLE001 - any store failure becomes a clear data error
            raise DataError(f"cannot read {source}: {type(e).__name__}: {e}") from e
        records = _iter_jsonl(data)
        label = source
    else:
        path = Path(os.path.expanduser(source))
        if path.exists() or not _looks_like_hub_id(source):
            label = source
            records = _iter_jsonl_file(path, source)
        else:
            hf_name = source

    if hf_name is not None:
        hf_name, opts = hf_source(hf_name, hf_split, hf_config, hf_revision)
        extra = {k: opts[k] for k in ("config", "revision") if opts[k]}
        label = f"hf://{hf_name}" + (f"/{opts['config']}" if opts["config"] else "") + f"[{opts['split']}]" + (
            f"@{opts['revision']}" if opts["revision"] else "")
        try:
            dataset = _load_hf(hf_name, opts["split"], **extra)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001
            hint = "" if scheme == "hf" else f" (no local file named {source!r} exists either)"
            what = ", ".join(f"{k} {v!r}" for k, v in opts.items() if v)
            raise DataError(
                f"cannot load Hugging Face dataset {hf_name!r} ({what}){hint}: {type(e).__name__}: {e}; check the "
                "name, data.hf_config (the dataset's subset), data.hf_split and data.hf_revision"
            ) from e
        records = ((i + 1, rec) for i, rec in enumerate(dataset))
    return label, records
