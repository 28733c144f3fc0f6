"""One registry per concept (``metanet.methods``, ``metanet.objectives``, ``metanet.heads``): a name
-> entry dict that hands out an entry by name or refuses with one line naming the known ones."""

from __future__ import annotations

from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(dict, Generic[T]):
    """``{entry.name: entry}``; ``registry(name)`` is the entry, or a ValueError that says what
    ``kind`` of name was wanted and lists the known ones."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind

    def add(self, entry: T) -> T:
        """Registers an instance (one whose class serves several names, each with its own settings)."""
        self[entry.name] = entry
        return entry

    def register(self, cls: type[T]) -> type[T]:
        """Registers one instance of ``cls``, as a class decorator."""
        self.add(cls())
        return cls

    def __call__(self, name: str) -> T:
        if name not in self:
            raise ValueError(f"{self.kind} must be one of {', '.join(self)}, not {name!r}")
        return self[name]
