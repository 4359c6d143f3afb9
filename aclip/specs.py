"""Components described as plain data, as checkpoints store them: a class chosen by name from aclip's own
registry, and arguments that are numbers, strings, booleans, None and lists or mappings of those.

A checkpoint's hyper-parameters are data, never instructions: nothing in them may import a module or
call a function of its choosing. `build` therefore looks its `_target_` up among the classes of one
registry (the subclasses of a base class that the running program has defined, e.g. the masking
policies), and rejects anything else, and every other value, before any object is made.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, TypeVar

T = TypeVar("T")

_PLAIN = (str, int, float, bool, type(None))


class SpecError(ValueError):
    """A component description that names no known class, or holds values that are not plain data."""


def is_number(value: Any) -> bool:
    """An int or a float, not a bool (which Python counts as an int)."""
    return isinstance(value, int | float) and not isinstance(value, bool)


def is_integer(value: Any) -> bool:
    """An int, not a bool (which Python counts as an int)."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_plain(value: Any, key: str) -> Any:
    """`value` if it is plain data (numbers, strings, booleans, None, lists and str-keyed mappings of those,
    no `_target_` or other underscore key), else a `SpecError` naming `key`."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, list | tuple):
        return [check_plain(item, f"{key}[{index}]") for index, item in enumerate(value)]
    if isinstance(value, Mapping):
        for name, item in value.items():
            if not isinstance(name, str) or name.startswith("_"):
                raise SpecError(f"{key} has the key {name!r}: only plain arguments are accepted here")
            check_plain(item, f"{key}.{name}")
        return dict(value)
    raise SpecError(f"{key} is a {type(value).__name__}, not plain data (numbers, strings, lists, mappings)")


def class_path(cls: type) -> str:
    """`module.QualifiedName`, as Hydra's `_target_` names a class."""
    return f"{cls.__module__}.{cls.__qualname__}"


def build(spec: Mapping[str, Any], registry: Mapping[str, type[T]], key: str) -> T | Callable[..., T]:
    """The object that `spec` (`{"_target_": <class path>, **arguments}`) describes, its class taken from
    `registry` (class path -> class) and its arguments checked to be plain data. With `_partial_: true`,
    as in Hydra, the class with those arguments bound, to be called with the rest."""
    if not isinstance(spec, Mapping):
        raise SpecError(f"{key} must be a mapping with a `_target_`, got {type(spec).__name__}")
    arguments = dict(spec)
    target = arguments.pop("_target_", None)
    is_partial = arguments.pop("_partial_", False)
    cls = registry.get(target) if isinstance(target, str) else None
    if cls is None:
        known = ", ".join(sorted(registry))
        raise SpecError(
            f"{key}._target_={target!r} is not one of aclip's known classes here ({known}). A class defined "
            "in another module must be imported (by the config that trains with it) before it is named"
        )
    if is_partial is True:
        return partial(cls, **check_plain(arguments, key))
    return cls(**check_plain(arguments, key))
