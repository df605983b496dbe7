"""The declared schema of a trace's ``meta.json`` (pydantic).

Types, physical ranges, enums and cross-field rules.
:func:`llamatier.trace.reader.read_trace_meta` checks a file against :class:`TraceMeta`
and gives a one-line error naming the file, the field and the rule. Keys the schema
does not declare are kept where a section is open to additions (``model.extra``,
``system_info``, ``machine``, ``capture``, what newer writers add at the top level).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, Field, field_validator, model_validator

from llamatier.errors import LlamatierError
from llamatier.kvtypes import KV_TYPES, kv_type
from llamatier.model import KVGeometry, ModelInfo
from llamatier.schema import MAX_BYTES, Count, Open, Positive, Strict
from llamatier.trace.format import chunk_name

_MAX_LAYERS = 4096
_MAX_CTX = 1 << 31  # positions are stored as uint32
_SHA256 = Annotated[str, Field(pattern=r"^[0-9a-f]{64}$")]


class GeometryMeta(Strict):
    """Per-layer KV shape (``model.geometry``)."""

    n_layers: Annotated[int, Field(ge=1, le=_MAX_LAYERS)]
    n_head_kv: list[Annotated[int, Field(ge=0, le=65536)]]
    head_dim_k: list[Annotated[int, Field(ge=1, le=65536)]]
    head_dim_v: list[Annotated[int, Field(ge=1, le=65536)]]
    sliding_window: list[Annotated[int, Field(ge=0, le=_MAX_CTX)]]
    label: str = ""

    @model_validator(mode="after")
    def _per_layer(self) -> GeometryMeta:
        for name in ("n_head_kv", "head_dim_k", "head_dim_v", "sliding_window"):
            n = len(getattr(self, name))
            if n != self.n_layers:
                raise ValueError(f"{name} has {n} entries for n_layers {self.n_layers}: one per layer")
        if not any(self.n_head_kv):
            raise ValueError("n_head_kv is 0 on every layer: a model with no KV heads has no KV cache")
        return self


class ModelMeta(Open):
    """What the GGUF header said about the traced model (``model``)."""

    path: str
    name: str
    architecture: str
    file_type: str
    n_layers: Annotated[int, Field(ge=1, le=_MAX_LAYERS)]
    n_embd: Positive
    n_head: Positive
    n_ff: Count
    n_vocab: Count
    n_ctx_train: Annotated[int, Field(ge=0, le=_MAX_CTX)]
    weight_bytes: Annotated[int, Field(ge=1, le=MAX_BYTES)]
    n_params: Annotated[int, Field(ge=1, le=MAX_BYTES)]
    geometry: GeometryMeta
    swa_source: str = "none"
    extra: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _layers_match(self) -> ModelMeta:
        if self.geometry.n_layers != self.n_layers:
            raise ValueError(
                f"n_layers is {self.n_layers} but geometry.n_layers is {self.geometry.n_layers}: they must agree"
            )
        bits = 8 * self.weight_bytes / self.n_params
        if not 1 <= bits <= 64:
            raise ValueError(
                f"weight_bytes {self.weight_bytes} for n_params {self.n_params} is {bits:.3g} bits per "
                "parameter; GGUF weights take 1 to 64"
            )
        return self

    def to_model_info(self) -> ModelInfo:
        g = self.geometry
        geometry = KVGeometry(
            n_layers=g.n_layers,
            n_head_kv=tuple(g.n_head_kv),
            head_dim_k=tuple(g.head_dim_k),
            head_dim_v=tuple(g.head_dim_v),
            sliding_window=tuple(g.sliding_window),
            label=g.label,
        )
        names = [f for f in type(self).model_fields if f != "geometry"]
        return ModelInfo(geometry=geometry, **{f: getattr(self, f) for f in names})


KVTypeName = Literal[tuple(KV_TYPES)]  # type: ignore[valid-type]


class ContextMeta(Open):
    """How llama.cpp ran (``context``)."""

    n_ctx: Annotated[int, Field(ge=1, le=_MAX_CTX)]
    n_batch: Annotated[int, Field(ge=1, le=_MAX_CTX)]
    n_ubatch: Annotated[int, Field(ge=1, le=_MAX_CTX)]
    n_threads: Annotated[int, Field(ge=1, le=65536)]
    type_k: KVTypeName
    type_v: KVTypeName
    n_predict: Annotated[int, Field(ge=0, le=_MAX_CTX)]
    n_prompt_tokens: Annotated[int, Field(ge=0, le=_MAX_CTX)]
    n_ctx_requested: Annotated[int, Field(ge=1, le=_MAX_CTX)] | None = None
    flash_attn: bool = False
    swa_full: bool = True
    offload_kqv: bool = True
    n_gpu_layers: int = 0
    seed: int = 0
    temperature: Annotated[float, Field(ge=0, le=1e6)] = 0.0
    top_k: Count = 0
    stop_at_eos: bool = False
    kv_bytes_per_token: Annotated[int, Field(ge=0, le=MAX_BYTES)] | None = None
    kv_cache_bytes: Annotated[int, Field(ge=0, le=MAX_BYTES)] | None = None

    @field_validator("type_k", "type_v", mode="before")
    @classmethod
    def _lower(cls, v: Any) -> Any:
        return v.strip().lower() if isinstance(v, str) else v

    @model_validator(mode="after")
    def _fits(self) -> ContextMeta:
        if self.n_prompt_tokens > self.n_ctx:
            raise ValueError(f"n_prompt_tokens {self.n_prompt_tokens} exceeds n_ctx {self.n_ctx}")
        return self


class CaptureMeta(Open):
    """How attention was captured (``capture``)."""

    enabled: bool
    positions: bool = False
    backend: str | None = None
    node: str | None = None
    reduction: str | None = None


class PromptMeta(Open):
    """Where the prompt came from (``prompt``); the text itself is not stored."""

    source: str
    sha256: _SHA256
    n_tokens: Count
    preview: str = ""


class MachineMeta(Open):
    """The host that ran the trace (``machine``)."""

    cpu: str = ""
    machine: str = ""
    cores_online: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    cores_usable: Annotated[int, Field(ge=0, le=1 << 20)] | None = None
    ram_bytes: Annotated[int, Field(ge=0, le=MAX_BYTES)] | None = None
    os: str = ""
    python: str = ""
    hostname: str = ""


class RepackMeta(Open):
    """llama.cpp's CPU weight repacking for the run (``engine.repack``)."""

    use_extra_bufts: bool
    source: str = ""
    reason: str = ""
    extra_buffer_types: list[str] = Field(default_factory=list)
    model_buffers_mib: dict[str, Annotated[float, Field(ge=0, le=1e12)]] = Field(default_factory=dict)


class EngineMeta(Open):
    """The engine that ran the model (``engine``)."""

    name: str
    repack: RepackMeta | None = None


def _utc(value: Any) -> Any:
    if isinstance(value, str):
        try:
            _dt.datetime.fromisoformat(value)
        except ValueError:
            raise ValueError(f"must be an ISO 8601 time such as 2026-01-31T12:00:00+00:00 (got {value[:40]!r})") from None
    return value


IsoTime = Annotated[str, AfterValidator(_utc)]


class FileRecord(Strict):
    """One Parquet file of a chunk: name, rows, size and SHA-256 of its bytes."""

    name: str
    rows: Count
    bytes: Count
    sha256: _SHA256


class ChunkRecord(Strict):
    """Chunk ``index``: steps ``[first_step, first_step + n_steps)`` and its files."""

    index: Count
    first_step: Count
    n_steps: Positive
    files: dict[Literal["steps", "attn", "positions"], FileRecord]

    @model_validator(mode="after")
    def _files(self) -> ChunkRecord:
        for table in ("steps", "attn"):
            if table not in self.files:
                raise ValueError(f"chunk {self.index} lists no {table} file")
        for table, rec in self.files.items():
            if rec.name != chunk_name(table, self.index):
                raise ValueError(f"chunk {self.index}'s {table} file is named {rec.name!r}, not {chunk_name(table, self.index)!r}")
        if self.files["steps"].rows != self.n_steps:
            raise ValueError(f"chunk {self.index} covers {self.n_steps} steps but its steps file has {self.files['steps'].rows} rows")
        return self


class TraceMeta(Open):
    """``meta.json`` of a trace directory, format v2."""

    format: Literal["llamatier-trace"]
    version: Literal[2]
    complete: bool
    interrupted: bool
    error: str | None
    n_steps: Count
    n_chunks: Count
    chunk_steps: Annotated[int, Field(ge=1, le=_MAX_CTX)]
    block_tokens: Annotated[int, Field(ge=1, le=1 << 20)]
    command: str = ""
    created_utc: IsoTime | None = None
    finished_utc: IsoTime | None = None
    model: ModelMeta
    context: ContextMeta
    capture: CaptureMeta
    prompt: PromptMeta | None = None
    engine: EngineMeta | None = None
    machine: MachineMeta | None = None
    system_info: str | None = None
    llama_cpp_python_version: str | None = None
    capture_reduce_s: Annotated[float, Field(ge=0, le=1e9)] | None = None
    chunks: list[ChunkRecord]
    meta_sha256: _SHA256

    @model_validator(mode="after")
    def _consistent(self) -> TraceMeta:
        if self.complete and (self.interrupted or self.error is not None):
            raise ValueError("complete is true but the run is also marked interrupted or failed")
        if self.n_chunks != len(self.chunks):
            raise ValueError(f"n_chunks is {self.n_chunks} but {len(self.chunks)} chunks are listed")
        step = 0
        for i, c in enumerate(self.chunks):
            if c.index != i or c.first_step != step:
                raise ValueError(
                    f"chunks[{i}] covers steps from {c.first_step} (index {c.index}); chunk {i} must start at "
                    f"step {step}: the chunk step ranges must be contiguous"
                )
            if c.n_steps > self.chunk_steps:
                raise ValueError(f"chunks[{i}] holds {c.n_steps} steps, more than chunk_steps {self.chunk_steps}")
            if ("positions" in c.files) != self.capture.positions:
                raise ValueError(f"chunks[{i}]: a positions file is listed iff capture.positions is true")
            step += c.n_steps
        if step != self.n_steps:
            raise ValueError(f"n_steps is {self.n_steps} but the chunks cover {step} steps")
        if self.complete and self.n_steps == 0:
            raise ValueError("complete is true but the trace holds no step")
        c = self.context
        try:
            bpt = self.model.to_model_info().geometry.bytes_per_token(kv_type(c.type_k), kv_type(c.type_v))
        except LlamatierError as exc:
            raise ValueError(f"context.type_k/type_v do not fit the geometry: {exc}") from None
        if c.kv_bytes_per_token is not None and c.kv_bytes_per_token != bpt:
            raise ValueError(
                f"context.kv_bytes_per_token is {c.kv_bytes_per_token} but the geometry and KV types give {bpt}"
            )
        if c.kv_cache_bytes is not None and c.kv_cache_bytes != bpt * c.n_ctx:
            raise ValueError(f"context.kv_cache_bytes is {c.kv_cache_bytes}, not {bpt} bytes per token x n_ctx {c.n_ctx}")
        if self.prompt is not None and self.prompt.n_tokens != c.n_prompt_tokens:
            raise ValueError(
                f"prompt.n_tokens is {self.prompt.n_tokens} but context.n_prompt_tokens is {c.n_prompt_tokens}"
            )
        return self


def meta_digest(meta: dict[str, Any]) -> str:
    """SHA-256 of ``meta`` without its ``meta_sha256`` key, over canonical JSON."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def seal(meta: dict[str, Any]) -> dict[str, Any]:
    """``meta`` with ``meta_sha256`` set to its digest (what the writer stores)."""
    out = dict(meta)
    out["meta_sha256"] = meta_digest(out)
    return out
