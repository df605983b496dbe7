"""llama-bench results: read them, and fit and check llamatier's step-time models against them."""

from llamatier.llamabench.reader import (
    FIELDS,
    FORMATS,
    LlamaBenchFormatError,
    format_test,
    parse_llama_bench,
    parse_test_name,
    read_llama_bench,
)

__all__ = [
    "FIELDS",
    "FORMATS",
    "LlamaBenchFormatError",
    "parse_llama_bench",
    "parse_test_name",
    "read_llama_bench",
    "format_test",
]
