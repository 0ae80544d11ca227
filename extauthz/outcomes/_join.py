from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from extauthz.policy.build import Services

log = logging.getLogger("extauthz.outcomes")


@dataclass(frozen=True, slots=True)
class Outcome:
    """One response as Envoy logged it."""

    request_id: str
    #: The HTTP status sent to the client (0 when none was: a reset, a timeout before headers).
    status: int
    #: Envoy's response flags in their short form (``UF``, ``UT``, ...), comma-separated as in
    #: Envoy's own access logs, empty when none.
    flags: str = ""

    @property
    def by_authz(self) -> bool:
        """True when the answer was the sidecar's own denial (Envoy's ``UAEX``), not the upstream's."""
        return "UAEX" in self.flags.split(",")


#: At most this many callbacks wait under one request id.
CALLBACKS_PER_REQUEST = 16

#: Called once with the outcome of the request it was registered for; must not raise or block.
OutcomeCallback = Callable[[Outcome], None]


class OutcomeJoin:
    """Callbacks waiting for the outcome of a request, bounded in count and age."""

    __slots__ = ("_clock", "_waiting", "capacity", "delivered", "dropped", "enabled", "ttl")

    def __init__(self, *, capacity: int = 100_000, ttl: float = 60.0, enabled: bool = True,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.capacity = capacity
        self.ttl = ttl
        #: False when the sidecar was told no access logs will come (checks that need outcomes say
        #: so at load and count only what they see themselves).
        self.enabled = enabled
        self._clock = clock
        self._waiting: OrderedDict[str, tuple[float, list[OutcomeCallback]]] = OrderedDict()
        self.delivered = 0
        self.dropped = 0

    def expect(self, request_id: str, callback: OutcomeCallback) -> None:
        """Call ``callback`` when the outcome of ``request_id`` arrives (at most once, or never)."""
        if not self.enabled or not request_id:
            return
        entry = self._waiting.get(request_id)
        if entry is not None:
            # One request passes a few detecting checks (its layers, its policy); more callbacks
            # under one id are requests reusing an id (a caller's own x-request-id where the proxy
            # keeps it), which must not grow the join past its capacity.
            if len(entry[1]) < CALLBACKS_PER_REQUEST:
                entry[1].append(callback)
            else:
                self.dropped += 1
            return
        now = self._clock()
        self._waiting[request_id] = (now + self.ttl, [callback])
        self._evict(now)

    def deliver(self, outcome: Outcome) -> bool:
        """Hand ``outcome`` to whoever waits for it; False when nobody did (or they gave up)."""
        entry = self._waiting.pop(outcome.request_id, None)
        if entry is None:
            return False
        deadline, callbacks = entry
        if deadline < self._clock():
            self.dropped += 1
            return False
        self.delivered += 1
        for callback in callbacks:
            try:
                callback(outcome)
            except Exception:  # one broken detector must not stop the others, nor the log stream
                log.exception("outcome callback failed")
        return True

    def __contains__(self, request_id: object) -> bool:
        """Whether someone waits for ``request_id`` (the access-log service's one lookup per entry)."""
        return request_id in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    def expire(self) -> None:
        """Drop every expectation past its deadline (called every second: the request path only
        drops a few at a time, and stops when no request comes)."""
        self._drop_expired(self._clock())

    def _evict(self, now: float) -> None:
        waiting = self._waiting
        while len(waiting) > self.capacity:
            waiting.popitem(last=False)
            self.dropped += 1
        self._drop_expired(now, 4)  # a few per call keeps the cost per request constant

    def _drop_expired(self, now: float, at_most: int | None = None) -> None:
        """Drop expectations past their deadline (at most ``at_most`` of them when given). Entries
        are in insertion order, so the expired ones are at the front."""
        waiting = self._waiting
        while waiting and at_most != 0:
            request_id, (deadline, _) = next(iter(waiting.items()))
            if deadline >= now:
                return
            del waiting[request_id]
            self.dropped += 1
            if at_most is not None:
                at_most -= 1


def outcomes_for(services: Services) -> OutcomeJoin:
    """The sidecar's one join (shared by every policy and reload)."""
    return services.shared(("outcomes",), lambda: OutcomeJoin(
        enabled=bool(services.settings.get("access_logs", True))))
