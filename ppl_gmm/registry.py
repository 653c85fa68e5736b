"""Name → implementation lookups for models and backends; adding one is adding a file."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from .errors import UserError

__all__ = ["Registry"]

T = TypeVar("T")


class Registry(Generic[T]):
    """A mapping from names to implementations that fails with the known names listed."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}
        # registers items from elsewhere (other packages' entry points) at the first lookup, not
        # at import: a module found that way may import this package itself
        self.loader: Callable[[], None] | None = None

    def _load(self) -> None:
        loader, self.loader = self.loader, None
        if loader is not None:
            loader()

    def register(self, name: str) -> Callable[[T], T]:
        def add(item: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = item
            return item

        return add

    def get(self, name: str, field: str | None = None) -> T:
        self._load()
        try:
            return self._items[name]
        except KeyError:
            where = f"{field}: " if field else ""
            known = ", ".join(sorted(self._items))
            raise UserError(f"{where}unknown {self.kind} {name!r}. Known {self.kind}s: {known}.") from None

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(sorted(self._items))
