"""``extauthz serve --workers N``: N sidecar processes sharing one gRPC and one HTTP port.

Python decides one Check at a time per process; on a pod with several cores, several processes
decide several at once. Each worker binds the same ports with SO_REUSEPORT and the kernel spreads
connections over them. Metrics stay correct through prometheus-client's multiprocess mode: every
worker writes its values under ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary folder unless set),
and ``/metrics``, whichever worker answers it, aggregates all of them.

The supervisor validates the policy folder once (a broken folder exits 2 before any worker starts),
restarts a worker that dies, and on SIGTERM/SIGINT passes the signal on and waits for every worker
to finish its in-flight checks.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import shutil
import signal
import sys
import tempfile
import time
from multiprocessing.process import BaseProcess
from pathlib import Path

__all__ = ["supervise"]

log = logging.getLogger("extauthz.workers")

#: Seconds between restarts of a worker that keeps dying.
RESTART_DELAY = 1.0
#: A worker that exits with this code found the configuration invalid: restarting it cannot help.
CONFIG_ERROR = 2


def _worker(ns: argparse.Namespace, index: int) -> None:
    from extauthz.cli import serve_process
    from extauthz.telemetry.logs import configure_logging

    os.environ["EXTAUTHZ_WORKER"] = str(index)
    configure_logging(ns.log_level, ns.log_format)
    sys.exit(serve_process(ns, reuse_port=True))


def _metrics_dir() -> tuple[Path, bool]:
    configured = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if configured:
        folder = Path(configured)
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.db"):  # values of a previous run would be summed in
            stale.unlink()
        return folder, False
    return Path(tempfile.mkdtemp(prefix="extauthz-metrics-")), True


def supervise(ns: argparse.Namespace) -> int:
    from extauthz.policy import PolicySetError, load_folder
    from extauthz.server import StartupError, check_listeners

    if ns.unix_socket:
        print("extauthz: not starting: --unix-socket cannot be shared by several --workers", file=sys.stderr)
        return CONFIG_ERROR
    try:  # once here, rather than once per worker
        check_listeners(ns.listen, None, ns.http_host, ns.http_port, reuse_port=True,
                        http_authz=ns.http_authz_listen or None)
    except StartupError as exc:
        print(f"extauthz: not starting: {exc}", file=sys.stderr)
        return CONFIG_ERROR
    try:
        load_folder(ns.policies)
    except PolicySetError as exc:
        for error in exc.errors:
            print(f"error: {error}", file=sys.stderr)
        print(f"extauthz: not starting: {len(exc.errors)} error(s) in policy folder {ns.policies}", file=sys.stderr)
        return CONFIG_ERROR
    folder, temporary = _metrics_dir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)  # inherited by the spawned workers
    spawn = multiprocessing.get_context("spawn")
    stopping = False

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for proc in workers.values():
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signum)

    def start(index: int) -> BaseProcess:
        proc = spawn.Process(target=_worker, args=(ns, index), name=f"extauthz-worker-{index}")
        proc.start()
        log.info("worker %d started (pid %s)", index, proc.pid)
        return proc

    workers: dict[int, BaseProcess] = {}
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    for index in range(ns.workers):
        workers[index] = start(index)
    code = 0
    try:
        from prometheus_client import multiprocess

        while workers:
            time.sleep(0.2)
            for index, proc in list(workers.items()):
                if proc.is_alive():
                    continue
                multiprocess.mark_process_dead(proc.pid)
                del workers[index]
                if stopping:
                    continue
                if proc.exitcode == CONFIG_ERROR:
                    log.error("worker %d found the configuration invalid; stopping", index)
                    code = CONFIG_ERROR
                    on_signal(signal.SIGTERM, None)
                    continue
                log.error("worker %d (pid %s) exited with %s; restarting", index, proc.pid, proc.exitcode)
                time.sleep(RESTART_DELAY)
                workers[index] = start(index)
    finally:
        if temporary:
            shutil.rmtree(folder, ignore_errors=True)
    log.info("all workers stopped")
    return code
