"""The committed output of data prep, read back by the later stages."""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.data.processing import read_jsonl_rows


class PrepData:
    """The committed output of data prep, read back for later stages."""

    def __init__(self, store):
        self.dir = store.get_dir("prep")
        self.manifest = json.loads((self.dir / "report.json").read_text())

    def rows(self, name: str):
        return read_jsonl_rows(self.dir / f"{name}.jsonl", name.split("_")[0])  # e.g. "sft_train" -> kind "sft"

    def has(self, name: str) -> bool:
        return (self.dir / f"{name}.jsonl").is_file()

    @property
    def eval_fraction(self) -> float:
        """The share of prompts the split held out (datasets prepared before it was
        recorded were split with the default, 0.1)."""
        return self.manifest.get("eval_fraction", 0.1)

    @property
    def tokenizer_dir(self) -> Path | None:
        p = self.dir / "tokenizer"
        return p if p.is_dir() else None
