"""How busy this instance is, and when it refuses new work.

Past what an instance can serve, every queue grows (the sockets' buffers,
the event loop's ready callbacks, deliveries waiting for replies) and every
message waits longer, until none is answered in time. An instance that
refuses what it cannot serve in time keeps serving the rest: an agent's
signal is refused at once with ``overloaded`` while the event loop runs
late (it wakes more than ``overload_lag`` after it should), while
deliveries through other instances take more than half of ``overload_lag``
from publish to reply (a visitor's instance, Redis or the machine that
cannot keep up: a late loop here is not the only queue a signal waits in),
or while ``max_signals_in_flight`` deliveries already wait for replies. The
refusal costs little; what is accepted is answered in time, and the
instance is back to normal as soon as the excess stops.
"""

from __future__ import annotations

import asyncio
import math

from herald_presence.server.config import Settings

TICK = 0.01  # seconds between the event loop's check-ins
# The lag is a moving average over check-ins (each one's lateness weighs
# 1 - EASE): a sustained lag shows within half a second, a lone hiccup (a
# collection, a moment descheduled on a busy machine) does not refuse anything.
EASE = 0.8
# The delivery lag is a moving average over time: a delivery weighs what
# DELIVERY_MEMORY says of the time since the one before (at most 1 - EASE,
# when they are rare). One stall that holds up every delivery in flight at
# once (a process descheduled for 40 ms at 600/s: 24 of them) moves it by a
# few ms and refuses nothing; a lag that lasts shows within DELIVERY_MEMORY.
DELIVERY_MEMORY = 0.25


class Load:
    __slots__ = ("_delivered", "_last_delivery", "delivery_lag", "in_flight", "lag", "settings")

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lag = 0.0  # seconds the event loop runs late, recently
        self.in_flight = 0  # deliveries to other instances waiting for their reply
        # Seconds a delivery through another instance took, recently: a moving
        # average over deliveries, eased toward 0 on each check-in that saw none
        # (while everything is refused, nothing would bring it down again).
        self.delivery_lag = 0.0
        self._delivered = False
        self._last_delivery = 0.0  # monotonic time of the last delivery_took

    def delivery_took(self, seconds: float, now: float) -> None:
        """A delivery through another instance took ``seconds`` (``now``: monotonic)."""
        weight = min(1 - EASE, 1 - math.exp((self._last_delivery - now) / DELIVERY_MEMORY))
        self._last_delivery = now
        self.delivery_lag += (seconds - self.delivery_lag) * weight
        self._delivered = True

    async def measure(self) -> None:
        """Until cancelled: how late the event loop wakes from a short sleep."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(TICK)
            late = max(0.0, loop.time() - started - TICK)
            self.lag = self.lag * EASE + late * (1 - EASE)
            if not self._delivered:
                self.delivery_lag *= EASE
            self._delivered = False

    def overloaded(self) -> bool:
        lag = self.settings.overload_lag
        if lag > 0 and (self.lag > lag or self.delivery_lag > lag / 2):
            return True
        return self.in_flight >= self.settings.max_signals_in_flight
