"""Fixtures for tests that need the real local stack (SeaweedFS + MLflow server).

`local_stack` starts one stack per test session, on free ports in a temporary folder,
and always stops it. `s3_store` is an S3Store on a fresh prefix of bucket `rlhf` of
that stack. Credentials and endpoint travel in a Settings object built from
`local_stack.env()`; os.environ is never changed.

To use them in another test folder, import them in its conftest.py the way
tests/integration/conftest.py does. Each conftest that imports `local_stack` makes
pytest run the fixture once more, so the stack itself is shared here: the first user
starts it, the last one to finish stops it (one start per session, not per folder).
"""

from __future__ import annotations

import os
import uuid

import pytest

from rlhf.ops.stack import Stack
from rlhf.adapters.store import S3Store

_shared: dict = {"stack": None, "users": 0}


@pytest.fixture(scope="session")
def local_stack(tmp_path_factory):
    if _shared["stack"] is None:
        _shared["stack"] = Stack(tmp_path_factory.mktemp("stack"), ports="free", startup_timeout=120,
                                 admin_password=os.environ["RLHF_STACK_ADMIN_PASSWORD"])  # tests/conftest.py
    stack = _shared["stack"]
    _shared["users"] += 1
    try:
        stack.up()  # a no-op when it already runs
        yield stack
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            _shared["stack"] = None
            stack.down()


@pytest.fixture
def s3_store(local_stack) -> S3Store:
    return S3Store(f"s3://rlhf/tests/{uuid.uuid4().hex[:12]}", local_stack.settings())
