"""``qsfraud bench api``: POST /v1/score at a steady rate against one worker.

(0) ``--one-at-a-time`` requests, each sent when the previous one is answered: the latency
    without any queue;
(a) latency: ``--rate`` requests a second (default 200, open loop: each request starts on
    its schedule, whatever the earlier ones do) of ``POST /v1/score`` for ``--seconds``
    after ``--warmup-seconds`` at that rate; request -> decision latency (the whole HTTP
    round trip: validate, produce to ``<R>.transactions``, the worker's batch, its state
    acknowledged, the answer), and the worker's CPU per request;
(b) the cost to the worker's throughput: a backlog of ``--backlog`` CDC transactions drained
    by the same worker without requests, then another with requests at ``--rate``
    (throughputs from the decisions' ``decided`` times, first to last).

Where the time of (a) goes: ``phases_ms`` gives ``[p50, p99]`` of each part of a request,
from the worker's stamps (the ``X-Qsfraud-Timings`` header) and the decision's ``timings``:
``to_handler`` (client sent -> the worker's handler entered: the client, the HTTP server and
the worker's loop), ``validate``, ``produce_ack`` (the group write until Kafka acknowledged
it), ``produced_to_received`` (the consumer's fetch and the queue before a batch), ``batch``,
``decided_to_durable`` (the batch's state acknowledged), ``durable_to_answered`` (the
waiting handler woken and run), ``to_client``. ``client_late_ms``
is how late the client started requests against their schedule (its own queue), and
``*_cpu_ms_per_request`` the CPU the worker, the client and the broker spent per request.

The client runs on the same machine (aiohttp, one connection pool). Runs its own ephemeral
Kafka unless ``--bootstrap`` is given. The last line is JSON:
``{"p50_ms", "p99_ms", "requests_per_s" (the rate the client reached), "pending", "errors",
"phases_ms", "p50_ms_one_at_a_time", "worker_tx_per_s", "worker_tx_per_s_with_api",
"throughput_cost", "worker_cpu_ms_per_request", "load_avg_1m", ...}``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
from confluent_kafka import Consumer, Producer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from fraud.topics import RetailerTopics  # noqa: E402
from qsfraud.worker_process import WorkerProcess  # noqa: E402

TIMINGS = "X-Qsfraud-Timings"  # streams.api.TIMINGS: the worker's stamps of a request
TOKEN = "bench-api-token"
RETAILER = "bench_api"


def transaction(i: int, prefix: str, rng: random.Random, retailer: str) -> dict[str, Any]:
    customer = f"c{rng.randrange(5000)}"
    return {"tx_id": f"{prefix}-{i}", "retailer_id": retailer,
            "amount": round(rng.uniform(5, 400), 2), "customer_id": customer,
            "payment_instrument": f"pi-{customer}-{rng.randrange(2)}",
            "device_id": f"d{rng.randrange(4000)}", "ip": f"10.{rng.randrange(250)}.0.1",
            "occurred_at": time.time()}


async def load(port: int, rate: float, seconds: float, prefix: str, rng: random.Random,
               retailer: str) -> dict[str, Any]:
    """``rate`` requests a second for ``seconds``; latencies of those answered 200."""
    url = f"http://127.0.0.1:{port}/v1/score?wait_ms=5000"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies: list[float] = []
    phases: list[dict[str, float]] = []
    late: list[float] = []  # each request's start after its schedule: the client's own queue
    statuses: dict[int, int] = {}
    n = int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=400)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(i: int, due: float) -> None:
            body = json.dumps(transaction(i, prefix, rng, retailer)).encode()
            late.append(time.perf_counter() - due)
            sent = time.time()
            started = time.perf_counter()
            try:
                async with session.post(url, data=body, headers=headers) as r:
                    answer = await r.read()
                    status = r.status
                    stamps = r.headers.get(TIMINGS, "")
            except aiohttp.ClientError:
                status = 0
            if status == 200:
                latencies.append(time.perf_counter() - started)
                phases.append(phases_of(sent, stamps, answer, time.time()))
            statuses[status] = statuses.get(status, 0) + 1

        start = time.perf_counter()
        tasks = []
        for i in range(n):
            due = start + i / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(i, due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return {"latencies": latencies, "statuses": statuses, "sent": n,
            "requests_per_s": n / elapsed, "phases": phases, "late": late}


PHASES: tuple[tuple[str, str, str], ...] = (
    ("to_handler", "sent", "entered"),  # the client, the HTTP server, the worker's loop
    ("validate", "entered", "validated"),
    ("produce_ack", "validated", "acked"),  # the group write, until Kafka acknowledged it
    ("produced_to_received", "produced", "received"),  # fetch, then the queue before a batch
    ("batch", "received", "decided"),
    ("decided_to_durable", "decided", "durable"),  # the batch's state acknowledged
    ("durable_to_answered", "durable", "answered"),  # the waiter woken, the handler run
    ("to_client", "answered", "done"),
)
"""Each part of a request's time: its name and the two stamps it lies between (epoch s;
the worker's from the ``X-Qsfraud-Timings`` header and the decision's ``timings``)."""


def phases_of(sent: float, header: str, answer: bytes, done: float) -> dict[str, float]:
    """The stamps of one answered request, by name."""
    stamps = {"sent": sent, "done": done}
    for part in header.split(","):
        name, _, value = part.partition("=")
        if value:
            stamps[name] = float(value)
    with contextlib.suppress(ValueError, KeyError, TypeError):
        stamps.update(json.loads(answer)["timings"])
    return stamps


def phase_percentiles(stamps: list[dict[str, float]]) -> dict[str, list[float]]:
    """``{phase: [p50_ms, p99_ms]}`` over the requests that have both of its stamps."""
    out = {}
    for name, start, end in PHASES:
        values = [s[end] - s[start] for s in stamps if start in s and end in s]
        if values:
            out[name] = [round(pct(values, 0.50), 1), round(pct(values, 0.99), 1)]
    return out


async def one_at_a_time(port: int, n: int, rng: random.Random, retailer: str) -> list[float]:
    """Latencies of ``n`` requests sent one after another (no queue anywhere)."""
    url = f"http://127.0.0.1:{port}/v1/score?wait_ms=5000"
    headers = {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"}
    latencies = []
    async with aiohttp.ClientSession() as session:
        for i in range(n):
            body = json.dumps(transaction(i, f"one{time.time_ns()}", rng, retailer)).encode()
            started = time.perf_counter()
            async with session.post(url, data=body, headers=headers) as r:
                await r.read()
                if r.status == 200:
                    latencies.append(time.perf_counter() - started)
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else -1.0


def process_cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def produce_backlog(bootstrap: str, prefix: str, n: int, rng: random.Random,
                    retailer: str) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random",
                  "linger.ms": 5, "queue.buffering.max.messages": 1_000_000})
    topic = RetailerTopics(retailer).transactions
    for i in range(n):
        tx = transaction(i, prefix, rng, retailer)
        p.produce(topic, key=tx["customer_id"], value=json.dumps(
            {"v": 1, "op": "c", "tx": tx, "committed_at": time.time()}).encode())
        if i % 10_000 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def drain_rate(bootstrap: str, prefix: str, n: int, retailer: str,
               timeout: float = 300) -> float:
    """Transactions a second the worker decided the backlog ``prefix`` at."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"bench-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([RetailerTopics(retailer).decisions])
    decided: dict[str, float] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(decided) < n and time.monotonic() < deadline:
            for msg in consumer.consume(2000, 0.2):
                value = msg.value()
                if msg.error() is None and value and value.startswith(b'{"v":1'):
                    d = json.loads(value)
                    if d["tx_id"].startswith(prefix + "-"):
                        decided[d["tx_id"]] = d["timings"]["decided"]
    finally:
        consumer.close()
    times = sorted(decided.values())
    return (len(times) - 1) / max(times[-1] - times[0], 1e-9) if len(times) > 1 else 0.0


def backlog_with_load(bootstrap: str, port: int, args: argparse.Namespace,
                      rng: random.Random) -> tuple[float, dict[str, Any]]:
    """The backlog's drain rate while requests come at ``args.rate`` (from 2 s before the
    backlog is produced until at least as long as it takes without them, doubled)."""

    async def both() -> tuple[float, dict[str, Any]]:
        seconds = 4.0 + 2 * args.backlog / max(args.unloaded_rate, 1.0)
        loaded = asyncio.create_task(load(port, args.rate, seconds, "during", rng,
                                          args.retailer))
        await asyncio.sleep(2.0)
        await asyncio.to_thread(produce_backlog, bootstrap, "loaded", args.backlog, rng,
                                args.retailer)
        rate = await asyncio.to_thread(drain_rate, bootstrap, "loaded", args.backlog,
                                       args.retailer)
        return rate, await loaded

    return asyncio.run(both())


def run(args: argparse.Namespace, bootstrap: str, tmp: Path,
        broker_pid: int | None = None) -> dict[str, Any]:
    rng = random.Random(7)
    tokens = tmp / "tokens.json"
    tokens.write_text(json.dumps({"v": 1, "tokens": [
        {"retailer_id": args.retailer, "sha256": hashlib.sha256(TOKEN.encode()).hexdigest()}]}))
    worker = WorkerProcess(bootstrap, args.retailer, tmp, "--loglevel", "warn", "--api-tokens",
                           str(tokens), "--trust", str(tmp / "none.json")).start()
    assert worker.proc is not None
    try:
        asyncio.run(load(worker.port, args.rate, args.warmup_seconds, "warm", rng,
                         args.retailer))
        single = asyncio.run(one_at_a_time(worker.port, args.one_at_a_time, rng,
                                           args.retailer))
        pids = {"worker": worker.proc.pid, "client": os.getpid(), "broker": broker_pid}
        cpu0 = {name: process_cpu_s(pid) for name, pid in pids.items() if pid}
        measured = asyncio.run(load(worker.port, args.rate, args.seconds, "score", rng,
                                    args.retailer))
        if args.stamps_out:
            with open(args.stamps_out, "w") as out:
                out.writelines(json.dumps(s) + "\n" for s in measured["phases"])
        cpu_ms = {name: round((process_cpu_s(pids[name]) - used) * 1000
                              / max(1, measured["sent"]), 2) for name, used in cpu0.items()}
        produce_backlog(bootstrap, "idle", args.backlog, rng, args.retailer)
        unloaded = drain_rate(bootstrap, "idle", args.backlog, args.retailer)
        args.unloaded_rate = unloaded
        loaded_rate, during = backlog_with_load(bootstrap, worker.port, args, rng)
    finally:
        worker.stop()
    lat = measured["latencies"]
    return {
        "rate": args.rate,
        "seconds": args.seconds,
        "answered": len(lat),
        "statuses": {str(k): v for k, v in sorted(measured["statuses"].items())},
        "pending": measured["statuses"].get(202, 0),
        "errors": sum(v for k, v in measured["statuses"].items() if k not in (200, 202)),
        "p50_ms": round(pct(lat, 0.50), 1),
        "p90_ms": round(pct(lat, 0.90), 1),
        "p99_ms": round(pct(lat, 0.99), 1),
        "max_ms": round(max(lat) * 1000, 1) if lat else -1.0,
        "phases_ms": phase_percentiles(measured["phases"]),
        "p50_ms_one_at_a_time": round(pct(single, 0.50), 1),
        "p99_ms_one_at_a_time": round(pct(single, 0.99), 1),
        "worker_cpu_ms_per_request": cpu_ms["worker"],
        "client_cpu_ms_per_request": cpu_ms["client"],
        "broker_cpu_ms_per_request": cpu_ms.get("broker"),
        "client_late_ms": [round(pct(measured["late"], 0.50), 1),
                           round(pct(measured["late"], 0.99), 1)],
        "worker_tx_per_s": round(unloaded, 1),
        "worker_tx_per_s_with_api": round(loaded_rate, 1),
        "throughput_cost": round(1 - loaded_rate / unloaded, 3) if unloaded else None,
        "p50_ms_during_backlog": round(pct(during["latencies"], 0.50), 1),
        "p99_ms_during_backlog": round(pct(during["latencies"], 0.99), 1),
        "cpus": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "requests_per_s": round(measured["requests_per_s"], 1),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=200.0, help="requests a second")
    parser.add_argument("--seconds", type=float, default=30.0, help="measured seconds")
    parser.add_argument("--warmup-seconds", type=float, default=15.0)
    parser.add_argument("--one-at-a-time", type=int, default=200,
                        help="requests sent one after another first (latency without a queue)")
    parser.add_argument("--backlog", type=int, default=20_000,
                        help="CDC transactions of each throughput backlog")
    parser.add_argument("--bootstrap", help="use this Kafka instead of an ephemeral one")
    parser.add_argument("--stamps-out", metavar="FILE",
                        help="write each measured request's stamps (epoch s) here, a JSON "
                        "object a line: to see whether slow requests come together")
    parser.add_argument("--retailer", default=RETAILER,
                        help="retailer id (a fresh one on a reused Kafka: no state to restore)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="qsfraud-bench-api-") as tmpdir:
        tmp = Path(tmpdir)
        if args.bootstrap:
            result = run(args, args.bootstrap, tmp)
        else:
            from qsfraud.stack import ephemeral_kafka

            # the full JIT, as bench/streams.py: a broker under minutes of load
            with ephemeral_kafka(tmp, full_jit=True) as kafka:
                result = run(args, kafka.bootstrap, tmp,
                             int(kafka.pid_file.read_text()))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
