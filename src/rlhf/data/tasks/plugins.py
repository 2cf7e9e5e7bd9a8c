"""Task plugins: task families (each with its gold judge) that live outside this package.

A plugin is a module that defines a `TaskFamily` subclass and registers it with
`@register` when imported. It reaches every process that runs a stage (the CLI, KFP
steps warm or cold, torchrun workers, Kubeflow Trainer pods) in either of two ways:

- **installed**: a distribution that declares an entry point in the `rlhf.tasks` group,
  e.g. in its pyproject.toml

      [project.entry-points."rlhf.tasks"]
      rotate = "my_tasks.rotate"            # a module (imported), or
      dedupe = "my_tasks.dedupe:Dedupe"     # a TaskFamily class (registered if not yet)

  Every installed one is loaded; nothing in the config names it.
- **named**: `task.plugins: [my_tasks.rotate, ...]`, modules importable in every process
  (installed, or on PYTHONPATH). The config travels to each step and worker, so each
  imports them.

`load_plugins` is called where the judge and the task are built (`judge.build_judge`,
`judge.build_task`), which every stage's context goes through, and by the CLI before it
starts anything, so a missing plugin fails first, naming the setting and the fix.
"""

from __future__ import annotations

import importlib
import inspect
from importlib.metadata import entry_points
from typing import Iterable

from rlhf.config import ConfigError
from rlhf.data.tasks.base import FAMILIES, TaskFamily, register

ENTRY_POINT_GROUP = "rlhf.tasks"

_loaded: set[str] = set()  # entry points ("name = value") and modules already imported in this process


def load_plugins(modules: Iterable[str] = ()) -> list[str]:
    """Import the installed `rlhf.tasks` entry points and then `modules` (task.plugins),
    each once per process; returns the names of the families registered now."""
    before = set(FAMILIES)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        key = f"{ep.name} = {ep.value}"
        if key in _loaded:
            continue
        dist = getattr(ep.dist, "name", None) or "an installed distribution"
        try:
            obj = ep.load()
        except Exception as e:
            raise ConfigError(f"task plugin entry point {ep.name!r} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}, "
                              f"from {dist}) failed to load: {type(e).__name__}: {e}. Fix the plugin, or "
                              f"uninstall {dist}") from e
        _register_class(obj, f"entry point {ep.name!r} of {dist}")
        _loaded.add(key)
    for i, name in enumerate(modules):
        if name in _loaded:
            continue
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"task.plugins[{i}]: cannot import module {name!r} ({type(e).__name__}: {e}). "
                              "Install the plugin's package, or put the folder that holds it on PYTHONPATH "
                              "(in the image, for cluster runs)") from e
        _loaded.add(name)
    return sorted(set(FAMILIES) - before)


def _register_class(obj, where: str) -> None:
    """An entry point may name a TaskFamily class instead of a module: register it
    unless its module's import already did."""
    if inspect.isclass(obj) and issubclass(obj, TaskFamily):
        name = obj.name
        if not name:
            raise ConfigError(f"task plugin {where}: {obj.__qualname__} has no `name`")
        if name not in FAMILIES:
            register(obj)
        elif type(FAMILIES[name]) is not obj:
            raise ConfigError(f"task plugin {where}: family {name!r} is already registered by "
                              f"{type(FAMILIES[name]).__module__}; rename one of them")


def resolve_families(names: list[str], plugins: Iterable[str] = ()) -> list[TaskFamily]:
    """The families `task.families` names, after loading every plugin; an unknown name
    is a ConfigError that lists what is available and how to add more."""
    plugins = list(plugins)
    load_plugins(plugins)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        named = f" (task.plugins: {plugins})" if plugins else ""
        raise ConfigError(f"task.families: unknown task families {unknown}; available: {sorted(FAMILIES)}{named}. "
                          f"A family outside this package is a plugin: name its module in task.plugins, or install "
                          f"a package with an entry point in the {ENTRY_POINT_GROUP!r} group")
    return [FAMILIES[n] for n in names]
