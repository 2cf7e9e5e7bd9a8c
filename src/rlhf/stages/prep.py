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

from rlhf.config import PipelineConfig
from rlhf.data.processing import data_hash, dedupe, filter_by_length, split_by_hash, write_jsonl
from rlhf.data.readers import DataError, read_rows
from rlhf.data.tasks import BuiltinTask
from rlhf.models import load_tokenizer, train_tokenizer
from rlhf.stages.common import Timer, write_result


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


def run(cfg: PipelineConfig, store, tracker, quiet: bool = False) -> dict:
    timer = Timer()
    with tracker.stage_run("prep", cfg.model_dump()), tempfile.TemporaryDirectory() as tmp_:
        tmp = Path(tmp_)
        # 1. sources
        if cfg.uses_builtin_task:
            paths = BuiltinTask(cfg.task, cfg.seed).write(tmp / "raw")
            sources = {k: str(v) for k, v in paths.items()}
        else:
            sources = {"sft": cfg.data.sft_path, "preference": cfg.data.preference_path}
            if cfg.data.prompt_path:
                sources["prompt"] = cfg.data.prompt_path

        # 2. read + normalise (raises DataError, writing nothing, over the reject rate)
        rows, reports = {}, {}
        for kind, src in sources.items():
            rows[kind], rep = read_rows(src, kind, max_reject_rate=cfg.data.max_reject_rate,
                                        max_chars=cfg.data.max_chars, read_bytes=store.read_bytes,
                                        hf_split=cfg.data.hf_split)
            label = f"builtin:{kind}" if cfg.uses_builtin_task else src
            reports[kind] = {"source": label, "total": rep.total, "accepted": rep.accepted,
                             "rejected": len(rep.bad), "bad_rows": [str(b) for b in rep.bad[:100]]}
        if "prompt" not in rows:
            from rlhf.data.schema import PromptRow

            rows["prompt"] = list(dict.fromkeys(PromptRow(prompt=r.prompt) for r in rows["sft"]))

        # 3. dedupe
        for kind in rows:
            rows[kind], reports[kind]["duplicates_dropped"] = dedupe(rows[kind])

        # 4. tokenizer
        out = tmp / "prep"
        out.mkdir()
        if cfg.model.name_or_path is None:
            all_rows = rows["sft"] + rows["preference"] + rows["prompt"]
            tok = train_tokenizer(_texts(all_rows), cfg.model.vocab_size, out / "tokenizer")
        else:
            tok = load_tokenizer(cfg.model.name_or_path, cfg.model, store)

        # 5. length filter, then split by prompt hash (same salt: a prompt is eval everywhere or nowhere)
        count = lambda s: len(tok(s, add_special_tokens=False)["input_ids"])  # noqa: E731
        splits = {}
        for kind in rows:
            kept, counts = filter_by_length(rows[kind], count, cfg.data.max_prompt_tokens,
                                            cfg.data.max_total_tokens - 1)
            reports[kind]["length_filter"] = counts
            train, evl = split_by_hash(kept, cfg.data.eval_fraction, salt=str(cfg.seed))
            if not train or not evl:
                raise DataError(f"{kind} data from {sources.get(kind, 'sft prompts')}: too few rows after filtering "
                                 f"({len(train)} train / {len(evl)} eval); add data or lower data.eval_fraction")
            splits[f"{kind}_train"], splits[f"{kind}_eval"] = train, evl
        for name, rs in splits.items():
            write_jsonl(rs, out / f"{name}.jsonl")

        # 6. commit
        report = {
            "sources": {k: (f"builtin:{k}" if cfg.uses_builtin_task else v) for k, v in sources.items()},
            "builtin_task": cfg.uses_builtin_task,
            "reports": reports,
            "sizes": {k: len(v) for k, v in splits.items()},
            "hashes": {k: data_hash(v) for k, v in splits.items()},
            "tokenizer": {"trained": cfg.model.name_or_path is None, "vocab_size": len(tok)},
        }
        (out / "report.json").write_text(json.dumps(report, indent=2))
        store.put_dir(out, "prep")
        tracker.log_dict(report, "prep_report.json")
        tracker.log_metrics({f"data/{k}_rows": float(len(v)) for k, v in splits.items()}, step=0)
    result = {"wall_s": timer(), "tracking_s": tracker.seconds, "sizes": report["sizes"], "hashes": report["hashes"]}
    write_result(store, "prep", result)
    return result
