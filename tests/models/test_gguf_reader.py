"""Tests of the fast GGUF parser (models/gguf_reader.py) against gguf.GGUFReader.

gguf-py's reader is the reference: on the embedded SmolLM2 file and on files written here with
gguf.GGUFWriter (every value type, nested arrays, a custom alignment, big-endian), every metadata
key/value and every tensor's name, type, shape, offset and bytes must equal what it reads.
Malformed files (every truncation of a header, bad version/alignment/type codes) must raise
GGUFFormatError and nothing else.
"""

from __future__ import annotations

import pickle
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFEndian, GGUFReader, GGUFValueType, GGUFWriter
from gguf.quants import quantize

from turbollm.errors import ModelLoadError
from turbollm.models.gguf import arch_from_gguf, open_gguf
from turbollm.models.gguf_reader import GGUFFile, GGUFFormatError
from turbollm.models.loader import embedded_model_path

V = GGUFValueType


def _flatten(value: Any) -> Any:
    """gguf.ReaderField.contents() flattens nested arrays; do the same to compare."""
    if not isinstance(value, list) or not any(isinstance(v, list) for v in value):
        return value
    return [x for v in value for x in (_flatten(v) if isinstance(v, list) else [v])]


def _assert_same_as_gguf_reader(path: Path | str) -> GGUFFile:
    ours, ref = GGUFFile(path), GGUFReader(path)
    ref_fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}  # header words
    assert ours.version == int(ref.fields["GGUF.version"].parts[0][0])
    assert list(ours.fields) == list(ref_fields)  # same keys, same order
    for key, rf in ref_fields.items():
        f = ours.fields[key]
        assert f.key == key and f.type == rf.types[0], key
        want, got = rf.contents(), f.value()
        if f.type == V.ARRAY:
            assert f.item_type == rf.types[1] and f.count == int(rf.parts[4][0]), key
            got = _flatten(got)
            if f.item_type not in (V.STRING, V.ARRAY):
                assert f.array().dtype == rf.parts[rf.data[0]].dtype, key
        assert got == want, key
        got_items, want_items = (v if isinstance(v, list) else [v] for v in (got, want))
        assert [type(x) for x in got_items] == [type(x) for x in want_items], key
    assert (ours.alignment, ours.data_offset) == (ref.alignment, ref.data_offset)
    assert len(ours.tensors) == len(ref.tensors)
    for t, rt in zip(ours.tensors, ref.tensors, strict=True):
        assert (t.name, t.tensor_type) == (rt.name, rt.tensor_type)
        assert t.dims == tuple(int(n) for n in rt.shape) and t.shape == t.dims[::-1], t.name
        assert (t.n_elements, t.n_bytes, t.data_offset) == (rt.n_elements, rt.n_bytes, rt.data_offset)
        assert ours.get_tensor(t.name) is t
        data = t.data
        assert data.dtype == rt.data.dtype and data.shape == rt.data.shape, t.name
        assert data.tobytes() == rt.data.tobytes(), t.name
        assert not data.flags.writeable  # a view of the read-only map
    return ours


def _write(path: Path, fill: Callable[[GGUFWriter], None], **kwargs: Any) -> Path:
    w = GGUFWriter(str(path), "llama", **kwargs)
    fill(w)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _every_kind(w: GGUFWriter) -> None:
    """Every scalar type, arrays of each (strings with unicode, nested), tensors of many types."""
    w.add_uint8("t.u8", 255)
    w.add_int8("t.i8", -128)
    w.add_uint16("t.u16", 65535)
    w.add_int16("t.i16", -32768)
    w.add_uint32("t.u32", 2**32 - 1)
    w.add_int32("t.i32", -(2**31))
    w.add_uint64("t.u64", 2**64 - 1)
    w.add_int64("t.i64", -(2**63))
    w.add_float32("t.f32", 1e-5)
    w.add_float64("t.f64", -1.0 / 3.0)
    w.add_bool("t.true", True)
    w.add_bool("t.false", False)
    w.add_string("t.str", "héllo ✓ 世界")
    w.add_key_value("t.empty_str", "", V.STRING)
    w.add_array("t.strs", ["a", "", "ĠĠ", "<|im_start|>", "x" * 300, "🙂"])
    w.add_array("t.ints", [1, -2, 3])
    w.add_key_value("t.u8s", [0, 7, 255], V.ARRAY, sub_type=V.UINT8)
    w.add_key_value("t.i64s", [-(2**63), 2**62], V.ARRAY, sub_type=V.INT64)
    w.add_array("t.floats", [0.5, -1.25, 3e-8])
    w.add_key_value("t.f64s", [0.1, 0.2], V.ARRAY, sub_type=V.FLOAT64)
    w.add_array("t.bools", [True, False, True])
    w.add_array("t.nested", [[1, 2], [3, 4, 5]])
    w.add_array("t.nested_strs", [["a", "bc"], ["d"]])
    w.add_custom_alignment(64)
    rng = np.random.default_rng(0)
    w.add_tensor("f32", rng.standard_normal((3, 5)).astype(np.float32))
    w.add_tensor("f16_1d", rng.standard_normal(7).astype(np.float16))
    w.add_tensor("f64_3d", rng.standard_normal((2, 3, 4)))
    w.add_tensor("i32", np.arange(12, dtype=np.int32).reshape(4, 3))
    w.add_tensor("i8", np.arange(-4, 4, dtype=np.int8))
    for name, qtype in (("bf16", Q.BF16), ("q8_0", Q.Q8_0), ("q4_1", Q.Q4_1)):
        w.add_tensor(name, quantize(rng.standard_normal((2, 64)).astype(np.float32), qtype), raw_dtype=qtype)
    # gguf-py cannot quantize K-quants; any bytes do for the reader: 2 rows of 2 Q4_K blocks.
    w.add_tensor("q4_k", rng.integers(0, 256, (2, 2 * 144), dtype=np.uint8), raw_dtype=Q.Q4_K)


@pytest.mark.slow
def test_embedded_file_matches_gguf_reader() -> None:
    ours = _assert_same_as_gguf_reader(embedded_model_path())
    tokens = ours.fields["tokenizer.ggml.tokens"]
    assert (tokens.type, tokens.item_type, tokens.count) == (V.ARRAY, V.STRING, 49152)
    assert ours.fields["tokenizer.ggml.merges"].count == 48900
    assert ours.fields["tokenizer.ggml.token_type"].array().shape == (49152,)
    with pytest.raises(TypeError, match="not an array of numbers"):
        tokens.array()
    assert ours.get_tensor("token_embd.weight").shape == (49152, 576)
    assert ours.get_tensor("no.such.tensor") is None


@pytest.mark.slow
@pytest.mark.parametrize("endian", [GGUFEndian.LITTLE, GGUFEndian.BIG])
def test_written_file_matches_gguf_reader(endian: GGUFEndian, tmp_path: Path) -> None:
    path = _write(tmp_path / "all.gguf", _every_kind, endianess=endian)
    ours = _assert_same_as_gguf_reader(path)
    assert ours.endian == ("<" if endian == GGUFEndian.LITTLE else ">")
    assert ours.alignment == 64 and ours.data_offset % 64 == 0
    assert ours.fields["t.nested"].value() == [[1, 2], [3, 4, 5]]  # not flattened, unlike gguf-py
    assert ours.fields["t.nested_strs"].value() == [["a", "bc"], ["d"]]
    assert ours.fields["t.f32"].value() == float(np.float32(1e-5))
    assert np.array_equal(ours.get_tensor("i32").data, np.arange(12).reshape(4, 3))


def test_pickles_as_its_path(tmp_path: Path) -> None:
    path = _write(tmp_path / "all.gguf", _every_kind)
    ours = GGUFFile(path)
    clone = pickle.loads(pickle.dumps(ours))
    assert clone.path == ours.path and list(clone.fields) == list(ours.fields)
    assert [t.data.tobytes() for t in clone.tensors] == [t.data.tobytes() for t in ours.tensors]


def test_every_truncation_is_a_format_error(tmp_path: Path) -> None:
    full = _write(tmp_path / "all.gguf", _every_kind).read_bytes()
    ours = GGUFFile(tmp_path / "all.gguf")
    end_of_data = max(t.data_offset + t.n_bytes for t in ours.tensors)
    cut = tmp_path / "cut.gguf"
    for n in [*range(ours.data_offset + 1), *range(ours.data_offset, end_of_data, 37), end_of_data - 1]:
        cut.write_bytes(full[:n])
        with pytest.raises(GGUFFormatError):
            GGUFFile(cut)
    cut.write_bytes(full[:end_of_data])  # only the trailing padding is missing: still whole
    assert GGUFFile(cut).get_tensor("q4_k").data.tobytes() == ours.get_tensor("q4_k").data.tobytes()


def _gguf_bytes(kvs: list[bytes], tensors: list[bytes] = (), version: int = 3) -> bytes:
    """A hand-made GGUF header (kv pairs and tensor infos already encoded), padded to 32."""
    head = b"GGUF" + struct.pack("<IQQ", version, len(tensors), len(kvs)) + b"".join(kvs) + b"".join(tensors)
    return head + bytes(-len(head) % 32)


def _s(text: str | bytes) -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return _s(key) + struct.pack("<I", vtype) + payload


def _tensor(name: str, dims: tuple[int, ...], qtype: int, offset: int = 0) -> bytes:
    return _s(name) + struct.pack(f"<I{len(dims)}QIQ", len(dims), *dims, qtype, offset)


_MALFORMED = [
    (b"GGUX" + bytes(20), "bad magic"),
    (_gguf_bytes([], version=1), "unsupported GGUF version 1"),
    (_gguf_bytes([_kv("a", 13, b"")]), "13 is not a valid GGUFValueType"),
    (_gguf_bytes([_kv("a", V.ARRAY, struct.pack("<IQ", 99, 0))]), "99 is not a valid GGUFValueType"),
    (_gguf_bytes([_kv("a", V.UINT8, b"\1"), _kv("a", V.UINT8, b"\2")]), "duplicate metadata key 'a'"),
    (_gguf_bytes([_kv(b"\xff", V.UINT8, b"\1")]), "not valid UTF-8"),
    (_gguf_bytes([_kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 2**62))]), f"array of {2**62} strings"),
    (_gguf_bytes([_kv("a", V.ARRAY, struct.pack("<IQ", V.STRING, 1) + struct.pack("<Q", 2**40))]),
     "runs past the end"),
    (_gguf_bytes([_kv("general.alignment", V.UINT32, struct.pack("<I", 48))]), "not a power of two"),
    (_gguf_bytes([_kv("general.alignment", V.UINT64, struct.pack("<Q", 64))]), "must be a UINT32"),
    (_gguf_bytes([], [_tensor("t", (4, 4), 77)]), "77 is not a valid GGMLQuantizationType"),
    (_gguf_bytes([], [_tensor("t", (33,), Q.Q8_0)]), "not a multiple of the Q8_0 block"),
    (_gguf_bytes([], [_tensor("t", (4,), Q.F32)] * 2) + bytes(16), "duplicate tensor 't'"),
    (_gguf_bytes([], [_tensor("t", (4,), Q.F32)]) + bytes(15), "extends past the end"),
]


@pytest.mark.parametrize(("data", "needle"), _MALFORMED, ids=[needle for _, needle in _MALFORMED])
def test_malformed_headers(data: bytes, needle: str, tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(data)
    with pytest.raises(GGUFFormatError, match=re.escape(needle)):
        GGUFFile(path)


def test_hand_made_edge_cases(tmp_path: Path) -> None:
    path = tmp_path / "edge.gguf"
    data = _gguf_bytes(
        [_kv("empty", V.ARRAY, struct.pack("<IQ", V.STRING, 0)),
         _kv("bad_utf8", V.STRING, _s(b"\xff\xfe"))],
        [_tensor("scalar", (), Q.F32)],
    )
    path.write_bytes(data + struct.pack("<f", 2.5))
    ours = GGUFFile(path)
    assert ours.fields["empty"].value() == [] and ours.fields["empty"].count == 0
    with pytest.raises(GGUFFormatError, match="not valid UTF-8"):  # decoded on demand
        ours.fields["bad_utf8"].value()
    scalar = ours.get_tensor("scalar")
    assert scalar.dims == () and scalar.data.shape == () and float(scalar.data) == 2.5


def test_open_gguf_wraps_errors_in_model_load_error(tmp_path: Path) -> None:
    path = tmp_path / "bad.gguf"
    path.write_bytes(_gguf_bytes([], version=1))
    with pytest.raises(ModelLoadError, match=r"corrupt GGUF file .*bad\.gguf: unsupported GGUF version 1"):
        open_gguf(str(path))
    path.write_bytes(_gguf_bytes([_kv("general.architecture", V.STRING, _s(b"ll\xffama"))]))
    with pytest.raises(ModelLoadError, match=r"corrupt GGUF file .*key 'general\.architecture'.*UTF-8"):
        arch_from_gguf(open_gguf(str(path)), str(path))
