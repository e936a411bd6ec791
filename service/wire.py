"""The pickle-free wire format of the hop between the API workers and the model service: one ``.npy`` body.

``bentoml.depends`` sends arguments between services with pickle, and its JSON alternative turns
arrays into lists of numbers (about 4x the bytes of a uint8 batch, and slow to parse). So the
model service's API declares :class:`NpyArray` as its input and output spec: the client sends the
array as raw NumPy ``.npy`` bytes (dtype and shape in a small header, then the data), the server
reads it back with ``allow_pickle=False`` and zero copies, and the model process's batcher
(``service/batching.py``) joins the arrays of several calls into one model batch.
"""

from __future__ import annotations

import io
import typing as t

import numpy as np

# Private: bentoml exports IODescriptor but not the root model its clients need for a raw-bytes body.
from _bentoml_sdk.io_models import IORootModel
from starlette.responses import Response

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
