"""Hand-over of camera frames to the inference worker: the newest frame wins.

A camera callback must never wait for the model. Each source (camera topic) has one slot; a
new frame replaces the one still waiting there, and the replaced frame is counted as dropped.
The worker takes every waiting frame at once (one per source), so frames from several cameras
that are ready together can be decoded as one batch (:meth:`LatestFrameSlots.take_all`), or,
with a served model, takes frames one source at a time and keeps that source out until its
frame is done (:meth:`LatestFrameSlots.take_free`, :meth:`LatestFrameSlots.release`): at
most one frame per source in flight, so each source's results leave in the order its frames
came. Urgent items (on-demand requests) wait in a queue of their own, are never dropped and
are taken before any frame.
"""
import collections
import contextlib
import threading
from typing import Any, Dict, Hashable, List, Optional, Tuple


class LatestFrameSlots:
    """Thread-safe "latest value wins" slots, one per source."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._waiting: Dict[Hashable, Any] = {}
        self._urgent: collections.deque = collections.deque()
        self._closed = False
        self._in_use = threading.Lock()
        self._out: set = set()
        self.dropped = 0
        self.accepted = 0

    def put(self, frame: Any, source: Hashable = 'default') -> bool:
        """Offer a frame; returns True when it replaced (dropped) an older waiting one."""
        with self._condition:
            replaced = source in self._waiting
            self._waiting[source] = frame
            self.accepted += 1
            if replaced:
                self.dropped += 1
            self._condition.notify()
            return replaced

    def put_urgent(self, item: Any) -> None:
        """Queue an item that :meth:`take_all` returns before any frame (never dropped)."""
        with self._condition:
            self._urgent.append(item)
            self._condition.notify()

    def take_all(self, timeout: Optional[float] = None, frames: bool = True) -> List[Any]:
        """Wait up to ``timeout`` s for items; return the urgent ones (in order), then, with
        ``frames``, all waiting frames (oldest source first). With ``frames`` false the frames
        keep waiting.

        Returns an empty list on time-out or once closed.
        """
        with self._condition:
            if not (self._urgent or (frames and self._waiting)) and not self._closed:
                self._condition.wait(timeout)
            if self._closed:
                return []
            items = list(self._urgent)
            self._urgent.clear()
            if frames:
                items += self._waiting.values()
                self._waiting.clear()
            return items

    def discard_waiting(self) -> int:
        """Forget the waiting frames (not the urgent items); returns how many there were."""
        with self._condition:
            count = len(self._waiting)
            self._waiting.clear()
            return count

    def take_free(self, limit: int,
                  timeout: Optional[float] = None) -> List[Tuple[Hashable, Any]]:
        """Wait up to ``timeout`` s for a frame of a source that has none out; return
        ``(source, frame)`` pairs of such sources (oldest source first) so that at most
        ``limit`` are out in all, and mark those sources out until :meth:`release`.

        Returns an empty list on time-out or once closed.
        """
        with self._condition:
            ready = self._ready(limit)
            if not ready and not self._closed:
                self._condition.wait_for(lambda: self._closed or self._ready(limit), timeout)
                ready = self._ready(limit)
            if self._closed:
                return []
            taken = []
            for source in ready:
                taken.append((source, self._waiting.pop(source)))
                self._out.add(source)
            return taken

    def release(self, source: Hashable) -> None:
        """The frame taken from ``source`` is done: it may be given another."""
        with self._condition:
            self._out.discard(source)
            self._condition.notify_all()

    @property
    def out(self) -> int:
        """How many sources have a frame out (taken by :meth:`take_free`, not released)."""
        with self._condition:
            return len(self._out)

    def _ready(self, limit: int) -> List[Hashable]:
        free = max(0, limit - len(self._out))
        return [source for source in self._waiting if source not in self._out][:free]

    def close(self) -> None:
        """Wake the worker for shutdown; later takes return nothing, and no :meth:`held_open`
        block runs after this returns (it waits for one that is running)."""
        with self._in_use, self._condition:
            self._closed = True
            self._condition.notify_all()

    @contextlib.contextmanager
    def held_open(self):
        """``with slots.held_open() as still_open:`` keeps :meth:`close` waiting until the
        block ends; ``still_open`` tells whether it was closed before (then do nothing)."""
        with self._in_use:
            yield not self._closed

    @property
    def waiting(self) -> int:
        """How many frames wait to be taken."""
        with self._condition:
            return len(self._waiting)

    @property
    def closed(self) -> bool:
        return self._closed
