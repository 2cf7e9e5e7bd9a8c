"""Data prep: read (or generate) datasets, clean, split, train a tokenizer, commit.

Steps:
  1. sources: the user's files (JSONL / s3:// / HF names) or the built-in task's
  2. read + normalise every source, with a bad-row report per file
  3. de-duplicate, split train/eval by prompt hash
  4. tokenizer: trained on the run's own text when the model is built from a config
  5. length filtering in tokens, as the model sees them (chat template included), with
     counts; fails above `data.max_truncate_rate`; the split's salt is `data.split_salt`,
     the same for every seed (PPO-ptx text is not split, and is cut to length by PPO)
  6. commit `prep/` (data, tokenizer, report) in one go: a failure writes nothing
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Iterator
from pathlib import Path

from rlhf.config import DEFAULT_MAX_TOTAL_TOKENS
from rlhf.data.processing import JsonlSink, LengthFilter, ScoreRange, iter_jsonl_rows, row_score, text_lengths
from rlhf.data.readers import DataError, ReadReport, check_report, iter_rows, open_source
from rlhf.models import load_tokenizer, resolve_source, train_tokenizer
from rlhf.models.chat import chat_format
from rlhf.stages.contract import StageContext, StageResult
from rlhf.train.progress import Timer


def _texts(rows) -> Iterator[str]:
    """The text a trained tokenizer learns from, row by row."""
    for r in rows:
        if hasattr(r, "completion"):
            yield r.prompt + r.completion
        elif hasattr(r, "chosen"):
            yield r.prompt + r.chosen
            yield r.prompt + r.rejected
        else:
            yield r.prompt


def read_sources(ctx: StageContext, tmp: Path) -> tuple[dict, dict, dict]:
    """Steps 1-3: the sources (the user's, or the built-in task's written to `tmp`), their
    rows normalised (DataError over the reject rate) and de-duplicated into canonical
    JSONL files under `tmp/rows/`, a row at a time, and their reports."""
    dcfg = ctx.config
    if ctx.task is not None:
        sources = {k: str(v) for k, v in ctx.task.write(tmp / "raw").items()}
    else:
        sources = {"sft": dcfg.sft_path, "preference": dcfg.preference_path}
        if dcfg.prompt_path:
            sources["prompt"] = dcfg.prompt_path
    if dcfg.ptx_path:
        sources["ptx"] = dcfg.ptx_path
    files, reports = {}, {}
    for kind, src in sources.items():
        label, records = open_source(src, read_bytes=ctx.store.read_bytes, hf_split=dcfg.hf_split,
                                     hf_config=dcfg.hf_config, hf_revision=dcfg.hf_revision)
        rep = ReadReport(source=label, kind=kind, total=0, accepted=0)
        sink = JsonlSink(tmp / "rows" / f"{kind}.jsonl", dedupe=True)
        for row in iter_rows(records, kind, rep, max_chars=dcfg.max_chars):
            sink.add(row)
        sink.close()
        check_report(rep, dcfg.max_reject_rate)
        files[kind] = sink.path
        reports[kind] = {"source": f"builtin:{kind}" if ctx.task is not None else src, "total": rep.total,
                         "accepted": rep.accepted, "rejected": len(rep.bad),
                         "bad_rows": [str(b) for b in rep.bad[:100]], "duplicates_dropped": sink.duplicates}
    if "prompt" not in files:
        from rlhf.data.schema import PromptRow

        sink = JsonlSink(tmp / "rows" / "prompt.jsonl", dedupe=True)
        for r in iter_jsonl_rows(files["sft"], "sft"):
            sink.add(PromptRow(prompt=r.prompt, messages=r.messages))
        files["prompt"] = sink.close().path
        reports["prompt"] = {"source": "the sft prompts", "total": sink.rows, "accepted": sink.rows,
                             "rejected": 0, "bad_rows": [], "duplicates_dropped": 0}
    return sources, files, reports


def copy_rows(path: Path, kind: str, dest: Path) -> JsonlSink:
    sink = JsonlSink(dest)
    for row in iter_jsonl_rows(path, kind):
        sink.add(row)
    return sink.close()


def filter_and_split(path: Path, kind: str, measure, limits: dict, dcfg, out: Path, tmp: Path) -> tuple[dict, dict]:
    """Step 5 for one kind, streamed: the length filter into a temporary file (with the
    prompts' score range), then the split by prompt hash into `<kind>_train/_eval.jsonl`
    in `out`. Returns the filter's counts and {split name: sink}."""
    kept, levels = JsonlSink(tmp / "kept" / f"{kind}.jsonl"), ScoreRange()
    lengths = LengthFilter(measure, limits["max_prompt_tokens"], limits["max_total_tokens"])
    for row in lengths.filter(iter_jsonl_rows(path, kind)):
        kept.add(row)
        levels.add(row_score(row, dcfg.split_salt))
    kept.close()
    cut = levels.cut(dcfg.eval_fraction)
    sinks = {"train": JsonlSink(out / f"{kind}_train.jsonl"), "eval": JsonlSink(out / f"{kind}_eval.jsonl")}
    for row in iter_jsonl_rows(kept.path, kind):
        sinks["eval" if row_score(row, dcfg.split_salt) < cut else "train"].add(row)
    kept.path.unlink()
    return lengths.counts, {f"{kind}_{side}": sink.close() for side, sink in sinks.items()}


def model_context(path: str, mcfg) -> int | None:
    """The longest sequence a pretrained model takes (its config's position limit), if it says."""
    from transformers import AutoConfig

    try:
        cfg = AutoConfig.from_pretrained(path, trust_remote_code=mcfg.trust_remote_code, revision=mcfg.revision)
    except (OSError, ValueError):
        return None
    cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        if isinstance(getattr(cfg, key, None), int):
            return getattr(cfg, key)
    return None


def length_limits(dcfg, context: int | None) -> dict[str, int]:
    """`data.max_total_tokens` (default: the model's context, capped at
    DEFAULT_MAX_TOTAL_TOKENS) and `data.max_prompt_tokens` (default: half of it)."""
    total = dcfg.max_total_tokens or min(context or DEFAULT_MAX_TOTAL_TOKENS, DEFAULT_MAX_TOTAL_TOKENS)
    return {"max_total_tokens": total, "max_prompt_tokens": dcfg.max_prompt_tokens or total // 2}


def rendered(measure, kind: str, source: str):
    """`measure`, with a chat template's refusal of a row (its own `raise_exception`, a
    ChatTemplateError) turned into a DataError that names the data and the row."""
    def run(row):
        try:
            return measure(row)
        except Exception as e:  # noqa: BLE001 - a template may raise anything (jinja2 errors, ValueError)
            raise DataError(
                f"{kind} data from {source}: the model's chat template cannot render the row whose prompt starts "
                f"{row.prompt[:80]!r}: {type(e).__name__}: {e}. Fix the row's turns (e.g. roles that alternate as "
                "the template requires) or set model.chat_template=off; nothing was written") from None
    return run


def check_over_long(kind: str, source: str, counts: dict, limits: dict, max_rate: float) -> None:
    """DataError (nothing written) when more than `max_rate` of the rows were too long."""
    rate = counts["over_long_rate"]
    if rate > max_rate:
        raise DataError(
            f"{kind} data from {source}: {rate:.1%} of the rows are over-long and would be dropped "
            f"({counts['dropped_prompt_too_long']} prompts over data.max_prompt_tokens="
            f"{limits['max_prompt_tokens']}, {counts['dropped_total_too_long']} prompt + answer over "
            f"data.max_total_tokens={limits['max_total_tokens']} tokens, chat template included); allowed: "
            f"data.max_truncate_rate={max_rate}. Fix: raise data.max_total_tokens / data.max_prompt_tokens (up to "
            "the model's context), shorten the rows, or raise data.max_truncate_rate to drop them; nothing was "
            "written")


def check_split(kind: str, source: str, kept: int, train: int, evl: int) -> None:
    """DataError when a kind has no row to train on or none held out (row counts).
    `split_by_hash` gives each side a prompt whenever there are two different ones, so
    the fix is more data."""
    if train and evl:
        return
    if not kept:
        raise DataError(f"{kind} data from {source}: no rows left after filtering; add rows (or, when the length "
                        "filter dropped them, raise data.max_total_tokens / data.max_prompt_tokens); nothing was "
                        "written")
    raise DataError(f"{kind} data from {source}: all {kept} rows share one prompt, and a run needs rows of at "
                    "least two different prompts, one to train on and one held out for evaluation (split by "
                    "prompt, so no prompt is in both); add rows with other prompts; nothing was written")


def run(ctx: StageContext) -> StageResult:
    timer, dcfg, builtin = Timer(), ctx.config, ctx.task is not None
    with ctx.tracker.stage_run(ctx.name, ctx.params), tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        # 1-3. sources, read + normalise (raises DataError, writing nothing, over the reject rate), dedupe;
        # every pass below streams rows through files, so memory does not grow with the data
        sources, files, reports = read_sources(ctx, tmp)
        rows_of = lambda *kinds: (r for k in kinds if k in files for r in iter_jsonl_rows(files[k], k))  # noqa: E731

        # 4. tokenizer
        out = tmp / "prep"
        out.mkdir()
        if ctx.model.name_or_path is None:
            tok = train_tokenizer(_texts(rows_of("sft", "preference", "prompt", "ptx")), ctx.model.vocab_size,
                                  out / "tokenizer")
            model_dir, context = None, ctx.model.max_position_embeddings
        else:
            model_dir = resolve_source(ctx.model.name_or_path, ctx.store)
            tok = load_tokenizer(model_dir, ctx.model)
            context = model_context(model_dir, ctx.model)

        # 5. length filter, then split by prompt hash (same salt: a prompt is eval everywhere or nowhere)
        fmt = chat_format(tok, ctx.model, model_dir if model_dir and Path(model_dir).is_dir() else None)
        count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        measure = fmt.lengths if fmt.templated else text_lengths(count)
        source_of = lambda kind: sources.get(kind, "sft prompts")  # noqa: E731
        limits = length_limits(dcfg, context)
        splits = {}
        for kind, path in files.items():
            if kind == "ptx":  # PPO-ptx text: all of it trains, each row cut to max_total_tokens by PPO
                splits["ptx_train"] = copy_rows(path, kind, out / "ptx_train.jsonl")
                continue
            counts, sides = filter_and_split(path, kind, rendered(measure, kind, source_of(kind)), limits, dcfg,
                                             out, tmp)
            reports[kind]["length_filter"] = counts
            check_over_long(kind, source_of(kind), counts, limits, dcfg.max_truncate_rate)
            check_split(kind, source_of(kind), counts["kept"], sides[f"{kind}_train"].rows,
                        sides[f"{kind}_eval"].rows)
            splits.update(sides)

        # 6. commit
        report = {
            "sources": {k: (f"builtin:{k}" if builtin else v) for k, v in sources.items()},
            "builtin_task": builtin,
            "eval_fraction": dcfg.eval_fraction,
            "reports": reports,
            "sizes": {k: v.rows for k, v in splits.items()},
            "hashes": {k: v.sha256 for k, v in splits.items()},
            "tokenizer": {"trained": ctx.model.name_or_path is None, "vocab_size": len(tok),
                          "chat_template": fmt.templated},
            "length_limits": limits,
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        ctx.store.put_dir(out, "prep")
        ctx.tracker.log_dict(report, "prep_report.json")
        ctx.tracker.log_metrics({f"data/{k}_rows": float(v.rows) for k, v in splits.items()}, step=0)
    return StageResult({"wall_s": timer(), "tracking_s": ctx.tracker.seconds, "sizes": report["sizes"],
                        "hashes": report["hashes"]})
