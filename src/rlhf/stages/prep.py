"""Data prep: read (or generate) datasets, clean, split, train a tokenizer, commit.

Steps:
  1. sources: the user's files (JSONL / s3:// / HF names) or the built-in task's
  2. read + normalise every source, with a bad-row report per file
  3. de-duplicate, split train/eval by prompt hash
  4. tokenizer: trained on the run's own text when the model is built from a config
  5. length filtering in tokens, with counts
  6. commit `prep/` (data, tokenizer, report) in one go: a failure writes nothing
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from rlhf.data.processing import data_hash, dedupe, filter_by_length, split_by_hash, write_jsonl
from rlhf.data.readers import DataError, read_rows
from rlhf.models import load_tokenizer, train_tokenizer
from rlhf.stages.contract import StageContext, StageResult
from rlhf.train.progress import Timer


def _texts(rows) -> list[str]:
    out = []
    for r in rows:
        if hasattr(r, "completion"):
            out.append(r.prompt + r.completion)
        elif hasattr(r, "chosen"):
            out += [r.prompt + r.chosen, r.prompt + r.rejected]
        else:
            out.append(r.prompt)
    return out


def read_sources(ctx: StageContext, tmp: Path) -> tuple[dict, dict, dict]:
    """Steps 1-3: the sources (the user's, or the built-in task's written to `tmp`), their
    rows (normalised; DataError over the reject rate) and reports, de-duplicated."""
    dcfg = ctx.config
    if ctx.task is not None:
        sources = {k: str(v) for k, v in ctx.task.write(tmp / "raw").items()}
    else:
        sources = {"sft": dcfg.sft_path, "preference": dcfg.preference_path}
        if dcfg.prompt_path:
            sources["prompt"] = dcfg.prompt_path
    rows, reports = {}, {}
    for kind, src in sources.items():
        rows[kind], rep = read_rows(src, kind, max_reject_rate=dcfg.max_reject_rate, max_chars=dcfg.max_chars,
                                    read_bytes=ctx.store.read_bytes, hf_split=dcfg.hf_split)
        label = f"builtin:{kind}" if ctx.task is not None else src
        reports[kind] = {"source": label, "total": rep.total, "accepted": rep.accepted,
                         "rejected": len(rep.bad), "bad_rows": [str(b) for b in rep.bad[:100]]}
    if "prompt" not in rows:
        from rlhf.data.schema import PromptRow

        rows["prompt"] = list(dict.fromkeys(PromptRow(prompt=r.prompt) for r in rows["sft"]))
    for kind in rows:
        rows[kind], reports[kind]["duplicates_dropped"] = dedupe(rows[kind])
    return sources, rows, reports


def run(ctx: StageContext) -> StageResult:
    timer, dcfg, builtin = Timer(), ctx.config, ctx.task is not None
    with ctx.tracker.stage_run(ctx.name, ctx.params), tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        # 1-3. sources, read + normalise (raises DataError, writing nothing, over the reject rate), dedupe
        sources, rows, reports = read_sources(ctx, tmp)

        # 4. tokenizer
        out = tmp / "prep"
        out.mkdir()
        if ctx.model.name_or_path is None:
            all_rows = rows["sft"] + rows["preference"] + rows["prompt"]
            tok = train_tokenizer(_texts(all_rows), ctx.model.vocab_size, out / "tokenizer")
        else:
            tok = load_tokenizer(ctx.model.name_or_path, ctx.model, ctx.store)

        # 5. length filter, then split by prompt hash (same salt: a prompt is eval everywhere or nowhere)
        count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        splits = {}
        for kind in rows:
            kept, counts = filter_by_length(rows[kind], count, dcfg.max_prompt_tokens,
                                            dcfg.max_total_tokens - 1)
            reports[kind]["length_filter"] = counts
            train, evl = split_by_hash(kept, dcfg.eval_fraction, salt=str(ctx.seed))
            if not train or not evl:
                raise DataError(f"{kind} data from {sources.get(kind, 'sft prompts')}: too few rows after filtering "
                                 f"({len(train)} train / {len(evl)} eval); add data or lower data.eval_fraction")
            splits[f"{kind}_train"], splits[f"{kind}_eval"] = train, evl
        for name, rs in splits.items():
            write_jsonl(rs, out / f"{name}.jsonl")

        # 6. commit
        report = {
            "sources": {k: (f"builtin:{k}" if builtin else v) for k, v in sources.items()},
            "builtin_task": builtin,
            "eval_fraction": dcfg.eval_fraction,
            "reports": reports,
            "sizes": {k: len(v) for k, v in splits.items()},
            "hashes": {k: data_hash(v) for k, v in splits.items()},
            "tokenizer": {"trained": ctx.model.name_or_path is None, "vocab_size": len(tok)},
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        ctx.store.put_dir(out, "prep")
        ctx.tracker.log_dict(report, "prep_report.json")
        ctx.tracker.log_metrics({f"data/{k}_rows": float(len(v)) for k, v in splits.items()}, step=0)
    return StageResult({"wall_s": timer(), "tracking_s": ctx.tracker.seconds, "sizes": report["sizes"],
                        "hashes": report["hashes"]})
