"""The worker's HTTP API (streams/api.py) on two real workers of one retailer, real Kafka,
over TLS (the workers forward to each other over it too)."""

from __future__ import annotations

import asyncio
import hashlib
import ipaddress
import json
import os
import ssl
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from fraud.topics import RetailerTopics
from qsfraud.worker_process import WorkerProcess, WorkerProcessError
from streams.api import (
    TIMINGS,
    DecisionFeed,
    GroupPublisher,
    TokenStore,
    parse_tokens,
    partition_of,
    render_openapi,
)
from streams.scoring import ScoredStore

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "acme-checkout-token"
OTHER_TOKEN = "other-retailer-token"
PARTITIONS = 4


def tokens_file(path: Path, entries: dict[str, str]) -> None:
    """Write ``token -> retailer`` as the API's tokens file (digests only), atomically."""
    doc = {"v": 1, "tokens": [{"retailer_id": r, "sha256": hashlib.sha256(t.encode()).hexdigest()}
                              for t, r in entries.items()]}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc))
    os.replace(tmp, path)


@dataclass
class Reply:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


class ApiWorker(WorkerProcess):
    """A worker serving HTTPS with the test's certificate (the API and /metrics)."""

    context: ssl.SSLContext

    def metrics(self) -> str:
        return call(self, "GET", "/metrics", token=None).body.decode()

    def wait_ready(self, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise WorkerProcessError(f"worker exited:\n{self.log_tail()}")
            try:
                if call(self, "GET", "/health", token=None, timeout=5).json()["partitions"]:
                    return
            except OSError:  # not serving yet
                pass
            time.sleep(0.3)
        raise WorkerProcessError(f"worker not ready after {timeout} s:\n{self.log_tail()}")


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (PEM files)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "qsfraud-test")])
    now = datetime.now(UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=5)).not_valid_after(now + timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(
                ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = directory / "cert.pem", directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                           serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def call(w: ApiWorker, method: str, path: str, body: Any = None, token: str | None = TOKEN,
         raw: bytes | None = None, timeout: float = 30.0) -> Reply:
    data = raw if raw is not None else None if body is None else json.dumps(body).encode()
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(f"https://127.0.0.1:{w.port}{path}", data=data,
                                 method=method, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout, context=w.context) as r:
            return Reply(r.status, r.read(), dict(r.headers))
    except urllib.error.HTTPError as err:
        return Reply(err.code, err.read(), dict(err.headers))


@dataclass
class Cluster:
    retailer: str
    bootstrap: str
    workers: list[ApiWorker]
    tokens: Path

    def owners(self) -> dict[int, ApiWorker]:
        """partition of ``<R>.transactions`` -> the worker holding it (its ``/health``)."""
        found: dict[int, ApiWorker] = {}
        for w in self.workers:
            for p in call(w, "GET", "/health", token=None).json()["partitions"]:
                found[p] = w
        return found

    def customer_on(self, worker: ApiWorker, prefix: str) -> str:
        """A customer id whose partition ``worker`` holds."""
        owners = self.owners()
        for i in range(1000):
            customer = f"{prefix}-{i}"
            if owners.get(partition_of(customer, PARTITIONS)) is worker:
                return customer
        raise AssertionError("no partition on that worker")


def transaction(retailer: str, tx_id: str, customer: str, amount: float = 42.5) -> dict:
    return {"tx_id": tx_id, "retailer_id": retailer, "amount": amount, "customer_id": customer,
            "payment_instrument": f"pi-{customer}", "device_id": f"d-{customer}",
            "occurred_at": time.time() - 5}


def score(w: ApiWorker, tx: dict, wait_ms: int = 5000) -> Reply:
    """POST /v1/score, again while the group is still settling (503)."""
    deadline = time.monotonic() + 60
    while True:
        reply = call(w, "POST", f"/v1/score?wait_ms={wait_ms}", tx)
        if reply.status != 503 or time.monotonic() > deadline:
            return reply
        time.sleep(0.5)


@pytest.fixture(scope="module")
def cluster(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    tmp = tmp_path_factory.mktemp("api")
    retailer = f"api{os.getpid()}"
    tokens = tmp / "tokens.json"
    tokens_file(tokens, {TOKEN: retailer, OTHER_TOKEN: "other"})
    cert, key = self_signed(tmp)
    context = ssl.create_default_context(cafile=str(cert))
    workers = [ApiWorker(kafka_bootstrap, retailer, tmp / f"w{i}", "--partitions",
                         str(PARTITIONS), "--api-tokens", str(tokens), "--api-cert", str(cert),
                         "--api-key", str(key), "--loglevel", "info")
               for i in range(2)]
    for w in workers:
        w.workdir.mkdir()
        w.context = context
    try:
        workers[0].start()
        workers[1].start()
        c = Cluster(retailer, kafka_bootstrap, workers, tokens)
        # warm-up: each worker's first batch loads the compiled model, which can stall its
        # loop past the session timeout on a loaded machine (a rebalance): before the tests
        warm: dict[int, str] = {}
        for i in range(200):
            warm.setdefault(partition_of(f"warm-{i}", PARTITIONS), f"warm-{i}")
        produce(kafka_bootstrap, retailer, [transaction(retailer, f"warm-{p}", customer)
                                            for p, customer in warm.items()])
        got = _decisions(kafka_bootstrap, RetailerTopics(retailer).decisions, None, len(warm),
                         timeout=90)
        assert len(got) >= len(warm)
        settled = 0
        deadline = time.monotonic() + 90
        previous: dict[int, int] = {}
        while settled < 3:  # the same owners of all 4 partitions for 3 s: settled
            owners = {p: id(w) for p, w in c.owners().items()}
            stable = len(owners) == PARTITIONS and len(set(owners.values())) == 2
            settled = settled + 1 if stable and owners == previous else 0
            previous = owners
            assert time.monotonic() < deadline, f"group not settled: {owners}"
            time.sleep(1.0)
        yield c
    finally:
        for w in workers:
            w.stop()


def test_a_lookup_on_any_worker_is_answered_by_the_owner(cluster: Cluster) -> None:
    a, b = cluster.workers
    customer = cluster.customer_on(b, "route")
    tx = transaction(cluster.retailer, "route-1", customer)
    scored = score(a, tx)  # asked of the worker that does not own it
    assert scored.status == 200, scored.body
    decision = scored.json()
    assert decision["tx_id"] == "route-1" and decision["action"] in ("allow", "verify", "hold",
                                                                      "block")
    assert set(decision["timings"]) >= {"received", "decided", "produced"}
    # the worker's stamps of the request, in order (bench/api.py splits its time with them)
    stamps = dict(part.split("=") for part in scored.headers[TIMINGS].split(","))
    order = [float(stamps[k]) for k in ("entered", "validated", "acked", "answered")]
    assert order == sorted(order) and order[0] <= decision["timings"]["produced"] <= order[2]
    assert "durable" not in stamps  # decided by the other worker: its batch is not known here
    owned = score(b, transaction(cluster.retailer, "route-0", customer))
    stamps = dict(part.split("=") for part in owned.headers[TIMINGS].split(","))
    assert owned.json()["timings"]["decided"] <= float(stamps["durable"]) <= float(
        stamps["answered"])
    for w in (a, b):
        got = call(w, "GET", f"/v1/decisions/route-1?customer_id={customer}")
        assert got.status == 200 and got.body == scored.body
    missing = call(a, "GET", f"/v1/decisions/nope?customer_id={customer}&wait_ms=200")
    assert missing.status == 404 and missing.json()["error"]["code"] == "not_found"
    # a decision made of a CDC record, waited for through the other worker (an id that
    # needs quoting in a URL: forwarded as the same id)
    produce(cluster.bootstrap, cluster.retailer,
            [transaction(cluster.retailer, "route/2 ?", customer)], cdc=True)
    got = call(a, "GET", f"/v1/decisions/{quote('route/2 ?', safe='')}?customer_id={customer}"
                         "&wait_ms=5000")
    assert got.status == 200, got.body
    assert got.json()["tx_id"] == "route/2 ?" and got.json()["timings"]["committed"] > 0


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # the 3xx answer itself, as an HTTPError


def test_a_lookup_with_redirect_1_is_sent_to_the_owner(cluster: Cluster) -> None:
    a, b = cluster.workers
    customer = cluster.customer_on(b, "redirect")
    tx_id = "redirect/1 ?"  # an id that needs quoting: the Location keeps it quoted
    scored = score(b, transaction(cluster.retailer, tx_id, customer))
    assert scored.status == 200, scored.body
    path = f"/v1/decisions/{quote(tx_id, safe='')}?customer_id={customer}&wait_ms=100"
    opener = urllib.request.build_opener(_NoRedirect(),
                                         urllib.request.HTTPSHandler(context=a.context))
    request = urllib.request.Request(f"https://127.0.0.1:{a.port}{path}&redirect=1",
                                     headers={"Authorization": f"Bearer {TOKEN}"})
    with pytest.raises(urllib.error.HTTPError) as answer:
        opener.open(request, timeout=30)
    assert answer.value.code == 307
    location = answer.value.headers["Location"]
    assert location == f"https://127.0.0.1:{b.port}{path}"
    followed = call(a, "GET", path + "&redirect=1")  # urllib follows a 307 GET
    assert followed.status == 200 and followed.body == scored.body
    # the owner answers itself; no token, no redirect (nothing learned of the workers)
    assert call(b, "GET", path + "&redirect=1").body == scored.body
    assert call(a, "GET", path + "&redirect=1", token=None).status == 401


def produce(bootstrap: str, retailer: str, txs: list[dict], cdc: bool = False) -> None:
    """Write ``txs`` to ``<retailer>.transactions`` as the CDC does (keyed by customer)."""
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    for tx in txs:
        value = {"v": 1, "op": "c", "tx": tx, "committed_at": time.time()} if cdc else tx
        p.produce(RetailerTopics(retailer).transactions, key=tx["customer_id"],
                  value=json.dumps(value).encode())
    assert p.flush(10) == 0


def _decisions(bootstrap: str, topic: str, tx_id: str | None, n: int,
               timeout: float = 30) -> list:
    """Up to ``n`` records of ``topic`` for ``tx_id`` (any, if None), waiting ``timeout``."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{time.time_ns()}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([topic])
    out: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while len(out) < n and time.monotonic() < deadline:
            for msg in consumer.consume(500, 0.2):
                value = msg.value() or b"{}"
                if msg.error() is None and tx_id in (None, json.loads(value).get("tx_id")):
                    out.append(value)
    finally:
        consumer.close()
    return out


def _changelog_records(bootstrap: str, topic: str, needle: bytes) -> int:
    """Records of the changelog ``topic`` whose key contains ``needle`` (all partitions)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"t-{time.time_ns()}",
                         "enable.auto.commit": False})
    count = 0
    try:
        for p in range(PARTITIONS):
            low, high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10,
                                                       cached=False)
            if high <= low:
                continue
            consumer.assign([TopicPartition(topic, p, low)])
            done = False
            while not done:
                for msg in consumer.consume(500, 1.0):
                    if msg.error() is None and needle in (msg.key() or b""):
                        count += 1
                    done = done or (msg.offset() or 0) >= high - 1
    finally:
        consumer.close()
    return count


def _metric(text: str, name: str, **labels: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + "{") and all(f'{k}="{v}"' in line for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_score_before_commit_then_the_cdc_copy_is_deduplicated(cluster: Cluster) -> None:
    a, b = cluster.workers
    customer = cluster.customer_on(a, "dedup")
    topics = RetailerTopics(cluster.retailer)
    tx = transaction(cluster.retailer, "dedup-1", customer)
    scored = score(b, tx)
    assert scored.status == 200, scored.body
    features = topics.changelog("features")
    needle = f'c:{customer}"'.encode()
    before = _changelog_records(cluster.bootstrap, features, needle)
    assert before >= 1  # the score wrote the customer's state
    duplicates = _metric(a.metrics(), "qsfraud_duplicates_total")
    # the order is committed: the CDC's copy of the same transaction arrives
    produce(cluster.bootstrap, cluster.retailer, [tx], cdc=True)
    records = _decisions(cluster.bootstrap, topics.decisions, "dedup-1", 2)
    assert records == [scored.body, scored.body]  # one decision content, byte for byte
    deadline = time.monotonic() + 10
    while _metric(a.metrics(), "qsfraud_duplicates_total") < duplicates + 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(1.5)  # a second write of the customer's state would be in the changelog now
    assert _changelog_records(cluster.bootstrap, features, needle) == before


def test_labels_are_published_keyed_by_customer_and_learned(cluster: Cluster) -> None:
    a, b = cluster.workers
    customer = cluster.customer_on(b, "label")
    txs = [transaction(cluster.retailer, f"label-{i}", customer) for i in range(2)]
    for tx in txs:
        assert score(a, tx).status == 200
    learned = _metric(b.metrics(), "qsfraud_labels_total", outcome="learned")
    good = {"tx_id": "label-0", "customer_id": customer, "is_fraud": True,
            "source": "chargeback", "labelled_at": time.time()}
    bad = {**good, "tx_id": "label-1", "source": "rumour"}
    refused = call(a, "POST", "/v1/labels", {"labels": [good, bad]})
    assert refused.status == 422
    assert refused.json()["error"]["field"] == "labels[1].source"
    no_customer = call(a, "POST", "/v1/labels", [{k: v for k, v in good.items()
                                                       if k != "customer_id"}])
    assert no_customer.status == 422 and no_customer.json()["error"]["field"] == "[0].customer_id"
    accepted = call(a, "POST", "/v1/labels", good)
    assert accepted.status == 202 and accepted.json() == {"accepted": 1}
    deadline = time.monotonic() + 20
    while _metric(b.metrics(), "qsfraud_labels_total", outcome="learned") < learned + 1:
        assert time.monotonic() < deadline, b.metrics()
        time.sleep(0.2)
    time.sleep(1.0)
    labels = _decisions(cluster.bootstrap, RetailerTopics(cluster.retailer).labels, "label-1", 1,
                        timeout=3)
    assert labels == []  # nothing of the refused batch was published
    assert _metric(b.metrics(), "qsfraud_labels_total", outcome="learned") == learned + 1


def test_tokens_sizes_and_bad_input_get_their_status(cluster: Cluster) -> None:
    a, _ = cluster.workers
    customer = "sec-1"
    tx = transaction(cluster.retailer, "sec-1", customer)
    assert call(a, "GET", "/health", token=None).status == 200
    for token in (None, "wrong"):
        reply = call(a, "POST", "/v1/score", tx, token=token)
        assert reply.status == 401 and reply.json()["error"]["code"] == "unauthorized"
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    forbidden = call(a, "GET", f"/v1/decisions/x?customer_id={customer}",
                     token=OTHER_TOKEN)
    assert forbidden.status == 403 and forbidden.json()["error"]["code"] == "forbidden"
    assert call(a, "POST", "/v1/labels", raw=b"x" * (1024 * 1024 + 1)).status == 413
    big = {**tx, "note": "x" * 70_000}  # within 1 MiB, beyond the 64 KiB of a transaction
    assert call(a, "POST", "/v1/score", big).status == 413
    bad_json = call(a, "POST", "/v1/score", raw=b'{"tx_id": ')
    assert bad_json.status == 400 and bad_json.json()["error"]["code"] == "bad_json"
    invalid = call(a, "POST", "/v1/score", {**tx, "amount": -1})
    assert invalid.status == 422 and invalid.json()["error"]["field"] == "amount"
    unknown = call(a, "POST", "/v1/score", {**tx, "retailer_id": "nobody"})
    assert unknown.status == 404 and unknown.json()["error"]["code"] == "unknown_retailer"
    too_long = call(a, "GET", f"/v1/decisions/x?customer_id={customer}&wait_ms=60000")
    assert too_long.status == 422 and too_long.json()["error"]["field"] == "wait_ms"
    nowhere = call(a, "GET", "/v1/nowhere")
    assert nowhere.status == 404 and nowhere.json()["error"]["code"] == "not_found"
    wrong_method = call(a, "GET", "/v1/score")
    assert wrong_method.status == 405 and "error" in wrong_method.json()
    # rotation without a restart: the old token stops working, the new one works
    tokens_file(cluster.tokens, {"rotated-token": cluster.retailer, OTHER_TOKEN: "other"})
    time.sleep(0.05)
    assert call(a, "GET", "/v1/openapi.json").status == 401
    served = call(a, "GET", "/v1/openapi.json", token="rotated-token")
    tokens_file(cluster.tokens, {TOKEN: cluster.retailer, OTHER_TOKEN: "other"})
    assert served.status == 200
    assert served.json() == json.loads((ROOT / "docs/api/openapi.json").read_text())


def test_the_checked_in_openapi_document_is_the_served_one() -> None:
    assert (ROOT / "docs/api/openapi.json").read_text() == render_openapi()


# -- the parts without Kafka


def test_a_rotated_tokens_file_is_read_and_a_broken_one_keeps_the_tokens(tmp_path: Path) -> None:
    path = tmp_path / "tokens.json"
    tokens_file(path, {"old": "acme"})
    store = TokenStore(path)
    assert store.retailer_of("old") == "acme" and store.retailer_of("new") is None
    tokens_file(path, {"new": "acme", "b-token": "other"})
    assert store.retailer_of("old") is None
    assert store.retailer_of("new") == "acme" and store.retailer_of("b-token") == "other"
    path.write_text('{"v": 1, "tokens": [{"retailer_id": "acme", "sha256": "not hex"}]}')
    assert store.retailer_of("new") == "acme"  # the broken file changed nothing
    path.unlink()
    assert store.retailer_of("new") == "acme" and len(store) == 2
    assert TokenStore(None).retailer_of("new") is None  # no file: no token is known


@given(st.binary(max_size=300) | st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=70),
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
        st.sampled_from(["v", "tokens", "retailer_id", "sha256", "name"]), kids, max_size=4),
    max_leaves=12).map(lambda doc: json.dumps(doc).encode()))
def test_a_tokens_file_parses_or_raises_value_error(data: bytes) -> None:
    try:
        entries = parse_tokens(data)
    except ValueError:
        return
    assert all(len(e.sha256) == 32 and e.retailer_id for e in entries)


def test_requests_queued_during_a_write_go_out_together_and_share_its_failure() -> None:
    calls: list[dict[str, list]] = []
    fail = False

    async def publish(*writes: tuple[str, list]) -> None:
        calls.append({topic: list(records) for topic, records in writes})
        await asyncio.sleep(0.01)
        if fail:
            raise RuntimeError("broker down")

    async def scenario() -> None:
        nonlocal fail
        group = GroupPublisher(publish)
        await asyncio.gather(*(group.write("t", [(0, b"k", bytes([i]))]) for i in range(5)),
                             group.write("u", [(1, None, b"x")]))
        assert len(calls) <= 2 and sum(len(r) for c in calls for r in c.values()) == 6
        fail = True
        results = await asyncio.gather(group.write("t", [(0, b"k", b"y")]),
                                       group.write("t", [(0, b"k", b"z")]),
                                       return_exceptions=True)
        assert all(isinstance(r, RuntimeError) for r in results)
        await group.stop()

    asyncio.run(scenario())


def test_partition_of_is_the_java_clients_murmur2() -> None:
    # values of Kafka's Utils.murmur2 (org.apache.kafka.common.utils.UtilsTest) & 0x7fffffff
    assert partition_of("21", 1 << 31) == (-973932308 & 0x7FFFFFFF)
    assert partition_of("foobar", 1 << 31) == (-790332482 & 0x7FFFFFFF)


def test_a_decision_is_answered_only_once_its_scored_entry_is_durable() -> None:
    scored = ScoredStore()
    feed = DecisionFeed(scored)

    async def scenario() -> None:
        waiting = asyncio.create_task(feed.wait("t1", 5.0))
        await asyncio.sleep(0.01)
        feed.batch_decided()  # the batch wrote t1's entry; its changelog write is on its way
        scored.set_on(0, "t1", {"o": 1.0, "d": {"tx_id": "t1", "score": 0.5}, "l": 0})
        await asyncio.sleep(0.05)
        assert not waiting.done() and feed.decision("t1") is None
        feed.batch_durable()
        assert await waiting == b'{"tx_id":"t1","score":0.5}'
        assert await feed.wait("t2", 0.05) is None
        assert feed._waiting == {}  # nothing left behind by a timed-out waiter

    asyncio.run(scenario())


def test_a_waiter_woken_by_a_durable_batch_answers_while_the_next_batch_is_in_flight() -> None:
    scored = ScoredStore()
    feed = DecisionFeed(scored)

    async def scenario() -> None:
        waiting = asyncio.create_task(feed.wait("t1", 5.0))
        await asyncio.sleep(0.01)
        feed.batch_decided()
        scored.set_on(0, "t1", {"o": 1.0, "d": {"tx_id": "t1"}, "l": 0})
        feed.batch_durable()  # t1's entry is durable: its waiter is woken...
        feed.batch_decided()  # ...and the next batch is in flight before it runs
        assert await asyncio.wait_for(waiting, 0.5) == b'{"tx_id":"t1"}'

    asyncio.run(scenario())
