"""A name → object registry: how losses, advantage estimators and rewards are plugged in (verl's core_algos style).

::

    LOSSES = Registry[PolicyLossFn]("policy loss")

    @LOSSES.register("ppo_clip")
    def ppo_clip(...): ...

    LOSSES.get("ppo_clip")   # the function; an unknown name raises KeyError listing the registered ones

Adding an implementation is one decorated function or class in the module that owns the registry (or any module
imported before the name is looked up); nothing else to edit.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Named implementations of one kind (``kind`` names it in error messages, e.g. "policy loss")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Decorator: register the object under ``name``. A name already taken by another object raises
        ``ValueError`` (registering the same object twice, e.g. on a module reload, is allowed)."""

        def deco(obj: T) -> T:
            if name in self._items and self._items[name] is not obj:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = obj
            return obj

        return deco

    def get(self, name: str) -> T:
        """The object registered under ``name``; an unknown name raises ``KeyError`` listing the valid names."""
        if name not in self._items:
            raise KeyError(self.unknown(name))
        return self._items[name]

    def unknown(self, name: str) -> str:
        """The message for a name that is not registered: ``unknown policy loss 'x'; registered: ['a', 'b']``."""
        return f"unknown {self.kind} {name!r}; registered: {self.names()}"

    def names(self) -> list[str]:
        """Registered names, sorted."""
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self._items)
