"""A worker's life under ``bentoml serve``, where circus and uvicorn leave gaps: plain OS calls, no private API.

- **Dying with its parent**: circus starts each worker in a session of its own, so when the supervisor is killed
  with SIGKILL nothing tells the workers: they kept serving, unsupervised, and a new server could not bind the port.
  :func:`die_with_parent` asks Linux to send SIGTERM when the parent dies (``prctl(PR_SET_PDEATHSIG)``; elsewhere a
  thread polls). The slow decode lane's process does the same with its worker.
- **A worker that cannot serve** (its start-up self-test failed) writes why to a file the supervisor named
  (:func:`report_start_failure_on_exit`) and stops it (:func:`stop_server`); the supervisor prints the reason and
  exits with status 3, where a plain SIGTERM would have ended ``bentoml serve`` with 0.
- **Logging**: BentoML's worker logging lets only warnings through from other loggers; :func:`show_info_logs`
  lets this project's INFO lines through.
- **Draining**: on SIGTERM uvicorn stops at once. :func:`drain_on_sigterm` first reports the worker not ready for
  a few seconds while it keeps serving, then hands the signal to uvicorn, which finishes the requests in flight and
  runs the shutdown hooks (the inference log is flushed there). A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import atexit
import ctypes
import logging
import os
import signal
import sys
import tempfile
import threading
import time
import typing as t
from pathlib import Path

log = logging.getLogger(__name__)

#: Where the supervisor tells its workers to leave the reason they cannot serve.
FAILURE_FILE = "IMGCLS_START_FAILURE_FILE"
#: The supervisor's pid, for its workers (in a container the supervisor is pid 1, so "my parent is 1" proves nothing).
SUPERVISOR_PID = "IMGCLS_SUPERVISOR_PID"
#: Exit status of ``bentoml serve`` when a worker found it cannot serve.
CANNOT_SERVE = 3
PR_SET_PDEATHSIG = 1


def report_start_failure_on_exit() -> None:
    """In the supervisor: name the file where a worker that cannot serve leaves its reason; at exit, print it and exit
    with status 3."""
    fd, path = tempfile.mkstemp(prefix="imgcls-start-failure-")
    os.close(fd)
    os.environ[FAILURE_FILE] = path  # the workers copy the supervisor's environment
    os.environ[SUPERVISOR_PID] = str(os.getpid())

    def report() -> None:
        try:
            reason = Path(path).read_text().strip()
            Path(path).unlink()
        except OSError:
            return
        if reason:
            print(f"imgcls: cannot serve: {reason}", file=sys.stderr, flush=True)
            os._exit(CANNOT_SERVE)

    atexit.register(report)


def die_with_parent(parent: int | None = None) -> None:
    """This process gets SIGTERM when ``parent`` dies; it exits now if that is gone already.

    ``parent`` defaults to the supervisor named in the environment, else to this process's parent now.
    """
    parent = parent or int(os.environ.get(SUPERVISOR_PID) or 0) or os.getppid()
    if os.getppid() != parent:
        sys.exit("imgcls: the process that started this one is gone; not starting")
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0:
            if os.getppid() != parent:  # it died between the check and the request
                os.kill(os.getpid(), signal.SIGTERM)
            return
        log.warning("prctl(PR_SET_PDEATHSIG) failed (errno %d); polling the parent instead", ctypes.get_errno())
    threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(1.0)
    log.error("the process that started this one (pid %d) is gone: stopping", parent)
    os.kill(os.getpid(), signal.SIGTERM)


def stop_server(reason: str) -> None:
    """This worker cannot serve: leave ``reason`` for the supervisor and ask it to stop every worker."""
    path = os.environ.get(FAILURE_FILE)
    if path:
        with open(path, "a") as f:
            f.write(reason + "\n")
    os.kill(os.getppid(), signal.SIGTERM)


def drain_on_sigterm(seconds: float, on_drain: t.Callable[[], None]) -> None:
    """Call ``on_drain`` at the first SIGTERM/SIGINT and pass the signal on to uvicorn ``seconds`` later.

    Must run on the event loop after uvicorn has installed its own handlers (a startup hook), which it wraps.
    A second signal stops at once.
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


def show_info_logs() -> None:
    """Let this package's INFO lines through: BentoML's worker logging passes only warnings from other loggers."""
    for name in ("service", "imgcls"):
        logging.getLogger(name).setLevel(logging.INFO)
    for name, logger in logging.root.manager.loggerDict.items():
        if name.split(".")[0] in ("service", "imgcls") and isinstance(logger, logging.Logger):
            logger.disabled = False
