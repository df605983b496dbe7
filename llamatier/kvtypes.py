"""KV cache element types exactly as GGUF/ggml define them.

Every size computation in llamatier goes through this table. ggml stores a
quantized row as ``n_elements / block_elements`` blocks of ``block_bytes``
bytes each (``ggml_row_size``). A test checks the table against the
``ggml_type_size`` / ``ggml_blck_size`` of the llama.cpp that is installed.
"""

from __future__ import annotations

from dataclasses import dataclass

from llamatier.errors import LlamatierError


@dataclass(frozen=True)
class KVType:
    """One ggml tensor type usable for the K or V cache."""

    name: str
    ggml_id: int  # enum ggml_type value
    block_elements: int  # ggml_blck_size
    block_bytes: int  # ggml_type_size
    quantized: bool

    @property
    def bits_per_element(self) -> float:
        return 8.0 * self.block_bytes / self.block_elements

    def row_bytes(self, n_elements: int) -> int:
        """Bytes of one row of ``n_elements`` (ggml_row_size); must be a whole number of blocks."""
        if n_elements % self.block_elements:
            raise LlamatierError(
                f"KV row of {n_elements} elements is not a multiple of {self.name}'s block of "
                f"{self.block_elements}; llama.cpp cannot use {self.name} for this model's KV"
            )
        return n_elements // self.block_elements * self.block_bytes

    def saving_vs(self, other: KVType) -> float:
        """Fraction of storage saved relative to ``other`` (0.71875 for q4_0 vs f16)."""
        return 1.0 - self.bits_per_element / other.bits_per_element


# enum ggml_type values and block layouts from ggml.h / ggml-common.h.
KV_TYPES: dict[str, KVType] = {
    t.name: t
    for t in (
        KVType("f32", 0, 1, 4, False),
        KVType("f16", 1, 1, 2, False),
        KVType("bf16", 30, 1, 2, False),
        KVType("q8_0", 8, 32, 34, True),  # f16 scale + 32 x int8
        KVType("q4_0", 2, 32, 18, True),  # f16 scale + 32 x 4 bit
        KVType("q4_1", 3, 32, 20, True),  # f16 scale + f16 min + 32 x 4 bit
        KVType("q5_0", 6, 32, 22, True),  # f16 scale + 32 high bits + 32 x 4 bit
        KVType("q5_1", 7, 32, 24, True),  # f16 scale + f16 min + high bits + 32 x 4 bit
        KVType("iq4_nl", 20, 32, 18, True),  # f16 scale + 32 x 4-bit non-linear index
    )
}


def kv_type(name: str) -> KVType:
    """Look up a KV type by its llama.cpp name (case-insensitive); error lists valid names."""
    key = str(name).strip().lower()
    if key not in KV_TYPES:
        raise LlamatierError(
            f"unknown KV type {name!r}: valid types are {', '.join(KV_TYPES)}"
        )
    return KV_TYPES[key]


def parse_kv_pair(text: str) -> tuple[KVType, KVType]:
    """Parse 'q8_0/f16' (K/V) or 'q8_0' (same for both)."""
    parts = str(text).split("/")
    if len(parts) == 1:
        t = kv_type(parts[0])
        return t, t
    if len(parts) == 2:
        return kv_type(parts[0]), kv_type(parts[1])
    raise LlamatierError(f"invalid KV type pair {text!r}: write K/V, e.g. q8_0/f16, or one type for both")
