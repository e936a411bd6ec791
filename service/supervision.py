"""A worker's life under ``bentoml serve`` (whose process is the supervisor: a circus arbiter).

- **The supervisor's control socket**: circus listens for commands on ``tcp://127.0.0.1:<random port>``, without
  authentication, and one of its commands starts any program: every local user (on Kubernetes, every container
  of the pod) could run code as the server's user. :func:`protect_control_socket` moves it, and the event
  socket, to unix sockets in a folder only that user can open.
- **Supervisor gone**: the supervisor starts each worker in a session of its own, so when it is killed with
  SIGKILL nothing tells the workers: they kept serving, unsupervised, and a new server could not bind the port.
  :func:`exit_with_supervisor` asks Linux to send the worker SIGTERM when its parent dies
  (``prctl(PR_SET_PDEATHSIG)``; elsewhere a thread polls), and exits at once if the parent is already not the
  supervisor that published its pid (:func:`become_supervisor`).
- **A worker that cannot serve** (its start-up self-test failed) writes why to a file the supervisor named and
  stops it (:func:`stop_server`); the supervisor prints the reason and exits with status 3, where a plain
  SIGTERM would have ended ``bentoml serve`` with 0.
- **Draining**: on SIGTERM (or SIGINT) uvicorn stops at once. :func:`drain_before_exit` first reports the worker
  not ready for ``seconds`` while it keeps serving, then hands the signal to uvicorn, which finishes the requests
  in flight and runs the shutdown hooks (the inference log is flushed there). A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

log = logging.getLogger(__name__)

PR_SET_PDEATHSIG = 1
SUPERVISOR_PID = "IMGCLS_SUPERVISOR_PID"
FAILURE_FILE = "IMGCLS_START_FAILURE_FILE"
#: Exit status of ``bentoml serve`` when a worker found it cannot serve.
CANNOT_SERVE = 3


def in_worker() -> bool:
    """True in a process the supervisor started (it published its pid before starting any)."""
    return os.environ.get(SUPERVISOR_PID, str(os.getpid())) != str(os.getpid())


def protect_control_socket() -> None:
    """Have the supervisor listen for commands on unix sockets in a private folder instead of on TCP.

    Must run where ``bentoml serve`` imports the service, before it builds the supervisor.
    """
    # Private: BentoML builds circus's arbiter here with hard-coded tcp://127.0.0.1 endpoints, no option to change.
    from bentoml._internal.utils import circus

    if getattr(circus.create_standalone_arbiter, "imgcls_private", False):
        return

    def create_standalone_arbiter(watchers: list, *, threaded: bool = False, **kwargs: t.Any) -> circus.Arbiter:
        folder = tempfile.mkdtemp(prefix="imgcls-supervisor-")  # mode 0700: only this user may connect
        arbiter_class = circus.ThreadedArbiter if threaded else circus.Arbiter
        arbiter = arbiter_class(
            watchers,
            endpoint=f"ipc://{folder}/control",
            pubsub_endpoint=f"ipc://{folder}/events",
            check_delay=kwargs.pop("check_delay", 10),
            **kwargs,
        )
        arbiter.exit_stack.callback(shutil.rmtree, folder, ignore_errors=True)
        return arbiter

    create_standalone_arbiter.imgcls_private = True
    circus.create_standalone_arbiter = create_standalone_arbiter


def become_supervisor() -> None:
    """In the supervisor, before it starts workers: publish its pid and name the file a failing worker writes."""
    fd, path = tempfile.mkstemp(prefix="imgcls-start-failure-")
    os.close(fd)
    os.environ[SUPERVISOR_PID] = str(os.getpid())  # the workers copy the environment when they are created
    os.environ[FAILURE_FILE] = path
    atexit.register(_report_start_failure, Path(path))


def _report_start_failure(path: Path) -> None:
    try:
        reason = path.read_text().strip()
        path.unlink()
    except OSError:
        return
    if reason:
        print(f"imgcls: cannot serve: {reason}", file=sys.stderr, flush=True)
        os._exit(CANNOT_SERVE)


def exit_with_supervisor(parent: int | None = None) -> None:
    """Make this process receive SIGTERM when ``parent`` (default: the supervisor that published its pid, else
    the current parent) dies; exit now if it is already gone."""
    parent = parent or int(os.environ.get(SUPERVISOR_PID) or os.getppid())
    if os.getppid() != parent:
        sys.exit(f"imgcls: the supervisor (pid {parent}) is gone; not starting")
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() == parent:  # it did not die between the check and the request
                return
            os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the supervisor instead", ctypes.get_errno())
    threading.Thread(target=_watch_parent, args=(parent,), name="supervisor-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error("the supervisor (pid %d) is gone: stopping this worker", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def stop_server(reason: str) -> None:
    """This worker cannot serve: leave ``reason`` for the supervisor and ask it to stop every worker."""
    path = os.environ.get(FAILURE_FILE)
    if path:
        with open(path, "a") as f:
            f.write(reason + "\n")
    os.kill(int(os.environ.get(SUPERVISOR_PID) or os.getppid()), signal.SIGTERM)


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
