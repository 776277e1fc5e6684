"""Settings checked against their declared types. A field's type says what it may hold: a
`Literal` lists its choices, `Annotated[int, Positive]` bounds it, a tuple or a dataclass holds
settings checked in turn. `check` refuses a value, `parse` reads one from a `--set` string and
`structured` from JSON, each raising ValueError with a one-line message that names the key."""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Collection
from typing import Annotated, Any, Literal


@dataclasses.dataclass(frozen=True)
class Between:
    """A number's range, declared with its field: `Annotated[float, Between(0, 1)]`."""

    low: float
    high: float = math.inf
    closed_left: bool = True
    closed_right: bool = True

    def holds(self, x: float) -> bool:
        above = x >= self.low if self.closed_left else x > self.low
        below = x <= self.high if self.closed_right else x < self.high
        return above and below

    def __str__(self) -> str:
        if self.high == math.inf:
            return f">= {self.low}" if self.closed_left else "positive" if self.low == 0 else f"> {self.low}"
        left, right = "[" if self.closed_left else "(", "]" if self.closed_right else ")"
        return f"in {left}{self.low}, {self.high}{right}"


Positive = Between(0, closed_left=False)
NonNegative = Between(0)
PositiveInt = Annotated[int, Positive]
NonNegativeInt = Annotated[int, NonNegative]
PositiveFloat = Annotated[float, Positive]
NonNegativeFloat = Annotated[float, NonNegative]
Fraction = Annotated[float, Between(0, 1)]
Decay = Annotated[float, Between(0, 1, closed_right=False)]  # a moving average's coefficient


def check(key: str, value: Any, hint: Any) -> None:
    """Refuse `value` unless it is a `hint`: one of a Literal's choices, within an Annotated
    bound, a finite float; tuples and dataclasses are checked item by item, field by field."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is Annotated:
        check(key, value, args[0])
        for bound in args[1:]:
            _require(bound.holds(value), f"{key}={value} must be {bound}")
    elif origin is Literal:
        _require(value in args, f"{key}={value!r}: use {'|'.join(map(str, args))}")
    elif origin in (typing.Union, types.UnionType):
        _require(any(_fits(key, value, arm) for arm in args), _not_a(key, value, hint))
    elif origin is tuple:
        items = args[:1] * len(value) if args[-1:] == (...,) and isinstance(value, tuple) else args
        _require(isinstance(value, tuple) and len(value) == len(items), _not_a(key, value, hint))
        for i, (item, item_hint) in enumerate(zip(value, items, strict=True)):
            check(f"{key}[{i}]", item, item_hint)
    elif dataclasses.is_dataclass(hint):
        _require(isinstance(value, hint), _not_a(key, value, hint))
        hints = typing.get_type_hints(hint, include_extras=True)
        for f in dataclasses.fields(hint):
            check(_join(key, f.name), getattr(value, f.name), hints[f.name])
    elif hint is float:
        _require(isinstance(value, int | float) and not isinstance(value, bool), _not_a(key, value, hint))
        _require(math.isfinite(value), f"{key}={value} is not finite; give a finite number")
    else:  # bool, int, str, None (a bool is not an int here)
        _require(
            isinstance(value, hint) and (hint is bool or not isinstance(value, bool)),
            _not_a(key, value, hint),
        )


def parse(key: str, raw: str, hint: Any) -> Any:
    """`raw` as a value of type `hint`, checked: words for bools, numbers, strings (a Literal's
    choices), null for None, JSON for tuples and dataclasses."""
    bare = _bare(hint)
    args = typing.get_args(bare)
    if typing.get_origin(bare) in (typing.Union, types.UnionType) and type(None) in args:
        if raw.lower() in ("none", "null"):
            return None
        (bare,) = [a for a in args if a is not type(None)]
    words = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
    simple = bare in (bool, int, float, str) or typing.get_origin(bare) is Literal
    try:
        if bare is bool:
            value = words[raw.lower()]
        else:
            value = bare(raw) if bare in (int, float) else raw if simple else json.loads(raw)
    except (KeyError, ValueError):
        raise ValueError(_not_a(key, raw, bare)) from None
    if not simple:
        value = structured(key, value, bare)
    check(key, value, hint)
    return value


def structured(key: str, value: Any, hint: Any, ignored: Collection[str] = ()) -> Any:
    """JSON's lists as tuples and its objects as the dataclass `hint` names, so they compare equal
    to the values they were written from; object keys in `ignored` (full dotted keys) are dropped."""
    hint = _bare(hint)
    if isinstance(value, list):
        args = typing.get_args(hint)
        item = args[0] if typing.get_origin(hint) is tuple and args[-1:] == (...,) else None
        return tuple(structured(f"{key}[{i}]", v, item, ignored) for i, v in enumerate(value))
    if isinstance(value, dict) and dataclasses.is_dataclass(hint):
        hints = typing.get_type_hints(hint)
        kept = {k: v for k, v in value.items() if _join(key, k) not in ignored}
        unknown = sorted(set(kept) - set(hints))
        _require(not unknown, f"{key}: unknown {hint.__name__} fields {unknown}; use {sorted(hints)}")
        return hint(**{k: structured(_join(key, k), v, hints[k], ignored) for k, v in kept.items()})
    return value


def _fits(key: str, value: Any, hint: Any) -> bool:
    try:
        check(key, value, hint)
    except ValueError:
        return False
    return True


def _not_a(key: str, value: Any, hint: Any) -> str:
    return f"{key}={value!r} is not {_described(hint)}; give {_described(hint)}"


def _described(hint: Any) -> str:
    """A type as a user writes its values: `tuple[int, ...]` is "a list of int"."""
    hint = _bare(hint)
    args = typing.get_args(hint)
    if typing.get_origin(hint) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return f"a list of {_described(args[0]).removeprefix('a ').removeprefix('an ')}"
    if typing.get_origin(hint) is tuple:
        count = "a pair" if len(args) == 2 else f"a list of {len(args)}"
        return f"{count} ({', '.join(_described(a) for a in args)})"
    if typing.get_origin(hint) is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if typing.get_origin(hint) in (types.UnionType, typing.Union):
        return " or ".join(_described(a) for a in args)
    if hint is type(None):
        return "null"
    name = hint.__name__ if isinstance(hint, type) else str(hint)
    return f"an {name}" if name[0] in "aeiou" else f"a {name}"


def _bare(hint: Any) -> Any:
    """`hint` without its Annotated bounds."""
    return typing.get_args(hint)[0] if typing.get_origin(hint) is Annotated else hint


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ValueError(message)
