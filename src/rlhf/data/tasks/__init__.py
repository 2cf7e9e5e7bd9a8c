"""Built-in synthetic instruction tasks with a programmatic gold judge.

A task family is a plugin: subclass `TaskFamily` (see `base.py`), give it a unique
`name` and register it with `@register`. Nothing else in the code base needs to change.
"""

from rlhf.data.tasks.base import (
    FAMILIES,
    TaskFamily,
    families,
    find_family,
    gold_score,
    register,
)
from rlhf.data.tasks import reverse as _reverse  # noqa: F401  (registers the family)
from rlhf.data.tasks import sort as _sort  # noqa: F401
from rlhf.data.tasks.builtin import BuiltinTask

__all__ = ["FAMILIES", "TaskFamily", "families", "find_family", "gold_score", "register", "BuiltinTask"]
