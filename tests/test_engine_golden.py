"""The replay engine keeps the results of the whole-array engine it replaced, bit for bit."""

from __future__ import annotations

import json

import pytest

from tests.engine_cases import GOLDEN, POLICIES, all_cases, digest_of

CASES = all_cases()
GOLDEN_DIGESTS = json.loads(GOLDEN.read_text())


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_replay_digests_are_unchanged(case) -> None:
    want = GOLDEN_DIGESTS[case["id"]]
    got = {p: digest_of(case, p) for p in POLICIES}
    assert got == want
