"""One generation per model at a time.

The KV cache belongs to the model, so two generations on one model would overwrite each other's keys and values.
Each model gets a lock: a generation holds it from the call until it ends (a stream: until it is exhausted or closed).
Another thread waits for it; the thread that holds it gets an error instead, since waiting would deadlock.
"""

import threading
import weakref
from typing import Iterator, Optional

from .model import Phixtral

_LOCKS: "weakref.WeakKeyDictionary[Phixtral, GenerationLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


class GenerationLock:
    """A lock that knows the thread holding it, so that a thread asking twice gets an error instead of a deadlock."""

    def __init__(self):
        self._lock = threading.Lock()
        self.holder: Optional[int] = None  # thread id of the generation that holds the lock

    def acquire(self) -> None:
        if self.holder == threading.get_ident():
            raise RuntimeError(
                "this model is already generating in this thread (a stream still open?): exhaust or close() it "
                "before starting another generation"
            )
        self._lock.acquire()
        self.holder = threading.get_ident()

    def release(self) -> None:
        self.holder = None
        self._lock.release()


def generation_lock(model: Phixtral) -> GenerationLock:
    """The lock that serializes generations on `model` (see the module docstring)."""
    with _LOCKS_GUARD:
        lock = _LOCKS.get(model)
        if lock is None:
            lock = _LOCKS[model] = GenerationLock()
        return lock


class LockedStream:
    """The iterator of text pieces that generate(stream=True) returns: holds the model's generation lock until it is
    exhausted, fails or is closed (or garbage-collected)."""

    def __init__(self, pieces: Iterator[str], lock: GenerationLock):
        self._pieces, self._lock = pieces, lock

    def __iter__(self):
        return self

    def __next__(self) -> str:
        try:
            return next(self._pieces)
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        """Stop generating and free the model for the next generation."""
        lock, self._lock = self._lock, None
        if lock is not None:
            try:
                self._pieces.close()
            finally:
                lock.release()

    def __del__(self):
        self.close()
