"""Fast GGUF header reader: metadata and tensor infos without materialising large arrays.

``gguf.GGUFReader`` builds a numpy view for every element of every array,
which takes ~10 s on a 262k-token vocabulary (Gemma 3). llamatier only needs
the scalar keys, short per-layer arrays, array lengths and tensor sizes, so
this reader walks the header with ``struct`` and skips long arrays. Type
codes and block sizes come from the ``gguf`` package itself.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

_SCALAR = {
    GGUFValueType.UINT8: "<B",
    GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H",
    GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I",
    GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f",
    GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q",
    GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
MAX_DECODED_ARRAY = 4096  # longer arrays are kept as their length only


class GGUFHeaderError(ValueError):
    """The bytes are not a readable GGUF header."""


@dataclass(frozen=True)
class LongArray:
    """An array too long to decode (e.g. the vocabulary); only its length and item type."""

    length: int
    item_type: int

    def __len__(self) -> int:
        return self.length


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    ggml_type: int
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class GGUFHeader:
    version: int
    fields: dict[str, Any]
    tensors: tuple[TensorInfo, ...]


class _Cursor:
    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.buf = b""
        self.pos = 0

    def _need(self, n: int) -> None:
        if self.pos + n > len(self.buf):
            more = self.fh.read(max(n, 1 << 20))
            self.buf = self.buf[self.pos :] + more
            self.pos = 0
            if len(self.buf) < n:
                raise GGUFHeaderError("unexpected end of file inside the GGUF header")

    def unpack(self, fmt: str) -> Any:
        size = struct.calcsize(fmt)
        self._need(size)
        v = struct.unpack_from(fmt, self.buf, self.pos)[0]
        self.pos += size
        return v

    def string(self) -> str:
        n = self.unpack("<Q")
        if n > 1 << 30:
            raise GGUFHeaderError("implausible string length in the GGUF header")
        self._need(n)
        s = self.buf[self.pos : self.pos + n].decode("utf-8", "replace")
        self.pos += n
        return s

    def skip(self, n: int) -> None:
        self._need(n)
        self.pos += n


def _value(c: _Cursor, vtype: int) -> Any:
    if vtype == GGUFValueType.STRING:
        return c.string()
    if vtype == GGUFValueType.ARRAY:
        item = c.unpack("<I")
        n = c.unpack("<Q")
        if n > MAX_DECODED_ARRAY:
            if item == GGUFValueType.STRING:
                for _ in range(n):
                    c.skip(c.unpack("<Q"))
            elif item in _SCALAR:
                c.skip(n * struct.calcsize(_SCALAR[GGUFValueType(item)]))
            else:
                raise GGUFHeaderError(f"cannot skip a long array of type {item}")
            return LongArray(n, item)
        return [_value(c, item) for _ in range(n)]
    try:
        return c.unpack(_SCALAR[GGUFValueType(vtype)])
    except (KeyError, ValueError):
        raise GGUFHeaderError(f"unknown GGUF value type {vtype}") from None


def read_gguf_header(path: str | Path) -> GGUFHeader:
    """Read a GGUF file's metadata and tensor infos (version 2 or 3)."""
    with Path(path).open("rb") as fh:
        c = _Cursor(fh)
        c._need(4)
        if c.buf[:4] != b"GGUF":
            raise GGUFHeaderError("missing GGUF magic")
        c.pos = 4
        version = c.unpack("<I")
        if version not in (2, 3):
            raise GGUFHeaderError(f"unsupported GGUF version {version}")
        n_tensors = c.unpack("<Q")
        n_kv = c.unpack("<Q")
        fields: dict[str, Any] = {}
        for _ in range(n_kv):
            key = c.string()
            fields[key] = _value(c, c.unpack("<I"))
        tensors = []
        for _ in range(n_tensors):
            name = c.string()
            n_dims = c.unpack("<I")
            shape = tuple(c.unpack("<Q") for _ in range(n_dims))
            ttype = c.unpack("<I")
            c.unpack("<Q")  # data offset
            n_el = 1
            for d in shape:
                n_el *= d
            try:
                blk, tsize = GGML_QUANT_SIZES[GGMLQuantizationType(ttype)]
            except (KeyError, ValueError):
                raise GGUFHeaderError(f"tensor {name} has unknown ggml type {ttype}") from None
            tensors.append(TensorInfo(name, shape, ttype, n_el, n_el // blk * tsize))
    return GGUFHeader(version=version, fields=fields, tensors=tuple(tensors))
