"""Input that cannot crash prep (issue 14, acceptance 7): generated files go through the
prep readers (`read_rows`, every kind) and come out as rows or as a DataError whose
message names `file:line: reason`; never another exception.

Three generators, 10,500 inputs in all (5000 + 3000 + 2500) (derandomized, so CI sees the same ones each
time): raw bytes; JSON documents built from every kind of value (huge and non-finite
numbers, lone surrogate escapes, duplicate keys, control characters); and near-valid
rows whose fields are replaced by those values, plus pathological nesting."""

from __future__ import annotations

import json

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rlhf.data.readers import DataError, read_rows

KINDS = ("sft", "preference", "prompt", "ptx")
FUZZ = settings(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck),
                database=None)


def read(data: bytes, kind: str):
    """The reader on `data` as a file's bytes; DataError is the only allowed failure."""
    try:
        rows, report = read_rows("s3://fuzz/rows.jsonl", kind, max_reject_rate=1.0, read_bytes=lambda _: data)
    except DataError as e:
        assert "s3://fuzz/rows.jsonl" in str(e)
        return None
    for row in rows:  # what prep goes on with is text any tokenizer, hash or file accepts
        json.dumps(row.model_dump(), ensure_ascii=False).encode("utf-8")
    for bad in report.bad:
        assert bad.line >= 1 and bad.reason
    return rows


# -- values JSON can spell, including the ones Python's json accepts but prep must not
numbers = st.one_of(st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from(["1e999", "-1e999", "1" * 5000, "-" + "9" * 4400]))  # spelled as digits
texts = st.text(alphabet=st.characters(codec=None, exclude_categories=()), max_size=40)  # surrogates included
leaf = st.one_of(st.none(), st.booleans(), numbers, texts)
values = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(texts, inner, max_size=4)), max_leaves=12)


def spell(v) -> str:
    """JSON text of `v`, with what json.dumps will not write: huge numbers as digits,
    NaN/Infinity literals, lone surrogates as \\u escapes."""
    if isinstance(v, str) and (v.lstrip("-").isdigit() and len(v) > 4000 or v in ("1e999", "-1e999")):
        return v
    if isinstance(v, dict):
        return "{" + ",".join(f"{json.dumps(k)}:{spell(x)}" for k, x in v.items()) + "}"
    if isinstance(v, list):
        return "[" + ",".join(spell(x) for x in v) + "]"
    return json.dumps(v)  # ensure_ascii: lone surrogates become \udXXX escapes; NaN -> NaN


FIELDS = ("prompt", "completion", "chosen", "rejected", "messages", "text", "role", "content")
message = st.dictionaries(st.sampled_from(["role", "content", "name"]),
                          st.one_of(st.sampled_from(["user", "assistant", "system", "tool"]), values), max_size=3)
row = st.dictionaries(st.sampled_from(FIELDS), st.one_of(values, st.lists(message, max_size=4)), max_size=5)


@settings(FUZZ, max_examples=5000)
@given(data=st.binary(max_size=600), kind=st.sampled_from(KINDS))
def test_raw_bytes(data, kind):
    read(data, kind)



@settings(FUZZ, max_examples=3000)
@given(docs=st.lists(values, min_size=1, max_size=4), kind=st.sampled_from(KINDS))
def test_json_values(docs, kind):
    read("\n".join(spell(d) for d in docs).encode("utf-8", "surrogatepass"), kind)



@settings(FUZZ, max_examples=2500)
@given(rows=st.lists(row, min_size=1, max_size=3), dup=st.booleans(), kind=st.sampled_from(KINDS))
def test_near_valid_rows(rows, dup, kind):
    lines = [spell(r) for r in rows]
    if dup:  # the same key twice in one object
        lines.append('{"prompt": "a", "completion": " b", "prompt": "c"}')
    read("\n".join(lines).encode("utf-8", "surrogatepass"), kind)



def test_pathological_lines_are_bad_rows():
    deep = "[" * 200_000 + "]" * 200_000
    lines = [deep, '{"prompt":' + "[" * 5000 + "]" * 5000 + "}", '{"prompt": "a", "prompt": "b", "completion": " c"}',
             '{"prompt": "\\ud800", "completion": " x"}', '{"prompt": NaN, "completion": " x"}',
             '{"prompt": "q", "completion": 1e999}', '{"prompt": "q", "completion": ' + "9" * 5000 + "}",
             '{"prompt": "fine", "completion": " row"}']
    rows, report = read_rows("s3://fuzz/rows.jsonl", "sft", max_reject_rate=1.0,
                             read_bytes=lambda _: "\n".join(lines).encode())
    assert [r.prompt for r in rows] == ["fine"]
    reasons = {b.line: b.reason for b in report.bad}
    assert "nesting deeper" in reasons[1] and "nesting deeper" in reasons[2]
    assert "duplicate key 'prompt'" in reasons[3] and "lone surrogate" in reasons[4]
    assert "NaN" in reasons[5] and "out of range" in reasons[6] and "too long to read" in reasons[7]
