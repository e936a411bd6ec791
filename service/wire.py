"""The hop between the API workers and the model process (placement "shared"): one ``.npy`` body each way.

``bentoml.depends`` sends arguments between services with pickle, and its JSON alternative turns
arrays into lists of numbers (about 4x the bytes of a uint8 batch, and slow to parse). So the
model service's API declares :class:`NpyArray` as its input and output spec: the client sends the
array as raw NumPy ``.npy`` bytes (dtype and shape in a small header, then the data), the server
reads it back with ``allow_pickle=False`` and zero copies, and the model process's batcher
(``service/batching.py``) joins the arrays of several calls into one model batch. :func:`hop` is the API worker's
side: a blocking call, made by the worker thread that runs the batch, with the model process's failures as
503/504/500.
"""

from __future__ import annotations

import asyncio
import io
import logging
import typing as t

import aiohttp
import bentoml
import httpx
import numpy as np
from starlette.responses import Response

from imgcls.errors import ApiError
from service.adaptations import IORootModel
from service.batching import Run

log = logging.getLogger(__name__)

MEDIA_TYPE = "application/x-npy"


class WireError(ValueError):
    """A hop body that is not a plain ``.npy`` array."""


def to_npy(array: np.ndarray) -> bytes:
    """An array as ``.npy`` bytes (format 1.0 header, C-order data)."""
    array = np.ascontiguousarray(array)
    if array.dtype.hasobject:
        raise WireError("object arrays cannot cross the hop (they would need pickle)")
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, np.lib.format.header_data_from_array_1_0(array))
    return header.getvalue() + array.tobytes()


def from_npy(data: bytes) -> np.ndarray:
    """The array in ``.npy`` bytes, as a read-only view of ``data``; never unpickles."""
    fp = io.BytesIO(data)
    try:
        major, minor = np.lib.format.read_magic(fp)
        if (major, minor) != (1, 0):
            raise WireError(f".npy format {major}.{minor} is not the 1.0 this service writes")
        shape, fortran_order, dtype = np.lib.format.read_array_header_1_0(fp)
    except ValueError as exc:
        raise WireError(f"not a .npy body: {exc}") from exc
    if dtype.hasobject or fortran_order:
        raise WireError("object or Fortran-order arrays are not accepted on the hop")
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - fp.tell() != count * dtype.itemsize:
        raise WireError(f".npy body holds {len(data) - fp.tell()} data bytes, its header says {count * dtype.itemsize}")
    return np.frombuffer(data, dtype=dtype, count=count, offset=fp.tell()).reshape(shape)


class NpyArray(IORootModel[bytes]):
    """BentoML IO spec: an ndarray in the Python API, a ``.npy`` body on the wire (both directions)."""

    media_type: t.ClassVar[str | None] = MEDIA_TYPE
    __root_input__: t.ClassVar[bool] = True  # the API method takes the array as its one argument

    @classmethod
    def from_inputs(cls, *args: t.Any, **kwargs: t.Any) -> NpyArray:
        """Client side: wrap the one array argument as ``.npy`` bytes."""
        values = [*args, *kwargs.values()]
        if len(values) != 1 or not isinstance(values[0], np.ndarray):
            raise TypeError("expected exactly one numpy array")
        return cls.model_construct(root=to_npy(values[0]))

    @classmethod
    async def from_http_request(cls, request: t.Any, serde: t.Any) -> NpyArray:
        """Server side: the request body back to an array (held in ``root``), without validation copies."""
        return cls.model_construct(root=from_npy(await request.body()))

    @classmethod
    async def to_http_response(cls, obj: t.Any, serde: t.Any) -> Response:
        """Server side: the API's returned array as a ``.npy`` body."""
        return Response(to_npy(np.asarray(obj)), media_type=MEDIA_TYPE)


MODEL_BUSY = "The model is saturated; retry after the number of seconds in Retry-After."
MODEL_TIMEOUT = "The model did not answer in time; retry later."
MODEL_FAILED = "The model service failed; it is logged. Retry, or report it."
MODEL_GONE = "The model service is not reachable (restarting?); retry shortly."


def hop(client: t.Any, loop: asyncio.AbstractEventLoop, timeout_s: float, retry_after_s: int = 1) -> Run:
    """The model process's ``infer`` through ``client`` (BentoML's async client of the dependency), called from a
    worker thread and run on the worker's event ``loop``: pixels in, rows out; its failures as ApiError."""

    async def infer(pixels: np.ndarray) -> t.Any:
        try:
            return await client.infer(pixels)
        except (aiohttp.ClientConnectionError, httpx.TransportError) as exc:
            if isinstance(exc, aiohttp.ServerTimeoutError | httpx.TimeoutException):
                raise
            log.warning("model service connection dropped (%r); retrying once", exc)
            return await client.infer(pixels)  # inference is idempotent

    def call(pixels: np.ndarray) -> np.ndarray:
        try:
            out = asyncio.run_coroutine_threadsafe(infer(pixels), loop).result(timeout_s)
        except bentoml.exceptions.BentoMLException as exc:
            status = getattr(exc.error_code, "value", 500)
            if status in (429, 503):
                raise ApiError(503, "overloaded", MODEL_BUSY, retry_after_s) from exc
            if status == 504:
                raise ApiError(504, "timeout", MODEL_TIMEOUT) from exc
            log.error("model service failed: %s", exc)
            raise ApiError(500, "model_error", MODEL_FAILED) from exc
        except (TimeoutError, httpx.TimeoutException, aiohttp.ServerTimeoutError) as exc:
            raise ApiError(504, "timeout", MODEL_TIMEOUT) from exc
        except (httpx.TransportError, aiohttp.ClientError) as exc:  # the model process is restarting or gone
            log.error("model service unreachable: %r", exc)
            raise ApiError(503, "model_unavailable", MODEL_GONE, retry_after_s) from exc
        return from_npy(out) if isinstance(out, bytes | bytearray | memoryview) else np.asarray(out)

    return call
