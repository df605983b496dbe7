"""Ways to break profile and workload TOML files (the trace ones are in tests/corruption.py).

Each file lives alone in its own folder, so that the byte-level operations of
tests/corruption.py (``flip_byte``, ``truncate`` ...) apply to it unchanged.

* ``TEXT_OPS``: damage to the text (flipped or zeroed bytes, truncation, appended
  garbage). A TOML file carries no checksum, so a flipped digit can make another
  valid file: the outcome must be a one-line error or a run (never a traceback).
* ``FIELD_OPS``: edits that always break a rule of the declared schema (a value of
  the wrong type, a non-finite, negative or absurd number, an unknown enum value or
  key, a required key removed, a table replaced by a value): the outcome must be a
  one-line error, or a result identical to the clean file's.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from tests.corruption import (
    Op,
    _get,
    _leaves,
    _set,
    append_garbage,
    flip_byte,
    truncate,
    zero_range,
)
from tests.schemawalk import model_of

# Keys whose value is free text: another string is a valid file, not a corrupt one.
_FREE_TEXT = {"name", "description", "notes", "model_name", "fitted_on", "fitted_models", "kind"}
_INT_OR_LIST = {"turns"}  # an integer n is a valid [n, n]
_SIZE_KEYS = {"capacity", "cache_ram", "hbm_budget", "dram_budget", "ssd_budget", "remote_budget"}


def toml_file(d: Path) -> Path:
    return next(f for f in d.iterdir() if f.suffix == ".toml")


def read_doc(d: Path) -> dict[str, Any]:
    return tomllib.loads(toml_file(d).read_text())


def _value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf") if math.isinf(v) else repr(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} = {_value(x)}" for k, x in v.items()) + "}"
    raise TypeError(type(v))


def dump_toml(doc: dict[str, Any], prefix: str = "") -> str:
    """``doc`` as TOML text: a table's plain values first, then its sub-tables (non-empty ones)."""
    lines = [f"{k} = {_value(v)}" for k, v in doc.items() if not (isinstance(v, dict) and v)]
    text = "\n".join(lines) + ("\n" if lines else "")
    for k, v in doc.items():
        if isinstance(v, dict) and v:
            name = f"{prefix}.{k}" if prefix else k
            text += f"\n[{name}]\n" + dump_toml(v, name)
    return text


def write_doc(d: Path, doc: dict[str, Any]) -> None:
    toml_file(d).write_text(dump_toml(doc))


def _free_text(path: tuple[Any, ...]) -> bool:
    keys = [k for k in path if isinstance(k, str)]
    return bool(keys) and (keys[-1] in _FREE_TEXT or keys[-2:] == ["host_model", "traces"])


def hostile_toml_value(path: tuple[Any, ...], value: Any, rnd: random.Random) -> Any:
    """A value that no rule of the schema accepts at ``path`` (whose clean value is ``value``)."""
    key = next((k for k in reversed(path) if isinstance(k, str)), "")
    if isinstance(value, bool):
        pool: list[Any] = ["yes", 1, 0, 1.5, []]
    elif isinstance(value, int | float):
        pool = ["abc", True, [], {}, math.nan, math.inf, -math.inf, -abs(value) - 1, 1.5e300]
    elif isinstance(value, str):
        pool = [True, [], {}, math.nan]
        if key in _SIZE_KEYS:
            pool += ["-5GiB", "bogus", "1e400GiB", "nanGiB", 1.5e300, -1]
        elif not _free_text(path):
            pool += [7, "", "bogus-value"]
    elif isinstance(value, list):
        pool = [True, {}] if _free_text(path) else [True, {}, "bogus-value"]
        if key not in _INT_OR_LIST:
            pool.append(7)
    else:  # a table
        pool = [7, "abc", [1, 2]]
    return rnd.choice(pool)


def field_hostile(d: Path, rnd: random.Random) -> str:
    doc = read_doc(d)
    paths = [p for p in _leaves(doc) if p]
    path = rnd.choice(paths + [p[:-1] for p in paths if len(p) > 1 and isinstance(p[-2], str)])
    old = _get(doc, path)
    new = hostile_toml_value(path, old, rnd)
    _set(doc, path, new)
    write_doc(d, doc)
    return f"{'.'.join(map(str, path))}: {old!r} -> {new!r}"


def required_paths(model: type[BaseModel], doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Keys of ``doc`` that ``model`` declares required (by the schema's structure alone)."""
    out = []
    for key, info in model.model_fields.items():
        if key not in doc:
            continue
        if info.is_required():
            out.append((*prefix, key))
        sub = model_of(info.annotation)
        if sub is not None and isinstance(doc[key], dict):
            out += required_paths(sub, doc[key], (*prefix, key))
    return out


def delete_required(model: type[BaseModel]) -> Op:
    def op(d: Path, rnd: random.Random) -> str:
        doc = read_doc(d)
        path = rnd.choice(required_paths(model, doc))
        del _get(doc, path[:-1])[path[-1]]
        write_doc(d, doc)
        return f"delete {'.'.join(path)}"

    return op


def unknown_key(d: Path, rnd: random.Random) -> str:
    doc = read_doc(d)
    tables = [()] + [p for p in _leaves_tables(doc)]
    path = rnd.choice(tables)
    _get(doc, path)[rnd.choice(["bogus_key", "read_gbs", "count_"])] = 1
    write_doc(d, doc)
    return f"unknown key in [{'.'.join(path)}]"


def _leaves_tables(obj: dict[str, Any], path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    out = []
    for k, v in obj.items():
        if isinstance(v, dict):
            out += [(*path, k), *_leaves_tables(v, (*path, k))]
    return out


TEXT_OPS: dict[str, Op] = {
    "flip-byte": flip_byte,
    "truncate": truncate,
    "append-garbage": append_garbage,
    "zero-range": zero_range,
}


def field_ops(model: type[BaseModel]) -> dict[str, Op]:
    """The schema-breaking edits of a file declared by ``model``."""
    return {"field": field_hostile, "delete-required": delete_required(model), "unknown-key": unknown_key}

