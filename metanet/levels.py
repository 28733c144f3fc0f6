"""What a pruning acts on: whole channels (the network gets smaller) or single weights (zeros in
dense layers: a fraction, or N:M). One value each, so code asks ``level is Level.WEIGHTS`` rather
than comparing names."""

from __future__ import annotations

import enum


class Level(str, enum.Enum):
    CHANNELS = "channels"
    WEIGHTS = "weights"

    @classmethod
    def of(cls, value: "Level | str") -> "Level":
        """``value`` as a Level; ValueError naming the known ones."""
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"level must be one of {', '.join(v.value for v in cls)}, not {value!r}") from None
