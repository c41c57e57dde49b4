"""One generation per model at a time.

The KV cache belongs to the model, so two generations on one model would overwrite each other's keys and values.
Each model gets a lock: a generation holds it from the call until it ends (a stream: until its generator has stopped).
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
    """The iterator of text pieces that generate(stream=True) returns: holds the model's generation lock until the
    generator has stopped (exhausted, failed, closed or garbage-collected).

    close() may come from any thread. While no step runs, it stops the generator and frees the model at once. While
    another thread is inside a step, close() only asks for the stop and returns: that step still returns its piece,
    then the iterating thread stops the generator and frees the model, and later steps raise StopIteration. The model
    is thus never freed while a step still uses its KV cache: a generation started right after close() waits for the
    running step. Two threads iterating one stream at once is a RuntimeError for the second.
    """

    def __init__(self, pieces: Iterator[str], lock: GenerationLock):
        self._pieces, self._lock = pieces, lock
        self._state = threading.Lock()  # guards _lock, _busy and _stop between the iterating thread and close()
        self._busy = False  # a thread is inside a step (next of the generator)
        self._stop = False  # close() came during a step: stop after it

    def __iter__(self):
        return self

    def __next__(self) -> str:
        with self._state:
            if self._lock is None:
                raise StopIteration
            if self._busy:
                raise RuntimeError("this stream is being iterated by another thread")
            self._busy = True
        try:
            piece = next(self._pieces)
        except BaseException:
            self._end(take=True)
            raise
        self._end(take=False)
        return piece

    def close(self) -> None:
        """Stop generating and free the model for the next generation (after the running step, if one runs)."""
        with self._state:
            if self._busy:
                self._stop = True
                return
            lock, self._lock = self._lock, None
        self._free(lock)

    def _end(self, *, take: bool) -> None:
        """The iterating thread leaves a step; with take, it also stops the generator and frees the model."""
        with self._state:
            self._busy = False
            lock = None
            if take or self._stop:
                lock, self._lock = self._lock, None
        self._free(lock)

    def _free(self, lock: Optional[GenerationLock]) -> None:
        if lock is not None:
            try:
                self._pieces.close()
            finally:
                lock.release()

    def __del__(self):
        self.close()
