"""Declared input schemas: pydantic models whose violations become one-line errors.

Every file llamatier reads (trace ``meta.json``, hardware profiles, workloads) is
checked against a pydantic model declared next to its loader: types (strict: no
``"18"`` for 18, no ``true`` for 1), finite and physical ranges, enums and
cross-field rules. :func:`validate` turns the first violation into one line
naming the file, the field and the rule, e.g.::

    profiles/x.toml: tiers.hbm.read_gb_s: must be greater than 0 (got -1)
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any, TypeVar, get_args

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from llamatier.errors import LlamatierError
from llamatier.units import parse_size_bytes

M = TypeVar("M", bound=BaseModel)


class Strict(BaseModel):
    """Base of declared schemas: strict types, finite numbers, unknown keys are errors."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


class Open(Strict):
    """Like :class:`Strict`, but keys the schema does not declare are kept (forward compatible)."""

    model_config = ConfigDict(extra="allow")


MAX_BYTES = 1 << 60  # 1 EiB: beyond any machine, so that a wrong unit is caught


def _size(value: Any) -> Any:
    """A size: ``"40GiB"``, ``"1.92TB"`` or a number of bytes."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f'must be a size such as "40GiB" or a number of bytes (got {type(value).__name__})')
    if isinstance(value, str):
        try:
            value = parse_size_bytes(value, what="size")
        except LlamatierError:
            raise ValueError(
                f'invalid size {value!r}: must be a size such as "40GiB", "512MB" or a number of bytes'
            ) from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite size (got {value!r})")
    if value < 0:
        raise ValueError(f"must be >= 0 bytes (got {value!r})")
    if value > MAX_BYTES:
        raise ValueError(f"must be at most 1 EiB (got {value!r}): check the unit")
    return int(value)


Size = Annotated[int, BeforeValidator(_size)]
Count = Annotated[int, Field(ge=0)]
Positive = Annotated[int, Field(ge=1)]
NonNegative = Annotated[float, Field(ge=0)]


class RuleError(ValueError):
    """A cross-field rule broken inside a schema validator; ``field`` is relative to the model."""

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(rule)
        self.field = field


def loc_text(loc: tuple[Any, ...]) -> str:
    """``("tiers", "hbm", "capacity")`` -> ``tiers.hbm.capacity``; list indexes as ``[3]``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _model_at(cls: type[BaseModel] | None, loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The schema model that holds the field at ``loc`` (best effort through lists, dicts, unions)."""
    for part in loc:
        if cls is None:
            return None
        if isinstance(part, int):
            continue
        info = cls.model_fields.get(str(part))
        if info is None:
            return None
        found = _models_in(info.annotation)
        cls = found[0] if found else None
    return cls


def _field_extra(cls: type[BaseModel] | None, name: Any) -> dict[str, Any]:
    info = cls.model_fields.get(str(name)) if cls is not None else None
    extra = info.json_schema_extra if info is not None else None
    return extra if isinstance(extra, dict) else {}


def _item_name(cls: type[BaseModel] | None) -> str:
    return str(getattr(cls, "item_name", "key")) if cls is not None else "key"


def _rule_text(e: dict[str, Any], cls: type[BaseModel] | None, root: type[BaseModel] | None) -> tuple[str, str]:
    """(extra location, rule) for one pydantic error."""
    kind = e["type"]
    loc = tuple(e["loc"])
    ctx = e.get("ctx") or {}
    parent = _model_at(root, loc[:-1]) if root is not None else None
    extra = _field_extra(parent, loc[-1]) if loc else {}
    if isinstance(ctx.get("error"), RuleError):
        return ctx["error"].field, str(ctx["error"])
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        if "rule" in extra:
            return "", str(extra["rule"])
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        text = f"must be a number {op} {bound:g}" if isinstance(bound, float) else f"must be a number {op} {bound}"
        if kind in ("less_than", "less_than_equal"):
            text += " (larger is beyond any real system: check the unit)"
        return "", text
    if kind == "extra_forbidden":
        item = _item_name(parent)
        valid = ", ".join(parent.model_fields) if parent is not None else ""
        return "", f"unknown {item}" + (f"; valid {item}s are {valid}" if valid else "")
    if kind == "missing":
        item = _item_name(parent)
        if item == "key" or parent is None:
            return "", "missing"
        if all(f.is_required() for f in parent.model_fields.values()):
            return "", f"missing {item}; all of {', '.join(parent.model_fields)} are needed"
        return "", f"missing {item}"
    simple = {
        "int_type": "must be an integer",
        "int_from_float": "must be an integer",
        "float_type": "must be a number",
        "finite_number": "must be finite",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "list_type": "must be a list",
        "dict_type": "must be a table",
        "model_type": "must be a table",
        "model_attributes_type": "must be a table",
    }
    if kind in simple:
        return "", simple[kind]
    if kind == "literal_error":
        return "", f"must be one of {str(ctx.get('expected', '')).replace(' or ', ', ')}"
    msg = str(e["msg"]).removeprefix("Value error, ").replace("Input should be", "must be")
    return "", msg


def describe(exc: ValidationError, cls: type[BaseModel] | None = None) -> str:
    """The first violation as ``field: rule (got value)``, plus how many more there are."""
    errors = exc.errors(include_url=False)
    e = errors[0]
    sub, rule = _rule_text(e, cls, cls)
    where = loc_text(tuple(e["loc"]) + tuple(p for p in sub.split(".") if p))
    text = f"{where}: {rule}" if where else rule
    shows_value = e["type"] not in ("missing", "value_error", "assertion_error", "extra_forbidden")
    if shows_value and "input" in e and not isinstance(e["input"], dict):
        got = e["input"]
        if got is None:
            text += " (got null)"
        elif "type" in e["type"]:
            text += f" (got {type(got).__name__} {_short(got)})"
        else:
            text += f" (got {_short(got)})"
    if len(errors) > 1:
        text += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return text


def validate(
    cls: type[M],
    data: Any,
    *,
    source: str,
    error: type[LlamatierError] = LlamatierError,
    fix: str = "",
    context: dict[str, Any] | None = None,
) -> M:
    """``cls.model_validate(data)``; a violation raises ``error`` with one line (file, field, rule, fix)."""
    try:
        return cls.model_validate(data, context=context)
    except ValidationError as exc:
        tail = f"; {fix}" if fix else ""
        raise error(f"{source}: {describe(exc, cls)}{tail}") from None


def finite_json(obj: Any) -> Any:
    """``obj`` as plain JSON data with every non-finite number (NaN, +-Infinity) replaced by None.

    numpy scalars and arrays become Python numbers and lists, dataclasses dicts, so that
    ``json.dumps(finite_json(x), allow_nan=False)`` never meets a value JSON cannot hold.
    """
    import dataclasses

    import numpy as np

    if isinstance(obj, bool | np.bool_):
        return bool(obj)
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, float | np.floating):
        return float(obj) if math.isfinite(obj) else None
    if isinstance(obj, np.ndarray):
        return finite_json(obj.tolist())
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite_json(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return finite_json(dataclasses.asdict(obj))
    return obj


def _reject_constant(name: str) -> Any:
    raise ValueError(f"holds {name}, which is not JSON")


def loads_strict_json(text: str) -> Any:
    """``json.loads`` that refuses the NaN / Infinity extensions Python accepts by default."""
    return json.loads(text, parse_constant=_reject_constant)
