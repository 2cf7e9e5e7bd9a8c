"""An exclusive, expiring claim on a key of an artifact store (local or S3).

Two runs must not both do one piece of shared work (prepare the same dataset) or move
one alias from two stale views (`@champion`). `Lease` is the lock for that, built on
the store's compare-and-swap (`write_if`: a lock file beside the object locally, S3
conditional writes If-None-Match / If-Match):

    {"owner": ..., "expires": unix time, "released": false}

Whoever swaps in their own record holds it. A holder renews it every `ttl_s / 4` from
a thread; a record past `expires` (its holder died, was preempted or hung) or marked
released may be taken over by the next one, again by compare-and-swap, so at most one
taker wins. Nothing is ever deleted, so there is no delete race. The owner id of a
retried step stays the same: a retry takes its own lease back at once.
"""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from collections.abc import Callable, Iterator


def owner_id() -> str:
    """Who holds a lease: host, process and a random part (unique per process)."""
    import os
    import socket
    import uuid

    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class LeaseTimeout(RuntimeError):
    """Another owner held the lease for longer than the caller would wait."""


class Lease:
    def __init__(self, store, key: str, owner: str, ttl_s: float = 120.0):
        self.store, self.key, self.owner, self.ttl_s = store, key, owner, ttl_s
        self._token: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False
        """Set when a renewal found the lease taken over (this holder stalled past ttl_s)."""

    def _record(self, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.ttl_s, "released": released}).encode()

    def holder(self) -> dict | None:
        """The current record (None: never taken)."""
        current = self.store.read_versioned(self.key)
        return json.loads(current[0]) if current else None

    def try_acquire(self) -> bool:
        current = self.store.read_versioned(self.key)
        if current is not None:
            data = json.loads(current[0])
            free = data.get("released") or data.get("expires", 0) < time.time() or data.get("owner") == self.owner
            if not free:
                return False
        token = current[1] if current else None
        self._token = self.store.write_if(self.key, self._record(), token)
        if self._token is None:
            return False
        self._stop.clear()
        self._thread = threading.Thread(target=self._renew, name=f"lease-{self.key}", daemon=True)
        self._thread.start()
        return True

    def acquire(self, wait_s: float, done: Callable[[], bool] = lambda: False, poll_s: float = 2.0) -> bool:
        """Hold the lease (True), or return False as soon as `done()` says the work is no
        longer needed (another owner finished it). Raises LeaseTimeout after `wait_s`."""
        deadline, said = time.monotonic() + wait_s, False
        while True:
            if done():
                return False
            if self.try_acquire():
                return True
            if not said:
                holder = self.holder() or {}
                print(f"waiting for {self.store.uri(self.key)}: held by {holder.get('owner')!r} (taken over if it is "
                      f"not renewed within {self.ttl_s:.0f} s)", file=sys.stderr, flush=True)
                said = True
            if time.monotonic() > deadline:
                holder = self.holder() or {}
                raise LeaseTimeout(f"{self.store.uri(self.key)} is still held by {holder.get('owner')!r} after "
                                   f"{wait_s:.0f} s; if that run is gone, the claim expires {self.ttl_s:.0f} s after "
                                   "its last renewal")
            time.sleep(poll_s)

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            if not self._swap(self._record()):
                self.lost = True
                print(f"warning: lost {self.store.uri(self.key)} to another owner (this one stalled past "
                      f"{self.ttl_s:.0f} s)", file=sys.stderr, flush=True)
                return

    def _swap(self, record: bytes) -> bool:
        if self._token is not None:
            self._token = self.store.write_if(self.key, record, self._token)
        return self._token is not None

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if not self.lost:
            self._swap(self._record(released=True))
        self._token = None

    @contextlib.contextmanager
    def held(self, wait_s: float, done: Callable[[], bool] = lambda: False) -> Iterator[bool]:
        """`with lease.held(...) as mine:` mine is False when `done()` came true instead."""
        mine = self.acquire(wait_s, done)
        try:
            yield mine
        finally:
            if mine:
                self.release()
