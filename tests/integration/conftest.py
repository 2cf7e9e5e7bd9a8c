"""Integration fixtures. The test folders are not packages, so the fixture module is
imported by file location rather than as `tests.integration.stack_fixtures` (which
works only when the repository root happens to be on sys.path)."""

import sys
from pathlib import Path

_here = str(Path(__file__).parent)
if _here not in sys.path:
    sys.path.insert(0, _here)

from stack_fixtures import local_stack, s3_store  # noqa: E402,F401  (fixtures, found by name)
