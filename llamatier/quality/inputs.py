"""What a quality run reads before it measures: the evaluation text, K/V type pairs and their storage.

Every check here fails with one line naming the problem and the fix, before a
model is loaded.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from llamatier import userfiles
from llamatier.errors import LlamatierError
from llamatier.kvtypes import KV_TYPES, KVType, kv_type, parse_kv_pair
from llamatier.model import KVGeometry

DEFAULT_TEXT_NAME = "quality_text.txt"

KVPairSpec = str | Sequence[str | tuple[KVType, KVType]]


def default_text() -> str:
    """The built-in evaluation text shipped with llamatier (varied English, ~1,000 tokens)."""
    return resources.files("llamatier").joinpath("data", DEFAULT_TEXT_NAME).read_text("utf-8")


def read_text_file(path: str | Path) -> str:
    """Read the user's evaluation text; one-line errors when it is missing or unreadable."""
    return userfiles.read_text_file(path, what="text file", give="a UTF-8 text file to --text-file")


def parse_kv_pairs(spec: KVPairSpec) -> list[tuple[KVType, KVType]]:
    """Parse 'f16,q8_0,q8_0/f16' (or a list of entries or (K, V) tuples) into unique pairs, in order."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    pairs: list[tuple[KVType, KVType]] = []
    for item in items:
        if isinstance(item, tuple):
            pair = (kv_type(item[0].name if isinstance(item[0], KVType) else item[0]),
                    kv_type(item[1].name if isinstance(item[1], KVType) else item[1]))
        elif not str(item).strip():
            continue
        else:
            pair = parse_kv_pair(str(item).strip())
        if pair not in pairs:
            pairs.append(pair)
    if not pairs:
        raise LlamatierError(
            f"no KV types given: list types or K/V pairs, e.g. f16,q8_0,q4_0/f16 (valid types: {', '.join(KV_TYPES)})"
        )
    return pairs


def pair_name(type_k: KVType, type_v: KVType) -> str:
    return f"{type_k.name}/{type_v.name}"


def check_pair_fits(geometry: KVGeometry, type_k: KVType, type_v: KVType, *, flash_attn: bool) -> None:
    """Raise a one-line error if llama.cpp cannot store this model's KV in this pair."""
    for what, t, dims in (("K", type_k, geometry.head_dim_k), ("V", type_v, geometry.head_dim_v)):
        bad = sorted({d for d in dims if d % t.block_elements})
        if bad:
            raise LlamatierError(
                f"{what} cache type {t.name} stores blocks of {t.block_elements} elements but this "
                f"model's {what} head dim is {bad[0]}, not a multiple of {t.block_elements}: "
                f"use f16, bf16 or f32 for {what} on this model"
            )
    if type_v.quantized and not flash_attn:
        raise LlamatierError(
            f"quantized V cache ({type_v.name}) needs flash attention in llama.cpp: run with flash "
            "attention on (drop --no-flash-attn), or use f16 for V"
        )


def pair_storage(geometry: KVGeometry, type_k: KVType, type_v: KVType) -> tuple[float, float, int]:
    """(bits per element, saving vs f16/f16, bytes per token) for a pair on this geometry."""
    f16 = KV_TYPES["f16"]
    n_elements = sum(
        geometry.k_elements_per_token(i) + geometry.v_elements_per_token(i)
        for i in range(geometry.n_layers)
    )
    nbytes = geometry.bytes_per_token(type_k, type_v)
    ref_bytes = geometry.bytes_per_token(f16, f16)
    return 8.0 * nbytes / n_elements, 1.0 - nbytes / ref_bytes, nbytes


def trace_prompt_text(trace: Any, prompt_file: str | Path | None = None) -> str:
    """The exact prompt a trace was recorded with, checked against the sha256 in its meta.json.

    Built-in prompts are found by name, a ``file:PATH`` prompt at PATH when it still
    exists; otherwise (or for a prompt given as an argument) pass ``prompt_file``.
    """
    from llamatier.demo import builtin_prompt, read_prompt_file

    prompt = dict(trace.meta.get("prompt") or {})
    want = prompt.get("sha256")
    source = str(prompt.get("source") or "")
    if prompt_file is not None:
        text, where = read_prompt_file(prompt_file), f"--prompt-file {prompt_file}"
    elif source.startswith("builtin:"):
        if source != "builtin:workload.txt":
            raise LlamatierError(f"the trace's prompt is {source!r}, which this llamatier does not ship; give --prompt-file")
        text, where = builtin_prompt(), source
    elif source.startswith("file:") and Path(source[5:]).is_file():
        text, where = read_prompt_file(source[5:]), source[5:]
    else:
        raise LlamatierError(
            f"the trace's prompt ({source or 'unknown source'}) is not stored in the trace: give the prompt text "
            "with --prompt-file (it is checked against the trace's sha256)"
        )
    if want and hashlib.sha256(text.encode()).hexdigest() != want:
        raise LlamatierError(
            f"the prompt from {where} is not the one the trace was recorded with (sha256 differs): "
            "give the exact prompt file with --prompt-file"
        )
    return text
