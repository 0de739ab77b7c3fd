"""A daemon thread that runs one housekeeping pass every few seconds until stopped.

The recovery scan, the blob sweep and a worker's liveness beat are the same loop around different
passes; each subclass says what one pass does and what a failed pass means for it.
"""

from __future__ import annotations

import threading


class PeriodicThread(threading.Thread):
    """Calls ``tick()`` every ``interval_s`` (first after one interval, or at once with
    ``immediate``) until ``stop()``; ``stop()`` wakes the thread at once."""

    def __init__(self, name: str, interval_s: float, *, immediate: bool = False):
        super().__init__(name=name, daemon=True)
        self.interval_s, self.immediate = interval_s, immediate
        self.stopped = threading.Event()

    def tick(self) -> None:
        raise NotImplementedError

    def run(self) -> None:
        if self.immediate:
            self.tick()
        while not self.stopped.wait(self.interval_s):
            self.tick()

    def stop(self) -> None:
        self.stopped.set()
