"""The sidecar (``extauthz`` command line) with one extra check kind for the outcome tests.

``outcome_probe: {}`` in a policy waits for the outcome of every request the policy decides and logs
it (``outcome <request id> <status> <flags>``) when Envoy's access log brings it: the end-to-end
proof that access-log entries reach the sidecar and join the decision of the same request id, with
no detector involved. Test code only: it is never part of the package.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from extauthz.checks import Phase, register
from extauthz.cli import main
from extauthz.context import CheckContext, Denial
from extauthz.outcomes import Outcome, OutcomeJoin, outcomes_for

log = logging.getLogger("extauthz.outcome_probe")


def _logged(outcome: Outcome) -> None:
    log.warning("outcome %s %d %s", outcome.request_id, outcome.status, outcome.flags or "-")


@register("outcome_probe", Phase.NETWORK)  # first: it sees the denials too
class OutcomeProbe:
    may_wait = False

    def __init__(self, join: OutcomeJoin) -> None:
        self.join = join

    @classmethod
    def from_spec(cls, spec: Any, build: Any) -> OutcomeProbe:
        join = outcomes_for(build.services)
        if not join.enabled:
            log.warning("outcome_probe: access logs are off, no outcome will come")
        return cls(join)

    async def check(self, ctx: CheckContext) -> Denial | None:
        self.join.expect(ctx.request.headers.get("x-request-id", ""), _logged)
        return None


if __name__ == "__main__":
    sys.exit(main())
