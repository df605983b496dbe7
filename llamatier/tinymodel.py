"""Write a tiny random-weight GGUF model that llama.cpp loads in milliseconds.

Used by the test suite and benchmarks so that they run the real llama.cpp
without downloading weights. Llama architecture by default (2 layers,
n_embd 64, 4 heads, 2 KV heads); ``gemma3`` gives a sliding-window variant.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

_WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this "
    "be or has had not but have one their they its also after first new who two been more "
    "other some time into all when would there over only can most may many these than such "
    "model cache token memory attention layer block tier host disk fast slow read write step "
    "data run test value small large long short high low hot warm cold place move keep drop "
    "a b c d e f g h i j k l m n o p q r s t u v w x y z"
).split()


def _vocab() -> tuple[list[str], list[float], list[int]]:
    tokens = ["<unk>", "<s>", "</s>"]
    types = [2, 3, 3]  # UNKNOWN, CONTROL, CONTROL
    for b in range(256):
        tokens.append(f"<0x{b:02X}>")
        types.append(6)  # BYTE
    seen = set(tokens)
    for w in _WORDS:
        for piece in ("\u2581" + w, w):
            if piece not in seen:
                seen.add(piece)
                tokens.append(piece)
                types.append(1)  # NORMAL
    scores = [0.0, 0.0, 0.0] + [-1000.0] * 256 + [-float(i) for i in range(len(tokens) - 259)]
    return tokens, scores, types


def write_tiny_gguf(
    path: str | Path,
    *,
    arch: str = "llama",
    n_layers: int = 2,
    n_embd: int = 64,
    n_head: int = 4,
    n_head_kv: int = 2,
    n_ff: int = 128,
    n_ctx_train: int = 8192,
    sliding_window: int = 64,
    swa_pattern: int = 2,
    qk_scale: float = 0.4,
    seed: int = 0,
) -> Path:
    """Write a random-weight model and return its path. Deterministic for a given seed."""
    import gguf

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hd = n_embd // n_head
    tokens, scores, types = _vocab()
    n_vocab = len(tokens)

    w = gguf.GGUFWriter(str(path), arch)
    w.add_name(f"llamatier-tiny-{arch}")
    w.add_context_length(n_ctx_train)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layers)
    w.add_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    if arch == "llama":
        w.add_rope_dimension_count(hd)
    if arch == "gemma3":
        w.add_sliding_window(sliding_window)
        w.add_uint32(f"{arch}.attention.sliding_window_pattern", swa_pattern)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_unk_token_id(0)
    w.add_add_bos_token(True)

    def t(name: str, *shape: int, scale: float = 0.05) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * scale).astype(np.float32))

    def ones(name: str, n: int) -> None:
        w.add_tensor(name, np.ones(n, dtype=np.float32))

    t("token_embd.weight", n_vocab, n_embd, scale=0.5)
    ones("output_norm.weight", n_embd)
    t("output.weight", n_vocab, n_embd, scale=0.5)
    for i in range(n_layers):
        p = f"blk.{i}."
        ones(p + "attn_norm.weight", n_embd)
        t(p + "attn_q.weight", n_head * hd, n_embd, scale=qk_scale)
        t(p + "attn_k.weight", n_head_kv * hd, n_embd, scale=qk_scale)
        t(p + "attn_v.weight", n_head_kv * hd, n_embd)
        t(p + "attn_output.weight", n_embd, n_head * hd)
        ones(p + "ffn_norm.weight", n_embd)
        t(p + "ffn_gate.weight", n_ff, n_embd)
        t(p + "ffn_up.weight", n_ff, n_embd)
        t(p + "ffn_down.weight", n_embd, n_ff)
        if arch == "gemma3":
            ones(p + "attn_q_norm.weight", hd)
            ones(p + "attn_k_norm.weight", hd)
            ones(p + "post_attention_norm.weight", n_embd)
            ones(p + "post_ffw_norm.weight", n_embd)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
