"""llama-server's slots as this llama.cpp version runs them: choice, prompt cache, context checkpoints.

Read from the vendored source of llama-cpp-python 0.3.36 (llama.cpp's
tools/server); each rule names the function it comes from.

- **Slot choice** (server-context.cpp ``get_available_slot``): among idle slots
  holding tokens, the one whose longest common prefix (LCP) with the prompt is
  the largest fraction of the prompt, if above ``--slot-prompt-similarity``
  (default 0.1); a slot chosen so whose cache would keep under half its tokens
  (``f_keep < 0.5``) updates the prompt cache. Otherwise the least recently
  used idle slot (ties: the highest id), which always updates the prompt cache.
- **Prompt cache** (``--cache-ram``; server-task.cpp ``server_prompt_cache``):
  updating it saves the slot's state (``alloc``: skipped when an entry already
  holds all its tokens; entries it fully contains are dropped; oldest entries
  go first when over the size limit), then ``load`` swaps in the entry that
  beats the slot on both the kept fraction of the entry (at least 0.25) and
  the prompt fraction covered, if any. Saves and loads copy the sequence state
  (all its cells in both caches, plus its checkpoints).
- **Saved states** (src/llama-kv-cache.cpp ``state_write``): a sequence's
  saved state and a checkpoint hold only the cells its window still sees
  (positions after ``n_tokens - n_swa``) on sliding-window layers, so a state
  loaded from the prompt cache starts at that position.
- **Reuse and sliding windows** (``pre_decode``, a slot starting a prompt):
  the slot keeps the LCP. A sliding-window cache holds only recent positions;
  when its smallest position is at or past ``max(0, n_past - n_swa)`` the
  slot needs a context checkpoint at or before ``n_past`` (the latest with
  ``pos_min < threshold`` or ``pos_min == 0``) and restarts from it, else it
  reprocesses the whole prompt. At least the prompt's last token is always
  evaluated. Checkpoints past the restart position are erased.
- **Prompt batches and checkpoints** (``pre_decode``): a prompt is added to the
  step's batch until the batch holds ``n_batch`` tokens, and, for models with
  sliding-window layers, a batch ends when ``min(n_batch, 4 + n_ubatch)`` or
  ``min(n_batch, 4)`` prompt tokens are left, so that a checkpoint can be
  taken there (``create_checkpoint``, before a batch near the prompt's end:
  fewer than ``n_ubatch`` tokens left after it, and the slot's memory not
  empty). A checkpoint copies the sliding-window cache's cells.
- **Sliding-window cells** (src/llama-kv-cache.cpp ``find_slot``): the cache of
  ``swa_cells`` cells per slot fills empty cells first, then overwrites the
  oldest masked ones, so its smallest position is ``n_tokens - swa_cells`` once
  full.

A slot's tokens are identified as (session, length): sessions share only the
first ``prefix_tokens`` tokens (the system prompt).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

CHECKPOINT_TAIL = 4  # server-context.cpp: checkpoint_offsets = {4 + n_ubatch, 4}


def prompt_chunk(left: int, room: int, *, n_batch: int, n_ubatch: int, checkpoints: bool) -> int:
    """pre_decode: prompt tokens a slot adds to a batch with ``room`` free, ``left`` to go.

    With checkpoints (sliding-window models) the batch ends where ``min(n_batch, 4 + n_ubatch)``
    or ``min(n_batch, 4)`` tokens are left.
    """
    k = min(left, room)
    if checkpoints:
        for off in (CHECKPOINT_TAIL + n_ubatch, CHECKPOINT_TAIL):
            stop = left - min(n_batch, off)  # the batch ends when this many tokens are processed
            if 0 < stop < k:
                return stop
    return k


@dataclass
class Checkpoint:
    n_tokens: int
    pos_min: int
    pos_max: int
    nbytes: float


@dataclass
class Held:
    """What a slot (or a prompt-cache entry) holds: a session's first ``n_tokens`` tokens."""

    session: int = -1
    n_tokens: int = 0
    pos_min: int = -1  # smallest position in the sliding-window cache (-1: empty)
    checkpoints: list[Checkpoint] = field(default_factory=list)

    def copy(self) -> Held:
        return replace(self, checkpoints=list(self.checkpoints))


@dataclass(frozen=True)
class ServerConfig:
    """The server settings and model facts the rules depend on."""

    n_slots: int
    prefix_tokens: int
    n_swa: int  # the model's sliding window; 0 without sliding-window layers or with --swa-full
    swa_cells: int  # cells per slot of the sliding-window cache
    global_bytes_per_token: float  # K+V bytes of one token over the global-attention layers
    swa_bytes_per_token: float  # ... over the sliding-window layers
    cache_limit_bytes: float  # --cache-ram (0: no prompt cache)
    n_batch: int = 2048
    n_ubatch: int = 512
    similarity: float = 0.1  # --slot-prompt-similarity
    n_ctx_checkpoints: int = 32  # --ctx-checkpoints


@dataclass
class Launch:
    """What starting a request on a slot did."""

    slot: int
    n_past: int  # prompt tokens reused (the server's cache_n)
    by: str  # "similarity" or "lru"
    saved_bytes: float = 0.0  # the slot's state copied into the prompt cache
    loaded_bytes: float = 0.0  # a state or checkpoint copied into the slot
    from_cache: bool = False  # the prompt cache supplied the reused tokens
    restored_checkpoint: bool = False


class Slots:
    """The slots and prompt cache of one llama-server (see the module docstring)."""

    def __init__(self, cfg: ServerConfig) -> None:
        self.cfg = cfg
        self.held = [Held() for _ in range(cfg.n_slots)]
        self.busy = [False] * cfg.n_slots
        self.last_used = [-1] * cfg.n_slots
        self.cache: list[Held] = []  # oldest first
        self.clock = 0

    # -- tokens ------------------------------------------------------------------------
    def lcp(self, h: Held, session: int, n: int) -> int:
        if h.session < 0 or h.n_tokens <= 0:
            return 0
        if h.session == session:
            return min(h.n_tokens, n)
        return min(self.cfg.prefix_tokens, h.n_tokens, n)

    def state_bytes(self, h: Held) -> float:
        """Bytes of a sequence's state: its cells in both caches, plus its checkpoints."""
        c = self.cfg
        if h.n_tokens <= 0:
            return 0.0
        swa = min(h.n_tokens, c.n_swa) if c.n_swa > 0 else h.n_tokens  # unmasked cells only
        return h.n_tokens * c.global_bytes_per_token + swa * c.swa_bytes_per_token + self._ckpt_bytes(h)

    @staticmethod
    def _ckpt_bytes(h: Held) -> float:
        return float(sum(k.nbytes for k in h.checkpoints))

    # -- admission -----------------------------------------------------------------------
    def idle(self) -> list[int]:
        return [i for i, b in enumerate(self.busy) if not b]

    def choose(self, session: int, prompt_tokens: int) -> tuple[int, bool, str] | None:
        """get_available_slot: (slot, update the prompt cache, how chosen), or None when all are busy."""
        idle = self.idle()
        if not idle:
            return None
        c = self.cfg
        best, f_best = -1, 0.0
        if c.similarity != 0.0:
            for i in idle:
                h = self.held[i]
                if h.n_tokens <= 0:
                    continue
                f = self.lcp(h, session, prompt_tokens) / prompt_tokens
                if f > f_best and f > c.similarity:
                    best, f_best = i, f
        if best >= 0:
            f_keep = self.lcp(self.held[best], session, prompt_tokens) / self.held[best].n_tokens
            return best, f_keep < 0.5, "similarity"
        t_last, pick = None, -1
        for i in idle:
            if pick < 0 or self.last_used[i] <= t_last:  # type: ignore[operator]
                t_last, pick = self.last_used[i], i
        return pick, True, "lru"

    def start(self, session: int, prompt_tokens: int) -> Launch | None:
        """Launch a request: choose its slot, update the prompt cache, decide the reused prefix."""
        got = self.choose(session, prompt_tokens)
        if got is None:
            return None
        slot, update, how = got
        c = self.cfg
        h = self.held[slot]
        saved = loaded = 0.0
        from_cache = False
        if update and c.cache_limit_bytes > 0:
            saved = self._save(h)
            entry = self._load_candidate(h, session, prompt_tokens)
            if entry is not None:
                loaded += self.state_bytes(entry)
                self.cache.remove(entry)
                h = entry
                from_cache = True
                if c.n_swa > 0:  # a saved state holds only the window's cells (llama_kv_cache::state_write)
                    h.pos_min = max(0, h.n_tokens - c.n_swa)
            self._evict()
        n_past = self.lcp(h, session, prompt_tokens)
        restored = False
        pos_next = n_past
        if n_past > 0 and n_past <= h.n_tokens:
            thold = max(0, pos_next - c.n_swa - (0 if n_past < prompt_tokens else 1))
            if h.pos_min >= thold:
                ck = next((k for k in reversed(h.checkpoints)
                           if k.pos_max <= pos_next and (k.pos_min < thold or k.pos_min == 0)), None)
                if ck is not None:
                    pos_next = min(pos_next, max(ck.pos_min + 1, ck.pos_max))
                    n_past = min(pos_next, ck.n_tokens)
                    h.pos_min = max(0, ck.pos_max + 1 - c.n_swa)  # the checkpoint holds the window's cells
                    loaded += ck.nbytes
                    restored = True
                else:
                    pos_next, n_past = 0, 0
        h.checkpoints = [k for k in h.checkpoints if k.pos_max <= pos_next]
        if n_past == prompt_tokens and n_past > 0:
            n_past -= 1  # the last prompt token is always evaluated: its logits give the first output
        h.session = session
        h.n_tokens = n_past
        if n_past == 0:
            h.pos_min = -1
        self.held[slot] = h
        self.busy[slot] = True
        return Launch(slot=slot, n_past=n_past, by=how, saved_bytes=saved, loaded_bytes=loaded,
                      from_cache=from_cache and n_past > 0,
                      restored_checkpoint=restored)

    def release(self, slot: int) -> None:
        self.busy[slot] = False
        self.clock += 1
        self.last_used[slot] = self.clock

    # -- prompt processing -------------------------------------------------------------------
    def prompt_chunk(self, slot: int, left: int, room: int) -> int:
        """Prompt tokens this slot adds to a batch with ``room`` tokens free and ``left`` to process."""
        c = self.cfg
        return prompt_chunk(left, room, n_batch=c.n_batch, n_ubatch=c.n_ubatch, checkpoints=c.n_swa > 0)

    def before_prompt_batch(self, slot: int, k: int, left: int) -> float:
        """A checkpoint taken before this batch of ``k`` of the ``left`` prompt tokens; returns bytes copied."""
        c = self.cfg
        h = self.held[slot]
        near_end = left - k < c.n_ubatch
        if c.n_swa <= 0 or not near_end or h.pos_min < 0 or h.n_tokens <= 0:
            return 0.0
        cells = min(h.n_tokens, c.n_swa)  # the window's cells (state_write skips masked ones)
        ck = Checkpoint(n_tokens=h.n_tokens, pos_min=h.pos_min, pos_max=h.n_tokens - 1,
                        nbytes=cells * c.swa_bytes_per_token)
        h.checkpoints = [x for x in h.checkpoints if x.n_tokens != ck.n_tokens]
        while len(h.checkpoints) >= c.n_ctx_checkpoints:
            h.checkpoints.pop(0)
        h.checkpoints.append(ck)
        return ck.nbytes

    def add_tokens(self, slot: int, k: int) -> None:
        """``k`` tokens of the slot's sequence went into its KV cache."""
        h = self.held[slot]
        h.n_tokens += k
        lo = max(h.pos_min, 0)
        h.pos_min = max(lo, h.n_tokens - self.cfg.swa_cells) if self.cfg.n_swa > 0 else 0

    # -- prompt cache -------------------------------------------------------------------------
    def _save(self, h: Held) -> float:
        """prompt_save + server_prompt_cache::alloc; returns bytes copied."""
        if h.n_tokens <= 0 or h.session < 0:
            return 0.0
        for e in self.cache:
            if self.lcp(e, h.session, h.n_tokens) == h.n_tokens:
                return 0.0  # already held in full by an entry
        size = self.state_bytes(h)
        limit = self.cfg.cache_limit_bytes
        if size > limit:
            return 0.0
        self.cache = [e for e in self.cache if self.lcp(h, e.session, e.n_tokens) != e.n_tokens]
        while self.cache and self._cache_bytes() + size > limit:
            self.cache.pop(0)
        self.cache.append(h.copy())
        return size

    def _load_candidate(self, h: Held, session: int, n: int) -> Held | None:
        """server_prompt_cache::load: the entry better than the slot on kept and covered fractions."""
        lcp_best = self.lcp(h, session, n)
        f_keep_best = lcp_best / h.n_tokens if h.n_tokens > 0 else -1.0
        f_sim_best = lcp_best / n
        best = None
        for e in self.cache:
            lcp = self.lcp(e, session, n)
            f_keep = lcp / e.n_tokens
            f_sim = lcp / n
            if f_keep < 0.25:
                continue
            if f_keep_best < f_keep and f_sim_best < f_sim:
                f_keep_best, f_sim_best, best = f_keep, f_sim, e
        return best

    def _cache_bytes(self) -> float:
        return float(sum(self.state_bytes(e) for e in self.cache))

    def _evict(self) -> None:
        while self.cache and self._cache_bytes() > self.cfg.cache_limit_bytes:
            self.cache.pop(0)

    def cache_bytes(self) -> float:
        """Bytes held by the prompt cache now."""
        return self._cache_bytes()
