"""How busy this instance is, and which new work it refuses.

Past what an instance can serve, every queue grows (the sockets' buffers,
the event loop's ready callbacks, deliveries waiting for replies) and every
message waits longer, until none is answered in time. An instance that
refuses what it cannot serve in time keeps serving the rest.

Agents' new signals are refused at once with ``overloaded``:

* a share of them, while deliveries through other instances stand in a
  queue: the fastest delivery of the last ``ONSET_TICKS`` check-ins took
  more than ``overload_lag / 5`` from publish to reply (a visitor's
  instance, Redis or a machine that cannot keep up: a late loop here is
  not the only queue a signal waits in). The share then grows while the
  standing delay (the fastest of the last ``WINDOW_TICKS``) is over its
  target, ``overload_lag / 10``, and shrinks while it is under (a
  proportional-integral controller, as in PIE, RFC 8033), until none is
  refused; the refusals are spread evenly over the signals. Senders do not
  slow down when refused, so refusing all of them while the delay is high
  and none while it is low would swing between an empty queue and a long
  one; refusing the excess only keeps the queue short and accepts what the
  instances can serve. Because only the fastest delivery of a window
  counts, one stall (a collection, a process descheduled) that delays the
  deliveries in flight refuses nothing: a standing queue delays all of them;
* all of them while the event loop runs late (it wakes more than
  ``overload_lag`` after it should, on average: a lone instance has no
  deliveries to time) or while ``max_signals_in_flight`` deliveries wait
  for replies.

The refusal costs little; what is accepted is answered in time, and the
instance is back to normal as soon as the excess stops.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from herald_presence.server.config import Settings

TICK = 0.01  # seconds between the event loop's check-ins
# The loop's lag is a moving average over check-ins (each one's lateness
# weighs 1 - EASE): a sustained lag shows within half a second, a lone hiccup
# does not refuse anything.
EASE = 0.8
WINDOW_TICKS = 3  # check-ins whose fastest delivery is the standing delay
TARGET_SHARE = 0.1  # the standing delay's target, a share of overload_lag
# The accepted share's controller, per check-in, on its logarithm (so that it
# answers alike at 1.1x and at 10x what the instances serve): INTEGRAL x the
# standing delay's excess over its target, plus PROPORTIONAL x how much that
# excess (if any) grew since the last; under the target the share grows back
# RECOVERY times as fast as it would shrink (back to all within a second or so
# at 1.5x, a few at 10x).
INTEGRAL = 3.0  # per second of excess: 10 ms over the target takes 3 % off
PROPORTIONAL = 30.0  # per second of growth: an excess 10 ms longer than before takes 30 % off
RECOVERY = 1.5
# While nothing is refused, refusing starts only once the fastest delivery of
# the last ONSET_TICKS check-ins took more than ONSET x the target: near what
# the instances serve, one moment of the machine's (a process descheduled for
# a few check-ins) is no queue, and the accepted are still answered in time.
ONSET, ONSET_TICKS = 2.0, 6
MIN_ACCEPTED = 0.01  # some signals are still accepted: their deliveries tell when the queue is gone


class Load:
    __slots__ = (
        "_fastest",
        "_owed",
        "_window",
        "in_flight",
        "lag",
        "refused_share",
        "settings",
        "standing",
    )

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.lag = 0.0  # seconds the event loop runs late, recently
        self.in_flight = 0  # deliveries to other instances waiting for their reply
        self.standing = 0.0  # seconds the fastest recent delivery through another instance took
        self.refused_share = 0.0  # of agents' new signals, 0..1 - MIN_ACCEPTED
        self._fastest = math.inf  # the fastest delivery since the last check-in
        self._window: deque[float] = deque(maxlen=ONSET_TICKS)
        self._owed = 0.0  # refusals due and not yet made (spreads them evenly)

    def delivery_took(self, seconds: float) -> None:
        """A delivery through another instance took ``seconds`` from publish to reply."""
        self._fastest = min(self._fastest, seconds)

    def check_in(self, late: float) -> None:
        """One check-in: the event loop woke ``late`` seconds after it should."""
        self.lag = self.lag * EASE + late * (1 - EASE)
        target = self.settings.overload_lag * TARGET_SHARE
        if not target:  # no lag limit: no share refused either
            return
        self._window.append(self._fastest)
        self._fastest = math.inf
        standing = min(list(self._window)[-WINDOW_TICKS:])
        if standing == math.inf:  # nothing came back lately: a queue only if something waits
            standing = self.standing if self.in_flight else 0.0
        if not self.refused_share and min(self._window) < ONSET * target:  # no queue that lasts: all accepted
            self.standing = standing
            return
        excess, excess_before = standing - target, max(0.0, self.standing - target)
        less = INTEGRAL * excess + PROPORTIONAL * (max(0.0, excess) - excess_before)
        less *= RECOVERY if less < 0 else 1.0
        accepted_log = min(0.0, max(math.log(MIN_ACCEPTED), math.log(1.0 - self.refused_share) - less))
        self.refused_share = 1.0 - math.exp(accepted_log)
        self.standing = standing
        if not self.refused_share:
            self._owed = 0.0

    async def measure(self) -> None:
        """Until cancelled: how late the event loop wakes from a short sleep."""
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            await asyncio.sleep(TICK)
            self.check_in(max(0.0, loop.time() - started - TICK))

    def refuse(self) -> bool:
        """Whether to refuse the agent's new signal now (``overloaded``)."""
        if self.in_flight >= self.settings.max_signals_in_flight:
            return True
        lag = self.settings.overload_lag
        if not lag:  # no lag limit (check_in computes no share either)
            return False
        if self.lag > lag:
            return True
        self._owed += self.refused_share
        if self._owed >= 1.0:
            self._owed -= 1.0
            return True
        return False
