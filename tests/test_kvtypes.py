"""The KV type table against ggml itself, and the exact storage figures it gives."""

from __future__ import annotations

import ctypes

import pytest

from llamatier.errors import LlamatierError
from llamatier.kvtypes import KV_TYPES, kv_type, parse_kv_pair
from llamatier.model import KVGeometry


@pytest.fixture(scope="module")
def ggml():
    """ggml functions resolved through the library handle llama.cpp itself uses (docs/llamacpp.md)."""
    from llama_cpp import llama_cpp as low

    lib = low._lib
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_type_name.argtypes = [ctypes.c_int]
    lib.ggml_type_name.restype = ctypes.c_char_p
    lib.ggml_is_quantized.argtypes = [ctypes.c_int]
    lib.ggml_is_quantized.restype = ctypes.c_bool
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    lib.ggml_row_size.restype = ctypes.c_size_t
    return lib


@pytest.mark.parametrize("name", list(KV_TYPES))
def test_table_matches_ggml(ggml, name: str) -> None:
    t = KV_TYPES[name]
    assert ggml.ggml_type_name(t.ggml_id).decode() == t.name
    assert ggml.ggml_blck_size(t.ggml_id) == t.block_elements
    assert ggml.ggml_type_size(t.ggml_id) == t.block_bytes
    assert ggml.ggml_is_quantized(t.ggml_id) == t.quantized
    for n in (32, 256, 1024, 4096 + 64):
        assert ggml.ggml_row_size(t.ggml_id, n) == t.row_bytes(n)


def test_table_has_every_type_llama_cpp_accepts_for_kv() -> None:
    assert set(KV_TYPES) == {"f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "q5_0", "q5_1", "iq4_nl"}


def test_exact_storage_figures() -> None:
    f16 = kv_type("f16")
    q4_0 = kv_type("q4_0")
    assert q4_0.bits_per_element == 4.5
    assert q4_0.saving_vs(f16) == 0.71875  # 71.875 % less than f16, not 75 %
    expected_bits = {"f32": 32, "f16": 16, "bf16": 16, "q8_0": 8.5, "q5_1": 6, "q5_0": 5.5,
                     "q4_1": 5, "q4_0": 4.5, "iq4_nl": 4.5}
    assert {n: t.bits_per_element for n, t in KV_TYPES.items()} == expected_bits
    assert kv_type("q8_0").saving_vs(f16) == 0.46875
    # one Gemma 3 270M token: 18 layers x (K 256 + V 256) elements, one KV head
    gemma = KVGeometry.uniform(18, 1, 256)
    assert gemma.bytes_per_token(f16, f16) == 18 * 2 * 256 * 2
    assert gemma.bytes_per_token(q4_0, q4_0) == 18 * 2 * 8 * 18


def test_row_not_whole_blocks_is_a_clear_error() -> None:
    with pytest.raises(LlamatierError, match="not a multiple of q4_0's block of 32"):
        kv_type("q4_0").row_bytes(16)
    assert kv_type("f16").row_bytes(16) == 32


def test_unknown_type_lists_valid_names() -> None:
    with pytest.raises(LlamatierError) as err:
        kv_type("q7_0")
    msg = str(err.value)
    assert "q7_0" in msg and "\n" not in msg
    for name in KV_TYPES:
        assert name in msg


def test_pairs() -> None:
    assert parse_kv_pair("q8_0/f16") == (kv_type("q8_0"), kv_type("f16"))
    assert parse_kv_pair("Q4_0") == (kv_type("q4_0"), kv_type("q4_0"))
    with pytest.raises(LlamatierError, match="K/V"):
        parse_kv_pair("q8_0/f16/f16")
