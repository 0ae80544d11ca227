"""Redis store: shared by every replica, exact across them, and never a reason to hang.

Connection (``extauthz serve --redis-url URL``, ``--redis-password-file FILE``):

- ``redis://host:port/db``, ``rediss://...`` (TLS), ``unix:///path/redis.sock``;
- ``redis+sentinel://h1:26379,h2:26379/<master-name>[/db]`` (``rediss+sentinel://`` for TLS);
- ``redis+cluster://h1:6379,h2:6379`` (``rediss+cluster://`` for TLS).

Query parameters (anything else is refused, so a typo is an error at start, not a silent default):
``timeout`` (deadline of one operation, default 250ms), ``max_connections`` (connections per
Cluster node, default 32; any other Redis gets one connection), ``probe_interval`` (how often an
open circuit tries Redis again, default 500ms), ``prefix`` (key prefix, default ``extauthz``),
``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile`` (TLS files), ``ssl_check_hostname`` (default
true), ``db``. The password comes from the password file (a mounted Secret; re-read when it
changes) or the URL; the username (Redis ACL) from the URL.

Every quota of a request is charged by one Lua script (EVALSHA, falling back to EVAL after a
NOSCRIPT, e.g. when Redis restarted), using Redis's clock, so replicas with skewed clocks agree.
Counter keys carry their own hash tag, so they spread over a Cluster; on a Cluster the counters of
one request that live in different slots are charged by one script per slot, sent together, and
the charges of a refused request are refunded.

A single server (or a Sentinel's master) is spoken to over one pipelined connection of our own, an
asyncio Protocol with hiredis's parser, not redis-py's client: a round trip is on the path of every
request, and redis-py's connection, per-read bookkeeping and the tasks and timers around them cost
more CPU than the round trip itself. Commands issued in one event-loop turn leave in one write at
the end of that turn, so concurrent requests share a round trip without any of them waiting for
another, and under load a write carries many. Redis answers in order, so replies resolve the
waiting commands from the oldest. One timer watches the earliest deadline of the waiting commands,
rather than a timer set and cancelled for every command: past it, Redis or the network is stuck
and a late reply would answer the wrong command, so every waiting command fails and the connection
is dropped. A connection Redis closes (killed, restarted) fails its commands at once rather than at
the deadline. The next command opens a new connection (AUTH with the password file's current
password, SELECT; through Sentinel, the master's address is asked anew), inside its own deadline.
A Cluster goes through redis-py's cluster pipeline (it knows the slots and follows redirections),
in batches over a few long-lived tasks.

A circuit breaker guards the request path: the first error or ``timeout`` opens it. Then every
operation fails at once with :class:`StoreError` (each quota does what its ``onStoreError`` says)
while a background probe pings Redis and closes the circuit as soon as Redis answers. After an
error the probe pings every ``probe_interval``. A timeout may be a pause of this process (GC, CPU
starvation) rather than Redis, so after one the probe pings at once (within ``timeout``) and only
then every ``probe_interval``: a mere pause keeps the circuit open for one round trip. A timeout
less than ``probe_interval`` after the circuit closed (Redis answers a PING but not the commands in
time) is probed after ``probe_interval`` like an error, so requests do not keep waiting out timeouts.

On a Cluster a command's deadline starts when it is submitted, whether it then waits for a free
lane or is in flight, so no caller waits longer than ``timeout``. When one slot refuses or fails
while another's charged, the charged slots are refunded in the background (best effort; the caller
does not wait for it). A refusal by any slot is the answer; otherwise a failed slot fails the charge.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import ssl
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis
from hiredis import pack_command
from redis import exceptions as redis_errors
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import NoBackoff
from redis.crc import key_slot
from redis.credentials import CredentialProvider

from extauthz.policy.build import parse_duration
from extauthz.stores import SLIDING_LOG, Charge, ChargeResult, StoreConfigError, StoreError

__all__ = ["CHARGE_SCRIPT", "RedisSettings", "RedisStore", "parse_redis_url"]

log = logging.getLogger("extauthz.stores.redis")

#: Every counter of one request, all or nothing (see extauthz.stores, memory.gcra_step and
#: memory.sliding_log_step). KEYS: the counters. ARGV[1]: for each counter a, b, cost, enforce (1/0),
#: kind as five big-endian doubles (Charge.spec; struct.unpack reads them): GCRA (kind 0) has
#: a = interval_us, b = burst; a sliding log (kind 1) a = window_us, b = limit. A GCRA counter is
#: a string (the TAT). A sliding log is a list of "time before cost" entries, oldest first, where
#: "before" is the units the counter admitted before that entry (a
#: running sum: the units in the window are the last entry's before + cost minus the first's before).
#: An entry counts while now - time < window; times never go backwards within a list. Every step is
#: a binary search (LINDEX) or an append, so a request after a burst costs what any other does: the
#: entries that left the window go in one LTRIM.
#: Returns one string of integers: admitted, now (Redis's clock, microseconds), then per counter
#: had_room, remaining, retry_us, reset_us, mark (a sliding-log entry added: its "before", which
#: identifies it for a Cluster refund; else -1). One bulk reply parses far faster than a nested
#: array, and this runs for every request.
CHARGE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local spec = {struct.unpack('>' .. string.rep('d', 5 * #KEYS), ARGV[1])}
local n = #KEYS
local base, newtat, room, first, last = {}, {}, {}, {}, {}
local admitted = true
for i = 1, n do
  local j = (i - 1) * 5
  local a, b, cost = spec[j + 1], spec[j + 2], spec[j + 3]
  if spec[j + 5] == 1 then
    local key = KEYS[i]
    local total = 0
    local head = redis.call('LINDEX', key, 0)
    if head and tonumber(string.match(head, '^(%d+)')) <= now - a then
      local lo, hi = 1, redis.call('LLEN', key)
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        local at = tonumber(string.match(redis.call('LINDEX', key, mid), '^(%d+)'))
        if at <= now - a then lo = mid + 1 else hi = mid end
      end
      redis.call('LTRIM', key, lo, -1)
      head = redis.call('LINDEX', key, 0)
    end
    if head then
      local lt, lb, lc = string.match(redis.call('LINDEX', key, -1), '^(%d+) (%d+) (%d+)')
      first[i] = tonumber(string.match(head, '^%d+ (%d+)'))
      last[i] = {tonumber(lt), tonumber(lb) + tonumber(lc)}
      total = last[i][2] - first[i]
    end
    base[i] = total
    room[i] = total + cost <= b
  else
    local tat = tonumber(redis.call('GET', KEYS[i])) or 0
    if tat < now then tat = now end
    base[i] = tat
    newtat[i] = tat + cost * a
    room[i] = newtat[i] - b * a <= now
  end
  if not room[i] and spec[j + 4] == 1 then admitted = false end
end
local out = {admitted and 1 or 0, string.format('%d', now)}
for i = 1, n do
  local j = (i - 1) * 5
  local a, b, cost = spec[j + 1], spec[j + 2], spec[j + 3]
  local had_room, remaining, retry, reset, mark = 1, 0, 0, 0, -1
  if spec[j + 5] == 1 then
    local key, total = KEYS[i], base[i]
    if last[i] then reset = last[i][1] + a - now end
    if not room[i] then
      had_room, remaining = 0, math.max(0, b - total)
      local target, lo, hi = first[i] + total + cost - b, 0, redis.call('LLEN', key) - 1
      while lo < hi do
        local mid = math.floor((lo + hi) / 2)
        local _, mb, mc = string.match(redis.call('LINDEX', key, mid), '^(%d+) (%d+) (%d+)')
        if tonumber(mb) + tonumber(mc) >= target then hi = mid else lo = mid + 1 end
      end
      retry = tonumber(string.match(redis.call('LINDEX', key, lo), '^(%d+)')) + a - now
    elseif admitted then
      remaining = b - total - cost
      if cost > 0 then
        local at, before = now, 0
        if last[i] then at, before = math.max(now, last[i][1]), last[i][2] end
        redis.call('RPUSH', key, string.format('%d %d %d', at, before, cost))
        redis.call('PEXPIRE', key, math.floor((at + a - now) / 1000) + 1)
        reset, mark = at + a - now, before
      end
    else
      remaining = b - total
    end
  else
    local allow_at = newtat[i] - b * a
    if room[i] and admitted then
      if cost > 0 then
        redis.call('SET', KEYS[i], string.format('%d', newtat[i]), 'PX', math.floor((newtat[i] - now) / 1000) + 1)
      end
      remaining, reset = math.floor((now - allow_at) / a), newtat[i] - now
    elseif room[i] then
      remaining, reset = math.floor((now - allow_at) / a) + cost, base[i] - now
    else
      had_room = 0
      remaining = math.max(0, math.floor((now - (base[i] - b * a)) / a))
      retry, reset = allow_at - now, base[i] - now
    end
  end
  out[#out + 1] = string.format('%d %d %d %d %d', had_room, remaining, retry, reset, mark)
end
return table.concat(out, ' ')
"""

#: Undo charges (Cluster only: a request refused in one slot after another slot charged it).
#: KEYS: counters. ARGV: per counter "g <microseconds to give back>" (GCRA) or "s <mark> <cost>" (the
#: sliding-log entry the charge added, by its "before": it becomes a zero-cost entry, and the entries
#: added since give the cost back too; an entry already gone has nothing to give back).
REFUND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
for i = 1, #KEYS do
  local kind, x, y = string.match(ARGV[i], '^(%a) (%d+) ?(%d*)$')
  if kind == 's' then
    local mark, cost, n = tonumber(x), tonumber(y), redis.call('LLEN', KEYS[i])
    for k = -1, -math.min(n, 1024), -1 do
      local at, before, c = string.match(redis.call('LINDEX', KEYS[i], k), '^(%d+) (%d+) (%d+)')
      before = tonumber(before)
      if before < mark then break end
      if before == mark then
        redis.call('LSET', KEYS[i], k, string.format('%s %d 0', at, before))
        for m = k + 1, -1 do
          local a2, b2, c2 = string.match(redis.call('LINDEX', KEYS[i], m), '^(%d+) (%d+) (%d+)')
          redis.call('LSET', KEYS[i], m, string.format('%s %d %s', a2, tonumber(b2) - cost, c2))
        end
        break
      end
    end
  elseif kind == 'g' then
    local tat = tonumber(redis.call('GET', KEYS[i]))
    if tat then
      local back = tat - tonumber(x)
      if back <= now then
        redis.call('DEL', KEYS[i])
      else
        redis.call('SET', KEYS[i], string.format('%d', back), 'PX', math.floor((back - now) / 1000) + 1)
      end
    end
  end
end
return 1
"""

_QUERY_KEYS = {
    "timeout", "max_connections", "probe_interval", "prefix", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile",
    "ssl_check_hostname", "db",
}  # fmt: skip
_SCHEMES = {
    "redis": ("single", False), "rediss": ("single", True), "unix": ("unix", False),
    "redis+sentinel": ("sentinel", False), "rediss+sentinel": ("sentinel", True),
    "redis+cluster": ("cluster", False), "rediss+cluster": ("cluster", True),
}  # fmt: skip
_FAILURES = (redis_errors.RedisError, OSError, TimeoutError)


@dataclass(frozen=True, slots=True)
class RedisSettings:
    """A parsed ``--redis-url``. ``describe()`` is safe to log (no credentials)."""

    mode: str  # single | unix | sentinel | cluster
    tls: bool
    hosts: tuple[tuple[str, int], ...] = ()
    path: str = ""
    service: str = ""
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    timeout: float = 0.25
    max_connections: int = 32
    probe_interval: float = 0.5
    prefix: str = "extauthz"
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True

    def describe(self) -> str:
        schemes = {"single": "redis", "unix": "unix", "sentinel": "redis+sentinel", "cluster": "redis+cluster"}
        scheme = schemes[self.mode]
        if self.tls:
            scheme = scheme.replace("redis", "rediss", 1)
        where = self.path if self.mode == "unix" else ",".join(f"{h}:{p}" for h, p in self.hosts)
        return f"{scheme}://{where}" + (f"/{self.service}" if self.service else "")


def parse_redis_url(url: str) -> RedisSettings:
    """Parse and validate ``url``; raise StoreConfigError (whose message never holds the password)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        raise StoreConfigError("redis URL is malformed") from None
    if parts.scheme not in _SCHEMES:
        raise StoreConfigError(f"redis URL scheme must be one of {', '.join(sorted(_SCHEMES))}")
    mode, tls = _SCHEMES[parts.scheme]
    query: dict[str, str] = {}
    for name, values in parse_qs(parts.query, keep_blank_values=True).items():
        if name not in _QUERY_KEYS:
            raise StoreConfigError(f"unknown redis URL parameter {name!r} (known: {', '.join(sorted(_QUERY_KEYS))})")
        query[name] = values[-1]
    netloc = parts.netloc
    userinfo, _, hostlist = netloc.rpartition("@")
    username = password = None
    if userinfo:
        user, sep, secret = userinfo.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if sep else None
    hosts: list[tuple[str, int]] = []
    default_port = 26379 if mode == "sentinel" else 6379
    if mode != "unix":
        for item in hostlist.split(","):
            item = item.strip()
            if not item:
                continue
            host, port = _host_port(item, default_port)
            hosts.append((host, port))
        if not hosts:
            raise StoreConfigError("redis URL has no host")
        if mode == "single" and len(hosts) > 1:
            raise StoreConfigError("several hosts need redis+sentinel:// or redis+cluster://")
    segments = [unquote(s) for s in parts.path.split("/") if s]
    service = ""
    db = 0
    if mode == "sentinel":
        if not segments:
            raise StoreConfigError("redis+sentinel URL needs the master name as its path: /<master-name>")
        service, segments = segments[0], segments[1:]
    if mode == "unix":
        if not parts.path:
            raise StoreConfigError("unix redis URL needs a socket path")
        segments = []
    if segments:
        db = _integer(segments[0], "database number")
    if "db" in query:
        db = _integer(query["db"], "db")
    if mode == "cluster" and db:
        raise StoreConfigError("Redis Cluster has only database 0")
    timeout = _duration(query.get("timeout", "250ms"), "timeout", 0.001, 10.0)
    probe = _duration(query.get("probe_interval", "500ms"), "probe_interval", 0.01, 60.0)
    max_connections = _integer(query.get("max_connections", "32"), "max_connections")
    if not 1 <= max_connections <= 10_000:
        raise StoreConfigError("max_connections must be between 1 and 10000")
    prefix = query.get("prefix", "extauthz")
    if not prefix or any(c in prefix for c in "{} \t\r\n"):
        raise StoreConfigError("prefix must be non-empty, without spaces or braces")
    check_hostname = query.get("ssl_check_hostname", "true").lower()
    if check_hostname not in ("true", "false"):
        raise StoreConfigError("ssl_check_hostname must be true or false")
    for name in ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile"):
        if name in query and not tls:
            raise StoreConfigError(f"{name} needs a TLS URL (rediss://...)")
        if name in query and not Path(query[name]).is_file():
            raise StoreConfigError(f"{name}: {query[name]} is not a readable file")
    return RedisSettings(
        mode=mode, tls=tls, hosts=tuple(hosts), path=unquote(parts.path) if mode == "unix" else "",
        service=service, db=db, username=username, password=password, timeout=timeout,
        max_connections=max_connections, probe_interval=probe, prefix=prefix,
        ssl_ca_certs=query.get("ssl_ca_certs"), ssl_certfile=query.get("ssl_certfile"),
        ssl_keyfile=query.get("ssl_keyfile"), ssl_check_hostname=check_hostname == "true",
    )  # fmt: skip


def _host_port(item: str, default: int) -> tuple[str, int]:
    if item.startswith("["):
        host, _, rest = item[1:].partition("]")
        port_text = rest.removeprefix(":")
    else:
        host, _, port_text = item.partition(":")
    port = _integer(port_text, "port") if port_text else default
    if not host or not 0 < port < 65536:
        raise StoreConfigError("redis URL has a malformed host or port")
    return host, port


def _integer(text: str, what: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise StoreConfigError(f"redis URL: {what} must be an integer") from None


def _duration(text: str, what: str, low: float, high: float) -> float:
    seconds = parse_duration(text)
    if seconds is None or not low <= seconds <= high:
        raise StoreConfigError(f"redis URL: {what} must be a duration between {low}s and {high}s")
    return seconds


class _PasswordFile(CredentialProvider):
    """Credentials from a mounted Secret: read at start, re-read in the background when it changes."""

    def __init__(self, path: str, username: str | None) -> None:
        self.path = Path(path)
        self.username = username
        self._stamp: tuple[int, int] | None = None
        self._password = ""
        self.reload()

    def reload(self) -> bool:
        """Re-read the file if it changed; True when the password changed. Raises StoreConfigError."""
        try:
            st = self.path.stat()
            stamp = (st.st_mtime_ns, st.st_ino)
            if stamp == self._stamp:
                return False
            text = self.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise StoreConfigError(f"cannot read the redis password file {self.path}: {exc}") from None
        password = text.rstrip("\r\n")
        if not password:
            raise StoreConfigError(f"the redis password file {self.path} is empty")
        changed = password != self._password
        self._stamp, self._password = stamp, password
        return changed

    def get_credentials(self) -> tuple[str] | tuple[str, str]:
        if self.username:
            return self.username, self._password
        return (self._password,)

    async def get_credentials_async(self) -> tuple[str] | tuple[str, str]:
        return self.get_credentials()


#: Error replies that callers tell apart (redis-py's classes); any other error reply is a ResponseError.
_ERRORS: dict[str, type[redis_errors.ResponseError] | type[redis_errors.ConnectionError]] = {
    "NOSCRIPT": redis_errors.NoScriptError,
    "READONLY": redis_errors.ReadOnlyError,
    "WRONGPASS": redis_errors.AuthenticationError,
    "NOAUTH": redis_errors.AuthenticationError,
    "NOPERM": redis_errors.NoPermissionError,
    "LOADING": redis_errors.BusyLoadingError,
    "OOM": redis_errors.OutOfMemoryError,
}
#: One command on its way: the caller's future, the EVAL to send after a NOSCRIPT, the deadline (loop time).
_Waiting = tuple[asyncio.Future[Any], tuple[Any, ...] | None, float]


def _error_reply(reply: redis_errors.ResponseError) -> Exception:
    """An error reply as redis-py would raise it ("NOSCRIPT No matching script" -> NoScriptError)."""
    message = str(reply)
    code, _, rest = message.partition(" ")
    error_class = _ERRORS.get(code)
    return reply if error_class is None else error_class(rest)


class _Connection(asyncio.Protocol):
    """One connection to Redis, pipelined: commands are written in order, replies matched in order.

    Built by :class:`_Pipeline`, which owns the commands' entry point (the hot path lives there).
    """

    def __init__(self, pipeline: _Pipeline, loop: asyncio.AbstractEventLoop) -> None:
        self.pipeline = pipeline
        self.loop = loop
        self.transport: asyncio.BaseTransport | None = None
        self.reader = hiredis.Reader(protocolError=redis_errors.InvalidResponse,
                                     replyError=redis_errors.ResponseError)  # fmt: skip
        #: Every command written or to be written, oldest first; replies resolve them from the left.
        self.waiting: deque[_Waiting] = deque()
        #: Commands not yet written (packed), in the order of ``waiting``.
        self.out: list[bytes] = []
        #: Connected and past AUTH/SELECT: commands may be written.
        self.ready = False
        #: A write of ``out`` is scheduled for the end of this loop turn.
        self.flushing = False
        #: Dropped: its commands have failed, nothing more is read or written.
        self.closed = False
        #: The one timer, at the earliest deadline of the waiting commands when it was armed
        #: (``watchdog_at``); re-armed when it fires, not when replies come (see _expire).
        self.watchdog: asyncio.TimerHandle | None = None
        self.watchdog_at = 0.0
        #: Connecting and the handshake (see _Pipeline._establish).
        self.task: asyncio.Task[None] | None = None

    # --- asyncio.Protocol ------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        if self.closed:  # timed out while connecting
            transport.abort()  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        reader = self.reader
        reader.feed(data)
        waiting = self.waiting
        resend = False
        while True:
            try:
                reply = reader.gets()
            except redis_errors.InvalidResponse as exc:
                self.fail(exc)
                return
            if reply is False:
                break
            if not waiting:
                self.fail(redis_errors.InvalidResponse("redis sent a reply for no command"))
                return
            future, fallback, deadline = waiting.popleft()
            if type(reply) is redis_errors.ResponseError:
                error = _error_reply(reply)
                if future.done():
                    continue  # the caller gave up
                if fallback is not None and type(error) is redis_errors.NoScriptError:
                    # The script is not loaded (Redis restarted, or SCRIPT FLUSH): send it with the
                    # command, behind the ones already queued, answering the same caller.
                    waiting.append((future, None, deadline))
                    self.out.append(pack_command(fallback))
                    resend = True
                    continue
                future.set_exception(error)
                if type(error) is redis_errors.ReadOnlyError:
                    # A replica now (a Sentinel failover): the next connection asks for the master again.
                    self.fail(redis_errors.ConnectionError("redis is a read-only replica now"))
                    return
            elif not future.done():
                future.set_result(reply)
        if resend and not self.flushing:
            self.flush()

    def eof_received(self) -> bool | None:
        return None  # close; connection_lost fails what is waiting

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.closed:
            # Redis went away (killed, restarted, a network failure): say so now rather than at the deadline.
            why = f": {_describe(exc)}" if exc is not None else ""
            self.fail(redis_errors.ConnectionError(f"redis closed the connection{why}"))

    # --- ours ------------------------------------------------------------------------------------
    def flush(self) -> None:
        """Write every queued command at once (scheduled by the first command of a loop turn)."""
        self.flushing = False
        out = self.out
        if not out or self.closed:
            return
        pipeline = self.pipeline
        pipeline.batches += 1
        pipeline.commands += len(out)
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))  # type: ignore[union-attr]
        out.clear()

    def handshake(self, commands: list[tuple[Any, ...]]) -> list[asyncio.Future[Any]]:
        """Write ``commands`` ahead of everything queued (nothing was written yet); their futures."""
        deadline = self.waiting[0][2] if self.waiting else self.loop.time() + self.pipeline.timeout
        entries = [(self.loop.create_future(), None, deadline) for _ in commands]
        self.waiting.extendleft(reversed(entries))
        self.transport.write(b"".join(pack_command(args) for args in commands))  # type: ignore[union-attr]
        return [future for future, _, _ in entries]

    def start(self) -> None:
        """Connected and authenticated: write what queued up meanwhile."""
        self.ready = True
        if not self.flushing:
            self.flush()

    def _expire(self) -> None:
        """The watchdog: fail everything if a command is past its deadline, else wait for the earliest."""
        self.watchdog = None
        if self.closed or not self.waiting:
            return
        # Deadlines are nearly in order (all but the probe's and the start's have the same timeout):
        # this scan runs once per timer, not per command.
        deadline = min(entry[2] for entry in self.waiting)
        if deadline - self.loop.time() > 0.001:  # the one it was armed for was answered meanwhile
            self.watchdog = self.loop.call_at(deadline, self._expire)
            self.watchdog_at = deadline
            return
        # No reply in time: Redis (or the network) is stuck, and a late reply would answer the
        # wrong command; every command waiting here fails and the next one gets a new connection.
        self.fail(TimeoutError("redis did not answer in time"))

    def fail(self, exc: BaseException) -> None:
        """Fail every waiting command with ``exc`` and drop the connection."""
        if self.pipeline._conn is self:
            self.pipeline._conn = None
        if self.closed:
            return
        self.closed = True
        self.ready = False
        if self.watchdog is not None:
            self.watchdog.cancel()
            self.watchdog = None
        self.out.clear()
        waiting, self.waiting = self.waiting, deque()
        for future, _, _ in waiting:
            if not future.done():
                future.set_exception(exc)
        if self.transport is not None:
            self.transport.abort()  # type: ignore[attr-defined]
        task = self.task
        if task is not None and not task.done() and task is not asyncio.current_task(self.loop):
            task.cancel()  # still connecting

    def abandon(self) -> None:
        """Drop a connection of another (finished) event loop without touching its futures."""
        self.closed = True
        with contextlib.suppress(Exception):
            if self.transport is not None:
                self.transport.abort()  # type: ignore[attr-defined]


class _Pipeline:
    """Commands to one Redis server (or a Sentinel's master) over one pipelined connection.

    ``submit`` queues a command and returns its future; the commands of one event-loop turn leave
    in one write at the end of the turn. The connection is opened by the first command that needs
    it (the others queue behind the handshake) and dropped on a timeout, an error or when Redis
    closes it; the next command opens a new one.
    """

    def __init__(
        self, settings: RedisSettings, credentials: CredentialProvider | None, sentinel_kwargs: dict[str, Any]
    ) -> None:
        self.settings = settings
        self.credentials = credentials
        self.timeout = settings.timeout
        self.sentinel_kwargs = sentinel_kwargs
        self._conn: _Connection | None = None
        self._sentinel: tuple[asyncio.AbstractEventLoop, Sentinel] | None = None
        self._ssl: ssl.SSLContext | None = None
        #: Writes and commands sent (diagnostics: commands per write shows how much is shared).
        self.batches = 0
        self.commands = 0

    def submit(
        self, args: tuple[Any, ...], fallback: tuple[Any, ...] | None = None, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Send ``args``; the future gets the reply or the exception. ``fallback`` replaces a NOSCRIPT.

        ``timeout`` (default: the store's) bounds everything: connecting, the handshake, the reply.
        """
        loop = asyncio.get_running_loop()
        conn = self._conn
        if conn is None or conn.loop is not loop:
            conn = self._connect(loop)
        packed = pack_command(args)
        future = loop.create_future()
        deadline = loop.time() + (timeout or self.timeout)
        conn.waiting.append((future, fallback, deadline))
        conn.out.append(packed)
        watchdog = conn.watchdog
        if watchdog is None or deadline < conn.watchdog_at:
            if watchdog is not None:
                watchdog.cancel()
            conn.watchdog = loop.call_at(deadline, conn._expire)
            conn.watchdog_at = deadline
        if conn.ready and not conn.flushing:
            conn.flushing = True
            loop.call_soon(conn.flush)
        return future

    def _connect(self, loop: asyncio.AbstractEventLoop) -> _Connection:
        if self._conn is not None:
            # Another event loop (tests, or a restarted one): the old connection is unusable.
            self._conn.abandon()
        conn = _Connection(self, loop)
        self._conn = conn
        conn.task = loop.create_task(self._establish(conn), name="redis-connect")
        return conn

    async def _establish(self, conn: _Connection) -> None:
        s = self.settings
        loop = conn.loop
        try:
            if s.mode == "unix":
                await loop.create_unix_connection(lambda: conn, s.path)
            else:
                if s.mode == "sentinel":
                    host, port = await self._sentinel_for(loop).discover_master(s.service)
                else:
                    host, port = s.hosts[0]
                await loop.create_connection(lambda: conn, host, port, ssl=self._ssl_context() if s.tls else None)
            commands = self._handshake()
            if commands and not conn.closed:
                await asyncio.gather(*conn.handshake(commands))
        except asyncio.CancelledError:
            # The deadline passed (the commands failed already) or the loop is shutting down.
            conn.fail(StoreError("the store is closed"))
            raise
        except Exception as exc:
            conn.fail(exc if isinstance(exc, _FAILURES) else redis_errors.ConnectionError(_describe(exc)))
            return
        if not conn.closed:
            conn.start()

    def _handshake(self) -> list[tuple[Any, ...]]:
        """AUTH (with the password file's current password) and SELECT, for a new connection."""
        s = self.settings
        commands: list[tuple[Any, ...]] = []
        credentials: tuple[str, ...] = ()
        if self.credentials is not None:
            credentials = self.credentials.get_credentials()
        elif s.username or s.password:
            credentials = (s.username, s.password or "") if s.username else (s.password or "",)
        if credentials:
            commands.append(("AUTH", *credentials))
        if s.db:
            commands.append(("SELECT", s.db))
        return commands

    def _ssl_context(self) -> ssl.SSLContext:
        """Built once, as redis-py does: the system CAs plus ``ssl_ca_certs``, a client certificate if given."""
        if self._ssl is None:
            s = self.settings
            context = ssl.create_default_context()
            context.check_hostname = s.ssl_check_hostname
            context.verify_mode = ssl.CERT_REQUIRED
            if s.ssl_certfile or s.ssl_keyfile:
                context.load_cert_chain(certfile=s.ssl_certfile, keyfile=s.ssl_keyfile)  # type: ignore[arg-type]
            if s.ssl_ca_certs:
                context.load_verify_locations(cafile=s.ssl_ca_certs)
            self._ssl = context
        return self._ssl

    def _sentinel_for(self, loop: asyncio.AbstractEventLoop) -> Sentinel:
        """redis-py's Sentinel client, asked for the master's address on each new connection."""
        if self._sentinel is None or self._sentinel[0] is not loop:
            s = self.settings
            self._sentinel = (loop, Sentinel(list(s.hosts), sentinel_kwargs=self.sentinel_kwargs))
        return self._sentinel[1]

    async def aclose(self) -> None:
        if self.commands:
            log.info("redis: %d commands sent in %d writes", self.commands, self.batches)
        conn = self._conn
        if conn is not None:
            if conn.loop is asyncio.get_running_loop():
                conn.fail(StoreError("the store is closed"))
                if conn.task is not None:
                    with contextlib.suppress(BaseException):
                        await conn.task
            else:
                conn.abandon()
            self._conn = None
        sentinel, self._sentinel = self._sentinel, None
        if sentinel is not None and sentinel[0] is asyncio.get_running_loop():
            for client in sentinel[1].sentinels:
                with contextlib.suppress(Exception):
                    await client.aclose()


@dataclass(slots=True)
class _Call:
    """One command for the cluster pipeline; ``fallback`` replaces an EVALSHA after NOSCRIPT.

    ``deadline`` (loop time) is set when it is submitted: past it, the command fails, sent or not.
    """

    args: tuple[Any, ...]
    future: asyncio.Future[Any]
    fallback: tuple[Any, ...] | None = None
    deadline: float = 0.0


class _ClusterPipeliner:
    """Writes commands to a Redis Cluster in batches over a few long-lived "lanes".

    Each lane is a task: it takes every pending command, sends them through redis-py's cluster
    pipeline (which knows the slots and follows MOVED/ASK), and comes back for more. While the
    lanes are busy, new commands wait and leave together in the next batch, so under load the cost
    of a round trip is shared by many requests, and with little load a command leaves at once.

    Each command's deadline starts when it is submitted, whether it then waits for a lane or is in
    flight, so no caller waits longer than its timeout. As on a single server's connection, one
    timer watches the earliest deadline of the unanswered commands and fails those past theirs,
    rather than a timer set and cancelled for every command. A lane gives up on its batch once every
    command of it is past its deadline, and does not send the commands that already failed.
    """

    def __init__(self, client: Any, timeout: float, *, lanes: int = 2, max_batch: int = 256) -> None:
        self.client = client
        self.timeout = timeout
        self.lanes = lanes
        self.max_batch = max_batch
        self._pending: list[_Call] = []
        #: Lanes waiting for work, each as the future that wakes it.
        self._idle: list[asyncio.Future[None]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        #: Submitted commands, oldest first, until found answered or failed (see _expire).
        self._watched: deque[_Call] = deque()
        #: The one timer, at ``_watchdog_at``: the earliest deadline in ``_watched`` when it was armed.
        self._watchdog: asyncio.TimerHandle | None = None
        self._watchdog_at = 0.0
        #: Batches and commands sent (diagnostics: commands per batch shows how much is shared).
        self.batches = 0
        self.commands = 0

    def submit(
        self, args: tuple[Any, ...], fallback: tuple[Any, ...] | None = None, timeout: float | None = None
    ) -> asyncio.Future[Any]:
        """Queue ``args`` for the next batch; the future fails with TimeoutError once ``timeout``
        (default: the store's) has passed since now, whether the command is still queued or in flight.
        """
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            self._loop = loop
            self._idle = []
            self._pending = []
            self._watched = deque()
            self._watchdog = None
            self._tasks = [loop.create_task(self._lane(), name=f"redis-lane-{i}") for i in range(self.lanes)]
        future: asyncio.Future[Any] = loop.create_future()
        call = _Call(args, future, fallback, loop.time() + (timeout or self.timeout))
        self._pending.append(call)
        self._watched.append(call)
        if self._watchdog is None or call.deadline < self._watchdog_at:
            self._arm(call.deadline)
        while self._idle:
            waiter = self._idle.pop()
            if not waiter.done():
                waiter.set_result(None)
                break
        return future

    def _arm(self, deadline: float) -> None:
        assert self._loop is not None
        if self._watchdog is not None:
            self._watchdog.cancel()
        self._watchdog = self._loop.call_at(deadline, self._expire)
        self._watchdog_at = deadline

    def _expire(self) -> None:
        """The watchdog: fail the unanswered commands past their deadline, then wait for the earliest."""
        self._watchdog = None
        assert self._loop is not None
        now = self._loop.time() + 0.001
        watched = self._watched
        # Oldest first: those answered meanwhile leave, those past their deadline fail.
        while watched and (watched[0].future.done() or watched[0].deadline <= now):
            call = watched.popleft()
            if not call.future.done():
                call.future.set_exception(TimeoutError("redis did not answer in time"))
        # Deadlines follow submission except for a command with a timeout of its own: scan the rest
        # (the commands submitted since the oldest unanswered one: this runs once per timer).
        earliest = math.inf
        for call in watched:
            if call.future.done():
                continue
            if call.deadline <= now:
                call.future.set_exception(TimeoutError("redis did not answer in time"))
            elif call.deadline < earliest:
                earliest = call.deadline
        if earliest < math.inf:
            self._arm(earliest)

    async def _lane(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            # Commands past their deadline (failed by the watchdog) are not sent.
            while not (pending := [call for call in self._pending if not call.future.done()]):
                self._pending = pending
                waiter: asyncio.Future[None] = loop.create_future()
                self._idle.append(waiter)
                await waiter
            batch, self._pending = pending[: self.max_batch], pending[self.max_batch :]
            await self._send(batch)

    async def _send(self, batch: list[_Call]) -> None:
        """Send one batch and resolve its futures."""
        self.batches += 1
        self.commands += len(batch)
        try:
            # Past the last deadline of the batch nobody waits for it: the lane is free for the next.
            async with asyncio.timeout_at(max(call.deadline for call in batch)):
                replies = await self._execute([call.args for call in batch])
                retry = [
                    i
                    for i, reply in enumerate(replies)
                    if isinstance(reply, redis_errors.NoScriptError)
                    and batch[i].fallback is not None
                    and not batch[i].future.done()
                ]
                if retry:
                    again = await self._execute([batch[i].fallback for i in retry])  # type: ignore[misc]
                    for i, reply in zip(retry, again, strict=True):
                        replies[i] = reply
        except Exception as exc:
            _fail(batch, exc)
            return
        except BaseException:  # the lane is cancelled (the store closes): nobody may wait forever
            _fail(batch, StoreError("the store is closed"))
            raise
        for call, reply in zip(batch, replies, strict=True):
            if call.future.done():
                continue  # the caller gave up, or its deadline passed
            if isinstance(reply, Exception):
                call.future.set_exception(reply)
            else:
                call.future.set_result(reply)

    async def _execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """One reply per command, in order; an error reply (e.g. NOSCRIPT) is returned, not raised."""
        pipe = self.client.pipeline(transaction=False)
        for args in commands:
            pipe.execute_command(*args)
        return list(await pipe.execute(raise_on_error=False))

    async def aclose(self) -> None:
        tasks, self._tasks = self._tasks, []
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        _fail(self._pending, StoreError("the store is closed"))
        self._pending = []
        self._watched = deque()


def _fail(batch: list[_Call], exc: Exception) -> None:
    for call in batch:
        if not call.future.done():
            call.future.set_exception(exc)


class RedisStore:
    """The shared store. One per process (``Services.shared``); ``start`` before use, ``aclose`` at exit."""

    name = "redis"

    def __init__(self, url: str, *, password_file: str | None = None) -> None:
        self.settings = parse_redis_url(url)
        self._credentials = _PasswordFile(password_file, self.settings.username) if password_file else None
        self.timeout = self.settings.timeout
        self.cluster = self.settings.mode == "cluster"
        #: Every key this store writes starts with it (``prefix`` URL parameter).
        self._key_prefix = self.settings.prefix + ":"
        #: A Cluster goes through redis-py's RedisCluster (None for the other modes: see _Pipeline).
        self.client: Any = None
        self._pipeline: _Pipeline | _ClusterPipeliner
        if self.cluster:
            self.client = self._cluster_client()
            self._pipeline = _ClusterPipeliner(self.client, self.timeout)
        else:
            self._pipeline = _Pipeline(self.settings, self._credentials, self._sentinel_kwargs())
        self._charge_sha = hashlib.sha1(CHARGE_SCRIPT.encode()).hexdigest()
        #: Charge numbers (interval, burst, cost, enforce) -> their text for the script: they repeat.
        self._specs: dict[tuple[Any, ...], bytes] = {}
        self._refund_sha = hashlib.sha1(REFUND_SCRIPT.encode()).hexdigest()
        self.started = False
        self.circuit_open = False
        #: When the circuit last closed (time.monotonic()): a timeout soon after is not probed at once.
        self._closed_at = -math.inf
        #: Times the circuit opened (for tests and diagnostics).
        self.trips = 0
        self._probe: asyncio.Task[None] | None = None
        self._watch: asyncio.Task[None] | None = None
        #: Cluster refunds under way (kept referenced until done).
        self._refunds: set[asyncio.Task[None]] = set()

    # --- construction ----------------------------------------------------------------------------
    def _connection_kwargs(self) -> dict[str, Any]:
        s = self.settings
        kwargs: dict[str, Any] = {
            # Deadlines are ours (one per batch, and the probe's): a socket timeout would add a
            # task per write (redis-py wraps sends in wait_for) for nothing.
            "socket_timeout": None,
            "socket_connect_timeout": s.timeout,
            # One immediate retry on a fresh connection: pooled ones are dead after a Redis restart.
            "retry": Retry(NoBackoff(), 1),
            "retry_on_error": [redis_errors.ConnectionError],
            "health_check_interval": 0,
        }
        if self._credentials is not None:
            kwargs["credential_provider"] = self._credentials
        else:
            kwargs["username"] = s.username
            kwargs["password"] = s.password
        if s.tls:
            kwargs.update(
                ssl_ca_certs=s.ssl_ca_certs,
                ssl_certfile=s.ssl_certfile,
                ssl_keyfile=s.ssl_keyfile,
                ssl_check_hostname=s.ssl_check_hostname,
                ssl_cert_reqs="required",
            )
        return kwargs

    def _cluster_client(self) -> Any:
        s = self.settings
        kwargs = self._connection_kwargs()
        if s.tls:
            kwargs["ssl"] = True
        return RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in s.hosts], max_connections=s.max_connections, **kwargs
        )

    def _sentinel_kwargs(self) -> dict[str, Any]:
        """How to talk to the sentinels themselves (TLS as for the master, no AUTH)."""
        s = self.settings
        kwargs = self._connection_kwargs()
        if s.tls:
            kwargs["ssl"] = True
        sentinel_kwargs = {k: v for k, v in kwargs.items() if k.startswith("ssl") or k == "socket_connect_timeout"}
        # Sentinels are asked only when connecting: a timeout lets a dead one be skipped for the next.
        sentinel_kwargs["socket_timeout"] = s.timeout
        sentinel_kwargs["retry"] = Retry(NoBackoff(), 0)  # the default backs off for seconds
        return sentinel_kwargs

    # --- life cycle ------------------------------------------------------------------------------
    async def start(self) -> None:
        """Load the scripts; an unreachable Redis is logged and probed, never fatal (quotas decide)."""
        self.started = True
        _circuit_metric("closed")
        try:
            async with asyncio.timeout(max(self.timeout, 1.0)):
                await self._load_scripts()
            log.info("redis store %s: connected", self.settings.describe())
        except _FAILURES as exc:
            self._trip("start", exc)
        if self._credentials is not None:
            self._watch = asyncio.get_running_loop().create_task(self._watch_password(), name="redis-password")

    async def _load_scripts(self) -> None:
        if self.cluster:
            await self.client.initialize()
            for script in (CHARGE_SCRIPT, REFUND_SCRIPT):
                await self.client.execute_command("SCRIPT", "LOAD", script, target_nodes=self.client.get_primaries())
        else:
            timeout = max(self.timeout, 1.0)  # connecting (TLS, sentinels) at start may take longer
            scripts = (CHARGE_SCRIPT, REFUND_SCRIPT)
            await asyncio.gather(*(self._pipeline.submit(("SCRIPT", "LOAD", s), timeout=timeout) for s in scripts))

    async def aclose(self) -> None:
        if self._refunds:  # give them their deadline: a refund is a charge to give back
            await asyncio.wait(set(self._refunds), timeout=self.timeout)
        for task in (self._probe, self._watch, *self._refunds):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        await self._pipeline.aclose()
        if self.client is not None:
            with contextlib.suppress(Exception):
                await self.client.aclose()

    async def _watch_password(self) -> None:
        assert self._credentials is not None
        while True:
            await asyncio.sleep(5.0)
            try:
                if await asyncio.to_thread(self._credentials.reload):
                    log.info("redis password file changed: new connections use the new password")
            except StoreConfigError as exc:
                log.warning("%s; keeping the previous password", exc)

    # --- circuit breaker -------------------------------------------------------------------------
    def _trip(self, operation: str, exc: BaseException) -> None:
        _store_error_metric(operation)
        if self.circuit_open:
            return
        self.circuit_open = True
        self.trips += 1
        _circuit_metric("open")
        # A timeout may be a pause of this process (GC, CPU starvation), not Redis: probe at once, so
        # that a pause keeps the circuit open for one round trip. Unless the circuit closed moments
        # ago: Redis answers a PING but not the commands in time, and requests would keep waiting.
        timed_out = isinstance(exc, TimeoutError | redis_errors.TimeoutError)
        at_once = timed_out and time.monotonic() - self._closed_at >= self.settings.probe_interval
        log.warning(
            "redis store %s unavailable (%s during %s): failing fast, probing %severy %.2fs",
            self.settings.describe(),
            _describe(exc),
            operation,
            "now, then " if at_once else "",
            self.settings.probe_interval,
        )
        self._ensure_probe(at_once=at_once)

    def _ensure_probe(self, *, at_once: bool = False) -> None:
        """One probe task per open circuit, on the running loop (a dead or foreign one is replaced)."""
        loop = asyncio.get_running_loop()
        if self._probe is None or self._probe.done() or self._probe.get_loop() is not loop:
            self._probe = loop.create_task(self._probe_until_up(at_once=at_once), name="redis-probe")

    async def _probe_until_up(self, *, at_once: bool = False) -> None:
        """PING until Redis answers, then close the circuit; the first PING at once if ``at_once``."""
        while self.circuit_open:
            if at_once:
                # Right after a timeout: Redis must answer within the deadline requests have.
                at_once = False
                timeout = self.timeout
            else:
                await asyncio.sleep(self.settings.probe_interval)
                timeout = max(self.timeout, 0.5)
            _circuit_metric("half_open")
            try:
                async with asyncio.timeout(timeout):
                    if self.cluster:
                        await self.client.initialize()
                        await self.client.execute_command("PING", target_nodes=self.client.get_primaries())
                    else:
                        # On the connection requests use: when it answers, it is ready for them.
                        await self._pipeline.submit(("PING",), timeout=timeout)
            except _FAILURES:
                _circuit_metric("open")
                continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # keep probing whatever the client does
                log.warning("redis probe failed unexpectedly: %s", _describe(exc))
                _circuit_metric("open")
                continue
            self.circuit_open = False
            self._closed_at = time.monotonic()
            _circuit_metric("closed")
            log.info("redis store %s is reachable again", self.settings.describe())

    async def _call(self, operation: str, args: tuple[Any, ...], fallback: tuple[Any, ...] | None = None) -> Any:
        if self.circuit_open:
            _store_error_metric(operation)
            self._ensure_probe()
            raise StoreError("redis circuit is open")
        try:
            return await self._pipeline.submit(args, fallback)
        except _FAILURES as exc:
            self._trip(operation, exc)
            raise StoreError(f"redis {operation} failed: {_describe(exc)}") from None

    def send(self, operation: str, args: tuple[Any, ...], fallback: tuple[Any, ...] | None = None) -> Any:
        """Queue one command now and return an awaitable of its reply (StoreError on failure).

        Unlike the coroutine methods, the command is queued before the caller awaits anything, so it
        leaves in the same write as the commands issued later in this loop turn (the detect check's
        script beside the quota charge: one round trip for both). The result must be awaited.
        """
        try:
            future = self.send_now(operation, args, fallback)
        except StoreError as exc:
            return _failed(exc)
        return self._settle(operation, future)

    def send_now(self, operation: str, args: tuple[Any, ...], fallback: tuple[Any, ...] | None = None) -> Any:
        """:meth:`send` without the coroutine: the reply's future, whose failure the caller turns
        into a StoreError with :meth:`failed`. Raises StoreError at once when the circuit is open."""
        if self.circuit_open:
            _store_error_metric(operation)
            self._ensure_probe()
            raise StoreError("redis circuit is open")
        return self._pipeline.submit(args, fallback)

    def failed(self, operation: str, exc: BaseException) -> StoreError:
        """The StoreError for a failed :meth:`send_now` (a Redis failure trips the circuit)."""
        if isinstance(exc, _FAILURES):
            self._trip(operation, exc)
        else:
            _store_error_metric(operation)
        return StoreError(f"redis {operation} failed: {_describe(exc)}")

    async def _settle(self, operation: str, future: Any) -> Any:
        try:
            return await future
        except _FAILURES as exc:
            raise self.failed(operation, exc) from None

    @property
    def key_prefix(self) -> str:
        """Prepended to every key (``prefix`` of the URL, and a colon)."""
        return self._key_prefix

    # --- operations ------------------------------------------------------------------------------
    async def remember_once(self, key: str, ttl: float) -> bool:
        digest = hashlib.blake2b(key.encode(), digest_size=18).hexdigest()
        ttl_ms = max(1, int(ttl * 1000))
        key = f"{self._key_prefix}once:{digest}"
        reply = await self._call("remember_once", ("SET", key, "1", "NX", "PX", ttl_ms))
        return reply is not None

    async def is_member(self, set_name: str, member: str) -> bool:
        return bool(await self._call("is_member", ("SISMEMBER", set_name, member)))

    async def charge(self, charges: Sequence[Charge]) -> Sequence[ChargeResult | None]:
        if not charges:
            return []
        if not self.cluster:
            return (await self._charge_group(list(range(len(charges))), charges))[2]
        groups: dict[int, list[int]] = {}
        for i, c in enumerate(charges):
            groups.setdefault(key_slot(c.key.encode()), []).append(i)
        if len(groups) == 1:
            return (await self._charge_group(list(range(len(charges))), charges))[2]
        # Every slot's outcome, failures included: a slot that charged must be refunded if another failed.
        outcomes = await asyncio.gather(
            *(self._charge_group(idx, charges) for idx in groups.values()), return_exceptions=True
        )
        failure: BaseException | None = None
        done: list[tuple[list[int], bool, list[int], list[ChargeResult]]] = []
        for outcome, idx in zip(outcomes, groups.values(), strict=True):
            if isinstance(outcome, BaseException):
                failure = failure or outcome
            else:
                done.append((idx, *outcome))
        # Refused by one slot, or failed in one: the slots that admitted and charged give it back.
        refused = not all(ok for _, ok, _, _ in done)
        admitted = failure is None and not refused
        results: list[ChargeResult | None] = [None] * len(charges)
        refunds: list[tuple[str, str]] = []
        for idx, ok, marks, group_results in done:
            for i, result, mark in zip(idx, group_results, marks, strict=True):
                c = charges[i]
                if not admitted and ok and result.allowed and c.cost:
                    if c.kind == SLIDING_LOG:  # the entry this charge added
                        refunds.append((self._key_prefix + c.key, f"s {mark} {c.cost}"))
                        reset = result.reset_after
                    else:
                        refunds.append((self._key_prefix + c.key, f"g {c.cost * c.interval_us}"))
                        reset = max(0.0, result.reset_after - c.cost * c.interval_us / 1e6)
                    result = ChargeResult(True, result.remaining + c.cost, 0.0, reset)
                results[i] = result
        if refunds:
            # In the background: the caller's time went to the charge, and the answer does not
            # depend on the refund (best effort; a failed one is logged and counted).
            task = asyncio.get_running_loop().create_task(self._refund(refunds), name="redis-refund")
            self._refunds.add(task)
            task.add_done_callback(self._refunds.discard)
        if refused:
            # Redis refused the request: that is the answer, whatever another slot did. A slot that
            # failed has None (nothing was charged there).
            return results
        if failure is not None:
            raise failure  # as a single slot's failure would
        return results  # admitted: every slot answered

    async def _refund(self, refunds: list[tuple[str, str]]) -> None:
        """Give back charges (Cluster: other slots refused or failed), best effort.
        Runs as a task of its own, so a Check that ends meanwhile does not cancel it.

        Sent even while the circuit is open (a failing slot may just have opened it): the nodes to
        refund on have just answered the charge. A failure is counted and opens the circuit.
        """
        # Each refund is one key: no slot constraint, sent together.
        replies = await asyncio.gather(*(
            self._pipeline.submit(("EVALSHA", self._refund_sha, 1, k, a), ("EVAL", REFUND_SCRIPT, 1, k, a))
            for k, a in refunds
        ), return_exceptions=True)  # fmt: skip
        for exc in (r for r in replies if isinstance(r, BaseException)):
            if not isinstance(exc, Exception):
                raise exc  # cancelled
            log.warning("redis refund failed, a charge stays applied: %s", _describe(exc))
            if isinstance(exc, _FAILURES):
                self._trip("refund", exc)
            else:
                _store_error_metric("refund")

    async def charge_with(self, charges: Sequence[Charge], rider: Any) -> Sequence[ChargeResult | None]:
        """:meth:`charge`, with another script's work riding in the same call (the abuse detectors':
        ``rider.keys``, ``rider.argv``, ``rider.script`` = (body, sha), see extauthz.detection.redis).
        Its part of the reply goes to ``rider.reply`` (a failure to ``rider.error``). On a Cluster, or
        without charges, the rider is left alone: it sends its own call."""
        if self.cluster or not charges:
            return await self.charge(charges)
        try:
            return (await self._charge_group(list(range(len(charges))), charges, rider))[2]
        except StoreError as exc:
            rider.error = exc
            raise

    async def _charge_group(self, idx: list[int], charges: Sequence[Charge],
                            rider: Any = None) -> tuple[bool, list[int], list[ChargeResult]]:  # fmt: skip
        """Charge the counters ``idx`` of ``charges`` (one slot) with one script: whether the script
        admitted them, each counter's mark (the sliding-log entry it added, for a refund) and answer."""
        prefix = self._key_prefix
        keys = tuple(prefix + charges[i].key for i in idx)
        specs = self._specs
        parts = []
        for i in idx:
            numbers = charges[i][1:]
            text = specs.get(numbers)
            if text is None:
                if len(specs) >= 1024:  # costs from expressions can vary without bound
                    specs.clear()
                text = specs[numbers] = charges[i].spec
            parts.append(text)
        spec = b"".join(parts)
        if rider is None:
            tail = (len(keys), *keys, spec)
            reply = await self._call("charge", ("EVALSHA", self._charge_sha, *tail), ("EVAL", CHARGE_SCRIPT, *tail))
        else:
            body, sha = rider.script
            tail = (len(keys) + len(rider.keys), *keys, *rider.keys, len(keys), spec, *rider.argv)
            reply = await self._call("charge", ("EVALSHA", sha, *tail), ("EVAL", body, *tail))
            if isinstance(reply, bytes):
                reply = reply.decode()
            ridden, _, reply = str(reply).partition("|")
            rider.reply = ridden
        try:
            values = [int(v) for v in reply.split()]
            results = [
                ChargeResult(values[k] == 1, values[k + 1], values[k + 2] / 1e6, values[k + 3] / 1e6)
                for k in range(2, 2 + 5 * len(idx), 5)
            ]
            marks = values[6 : 6 + 5 * len(idx) : 5]
        except (AttributeError, TypeError, ValueError, IndexError):
            _store_error_metric("charge")
            raise StoreError("redis charge script gave an unexpected reply") from None
        return values[0] == 1, marks, results


async def _failed(exc: Exception) -> Any:
    raise exc


def _describe(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _store_error_metric(operation: str) -> None:
    from extauthz.telemetry import metrics

    metrics.store_error("redis", operation)


def _circuit_metric(state: str) -> None:
    from extauthz.telemetry import metrics

    metrics.circuit_state("redis", state)
