"""Four-tier cost model: per-step time and energy from the bytes each step moves.

Input is :class:`StepTraffic` (what the replay engine counted per step: bytes and
blocks read per layer and tier, new KV written, blocks migrated between tiers);
output is :class:`StepCosts`. Every formula is vectorised over steps. The
equations, in README form, are in docs/replay.md; in short (GPU profile)::

    T_step    = T_compute + T_host_layers + T_hbm + T_host_attn + T_link
    T_compute = overhead + max(W_gpu / BW_hbm, F_gpu / (peak * efficiency))
    T_hbm     = R_hbm / BW_hbm_read + Wr_hbm / BW_hbm_write + n_gpu_layers * lat_hbm
    per layer with KV below HBM (D bytes in n blocks):
      attend on host:  rt_host + D / BW_host_attn           (llama.cpp -nkvo)
      fetch:           D / rate(hbm_dram up) + n * fixed(hbm_dram)   (on the link)
    T_link    = sum over (link, direction) of (demand + migrations)
                + max(0, sum of prefetch - T_compute)

Blocks in SSD or remote come up through DRAM (one transfer per block on the
lower link) and then take the DRAM path. Transfers on a step's critical path are
serialised (one DMA queue; a conservative choice that also makes moving a
block to a faster tier never cost time). Each link crossing costs
``bytes / rate + transfers * fixed``, where ``rate`` is the slowest of the link
and the two tiers' read/write bandwidths and ``fixed`` is the link's latency and
overhead plus the slower tier's request latency and overhead. On a CPU-only
profile DRAM is the top tier and the step's compute either comes from the
calibrated host model or from a host roofline that includes the KV reads.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from llamatier.hardware import Profile
from llamatier.hardware.gpumodel import replay_coefficients
from llamatier.tiers import (
    DOWN,
    DRAM,
    HBM,
    LINK_NAMES,
    N_LINKS,
    N_TIERS,
    REMOTE,
    SSD,
    TIER_NAMES,
    UP,
    MoveTiming,
    link_ends,
    link_paths,
)

# LINK_PATHS[a, b, link, direction] = 1 when a block going from tier a to tier b crosses that link that way.
LINK_PATHS = link_paths()


@dataclass(frozen=True)
class StepTraffic:
    """What a replay counted per step (float64 arrays; S steps, L layers)."""

    read_bytes: np.ndarray  # [S, L, 4]: bytes read by attention from blocks resident in each tier
    read_blocks: np.ndarray  # [S, L, 4]: blocks read (one transfer each when they cross a link)
    read_tokens: np.ndarray  # [S, L]: KV positions attended (attention flops)
    write_bytes: np.ndarray  # [S, L, 4]: new K/V written into blocks of each tier
    write_blocks: np.ndarray  # [S, L, 4]
    move_bytes: np.ndarray  # [S, 3, 4, 4]: migrations [timing (demand, prefetch, free), src, dst]
    move_count: np.ndarray  # [S, 3, 4, 4]
    n_tokens: np.ndarray  # [S] int64
    ctx_tokens: np.ndarray  # [S] int64


@dataclass(frozen=True)
class StepCosts:
    """Time and energy per step, split by where it goes."""

    step_s: np.ndarray  # [S] modelled wall time of the step
    compute_s: np.ndarray  # [S] weights streaming / flops roofline (or calibrated host model)
    host_layers_s: np.ndarray  # [S] layers run on the host (static layers mode)
    hbm_s: np.ndarray  # [S] KV reads and writes in HBM
    host_attention_s: np.ndarray  # [S] attention over DRAM-resident KV run on the host
    link_s: np.ndarray  # [S] exposed link time (fetches, staging, writes, migrations)
    link_busy_s: np.ndarray  # [S, 3, 2] busy time per link and direction (up, down), prefetch included
    link_bytes: np.ndarray  # [S, 3, 2] bytes per link and direction
    fetched_layers: np.ndarray  # [S] layers whose below-HBM KV was fetched rather than host-attended
    energy_weights_j: np.ndarray  # [S]
    energy_kv_j: np.ndarray  # [S, 4] KV reads, writes and migrations at each tier
    energy_transfer_j: np.ndarray  # [S] link energy
    energy_compute_j: np.ndarray  # [S] multiply-accumulates

    @property
    def energy_j(self) -> np.ndarray:
        return self.energy_weights_j + self.energy_kv_j.sum(axis=1) + self.energy_transfer_j + self.energy_compute_j


class CostModel:
    """Turns :class:`StepTraffic` into :class:`StepCosts` for one profile and target model."""

    def __init__(
        self,
        profile: Profile,
        *,
        n_layers: int,
        n_head: int,
        head_dim_k: np.ndarray,
        head_dim_v: np.ndarray,
        n_params: int,
        weight_bytes: int,
        host_layers: np.ndarray | None = None,
        dram_reads: str = "auto",
        host_model_args: dict | None = None,
    ) -> None:
        self.profile = profile
        self.host_only = bool(profile.is_host_only)
        self.L = int(n_layers)
        self.n_head = int(n_head)
        self.hd_kv = np.asarray(head_dim_k, dtype=np.float64) + np.asarray(head_dim_v, dtype=np.float64)
        self.n_params = float(n_params)
        self.weight_bytes = float(weight_bytes)
        hl = np.zeros(self.L, dtype=bool) if host_layers is None else np.asarray(host_layers, dtype=bool)
        self.host_layers = np.ones(self.L, dtype=bool) if self.host_only else hl
        self.dram_reads = dram_reads
        self.host_model_args = host_model_args  # kwargs for host_model.predict_step_s, None: roofline
        tiers = [profile.tier(t) for t in TIER_NAMES]
        links = [profile.link(n) for n in LINK_NAMES]
        self.rate = np.empty((N_LINKS, 2))
        self.fixed_s = np.empty(N_LINKS)
        for i, (lk, (upper, lower)) in enumerate(zip(links, link_ends(), strict=True)):
            up, lo = tiers[upper], tiers[lower]
            self.rate[i, UP] = min(lk.bytes_per_s, lo.read_bytes_per_s, up.write_bytes_per_s)
            self.rate[i, DOWN] = min(lk.bytes_per_s, up.read_bytes_per_s, lo.write_bytes_per_s)
            self.fixed_s[i] = lk.latency_s + lk.transfer_overhead_s + lo.latency_s + lo.transfer_overhead_s
        self.link_energy = np.array([lk.energy_j_per_byte for lk in links])
        gm = profile.compute.gpu_model
        self.gpu_coef = None
        if gm is not None and not self.host_only:
            c = profile.compute
            self.gpu_coef = replay_coefficients(
                gm, n_layers=self.L, quantized=self.weight_bytes * 8.0 / max(self.n_params, 1.0) < 12.0,
                step_overhead_s=c.step_overhead_s, matmul_flops_per_s=c.matmul_flops_per_s,
                matmul_efficiency=c.matmul_efficiency, host_attention_bytes_per_s=c.host_attention_bytes_per_s,
                host_roundtrip_s=c.host_roundtrip_s,
            )
        self.tier_energy = np.array([t.energy_j_per_byte for t in tiers])
        self.tiers = tiers

    # -- helpers -------------------------------------------------------------------
    def _crossings(self, bytes_ab: np.ndarray, count_ab: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Bytes and busy time per [S, link, dir] for tier-to-tier flows [S, 4, 4]."""
        b = np.einsum("sab,abkd->skd", bytes_ab, LINK_PATHS)
        n = np.einsum("sab,abkd->skd", count_ab, LINK_PATHS)
        return b, b / self.rate[None] + n * self.fixed_s[None, :, None]

    def _fitted_gpu(self, tr: StepTraffic, flops_mm: np.ndarray, flops_att: np.ndarray, below_b: np.ndarray,
                    below_n: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """compute, host layers, HBM and per-layer host-attention seconds from the fitted GPU step model.

        A step costs the longer of streaming (per-layer launches plus the weights at the fitted share of
        bandwidth; single-token steps also stream their HBM-resident KV) and computing (matmuls on the
        weights' kernel path and attention FLOPs at their fitted shares of peak).
        """
        rc = self.gpu_coef
        hbm = self.tiers[HBM]
        host, gpu = self.host_layers, ~self.host_layers
        n_gpu, n_host = int(gpu.sum()), int(host.sum())
        w_layer = self.weight_bytes / self.L
        bw = hbm.read_bytes_per_s
        single = tr.n_tokens <= 1
        kv_hbm = tr.read_bytes[:, :, HBM].sum(axis=1)
        decode = n_gpu * rc.layer_s + rc.weights * w_layer * n_gpu / bw
        batched = (
            rc.matmul * flops_mm * n_gpu / self.L / rc.matmul_peak
            + rc.dequant * 4.0 * self.n_params * n_gpu / self.L / bw
            + rc.attention * flops_att[:, gpu].sum(axis=1) / rc.attention_peak
        )
        # a step is bound by streaming its weights or by its matmuls, whichever is longer: a decode step by the
        # first, a 512-token prefill ubatch by the second (each side as fitted on llama-bench rows)
        compute_s = np.maximum(decode, batched)
        hbm_s = np.where(single, rc.weights * kv_hbm / bw, 0.0) + tr.write_bytes[:, :, HBM].sum(axis=1) / hbm.write_bytes_per_s
        host_bytes = w_layer * n_host + tr.read_bytes[:, host, :].sum(axis=(1, 2))
        host_layers_s = host_bytes * rc.host_weights_s_per_byte + rc.split_s if n_host else np.zeros_like(compute_s)
        host_kv = below_b * rc.host_kv_s_per_byte
        if np.isfinite(rc.host_flops_s):  # prefill attention on the host is FLOP-bound when the fit says so
            read = tr.read_bytes.sum(axis=2)
            share = np.divide(below_b, read, out=np.zeros_like(below_b), where=read > 0)
            host_kv = np.where(single[:, None], host_kv, flops_att * share * rc.host_flops_s)
        host_cost = np.where(below_n > 0, rc.split_s + host_kv, 0.0)
        return compute_s, host_layers_s, hbm_s, host_cost

    def evaluate(self, tr: StepTraffic) -> StepCosts:
        S = tr.read_bytes.shape[0]
        c = self.profile.compute
        hbm, dram = self.tiers[HBM], self.tiers[DRAM]
        host = self.host_layers
        gpu = ~host
        n_gpu, n_host = int(gpu.sum()), int(host.sum())
        w_layer = self.weight_bytes / self.L
        nt = tr.n_tokens.astype(np.float64)
        flops_mm = 2.0 * self.n_params * nt  # [S]
        flops_att = 2.0 * nt[:, None] * self.n_head * self.hd_kv[None, :] * tr.read_tokens  # [S, L]

        zeros = np.zeros(S)
        fetched = np.zeros(S)
        # flows that cross links: [S, src tier, dst tier]
        demand_ab = np.zeros((S, N_TIERS, N_TIERS))
        demand_n = np.zeros((S, N_TIERS, N_TIERS))
        # below-HBM blocks are staged up to DRAM first
        for t in (SSD, REMOTE):
            demand_ab[:, t, DRAM] += tr.read_bytes[:, :, t].sum(axis=1)
            demand_n[:, t, DRAM] += tr.read_blocks[:, :, t].sum(axis=1)
        # writes leave the device that produced them (HBM for GPU layers, DRAM for host layers)
        for t in range(N_TIERS):
            wb_g, wn_g = tr.write_bytes[:, gpu, t].sum(axis=1), tr.write_blocks[:, gpu, t].sum(axis=1)
            wb_h, wn_h = tr.write_bytes[:, host, t].sum(axis=1), tr.write_blocks[:, host, t].sum(axis=1)
            demand_ab[:, HBM, t] += wb_g
            demand_n[:, HBM, t] += wn_g
            demand_ab[:, DRAM, t] += wb_h
            demand_n[:, DRAM, t] += wn_h
        for t in range(N_TIERS):  # a flow to itself crosses nothing
            demand_ab[:, t, t] = 0.0
            demand_n[:, t, t] = 0.0

        if self.host_only:
            host_attn_s = zeros
            hbm_s = zeros
            host_layers_s = zeros
            kv_read = tr.read_bytes.sum(axis=(1, 2))
            kv_write = tr.write_bytes.sum(axis=(1, 2))
            if self.host_model_args is not None:
                compute_s = c.host_model.predict_step_s(
                    n_tokens=tr.n_tokens, n_kv=tr.ctx_tokens, **self.host_model_args
                )
            else:
                compute_s = (
                    c.step_overhead_s
                    + np.maximum(
                        self.weight_bytes / dram.read_bytes_per_s,
                        (flops_mm + flops_att.sum(axis=1)) / (c.matmul_flops_per_s * c.matmul_efficiency),
                    )
                    + kv_read / c.host_attention_bytes_per_s
                    + kv_write / dram.write_bytes_per_s
                )
            energy_weights = np.full(S, self.weight_bytes * dram.energy_j_per_byte)
        else:
            # GPU layers' KV below HBM: attend on the host or fetch over the link, per layer
            below_b = tr.read_bytes[:, :, DRAM:].sum(axis=2)  # [S, L]
            below_n = tr.read_blocks[:, :, DRAM:].sum(axis=2)
            if self.gpu_coef is not None:
                compute_s, host_layers_s, hbm_s, host_cost = self._fitted_gpu(tr, flops_mm, flops_att, below_b, below_n)
            else:
                compute_s = c.step_overhead_s + np.maximum(
                    w_layer * n_gpu / hbm.read_bytes_per_s,
                    (flops_mm * n_gpu / self.L + flops_att[:, gpu].sum(axis=1))
                    / (c.matmul_flops_per_s * c.matmul_efficiency),
                )
                # host layers (static layers mode): weights and all their KV stream at host bandwidth
                host_bytes = w_layer * n_host + tr.read_bytes[:, host, :].sum(axis=(1, 2))
                host_layers_s = (
                    (host_bytes / c.host_attention_bytes_per_s + c.host_roundtrip_s) if n_host else zeros
                )
                hbm_s = (
                    tr.read_bytes[:, :, HBM].sum(axis=1) / hbm.read_bytes_per_s
                    + tr.write_bytes[:, :, HBM].sum(axis=1) / hbm.write_bytes_per_s
                    + n_gpu * (hbm.latency_s + hbm.transfer_overhead_s)
                )
                host_cost = np.where(below_n > 0, c.host_roundtrip_s, 0.0) + below_b / c.host_attention_bytes_per_s
            fetch_cost = below_b / self.rate[0, UP] + below_n * self.fixed_s[0]
            if self.dram_reads == "host":
                use_fetch = np.zeros_like(below_b, dtype=bool)
            elif self.dram_reads == "fetch":
                use_fetch = np.ones_like(below_b, dtype=bool)
            else:
                use_fetch = fetch_cost < host_cost
            use_fetch &= gpu[None, :] & (below_n > 0)
            use_host = gpu[None, :] & ~use_fetch
            host_attn_s = (host_cost * use_host).sum(axis=1)
            demand_ab[:, DRAM, HBM] += (below_b * use_fetch).sum(axis=1)
            demand_n[:, DRAM, HBM] += (below_n * use_fetch).sum(axis=1)
            fetched = use_fetch.sum(axis=1).astype(np.float64)
            energy_weights = w_layer * (n_gpu * hbm.energy_j_per_byte + n_host * dram.energy_j_per_byte) + zeros

        d_bytes, d_busy = self._crossings(demand_ab, demand_n)
        m_bytes = np.zeros((S, N_LINKS, 2))
        busy = {}
        for timing in MoveTiming:
            mb, mbusy = self._crossings(tr.move_bytes[:, timing], tr.move_count[:, timing])
            m_bytes += mb
            busy[timing] = mbusy
        link_s = (d_busy + busy[MoveTiming.DEMAND]).sum(axis=(1, 2)) + np.maximum(
            0.0, busy[MoveTiming.PREFETCH].sum(axis=(1, 2)) - compute_s
        )
        step_s = compute_s + host_layers_s + hbm_s + host_attn_s + link_s

        # energy
        moved_out = tr.move_bytes.sum(axis=(1, 3))  # [S, 4] by source tier
        moved_in = tr.move_bytes.sum(axis=(1, 2))  # [S, 4] by destination tier
        tier_bytes = tr.read_bytes.sum(axis=1) + tr.write_bytes.sum(axis=1) + moved_out + moved_in
        energy_kv = tier_bytes * self.tier_energy[None, :]
        link_bytes = d_bytes + m_bytes
        energy_transfer = (link_bytes.sum(axis=2) * self.link_energy[None, :]).sum(axis=1)
        energy_compute = (flops_mm + flops_att.sum(axis=1)) / 2.0 * c.energy_j_per_mac
        return StepCosts(
            step_s=step_s,
            compute_s=compute_s,
            host_layers_s=host_layers_s,
            hbm_s=hbm_s,
            host_attention_s=host_attn_s,
            link_s=link_s,
            link_busy_s=d_busy + busy[MoveTiming.DEMAND] + busy[MoveTiming.PREFETCH],
            link_bytes=link_bytes,
            fetched_layers=fetched,
            energy_weights_j=energy_weights,
            energy_kv_j=energy_kv,
            energy_transfer_j=energy_transfer,
            energy_compute_j=energy_compute,
        )
