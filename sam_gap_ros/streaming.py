"""ROS-free streaming helpers for the segmenter node.

* ``StampPairer``: pairs colour frames with depth frames by header stamp within a bounded
  tolerance (message_filters' ApproximateTime role, without the dependency).
* ``LatestSlot``: a one-element mailbox; a newer item replaces an unprocessed older one,
  which is counted as dropped, so inference latency never accumulates behind a queue.
* ``RateMeter`` and ``LatencyWindow``: sliding-window statistics for diagnostics.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
import threading
from typing import Any, Deque, Generic, List, Optional, Tuple, TypeVar

import numpy as np

T = TypeVar('T')


@dataclass
class Paired:
    """A colour item with its matched depth item (None when unmatched or depth disabled)."""

    stamp: float
    primary: Any
    secondary: Any = None


class StampPairer:
    """Pair primary (colour) and secondary (depth) items whose stamps differ <= ``tolerance``.

    A primary is released as soon as a secondary within tolerance is known. It is released
    unpaired (and counted) when waiting is pointless: a secondary newer than
    ``stamp + tolerance`` has arrived (streams are stamp-ordered), or it waited
    ``max_wait`` seconds of receive time (depth stream stalled). Only the newest
    ``max_pending`` primaries wait; older ones are dropped and counted. Among equally close
    secondaries the newest wins (a driver that stamps every frame alike still pairs with
    current depth).

    A stamp more than ``max_jump`` seconds (at least twice the tolerance) older than the
    newest held secondary means time went back (a bag played in a loop, a simulator
    restarted): the held secondaries are forgotten and the jump counted. They could never
    pair with later frames, and left in place they would make every new colour frame look
    late (released unpaired at once) until they aged out. Colour frames still waiting from
    before the jump are dropped (newer frames exist), and for ``max_wait`` seconds items
    stamped from before the jump (depth lagging colour at a bag's loop point) are stale:
    a late depth frame would make the new frames look late, a late colour frame would
    come after them.
    """

    def __init__(self, tolerance: float, max_wait: float, max_pending: int = 4,
                 max_secondary: int = 8, max_jump: float = 1.0) -> None:
        if tolerance < 0 or max_wait < 0 or max_jump <= 0:
            raise ValueError('tolerance and max_wait must be >= 0, max_jump > 0')
        self.tolerance = float(tolerance)
        self.max_wait = float(max_wait)
        self.max_jump = max(float(max_jump), 2.0 * self.tolerance)
        self._pending: Deque[Tuple[float, float, Any]] = deque()
        self._max_pending = max(1, int(max_pending))
        self._secondary: Deque[Tuple[float, Any]] = deque(maxlen=max(1, int(max_secondary)))
        self.unpaired = 0
        self.dropped = 0
        self.time_jumps = 0
        # After a jump back: stamps above _stale_above are from before it, until _stale_until.
        self._stale_above = float('inf')
        self._stale_until = float('-inf')

    def add_primary(self, stamp: float, item: Any, now: float) -> List[Paired]:
        """Offer a colour item received at ``now``; return the pairs that became ready.

        Like every method here, returns them in stamp order: a consumer that keeps only the
        newest (``LatestSlot``) then keeps the newest frame.
        """
        if self._stale(stamp, now):
            self.dropped += 1
            return self._expire(now)
        self._forget_secondaries_after_jump(stamp, now)
        match = self._best_secondary(stamp)
        if match is not None:
            return _in_stamp_order(self._expire(now) + [Paired(stamp, item, match)])
        self._pending.append((stamp, now, item))
        while len(self._pending) > self._max_pending:
            self._pending.popleft()
            self.dropped += 1
        return self._expire(now)

    def add_secondary(self, stamp: float, item: Any, now: float) -> List[Paired]:
        """Offer a depth item; return the pending colour items it completes or expires."""
        if self._stale(stamp, now):
            return self._expire(now)
        self._forget_secondaries_after_jump(stamp, now)
        self._secondary.append((stamp, item))
        ready: List[Paired] = []
        still: Deque[Tuple[float, float, Any]] = deque()
        for p_stamp, received, p_item in self._pending:
            match = self._best_secondary(p_stamp)
            if match is not None:
                ready.append(Paired(p_stamp, p_item, match))
            else:
                still.append((p_stamp, received, p_item))
        self._pending = still
        # Sorted: the depth that completes a newer frame also expires the older frames
        # still waiting, and those must not come last and take its place in the slot.
        return _in_stamp_order(ready + self._expire(now))

    def poll(self, now: float) -> List[Paired]:
        """Release primaries whose wait for depth has run out."""
        return self._expire(now)

    def clear(self) -> None:
        """Forget everything pending (e.g. on deactivate); pending colour items are dropped."""
        self.dropped += len(self._pending)
        self._pending.clear()
        self._secondary.clear()
        self._stale_until = float('-inf')

    @property
    def pending(self) -> int:
        """Return the number of colour items waiting for depth."""
        return len(self._pending)

    def _forget_secondaries_after_jump(self, stamp: float, now: float) -> None:
        """Drop the held secondaries when ``stamp`` is ``max_jump`` older than the newest."""
        newest = self._newest_secondary()
        if newest is not None and stamp < newest - self.max_jump:
            self.time_jumps += 1
            self._secondary.clear()
            self._stale_above, self._stale_until = newest - self.max_jump, now + self.max_wait
            before = len(self._pending)
            self._pending = deque(p for p in self._pending if not self._stale(p[0], now))
            self.dropped += before - len(self._pending)

    def _stale(self, stamp: float, now: float) -> bool:
        return now < self._stale_until and stamp > self._stale_above

    def _newest_secondary(self) -> Optional[float]:
        return max((s for s, _ in self._secondary), default=None)

    def _best_secondary(self, stamp: float) -> Any:
        best, best_dt = None, None
        for s_stamp, s_item in self._secondary:  # oldest first: '<=' lets the newest win ties
            dt = abs(s_stamp - stamp)
            if dt <= self.tolerance and (best_dt is None or dt <= best_dt):
                best, best_dt = s_item, dt
        return best

    def _expire(self, now: float) -> List[Paired]:
        newest = self._newest_secondary()
        ready: List[Paired] = []
        still: Deque[Tuple[float, float, Any]] = deque()
        for p_stamp, received, p_item in self._pending:
            passed = newest is not None and newest > p_stamp + self.tolerance
            if passed or now - received >= self.max_wait:
                self.unpaired += 1
                ready.append(Paired(p_stamp, p_item, None))
            else:
                still.append((p_stamp, received, p_item))
        self._pending = still
        return ready


def _in_stamp_order(pairs: List[Paired]) -> List[Paired]:
    return sorted(pairs, key=lambda pair: pair.stamp)  # stable: equal stamps keep their order


class LatestSlot(Generic[T]):
    """Thread-safe single-item mailbox: ``put`` overwrites, ``take`` blocks until an item."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._item: Optional[T] = None
        self._has_item = False
        self._closed = False
        self.put_count = 0
        self.dropped = 0

    def put(self, item: T) -> None:
        """Store ``item``; an older item not yet taken is dropped and counted."""
        with self._cond:
            if self._has_item:
                self.dropped += 1
            self._item, self._has_item = item, True
            self.put_count += 1
            self._cond.notify()

    def take(self, timeout: Optional[float] = None) -> Optional[T]:
        """Return the newest item, or None on timeout or after ``close``."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._has_item or self._closed, timeout):
                return None
            if not self._has_item:
                return None
            item, self._item, self._has_item = self._item, None, False
            return item

    def clear(self) -> bool:
        """Discard a waiting item (counted as dropped); return whether there was one."""
        with self._cond:
            had = self._has_item
            if had:
                self.dropped += 1
            self._item, self._has_item = None, False
            return had

    def close(self) -> None:
        """Wake every waiting ``take`` and make further takes return None."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    def reopen(self) -> None:
        """Allow takes again after ``close``."""
        with self._cond:
            self._closed = False


class RateMeter:
    """Events per second over a sliding time window."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = float(window)
        self._times: Deque[float] = deque()
        self._lock = threading.Lock()

    def tick(self, now: float) -> None:
        """Record one event at time ``now`` (seconds, monotonic)."""
        with self._lock:
            self._times.append(now)
            self._trim(now)

    def rate(self, now: float) -> float:
        """Return the event rate in Hz over the window ending at ``now``."""
        with self._lock:
            self._trim(now)
            if len(self._times) < 2:
                return 0.0
            span = max(now - self._times[0], self._times[-1] - self._times[0])
            return (len(self._times) - 1) / span if span > 0 else 0.0

    def last(self) -> Optional[float]:
        """Return the time of the newest event, or None if none in the window."""
        with self._lock:
            return self._times[-1] if self._times else None

    def _trim(self, now: float) -> None:
        while self._times and now - self._times[0] > self.window:
            self._times.popleft()


class LatencyWindow:
    """Percentiles over the last ``size`` latency samples (seconds in, ms out)."""

    def __init__(self, size: int = 200) -> None:
        self._values: Deque[float] = deque(maxlen=max(1, int(size)))
        self._lock = threading.Lock()

    def add(self, seconds: float) -> None:
        """Record one latency sample in seconds."""
        with self._lock:
            self._values.append(float(seconds))

    def percentile_ms(self, q: float) -> Optional[float]:
        """Return the q-th percentile in milliseconds, or None without samples."""
        with self._lock:
            if not self._values:
                return None
            return float(np.percentile(np.fromiter(self._values, dtype=np.float64), q) * 1e3)

    def __len__(self) -> int:
        with self._lock:
            return len(self._values)
