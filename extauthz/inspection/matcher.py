"""Which of many rules match a text: one pass of Hyperscan (Vectorscan), RE2 for what it cannot take.

Why Hyperscan: an RE2 set of ~60 rules is fast on ordinary text (a few microseconds for a 1 KB
body) but its lazily built DFA makes a new state for every new combination of partial matches in
flight, and high-entropy text (64 KiB of random printable characters, fresh for every request) makes
one per byte: 3 to 23 ms per 64 KiB, measured. Hyperscan runs the same rules as bit-parallel
automata whose cost per byte does not depend on the text: 0.15 to 0.3 ms for the same inputs (see
bench/README.md). Both are linear; Hyperscan's constant is the one a per-request budget can afford.

Every pattern is compiled as RE2 reads it: case-insensitive (Unicode case folding, as RE2's
``(?i)``), multi-line (``^`` and ``$`` at line ends), UTF-8. Each rule reports its first match only
(``HS_FLAG_SINGLEMATCH``): the question is which rules matched, and a text full of matches costs one
callback per rule at most. A rule Hyperscan refuses (a custom pattern using an RE2 feature it lacks,
or one that matches the empty text) is matched by an RE2 set instead: the result is the same, only
that rule keeps RE2's cost. Differences that remain: Hyperscan's ``\\s`` also matches the vertical
tab (it matches a little more, never less).

Compiling a database takes a few hundred milliseconds: databases are shared between inspectors with
the same patterns (every policy with ``inspect: {}`` has the same ones) and built at policy load,
never per request. Scans need scratch space of their own per thread: kept per thread.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Sequence
from dataclasses import dataclass

import hyperscan
import re2

__all__ = ["RuleMatcher"]

#: The mode every built-in and custom rule is written in (rules.py, checks/inspect.py): Hyperscan takes
#: it as flags, not as an inline group.
_PREFIX = "(?mi)"
_FLAGS = (hyperscan.HS_FLAG_CASELESS | hyperscan.HS_FLAG_MULTILINE | hyperscan.HS_FLAG_UTF8
          | hyperscan.HS_FLAG_SINGLEMATCH)
#: Databases kept for reuse (distinct rule lists in a policy set; each holds a few hundred KiB).
_CACHED_DATABASES = 64
#: Texts shorter than this are matched by an RE2 set of the same patterns: for them RE2 costs less
#: (no callback) and holds the GIL; Hyperscan's binding releases the GIL for every scan, which in
#: the sidecar (gRPC and logging threads) hands the interpreter to another thread at every request.
#: RE2's cost per byte on high-entropy text is bounded, so below this size it stays under a
#: millisecond whatever the text.
SMALL_TEXT_BYTES = 4096
#: DFA memory of each RE2 set (it only grows as texts need new states).
_RE2_MAX_MEM = 64 << 20


@dataclass(frozen=True, slots=True)
class _Compiled:
    database: hyperscan.Database | None
    #: Indexes (into the pattern list) of the rules in ``fallback``.
    fallback_ids: tuple[int, ...]
    fallback: re2.Set | None
    #: Every pattern, for short texts (see SMALL_TEXT_BYTES).
    small: re2.Set


class RuleMatcher:
    """Patterns (RE2 syntax, each starting with ``(?mi)``) compiled once; :meth:`matched` says which
    of them match a UTF-8 text."""

    __slots__ = ("_compiled", "_local")

    def __init__(self, patterns: Sequence[str]) -> None:
        self._compiled = _compile(tuple(patterns))
        self._local = threading.local()

    @property
    def fallback_count(self) -> int:
        """Rules matched by RE2 because Hyperscan refused them."""
        return len(self._compiled.fallback_ids)

    def matched(self, data: bytes, stop: frozenset[int] = frozenset()) -> tuple[list[int], bool]:
        """Indexes of the patterns that match ``data`` (valid UTF-8), in no particular order, and
        whether the scan stopped early: at the first match of a pattern in ``stop`` (then the
        list holds what matched up to there)."""
        if len(data) < SMALL_TEXT_BYTES:
            return self._compiled.small._set.Match(data), False  # the compiled set itself: one call less
        return self.scan(data, stop)

    def scan(self, data: bytes, stop: frozenset[int] = frozenset()) -> tuple[list[int], bool]:
        """:meth:`matched` through Hyperscan whatever the length (RE2 for the patterns it refused)."""
        compiled = self._compiled
        found: list[int] = []
        database = compiled.database
        if database is not None:
            scratch = getattr(self._local, "scratch", None)
            if scratch is None:
                scratch = self._local.scratch = hyperscan.Scratch(database)
            if not stop:
                database.scan(data, match_event_handler=_collect, context=found, scratch=scratch)
            else:
                try:
                    database.scan(data, match_event_handler=_collect_until, context=(found, stop), scratch=scratch)
                except hyperscan.ScanTerminated:
                    return found, True
        if compiled.fallback is not None:
            hits = compiled.fallback._set.Match(data)  # the compiled set itself: one call less
            if hits:
                ids = compiled.fallback_ids
                found.extend(ids[i] for i in hits)
        return found, False


def _collect(rule: int, start: int, end: int, flags: int, found: object) -> None:
    found.append(rule)  # type: ignore[attr-defined]  # the list ``scan`` passes as the context


def _collect_until(rule: int, start: int, end: int, flags: int, context: object) -> bool:
    found: list[int]
    stop: frozenset[int]
    found, stop = context  # type: ignore[misc]  # the pair ``scan`` passes as the context
    found.append(rule)
    return rule in stop  # True stops the scan


@functools.lru_cache(maxsize=_CACHED_DATABASES)
def _compile(patterns: tuple[str, ...]) -> _Compiled:
    taken = [i for i, pattern in enumerate(patterns) if pattern.startswith(_PREFIX)]
    database = _database([patterns[i] for i in taken], taken)
    if database is None and taken:
        # Hyperscan's error does not say which pattern it refused: each alone, and the ones it takes
        # together (RE2 for the others). Only when a custom pattern uses what Hyperscan lacks.
        taken = [i for i in taken if _compiles(patterns[i][len(_PREFIX) :])]
        database = _database([patterns[i] for i in taken], taken)
        if database is None:
            taken = []
    kept = set(taken)
    fallback = [i for i in range(len(patterns)) if i not in kept]
    return _Compiled(database, tuple(fallback), _re2_set([patterns[i] for i in fallback]) if fallback else None,
                     _re2_set(patterns))


def _re2_set(patterns: Sequence[str]) -> re2.Set:
    options = re2.Options()
    options.max_mem = _RE2_MAX_MEM
    rule_set = re2.Set.SearchSet(options)
    for pattern in patterns:
        rule_set.Add(pattern)
    rule_set.Compile()
    return rule_set


def _database(patterns: list[str], ids: list[int]) -> hyperscan.Database | None:
    if not patterns:
        return None
    database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
    try:
        database.compile(expressions=[p[len(_PREFIX) :].encode("utf-8") for p in patterns], ids=ids,
                         flags=[_FLAGS] * len(ids))
    except hyperscan.error:
        return None
    return database


@functools.lru_cache(maxsize=4096)
def _compiles(expression: str) -> bool:
    """Whether Hyperscan takes the pattern alone."""
    try:
        database = hyperscan.Database(mode=hyperscan.HS_MODE_BLOCK)
        database.compile(expressions=[expression.encode("utf-8")], ids=[0], flags=[_FLAGS])
    except hyperscan.error:
        return False
    return True
