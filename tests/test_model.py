"""GGUF header reading: the fast reader agrees with the gguf package's own reader."""

from __future__ import annotations

from pathlib import Path

import pytest

from llamatier.errors import ModelLoadError
from llamatier.gguf_header import LongArray, read_gguf_header
from llamatier.model import read_model_info
from llamatier.tinymodel import write_tiny_gguf


def test_fast_header_matches_gguf_reader(tiny_gemma_model: Path) -> None:
    from gguf import GGUFReader

    ours = read_gguf_header(tiny_gemma_model)
    ref = GGUFReader(str(tiny_gemma_model), "r")
    assert set(ours.fields) == set(ref.fields) - {k for k in ref.fields if k.startswith("GGUF.")}
    for key, f in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        v = ours.fields[key]
        if isinstance(v, LongArray):
            assert len(v) == len(f.contents())
        elif isinstance(v, float):
            assert v == pytest.approx(f.contents())
        else:
            assert v == f.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    assert [t.n_bytes for t in ours.tensors] == [int(t.n_bytes) for t in ref.tensors]
    assert [t.n_elements for t in ours.tensors] == [int(t.n_elements) for t in ref.tensors]


def test_model_info_of_tiny_models(tiny_model: Path, tiny_gemma_model: Path) -> None:
    m = read_model_info(tiny_model)
    assert (m.architecture, m.n_layers, m.n_head, m.n_embd) == ("llama", 2, 4, 64)
    assert m.geometry.n_head_kv == (2, 2) and m.geometry.head_dim_k == (16, 16)
    assert m.geometry.sliding_window == (0, 0)
    assert m.weight_bytes == 4 * m.n_params  # every tensor of the tiny model is f32
    assert m.weight_bytes < tiny_model.stat().st_size and m.n_vocab > 259
    g = read_model_info(tiny_gemma_model)
    assert g.geometry.sliding_window == (64, 0)  # pattern 2: layer 0 windowed, layer 1 global
    assert "sliding_window_pattern = 2" in g.swa_source


@pytest.mark.gemma
def test_gemma_header(gemma_model: Path) -> None:
    m = read_model_info(gemma_model)
    assert m.architecture == "gemma3" and m.n_layers == 18 and m.file_type == "Q4_K_M"
    assert m.geometry.head_dim_k == (256,) * 18  # not n_embd / n_head = 160
    assert m.geometry.n_head_kv == (1,) * 18
    assert [i for i, w in enumerate(m.geometry.sliding_window) if w == 0] == [5, 11, 17]
    assert m.n_vocab == 262144


def test_truncated_header_is_a_model_load_error(tmp_path: Path) -> None:
    p = write_tiny_gguf(tmp_path / "t.gguf")
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(p.read_bytes()[:2000])
    with pytest.raises(ModelLoadError, match="truncated or corrupt"):
        read_model_info(cut)
