"""The store lease (compare-and-swap on a record): one holder at a time, across
processes; an expired or released claim is taken over by exactly one waiter; the same
owner (a retried step) takes its own claim back. S3's conditional writes are checked
against SeaweedFS in tests/integration/test_s3_store.py."""

from __future__ import annotations

import multiprocessing as mp
import time

import pytest

from rlhf.adapters.lease import Lease, LeaseTimeout
from rlhf.adapters.store import LocalStore


def test_write_if_is_a_compare_and_swap(tmp_path):
    store = LocalStore(tmp_path)
    assert store.read_versioned("a") is None
    first = store.write_if("a", b"1", None)
    assert first and store.write_if("a", b"2", None) is None
    data, token = store.read_versioned("a")
    assert data == b"1" and token == first  # the token a write returns is the one a read sees
    assert not store.write_if("a", b"3", "stale-token")
    assert store.write_if("a", b"4", token) and store.read_bytes("a") == b"4"
    assert not store.write_if("a", b"5", token)  # the token was consumed by the swap


def _hold(root: str, owner: str, q) -> None:
    lease = Lease(LocalStore(root), "work.lease", owner, ttl_s=30)
    with lease.held(60) as mine:
        q.put(("in", owner, time.time()))
        time.sleep(0.5)
        q.put(("out", owner, time.time()))
    assert mine


def test_one_holder_at_a_time_across_processes(tmp_path):
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    procs = [ctx.Process(target=_hold, args=(str(tmp_path), f"run-{i}", q)) for i in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    events = sorted([q.get() for _ in range(6)], key=lambda e: e[2])
    for a, b in zip(events[::2], events[1::2]):  # in/out pairs never interleave
        assert a[0] == "in" and b[0] == "out" and a[1] == b[1]


def test_expired_claim_is_taken_over_and_the_stalled_holder_learns_it(tmp_path):
    store = LocalStore(tmp_path)
    stalled = Lease(store, "w.lease", "run-a", ttl_s=0.4)
    assert stalled.try_acquire()
    stalled._stop.set()  # it stops renewing (hung, or its node vanished)
    other = Lease(store, "w.lease", "run-b", ttl_s=30)
    assert not other.try_acquire()
    time.sleep(0.6)
    assert other.try_acquire() and store.read_versioned("w.lease")
    assert not stalled._swap(stalled._record())  # its token is stale: it cannot renew or release over run-b
    other.release()
    assert Lease(store, "w.lease", "run-c").try_acquire()  # released: free at once


def test_the_same_owner_takes_its_claim_back_and_done_ends_the_wait(tmp_path):
    store = LocalStore(tmp_path)
    first = Lease(store, "p.lease", "kfp-run-1", ttl_s=60)
    assert first.try_acquire()
    first._stop.set()  # the step died without releasing
    assert Lease(store, "p.lease", "kfp-run-1").try_acquire()  # its retry
    waiter = Lease(store, "p.lease", "kfp-run-2")
    flag = {"n": 0}

    def done():
        flag["n"] += 1
        return flag["n"] > 2

    assert waiter.acquire(60, done=done, poll_s=0.01) is False  # the work got done elsewhere
    with pytest.raises(LeaseTimeout, match="still held by 'kfp-run-1'"):
        waiter.acquire(0.05, poll_s=0.01)
