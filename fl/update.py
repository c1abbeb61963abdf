"""What a participant sends after a round: named numeric vectors, plain data, versioned.

A :class:`ModelUpdate` holds the participant's parameters after its local learning this round
(``dict[str, np.ndarray]``, 1-D float64 vectors), how many examples it learned *this round*,
its id and the round number. On the wire it is a JSON/msgpack-able dict with an explicit
version; never pickle. Errors name the field (:class:`UpdateFormatError`).

>>> import numpy as np
>>> update = ModelUpdate("retailer-a", 3, 120, {"w": np.array([0.5, -1.0]), "b": np.array([2.0])})
>>> wire = update.to_wire()
>>> wire["v"], wire["participant"], wire["round"], wire["examples"], wire["vectors"]["w"]
(1, 'retailer-a', 3, 120, [0.5, -1.0])
>>> ModelUpdate.from_wire(wire) == update
True
>>> ModelUpdate.from_wire({**wire, "v": 2})
Traceback (most recent call last):
...
fl.update.UpdateFormatError: v: unsupported update version 2 (this code reads 1)
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from fl.watchlist import WatchFormatError, check_keys

WIRE_VERSION = 1

# Named 1-D float64 vectors: a model's parameters, or a change to them.
Vectors = dict[str, np.ndarray]
# The names and lengths of a set of vectors, sorted by name.
Layout = tuple[tuple[str, int], ...]


class UpdateFormatError(ValueError):
    """An update (or a set of vectors) that does not have the required shape; names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def as_vectors(vectors: Mapping[str, Any], what: str = "vectors") -> Vectors:
    """Copies ``vectors`` as 1-D float64 arrays; refuses empty names, other ranks and NaN/inf.

    >>> as_vectors({"w": [1, 2]})
    {'w': array([1., 2.])}
    >>> as_vectors({"w": [float("nan")]})
    Traceback (most recent call last):
    ...
    fl.update.UpdateFormatError: vectors.w: not finite
    """
    if not isinstance(vectors, Mapping):
        raise UpdateFormatError(what, "must be a mapping of name to vector")
    out: Vectors = {}
    for name, values in vectors.items():
        where = f"{what}.{name}"
        if not isinstance(name, str) or not name:
            raise UpdateFormatError(what, f"names must be non-empty strings, got {name!r}")
        try:
            array = np.array(values, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise UpdateFormatError(where, f"not numeric ({error})") from None
        if array.ndim != 1:
            raise UpdateFormatError(where, f"must be a 1-D vector, got {array.ndim} dimensions")
        if not np.isfinite(array).all():
            raise UpdateFormatError(where, "not finite")
        out[name] = array
    return out


def layout_of(vectors: Mapping[str, np.ndarray]) -> Layout:
    """The sorted ``(name, length)`` pairs of ``vectors``.

    >>> layout_of({"w": np.zeros(3), "b": np.zeros(1)})
    (('b', 1), ('w', 3))
    """
    return tuple((name, len(vectors[name])) for name in sorted(vectors))


def check_layout(vectors: Mapping[str, np.ndarray], expected: Layout, what: str) -> None:
    """Refuses ``vectors`` whose names or lengths differ from ``expected``."""
    got = layout_of(vectors)
    if got != expected:
        missing = sorted({n for n, _ in expected} - set(vectors))
        extra = sorted(set(vectors) - {n for n, _ in expected})
        raise UpdateFormatError(
            what,
            f"layout differs from the global model's (missing {missing}, unexpected {extra}, "
            f"lengths {dict(got)} vs {dict(expected)})",
        )


def flatten(vectors: Mapping[str, np.ndarray]) -> np.ndarray:
    """All vectors end to end, in name order (the order of :func:`layout_of`)."""
    if not vectors:
        return np.zeros(0)
    return np.concatenate([vectors[name] for name in sorted(vectors)])


def unflatten(flat: np.ndarray, layout: Layout) -> Vectors:
    """The inverse of :func:`flatten` for ``layout``.

    >>> v = {"w": np.array([1.0, 2.0]), "b": np.array([3.0])}
    >>> unflatten(flatten(v), layout_of(v))
    {'b': array([3.]), 'w': array([1., 2.])}
    """
    out: Vectors = {}
    start = 0
    for name, length in layout:
        out[name] = np.array(flat[start : start + length])
        start += length
    if start != len(flat):
        raise UpdateFormatError("vectors", f"{len(flat)} values for a layout of {start}")
    return out


def hashed_keys(value: Any, what: str) -> tuple[str, ...]:
    """``value`` as keyed hashes of entities (:func:`fl.watchlist.entity_key`), or
    :class:`UpdateFormatError`: a raw identifier never passes."""
    try:
        return tuple(check_keys(value, what))
    except WatchFormatError as error:
        raise UpdateFormatError(what, str(error).split(": ", 1)[-1]) from None


def _int_field(wire: Mapping[str, Any], name: str, minimum: int) -> int:
    value = wire.get(name)
    if isinstance(value, bool) or not isinstance(value, int):
        raise UpdateFormatError(name, f"must be an integer, got {type(value).__name__}")
    if value < minimum:
        raise UpdateFormatError(name, f"must be >= {minimum}, got {value}")
    return value


def read_header(wire: Any) -> tuple[str, int]:
    """``(participant, round)`` of a versioned wire dict, after checking ``v``."""
    if not isinstance(wire, Mapping):
        raise UpdateFormatError("update", "must be a mapping")
    version = wire.get("v")
    if version != WIRE_VERSION:
        raise UpdateFormatError(
            "v", f"unsupported update version {version!r} (this code reads {WIRE_VERSION})"
        )
    participant = wire.get("participant")
    if not isinstance(participant, str) or not participant:
        raise UpdateFormatError("participant", "must be a non-empty string")
    return participant, _int_field(wire, "round", 0)


@dataclass(frozen=True, eq=False)
class ModelUpdate:
    """One participant's parameters after a round, and the examples it learned in that round."""

    participant: str
    round: int
    examples: int
    vectors: Vectors = field(repr=False)
    watch: tuple[str, ...] = ()
    """Keyed hashes of the entities this participant held since its last update
    (:mod:`fl.watchlist`); on the wire only when there are some."""
    watch_new: tuple[str, ...] = ()
    """Keyed hashes of the devices this participant saw for the first time since its last
    update (``--fl-watch-new-devices``); on the wire only when there are some."""

    def __post_init__(self) -> None:
        if not isinstance(self.participant, str) or not self.participant:
            raise UpdateFormatError("participant", "must be a non-empty string")
        if self.round < 0:
            raise UpdateFormatError("round", f"must be >= 0, got {self.round}")
        if self.examples < 0:
            raise UpdateFormatError("examples", f"must be >= 0, got {self.examples}")
        object.__setattr__(self, "vectors", as_vectors(self.vectors))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ModelUpdate):
            return NotImplemented
        return (
            (self.participant, self.round, self.examples)
            == (other.participant, other.round, other.examples)
            and layout_of(self.vectors) == layout_of(other.vectors)
            and all(np.array_equal(v, other.vectors[k]) for k, v in self.vectors.items())
            and self.watch == other.watch
            and self.watch_new == other.watch_new
        )

    __hash__ = None  # type: ignore[assignment]  # mutable arrays inside

    def to_wire(self) -> dict[str, Any]:
        """The versioned plain-data form (floats round-trip exactly through JSON)."""
        return {
            "v": WIRE_VERSION,
            "participant": self.participant,
            "round": self.round,
            "examples": self.examples,
            "vectors": {name: self.vectors[name].tolist() for name in sorted(self.vectors)},
            **({"watch": list(self.watch)} if self.watch else {}),
            **({"watch_new": list(self.watch_new)} if self.watch_new else {}),
        }

    @classmethod
    def from_wire(cls, wire: Any) -> ModelUpdate:
        """Reads :meth:`to_wire`'s form; :class:`UpdateFormatError` names the first bad field."""
        participant, round_ = read_header(wire)
        examples = _int_field(wire, "examples", 0)
        vectors = wire.get("vectors")
        if not isinstance(vectors, Mapping):
            raise UpdateFormatError("vectors", "must be a mapping of name to list of numbers")
        for name, values in vectors.items():
            if not isinstance(values, Sequence) or isinstance(values, str | bytes):
                raise UpdateFormatError(f"vectors.{name}", "must be a list of numbers")
            if not all(
                isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)
                for x in values
            ):
                raise UpdateFormatError(f"vectors.{name}", "must hold finite numbers only")
        return cls(participant, round_, examples, as_vectors(vectors),
                   hashed_keys(wire.get("watch", []), "watch"),
                   hashed_keys(wire.get("watch_new", []), "watch_new"))
