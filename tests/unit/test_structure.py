"""The architecture, measured (issue: one stage contract and one training layer).

These read the source, so a change that breaks a rule of docs/architecture.md fails
here with the place that broke it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from rlhf.stages.table import STAGES

SRC = Path(__file__).resolve().parents[2] / "src" / "rlhf"
REPO = SRC.parents[1]
MAX_FUNCTION_LINES = 60
MAX_STAGE_MODULE_LINES = 250


def python_files(*rooms: str) -> list[Path]:
    return sorted(p for room in rooms for p in (SRC / room).rglob("*.py"))


def functions(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node.name, node.end_lineno - node.lineno + 1


def imports(path: Path) -> set[str]:
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


@pytest.mark.parametrize("path", python_files("stages", "train"), ids=lambda p: p.relative_to(SRC).as_posix())
def test_no_function_in_stages_or_the_training_layer_is_over_60_lines(path):
    long = {name: n for name, n in functions(path) if n > MAX_FUNCTION_LINES}
    assert not long, f"{path.relative_to(REPO)}: split {long} (at most {MAX_FUNCTION_LINES} lines each)"


def test_every_stage_module_is_under_250_lines():
    for spec in STAGES.values():
        path = SRC.parent / (spec.module.replace(".", "/") + ".py")
        n = len(path.read_text().splitlines())
        assert n < MAX_STAGE_MODULE_LINES, f"{path.relative_to(REPO)} has {n} lines"


def test_every_stage_in_the_table_has_run_ctx():
    import importlib
    import inspect

    for spec in STAGES.values():
        params = list(inspect.signature(importlib.import_module(spec.module).run).parameters)
        assert params == ["ctx"], f"{spec.module}.run{tuple(params)}: a stage is run(ctx) -> StageResult"


def test_stage_names_are_defined_in_one_table():
    """No other module keeps its own table of stages (a literal naming three or more of
    them, like the six tables there were): they read rlhf.stages.table."""
    quoted = re.compile(r'["\'](%s)["\']' % "|".join(STAGES))
    found = []
    for path in [*SRC.rglob("*.py"), *(REPO / "pipelines").rglob("*.py"), *(REPO / "components").glob("*.py")]:
        if path.name == "table.py" or path == SRC / "config.py":  # config sections share the stages' names
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
                text = ast.get_source_segment(path.read_text(), node) or ""
                if len(set(quoted.findall(text))) >= 3 and not isinstance(node, ast.Dict) or (
                        isinstance(node, ast.Dict) and len({k.value for k in node.keys if isinstance(k, ast.Constant)}
                                                           & set(STAGES)) >= 3):
                    found.append(f"{path.relative_to(REPO)}:{node.lineno}")
    assert not found, f"stage names listed outside rlhf/stages/table.py: {sorted(set(found))}"


def test_one_dispatcher_imports_the_stage_modules():
    """Only the dispatcher resolves a stage name to its module."""
    offenders = [p.relative_to(REPO) for p in SRC.rglob("*.py")
                 if "import_module(" in p.read_text() and "spec.module" not in p.read_text()
                 and "rlhf.stages" in p.read_text() and p.name != "dispatch.py"]
    assert not offenders, offenders
    dispatchers = [p.relative_to(REPO) for p in SRC.rglob("*.py") if "import_module(spec.module)" in p.read_text()]
    assert dispatchers == [Path("src/rlhf/dispatch.py")]


ENTRY_POINTS = {"cli.py", "runs.py", "ops/worker.py", "adapters/settings.py", "ops/stack.py"}
"""Process entry points (the CLI, a KFP step, a torchrun worker), the settings module
itself, and the local stack's settings *for its servers' environment*."""


def test_settings_are_read_only_at_process_entry_points():
    readers = {p.relative_to(SRC).as_posix() for p in SRC.rglob("*.py") if "Settings.from_env(" in p.read_text()}
    assert readers <= ENTRY_POINTS, f"Settings.from_env() outside the entry points: {sorted(readers - ENTRY_POINTS)}"
    assert "os.environ" not in "".join(p.read_text() for p in python_files("stages", "train", "math", "models", "data"))


ROOMS = {
    # room: packages of this project it may import (besides itself, rlhf.config and the leaf
    # rlhf.redaction, which every message that can carry a secret passes through)
    "math": set(),
    "models": {"rlhf.math"},
    "data": {"rlhf.math", "rlhf.models"},
    "train": {"rlhf.math", "rlhf.models", "rlhf.adapters"},
    "stages": {"rlhf.math", "rlhf.models", "rlhf.data", "rlhf.train", "rlhf.adapters"},
    "adapters": set(),
}


@pytest.mark.parametrize("room", sorted(ROOMS))
def test_each_room_imports_only_what_it_may(room):
    allowed = ROOMS[room] | {f"rlhf.{room}", "rlhf.config", "rlhf.redaction", "rlhf"}
    bad = {}
    for path in python_files(room):
        mine = {m for m in imports(path) if m == "rlhf" or m.startswith("rlhf.")}
        wrong = {m for m in mine if not any(m == a or m.startswith(a + ".") for a in allowed)}
        if wrong:
            bad[path.relative_to(REPO).as_posix()] = sorted(wrong)
    assert not bad, f"rlhf.{room} may import only {sorted(allowed)}: {bad}"


def test_math_imports_only_torch_and_the_standard_library():
    third_party = set()
    for path in python_files("math"):
        third_party |= {m.split(".")[0] for m in imports(path)} - {"torch", "rlhf", "__future__", "math", "typing",
                                                                   "collections", "dataclasses"}
    assert not third_party, third_party


def test_no_stage_imports_another_stage():
    stage_modules = {s.module for s in STAGES.values()}
    for spec in STAGES.values():
        path = SRC.parent / (spec.module.replace(".", "/") + ".py")
        others = (imports(path) & stage_modules) - {spec.module}
        assert not others, f"{spec.module} imports {others}"


def test_no_stage_module_imports_kfp():
    for path in python_files("stages", "train", "math", "models", "data"):
        assert not {m for m in imports(path) if m.split(".")[0] == "kfp"}, path
