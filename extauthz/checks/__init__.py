"""Checks: one file per kind, each a small class with one entry point.

A check module registers the policy ``spec`` section it understands with :func:`register`; the
policy compiler finds it here and calls its ``from_spec`` for every policy that has the section.
Adding a check means adding a file to this package: every module in it is imported on first use.

The contract, for every check:

- ``from_spec(spec, build)`` runs at policy load. It validates its section (reporting errors through
  ``build``), compiles everything it can (CEL, keys, tables) and returns the check, or ``None`` when
  the section asks for nothing. A reload reuses the compiled policy while its document and the
  files it read are unchanged, so files are reached through ``build.resolve_path`` or
  ``build.watched`` (which record them); a check whose result depends on anything else calls
  ``build.not_reusable()``.
- ``credential_locations`` (optional): ``(kind, name)`` of every header, query parameter or cookie
  the check reads a credential from; the decision log redacts them whatever its allow-list says.
- ``owned_headers`` (optional): the request headers the check sets on an allowed request, and
  ``owned_credentials`` (optional): the credential locations it strips (``forward: false``); a
  dry-run decision that would deny strips them all, the credentials where the request presents one
  (see policy.compiler.CompiledPolicy).
- ``async check(ctx)`` runs per request. It returns ``None`` to let the request go on, or a
  :class:`~extauthz.context.Denial`. It may update ``ctx`` (identity, headers). It never allows on
  its own: a request is allowed only when every check of its policy let it through, and the rules
  check denies unless a rule allows. Exceptions become a 503 ``internal_error`` denial.
- ``observes_denials`` (optional): sections of earlier checks whose denials the check wants to see,
  with ``async observe_denial(ctx, denial) -> Denial``, which returns the denial to answer with (the
  abuse detectors count failed authentications this way, and answer a blocked client with its
  block), and ``refuse_early(ctx) -> Denial | None``, asked before the watched check runs (no I/O).
  The compiler wraps those checks in :class:`ObservedCheck`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from extauthz._plugins import import_submodules
from extauthz.context import CheckContext, Denial

if TYPE_CHECKING:
    from extauthz.policy.build import BuildContext

__all__ = ["Check", "CheckKind", "ObservedCheck", "Phase", "kinds", "register"]


class Phase(enum.IntEnum):
    """The order in which checks run within a policy.

    Cheap refusals come first (the client's address), then who is calling and whether the request was
    signed, then what the request is (its API operation, its payload), then the policy's own rules,
    then what it costs (abuse detectors, quotas), and last what goes upstream.
    """

    NETWORK = 5
    IDENTITY = 10
    SIGNATURE = 20
    OPENAPI = 24
    INSPECT = 26
    RULES = 30
    DETECT = 35
    QUOTA = 40
    RESPONSE = 50


class Check(Protocol):
    #: Set on checks that wait on I/O (network, Redis): the pipeline then enforces its timeout.
    may_wait: ClassVar[bool]

    async def check(self, ctx: CheckContext) -> Denial | None: ...


@dataclass(frozen=True, slots=True)
class CheckKind:
    section: str
    phase: Phase
    from_spec: Callable[[Any, BuildContext], Check | None]
    #: Built even when the policy omits the section (the rules check: no rules means deny).
    always: bool


_KINDS: dict[str, CheckKind] = {}
_loaded = False


def register(section: str, phase: Phase, *, always: bool = False) -> Callable[[type], type]:
    """Class decorator: the decorated class handles ``spec.<section>`` of a policy."""

    def decorate(cls: type) -> type:
        if section in _KINDS:
            raise RuntimeError(f"two checks registered for spec.{section}")
        _KINDS[section] = CheckKind(section, phase, cls.from_spec, always)  # type: ignore[attr-defined]
        return cls

    return decorate


def kinds() -> dict[str, CheckKind]:
    """Every registered check kind by spec section, importing this package's modules once."""
    global _loaded
    if not _loaded:
        import_submodules(__name__, __path__)
        _loaded = True
    return _KINDS


class ObservedCheck:
    """A check whose denials a later check of the same policy sees first (``observes_denials``)."""

    __slots__ = ("inner", "may_wait", "observer")

    def __init__(self, inner: Check, observer: Any) -> None:
        self.inner = inner
        self.observer = observer
        self.may_wait = bool(getattr(inner, "may_wait", False) or getattr(observer, "may_wait", False))

    async def check(self, ctx: CheckContext) -> Denial | None:
        # The observer may refuse first, without I/O (a client address it knows is blocked: the
        # identity check's work, a password hash, is not spent on it).
        early = self.observer.refuse_early(ctx)
        if early is not None:
            return early  # type: ignore[no-any-return]
        denial = await self.inner.check(ctx)
        if denial is None:
            return None
        return await self.observer.observe_denial(ctx, denial)  # type: ignore[no-any-return]
