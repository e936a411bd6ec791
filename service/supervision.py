"""A worker's life under ``bentoml serve``: it dies with its supervisor, and it drains before it stops.

- **Supervisor gone**: BentoML's supervisor (a circus arbiter) starts each worker in a session of its own, so
  when the supervisor is killed with SIGKILL nothing tells the workers: they kept serving, unsupervised, and a
  new server could not bind the port. :func:`exit_with_supervisor` asks Linux to send the worker SIGTERM when
  its parent dies (``prctl(PR_SET_PDEATHSIG)``), and checks once that the parent is still the one it started
  with; elsewhere a thread polls the parent once a second.
- **Draining**: on SIGTERM (or SIGINT) uvicorn stops at once. :func:`drain_before_exit` first reports the worker
  not ready for ``seconds`` while it keeps serving, so a load balancer stops sending it requests, then hands
  the signal to uvicorn, which finishes the requests in flight and runs the shutdown hooks (the inference log
  is flushed there). A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import sys
import threading
import time
import typing as t

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1


def exit_with_supervisor() -> None:
    """Make this process receive SIGTERM when its parent (the supervisor that started it) dies."""
    parent = os.getppid()
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the supervisor instead", ctypes.get_errno())
        elif os.getppid() == parent:
            return
    threading.Thread(target=_watch_parent, args=(parent,), name="supervisor-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: stopping this worker", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def stop_server() -> None:
    """Ask the supervisor to stop every worker (as Ctrl+C would): this worker found it cannot serve."""
    os.kill(os.getppid(), signal.SIGTERM)


def drain_before_exit(seconds: float, on_drain: t.Callable[[], None]) -> None:
    """Call ``on_drain`` at the first SIGTERM/SIGINT and pass the signal on to the server ``seconds`` later.

    Must run on the event loop after the server has installed its own handlers (a startup hook), which it
    wraps.
    """
    loop = asyncio.get_running_loop()
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGINT)}
    draining = False

    def handle(sig: int, frame: t.Any) -> None:
        nonlocal draining
        server_handler = handlers[sig]
        if draining or not callable(server_handler):
            if callable(server_handler):
                server_handler(sig, frame)
            return
        draining = True
        log.info("%s: not ready, draining for %g s before stopping", signal.Signals(sig).name, seconds)
        loop.call_soon_threadsafe(on_drain)
        loop.call_soon_threadsafe(loop.call_later, seconds, server_handler, sig, None)

    for sig in handlers:
        signal.signal(sig, handle)
