"""Summaries of a trace: model, steps, KV bytes and attention concentration."""

from __future__ import annotations

from typing import Any

import numpy as np

from llamatier.engines.llamacpp.repack import describe_repack, recorded_repack, repack_state
from llamatier.kvtypes import kv_type
from llamatier.trace.reader import Trace
from llamatier.units import format_bytes


def _window_blocks(trace: Trace, layer: int, visible_blocks: np.ndarray) -> np.ndarray:
    w = trace.model.geometry.sliding_window[layer]
    if w <= 0:
        return visible_blocks
    return np.minimum(visible_blocks, -(-w // trace.block_tokens) + 1)


def attention_concentration(trace: Trace, *, recent_tokens: int = 64, top_fraction: float = 0.10) -> dict[str, Any]:
    """Mean over decode steps (or all steps if none) of concentration statistics, per layer kind.

    - ``first_block``: mass on block 0 (the BOS/attention-sink block)
    - ``recent``: mass on the blocks holding the last ``recent_tokens`` positions (block-rounded)
    - ``top10``: share held by the top 10% of the blocks a layer can see (window-limited on SWA layers)
    """
    sel = trace.is_decode if trace.is_decode.any() else np.ones(trace.n_steps, dtype=bool)
    mass = trace.mass[sel].astype(np.float64)  # [S, L, NB]
    ctx = trace.context_tokens[sel]
    vb = trace.visible_blocks[sel]
    B = trace.block_tokens
    S, L, NB = mass.shape
    first = mass[:, :, 0]
    start_block = np.maximum(ctx - recent_tokens, 0) // B  # [S]
    block_idx = np.arange(NB)
    recent_mask = block_idx[None, :] >= start_block[:, None]  # [S, NB]
    recent = (mass * recent_mask[:, None, :]).sum(axis=2)
    srt = -np.sort(-mass, axis=2)
    cs = np.cumsum(srt, axis=2)
    top = np.empty((S, L))
    for layer in range(L):  # per layer, vectorised over steps
        nvis = _window_blocks(trace, layer, vb)
        k = np.maximum(np.ceil(top_fraction * nvis).astype(np.int64), 1) - 1
        top[:, layer] = cs[np.arange(S), layer, np.minimum(k, NB - 1)]
    swa = np.array(trace.model.geometry.swa_layers, dtype=bool)
    kinds: dict[str, np.ndarray] = {"all": np.ones(L, dtype=bool)}
    if swa.any():
        kinds["global"] = ~swa
        kinds["sliding"] = swa
    out: dict[str, Any] = {
        "steps_used": "decode" if trace.is_decode.any() else "all",
        "block_tokens": B,
        "recent_tokens": recent_tokens,
        "top_fraction": top_fraction,
        "by_kind": {},
        "per_layer": {
            "first_block": first.mean(axis=0).tolist(),
            "recent": recent.mean(axis=0).tolist(),
            "top10": top.mean(axis=0).tolist(),
        },
    }
    for name, m in kinds.items():
        if not m.any():
            continue
        out["by_kind"][name] = {
            "layers": int(m.sum()),
            "first_block": float(first[:, m].mean()),
            "recent": float(recent[:, m].mean()),
            "top10": float(top[:, m].mean()),
        }
    return out


def inspect_trace(trace: Trace) -> dict[str, Any]:
    """Everything `llamatier inspect` shows, as plain data."""
    m = trace.model
    g = m.geometry
    c = trace.context
    tk, tv = kv_type(c.get("type_k", "f16")), kv_type(c.get("type_v", "f16"))
    steps = trace.steps
    dec = steps.filter(steps["phase"] == "decode")
    pre = steps.filter(steps["phase"] == "prefill")
    dec_s = dec["decode_s"].to_numpy()
    bpt = g.bytes_per_token(tk, tv)
    ctx_final = int(trace.context_tokens.max()) if trace.n_steps else 0
    return {
        "trace": str(trace.path) if trace.path else None,
        "complete": trace.complete,
        "interrupted": bool(trace.meta.get("interrupted", False)),
        "error": trace.meta.get("error"),
        "command": trace.meta.get("command"),
        "model": {
            "name": m.name,
            "architecture": m.architecture,
            "file_type": m.file_type,
            "layers": m.n_layers,
            "n_embd": m.n_embd,
            "n_head": m.n_head,
            "n_head_kv": sorted(set(g.n_head_kv)),
            "head_dim_k": sorted(set(g.head_dim_k)),
            "head_dim_v": sorted(set(g.head_dim_v)),
            "sliding_window": max(g.sliding_window) if any(g.sliding_window) else 0,
            "swa_layers": [i for i, s in enumerate(g.swa_layers) if s],
            "swa_source": m.swa_source,
            "weight_bytes": m.weight_bytes,
            "n_params": m.n_params,
        },
        "context": {
            k: c.get(k)
            for k in ("n_ctx", "n_batch", "n_threads", "type_k", "type_v", "flash_attn", "swa_full", "seed")
        },
        "steps": {
            "total": trace.n_steps,
            "prefill": pre.height,
            "decode": dec.height,
            "prompt_tokens": int(c.get("n_prompt_tokens", pre["n_tokens"].sum() if pre.height else 0)),
            "prefill_tokens": int(pre["n_tokens"].sum()) if pre.height else 0,
            "final_context_tokens": ctx_final,
            "prefill_s": float(pre["decode_s"].sum()) if pre.height else 0.0,
            "decode_tok_per_s": float(len(dec_s) / dec_s.sum()) if len(dec_s) and dec_s.sum() > 0 else 0.0,
            "decode_ms_p50": float(np.percentile(dec_s, 50) * 1e3) if len(dec_s) else 0.0,
            "decode_ms_p99": float(np.percentile(dec_s, 99) * 1e3) if len(dec_s) else 0.0,
        },
        "kv": {
            "bytes_per_token": bpt,
            "bytes_at_n_ctx": bpt * int(c.get("n_ctx", 0) or 0),
            "bytes_at_final_context": bpt * ctx_final,
        },
        "attention": attention_concentration(trace),
        "capture": trace.meta.get("capture", {}),
        "repack": {
            "use_extra_bufts": repack_state(trace.meta),
            "recorded": recorded_repack(trace.meta) is not None,
            "summary": describe_repack(trace.meta),
        },
    }


def render_inspection(r: dict[str, Any], console: Any) -> None:
    """Rich tables for :func:`inspect_trace`'s result."""
    from rich.markup import escape
    from rich.table import Table

    m, s, kv, c = r["model"], r["steps"], r["kv"], r["context"]
    status = "[green]complete[/]" if r["complete"] else "[yellow]INCOMPLETE[/] (interrupted)" if r["interrupted"] else "[yellow]INCOMPLETE[/]"
    t = Table(title=f"trace {r['trace']}  {status}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    t.add_row("model", f"{m['name']} ({m['architecture']}, {m['file_type']}), {format_bytes(m['weight_bytes'])} weights")
    t.add_row("layers", f"{m['layers']} ({len(m['swa_layers'])} sliding-window of {m['sliding_window']} tokens)" if m["swa_layers"] else str(m["layers"]))
    t.add_row("heads", f"{m['n_head']} query, {m['n_head_kv']} KV; head dim K {m['head_dim_k']} V {m['head_dim_v']}")
    t.add_row("context", f"n_ctx {c['n_ctx']}, batch {c['n_batch']}, threads {c['n_threads']}, K {c['type_k']} / V {c['type_v']}")
    prefilled = s.get("prefill_tokens", s["prompt_tokens"])
    over = f"{prefilled} of {s['prompt_tokens']}" if prefilled < s["prompt_tokens"] else str(s["prompt_tokens"])
    t.add_row("steps", f"{s['total']} ({s['prefill']} prefill over {over} prompt tokens, {s['decode']} decode); final context {s['final_context_tokens']} tokens")
    decode = f"decode {s['decode_tok_per_s']:.1f} tok/s (p50 {s['decode_ms_p50']:.1f} ms, p99 {s['decode_ms_p99']:.1f} ms)" if s["decode"] else "no decode steps"
    t.add_row("speed", f"prefill {s['prefill_s']:.2f} s; {decode}")
    t.add_row("KV bytes", f"{format_bytes(kv['bytes_per_token'])}/token; {format_bytes(kv['bytes_at_n_ctx'])} reserved at n_ctx; {format_bytes(kv['bytes_at_final_context'])} used")
    t.add_row("repacking", escape(r["repack"]["summary"]))
    console.print(t)
    a = r["attention"]
    at = Table(title=f"attention concentration ({a['steps_used']} steps, blocks of {a['block_tokens']} tokens)", title_justify="left")
    at.add_column("layers")
    at.add_column("n", justify="right")
    at.add_column("first block", justify="right")
    at.add_column(f"last {a['recent_tokens']} tokens", justify="right")
    at.add_column("top 10% of blocks", justify="right")
    for kind, v in a["by_kind"].items():
        at.add_row(kind, str(v["layers"]), f"{v['first_block']:.3f}", f"{v['recent']:.3f}", f"{v['top10']:.3f}")
    console.print(at)
