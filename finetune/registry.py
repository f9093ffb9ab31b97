"""The ``@register("name")`` decorator every registry of dataclass options shares (strategies, data sources).

A registry is a plain ``dict`` from option name to class; it sits below what registers in it,
so nothing here imports a strategy or a source.
"""

from __future__ import annotations

from typing import Callable, TypeVar

__all__ = ["registrar"]

T = TypeVar("T", bound=type)


def registrar(table: dict[str, type], key_field: str) -> Callable[[str], Callable[[T], T]]:
    """A ``register(name)`` class decorator adding dataclasses to ``table``.

    The class's ``key_field`` must default to ``name``, so a config of that option names itself.
    """

    def register(name: str) -> Callable[[T], T]:
        def add(cls: T) -> T:
            if cls.__dataclass_fields__[key_field].default != name:  # type: ignore[attr-defined]
                raise TypeError(f"{cls.__name__}.{key_field} must default to '{name}'")
            table[name] = cls
            return cls

        return add

    return register
