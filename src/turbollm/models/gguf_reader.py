"""A fast, read-only GGUF (v2/v3) parser: metadata and the tensor table, tensor data as views.

`gguf.GGUFReader` builds a numpy view for every element of every array at open, which costs
seconds on a tokenizer's 49k tokens and merges. `GGUFFile` walks the header with
`struct.unpack_from` over an `mmap` instead: scalars are decoded on demand, arrays only record
where they start (string arrays are skipped by walking their lengths, no per-item objects),
and tensor data is a `np.frombuffer` view created when `GGUFTensor.data` is read.

Layout (all integers in the file's byte order, little-endian unless the version word says
otherwise): magic 'GGUF', version u32, tensor_count u64, kv_count u64; kv pairs (key string,
value type u32, value); tensor infos (name string, n_dims u32, dims u64 × n_dims, ggml type
u32, offset u64); padding to `general.alignment` (default 32); the data section. A string is
u64 length + UTF-8 bytes; an array is item type u32, count u64, items.

Everything lives on the CPU and points into the memory map, which stays open while any field,
tensor or data view of the file is alive. Every malformed or truncated file raises
GGUFFormatError (a ValueError) at open, never halfway through reading tensors.
"""

from __future__ import annotations

import mmap
import os
import struct
from typing import Any

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

_V = GGUFValueType
_SCALAR_FORMATS: dict[GGUFValueType, str] = {
    _V.UINT8: "B", _V.INT8: "b", _V.UINT16: "H", _V.INT16: "h", _V.UINT32: "I", _V.INT32: "i",
    _V.FLOAT32: "f", _V.BOOL: "?", _V.UINT64: "Q", _V.INT64: "q", _V.FLOAT64: "d",
}
"""struct format (without byte order) of each fixed-size value type."""

_Q = GGMLQuantizationType
# Tensor types whose data is a plain numpy dtype (as gguf.GGUFReader gives them); all other
# types (BF16 and the quantized ones) are exposed as raw bytes, [..., row bytes] uint8.
_PLAIN_TENSOR_DTYPES: dict[GGMLQuantizationType, str] = {
    _Q.F32: "f4", _Q.F16: "f2", _Q.F64: "f8", _Q.I8: "i1", _Q.I16: "i2", _Q.I32: "i4", _Q.I64: "i8",
}


class GGUFFormatError(ValueError):
    """The file is not a well-formed GGUF v2/v3 file (bad header, truncated, inconsistent)."""


class GGUFField:
    """One metadata key/value. `type` is the value's GGUF type; for arrays `item_type` is the
    items' type (ARRAY for nested arrays) and `count` their number, else item_type is None and
    count is 1. The value is decoded from the memory map by `value()`/`array()` on each call.
    """

    __slots__ = ("key", "type", "item_type", "count", "_buf", "_endian", "_offset")

    def __init__(
        self, key: str, type: GGUFValueType, item_type: GGUFValueType | None, count: int,
        buf: mmap.mmap, endian: str, offset: int,
    ) -> None:
        self.key = key
        self.type = type
        self.item_type = item_type
        self.count = count
        self._buf = buf
        self._endian = endian
        self._offset = offset  # of the value (for arrays: of the first item)

    def value(self) -> Any:
        """The value as Python objects: int, float, bool, str, or a (nested) list of them.

        Raises GGUFFormatError for a string that is not valid UTF-8.
        """
        if self.type != _V.ARRAY:
            return _read_value(self._buf, self._offset, self.type, self._endian)[0]
        assert self.item_type is not None
        if self.item_type in _SCALAR_FORMATS:
            return self.array().tolist()
        out, off = [], self._offset
        for _ in range(self.count):
            item, off = _read_value(self._buf, off, self.item_type, self._endian)
            out.append(item)
        return out

    def array(self) -> np.ndarray:
        """A numeric array's items as a read-only numpy view into the file. [count]"""
        if self.item_type not in _SCALAR_FORMATS:
            raise TypeError(f"GGUF key {self.key!r} is not an array of numbers")
        dtype = np.dtype(self._endian + _SCALAR_FORMATS[self.item_type])
        return np.frombuffer(self._buf, dtype=dtype, count=self.count, offset=self._offset)

    def __repr__(self) -> str:
        item = f"[{self.item_type.name} × {self.count}]" if self.item_type is not None else ""
        return f"GGUFField({self.key!r}, {self.type.name}{item})"


class GGUFTensor:
    """One entry of the tensor table. `dims` is ggml's `ne` (innermost dimension first);
    `shape` is the numpy/torch order (its reverse). `data_offset` is absolute in the file.
    """

    __slots__ = ("name", "tensor_type", "dims", "n_elements", "n_bytes", "data_offset", "_buf", "_endian")

    def __init__(
        self, name: str, tensor_type: GGMLQuantizationType, dims: tuple[int, ...], data_offset: int,
        buf: mmap.mmap, endian: str,
    ) -> None:
        self.name = name
        self.tensor_type = tensor_type
        self.dims = dims
        self.n_elements = int(np.prod(dims, dtype=np.int64)) if dims else 1
        block_size, type_size = GGML_QUANT_SIZES[tensor_type]
        if self.n_elements % block_size or (dims and dims[0] % block_size):
            raise GGUFFormatError(
                f"tensor {name!r}: row size {dims[0] if dims else 1} is not a multiple of "
                f"the {tensor_type.name} block size {block_size}"
            )
        self.n_bytes = self.n_elements // block_size * type_size
        self.data_offset = data_offset
        self._buf = buf
        self._endian = endian

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's shape in numpy/torch order (outermost first)."""
        return tuple(reversed(self.dims))

    @property
    def data(self) -> np.ndarray:
        """A read-only view of the stored data, as gguf.GGUFReader gives it.

        F32/F16/F64/I8..I64: that dtype, in `shape`. Other types (BF16, quantized): uint8 bytes,
        [*shape[:-1], row bytes]. Feed it to gguf.quants.dequantize with `tensor_type`.
        """
        plain = _PLAIN_TENSOR_DTYPES.get(self.tensor_type)
        dtype = np.dtype(self._endian + plain if plain else "u1")
        count = self.n_elements if plain else self.n_bytes
        view = np.frombuffer(self._buf, dtype=dtype, count=count, offset=self.data_offset)
        shape = self.shape
        if not plain and shape:
            block_size, type_size = GGML_QUANT_SIZES[self.tensor_type]
            shape = (*shape[:-1], shape[-1] // block_size * type_size)  # [..., row bytes]
        return view.reshape(shape)

    def __repr__(self) -> str:
        return f"GGUFTensor({self.name!r}, {self.tensor_type.name}, shape={self.shape})"


class GGUFFile:
    """A GGUF file opened read-only through a memory map.

    `fields` maps each metadata key to its GGUFField (file order); `tensors` lists the tensor
    table in file order. Raises OSError if the file cannot be read and GGUFFormatError if it is
    not a well-formed GGUF v2/v3 file. Pickles as its path (the map is reopened on unpickle).
    """

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = os.fspath(path)
        with open(self.path, "rb") as f:
            if os.fstat(f.fileno()).st_size < 4:
                raise GGUFFormatError("file too short for a GGUF header")
            self._buf = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        self.fields: dict[str, GGUFField] = {}
        self.tensors: list[GGUFTensor] = []
        self._by_name: dict[str, GGUFTensor] = {}
        try:
            self._parse()
        except GGUFFormatError:
            raise
        except (struct.error, ValueError, OverflowError) as e:  # truncated; unknown type codes
            raise GGUFFormatError(str(e)) from e

    def get_tensor(self, name: str) -> GGUFTensor | None:
        """The tensor called `name`, or None."""
        return self._by_name.get(name)

    def __reduce__(self) -> tuple[type[GGUFFile], tuple[str]]:
        return GGUFFile, (self.path,)

    def _parse(self) -> None:
        buf = self._buf
        if buf[:4] != GGUF_MAGIC:
            raise GGUFFormatError(f"bad magic {buf[:4]!r}, expected {GGUF_MAGIC!r}")
        (version,) = struct.unpack_from("<I", buf, 4)
        # A file written on the other byte order has its version in the high half-word.
        self.endian = e = "<" if version & 0xFFFF else ">"
        (self.version,) = struct.unpack_from(e + "I", buf, 4)
        if self.version not in SUPPORTED_VERSIONS:
            raise GGUFFormatError(f"unsupported GGUF version {self.version}")
        tensor_count, kv_count = struct.unpack_from(e + "QQ", buf, 8)
        off = 24
        for _ in range(kv_count):
            key, off = _read_str(buf, off, e)
            if key in self.fields:
                raise GGUFFormatError(f"duplicate metadata key {key!r}")
            (raw_type,) = struct.unpack_from(e + "I", buf, off)
            vtype = GGUFValueType(raw_type)
            if vtype == _V.ARRAY:
                raw_item, count = struct.unpack_from(e + "IQ", buf, off + 4)
                item_type = GGUFValueType(raw_item)
                self.fields[key] = GGUFField(key, vtype, item_type, count, buf, e, off + 16)
                off = _skip_items(buf, off + 16, item_type, count, e)
            else:
                self.fields[key] = GGUFField(key, vtype, None, 1, buf, e, off + 4)
                off = _skip_items(buf, off + 4, vtype, 1, e)
        infos = []
        for _ in range(tensor_count):
            name, off = _read_str(buf, off, e)
            (n_dims,) = struct.unpack_from(e + "I", buf, off)
            dims = struct.unpack_from(f"{e}{n_dims}Q", buf, off + 4)
            off += 4 + 8 * n_dims
            raw_type, rel_offset = struct.unpack_from(e + "IQ", buf, off)
            off += 12
            infos.append((name, GGMLQuantizationType(raw_type), dims, rel_offset))
        self.alignment = self._alignment()
        self.data_offset = -(-off // self.alignment) * self.alignment  # next multiple
        for name, ttype, dims, rel_offset in infos:
            if name in self._by_name:
                raise GGUFFormatError(f"duplicate tensor {name!r}")
            t = GGUFTensor(name, ttype, dims, self.data_offset + rel_offset, buf, e)
            if t.data_offset + t.n_bytes > len(buf):
                raise GGUFFormatError(f"tensor {name!r} extends past the end of the file")
            self.tensors.append(t)
            self._by_name[name] = t

    def _alignment(self) -> int:
        field = self.fields.get("general.alignment")
        if field is None:
            return DEFAULT_ALIGNMENT
        if field.type != _V.UINT32:
            raise GGUFFormatError("general.alignment must be a UINT32")
        alignment = int(field.value())
        if alignment == 0 or alignment & (alignment - 1):
            raise GGUFFormatError(f"general.alignment {alignment} is not a power of two")
        return alignment


def _read_str(buf: mmap.mmap, off: int, e: str) -> tuple[str, int]:
    """The UTF-8 string at `off` and the offset after it."""
    (n,) = struct.unpack_from(e + "Q", buf, off)
    end = off + 8 + n
    if end > len(buf):
        raise GGUFFormatError(f"string at byte {off} runs past the end of the file")
    try:
        return buf[off + 8:end].decode("utf-8"), end
    except UnicodeDecodeError as err:
        raise GGUFFormatError(f"string at byte {off} is not valid UTF-8: {err}") from None


def _read_value(buf: mmap.mmap, off: int, vtype: GGUFValueType, e: str) -> tuple[Any, int]:
    """The value of type `vtype` at `off` as Python objects, and the offset after it."""
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        return struct.unpack_from(e + fmt, buf, off)[0], off + struct.calcsize(fmt)
    if vtype == _V.STRING:
        return _read_str(buf, off, e)
    raw_item, count = struct.unpack_from(e + "IQ", buf, off)  # an array nested in an array
    item_type, off = GGUFValueType(raw_item), off + 12
    out = []
    for _ in range(count):
        item, off = _read_value(buf, off, item_type, e)
        out.append(item)
    return out, off


def _skip_items(buf: mmap.mmap, off: int, vtype: GGUFValueType, count: int, e: str) -> int:
    """The offset just past `count` consecutive values of type `vtype` starting at `off`.

    Fixed-size items are skipped by arithmetic; strings by walking their u64 lengths in a
    tight loop (no str objects), which is what keeps a 49k-token vocabulary cheap.
    """
    size, start = len(buf), off
    fmt = _SCALAR_FORMATS.get(vtype)
    if fmt is not None:
        end = off + count * struct.calcsize(fmt)
    elif vtype == _V.STRING:
        if count * 8 > size - off:  # each string needs at least its length word
            raise GGUFFormatError(f"array of {count} strings at byte {off} runs past the end of the file")
        unpack_len = struct.Struct(e + "Q").unpack_from
        for _ in range(count):
            off += 8 + unpack_len(buf, off)[0]
        end = off
    else:  # nested arrays: rare (not written by llama.cpp), walked item by item
        if count * 12 > size - off:
            raise GGUFFormatError(f"array of {count} arrays at byte {off} runs past the end of the file")
        for _ in range(count):
            raw_item, n = struct.unpack_from(e + "IQ", buf, off)
            off = _skip_items(buf, off + 12, GGUFValueType(raw_item), n, e)
        end = off
    if end > size:
        raise GGUFFormatError(f"metadata value at byte {start} runs past the end of the file")
    return end
