"""Trace format, writer, reader and the llama.cpp tracer."""

from llamatier.trace.format import FORMAT_VERSION
from llamatier.trace.reader import Trace, load_trace, read_meta
from llamatier.trace.writer import TraceWriter

__all__ = ["FORMAT_VERSION", "Trace", "TraceWriter", "load_trace", "read_meta"]
