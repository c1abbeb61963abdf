"""The update's wire format: versioned plain data that round-trips and names bad fields."""

from __future__ import annotations

import json

import msgpack
import numpy as np
import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from fl.update import ModelUpdate, UpdateFormatError, flatten, layout_of, unflatten

finite = st.floats(allow_nan=False, allow_infinity=False, width=64)
names = st.text(min_size=1, max_size=12)
vectors = st.dictionaries(names, st.lists(finite, max_size=8), max_size=4)


def good_wire() -> dict:
    return ModelUpdate("shop-1", 2, 7, {"w": [1.0, -2.5], "b": [0.25]}).to_wire()


@given(
    participant=names,
    round_=st.integers(0, 2**40),
    examples=st.integers(0, 2**40),
    values=vectors,
)
def test_wire_form_round_trips_exactly_through_json_and_msgpack(
    participant, round_, examples, values
):
    update = ModelUpdate(participant, round_, examples, values)
    wire = update.to_wire()
    assert wire["v"] == 1
    assert ModelUpdate.from_wire(json.loads(json.dumps(wire))) == update
    assert ModelUpdate.from_wire(orjson.loads(orjson.dumps(wire))) == update
    assert ModelUpdate.from_wire(msgpack.unpackb(msgpack.packb(wire))) == update


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"v": None}, "v"),
        ({"v": 2}, "v"),
        ({"participant": ""}, "participant"),
        ({"participant": 3}, "participant"),
        ({"round": -1}, "round"),
        ({"round": "1"}, "round"),
        ({"examples": True}, "examples"),
        ({"examples": -3}, "examples"),
        ({"examples": 1.5}, "examples"),
        ({"vectors": [1.0]}, "vectors"),
        ({"vectors": {"w": "1.0"}}, "vectors.w"),
        ({"vectors": {"w": [1.0, None]}}, "vectors.w"),
        ({"vectors": {"w": [[1.0]]}}, "vectors.w"),
        ({"vectors": {"w": [float("nan")]}}, "vectors.w"),
        ({"vectors": {"w": [float("inf")]}}, "vectors.w"),
        ({"vectors": {"": [1.0]}}, "vectors"),
    ],
)
def test_a_bad_field_is_refused_by_name(change, field):
    with pytest.raises(UpdateFormatError) as caught:
        ModelUpdate.from_wire({**good_wire(), **change})
    assert caught.value.field == field


def test_a_missing_field_is_refused_by_name():
    for field in ("v", "participant", "round", "examples", "vectors"):
        wire = good_wire()
        del wire[field]
        with pytest.raises(UpdateFormatError) as caught:
            ModelUpdate.from_wire(wire)
        assert caught.value.field == field


def test_an_update_does_not_share_the_callers_arrays():
    mine = np.array([1.0, 2.0])
    update = ModelUpdate("a", 0, 1, {"w": mine})
    mine[0] = 99.0
    assert update.vectors["w"][0] == 1.0


@given(vectors)
def test_flatten_and_unflatten_are_inverse(values):
    update = ModelUpdate("a", 0, 1, values)
    back = unflatten(flatten(update.vectors), layout_of(update.vectors))
    assert layout_of(back) == layout_of(update.vectors)
    assert all(np.array_equal(back[k], v) for k, v in update.vectors.items())
