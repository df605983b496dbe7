"""llama-server's slot rules (llamatier.serving.slots) on the scenarios a real server was measured in.

The expected numbers are what llama-server (llama-cpp-python 0.3.36's vendored
llama.cpp) reported as ``cache_n`` and ``id_slot`` for Gemma 3 270M (sliding
window 512) with a 256-token shared prefix, 256-token turns and 65 output
tokens (bench/serving_truth.py cases u4-np4-prefix and u4-np2-prefix).
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from llamatier.serving.slots import ServerConfig, Slots, prompt_chunk

OUT = 65  # output tokens; the slot keeps prompt + OUT - 1


def gemma(n_slots: int, *, cache: float = 8 * 2**30, prefix: int = 256) -> Slots:
    return Slots(ServerConfig(n_slots=n_slots, prefix_tokens=prefix, n_swa=512, swa_cells=1024,
                              global_bytes_per_token=3 * 1024, swa_bytes_per_token=15 * 1024,
                              cache_limit_bytes=cache))


def run_prompt(s: Slots, slot: int, n_past: int, prompt: int) -> None:
    """Process the prompt the way the server batches it, then decode OUT - 1 tokens."""
    left = prompt - n_past
    while left:
        k = s.prompt_chunk(slot, left, 2048)
        s.before_prompt_batch(slot, k, left)
        s.add_tokens(slot, k)
        left -= k
    for _ in range(OUT - 1):
        s.add_tokens(slot, 1)


def test_fresh_slots_go_least_recently_used_highest_id_first() -> None:
    s = gemma(4)
    got = [s.start(session=u, prompt_tokens=512) for u in range(4)]
    assert [g.slot for g in got] == [3, 2, 1, 0] and all(g.by == "lru" and g.n_past == 0 for g in got)


def test_turns_on_their_own_slot_reuse_everything() -> None:
    s = gemma(1)
    a = s.start(0, 512)
    run_prompt(s, a.slot, a.n_past, 512)
    s.release(a.slot)
    b = s.start(0, 832)
    assert (b.by, b.n_past) == ("similarity", 576)  # prompt + output - 1, no copies
    assert b.saved_bytes == b.loaded_bytes == 0


def test_a_conversation_back_from_the_prompt_cache_restarts_at_its_checkpoint() -> None:
    # u4-np2-prefix as the server ran it: users 3 and 1 take the two empty slots; as each finishes, a waiting
    # user takes its slot by prefix similarity (saving the finished conversation to the prompt cache) but
    # reprocesses its whole prompt (no checkpoint covers the 256 shared tokens). User 3 returns: its state
    # is loaded back, but a saved state keeps only the window's cells, so the slot restarts from the
    # checkpoint taken 4 tokens before the end of its last prompt: 507 tokens reused, as the server did.
    s = gemma(2)
    u3 = s.start(3, 512)
    u1 = s.start(1, 512)
    assert (u3.slot, u1.slot) == (1, 0)
    for g in (u3, u1):
        run_prompt(s, g.slot, 0, 512)
    s.release(u3.slot)
    u2 = s.start(2, 512)
    assert (u2.slot, u2.by, u2.n_past) == (1, "similarity", 0) and u2.saved_bytes > 0
    run_prompt(s, u2.slot, 0, 512)
    s.release(u1.slot)
    u0 = s.start(0, 512)
    assert (u0.slot, u0.n_past) == (0, 0)
    run_prompt(s, u0.slot, 0, 512)
    s.release(u2.slot)
    back = s.start(3, 832)
    assert back.slot == 1 and back.loaded_bytes > 0 and back.saved_bytes > 0 and back.restored_checkpoint
    assert back.n_past == 507
    run_prompt(s, back.slot, back.n_past, 832)
    s.release(back.slot)
    other = s.start(2, 832)  # user 2's second turn takes the slot back the same way
    assert other.slot == 1 and other.n_past == 507
    run_prompt(s, other.slot, other.n_past, 832)
    s.release(other.slot)
    again = s.start(3, 1152)  # the third turn restarts 4 tokens before the end of the second's prompt
    assert again.n_past == 827


def test_prompt_batches_end_where_checkpoints_are_taken() -> None:
    assert [prompt_chunk(left, 2048, n_batch=2048, n_ubatch=512, checkpoints=True) for left in (556, 516, 300, 4, 3)] \
        == [40, 512, 296, 4, 3]
    assert prompt_chunk(556, 100, n_batch=2048, n_ubatch=512, checkpoints=True) == 40
    assert prompt_chunk(3000, 2048, n_batch=2048, n_ubatch=512, checkpoints=True) == 2048
    assert prompt_chunk(556, 2048, n_batch=2048, n_ubatch=512, checkpoints=False) == 556


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(1, 3)), min_size=1, max_size=25),
       st.integers(1, 4), st.sampled_from([0.0, 40e6, 8e9]))
def test_invariants_under_random_traffic(events: list[tuple[int, int]], n_slots: int, cache: float) -> None:
    s = gemma(n_slots, cache=cache)
    turn: dict[int, int] = {}
    on: dict[int, int] = {}
    for session, _ in events:
        if session in on:  # finish it
            s.release(on.pop(session))
            continue
        t = turn.get(session, 0)
        prompt = 512 + t * 320
        got = s.start(session, prompt)
        if got is None:
            assert all(s.busy)
            continue
        assert 0 <= got.n_past < prompt
        assert got.slot not in on.values()
        run_prompt(s, got.slot, got.n_past, prompt)
        turn[session] = t + 1
        on[session] = got.slot
        assert s.cache_bytes() <= cache + 1e-6
        assert sum(s.busy) == len(on)
        for h in s.held:
            assert all(k.pos_max < h.n_tokens for k in h.checkpoints)
