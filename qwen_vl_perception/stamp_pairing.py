"""Pair each colour frame with the depth frame nearest to it in time (no ROS).

Colour and depth come on two topics; their stamps differ by up to a frame period and their
messages arrive in any order. :class:`NearestStamp` keeps the depth frames of the last
``keep_s`` seconds (by stamp) and answers a colour frame's :meth:`~NearestStamp.request`
with the nearest one within ``max_skew_s``, including depth frames that arrive after the
request: a request collects candidates until it is resolved, holding only the best one.
Requests are weakly referenced: a colour frame that is dropped unprocessed drops its request.
"""
import collections
import threading
import weakref
from typing import Any, Optional


class Pairing:
    """One colour frame's pending match (see :meth:`NearestStamp.request`)."""

    def __init__(self, stamp: float):
        self.stamp = stamp
        self.best: Optional[Any] = None
        self.best_skew = float('inf')

    def offer(self, stamp: float, item: Any, max_skew_s: float) -> None:
        skew = abs(stamp - self.stamp)
        if skew <= max_skew_s and skew < self.best_skew:
            self.best, self.best_skew = item, skew


class NearestStamp:
    """Recent items (depth frames) by stamp, matched to requests (colour stamps)."""

    def __init__(self, max_skew_s: float, keep_s: float = 1.0, max_items: int = 60):
        if max_skew_s < 0.0 or keep_s <= 0.0 or max_items < 1:
            raise ValueError('max_skew_s must be >= 0, keep_s and max_items positive')
        self.max_skew_s = float(max_skew_s)
        self.keep_s = max(float(keep_s), self.max_skew_s)
        self._items = collections.deque(maxlen=max_items)  # (stamp, item), arrival order
        self._pending: 'weakref.WeakSet[Pairing]' = weakref.WeakSet()
        self._newest = float('-inf')
        self._condition = threading.Condition()

    def add(self, stamp: float, item: Any) -> None:
        """A depth frame arrived (any thread)."""
        with self._condition:
            self._items.append((stamp, item))
            self._newest = max(self._newest, stamp)
            while self._items and self._items[0][0] < self._newest - self.keep_s:
                self._items.popleft()
            for pairing in list(self._pending):
                pairing.offer(stamp, item, self.max_skew_s)
            self._condition.notify_all()

    def request(self, stamp: float) -> Pairing:
        """Start matching a colour frame stamped ``stamp`` (call it when the frame arrives)."""
        pairing = Pairing(stamp)
        with self._condition:
            for item_stamp, item in self._items:
                pairing.offer(item_stamp, item, self.max_skew_s)
            self._pending.add(pairing)
        return pairing

    @property
    def pending(self) -> int:
        """Requests not resolved yet whose colour frame still exists."""
        with self._condition:
            return len(self._pending)

    def resolve(self, pairing: Pairing, wait_s: float = 0.0) -> Optional[Any]:
        """The nearest item within the skew, or None. Waits up to ``wait_s`` (wall clock)
        while none has come yet but one still may (no item stamped later than the window)."""
        with self._condition:
            self._condition.wait_for(
                lambda: pairing.best is not None
                or self._newest > pairing.stamp + self.max_skew_s, timeout=wait_s)
            self._pending.discard(pairing)
            return pairing.best
