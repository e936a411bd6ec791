"""What BentoML 1.4, uvicorn and circus cannot do through a public API, in one place.

``bentoml serve`` runs a supervisor (a circus arbiter) that starts the API workers, each a uvicorn server around
the app BentoML builds from ``service/service.py``. Where that stack has no public way to do what this service
needs, this module does it, each time naming the public API it waits for:

- **Request heads** (uvicorn): the httptools protocol buffers any amount of header bytes, for as long as the
  client likes. :class:`BoundedHttpToolsProtocol` answers 431 (too large, too many fields) or 408 (too slow)
  before the application sees the request; it also closes a keep-alive connection after
  ``IMGCLS_KEEPALIVE_REQUESTS`` requests, so long-lived connections reach pods started later, and at shutdown
  serves a request an idle connection was already bringing instead of resetting it.
- **Connections spread over the workers** (circus): the workers share one listening socket, and a new connection
  goes to whichever worker's event loop takes it first, most often the busy one: left alone, 8 clients that
  reconnect now and then end up on one worker while the other idles. Each worker counts its working connections
  in a small file the supervisor creates (:class:`Census`), and one holding clearly more than the least loaded
  closes a connection after its response, now and then, until the counts even out.
- **Errors in our shape** (BentoML): an exception from an IO descriptor or an API method becomes BentoML's own
  body (``{"error": message}``, or a bare 500). Here an :class:`~imgcls.errors.ApiError` is answered as the
  service's ``{"error": code, "detail": ...}`` with its status, and any other exception as a 500 in that shape.
- **The supervisor's control socket** (BentoML + circus): it listens on ``tcp://127.0.0.1:<port>``, without
  authentication, for commands that can start any program; here it listens on unix sockets in a folder only the
  server's user can open.
- **Metrics of two servers on one BentoML home** (BentoML): ``bentoml serve`` empties
  ``$BENTOML_HOME/prometheus_multiproc_dir`` at start, wiping the metric files of a server already running there;
  here each server gets a folder of its own.
- **Private imports** the rest of the service needs: Swagger UI's files in BentoML's wheel (for ``/docs``) and
  the root IO model of a raw-body API (the model process's ``.npy`` hop, ``service/wire.py``).

:func:`install` is the one call that sets this up (with the worker's life of ``service/lifecycle.py``, which
needs no private API); the service module makes it when ``bentoml serve`` imports it, and it does nothing in any
other process (a test, ``bentoml build``). It refuses to run on versions of bentoml and uvicorn other than those it
was written for.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import mmap
import os
import shutil
import sys
import tempfile
import time
import typing as t
from importlib.metadata import version
from pathlib import Path

import bentoml
import httptools

# Private: the root model of an IO spec whose body is not JSON; bentoml exports IODescriptor but not this.
from _bentoml_sdk.io_models import IORootModel
from packaging.version import Version

# Private: uvicorn has no public base for an HTTP protocol with bounds on the request head.
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from imgcls.errors import ApiError
from service.lifecycle import die_with_parent, report_start_failure_on_exit

if t.TYPE_CHECKING:
    from service.settings import Settings

__all__ = ["IORootModel", "SWAGGER_DIR", "install"]

log = logging.getLogger(__name__)

#: The versions the hooks below were written and tested for: [lowest, first one not known to work).
WRITTEN_FOR = {"bentoml": ("1.4.39", "1.4.40"), "uvicorn": ("0.54", "0.56")}
#: Swagger UI as BentoML ships it for its own page; no public API names the folder (a path inside the wheel).
SWAGGER_DIR = Path(bentoml.__file__).parent / "_internal" / "server" / "static_content"
#: At shutdown, how long an idle keep-alive connection may take to bring a request its client already sent.
IDLE_GRACE_S = 0.5
HEAD_END = b"\r\n\r\n"


class VersionError(RuntimeError):
    """The installed bentoml or uvicorn is not a version these adaptations were written for."""


def check_versions(installed: t.Callable[[str], str] = version) -> None:
    """Refuse versions of bentoml and uvicorn outside :data:`WRITTEN_FOR`, with what to do."""
    for package, (lowest, beyond) in WRITTEN_FOR.items():
        found = Version(installed(package))
        if not Version(lowest) <= found < Version(beyond):
            raise VersionError(
                f"{package} {found} is installed, but service/adaptations.py hooks into {package} "
                f">={lowest},<{beyond} through private APIs. Install a version in that range (pyproject.toml pins "
                "it), or check each hook in service/adaptations.py against the new version and widen WRITTEN_FOR."
            )


def _role() -> str | None:
    """The service a process of ``bentoml serve`` serves (its ``--service-name``), "supervisor" in ``bentoml serve``
    itself, None in any other process."""
    if bentoml.server_context.worker_index is not None:
        args = sys.argv
        return args[args.index("--service-name") + 1] if "--service-name" in args[:-1] else ""
    import click

    ctx = click.get_current_context(silent=True)
    return "supervisor" if ctx is not None and ctx.info_name == "serve" else None


def install(settings: Settings, api_service: str, api_workers: int) -> None:
    """Adapt this process of ``bentoml serve`` (see the module); nothing in any other process. ``api_service`` is
    the name of the service whose ``api_workers`` workers answer HTTP."""
    role = _role()
    if role is None:
        return
    try:
        check_versions()
    except VersionError as exc:
        sys.exit(f"imgcls: {exc}")
    if role == "supervisor":
        _private_control_socket()
        _metrics_folder_per_server()
        Census.create(api_workers)
        report_start_failure_on_exit()
        return
    die_with_parent()
    protocol = BoundedHttpToolsProtocol
    protocol.max_head_bytes, protocol.max_headers = settings.max_header_bytes, settings.max_headers
    protocol.head_timeout_s, protocol.max_requests = settings.header_timeout_s, settings.keepalive_requests
    if role == api_service:
        protocol.census = Census.join(bentoml.server_context.worker_index)
    _serve_with(protocol)
    _answer_api_errors()


# ---------------------------------------------------------------------------------------------------------------
# Request heads and connections (uvicorn, circus). Public API missing: a protocol class or head limits in
# uvicorn.Config that BentoML passes on (uvicorn only bounds heads with its h11 protocol,
# h11_max_incomplete_event_size; nothing bounds their time), and a listening socket per worker (SO_REUSEPORT).


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with bounds on each request head, a request quota per connection, the
    connection census and a graceful shutdown of idle connections (limits set by :func:`install`)."""

    max_head_bytes: t.ClassVar[int] = 32 << 10
    max_headers: t.ClassVar[int] = 100
    head_timeout_s: t.ClassVar[float] = 20.0
    max_requests: t.ClassVar[int] = 0  # per connection; 0: no limit
    census: t.ClassVar[Census | None] = None

    def __init__(self, *args: t.Any, **kwargs: t.Any) -> None:
        super().__init__(*args, **kwargs)
        # A head is expected at the start of the connection and after each complete request; while one is, the
        # bytes received are counted up to the blank line that ends it (a body never shares a chunk with the
        # start of its own head, so nothing else is counted).
        self._expect_head, self._head_bytes, self._head_tail, self._fields = True, 0, b"", 0
        self._refusal: tuple[int, str, str] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._shutting_down = False
        self._requests = 0
        self._counted = False  # in the census, from its first whole request until it closes

    def connection_made(self, transport: t.Any) -> None:
        super().connection_made(transport)
        self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_too_slow(self) -> None:
        self._head_timer = None
        if self._expect_head:
            self._refuse(408, "head_timeout", f"The request headers did not arrive within {self.head_timeout_s:g} s.")

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_head_timer()
        if self._counted:
            self.census.add(-1)
            self._counted = False
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._expect_head:
            window = self._head_tail + data
            end = window.find(HEAD_END)
            if end < 0:
                self._head_bytes += len(data)
                self._head_tail = window[-3:]
            else:
                self._head_bytes += end + len(HEAD_END) - len(self._head_tail)
            if self._head_bytes > self.max_head_bytes:
                return self._refuse(
                    431,
                    "headers_too_large",
                    f"The request line and headers are over {self.max_head_bytes} bytes (IMGCLS_MAX_HEADER_BYTES).",
                )
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:  # as uvicorn's own data_received handles it
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
        except httptools.HttpParserError:
            if self._refusal is not None:
                return self._refuse(*self._refusal)
            self._refuse(400, "invalid_http", "The request is not valid HTTP/1.1.")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._fields = 0
        if self._head_timer is None:  # a request after an idle keep-alive: its head has the same time to arrive
            self._head_timer = self.loop.call_later(self.head_timeout_s, self._head_too_slow)

    def on_headers_complete(self) -> None:
        self._expect_head, self._head_bytes, self._head_tail = False, 0, b""
        self._stop_head_timer()
        super().on_headers_complete()
        self._requests += 1
        last = self.max_requests and self._requests >= self.max_requests
        crowded = self.census is not None and self.census.close_one()
        if (self._shutting_down or last or crowded) and self.cycle is not None:
            self.cycle.keep_alive = False  # the last request on this connection: answered with Connection: close

    def on_message_complete(self) -> None:
        self._expect_head = True
        if not self._counted and self.census is not None:  # a connection still sending its first request is not
            self.census.add(1)  # counted: slow clients must not make a worker push its working ones away
            self._counted = True
        super().on_message_complete()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._fields += 1
        if self._fields > self.max_headers:
            self._refusal = (
                431,
                "too_many_headers",
                f"The request has more than {self.max_headers} header fields (IMGCLS_MAX_HEADERS).",
            )
            raise ValueError(self._refusal[2])  # stops the parser; data_received answers
        super().on_header(name, value)

    def shutdown(self) -> None:
        """The server stops: finish the request in flight, or serve the one an idle connection is bringing."""
        self._shutting_down = True
        if self.cycle is None or self.cycle.response_complete:
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)
        elif not self.cycle.response_started:
            self.cycle.keep_alive = False  # its response will say Connection: close
        # else its response went out without Connection: close, so the client may send another request on this
        # connection: it stays open after the response for the same grace as an idle one (on_response_complete).

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._shutting_down and not self.transport.is_closing():
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)

    def _close_if_idle(self) -> None:
        if (self.cycle is None or self.cycle.response_complete) and not self.transport.is_closing():
            self.transport.close()

    def _refuse(self, status: int, code: str, detail: str) -> None:
        """Answer in the service's error shape and close the connection; the application never sees it."""
        from service import metrics

        self._stop_head_timer()
        if self.transport.is_closing():
            return
        metrics.reject(code)
        body = json.dumps(ApiError(status, code, detail).body()).encode()
        reason = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}[status]
        self.transport.write(
            b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\nconnection: close\r\n\r\n%s"
            % (status, reason, len(body), body)
        )
        self.transport.close()


def _serve_with(protocol: type) -> None:
    """Make this worker's uvicorn serve HTTP with ``protocol``.

    Private: ``uvicorn.config.HTTP_PROTOCOLS`` is how uvicorn resolves ``http="auto"``, and BentoML passes no
    ``http=``. uvicorn reads it when the worker's server loads its configuration, after this module's import.
    """
    from uvicorn import config

    config.HTTP_PROTOCOLS["auto"] = config.HTTP_PROTOCOLS["httptools"] = f"{__name__}:{protocol.__name__}"


#: Where the supervisor tells its workers the census file is.
CENSUS_FILE = "IMGCLS_CONNECTION_CENSUS"


class Census:
    """Working connections per API worker: an int32 per worker in a file the supervisor creates, that every worker
    maps. Only a worker writes its own slot; a dead worker's count stays until its replacement resets the slot,
    which only makes the others less eager to close, never more."""

    #: A crowded worker closes at most one connection this often, so that the responses in flight do not all close
    #: at once.
    CLOSE_INTERVAL_S = 0.1

    def __init__(self, path: str, slot: int):
        with open(path, "r+b") as f:
            self._map = mmap.mmap(f.fileno(), 0)
        self.counts = memoryview(self._map).cast("i")
        if not 0 <= slot < len(self.counts):
            raise ValueError(f"worker slot {slot} outside the census of {len(self.counts)} workers")
        self.slot = slot
        self.counts[slot] = 0  # a replacement worker starts afresh
        self._last_close = float("-inf")

    @staticmethod
    def create(workers: int) -> None:
        """In the supervisor, before it starts the API workers: a zeroed slot per worker, removed at exit."""
        try:
            fd, path = tempfile.mkstemp(prefix="imgcls-connections-")
        except OSError as exc:  # no writable temporary folder: serve anyway, unbalanced
            log.warning("connection balancing off: %s", exc)
            return
        try:
            os.ftruncate(fd, 4 * max(1, workers))
        finally:
            os.close(fd)
        os.environ[CENSUS_FILE] = path  # the workers copy the supervisor's environment
        atexit.register(lambda: os.path.exists(path) and os.unlink(path))

    @classmethod
    def join(cls, worker_index: int | None) -> Census | None:
        """In an API worker: its slot (BentoML's worker index counts from 1), or None without a census."""
        path = os.environ.get(CENSUS_FILE)
        if not path or not worker_index:
            return None
        try:
            return cls(path, worker_index - 1)
        except (OSError, ValueError) as exc:  # serving goes on; connections are just not balanced
            log.warning("connection balancing off: %s", exc)
            return None

    def add(self, delta: int) -> None:
        self.counts[self.slot] += delta

    def crowded(self) -> bool:
        """True when this worker holds at least two connections, and an eighth, more than the least loaded one."""
        counts = self.counts.tolist()
        mine = counts.pop(self.slot)
        return bool(counts) and mine - min(counts) >= max(2, mine // 8)

    def close_one(self, now: float | None = None) -> bool:
        """Whether to close the connection whose request has just arrived: crowded, and none closed just before."""
        now = time.monotonic() if now is None else now
        if now - self._last_close < self.CLOSE_INTERVAL_S or not self.crowded():
            return False
        self._last_close = now
        return True


# ---------------------------------------------------------------------------------------------------------------
# Errors in our shape (BentoML). Public API missing: an exception handler for API methods and IO descriptors
# (bentoml/BentoML#3652 settled on "subclass BentoMLException", whose body is BentoML's, not ours).


def _answer_api_errors() -> None:
    """An ApiError raised while BentoML runs an API (its IO descriptor or its method) is answered as ours."""
    from _bentoml_impl.server.app import ServiceAppFactory  # private: the class whose method runs each API call
    from bentoml.exceptions import BentoMLException
    from pydantic import ValidationError
    from starlette.exceptions import HTTPException

    from service.http import STATUS_CODES, error_response, validation_detail

    original = ServiceAppFactory.api_endpoint
    if getattr(original, "imgcls_adapted", False):
        return

    async def api_endpoint(self: t.Any, name: str, request: t.Any) -> t.Any:
        try:
            return await original(self, name, request)
        except ApiError as err:
            return error_response(err)
        except ValidationError as exc:  # a JSON body BentoML validated against the method's signature
            return error_response(ApiError(400, *validation_detail(exc.errors(include_input=False))))
        except (HTTPException, BentoMLException) as exc:  # reading the body (Starlette: a form without boundary)
            status = exc.status_code if isinstance(exc, HTTPException) else exc.error_code.value
            if status < 500:
                code, detail = STATUS_CODES.get(status, STATUS_CODES[400])
                return error_response(ApiError(status, code, f"{detail} ({getattr(exc, 'detail', exc)})"))
            log.exception("%s %s failed", request.method, request.url.path)
        except Exception:  # BentoML would answer {"error": ...} or a bare 500: ours, logged
            log.exception("%s %s failed", request.method, request.url.path)
        return error_response(ApiError(500, *STATUS_CODES[500]))

    api_endpoint.imgcls_adapted = True  # type: ignore[attr-defined]
    ServiceAppFactory.api_endpoint = api_endpoint


# ---------------------------------------------------------------------------------------------------------------
# The supervisor (BentoML + circus). Public API missing: the control endpoints of bentoml serve's arbiter, and the
# folder of its multiprocess metrics (bentoml serve takes $BENTOML_HOME/prometheus_multiproc_dir and empties it).


def _private_control_socket() -> None:
    """Have the arbiter listen for commands on unix sockets in a private folder instead of on TCP."""
    from bentoml._internal.utils import circus  # private: BentoML builds the arbiter here with tcp:// endpoints

    if getattr(circus.Arbiter, "imgcls_adapted", False):
        return

    def private(arbiter_class: type) -> type:
        class Arbiter(arbiter_class):
            imgcls_adapted = True

            def __init__(self, watchers: list, *args: t.Any, **kwargs: t.Any) -> None:
                folder = tempfile.mkdtemp(prefix="imgcls-supervisor-")  # mode 0700: only this user may connect
                kwargs.update(endpoint=f"ipc://{folder}/control", pubsub_endpoint=f"ipc://{folder}/events")
                super().__init__(watchers, *args, **kwargs)
                self.exit_stack.callback(shutil.rmtree, folder, ignore_errors=True)

        return Arbiter

    circus.Arbiter, circus.ThreadedArbiter = private(circus.Arbiter), private(circus.ThreadedArbiter)


def _metrics_folder_per_server() -> None:
    """Give this server's workers a metrics folder of their own, removed when it stops."""
    import bentoml.serving  # public module, private function: what serve_http calls for the folder

    folder = tempfile.mkdtemp(prefix="imgcls-metrics-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    bentoml.serving.ensure_prometheus_dir = lambda *args, **kwargs: folder
