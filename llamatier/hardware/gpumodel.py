"""GPU step-time model for llama.cpp's CUDA backend, calibrated on llama-bench measurements.

A step's time is a sum of physical work counts, each times one coefficient shared by
every GPU (the GPU enters only through its datasheet numbers)::

    t = sum_j x_j * c_j

| term          | work count x_j                                                      | coefficient c_j             |
|---------------|---------------------------------------------------------------------|-----------------------------|
| ``layer``     | GPU layers run by a llama_decode without CUDA graphs                | seconds per layer           |
| ``layer_graph``| GPU layers run by a decode step replayed as a CUDA graph           | seconds per layer           |
| ``weights``   | seconds to read the GPU's weights (and attended KV) at datasheet bandwidth | 1 / achieved fraction |
| ``dequant``   | seconds to write and read back an f16 copy of quantized weights at datasheet bandwidth (prefill on the cuBLAS path) | 1 / achieved fraction |
| ``matmul``    | seconds of prefill weight-matmul FLOPs at the FP16 tensor peak      | 1 / achieved fraction       |
| ``matmul_mmq``| seconds of prefill matmul FLOPs at the INT8 tensor peak (MMQ kernels)| 1 / achieved fraction      |
| ``matmul_dp4a``| seconds of prefill matmul FLOPs at the DP4A peak (no tensor cores) | 1 / achieved fraction       |
| ``attention`` | seconds of prefill attention FLOPs (Q·K and P·V over the attended cells) at the FP16 tensor peak (DP4A peak without tensor cores) | 1 / achieved fraction |
| ``split``     | layers whose attention runs on the host (``-nkvo``): one graph split each (copies, sync, CPU thread wake-up) | seconds per split |
| ``host_kv``   | bytes of KV the host attends in decode (``-nkvo``)                  | seconds per byte            |
| ``host_flops``| attention FLOPs the host computes in prefill (``-nkvo``)            | seconds per FLOP            |
| ``host_weights``| bytes of weights of layers kept on the host (``-ngl`` below the layer count) | seconds per byte |

Which kernels llama.cpp uses depends on the GPU and the build, and that is data, not a
fitted factor (:func:`llama_cpp_paths`): CUDA graphs for single-token steps on compute
capability >= 8.0 since 2024-05-08 (llama.cpp PR 6766) and >= 7.0 in 2026 builds (PR 25749;
the llama.cpp vendored by llama-cpp-python 0.3.36 gates at Volta); quantized prefill on MMQ
with INT8 tensor cores on compute capability >= 7.5 since June 2024 (PR 7676), before that
(and on Volta) cuBLAS on an f16 copy of the weights; DP4A kernels on GPUs without tensor cores.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llamatier.errors import LlamatierError

GPU_TERMS = (
    "layer",
    "layer_graph",
    "weights",
    "dequant",
    "matmul",
    "matmul_mmq",
    "matmul_dp4a",
    "attention",
    "split",
    "host_kv",
    "host_flops",
    "host_weights",
)

# When rows cannot pin a term down, it takes the coefficient of a term of the same kind (same unit, same
# physics one level coarser): attention FLOPs and other prefill kernels at the same share of their peak as
# the weight matmuls, the f16 copy at the weights' share of bandwidth, layer launch costs for each other.
TIES: dict[str, str] = {
    "attention": "matmul",
    "matmul_mmq": "matmul",
    "matmul_dp4a": "matmul",
    "dequant": "weights",
    "layer_graph": "layer",
    "layer": "layer_graph",
}

# Physical floors of coefficients: weights and KV cannot stream faster than the datasheet bandwidth.
LOWER_BOUNDS: dict[str, float] = {"weights": 1.0}

CUDA_GRAPHS_AMPERE_SINCE = _dt.date(2024, 5, 8)  # llama.cpp PR 6766 merged: graphs on cc >= 8.0
CUDA_GRAPHS_VOLTA_SINCE = _dt.date(2026, 10, 1)  # vendored llama.cpp (0.3.36) gates at Volta (PR 25749)
MMQ_TENSOR_CORES_SINCE = _dt.date(2024, 6, 10)  # llama.cpp PR 7676: MMQ on INT8 tensor cores (cc >= 7.5)
KV_PAD_256_SINCE = _dt.date(2025, 11, 1)  # attended cells padded to 256 always (llama-kv-cache.cpp, PR 16812 era)


@dataclass(frozen=True)
class KernelPaths:
    """Which llama.cpp kernels a GPU runs for a given build date."""

    cuda_graphs: bool  # single-token decode steps replayed as one CUDA graph
    quant_prefill: str  # "mmq_int8", "cublas_dequant" or "dp4a"
    kv_pad: int = 256  # attended KV cells are padded to a multiple of this


def parse_date(text: Any) -> _dt.date | None:
    """A llama-bench ``test_time`` ("2025-04-24T11:58:50Z", "2024-01") as a date; None if absent."""
    if text is None or str(text).strip() == "":
        return None
    s = str(text).strip()[:10]
    for fmt, n in (("%Y-%m-%d", 10), ("%Y-%m", 7), ("%Y", 4)):
        try:
            return _dt.datetime.strptime(s[:n], fmt).date()
        except ValueError:
            continue
    raise LlamatierError(f"unreadable test_time {text!r}: write it as YYYY-MM-DD")


def llama_cpp_paths(compute_capability: float, tensor_cores: bool, date: _dt.date | None,
                    flash_attn: bool | None = None) -> KernelPaths:
    """The kernel paths of llama.cpp's CUDA backend on a GPU; ``date`` None means a current build.

    ``flash_attn`` None means llama.cpp's default: off before 2025 builds' ``auto``, which
    turns it on for CUDA.
    """
    today = date is None
    fa = flash_attn if flash_attn is not None else (today or date >= KV_PAD_256_SINCE)
    pad = 256 if (fa or today or date >= KV_PAD_256_SINCE) else 32
    graphs = (compute_capability >= 8.0 and (today or date >= CUDA_GRAPHS_AMPERE_SINCE)) or (
        compute_capability >= 7.0 and (today or date >= CUDA_GRAPHS_VOLTA_SINCE)
    )
    if not tensor_cores:
        path = "dp4a"
    elif compute_capability >= 7.5 and (today or date >= MMQ_TENSOR_CORES_SINCE):
        path = "mmq_int8"
    else:
        path = "cublas_dequant"
    return KernelPaths(cuda_graphs=graphs, quant_prefill=path, kv_pad=pad)


@dataclass(frozen=True)
class GpuDevice:
    """The numbers of one GPU the model needs (SI units) and its kernel paths."""

    mem_bytes_per_s: float
    fp16_tensor_flops_per_s: float  # 0: no tensor cores
    int8_ops_per_s: float
    paths: KernelPaths


@dataclass(frozen=True)
class ModelShape:
    """What a model costs per step: weights, parameters, and attention per layer."""

    weight_bytes: float
    n_params: float
    weight_class: str  # "f16", "q8_0", "legacy", "kquant", ...
    n_head: int
    kv_bytes_per_cell: np.ndarray  # [n_layers] K+V bytes of one cell per layer
    qk_dims: np.ndarray  # [n_layers] d_k + d_v per head
    window_cells: np.ndarray  # [n_layers] cells a sliding-window layer keeps (0: global)

    @property
    def n_layers(self) -> int:
        return int(self.kv_bytes_per_cell.shape[0])


def _attended(shape: ModelShape, cells: int, pad: int = 256) -> np.ndarray:
    """Cells each layer attends when ``cells`` are in use (padded like llama.cpp; windows capped)."""
    padded = max(pad, -(-cells // pad) * pad)
    win = shape.window_cells
    return np.where(win > 0, np.minimum(padded, np.maximum(win, pad)), padded).astype(np.float64)


def work_of_test(
    shape: ModelShape,
    dev: GpuDevice,
    *,
    n_prompt: int,
    n_gen: int,
    n_depth: int = 0,
    n_ubatch: int = 512,
    no_kv_offload: bool = False,
    n_gpu_layers: int | None = None,
) -> dict[str, float]:
    """Work counts (see the module table) of one llama-bench test (pp, tg or pg, at a depth)."""
    L = shape.n_layers
    gl = L if n_gpu_layers is None or n_gpu_layers < 0 else min(int(n_gpu_layers), L)
    on_gpu = np.arange(L) < gl
    w_layer = shape.weight_bytes / L
    w_gpu = w_layer * gl
    bw = dev.mem_bytes_per_s
    x = dict.fromkeys(GPU_TERMS, 0.0)
    kv_gpu = on_gpu & (not no_kv_offload)
    kv_host = ~kv_gpu
    split_layers = float((on_gpu & kv_host).sum())
    pos = int(n_depth)
    remaining = int(n_prompt)
    quant = shape.weight_class != "f16"
    while remaining > 0:  # prefill, one ubatch at a time
        n = min(int(n_ubatch), remaining)
        cells = _attended(shape, pos + n, dev.paths.kv_pad)
        att_flops = 2.0 * n * shape.n_head * shape.qk_dims * cells  # per layer
        mm_flops = 2.0 * shape.n_params * n * gl / L
        # a 512-token ubatch is compute bound: weight reads and kernel launches hide under the matmuls
        att_peak = dev.fp16_tensor_flops_per_s if dev.fp16_tensor_flops_per_s > 0 else dev.int8_ops_per_s
        x["attention"] += float(att_flops[kv_gpu].sum()) / att_peak
        if dev.paths.quant_prefill == "dp4a":
            x["matmul_dp4a"] += mm_flops / dev.int8_ops_per_s
        else:
            if quant and dev.paths.quant_prefill == "mmq_int8":
                x["matmul_mmq"] += mm_flops / dev.int8_ops_per_s
            else:
                x["matmul"] += mm_flops / dev.fp16_tensor_flops_per_s
                if quant:
                    x["dequant"] += 4.0 * shape.n_params * gl / L / bw
        x["split"] += split_layers
        x["host_flops"] += float(att_flops[on_gpu & kv_host].sum())
        x["host_weights"] += w_layer * (L - gl)
        pos += n
        remaining -= n
    for _ in range(int(n_gen)):  # decode, one token per step
        pos += 1
        cells = _attended(shape, pos, dev.paths.kv_pad)
        kv_bytes = shape.kv_bytes_per_cell * cells
        x["layer_graph" if dev.paths.cuda_graphs else "layer"] += gl
        x["weights"] += (w_gpu + float(kv_bytes[kv_gpu].sum())) / bw
        x["split"] += split_layers
        x["host_kv"] += float(kv_bytes[on_gpu & kv_host].sum())
        x["host_weights"] += w_layer * (L - gl) + float(kv_bytes[~on_gpu].sum())
    return x


@dataclass(frozen=True)
class GpuStepModel:
    """Fitted coefficients (one per term, see the module table); terms absent were not fitted.

    A model fitted on llama-bench rows is GPU-independent; a profile's copy also carries
    its GPU's kernel paths and INT8 rate (``paths``, ``int8_ops_per_s``) so that replay can
    cost steps on it.
    """

    coef: dict[str, float]
    fitted_on: tuple[str, ...] = ()  # GPUs whose rows the fit used
    fitted_models: tuple[str, ...] = ()  # llama-bench model types (arch and size) of those rows
    n_rows: int = 0
    fit_median_ape: float = float("nan")
    unfitted: tuple[str, ...] = ()  # terms the rows could not pin down
    tied: tuple[str, ...] = ()  # "term=partner": fitted as one coefficient (the rows could not separate them)
    notes: str = ""
    paths: KernelPaths | None = None
    int8_ops_per_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        unknown = [k for k in self.coef if k not in GPU_TERMS]
        if unknown:
            raise LlamatierError(f"unknown GPU model term {unknown[0]!r}: terms are {', '.join(GPU_TERMS)}")
        bad = [k for k, v in self.coef.items() if not (np.isfinite(v) and v >= 0)]
        if bad:
            raise LlamatierError(f"GPU model term {bad[0]} must be a finite number >= 0")

    def resolve(self, term: str, *, borrow: bool = False) -> tuple[float | None, str]:
        """(coefficient of ``term``, how it was obtained), None if the model has none.

        How: "" fitted; "tied" fitted as one coefficient with a related term; "borrowed" (only with
        ``borrow``) a term the fit never saw takes its related term's coefficient; "absorbed" (only with
        ``borrow``) the rows could not separate the term from another one, which carries its cost as
        measured (0 here: right at the conditions the fit saw, an underestimate away from them).
        """
        if term in self.coef:
            return self.coef[term], ""
        ties = dict(t.split("=", 1) for t in self.tied)
        if term in ties and ties[term] in self.coef:
            return self.coef[ties[term]], "tied"
        if borrow and term in TIES and TIES[term] in self.coef:
            return self.coef[TIES[term]], "borrowed"
        if borrow and term in self.unfitted:
            return 0.0, "absorbed"
        return None, ""

    def missing(self, work: dict[str, float], *, borrow: bool = False) -> list[str]:
        """Terms ``work`` needs that this model has no coefficient for."""
        return [k for k, v in work.items() if v > 0 and self.resolve(k, borrow=borrow)[0] is None]

    def borrowed(self, work: dict[str, float]) -> list[str]:
        """How a borrowing prediction of ``work`` stands in for terms the fit lacks (``attention<-matmul``)."""
        out = []
        for k, v in work.items():
            how = self.resolve(k, borrow=True)[1] if v > 0 else ""
            if how == "borrowed":
                out.append(f"borrowed {k}<-{TIES[k]}")
            elif how == "absorbed":
                out.append(f"{k} not separable: counted in the fitted terms")
        return out

    def predict_s(self, work: dict[str, float], *, borrow: bool = False) -> float:
        """Seconds for ``work``; LlamatierError naming the missing terms if the model lacks one.

        ``borrow``: stand in for terms the fit lacks as :meth:`resolve` says.
        """
        miss = self.missing(work, borrow=borrow)
        if miss:
            raise LlamatierError(
                f"the GPU model has no fitted {', '.join(miss)} term: calibrate it on llama-bench rows that "
                f"exercise it ({term_hint(miss[0])})"
            )
        return float(sum(self.resolve(k, borrow=borrow)[0] * v for k, v in work.items() if v > 0))

    def for_device(self, paths: KernelPaths, int8_ops_per_s: float) -> GpuStepModel:
        """This fit attached to one GPU (what a profile stores)."""
        from dataclasses import replace

        return replace(self, paths=paths, int8_ops_per_s=float(int8_ops_per_s))


_HINTS = {
    "layer": "decode rows on a GPU without CUDA graphs, of two model sizes or weight types",
    "layer_graph": "tg rows on a GPU with CUDA graphs (compute capability >= 8.0), of two model sizes or weight types",
    "weights": "tg rows of two weight sizes (-m with two GGUFs)",
    "dequant": "pp rows of f16 and quantized weights on a GPU using cuBLAS for quantized prefill",
    "matmul": "pp rows (-p 512) of f16 weights, or at several depths (-d)",
    "matmul_mmq": "pp rows of quantized weights on a GPU with INT8 tensor cores (compute capability >= 7.5)",
    "matmul_dp4a": "pp rows on a GPU without tensor cores",
    "attention": "pp rows at several depths (-d 0,4096,16384)",
    "split": "rows with -nkvo 1",
    "host_kv": "tg rows with -nkvo 1 at several depths (-d 0,4096,16384)",
    "host_flops": "pp rows with -nkvo 1",
    "host_weights": "rows with -ngl below the layer count",
}


def term_hint(term: str) -> str:
    """What llama-bench rows identify ``term``."""
    return _HINTS.get(term, "more rows")


# How a profile TOML writes a GpuStepModel ([compute.gpu_model]): key -> (term, how the value maps to the coefficient).
# "us": microseconds per unit; "factor": the coefficient itself (time relative to the datasheet peak, 1 = peak);
# "gb_s" / "gflops": a rate, coefficient = 1 / (value * 1e9).
GPU_MODEL_KEYS: dict[str, tuple[str, str]] = {
    "layer_us": ("layer", "us"),
    "layer_graph_us": ("layer_graph", "us"),
    "weights_factor": ("weights", "factor"),
    "dequant_factor": ("dequant", "factor"),
    "matmul_factor": ("matmul", "factor"),
    "matmul_mmq_factor": ("matmul_mmq", "factor"),
    "matmul_dp4a_factor": ("matmul_dp4a", "factor"),
    "attention_factor": ("attention", "factor"),
    "split_us": ("split", "us"),
    "host_attention_gb_s": ("host_kv", "gb_s"),
    "host_attention_gflops": ("host_flops", "gflops"),
    "host_weights_gb_s": ("host_weights", "gb_s"),
}


def coef_from_toml(key: str, value: float) -> tuple[str, float]:
    """(term, coefficient) of one [compute.gpu_model] value."""
    term, kind = GPU_MODEL_KEYS[key]
    if kind == "us":
        return term, float(value) * 1e-6
    if kind == "factor":
        return term, float(value)
    return term, (1.0 / (float(value) * 1e9) if value > 0 else float("inf"))


def coef_to_toml(term: str, coef: float) -> tuple[str, float]:
    """(key, value) a profile TOML writes for one fitted coefficient."""
    key, kind = next((k, kd) for k, (t, kd) in GPU_MODEL_KEYS.items() if t == term)
    if kind == "us":
        return key, coef * 1e6
    if kind == "factor":
        return key, coef
    return key, (1.0 / coef / 1e9 if coef > 0 else 0.0)


@dataclass(frozen=True)
class ReplayCoefficients:
    """A profile's GPU step model resolved for replay: every term has a value, fitted or from the profile."""

    layer_s: float  # per GPU layer of a single-token step (CUDA graphs or not, as the GPU runs them)
    weights: float  # time factor on datasheet bandwidth for weights and KV in HBM
    matmul: float  # time factor on the prefill matmul peak of the weights' kernel path
    matmul_peak: float  # that peak, FLOP/s
    dequant: float  # time factor on the f16 copy's traffic (0 when the path does not make one)
    attention: float  # time factor on the FP16 tensor peak for prefill attention FLOPs
    attention_peak: float
    split_s: float  # per layer attended on the host
    host_kv_s_per_byte: float
    host_flops_s: float  # seconds per attention FLOP on the host; nan: not fitted (bytes are used)
    host_weights_s_per_byte: float
    borrowed: tuple[str, ...]  # terms taken from the profile's datasheet fields


def replay_coefficients(model: GpuStepModel, *, n_layers: int, quantized: bool, step_overhead_s: float,
                        matmul_flops_per_s: float, matmul_efficiency: float, host_attention_bytes_per_s: float,
                        host_roundtrip_s: float) -> ReplayCoefficients:
    """Coefficients for replaying on the profile that carries ``model`` (fallbacks from its datasheet fields)."""
    paths = model.paths or KernelPaths(cuda_graphs=True, quant_prefill="mmq_int8")
    borrowed: list[str] = []

    def get(term: str, fallback: float) -> float:
        value, how = model.resolve(term, borrow=True)
        if value is not None and how != "absorbed":
            if how == "borrowed":
                borrowed.append(f"{term}<-{TIES[term]}")
            return value
        borrowed.append(term)
        return fallback

    layer_term = "layer_graph" if paths.cuda_graphs else "layer"
    int8 = model.int8_ops_per_s or 2.0 * matmul_flops_per_s
    if not quantized:
        mm_term, peak = "matmul", matmul_flops_per_s
    elif paths.quant_prefill == "mmq_int8":
        mm_term, peak = "matmul_mmq", int8
    elif paths.quant_prefill == "dp4a":
        mm_term, peak = "matmul_dp4a", int8
    else:
        mm_term, peak = "matmul", matmul_flops_per_s
    dequant_on = quantized and paths.quant_prefill == "cublas_dequant"
    return ReplayCoefficients(
        layer_s=get(layer_term, step_overhead_s / max(n_layers, 1)),
        weights=get("weights", 1.0),
        matmul=get(mm_term, 1.0 / matmul_efficiency),
        matmul_peak=peak,
        dequant=get("dequant", 1.0) if dequant_on else 0.0,
        attention=get("attention", 1.0 / matmul_efficiency),
        attention_peak=matmul_flops_per_s,
        split_s=get("split", host_roundtrip_s),
        host_kv_s_per_byte=get("host_kv", 1.0 / host_attention_bytes_per_s),
        host_flops_s=model.coef.get("host_flops", float("nan")),
        host_weights_s_per_byte=get("host_weights", 1.0 / host_attention_bytes_per_s),
        borrowed=tuple(borrowed),
    )
