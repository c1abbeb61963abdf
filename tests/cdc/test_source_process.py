"""The pipe between the reader process and the pipeline: items in order, EOF is an error."""

from __future__ import annotations

import multiprocessing
import queue

import pytest

from cdc.encoder import EncodedTransaction
from cdc.source import SourceError
from cdc.source_process import DONE, PipeQueue, _grow_pipe, _send


def test_items_arrive_in_order_then_eof_is_a_source_error() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    _grow_pipe(writer)
    pipe = PipeQueue(reader)
    assert pipe.empty()
    with pytest.raises(queue.Empty):
        pipe.get(timeout=0.01)
    items = [EncodedTransaction([(0, b"k", b"{}"), (1, b"k", None)], [1.5, 1.5], {"pos": i})
             for i in range(3)]
    for item in items:
        _send(writer, item)
    _send(writer, DONE)
    assert not pipe.empty()
    assert [pipe.get(timeout=1) for _ in items] == items
    assert pipe.get(timeout=1) == DONE
    writer.close()
    with pytest.raises(SourceError, match="reader process exited"):
        pipe.get(timeout=1)


def test_a_list_message_is_handed_out_one_by_one() -> None:
    reader, writer = multiprocessing.Pipe(duplex=False)
    pipe = PipeQueue(reader)
    items = [EncodedTransaction([(0, b"k", b"{}")], [1.0], {"pos": i}) for i in range(3)]
    _send(writer, items)
    _send(writer, DONE)
    assert pipe.get(timeout=1) == items[0]
    assert not pipe.empty()  # two more of the same message are waiting
    assert [pipe.get(timeout=1), pipe.get(timeout=1)] == items[1:]
    assert pipe.get(timeout=1) == DONE
    assert pipe.empty()
    writer.close()
