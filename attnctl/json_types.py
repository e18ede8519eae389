"""Scalars of the wrong kind in settings, refused before pydantic quietly converts them.

Pydantic's lax mode turns ``"7"`` into 7, ``true`` into 1.0 and ``"no"`` into False. In a settings file those are
mistakes (a quoted number, a flag where a number belongs), and a setting silently made of one runs something the user
did not write. :func:`wrong_scalar` walks a value against its field's type and names the first such scalar; the
config bases (controls, schedules) call it in a before-validator. Strict mode would also refuse a JSON list where a
tuple is declared, which every settings file writes, so only the scalar kinds are checked here.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from pydantic import BaseModel, model_validator

_NUMBERS = (int, float)


def _is_flag(value: Any) -> bool:
    """``True`` / ``False``, also as numpy's ``bool_`` or a 0-d bool tensor (what ``x > 0`` gives on arrays)."""
    return isinstance(value, bool) or (str(getattr(value, "dtype", "")) in ("bool", "torch.bool")
                                       and tuple(getattr(value, "shape", (1,))) == ())


def _kind(value: Any) -> str:
    if _is_flag(value):
        return "a true/false flag"
    return "a string" if isinstance(value, str) else type(value).__name__


def _same_shape(value: Any, annotation: Any) -> bool:
    """Whether ``annotation`` (an option of a union) is the container kind ``value`` is: a list for a list, a dict
    for a dict, a scalar for a scalar."""
    while get_origin(annotation) is Annotated:
        annotation = get_args(annotation)[0]
    origin = get_origin(annotation)
    if isinstance(value, list | tuple):
        return origin in (list, tuple, set, frozenset)
    if isinstance(value, Mapping):
        return origin is dict
    return origin is None


def wrong_scalar(value: Any, annotation: Any, where: str) -> str | None:
    """``None`` if ``value`` has no scalar of the wrong kind for ``annotation``, else what is wrong and where (``where``
    names the value, e.g. ``"iterations"``; items are named ``boxes['circle'][0]``). Types it does not know (models,
    schedules, ``Any``) are left to their own validation."""
    origin = get_origin(annotation)
    if origin is Annotated:
        return wrong_scalar(value, get_args(annotation)[0], where)
    if origin in (Union, types.UnionType):
        options = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        found = [wrong_scalar(value, a, where) for a in options]
        if any(f is None for f in found):
            return None
        # the option of the value's own shape says most ("sites[1]=3 is int", not "sites=[...] is list")
        return next((f for f, a in zip(found, options, strict=True) if _same_shape(value, a)), found[0])
    if origin is Literal or annotation is Any:
        return None
    if annotation is bool:
        return None if _is_flag(value) else f"{where}={value!r} is {_kind(value)}, not true or false"
    if annotation in _NUMBERS:
        if _is_flag(value) or isinstance(value, str):
            return f"{where}={value!r} is {_kind(value)}, not a number"
        return None
    if annotation is str:
        return None if isinstance(value, str) else f"{where}={value!r} is {_kind(value)}, not a string"
    if origin in (list, tuple, set, frozenset) and isinstance(value, list | tuple):
        args = [a for a in get_args(annotation) if a is not Ellipsis]
        if not args:
            return None
        for i, item in enumerate(value):
            found = wrong_scalar(item, args[min(i, len(args) - 1)], f"{where}[{i}]")  # list[X], tuple[X, ...]: X
            if found:
                return found
        return None
    if origin is dict and isinstance(value, Mapping):
        args = get_args(annotation)
        if len(args) == 2:
            for k, item in value.items():
                found = wrong_scalar(item, args[1], f"{where}[{k!r}]")
                if found:
                    return found
    return None


def wrong_scalar_in_fields(model: Any, data: Any) -> str | None:
    """:func:`wrong_scalar` over the fields of a pydantic ``model`` class given in the mapping ``data``: every field
    that has one, joined (``None`` if none has)."""
    if not isinstance(data, Mapping):
        return None
    found = [wrong_scalar(data[name], info.annotation, name) for name, info in model.model_fields.items()
             if name in data]
    return "; ".join(f for f in found if f) or None


class ScalarsOfTheirKind(BaseModel):
    """A pydantic model that refuses a scalar of the wrong kind in any field (:func:`wrong_scalar`)."""

    @model_validator(mode="before")
    @classmethod
    def _scalars_of_their_kind(cls, data: Any) -> Any:
        wrong = wrong_scalar_in_fields(cls, data)
        if wrong:
            raise ValueError(f"{wrong}; write numbers without quotes, flags as true / false and names as strings")
        return data
