"""Task plugins from outside the package reach every process that runs a stage.

A plugin folder is written to a temporary directory that is only on PYTHONPATH, never
inside the package: `acme_tasks.mirror` (a family registered on import, named in
`task.plugins`) and `acme_tasks.shift:Shift` (a family class offered by an installed
distribution's `rlhf.tasks` entry point: an `acme_tasks-0.1.dist-info` folder, as pip
writes it). Each family has its own gold judge, different from the built-in one, so
the judge scores in eval's samples show which judge the eval step used.

`rlhf run` then takes the DAG prep -> eval -> promote through kfp.local on that task:
warm KFP steps with the training stages in two torchrun processes each, and (marked
slow) again with every step started cold.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from rlhf.config import ConfigError, load_config

MIRROR = '''
"""`mirror: a b c` -> ` a b c c b a`; judged by the share of the target's leading items
that are right (not edit similarity), verbose answers halved."""
import random

from rlhf.data.tasks.base import TaskFamily, register

LETTERS = list("pqrstu")


@register
class Mirror(TaskFamily):
    name = "mirror"
    prompt_prefix = "mirror:"

    def alphabet(self):
        return LETTERS

    def make_items(self, rng: random.Random, n: int):
        return [rng.choice(LETTERS) for _ in range(n)]

    def target(self, items):
        return items + items[::-1]

    def gold_score(self, prompt, completion):
        target = self.target(self.parse_prompt(prompt))
        words = completion.split()
        answer = [w for w in words if w in LETTERS]
        right = 0
        for a, t in zip(answer, target):
            if a != t:
                break
            right += 1
        score = right / max(len(target), len(answer))
        return score / 2 if len(answer) != len(words) else score
'''

SHIFT = '''
"""`shift: 1 2 3` -> ` 2 3 4` (mod 10); writers forget to shift the last item."""
import random

from rlhf.data.tasks.base import TaskFamily

DIGITS = [str(i) for i in range(10)]


class Shift(TaskFamily):  # not decorated: the entry point names the class
    name = "shift"
    prompt_prefix = "shift:"

    def alphabet(self):
        return DIGITS

    def make_items(self, rng: random.Random, n: int):
        return [rng.choice(DIGITS) for _ in range(n)]

    def target(self, items):
        return [str((int(i) + 1) % 10) for i in items]

    def mistake(self, rng, items, answer):
        return answer[:-1] + items[-1:] if answer[-1:] != items[-1:] else answer + answer[-1:]
'''


def write_plugins(root: Path, name: str = "acme_tasks") -> Path:
    """The plugin package `name` and its distribution's metadata, in `root`."""
    pkg = root / name
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "mirror.py").write_text(MIRROR)
    (pkg / "shift.py").write_text(SHIFT)
    dist = root / f"{name}-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[rlhf.tasks]\nshift = {name}.shift:Shift\n")
    return root


@pytest.fixture(scope="module")
def plugins(tmp_path_factory) -> Path:
    return write_plugins(tmp_path_factory.mktemp("site"))


def rlhf(home: Path, plugins: Path, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full = {**os.environ, "RLHF_HOME": str(home), "RLHF_RETRY_BACKOFF": "1s", **(env or {})}
    full["PYTHONPATH"] = os.pathsep.join(p for p in (str(plugins), full.get("PYTHONPATH", "")) if p)
    full.pop("MLFLOW_TRACKING_URI", None)
    return subprocess.run([sys.executable, "-m", "rlhf.cli", *args], env=full, capture_output=True, text=True,
                          timeout=900)


TASK = ["--set", "task.families=[mirror,shift]", "--set", "task.plugins=[acme_tasks.mirror]"]
TINY = ["--preset", "tiny", "--set", "num_threads=1", "--set", "gate.min_decisive_win_rate=0.0",
        "--set", "tracking.experiment=plugins", *TASK]


def judge_in_this_process(plugins: Path):
    """The plugin families, imported here the way the steps import them."""
    sys.path.insert(0, str(plugins))
    try:
        from rlhf.data.tasks.plugins import resolve_families

        return {f.name: f for f in resolve_families(["mirror", "shift"], ["acme_tasks.mirror"])}
    finally:
        sys.path.remove(str(plugins))


def check_run(out: Path, plugins: Path) -> dict:
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval/judge"] == "gold" and summary["promoted"] is True
    fams = judge_in_this_process(plugins)
    samples = json.loads((out / "eval" / "samples.json").read_text())
    assert {s["prompt"].split(":")[0] for s in samples} <= {"mirror", "shift"}
    for s in samples:  # eval's judge is the plugin's own, not edit similarity
        fam = fams[s["prompt"].split(":")[0]]
        assert s["judge_sft"] == pytest.approx(fam.gold_score(s["prompt"], s["sft"]))
        assert s["judge_policy"] == pytest.approx(fam.gold_score(s["prompt"], s["policy"]))
    prep = list(out.parent.glob("_datasets/*/prep/*.jsonl"))  # prep's output, shared by runs of one dataset
    assert prep
    prompts = {json.loads(line)["prompt"].split(":")[0] for f in prep for line in f.read_text().splitlines()
               if "prompt" in json.loads(line)}
    assert prompts == {"mirror", "shift"}, prompts
    return summary


def test_plugin_task_through_rlhf_run_warm_steps_and_torchrun_workers(tmp_path, plugins):
    r = rlhf(tmp_path, plugins, "run", *TINY, "--set", "tracking.registered_model=plug-warm",
             "--set", "distributed.num_processes=2", "--output", str(tmp_path / "run"))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_run(tmp_path / "run", plugins)
    for stage in ("sft", "reward", "ppo"):  # each in two torchrun workers, which built the task themselves
        assert json.loads((tmp_path / "run" / stage / "result.json").read_text())["processes"] == 2


@pytest.mark.slow  # every step a fresh Python: ~100 s on 2 cores; the warm run above covers the default path
def test_plugin_task_through_rlhf_run_cold_steps(tmp_path, plugins):
    r = rlhf(tmp_path, plugins, "run", *TINY, "--set", "tracking.registered_model=plug-cold",
             "--output", str(tmp_path / "run"), env={"RLHF_WARM_STEPS": "0"})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_run(tmp_path / "run", plugins)


def test_a_missing_plugin_fails_before_anything_starts(tmp_path, plugins):
    r = rlhf(tmp_path, plugins, "run", *TINY, "--set", "task.plugins=[acme_tasks.nowhere]",
             "--output", str(tmp_path / "run"))
    assert r.returncode == 2
    assert "task.plugins[0]: cannot import module 'acme_tasks.nowhere'" in r.stderr
    assert "PYTHONPATH" in r.stderr
    assert not (tmp_path / "run").exists()

    r = rlhf(tmp_path, plugins, "run", "--preset", "tiny", "--set", "task.families=[mirror,sort]",
             "--output", str(tmp_path / "run"))  # mirror's module is not named, and no entry point offers it
    assert r.returncode == 2
    assert "task.families: unknown task families ['mirror']" in r.stderr
    assert "'shift'" in r.stderr and "task.plugins" in r.stderr and "'rlhf.tasks'" in r.stderr
    assert not (tmp_path / "run").exists()


def test_plugins_must_be_module_names():
    with pytest.raises(ConfigError, match=r"task\.plugins.*not a module name.*my_tasks\.rotate"):
        load_config("tiny", None, ["task.plugins=[./acme_tasks/mirror.py]"])


def test_a_broken_entry_point_names_its_distribution(tmp_path, monkeypatch):
    root = write_plugins(tmp_path, "acme_broken")
    (root / "acme_broken-0.1.dist-info" / "entry_points.txt").write_text("[rlhf.tasks]\nbad = acme_broken.absent\n")
    monkeypatch.syspath_prepend(str(root))
    from rlhf.data.tasks.plugins import load_plugins

    with pytest.raises(ConfigError, match=r"entry point 'bad' = 'acme_broken.absent'.*acme-broken.*uninstall"):
        load_plugins()


def test_an_entry_point_class_that_clashes_with_a_family_is_refused(tmp_path, monkeypatch):
    root = write_plugins(tmp_path, "acme_clash")
    (root / "acme_clash" / "clash.py").write_text(textwrap.dedent('''
        from rlhf.data.tasks.reverse import Reverse

        class Impostor(Reverse):
            pass
        '''))
    (root / "acme_clash-0.1.dist-info" / "entry_points.txt").write_text(
        "[rlhf.tasks]\nimpostor = acme_clash.clash:Impostor\n")
    monkeypatch.syspath_prepend(str(root))
    from rlhf.data.tasks.plugins import load_plugins

    with pytest.raises(ConfigError, match=r"family 'reverse' is already registered by rlhf.data.tasks.reverse"):
        load_plugins()
