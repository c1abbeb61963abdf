"""The change-stream feed thread (order, empty getMores with their token, errors, ready())
and the mapping of events to changes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pymongo.errors
import pytest
from bson.timestamp import Timestamp

from cdc.mongo_source import MongoChangeStreamSource, _ChangeFeed
from cdc.source import SourceError


class FakeStream:
    """try_next() hands out the scripted answers (a dict, None or an exception), then None."""

    def __init__(self, script: list[Any]) -> None:
        self.script = list(script)
        self.resume_token: Any = None
        self.calls = 0

    def try_next(self) -> Any:
        self.calls += 1
        if not self.script:
            time.sleep(0.01)  # like max_await_ms with nothing new
            return None
        answer = self.script.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        if answer is None:
            self.resume_token = {"t": self.calls}
        return answer


def take(feed: _ChangeFeed, n: int) -> list[tuple[Any, Any]]:
    out: list[tuple[Any, Any]] = []
    for item in feed:
        out.append(item)
        if len(out) == n:
            break
    return out


def test_events_in_order_and_empty_getmores_carry_the_token() -> None:
    events = [{"_id": i} for i in range(5)]
    feed = _ChangeFeed(FakeStream([*events[:3], None, *events[3:]]), threading.Event())
    try:
        got = take(feed, 6)
    finally:
        feed.close()
    assert [e for e, _ in got if e is not None] == events
    assert got[3] == (None, {"t": 4})


def test_ready_counts_events_only() -> None:
    stream = FakeStream([{"_id": 1}])
    feed = _ChangeFeed(stream, threading.Event())
    try:
        deadline = time.monotonic() + 5
        while not feed.ready() and time.monotonic() < deadline:
            time.sleep(0.005)
        assert feed.ready()
        assert take(feed, 1) == [({"_id": 1}, None)]
        time.sleep(0.05)  # now only empty getMores are queued
        assert not feed.ready()
    finally:
        feed.close()


def test_an_error_of_the_stream_is_raised_where_it_is_iterated() -> None:
    error = pymongo.errors.OperationFailure("history lost", code=286)
    feed = _ChangeFeed(FakeStream([{"_id": 1}, error]), threading.Event())
    try:
        it = iter(feed)
        assert next(it) == ({"_id": 1}, None)
        with pytest.raises(pymongo.errors.OperationFailure):
            next(it)
    finally:
        feed.close()


def test_stopping_ends_the_iteration() -> None:
    stopping = threading.Event()
    feed = _ChangeFeed(FakeStream([]), stopping)
    stopping.set()
    started = time.monotonic()
    assert [e for e, _ in feed if e is not None] == []
    assert time.monotonic() - started < 5
    feed.close()


def test_events_that_change_no_row_are_skipped_and_the_end_of_the_stream_is_an_error() -> None:
    # no server-side $match any more: kinds other than row changes are dropped by the source
    source = MongoChangeStreamSource("s", uri="mongodb://127.0.0.1:9", database="d",
                                     collection="c")  # MongoClient connects lazily
    try:
        event = {"operationType": "createIndexes", "clusterTime": None, "_id": {"_data": "1"}}
        assert source._change(event) is None
        insert = {"operationType": "insert", "documentKey": {"_id": 7},
                  "fullDocument": {"_id": 7}, "clusterTime": Timestamp(5, 1),
                  "_id": {"_data": "2"}}
        change = source._change(insert)
        assert change is not None and (change.op, change.pk, change.committed_at) == ("c", "7", 5.0)
        with pytest.raises(SourceError, match="drop event"):
            source._change({"operationType": "drop"})
    finally:
        source.close()
