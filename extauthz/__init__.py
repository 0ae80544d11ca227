"""extauthz: an Envoy external-authorization sidecar.

The public API is what embedding code and tests need: load a policy folder, decide requests, and
run the server. Everything else is an implementation detail.
"""

from extauthz.decision import Authorizer, Decision
from extauthz.policy import PolicySet, PolicySetError, load_folder
from extauthz.request import BadRequest, Request, request_from_check
from extauthz.samples import check_request_from_sample
from extauthz.server import Settings, Sidecar, serve

__version__ = "0.1.0"

__all__ = [
    "Authorizer",
    "BadRequest",
    "Decision",
    "PolicySet",
    "PolicySetError",
    "Request",
    "Settings",
    "Sidecar",
    "__version__",
    "check_request_from_sample",
    "load_folder",
    "request_from_check",
    "serve",
]
