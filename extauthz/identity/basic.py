"""HTTP Basic authentication (RFC 7617): user names and password hashes from an htpasswd-style file.

For the few callers that can only send a user name and a password (legacy clients, tools behind a
browser prompt). The file is a mounted Secret, read at load and re-read when it changes, never per
request::

    # user:hash[:group,group]          comments and blank lines are skipped
    alice:$2b$12$...                   bcrypt ($2a$, $2b$, $2y$), cost >= minBcryptCost
    bob:$argon2id$v=19$m=65536,t=3,p=4$...:reports,admins

Only slow, salted password hashes are accepted: bcrypt and argon2id. Plaintext, crypt(3) DES, MD5
(``$1$``, ``$apr1$``), SHA-1 (``{SHA}``), SHA-crypt, argon2i/argon2d and hashes below the minimum
cost are refused at load, each with its line and user (never the hash): a file that holds one is a
file whose passwords fall to an offline attack, and accepting it quietly would hide that.

Per request the password is checked against the hash on a small thread pool (bcrypt and argon2
cost tens to hundreds of milliseconds of CPU: on the event loop that would stall every other Check).
At most ``maxConcurrent`` verifications of a source run or wait at once; beyond that the request is
refused with ``503 verification_overloaded`` at once, so a flood of guesses costs a bounded amount of
queued work and never an allow. An unknown user is verified against a dummy hash of the file's most common scheme and
cost, so that a user name's existence does not show in the response time.

Successful verifications are cached for a short time (``cacheDuration``) under an HMAC-SHA256 of the
user and password with a key drawn at random per process: a hot client does not pay a bcrypt per
request, and neither the password nor an unkeyed (offline-guessable) hash of it is kept. A change of
the file empties the cache: a changed password or a removed user stops working as soon as the watcher
sees the new file (every 2 s), cached or not.

A rejection leaves the user name that was tried in ``ctx.attributes["attempted_user"]`` (the
brute-force detector counts failures per user); the password and the header never leave this module.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import os
import re
import secrets
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
from argon2 import Type as Argon2Type
from argon2 import exceptions as argon2_errors
from argon2 import extract_parameters
from argon2.low_level import hash_secret, verify_secret

from extauthz import clock
from extauthz.context import CheckContext
from extauthz.identity import Identity, Rejected, make_identity, source_kind
from extauthz.identity.cache import ExpiringCache
from extauthz.identity.credentials import CredentialLocation, extract_first
from extauthz.policy.build import BuildContext, Spec
from extauthz.telemetry.metrics import password_verification
from extauthz.watched import WatchedPath

__all__ = [
    "Account",
    "BasicSource",
    "HashPolicy",
    "PasswordPool",
    "PasswordTable",
    "Verifier",
    "cache_key",
    "check_password",
    "decode_basic",
    "parse_htpasswd",
    "read_htpasswd",
]

_FIELDS = {"htpasswd", "realm", "forward", "minBcryptCost", "minArgon2", "cacheDuration", "cacheSize",
           "maxConcurrent", "maxCredentialBytes"}  # fmt: skip
_ARGON2_FIELDS = {"memoryKiB", "iterations", "parallelism"}

#: bcrypt's modular crypt format: $2a$/$2b$/$2y$, two-digit cost, 22 salt + 31 hash characters.
_BCRYPT = re.compile(r"\$2[aby]\$([0-9]{2})\$[./A-Za-z0-9]{53}")
#: A traditional crypt(3) DES hash: 2 salt + 11 hash characters.
_DES = re.compile(r"[./A-Za-z0-9]{13}")
#: User names: no control characters, no ':' (the separator), no white space at either end.
_USER = re.compile(r"[^\x00-\x1f\x7f:]+")
_GROUP = re.compile(r"[A-Za-z0-9._@/+-]{1,128}")
_CONTROL = re.compile(rb"[\x00-\x1f\x7f]")
_REALM = re.compile(r"[\x20-\x7e]{1,128}")
#: bcrypt uses the first 72 bytes of a password (and bcrypt>=5 refuses longer ones): the same
#: truncation htpasswd and every other bcrypt implementation apply.
_BCRYPT_MAX_PASSWORD = 72
_MAX_FILE_BYTES = 16 * 1024 * 1024
_MAX_USER_CHARS = 256
_MAX_BCRYPT_COST = 16
_MAX_ARGON2_MEMORY_KIB = 1024 * 1024

#: The cache key's HMAC key: random per process, so a cache entry (and a memory dump of it) says
#: nothing about a password without this key, and nothing at all after a restart.
_CACHE_KEY = secrets.token_bytes(32)

DEFAULT_MIN_BCRYPT_COST = 10
#: OWASP's argon2id floor (19 MiB, 2 iterations, 1 lane); RFC 9106's profiles are above it.
DEFAULT_MIN_ARGON2 = (19 * 1024, 2, 1)
DEFAULT_CACHE_SECONDS = 60.0
DEFAULT_MAX_CONCURRENT = 8


@dataclass(frozen=True, slots=True)
class HashPolicy:
    """The weakest hashes a file may hold (part of how the file is read: another policy, another read)."""

    min_bcrypt_cost: int = DEFAULT_MIN_BCRYPT_COST
    min_argon2_memory_kib: int = DEFAULT_MIN_ARGON2[0]
    min_argon2_iterations: int = DEFAULT_MIN_ARGON2[1]
    min_argon2_parallelism: int = DEFAULT_MIN_ARGON2[2]


@dataclass(frozen=True, slots=True)
class Account:
    user: str
    #: "bcrypt" or "argon2id".
    scheme: str
    hash: bytes
    #: What the cost of verifying this hash depends on (scheme and parameters): the dummy for unknown
    #: users is made like the most common one.
    cost: tuple[Any, ...]
    identity: dict[str, Any]


@dataclass(frozen=True, slots=True)
class PasswordTable:
    accounts: dict[str, Account]
    #: Verified for unknown users, so that they take as long as known ones (never matches: its
    #: password is random and forgotten).
    dummy: Account


def _scheme_problem(hash_text: str, policy: HashPolicy) -> tuple[str, tuple[Any, ...]] | str:
    """(scheme, cost) of an acceptable hash, or why it is refused (never quoting it)."""
    if not hash_text.isascii() or any(c.isspace() for c in hash_text):
        return "the hash has characters no bcrypt or argon2id hash has (non-ASCII or spaces)"
    match = _BCRYPT.fullmatch(hash_text)
    if match is not None:
        cost = int(match.group(1))
        if not 4 <= cost <= _MAX_BCRYPT_COST:
            return f"bcrypt cost {cost} is outside 4-{_MAX_BCRYPT_COST} (above, each request would take seconds)"
        if cost < policy.min_bcrypt_cost:
            return f"bcrypt cost {cost} is below the minimum {policy.min_bcrypt_cost}"
        return "bcrypt", ("bcrypt", cost)
    if hash_text.startswith("$argon2id$"):
        try:
            params = extract_parameters(hash_text)
        except (argon2_errors.InvalidHashError, ValueError):
            return "malformed argon2id hash"
        if params.version != 19:
            return "argon2id version must be 19 (0x13)"
        if params.salt_len < 8 or params.hash_len < 16:
            return "argon2id salt (>= 8 bytes) or hash (>= 16 bytes) too short"
        if params.memory_cost > _MAX_ARGON2_MEMORY_KIB or params.time_cost > 64 or params.parallelism > 64:
            return "argon2id parameters too large (at most m=1 GiB, t=64, p=64: each request would take seconds)"
        if (params.memory_cost < policy.min_argon2_memory_kib or params.time_cost < policy.min_argon2_iterations
                or params.parallelism < policy.min_argon2_parallelism):
            return (f"argon2id parameters m={params.memory_cost},t={params.time_cost},p={params.parallelism} are "
                    f"below the minimum m={policy.min_argon2_memory_kib},t={policy.min_argon2_iterations},"
                    f"p={policy.min_argon2_parallelism}")
        return "argon2id", ("argon2id", params.memory_cost, params.time_cost, params.parallelism, params.salt_len,
                            params.hash_len)
    if hash_text.startswith(("$argon2i$", "$argon2d$")):
        return "argon2i and argon2d hashes are not accepted: use argon2id"
    if hash_text.startswith("$2"):
        return "unsupported bcrypt variant or malformed bcrypt hash (use $2b$ or $2y$)"
    if hash_text.startswith("$apr1$"):
        return "MD5 ($apr1$) hashes are not accepted: use bcrypt or argon2id"
    if hash_text.startswith("$1$"):
        return "MD5-crypt ($1$) hashes are not accepted: use bcrypt or argon2id"
    if hash_text.startswith(("$5$", "$6$")):
        return "SHA-crypt ($5$/$6$) hashes are not accepted: use bcrypt or argon2id"
    if hash_text.startswith("{SHA}"):
        return "SHA-1 ({SHA}) hashes are not accepted: use bcrypt or argon2id"
    if _DES.fullmatch(hash_text) is not None:
        return "crypt(3) DES hashes are not accepted: use bcrypt or argon2id"
    return "not a bcrypt or argon2id hash (plaintext or an unknown scheme is not accepted)"


def _dummy(cost: tuple[Any, ...], source: str) -> Account:
    """A hash of a random, immediately forgotten password, made like ``cost``."""
    password = secrets.token_bytes(24)
    if cost[0] == "bcrypt":
        hashed = bcrypt.hashpw(password, bcrypt.gensalt(rounds=cost[1]))
    else:
        _, memory, iterations, lanes, salt_len, hash_len = cost
        hashed = hash_secret(password, secrets.token_bytes(salt_len), time_cost=iterations, memory_cost=memory,
                             parallelism=lanes, hash_len=hash_len, type=Argon2Type.ID)
    return Account("", str(cost[0]), hashed, cost, make_identity("basic", source, ""))


def parse_htpasswd(text: str, policy: HashPolicy, source: str = "") -> PasswordTable:
    """Parse the file's text; raise ValueError listing every bad line (number and user, never a hash)."""
    accounts: dict[str, Account] = {}
    first_line: dict[str, int] = {}
    problems: list[str] = []
    for number, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, rest = line.partition(":")
        hash_text, _, groups_text = rest.partition(":")
        if not sep or not user or not hash_text:
            problems.append(f"line {number}: expected user:hash")
            continue
        if _USER.fullmatch(user) is None or user != user.strip() or len(user) > _MAX_USER_CHARS:
            problems.append(f"line {number}: the user name has control characters or surrounding spaces, "
                            f"or is longer than {_MAX_USER_CHARS} characters")
            continue
        if user in first_line:
            problems.append(f"line {number}: user {user!r} already appears on line {first_line[user]}")
            continue
        first_line[user] = number
        groups = [g.strip() for g in groups_text.split(",")] if groups_text.strip() else []
        if any(_GROUP.fullmatch(g) is None for g in groups):
            problems.append(f"line {number}: user {user!r}: groups must be a comma-separated list of names "
                            "(letters, digits, . _ @ / + -)")
            continue
        found = _scheme_problem(hash_text, policy)
        if isinstance(found, str):
            problems.append(f"line {number}: user {user!r}: {found}")
            continue
        scheme, cost = found
        identity = make_identity("basic", source, user, {}, [], user=user, groups=list(dict.fromkeys(groups)))
        accounts[user] = Account(user, scheme, hash_text.encode("ascii"), cost, identity)
    if problems:
        shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
        raise ValueError("; ".join(shown))
    if not accounts:
        raise ValueError("no users: the file must hold at least one user:hash line")
    common = Counter(a.cost for a in accounts.values()).most_common(1)[0][0]
    return PasswordTable(accounts, _dummy(common, source))


def read_htpasswd(path: Path, policy: HashPolicy, source: str = "") -> PasswordTable:
    """Read and parse an htpasswd-style file (UTF-8)."""
    if path.is_dir():
        raise ValueError("is a folder: name the htpasswd file inside it")
    data = path.read_bytes()
    if len(data) > _MAX_FILE_BYTES:
        raise ValueError(f"larger than {_MAX_FILE_BYTES} bytes")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(f"not UTF-8 (byte {exc.start})") from None
    return parse_htpasswd(text, policy, source)


def check_password(scheme: str, hashed: bytes, password: bytes) -> bool:
    """Whether ``password`` matches ``hashed`` (slow by design: run it off the event loop)."""
    if scheme == "bcrypt":
        return bcrypt.checkpw(password[:_BCRYPT_MAX_PASSWORD], hashed)
    try:
        return verify_secret(hashed, password, Argon2Type.ID)
    except (argon2_errors.VerificationError, argon2_errors.InvalidHashError):
        return False


def _overloaded() -> Rejected:
    return Rejected("verification_overloaded", "too many password verifications in progress, retry later",
                    status=503, error="")


class Verifier:
    """Runs password verifications on a thread pool, at most ``limit`` of them queued or running.

    A slot is taken before the work is submitted and given back when the thread has finished it, not
    when the waiting request goes away: a request cancelled by the Check's deadline leaves its bcrypt
    running, and that work still counts against the bound (work not started yet is cancelled).
    """

    def __init__(self, pool: PasswordPool, limit: int) -> None:
        self.pool = pool
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def busy(self) -> bool:
        """True when no slot is free (for tests and metrics; racy by nature)."""
        if self._slots.acquire(blocking=False):
            self._slots.release()
            return False
        return True

    async def verify(self, account: Account, password: bytes) -> bool:
        if not self._slots.acquire(blocking=False):
            raise _overloaded()
        try:
            future = self.pool.executor().submit(check_password, account.scheme, account.hash, password)
        except BaseException:
            self._slots.release()
            raise
        future.add_done_callback(lambda _: self._slots.release())
        return await asyncio.wrap_future(future)


class PasswordPool:
    """The process's threads for password hashing, shared by every basic source (a service, so the
    server shuts it down). bcrypt and argon2 release the GIL: more threads than cores buys nothing."""

    def __init__(self, threads: int | None = None) -> None:
        self.threads = threads or max(1, min(4, os.cpu_count() or 1))
        self._executor: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        if self._executor is None:
            with self._lock:
                if self._executor is None:
                    self._executor = ThreadPoolExecutor(self.threads, thread_name_prefix="extauthz-password")
        return self._executor

    async def aclose(self) -> None:
        executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)


def _malformed(description: str) -> Rejected:
    return Rejected("malformed_basic_credentials", description)


def decode_basic(value: str, max_bytes: int) -> tuple[str, bytes]:
    """(user, password as UTF-8 bytes) from the credentials of ``Authorization: Basic <value>``.

    Strict: base64 with padding and nothing else, UTF-8 (RFC 7617 charset), a ':' after a non-empty
    user name, no control characters (RFC 7617 2). Raises Rejected with a description that never
    quotes the value.
    """
    if len(value) > (max_bytes + 2) // 3 * 4:
        raise Rejected("basic_credentials_too_large", "Basic credentials are larger than allowed")
    if not value:
        raise _malformed("Basic credentials are empty")
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise _malformed("Basic credentials are not valid base64") from None
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _malformed("Basic credentials are not UTF-8") from None
    user_bytes, sep, password = raw.partition(b":")
    if not sep:
        raise _malformed("Basic credentials have no ':' between user name and password")
    if not user_bytes:
        raise _malformed("Basic credentials have an empty user name")
    if _CONTROL.search(raw) is not None:
        raise _malformed("Basic credentials contain control characters")
    return user_bytes.decode("utf-8"), password


def cache_key(user: str, password: bytes) -> bytes:
    """HMAC-SHA256 under the per-process key of (user, password), unambiguously framed."""
    user_bytes = user.encode("utf-8")
    return hmac.new(_CACHE_KEY, len(user_bytes).to_bytes(4, "big") + user_bytes + password, hashlib.sha256).digest()


def _quoted_string(text: str) -> str:
    """An RFC 9110 quoted-string."""
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


@source_kind("basic")
class BasicSource:
    kind = "basic"
    may_wait = True
    #: A rejection challenges with ``Basic realm=...`` alone: RFC 7617 has no error parameters.
    challenge_errors = False

    def __init__(self, name: str, table: WatchedPath[PasswordTable], verifier: Verifier, *, realm: str,
                 forward: bool = False, cache_seconds: float = DEFAULT_CACHE_SECONDS, cache_size: int = 10_000,
                 max_credential_bytes: int = 1024) -> None:
        self.name = name
        self.table = table
        self.verifier = verifier
        self.realm = realm
        self.locations = (CredentialLocation("header", "authorization", "Basic", forward),)
        self.challenge_scheme = f'Basic realm={_quoted_string(realm)}, charset="UTF-8"'
        self.cache_seconds = cache_seconds
        self.cache: ExpiringCache[Identity] | None = (
            ExpiringCache(cache_size) if cache_seconds > 0 and cache_size > 0 else None
        )
        self._cache_generation = table.generation
        self.max_credential_bytes = max_credential_bytes

    async def authenticate(self, ctx: CheckContext) -> Identity | None:
        found = extract_first(self.locations, ctx.request)
        if found is None:
            return None
        user, password = decode_basic(found[0], self.max_credential_bytes)
        # The generation before the table: a reload (on the watcher's thread) between the two reads
        # then pairs a new table with an old generation (its cache entries cleared next time), never
        # an old table's verification with the new generation (an old password cached as current).
        generation = self.table.generation
        table = self.table.value
        if table is None:  # never loaded (a load error): nothing can be verified
            raise Rejected("users_unavailable", "the user list is not available", status=503, error="")
        key = b""
        if self.cache is not None:
            if generation != self._cache_generation:  # a new file: nothing verified before counts
                self.cache.clear()
                self._cache_generation = generation
            key = cache_key(user, password)
            cached = self.cache.get(key)
            if cached is not None:
                if ctx.steps is not None:  # explain only
                    ctx.note(f"identity {self.name}: user verified earlier (cached)")
                return self._accept(ctx, cached)
        account = table.accounts.get(user)
        started = time.perf_counter()
        try:
            ok = await self.verifier.verify(account if account is not None else table.dummy, password)
        except Rejected:
            password_verification("overloaded")
            raise
        del password
        password_verification("match" if ok and account is not None else "mismatch", time.perf_counter() - started)
        if account is None or not ok:
            ctx.attributes["attempted_user"] = user
            raise Rejected("invalid_credentials", "user name or password is not valid")
        # Cached only when no new file arrived meanwhile (a verification against the old hash).
        if self.cache is not None and self.table.generation == generation == self._cache_generation:
            now = clock.wall()
            self.cache.put(key, account.identity, now + self.cache_seconds, now)
        return self._accept(ctx, account.identity)

    def _accept(self, ctx: CheckContext, identity: Identity) -> Identity:
        location = self.locations[0]
        if not location.forward:  # the password is for us, not for the upstream
            ctx.remove_headers.append(location.name)
        return identity

    @classmethod
    def from_spec(cls, name: str, spec: Spec, build: BuildContext) -> BasicSource | None:
        if not spec.is_mapping(allowed=_FIELDS):
            return None
        file = spec.str("htpasswd", required=True)
        realm = spec.str("realm", build.policy_name or "extauthz")
        if realm is not None and _REALM.fullmatch(realm) is None:
            spec.error("must be 1-128 printable ASCII characters", "realm")
        forward = spec.bool("forward", False)
        min_cost = spec.int("minBcryptCost", DEFAULT_MIN_BCRYPT_COST, min=4, max=_MAX_BCRYPT_COST)
        argon = spec.child("minArgon2")
        memory, iterations, lanes = DEFAULT_MIN_ARGON2
        if argon.present and argon.is_mapping(allowed=_ARGON2_FIELDS):
            memory = argon.int("memoryKiB", memory, min=8, max=_MAX_ARGON2_MEMORY_KIB)
            iterations = argon.int("iterations", iterations, min=1, max=64)
            lanes = argon.int("parallelism", lanes, min=1, max=64)
        policy = HashPolicy(min_cost, memory, iterations, lanes)
        cache_seconds = spec.duration("cacheDuration", DEFAULT_CACHE_SECONDS)
        if cache_seconds > 3600:
            spec.error("must be at most 1h: a changed password must stop working soon", "cacheDuration")
        cache_size = spec.int("cacheSize", 10_000, min=0, max=1_000_000)
        limit = spec.int("maxConcurrent", DEFAULT_MAX_CONCURRENT, min=1, max=1024)
        max_bytes = spec.int("maxCredentialBytes", 1024, min=16, max=8192)
        if file is None:
            return None
        table = build.watched(spec.child("htpasswd"), file, lambda p: read_htpasswd(p, policy, name),
                              what="htpasswd file", key=(name, policy))
        pool = build.services.shared(("identity", "basic", "pool"), PasswordPool)
        return cls(name, table, Verifier(pool, limit), realm=realm or "extauthz", forward=forward,
                   cache_seconds=cache_seconds, cache_size=cache_size, max_credential_bytes=max_bytes)

