"""The slow reference engine: plain Python, one block at a time, obviously correct.

It drives the same policies through the same interface as the vectorised
engine, but counts every block read, write, move and allocation in explicit
loops and costs each step with scalar formulas written out again (not calling
llamatier.cost). Tests check that both engines agree on small traces; it is
a test oracle, not imported by the production path. The per-access LRU the
vectorised LRU is checked against is :mod:`llamatier.policies.lru_reference`.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from llamatier.cost import CostModel, StepCosts, StepTraffic
from llamatier.errors import LlamatierError
from llamatier.hardware import Profile
from llamatier.hardware.gpumodel import replay_coefficients
from llamatier.policies.base import Policy, StepView, default_read_selection
from llamatier.replay import (
    ReplayOptions,
    ReplayResult,
    finish,
    policy_for,
    prepare,
)
from llamatier.replay.context import ReplayContext
from llamatier.replay.engine import EngineRecord, capacity_of
from llamatier.tiers import LINK_NAMES, N_TIERS, TIER_NAMES, MoveTiming, link_ends, links_crossed
from llamatier.trace import Trace

# -- the engine ----------------------------------------------------------------------------


def _ranges(ctx: ReplayContext, s: int) -> tuple[list[list[bool]], list[list[bool]]]:
    alive, visible = [], []
    hi = int(ctx.hi_block[s])
    for layer in range(ctx.n_layers):
        la, lv = int(ctx.lo_alive[s, layer]), int(ctx.lo_visible[s, layer])
        alive.append([la <= b < hi for b in range(ctx.n_blocks)])
        visible.append([lv <= b < hi for b in range(ctx.n_blocks)])
    return alive, visible


def run_reference(ctx: ReplayContext, policy: Policy) -> EngineRecord:
    """Count every step block by block (the same record the vectorised engine produces)."""
    t0 = time.perf_counter()
    start = policy.start(ctx)
    decision_s = time.perf_counter() - t0
    S, L, NB, B = ctx.n_steps, ctx.n_layers, ctx.n_blocks, ctx.block_tokens
    z3 = lambda: np.zeros((S, L, 4))  # noqa: E731
    read_bytes, read_blocks, write_bytes, write_blocks = z3(), z3(), z3(), z3()
    read_tokens = np.zeros((S, L))
    move_bytes, move_count = np.zeros((S, 3, 4, 4)), np.zeros((S, 3, 4, 4))
    occupancy, stored, alloc, freed = (np.zeros((S, 4)) for _ in range(4))
    dropped = np.zeros((S, L))
    n_visible = np.zeros(S)
    if not start.runs:
        traffic = StepTraffic(read_bytes, read_blocks, read_tokens, write_bytes, write_blocks,
                              move_bytes, move_count, ctx.n_tokens, ctx.ctx_tokens)
        return EngineRecord(start, traffic, occupancy, stored, alloc, freed, dropped, n_visible, decision_s, "none")
    caps = capacity_of(ctx, start)
    reserved = [0.0] * 4 if start.reserved_bytes is None else [float(x) for x in start.reserved_bytes]
    bpt = [int(x) for x in ctx.bytes_per_token]
    blk = [float(x) for x in ctx.block_bytes]
    P = np.array(start.placement, dtype=np.int8, copy=True)
    alive_prev = [[False] * NB for _ in range(L)]
    occ_prev = np.zeros(4)
    sparse = ctx.options.mode == "sparse"
    budget = int(ctx.options.block_budget or 0)
    for s in range(S):
        alive, visible = _ranges(ctx, s)
        new = [[alive[layer][b] and not alive_prev[layer][b] for b in range(NB)] for layer in range(L)]
        for layer in range(L):
            for b in range(NB):
                if alive_prev[layer][b] and not alive[layer][b]:
                    freed[s, int(P[layer, b])] += blk[layer]
        view = StepView(
            step=s, decode=bool(ctx.is_decode[s]), hi_block=int(ctx.hi_block[s]),
            lo_alive=ctx.lo_alive[s], lo_visible=ctx.lo_visible[s], new_lo_block=int(ctx.pos0[s]) // B,
            alive=np.array(alive, dtype=bool), visible=np.array(visible, dtype=bool),
            new_blocks=np.array(new, dtype=bool), placement=P, occupancy_bytes=occ_prev - freed[s],
        )
        t0 = time.perf_counter()
        dec = policy.decide(view)
        decision_s += time.perf_counter() - t0
        P_new = P if dec.placement is None else np.asarray(dec.placement)
        rt = P_new if dec.read_tier is None else dec.read_tier
        if isinstance(rt, (int, np.integer)):
            rt = np.full((L, NB), int(rt), dtype=np.int8)
        if sparse and ctx.is_decode[s]:
            rmask = dec.read_mask if dec.read_mask is not None else default_read_selection(view, budget)
        else:
            rmask = np.array(visible, dtype=bool)
        ctx_tok, pos0 = int(ctx.ctx_tokens[s]), int(ctx.pos0[s])
        for layer in range(L):
            lo_pos = int(ctx.lo_visible_pos[s, layer])
            for b in range(NB):
                if visible[layer][b]:
                    n_visible[s] += 1
                    if rmask[layer, b]:
                        tok = max(0, min((b + 1) * B, ctx_tok) - max(b * B, lo_pos))
                        t = int(rt[layer, b])
                        read_bytes[s, layer, t] += tok * bpt[layer]
                        read_blocks[s, layer, t] += 1
                        read_tokens[s, layer] += tok
                    elif sparse and ctx.is_decode[s]:
                        dropped[s, layer] += float(ctx.mass[s, layer, b])
                written = max(0, min((b + 1) * B, ctx_tok) - max(b * B, pos0))
                if written:
                    t = int(rt[layer, b])
                    write_bytes[s, layer, t] += written * bpt[layer]
                    write_blocks[s, layer, t] += 1
                if new[layer][b]:
                    alloc[s, int(rt[layer, b])] += blk[layer]
                if alive[layer][b]:
                    if not 0 <= int(P_new[layer, b]) < N_TIERS:
                        raise LlamatierError(f"policy {policy.name!r} left a stored block without a tier at step {s}")
                    stored[s, int(P_new[layer, b])] += blk[layer]
        k = MoveTiming.parse(dec.move_timing)
        if dec.moves_bytes is not None:
            move_bytes[s, k] = dec.moves_bytes
            move_count[s, k] = dec.moves_count
        else:
            for layer in range(L):
                for b in range(NB):
                    if alive_prev[layer][b] and alive[layer][b] and int(P[layer, b]) != int(P_new[layer, b]):
                        move_bytes[s, k, int(P[layer, b]), int(P_new[layer, b])] += blk[layer]
                        move_count[s, k, int(P[layer, b]), int(P_new[layer, b])] += 1
        for t in range(4):
            occupancy[s, t] = reserved[t] if start.reserved_bytes is not None else stored[s, t]
            if occupancy[s, t] > caps[t] * (1 + 1e-9) + 1.0:
                raise LlamatierError(f"policy {policy.name!r} over its {TIER_NAMES[t]} budget at step {s}")
        t0 = time.perf_counter()
        policy.observe(view, ctx.mass[s])
        decision_s += time.perf_counter() - t0
        P, alive_prev, occ_prev = P_new, alive, stored[s].copy()
    traffic = StepTraffic(read_bytes, read_blocks, read_tokens, write_bytes, write_blocks,
                          move_bytes, move_count, ctx.n_tokens, ctx.ctx_tokens)
    return EngineRecord(start, traffic, occupancy, stored, alloc, freed, dropped, n_visible, decision_s, "reference")


# -- scalar cost model ------------------------------------------------------------------------

def reference_costs(ctx: ReplayContext, record: EngineRecord, profile: Profile, dram_reads: str,
                    host_model_args: dict[str, Any] | None) -> StepCosts:
    """Cost every step with scalar formulas (the equations of docs/replay.md, written out again)."""
    tr = record.traffic
    S, L = tr.read_bytes.shape[:2]
    tiers = [profile.tier(n) for n in TIER_NAMES]
    links = [profile.link(n) for n in LINK_NAMES]
    c = profile.compute
    host_only = profile.is_host_only
    host_layers = [True] * L if host_only else (
        [False] * L if record.start.host_layers is None else [bool(x) for x in record.start.host_layers])
    ends = link_ends()
    rate = [[0.0, 0.0] for _ in range(3)]
    fixed = [0.0] * 3
    for i, lk in enumerate(links):
        up, lo = tiers[ends[i][0]], tiers[ends[i][1]]
        rate[i][0] = min(lk.bytes_per_s, lo.read_bytes_per_s, up.write_bytes_per_s)
        rate[i][1] = min(lk.bytes_per_s, up.read_bytes_per_s, lo.write_bytes_per_s)
        fixed[i] = lk.latency_s + lk.transfer_overhead_s + lo.latency_s + lo.transfer_overhead_s
    tgt = ctx.target
    g = tgt.geometry
    w_layer = tgt.weight_bytes / L
    out = {k: np.zeros(S) for k in ("step", "compute", "host_layers", "hbm", "host_attn", "link", "fetched",
                                    "e_w", "e_t", "e_c")}
    link_busy = np.zeros((S, 3, 2))
    link_bytes = np.zeros((S, 3, 2))
    e_kv = np.zeros((S, 4))
    rc = None
    if not host_only and c.gpu_model is not None:
        rc = replay_coefficients(
            c.gpu_model, n_layers=L, quantized=tgt.weight_bytes * 8.0 / max(float(tgt.n_params), 1.0) < 12.0,
            step_overhead_s=c.step_overhead_s, matmul_flops_per_s=c.matmul_flops_per_s,
            matmul_efficiency=c.matmul_efficiency, host_attention_bytes_per_s=c.host_attention_bytes_per_s,
            host_roundtrip_s=c.host_roundtrip_s)
    host_pred = None
    if host_only and host_model_args is not None:
        host_pred = c.host_model.predict_step_s(n_tokens=tr.n_tokens, n_kv=tr.ctx_tokens, **host_model_args)
    for s in range(S):
        nt = float(tr.n_tokens[s])
        flops_mm = 2.0 * tgt.n_params * nt
        flops_att = [2.0 * nt * tgt.n_head * (g.head_dim_k[layer] + g.head_dim_v[layer]) * tr.read_tokens[s, layer] for layer in range(L)]
        busy = [[[0.0, 0.0] for _ in range(3)] for _ in range(3)]  # [timing][link][dir]
        nbytes = [[0.0, 0.0] for _ in range(3)]

        def cross(a: int, b: int, nbyte: float, count: float, timing: int, busy=busy, nbytes=nbytes) -> None:  # noqa: ANN001
            if a == b or (nbyte == 0 and count == 0):
                return
            for li, d in links_crossed(a, b):
                busy[timing][li][d] += nbyte / rate[li][d] + count * fixed[li]
                nbytes[li][d] += nbyte

        n_gpu = sum(1 for h in host_layers if not h)
        host_attn = 0.0
        fetched = 0
        for layer in range(L):
            for t in (2, 3):  # staging through DRAM
                cross(t, 1, tr.read_bytes[s, layer, t], tr.read_blocks[s, layer, t], 0)
            producer = 1 if host_layers[layer] else 0
            for t in range(4):
                cross(producer, t, tr.write_bytes[s, layer, t], tr.write_blocks[s, layer, t], 0)
            if not host_only and not host_layers[layer]:
                d = sum(tr.read_bytes[s, layer, t] for t in (1, 2, 3))
                n = sum(tr.read_blocks[s, layer, t] for t in (1, 2, 3))
                if n > 0:
                    if rc is None:
                        host_cost = c.host_roundtrip_s + d / c.host_attention_bytes_per_s
                    elif nt > 1 and rc.host_flops_s == rc.host_flops_s:  # fitted FLOP rate (not nan)
                        share = d / tr.read_bytes[s, layer].sum()  # the host attends its part of the KV
                        host_cost = rc.split_s + flops_att[layer] * share * rc.host_flops_s
                    else:
                        host_cost = rc.split_s + d * rc.host_kv_s_per_byte
                    fetch_cost = d / rate[0][0] + n * fixed[0]
                    use_fetch = dram_reads == "fetch" or (dram_reads == "auto" and fetch_cost < host_cost)
                    if use_fetch:
                        cross(1, 0, d, n, 0)
                        fetched += 1
                    else:
                        host_attn += host_cost
        for k in range(3):
            for a in range(4):
                for b in range(4):
                    cross(a, b, tr.move_bytes[s, k, a, b], tr.move_count[s, k, a, b], k)
        if host_only:
            if host_pred is not None:
                compute = float(host_pred[s])
            else:
                compute = (c.step_overhead_s
                           + max(tgt.weight_bytes / tiers[1].read_bytes_per_s,
                                 (flops_mm + sum(flops_att)) / (c.matmul_flops_per_s * c.matmul_efficiency))
                           + tr.read_bytes[s].sum() / c.host_attention_bytes_per_s
                           + tr.write_bytes[s].sum() / tiers[1].write_bytes_per_s)
            host_l = hbm = 0.0
            e_w = tgt.weight_bytes * tiers[1].energy_j_per_byte
        elif rc is not None:  # the fitted GPU step model
            bw = tiers[0].read_bytes_per_s
            att_gpu = sum(f for f, h in zip(flops_att, host_layers, strict=False) if not h)
            streaming = n_gpu * rc.layer_s + rc.weights * w_layer * n_gpu / bw
            computing = (rc.matmul * flops_mm * n_gpu / L / rc.matmul_peak
                         + rc.dequant * 4.0 * tgt.n_params * n_gpu / L / bw
                         + rc.attention * att_gpu / rc.attention_peak)
            compute = max(streaming, computing)
            hbm = rc.weights * tr.read_bytes[s, :, 0].sum() / bw if nt <= 1 else 0.0
            hbm += tr.write_bytes[s, :, 0].sum() / tiers[0].write_bytes_per_s
            n_host = L - n_gpu
            host_l = 0.0
            if n_host:
                hb = w_layer * n_host + sum(tr.read_bytes[s, layer].sum() for layer in range(L) if host_layers[layer])
                host_l = hb * rc.host_weights_s_per_byte + rc.split_s
            e_w = w_layer * (n_gpu * tiers[0].energy_j_per_byte + n_host * tiers[1].energy_j_per_byte)
        else:
            flops_gpu = flops_mm * n_gpu / L + sum(f for f, h in zip(flops_att, host_layers, strict=False) if not h)
            compute = c.step_overhead_s + max(w_layer * n_gpu / tiers[0].read_bytes_per_s,
                                              flops_gpu / (c.matmul_flops_per_s * c.matmul_efficiency))
            n_host = L - n_gpu
            host_l = 0.0
            if n_host:
                hb = w_layer * n_host + sum(tr.read_bytes[s, layer].sum() for layer in range(L) if host_layers[layer])
                host_l = hb / c.host_attention_bytes_per_s + c.host_roundtrip_s
            hbm = (tr.read_bytes[s, :, 0].sum() / tiers[0].read_bytes_per_s
                   + tr.write_bytes[s, :, 0].sum() / tiers[0].write_bytes_per_s
                   + n_gpu * (tiers[0].latency_s + tiers[0].transfer_overhead_s))
            e_w = w_layer * (n_gpu * tiers[0].energy_j_per_byte + n_host * tiers[1].energy_j_per_byte)
        exposed = 0.0
        prefetch = 0.0
        for li in range(3):
            for d in range(2):
                exposed += busy[0][li][d]
                prefetch += busy[1][li][d]
                link_busy[s, li, d] = busy[0][li][d] + busy[1][li][d]
                link_bytes[s, li, d] = nbytes[li][d]
        exposed += max(0.0, prefetch - compute)
        out["step"][s] = compute + host_l + hbm + host_attn + exposed
        out["compute"][s], out["host_layers"][s], out["hbm"][s] = compute, host_l, hbm
        out["host_attn"][s], out["link"][s], out["fetched"][s] = host_attn, exposed, fetched
        for t in range(4):
            moved = tr.move_bytes[s, :, t, :].sum() + tr.move_bytes[s, :, :, t].sum()
            e_kv[s, t] = (tr.read_bytes[s, :, t].sum() + tr.write_bytes[s, :, t].sum() + moved) * tiers[t].energy_j_per_byte
        out["e_w"][s] = e_w
        out["e_t"][s] = sum((nbytes[li][0] + nbytes[li][1]) * links[li].energy_j_per_byte for li in range(3))
        out["e_c"][s] = (flops_mm + sum(flops_att)) / 2.0 * c.energy_j_per_mac
    return StepCosts(
        step_s=out["step"], compute_s=out["compute"], host_layers_s=out["host_layers"], hbm_s=out["hbm"],
        host_attention_s=out["host_attn"], link_s=out["link"], link_busy_s=link_busy, link_bytes=link_bytes,
        fetched_layers=out["fetched"], energy_weights_j=out["e_w"], energy_kv_j=e_kv,
        energy_transfer_j=out["e_t"], energy_compute_j=out["e_c"],
    )


def replay_reference(
    trace: Trace, profile: Profile, policy: str | type[Policy] | Policy, options: ReplayOptions | None = None
) -> ReplayResult:
    """Same contract as :func:`llamatier.replay.replay`, computed the slow, obvious way."""
    t0 = time.perf_counter()
    options = options or ReplayOptions()
    ctx = prepare(trace, profile, options)
    pol = policy_for(policy, options)

    def costs_for(model: CostModel, record: EngineRecord) -> StepCosts:
        return reference_costs(ctx, record, profile, model.dram_reads, model.host_model_args)

    return finish(ctx, pol, run_reference(ctx, pol), t0, costs_for=costs_for)
