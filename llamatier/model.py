"""Model metadata and KV geometry read from a GGUF header (via the ``gguf`` package).

Nothing here loads weights: the header tells layers, KV heads, head dims,
sliding-window layout, weight bytes and file type.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from llamatier.errors import ModelLoadError
from llamatier.kvtypes import KVType

GGUF_MAGIC = b"GGUF"

# llama.cpp's hard-coded sliding-window patterns (llama-model.cpp, set_swa_pattern)
# for architectures whose GGUF may not carry `<arch>.attention.sliding_window_pattern`.
_DEFAULT_SWA_PATTERN = {"gemma3": 6, "gemma2": 2, "cohere2": 4, "gemma3n": 5}


@dataclass(frozen=True)
class KVGeometry:
    """Per-layer KV shape: what one token's K and V occupy in each layer."""

    n_layers: int
    n_head_kv: tuple[int, ...]
    head_dim_k: tuple[int, ...]
    head_dim_v: tuple[int, ...]
    # 0 = global (full) attention; >0 = sliding window of that many tokens.
    sliding_window: tuple[int, ...]
    label: str = ""

    def __post_init__(self) -> None:
        for name in ("n_head_kv", "head_dim_k", "head_dim_v", "sliding_window"):
            if len(getattr(self, name)) != self.n_layers:
                raise ValueError(f"{name} must have one entry per layer ({self.n_layers})")

    @staticmethod
    def uniform(
        n_layers: int,
        n_head_kv: int,
        head_dim: int,
        *,
        head_dim_v: int | None = None,
        sliding_window: int = 0,
        swa_layers: tuple[bool, ...] | None = None,
        label: str = "",
    ) -> KVGeometry:
        swa = swa_layers if swa_layers is not None else (False,) * n_layers
        return KVGeometry(
            n_layers=n_layers,
            n_head_kv=(n_head_kv,) * n_layers,
            head_dim_k=(head_dim,) * n_layers,
            head_dim_v=((head_dim_v or head_dim),) * n_layers,
            sliding_window=tuple(sliding_window if s else 0 for s in swa),
            label=label,
        )

    def k_elements_per_token(self, layer: int) -> int:
        return self.n_head_kv[layer] * self.head_dim_k[layer]

    def v_elements_per_token(self, layer: int) -> int:
        return self.n_head_kv[layer] * self.head_dim_v[layer]

    def layer_bytes_per_token(self, layer: int, type_k: KVType, type_v: KVType) -> int:
        """Bytes one token's K+V take in one layer (ggml_row_size of each)."""
        return type_k.row_bytes(self.k_elements_per_token(layer)) + type_v.row_bytes(
            self.v_elements_per_token(layer)
        )

    def bytes_per_token(self, type_k: KVType, type_v: KVType) -> int:
        """Bytes one token's K+V take across all layers."""
        return sum(self.layer_bytes_per_token(i, type_k, type_v) for i in range(self.n_layers))

    @property
    def swa_layers(self) -> tuple[bool, ...]:
        return tuple(w > 0 for w in self.sliding_window)


@dataclass(frozen=True)
class ModelInfo:
    """What the GGUF header says about a model."""

    path: str
    name: str
    architecture: str
    file_type: str
    n_layers: int
    n_embd: int
    n_head: int
    n_ff: int
    n_vocab: int
    n_ctx_train: int
    weight_bytes: int
    n_params: int
    geometry: KVGeometry
    swa_source: str = "none"
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @staticmethod
    def from_dict(d: dict[str, Any]) -> ModelInfo:
        g = dict(d["geometry"])
        for k in ("n_head_kv", "head_dim_k", "head_dim_v", "sliding_window"):
            g[k] = tuple(g[k])
        dd = dict(d)
        dd["geometry"] = KVGeometry(**g)
        return ModelInfo(**dd)


def _field_value(header: Any, key: str) -> Any:
    return header.fields.get(key)


def _per_layer(value: Any, n_layers: int, default: int) -> tuple[int, ...]:
    if value is None:
        return (default,) * n_layers
    if isinstance(value, list | tuple):
        if len(value) != n_layers:
            raise ModelLoadError(f"GGUF per-layer array has {len(value)} entries for {n_layers} layers")
        return tuple(int(x) for x in value)
    return (int(value),) * n_layers


def read_model_info(path: str | Path) -> ModelInfo:
    """Read model metadata from a GGUF file header; raise ModelLoadError with a fix if it is not one."""
    p = Path(path)
    if not p.exists():
        raise ModelLoadError(f"model file not found: {p} (give the path to a .gguf file)")
    if p.is_dir():
        raise ModelLoadError(f"{p} is a directory, not a GGUF model file (give the path to a .gguf file)")
    try:
        with p.open("rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelLoadError(f"cannot read model file {p}: {exc.strerror or exc} (check its permissions)") from None
    if magic != GGUF_MAGIC:
        raise ModelLoadError(
            f"{p} is not a GGUF file (starts with {magic!r}, expected b'GGUF'); convert the model "
            "with llama.cpp's convert_hf_to_gguf.py"
        )
    try:
        from llamatier.gguf_header import read_gguf_header

        reader = read_gguf_header(p)
    except Exception:  # truncated or corrupt header
        raise ModelLoadError(
            f"cannot read the GGUF header of {p}: the file is truncated or corrupt (copy or convert it again)"
        ) from None

    arch = _field_value(reader, "general.architecture")
    if not arch:
        raise ModelLoadError(f"{p} has no general.architecture key; it is not a model GGUF")
    arch = str(arch)

    def key(k: str) -> Any:
        return _field_value(reader, f"{arch}.{k}")

    n_layers = int(key("block_count") or 0)
    n_embd = int(key("embedding_length") or 0)
    n_head_raw = key("attention.head_count")
    n_head = int(max(n_head_raw) if isinstance(n_head_raw, list) else (n_head_raw or 0))
    if n_layers <= 0 or n_embd <= 0 or n_head <= 0:
        raise ModelLoadError(f"{p} lacks {arch}.block_count/embedding_length/attention.head_count")
    n_head_kv = _per_layer(key("attention.head_count_kv"), n_layers, n_head)
    default_hd = n_embd // n_head
    hd_k = int(key("attention.key_length") or default_hd)
    hd_v = int(key("attention.value_length") or default_hd)

    window = int(key("attention.sliding_window") or 0)
    pattern = key("attention.sliding_window_pattern")
    swa_source = "none"
    swa = [False] * n_layers
    if window > 0:
        if isinstance(pattern, list):
            swa = [bool(x) for x in pattern][:n_layers]
            swa_source = f"{arch}.attention.sliding_window_pattern (per-layer array)"
        else:
            n = int(pattern) if pattern is not None else _DEFAULT_SWA_PATTERN.get(arch, 0)
            if pattern is not None:
                swa_source = f"{arch}.attention.sliding_window_pattern = {n}"
            elif n:
                swa_source = f"llama.cpp default pattern {n} for {arch}"
            else:
                swa_source = f"{arch}.attention.sliding_window without pattern: all layers windowed"
            # llama.cpp set_swa_pattern(n): layer il is windowed iff il % n < n - 1 (n=0: all).
            swa = [n == 0 or (il % n) < (n - 1) for il in range(n_layers)]

    geometry = KVGeometry(
        n_layers=n_layers,
        n_head_kv=n_head_kv,
        head_dim_k=(hd_k,) * n_layers,
        head_dim_v=(hd_v,) * n_layers,
        sliding_window=tuple(window if s else 0 for s in swa),
        label=str(_field_value(reader, "general.name") or p.stem),
    )

    weight_bytes = int(sum(int(t.n_bytes) for t in reader.tensors))
    n_params = int(sum(int(t.n_elements) for t in reader.tensors))
    ftype_raw = _field_value(reader, "general.file_type")
    file_type = "unknown"
    if ftype_raw is not None:
        try:
            from gguf import LlamaFileType

            file_type = LlamaFileType(int(ftype_raw)).name.removeprefix("MOSTLY_")
        except Exception:
            file_type = str(ftype_raw)
    tokens = _field_value(reader, "tokenizer.ggml.tokens")
    n_vocab = int(key("vocab_size") or (len(tokens) if tokens is not None else 0))
    return ModelInfo(
        path=str(p),
        name=str(_field_value(reader, "general.name") or p.stem),
        architecture=arch,
        file_type=file_type,
        n_layers=n_layers,
        n_embd=n_embd,
        n_head=n_head,
        n_ff=int(_max_or(key("feed_forward_length"))),
        n_vocab=n_vocab,
        n_ctx_train=int(key("context_length") or 0),
        weight_bytes=weight_bytes,
        n_params=n_params,
        geometry=geometry,
        swa_source=swa_source,
    )


def _max_or(v: Any) -> int:
    if v is None:
        return 0
    if isinstance(v, list | tuple):
        return int(max(v)) if v else 0
    return int(v)
