"""Data layer: format normalisation, bad-row reporting, sources, processing."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from rlhf.data import readers
from rlhf.data.processing import (
    data_hash,
    dedupe,
    filter_by_length,
    text_lengths,
    read_jsonl_rows,
    split_by_hash,
    write_jsonl,
)
from rlhf.data.readers import (
    BadRow,
    DataError,
    ReadReport,
    RowError,
    normalize_record,
    read_rows,
    render_messages,
)
from rlhf.data.schema import Message, PreferenceRow, PromptRow, SFTRow


def M(*turns: dict) -> tuple[Message, ...]:
    """The `messages` a conversational row keeps: the turns before its final answer."""
    return tuple(Message(**t) for t in turns)


def U(content):
    return {"role": "user", "content": content}


def A(content):
    return {"role": "assistant", "content": content}


def S(content):
    return {"role": "system", "content": content}


def jl(*objs) -> bytes:
    return b"".join(json.dumps(o).encode() + b"\n" for o in objs)


def write(tmp_path, data: bytes, name: str = "data.jsonl") -> str:
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


def read_bad(tmp_path, data: bytes, kind, **kw):
    """Read with a permissive threshold and return the bad rows."""
    kw.setdefault("max_reject_rate", 1.0)
    # keep one good row so the read never fails with "no rows accepted"
    good = {
        "sft": {"prompt": "p", "completion": "c"},
        "preference": {"prompt": "p", "chosen": "a", "rejected": "b"},
        "prompt": {"prompt": "p"},
    }[kind]
    path = write(tmp_path, data + jl(good))
    _, report = read_rows(path, kind, **kw)
    return report.bad


# ------------------------------------------------------------------ schema


def test_rows_are_frozen_and_forbid_extra():
    row = SFTRow(prompt="p", completion="c")
    with pytest.raises(ValidationError):
        row.prompt = "x"
    with pytest.raises(ValidationError):
        SFTRow(prompt="p", completion="c", extra="no")
    with pytest.raises(ValidationError):
        PromptRow(prompt=3)


def test_render_messages_hh_style():
    msgs = [S("Be brief."), U("Hi"), A("Hello"), U("Bye")]
    assert render_messages(msgs, add_generation_prompt=False) == (
        "\n\nSystem: Be brief.\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Bye"
    )
    assert render_messages(msgs, add_generation_prompt=True).endswith("\n\nHuman: Bye\n\nAssistant:")
    # nothing is stripped
    assert render_messages([U("  x \n")], add_generation_prompt=False) == "\n\nHuman:   x \n"


# -------------------------------------------------------------- normalisation


def test_sft_plain():
    assert normalize_record({"prompt": "Q?", "completion": " A.", "id": 7}, "sft") == SFTRow(
        prompt="Q?", completion=" A."
    )


def test_sft_messages_prompt_plus_completion_is_full_conversation():
    msgs = [S("sys"), U("hi"), A("hello"), U("2+2?"), A("4")]
    row = normalize_record({"messages": msgs}, "sft")
    assert row == SFTRow(
        prompt="\n\nSystem: sys\n\nHuman: hi\n\nAssistant: hello\n\nHuman: 2+2?\n\nAssistant:",
        completion=" 4", messages=M(S("sys"), U("hi"), A("hello"), U("2+2?")),
    )
    assert row.prompt + row.completion == render_messages(msgs, add_generation_prompt=False)


def test_preference_plain():
    assert normalize_record({"prompt": "P", "chosen": "good", "rejected": "bad"}, "preference") == PreferenceRow(
        prompt="P", chosen="good", rejected="bad"
    )


def test_preference_conversational_without_prompt():
    obj = {"chosen": [U("q"), A("a1"), U("q2"), A("good")], "rejected": [U("q"), A("a1"), U("q2"), A("bad")]}
    assert normalize_record(obj, "preference") == PreferenceRow(
        prompt="\n\nHuman: q\n\nAssistant: a1\n\nHuman: q2\n\nAssistant:", chosen=" good", rejected=" bad",
        messages=M(U("q"), A("a1"), U("q2")),
    )


def test_preference_conversational_with_prompt_list():
    obj = {"prompt": [S("s"), U("q")], "chosen": [A("good")], "rejected": [A("bad")]}
    assert normalize_record(obj, "preference") == PreferenceRow(
        prompt="\n\nSystem: s\n\nHuman: q\n\nAssistant:", chosen=" good", rejected=" bad", messages=M(S("s"), U("q"))
    )


def test_preference_string_prompt_with_message_lists():
    # UltraFeedback-style: full conversations in chosen/rejected, prompt string is redundant
    obj = {"prompt": "q", "chosen": [U("q"), A("good")], "rejected": [U("q"), A("bad")]}
    expected = PreferenceRow(prompt="\n\nHuman: q\n\nAssistant:", chosen=" good", rejected=" bad", messages=M(U("q")))
    assert normalize_record(obj, "preference") == expected
    # answer-only sides: the string prompt is the user turn
    assert normalize_record({"prompt": "q", "chosen": [A("good")], "rejected": [A("bad")]}, "preference") == expected


def test_preference_hh():
    obj = {
        "chosen": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: joke?\n\nAssistant: Sure, here goes.",
        "rejected": "\n\nHuman: hi\n\nAssistant: hey\n\nHuman: joke?\n\nAssistant: No.",
    }
    assert normalize_record(obj, "preference") == PreferenceRow(
        prompt="\n\nHuman: hi\n\nAssistant: hey\n\nHuman: joke?\n\nAssistant:",
        chosen=" Sure, here goes.",
        rejected=" No.",
        messages=M(U("hi"), A("hey"), U("joke?")),  # HH turns, parsed
    )


def test_prompt_formats():
    assert normalize_record({"prompt": "Tell me"}, "prompt") == PromptRow(prompt="Tell me")
    assert normalize_record({"messages": [S("s"), U("Tell me")]}, "prompt") == PromptRow(
        prompt="\n\nSystem: s\n\nHuman: Tell me\n\nAssistant:", messages=M(S("s"), U("Tell me"))
    )
    # sft/preference files work as prompt sources (extra keys ignored)
    assert normalize_record({"prompt": "P", "completion": "C"}, "prompt") == PromptRow(prompt="P")


def test_unknown_kind_is_a_programming_error():
    with pytest.raises(ValueError, match="unknown data kind"):
        normalize_record({"prompt": "p"}, "rm")


@pytest.mark.parametrize(
    "obj,kind,match",
    [
        ({"prompt": "p"}, "sft", "missing field 'completion'"),
        ({"completion": "c"}, "sft", "missing field 'prompt'"),
        ({"prompt": "p", "completion": None}, "sft", "missing field 'completion'"),
        ({"prompt": "p", "completion": ""}, "sft", "field 'completion' is empty"),
        ({"prompt": " \t\n", "completion": "c"}, "sft", "field 'prompt' is empty"),
        ({"prompt": "p", "completion": 3}, "sft", "field 'completion' must be a string, got int"),
        ({"messages": "hi"}, "sft", "field 'messages' must be a list"),
        ({"messages": []}, "sft", "field 'messages' is empty"),
        ({"messages": [U("q"), {"content": "a"}]}, "sft", r"messages\[1\]' is missing 'role'"),
        ({"messages": [U("q"), {"role": "assistant"}]}, "sft", r"messages\[1\]' is missing 'content'"),
        ({"messages": [{"role": "bot", "content": "x"}, A("a")]}, "sft", r"messages\[0\]' has unknown role 'bot'"),
        ({"messages": [U("q"), A(5)]}, "sft", r"messages\[1\]' 'content' must be a string"),
        ({"messages": [U("q"), "a"]}, "sft", r"messages\[1\]' must be an object"),
        ({"messages": [U("q"), A("  ")]}, "sft", r"messages\[1\]' 'content' is empty"),
        ({"messages": [U("q"), A("a"), U("q2")]}, "sft", "'messages': last message must be from the assistant"),
        ({"messages": [A("a")]}, "sft", "'messages': needs at least one message before"),
        ({"prompt": "p", "chosen": "x"}, "preference", "missing field 'rejected'"),
        ({"prompt": "p", "chosen": "x", "rejected": "x"}, "preference", "'chosen' and 'rejected' are identical"),
        ({"prompt": "p", "chosen": "x", "rejected": ""}, "preference", "field 'rejected' is empty"),
        ({"prompt": "p", "chosen": 1, "rejected": "y"}, "preference", "field 'chosen' must be a string"),
        ({"chosen": [U("q"), A("a")], "rejected": "y"}, "preference", "field 'rejected' must be a list of messages"),
        (
            {"chosen": [U("q"), A("a")], "rejected": [U("other"), A("b")]},
            "preference",
            "'chosen' and 'rejected' do not share",
        ),
        ({"chosen": [U("q"), A("a")], "rejected": [U("q"), A("a")]}, "preference", "are identical"),
        ({"chosen": [U("q"), A("a")], "rejected": [U("q")]}, "preference", "field 'rejected': last message must"),
        (
            {"chosen": "\n\nHuman: q1\n\nAssistant: a", "rejected": "\n\nHuman: q2\n\nAssistant: b"},
            "preference",
            "do not share a prompt prefix",
        ),
        ({"chosen": "no turns here", "rejected": "\n\nHuman: q\n\nAssistant: b"}, "preference", "field 'chosen' has no"),
        (
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant:"},
            "preference",
            "field 'rejected' has an empty response",
        ),
        ({"completion": "c"}, "prompt", "missing field 'prompt'"),
        ({"prompt": ["x"]}, "prompt", "field 'prompt' must be a string, got list"),
        ({"messages": [U("q"), A("a")]}, "prompt", "'messages': last message is from the assistant"),
        ([1, 2], "sft", r"row is not a JSON object \(got list\)"),
        ("text", "prompt", r"row is not a JSON object \(got str\)"),
    ],
)
def test_normalize_rejects(obj, kind, match):
    with pytest.raises(RowError, match=match):
        normalize_record(obj, kind)


def test_empty_system_message_is_dropped():
    row = normalize_record({"messages": [S(""), U("q"), A("a")]}, "sft")
    assert row == SFTRow(prompt="\n\nHuman: q\n\nAssistant:", completion=" a", messages=M(U("q")))


def test_max_chars_counts_the_canonical_row():
    obj = {"prompt": "abcde", "chosen": "xy", "rejected": "z"}  # 8 characters in all
    assert normalize_record(obj, "preference", max_chars=8).prompt == "abcde"
    with pytest.raises(RowError, match="row too long: 8 characters > max_chars 7"):
        normalize_record(obj, "preference", max_chars=7)


# ------------------------------------------------------------- file reading


def test_every_bad_row_case_is_reported_with_its_line(tmp_path):
    data = b"".join(
        [
            jl({"prompt": "ok", "completion": "fine"}),  # 1
            b'{"prompt": "p", "completion": \n',  # 2 invalid JSON
            b'{"prompt": "caf\xe9", "completion": "c"}\n',  # 3 invalid UTF-8 (latin-1 byte)
            b"[1, 2]\n",  # 4 not an object
            jl({"prompt": "p"}),  # 5 missing field
            jl({"prompt": "p", "completion": "   "}),  # 6 empty field
            jl({"prompt": "p", "completion": 42}),  # 7 wrong type
            jl({"messages": [U("q"), A("a"), U("again")]}),  # 8 last not assistant
            jl({"prompt": "p" * 50, "completion": "c"}),  # 9 too long
        ]
    )
    bad = read_bad(tmp_path, data, "sft", max_chars=40)
    got = {b.line: b.reason for b in bad}
    assert sorted(got) == [2, 3, 4, 5, 6, 7, 8, 9]
    assert got[2].startswith("invalid JSON")
    assert got[3].startswith("invalid UTF-8")
    assert "not a JSON object" in got[4]
    assert "missing field 'completion'" in got[5]
    assert "field 'completion' is empty" in got[6]
    assert "field 'completion' must be a string, got int" in got[7]
    assert "last message must be from the assistant" in got[8]
    assert "row too long: 51 characters > max_chars 40" in got[9]
    assert all(b.source.endswith("data.jsonl") for b in bad)


def test_preference_bad_rows_in_file(tmp_path):
    data = jl(
        {"prompt": "p", "chosen": "same", "rejected": "same"},
        {"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"},
        {"prompt": "p", "chosen": "x", "rejected": ["not", "text"]},
    )
    bad = read_bad(tmp_path, data, "preference")
    assert [(b.line, b.reason.split(" (")[0]) for b in bad] == [
        (1, "fields 'chosen' and 'rejected' are identical"),
        (2, "fields 'chosen' and 'rejected' do not share a prompt prefix"),
        (3, "field 'chosen' must be a list of messages like the other fields, got str"),
    ]


def test_bom_crlf_and_blank_lines(tmp_path):
    data = (
        b"\xef\xbb\xbf"
        + b'{"prompt": "p1", "completion": "c1"}\r\n'  # 1
        + b"\r\n"  # 2 blank
        + b"   \t \r\n"  # 3 whitespace only
        + b'{"prompt": "p2", "completion": "c2\\r\\nmore"}\r\n'  # 4
        + b"\n"  # 5 blank
        + b'{"prompt": "p3"}\r\n'  # 6 bad
        + b'{"prompt": "p4", "completion": "c4"}'  # 7, no final newline
    )
    rows, report = read_rows(write(tmp_path, data), "sft", max_reject_rate=0.5)
    assert rows == [
        SFTRow(prompt="p1", completion="c1"),
        SFTRow(prompt="p2", completion="c2\r\nmore"),
        SFTRow(prompt="p4", completion="c4"),
    ]
    assert (report.total, report.accepted) == (4, 3)
    assert [(b.line, b.reason) for b in report.bad] == [(6, "missing field 'completion'")]
    assert report.reject_rate == pytest.approx(0.25)


def test_bom_only_at_start(tmp_path):
    # a BOM in the middle of a file is not silently accepted
    data = jl({"prompt": "p"}) + b"\xef\xbb\xbf" + jl({"prompt": "q"})
    bad = read_bad(tmp_path, data, "prompt")
    assert [b.line for b in bad] == [2] and bad[0].reason.startswith("invalid JSON")


def test_reject_rate_under_threshold_returns_rows(tmp_path):
    data = jl(*[{"prompt": f"p{i}"} for i in range(9)]) + b"not json\n"
    rows, report = read_rows(write(tmp_path, data), "prompt", max_reject_rate=0.1)
    assert len(rows) == 9
    assert isinstance(report, ReadReport)
    assert (report.total, report.accepted, report.kind) == (10, 9, "prompt")
    assert report.reject_rate == pytest.approx(0.1)
    assert str(report.bad[0]) == f"{tmp_path / 'data.jsonl'}:10: " + report.bad[0].reason


def test_reject_rate_over_threshold_raises_with_clear_message(tmp_path):
    data = jl({"prompt": "a"}, {"prompt": ""}, {"prompt": "c"}) + b"{oops\n" + jl({"prompt": "e"})
    path = write(tmp_path, data, name="prompts_v2.jsonl")
    with pytest.raises(DataError) as ei:
        read_rows(path, "prompt", max_reject_rate=0.2)
    msg = str(ei.value)
    assert "prompts_v2.jsonl" in msg
    assert "2 of 5" in msg
    assert "40.00%" in msg and "20.00%" in msg
    assert "prompts_v2.jsonl:2: field 'prompt' is empty" in msg
    assert "prompts_v2.jsonl:4: invalid JSON" in msg
    assert "fix or remove these rows, or raise data.max_reject_rate" in msg


def test_default_threshold_is_zero(tmp_path):
    data = jl({"prompt": "a"}, {"nope": 1})
    with pytest.raises(DataError, match=r"data.jsonl:2: missing field 'prompt'"):
        read_rows(write(tmp_path, data), "prompt")


def test_no_accepted_rows_raises(tmp_path):
    with pytest.raises(DataError, match="no rows were accepted"):
        read_rows(write(tmp_path, b"[]\n"), "prompt", max_reject_rate=1.0)
    with pytest.raises(DataError, match="no rows found"):
        read_rows(write(tmp_path, b"\xef\xbb\xbf\r\n\n", name="empty.jsonl"), "prompt")


def test_report_summary_truncates():
    report = ReadReport(
        source="f.jsonl", kind="sft", total=30, accepted=5, bad=[BadRow("f.jsonl", i, "bad") for i in range(1, 26)]
    )
    text = report.summary(max_rows=3)
    assert "f.jsonl:1: bad" in text and "f.jsonl:3: bad" in text
    assert "f.jsonl:4: bad" not in text
    assert "... and 22 more" in text
    assert "5 of 30" in text


def test_file_uri_and_missing_files(tmp_path):
    path = write(tmp_path, jl({"prompt": "p"}))
    rows, _ = read_rows("file://" + path, "prompt")
    assert rows == [PromptRow(prompt="p")]
    with pytest.raises(DataError, match="file not found: .*missing.jsonl"):
        read_rows(str(tmp_path / "missing.jsonl"), "prompt")
    with pytest.raises(DataError, match="file not found"):
        read_rows("data/missing.json", "prompt")
    with pytest.raises(DataError, match="directory"):
        read_rows(str(tmp_path), "prompt")


def test_s3_source_goes_through_read_bytes(tmp_path):
    blobs = {"s3://bucket/data/sft.jsonl": jl({"prompt": "p", "completion": "c"}) + b"{bad\n"}
    calls = []

    def fake_read(uri):
        calls.append(uri)
        return blobs[uri]

    rows, report = read_rows("s3://bucket/data/sft.jsonl", "sft", read_bytes=fake_read, max_reject_rate=0.5)
    assert calls == ["s3://bucket/data/sft.jsonl"]
    assert rows == [SFTRow(prompt="p", completion="c")]
    assert str(report.bad[0]).startswith("s3://bucket/data/sft.jsonl:2: invalid JSON")

    with pytest.raises(DataError, match="needs a store"):
        read_rows("s3://bucket/data/sft.jsonl", "sft")
    with pytest.raises(DataError, match="cannot read s3://bucket/nope.jsonl: KeyError"):
        read_rows("s3://bucket/nope.jsonl", "sft", read_bytes=fake_read)


def test_hf_source_via_monkeypatched_loader(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load(name, split):
        calls.append((name, split))
        return [
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: b", "prompt": None},
            {"chosen": "\n\nHuman: q\n\nAssistant: a", "rejected": "\n\nHuman: q\n\nAssistant: a", "prompt": None},
        ]

    monkeypatch.setattr(readers, "_load_hf", fake_load)
    rows, report = read_rows("Anthropic/hh-rlhf", "preference", max_reject_rate=0.5, hf_split="test")
    assert rows == [PreferenceRow(prompt="\n\nHuman: q\n\nAssistant:", chosen=" a", rejected=" b", messages=M(U("q")))]
    assert report.source == "hf://Anthropic/hh-rlhf[test]"
    assert [(b.line, b.reason) for b in report.bad] == [(2, "fields 'chosen' and 'rejected' are identical")]

    rows, _ = read_rows("hf://org/name", "preference", max_reject_rate=0.5)
    assert calls == [("Anthropic/hh-rlhf", "test"), ("org/name", "train")]


def test_hf_source_takes_config_split_and_revision(monkeypatch, tmp_path):
    """A dataset's config (subset), split and revision: run-wide (data.hf_*) or per source in
    the URI, the URI winning; they reach datasets.load_dataset and the report's label."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_load(name, split, **kw):
        calls.append((name, split, kw))
        return [{"prompt": "p", "completion": "c"}]

    monkeypatch.setattr(readers, "_load_hf", fake_load)
    _, report = read_rows("hf://Anthropic/hh-rlhf?config=harmless-base&split=test&revision=abc123", "sft")
    assert calls[-1] == ("Anthropic/hh-rlhf", "test", {"config": "harmless-base", "revision": "abc123"})
    assert report.source == "hf://Anthropic/hh-rlhf/harmless-base[test]@abc123"
    read_rows("org/name", "sft", hf_config="sub", hf_revision="v1", hf_split="validation")
    assert calls[-1] == ("org/name", "validation", {"config": "sub", "revision": "v1"})
    read_rows("hf://org/name?split=train", "sft", hf_config="sub", hf_split="validation")
    assert calls[-1] == ("org/name", "train", {"config": "sub"})
    with pytest.raises(DataError, match=r"unknown or empty dataset option 'subset=x'"):
        read_rows("hf://org/name?subset=x", "sft")


def test_prep_fails_on_over_long_rows_naming_the_fix(tmp_path):
    """Above data.max_truncate_rate over-long rows, prep fails and commits nothing; below
    it, the share is in the report."""
    from rlhf.cli import main

    rows = [{"prompt": f"question {i}", "completion": " answer" * (3 if i % 4 else 60)} for i in range(40)]
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pref = tmp_path / "pref.jsonl"
    pref.write_text("".join(json.dumps({"prompt": f"question {i}", "chosen": " yes", "rejected": " no"}) + "\n"
                            for i in range(40)))
    args = ["stage", "prep", "--preset", "tiny", "--set", f"data.sft_path={path}", "--set",
            f"data.preference_path={pref}", "--set", "data.max_total_tokens=48", "--set", "data.eval_fraction=0.25",
            "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 2
    failed = tmp_path / "a" / "prep"
    assert not (failed / "_COMMITTED").exists() and not (failed / "report.json").exists()
    assert main([*args, "--set", "data.max_truncate_rate=0.3", "--output", str(tmp_path / "b")]) == 0
    report = json.loads((tmp_path / "b" / "prep" / "report.json").read_text())
    assert report["reports"]["sft"]["length_filter"]["over_long_rate"] == 0.25
    assert report["length_limits"] == {"max_total_tokens": 48, "max_prompt_tokens": 24}


def test_hf_source_with_datasets_dataset(monkeypatch, tmp_path):
    datasets = pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    ds = datasets.Dataset.from_list(
        [{"messages": [U("hi"), A("hello")]}, {"messages": [U("hi"), U("again")]}]
    )
    monkeypatch.setattr(readers, "_load_hf", lambda name, split: ds)
    rows, report = read_rows("my-sft-set", "sft", max_reject_rate=0.5)
    assert rows == [SFTRow(prompt="\n\nHuman: hi\n\nAssistant:", completion=" hello", messages=M(U("hi")))]
    assert report.bad[0].line == 2 and "last message must be from the assistant" in report.bad[0].reason


def test_hf_load_failure_is_a_data_error(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)

    def boom(name, split):
        raise ConnectionError("offline")

    monkeypatch.setattr(readers, "_load_hf", boom)
    with pytest.raises(DataError, match="no local file named 'org/x' exists either.*offline"):
        read_rows("org/x", "sft")


def test_local_file_wins_over_hub_id(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org").mkdir()
    (tmp_path / "org" / "name").write_bytes(jl({"prompt": "local"}))

    def fail(name, split):
        raise AssertionError("must not hit the hub")

    monkeypatch.setattr(readers, "_load_hf", fail)
    rows, _ = read_rows("org/name", "prompt")
    assert rows == [PromptRow(prompt="local")]


# ---------------------------------------------------------------- processing


def test_split_by_hash_rule_and_determinism():
    rows = [PromptRow(prompt=f"prompt {i}") for i in range(1000)]
    train, evals = split_by_hash(rows, 0.1, salt="s")
    assert len(train) + len(evals) == 1000
    assert 60 <= len(evals) <= 140
    for r in evals:
        h = int(hashlib.sha256(("s" + r.prompt).encode()).hexdigest()[:16], 16) / 16**16
        assert h < 0.1
    # order preserved, deterministic, salt matters
    assert train == [r for r in rows if r not in evals]
    assert split_by_hash(rows, 0.1, salt="s") == (train, evals)
    assert split_by_hash(rows, 0.1, salt="other")[1] != evals
    assert split_by_hash(rows, 0.0) == (rows, [])
    assert split_by_hash(rows, 1.0) == ([], rows)


def test_split_by_hash_keeps_a_prompt_on_one_side():
    rows = [
        PreferenceRow(prompt=f"p{i % 50}", chosen=f"c{i}", rejected=f"r{i}") for i in range(500)
    ]
    train, evals = split_by_hash(rows, 0.3)
    assert evals and train
    assert not {r.prompt for r in train} & {r.prompt for r in evals}


def test_dedupe():
    a, b = SFTRow(prompt="p", completion="a"), SFTRow(prompt="p", completion="b")
    rows, dropped = dedupe([a, b, SFTRow(prompt="p", completion="a"), b, a])
    assert rows == [a, b] and dropped == 3
    assert dedupe([]) == ([], 0)


def test_filter_by_length():
    count = lambda s: len(s.split())  # noqa: E731
    rows = [
        SFTRow(prompt="a b", completion="c d"),  # 2 + 2: kept
        SFTRow(prompt="a b c d", completion="e"),  # prompt 4 > 3
        SFTRow(prompt="a", completion="b c d e f"),  # 1 + 5 > 5
        PreferenceRow(prompt="a b", chosen="c", rejected="d e f"),  # 2 + 3 = 5: kept
        PreferenceRow(prompt="a b", chosen="c d e f", rejected="g"),  # 2 + 4 > 5
        PromptRow(prompt="a b c"),  # kept
        PromptRow(prompt="a b c d e"),  # prompt too long
    ]
    # totals count one EOS after the answer, so the limit 6 admits prompt + answer = 5
    kept, stats = filter_by_length(rows, text_lengths(count), max_prompt_tokens=3, max_total_tokens=6)
    assert kept == [rows[0], rows[3], rows[5]]
    assert stats == {"kept": 3, "dropped_prompt_too_long": 2, "dropped_total_too_long": 2, "over_long_rate": 4 / 7}


def test_write_read_roundtrip_and_hash(tmp_path):
    rows = [PreferenceRow(prompt="héllo ✓", chosen=" a\n", rejected=" b"), PreferenceRow(prompt="x", chosen="y", rejected="z")]
    path = tmp_path / "out" / "pref.jsonl"
    write_jsonl(rows, path)
    assert read_jsonl_rows(path, "preference") == rows
    assert [p.name for p in path.parent.iterdir()] == ["pref.jsonl"]  # no temp file left
    first = path.read_bytes().split(b"\n")[0]
    assert first == '{"chosen":" a\\n","prompt":"héllo ✓","rejected":" b"}'.encode()
    assert data_hash(rows) == hashlib.sha256(path.read_bytes()).hexdigest()
    assert data_hash(rows) != data_hash(rows[::-1])
    assert data_hash(rows) != data_hash([rows[0]])
    # canonical files are strict: a row of another kind is refused
    with pytest.raises(DataError, match="pref.jsonl:1: not a canonical sft row"):
        read_jsonl_rows(path, "sft")


def test_write_jsonl_replaces_atomically(tmp_path, monkeypatch):
    path = tmp_path / "rows.jsonl"
    write_jsonl([PromptRow(prompt="old")], path)

    def broken_replace(src, dst):
        raise OSError("disk gone")

    monkeypatch.setattr("rlhf.data.processing.os.replace", broken_replace)
    with pytest.raises(OSError):
        write_jsonl([PromptRow(prompt="new")], path)
    assert read_jsonl_rows(path, "prompt") == [PromptRow(prompt="old")]
    assert [p.name for p in tmp_path.iterdir()] == ["rows.jsonl"]


def test_split_by_hash_holds_out_a_prompt_of_a_small_dataset():
    """Few prompts whose hashes all land on one side: one still goes to the other side
    (the lowest-hashed to eval, the highest to train), a function of the prompts alone."""
    rows = [PromptRow(prompt=f"q{i}") for i in range(10)]
    score = {r.prompt: int(hashlib.sha256(("s" + r.prompt).encode()).hexdigest()[:16], 16) / 16**16 for r in rows}
    low, high = min(score.values()), max(score.values())
    train, evals = split_by_hash(rows, low * 0.99, salt="s")  # below every hash: none would be held out
    assert [r.prompt for r in evals] == [min(score, key=score.get)] and len(train) == 9
    train, evals = split_by_hash(rows, min(high * 1.01, 0.999), salt="s")  # above every hash: none would train
    assert [r.prompt for r in train] == [max(score, key=score.get)] and len(evals) == 9
    assert split_by_hash(list(reversed(rows)), low * 0.99, salt="s")[1] == [
        r for r in rows if r.prompt == min(score, key=score.get)]  # the order of the rows does not matter
    # one prompt, however many rows: it cannot be on both sides
    same = [PreferenceRow(prompt="p", chosen=f"c{i}", rejected="r") for i in range(5)]
    assert sorted(map(len, split_by_hash(same, 0.1))) == [0, 5]


def test_plain_text_rows_split_by_their_text():
    rows = [SFTRow(prompt="", completion=f"document {i}") for i in range(400)]
    train, evals = split_by_hash(rows, 0.1)
    assert 20 <= len(evals) <= 70 and len(train) + len(evals) == 400


def test_ten_conversational_rows_prep_with_a_held_out_row(tmp_path, capsys):
    """The smallest datasets still split: 10 conversations and 10 comparisons, default
    eval_fraction (0.1); one prompt only is a clear error whose fix is more prompts."""
    from rlhf.cli import main

    sft, pref = tmp_path / "sft.jsonl", tmp_path / "pref.jsonl"
    sft.write_text("".join(json.dumps({"messages": [U(f"say {w}"), A(f" {w}")]}) + "\n"
                           for w in "red blue green gold pink gray teal navy lime rust".split()))
    pref.write_text("".join(json.dumps({"prompt": f"pick {i}", "chosen": " yes", "rejected": " no"}) + "\n"
                            for i in range(10)))
    args = ["stage", "prep", "--preset", "tiny", "--set", f"data.sft_path={sft}", "--set",
            f"data.preference_path={pref}", "--quiet"]
    assert main([*args, "--output", str(tmp_path / "a")]) == 0
    sizes = json.loads((tmp_path / "a" / "prep" / "report.json").read_text())["sizes"]
    assert all(sizes[f"{k}_eval"] >= 1 and sizes[f"{k}_train"] >= 1 for k in ("sft", "preference", "prompt")), sizes

    one = tmp_path / "one.jsonl"
    one.write_text("".join(json.dumps({"prompt": "same", "chosen": f" y{i}", "rejected": " n"}) + "\n"
                           for i in range(10)))
    assert main(["stage", "prep", "--preset", "tiny", "--set", f"data.sft_path={sft}", "--set",
                 f"data.preference_path={one}", "--quiet", "--output", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert f"preference data from {one}" in err and "two different prompts" in err and "eval_fraction" not in err
    assert not (tmp_path / "b" / "prep" / "_COMMITTED").exists()


@pytest.mark.parametrize("prompts,fraction", [
    ([f"p{i}" for i in range(200)], 0.1),       # the usual case
    ([f"p{i}" for i in range(3)], 0.1),         # all hashes above the cut: the lowest prompt is held out
    ([f"q{i}" for i in range(3)], 0.95),        # all below: the highest trains
    (["same"] * 5, 0.5),                        # one prompt: one side only
    ([f"p{i % 7}" for i in range(50)], 0.3),    # repeated prompts stay on one side
])
def test_the_streamed_split_equals_split_by_hash(prompts, fraction, tmp_path):
    """Prep splits a stream of rows with a ScoreRange and `row_score` (nothing held in
    memory); the sides and their order are split_by_hash's, and JsonlSink's hash and
    count are data_hash's and len's of the rows it wrote."""
    from rlhf.data.processing import JsonlSink, ScoreRange, data_hash, row_score, split_by_hash

    rows = [SFTRow(prompt=p, completion=f" c{i}") for i, p in enumerate(prompts)]
    train, evl = split_by_hash(rows, fraction, salt="s")
    levels = ScoreRange()
    for r in rows:
        levels.add(row_score(r, "s"))
    cut = levels.cut(fraction)
    sinks = {"train": JsonlSink(tmp_path / "train.jsonl"), "eval": JsonlSink(tmp_path / "eval.jsonl")}
    for r in rows:
        sinks["eval" if row_score(r, "s") < cut else "train"].add(r)
    for side, want in (("train", train), ("eval", evl)):
        sink = sinks[side].close()
        assert read_jsonl_rows(sink.path, "sft") == want
        assert sink.rows == len(want) and sink.sha256 == data_hash(want)


def test_the_sink_drops_exact_duplicates_keeping_the_first(tmp_path):
    from rlhf.data.processing import JsonlSink

    rows = [SFTRow(prompt="a", completion="x"), SFTRow(prompt="a", completion="y"),
            SFTRow(prompt="a", completion="x"), PromptRow(prompt="a")]
    sink = JsonlSink(tmp_path / "r.jsonl", dedupe=True)
    assert [sink.add(r) for r in rows] == [True, True, False, True]
    sink.close()
    assert (sink.rows, sink.duplicates) == (3, 1)
    assert sink.path.read_text().count("\n") == 3 and dedupe(rows) == (rows[:2] + rows[3:], 1)


def test_a_local_source_is_read_a_line_at_a_time(tmp_path):
    """open_source reads a local file lazily (a BOM, CRLF and blank lines as before)."""
    path = tmp_path / "d.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"prompt": "a", "completion": "b"}\r\n\n{"prompt": "c", "completion": "d"}')
    label, records = readers.open_source(str(path))
    assert not isinstance(records, (list, tuple))  # a generator: nothing read yet
    report = readers.ReadReport(source=label, kind="sft", total=0, accepted=0)
    rows = list(readers.iter_rows(records, "sft", report))
    assert [(r.prompt, r.completion) for r in rows] == [("a", "b"), ("c", "d")]
    assert (report.total, report.accepted) == (2, 2)
    with pytest.raises(DataError, match="file not found"):
        readers.open_source(str(tmp_path / "missing.jsonl"))
