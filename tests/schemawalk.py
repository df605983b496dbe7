"""Reading a pydantic schema's structure: which model a field holds, whether a field may be null.

The fuzzers use it to pick damage that breaks a declared rule (a null where the schema
does not allow one, a required key removed) without asking the validator itself.
"""

from __future__ import annotations

import types
import typing
from typing import Any


def model_of(annotation: Any) -> Any:
    """The pydantic model inside a field's annotation (``M``, ``M | None``, ``Annotated[M, ...]``), or None."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        if (m := model_of(arg)) is not None:
            return m
    return None


def _inner(annotation: Any) -> Any:
    """``X`` of ``X | None`` or ``Annotated[X, ...]``."""
    while True:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if typing.get_origin(annotation) is typing.Annotated:
            annotation = args[0]
        elif typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
            annotation = args[0]
        else:
            return annotation


def declared_nullable(model: Any, path: tuple[Any, ...]) -> bool:
    """Whether the schema ``model`` lets the field at ``path`` be null (a key it does not declare: yes)."""
    ann: Any = model
    for key in path:
        inner = _inner(ann)
        if typing.get_origin(inner) in (list, dict):  # an item of a list, or of a dict of records
            ann = typing.get_args(inner)[-1]
            continue
        m = model_of(inner)
        if m is None or key not in m.model_fields:
            return True
        ann = m.model_fields[key].annotation
    return type(None) in typing.get_args(ann)
