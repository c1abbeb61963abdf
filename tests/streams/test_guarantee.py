"""The worker offers one processing guarantee (at-least-once + dedup by tx_id), and no
option that would claim another."""

from __future__ import annotations

import dataclasses

import pytest

from qsfraud.cli import build_parser
from streams.settings import WorkerSettings


def test_there_is_no_exactly_once_option() -> None:
    parser = build_parser()
    assert parser.parse_args(["worker", "--retailer", "acme"]).command == "worker"
    with pytest.raises(SystemExit):
        parser.parse_args(["worker", "--retailer", "acme",
                           "--processing-guarantee", "exactly_once"])
    assert "processing_guarantee" not in {f.name for f in dataclasses.fields(WorkerSettings)}
