"""Outcomes: what the upstream answered, joined to our own decisions by request id.

ext_authz sees requests, never responses. Envoy's access logs (the gRPC Access Log Service) tell us
what came back; a check that wants to learn from it (an abuse detector counting the upstream's 401s)
registers, while it decides, a callback under the request's id (``x-request-id``, which Envoy's
access log entry carries as ``request.request_id``). The access-log service delivers each entry
here; an entry nobody waits for costs one dictionary lookup.

The join is bounded twice, so a flood of requests whose responses never arrive (no access logs
configured, a log stream that broke) cannot grow it: at most ``capacity`` request ids wait, the
oldest dropped first, and none waits longer than ``ttl`` seconds.
"""

from __future__ import annotations

from extauthz.outcomes._join import Outcome, OutcomeCallback, OutcomeJoin, outcomes_for

__all__ = ["Outcome", "OutcomeCallback", "OutcomeJoin", "outcomes_for"]
