"""Live config swaps land on the event loop between batches, never inside one."""

from __future__ import annotations

import asyncio
import json
import sys
import threading
import time
from functools import partial
from typing import Any

from streams.app import BetweenBatches
from streams.config_stream import ConfigDocument
from streams.scoring import InputRecord, ScoringPipeline


def config(version: int) -> ConfigDocument:
    return ConfigDocument.from_dict({
        "v": 1, "kind": "qsfraud-config", "version": version, "scope": "*",
        "policy": {"model": {"learning_rate": 0.001 * (version % 50 + 1)}}})


async def score_while_a_thread_offers_configs(
    kit: Any, submit_directly: bool
) -> tuple[list[str], int]:
    """Score batches on the loop while another thread offers a config every ~0.2 ms; the
    batches that changed config (or model parameters) inside, and the last version."""
    pipeline = ScoringPipeline("acme")
    hand = BetweenBatches()
    hand.attach(asyncio.get_running_loop())
    configs = [config(v) for v in range(1, 3001)]
    stop = threading.Event()

    def offer() -> None:
        for doc in configs:
            if stop.is_set():
                return
            change = partial(pipeline.apply_config, doc)
            if submit_directly:  # what the config follower did before: swap from its thread
                change()
            else:
                hand.submit("config", change)
            time.sleep(0.0002)

    thread = threading.Thread(target=offer)
    thread.start()
    mixed: list[str] = []
    offset = 0
    try:
        for b in range(40):
            hand.apply_pending()
            config_before, params_before = pipeline.config, pipeline.model.params
            records = []
            for _ in range(300):
                tx = kit.transaction(offset, "acme")
                records.append(InputRecord(json.dumps(tx).encode(), tx["customer_id"].encode(),
                                           0, offset, time.time(), "acme.transactions"))
                offset += 1
            result = pipeline.process_batch(records)
            versions = {json.loads(d.value)["config_version"] for d in result.decisions}
            if (versions != {config_before.version} or pipeline.config is not config_before
                    or pipeline.model.params is not params_before):
                mixed.append(f"batch {b}: versions {sorted(versions)}")
            await asyncio.sleep(0)  # the loop runs what was handed over, between batches
    finally:
        stop.set()
        thread.join()
    hand.apply_pending()
    return mixed, pipeline.config.version


def test_a_batch_is_always_scored_under_one_config(kit: Any) -> None:
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # as below: the offering thread runs inside batches
    try:
        mixed, last = asyncio.run(score_while_a_thread_offers_configs(kit, False))
    finally:
        sys.setswitchinterval(interval)
    assert mixed == []
    assert last > 1  # configs were applied meanwhile, between batches


def test_swapping_from_the_thread_itself_does_change_batches_midway(kit: Any) -> None:
    """The race the hand-off removes (so the test above can fail): with configs swapped
    from the offering thread, some batches see two configs."""
    interval = sys.getswitchinterval()
    sys.setswitchinterval(0.0005)  # the thread gets the GIL inside a batch, whatever the load
    try:
        mixed, _last = asyncio.run(score_while_a_thread_offers_configs(kit, True))
    finally:
        sys.setswitchinterval(interval)
    assert mixed
