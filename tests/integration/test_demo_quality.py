"""The engine's quality bar on the demo preset (about 10 minutes on 2 cores).

Run with `pytest -m slow`. It is the acceptance run of the engine: RLHF must beat SFT
by learning from preferences, measured by a gold judge the reward model never sees.
"""

import json

import pytest

from rlhf.cli import main


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0])
def test_demo_meets_the_quality_bar(tmp_path, seed):
    assert main(["stage", "all", "--preset", "demo", "--set", f"seed={seed}", "--output", str(tmp_path), "--quiet"]) == 0
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["rm/accuracy"] >= 0.80
    assert s["eval/decisive_win_rate_vs_sft"] >= 0.75
    assert s["eval/gold_delta_ci95"][0] > 0
    assert s["wall_s"]["total"] <= 15 * 60
