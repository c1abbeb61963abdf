"""The federated-learning client inside a retailer's worker (fl/README.md, "Worker side").

- :class:`FlClient` (on the worker's event loop): counts the labels learned and keeps the
  recent labelled vectors; when a sync is due (``sync_labels`` labels, or the signed live
  config's ``fl.sync_interval_s`` seconds with at least one new label) and the previous update's
  round is closed, :meth:`FlClient.next_update` seals the model's update for round
  ``last global round + 1`` (signed by the retailer, encrypted to the aggregator; sequence
  numbers from a :class:`~pqc.freshness.FileFreshness` file, at least the wall clock in ns, so
  they keep increasing across restarts). :meth:`FlClient.fold` folds a verified global model
  in (:func:`fl.client.fold_in`, personalised, never an overwrite): called only between
  batches, through :class:`streams.app.BetweenBatches`.
- :class:`GlobalFollower` (a thread): reads the global topic from its start, verifies every
  record (aggregator's signature and role, purpose, sequence, round), hands the newest one
  present at start to the loop once, then each newer one as it comes. Refusals are counted in
  ``/metrics`` with their reason.
- :class:`WatchClient` (the cross-retailer watchlist, on when the worker has the consortium
  key): the pipeline's ``after_decide`` hook notes each transaction this retailer held or
  blocked (its instrument and device, as keyed hashes, go with the next update) and raises a
  transaction naming an entity other retailers reported to ``hold``; the list comes with each
  folded global model.

Both the default :class:`~fraud.models.RiskModel` and River's ``StandardScaler |
LogisticRegression`` federate; other River models are not mergeable and send nothing.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Final

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from fl.client import (
    UPDATE_PURPOSE,
    GlobalModel,
    MixRecord,
    StaleGlobal,
    fold_in,
    fold_in_river,
    open_global,
    seal_update,
    update_from_model,
    update_from_state,
)
from fl.update import ModelUpdate, UpdateFormatError
from fl.watchlist import (
    NEW_DEVICE_LIMITS,
    NEW_HERE_S,
    Reporter,
    SeenDevices,
    UnionLimits,
    WatchFormatError,
    hasher,
    open_watch_key,
)
from fraud.decisions import NEW_DEVICE_MIN_SCORE, Decision, Watchlist
from fraud.models import RiskModel, RiverModel
from fraud.schema import WATCH_FIELDS, Transaction
from pqc.errors import (
    EnvelopeError,
    OutsideTimeWindow,
    PqcError,
    Replay,
    UnauthorizedSender,
    UnknownSender,
)
from pqc.freshness import FileFreshness, InMemoryFreshness, TimeWindow
from pqc.keys import KeyStore, Registry, TrustedKey, load_keystore, load_registry, read_bundle
from streams.metrics import WorkerMetrics
from streams.settings import WorkerSettings
from streams.topics import COMPACTED, TopicSpec, ensure_topics

log = logging.getLogger(__name__)

RECENT_LABELS: Final = 200
"""Labelled vectors kept to choose the mixing weight of a fold-in (fl.client.fold_in)."""

FRESH_LABELS = 20_000
"""At most this many labels learned since the last fold-in score its frozen candidates."""
GLOBAL_WINDOW: Final = TimeWindow(max_age_s=30 * 86400.0, max_future_s=120.0)
"""How old a global model may be: rounds can be hours apart and a worker may start long after
the last one; a stale or replayed one is refused by its round and sequence, not its age."""
SEQUENCE_FILE: Final = "fl-sequence.json"
WATCH_KEY_FILE: Final = "watch-key.sealed"
"""The sealed consortium key looked for in the retailer's key store without --fl-watch-key."""
WATCH_OWN_FILE: Final = "fl-watch-own.json"
WATCH_NEW_OWN_FILE: Final = "fl-watch-new-own.json"
WATCH_SEEN_FILE: Final = "fl-watch-devices.json"
"""Beside the own reports: with ``--fl-watch-new-devices``, the devices seen here (hashed)
and the new-device reports sent."""
WATCH_REPORTS: Final = ("hold", "verify")
"""What a retailer reports: its holds and blocks, or also what it sent to step-up (verify)."""
_SEVERITY: Final = {"allow": 0, "verify": 1, "hold": 2, "block": 3}
WATCH_PENDING_MAX: Final = UnionLimits().max_per_report
"""Reports kept for the next update (the newest): the aggregator takes no more from one."""

Labelled = tuple[dict[str, float], bool]
Model = RiskModel | RiverModel


class FlSetupError(ValueError):
    """The FL flags name key files that cannot be used."""


@dataclass(frozen=True)
class FlKeys:
    """What the worker's FL client needs: its own key store, the aggregator's KEM key to seal
    to, and the registry that says which aggregator signs global models."""

    identity: KeyStore
    aggregator_kem: TrustedKey
    trust: Registry

    @property
    def participant(self) -> str:
        return self.identity.identity.name


def load_fl_keys(identity: Path, aggregator_bundle: Path, trust: Path) -> FlKeys:
    """``--fl-identity``, ``--fl-aggregator`` and ``--fl-trust``; FlSetupError says what is
    wrong."""
    try:
        store = load_keystore(identity)
    except (PqcError, OSError) as exc:
        raise FlSetupError(f"--fl-identity {identity}: {exc}") from None
    if store.identity.role != "retailer":
        raise FlSetupError(f"--fl-identity {identity}: {store.identity.name} is a "
                           f"{store.identity.role}, not a retailer")
    try:
        keys = read_bundle(json.loads(aggregator_bundle.read_text(encoding="utf-8")))
        if any(k.role != "aggregator" for k in keys):
            raise FlSetupError(f"--fl-aggregator {aggregator_bundle}: not an aggregator's bundle")
        kem = Registry(keys).current_kem_key(keys[0].name)
    except (PqcError, OSError, ValueError) as exc:
        raise FlSetupError(f"--fl-aggregator {aggregator_bundle}: {exc}") from None
    try:
        registry = load_registry(trust)
    except (PqcError, OSError) as exc:
        raise FlSetupError(f"--fl-trust {trust}: {exc}") from None
    if not any(k.role == "aggregator" for k in registry):
        raise FlSetupError(f"--fl-trust {trust}: trusts no aggregator")
    return FlKeys(store, kem, registry)


def load_watch_key(settings: WorkerSettings, keys: FlKeys) -> bytes | None:
    """The consortium key (``--fl-watch-key``, else the key store's ``watch-key.sealed``),
    opened with the retailer's KEM key; None: no key, the watchlist is off."""
    path = settings.fl_watch_key
    if path is None:
        path = keys.identity.path / WATCH_KEY_FILE
        if not path.exists():
            return None
    try:
        return open_watch_key(path.read_bytes(), keys.identity.kem, keys.trust,
                              InMemoryFreshness())
    except (PqcError, OSError, WatchFormatError) as exc:
        raise FlSetupError(f"--fl-watch-key {path}: {exc}") from None


class WatchClient:
    """The worker's side of the cross-retailer watchlist (fl/README.md): reports what this
    retailer held, holds what others reported. Runs on the worker's event loop (the hook is
    called inside the decide step, the rest between batches)."""

    def __init__(self, key: bytes, own_path: Path, metrics: WorkerMetrics,
                 min_score: float = 0.0, report: str = "hold", new_devices: bool = False,
                 new_min_score: float = NEW_DEVICE_MIN_SCORE) -> None:
        if report not in WATCH_REPORTS:
            raise ValueError(f"report: one of {', '.join(WATCH_REPORTS)}, got {report!r}")
        self.report_from = _SEVERITY[report]
        self.key_of = hasher(key)
        self.reporter = Reporter(self.key_of)
        self.own_path = own_path
        self.metrics = metrics
        self.min_score = min_score
        self.watchlist: Watchlist | None = None
        self.listed_at = 0.0
        self._sending: list[str] = []
        self.new_devices = new_devices
        """Report devices new here; hold a row whose device is new here and listed as new
        by another retailer, scoring at least ``new_min_score``."""
        self.new_min_score = new_min_score
        self.seen = SeenDevices()
        self.new_reporter = Reporter(self.key_of, horizon_s=NEW_DEVICE_LIMITS.horizon_s,
                                     kinds=("device",))
        self.seen_path = own_path.with_name(WATCH_SEEN_FILE)
        self.new_own_path = own_path.with_name(WATCH_NEW_OWN_FILE)
        self._sending_new: list[str] = []
        restores: list[tuple[Path, Callable[[Any], None]]] = [
            (own_path, self.reporter.restore_own)]
        if new_devices:
            restores += [(self.seen_path, self.seen.restore),
                         (self.new_own_path, self.new_reporter.restore_own)]
        for path, restore in restores:
            if path.exists():
                try:
                    restore(json.loads(path.read_text(encoding="utf-8")))
                except (OSError, ValueError) as exc:  # then own reports may count as others'
                    log.warning("FL watchlist: state not restored from %s: %s", path, exc)

    def after_decide(self, tx: Transaction, decision: Decision) -> Decision:
        """The pipeline's hook: a decision of this retailer's own (model or rules) at or above
        ``report_from`` is reported, never a hold the watchlist caused (that would keep an
        entry alive by itself); a decision below ``hold`` is raised if ``tx`` names a
        listed entity."""
        action = decision.action
        now = time.time()
        if _SEVERITY[action] >= self.report_from:
            self.reporter.report({name: getattr(tx, name) for name in WATCH_FIELDS.values()},
                                 now, most=WATCH_PENDING_MAX)
        new_here = False
        if self.new_devices and tx.device_id:
            device = self.key_of("device", tx.device_id)
            age = self.seen.sight(device, now)
            if age == 0.0:
                self.new_reporter.pend(device, most=NEW_DEVICE_LIMITS.max_per_report)
            new_here = age <= NEW_HERE_S
        watch = self.watchlist
        if watch is None or action in ("hold", "block"):
            return decision
        if now - self.listed_at > self.reporter.horizon_s:
            self.watchlist = None  # no global model for a day: its entries have expired
            return decision
        raised = watch.escalate(decision, tx, new_here=new_here)
        if raised is not decision:
            self.metrics.count("qsfraud_fl_watch_holds_total")
        return raised

    def listed(self, global_model: GlobalModel, now: float | None = None) -> None:
        """Takes the watchlist of a verified global model (other retailers' reports only)."""
        now = time.time() if now is None else now
        others = self.reporter.others(global_model.watchlist, now)
        new = (self.new_reporter.others(global_model.new_devices, now) if self.new_devices
               else {})
        self.watchlist = Watchlist(others, self.key_of, min_score=self.min_score,
                                   new_devices=new, new_min_score=self.new_min_score) \
            if others or new else None
        self.listed_at = now
        self.metrics.gauge("qsfraud_fl_watchlist_entries", len(others))
        if self.new_devices:
            self.metrics.gauge("qsfraud_fl_watch_new_devices", len(new))

    def pending(self) -> bool:
        """Whether there are reports to send."""
        return bool(self.reporter.pending or self.new_reporter.pending)

    def to_send(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The reports for the update being sealed: held entities and new devices (still
        pending until :meth:`sent`)."""
        self._sending = list(self.reporter.pending)
        self._sending_new = list(self.new_reporter.pending)
        return tuple(self._sending), tuple(self._sending_new)

    def sent(self, now: float | None = None) -> None:
        now = time.time() if now is None else now
        self.reporter.sent(self._sending, now)
        self.new_reporter.sent(self._sending_new, now)
        saves: list[tuple[Callable[[Path], None], Path]] = []
        if self._sending:
            self.metrics.count("qsfraud_fl_watch_reported_total", len(self._sending))
            saves.append((self.reporter.save_own, self.own_path))
        if self._sending_new:
            self.metrics.count("qsfraud_fl_watch_new_reported_total", len(self._sending_new))
            saves.append((self.new_reporter.save_own, self.new_own_path))
        if self.seen.changed:
            saves.append((self.seen.save, self.seen_path))
        for save, path in saves:
            try:
                save(path)
            except OSError as exc:
                log.warning("FL watchlist: %s not saved: %s", path.name, exc)
        self._sending = []
        self._sending_new = []


def refusal_reason(error: Exception) -> str:
    """The metric label of a refused global model."""
    kinds: list[tuple[type[Exception], str]] = [
        (StaleGlobal, "stale_round"), (Replay, "replayed"), (UnknownSender, "unknown_sender"),
        (UnauthorizedSender, "unauthorized"), (OutsideTimeWindow, "outside_window"),
        (UpdateFormatError, "malformed"), (EnvelopeError, "tampered"),
    ]
    return next((reason for kind, reason in kinds if isinstance(error, kind)), "malformed")


def federates(model: Model) -> bool:
    """Whether ``model`` has a mergeable state (RiskModel, River's linear pipeline)."""
    return isinstance(model, RiskModel) or model.has_plain_state


class FlClient:
    """The worker's side of the rounds; every method runs on the worker's event loop."""

    def __init__(self, keys: FlKeys, sequence_path: Path, metrics: WorkerMetrics,
                 sync_labels: int = 500) -> None:
        if sync_labels < 1:
            raise ValueError("sync_labels must be >= 1")
        self.keys = keys
        self.metrics = metrics
        self.sync_labels = sync_labels
        self.sent_sequences = FileFreshness(sequence_path)
        self.recent: deque[Labelled] = deque(maxlen=RECENT_LABELS)
        # the out-of-sample evidence for the mixing weight (fl.client.MixRecord): the
        # candidates frozen at the last fold-in score the labels learned since, as they come
        self.mix_record = MixRecord(limit=FRESH_LABELS)
        self.labels_since_sent = 0
        self.last_sent_at = time.monotonic()
        self.global_round: int | None = None
        self.global_version: str | None = None
        self.sent_round: int | None = None
        self.ready = False
        """Set once the global model present at start is folded in: before that the round
        to send for is unknown."""
        self._river_base_n: int | None = None
        self.watch: WatchClient | None = None
        """The cross-retailer watchlist, if the worker has the consortium key."""

    # -- learning and sending --------------------------------------------------------------
    def learned(self, examples: Sequence[Labelled]) -> None:
        """Note labels the model just learned."""
        self.recent.extend(examples)
        self.mix_record.observe(examples)
        self.labels_since_sent += len(examples)

    def due(self, interval_s: float, now: float | None = None) -> bool:
        """Whether to send an update now: new labels, the last update's round closed, and
        ``sync_labels`` labels or ``interval_s`` seconds since the last update."""
        now = time.monotonic() if now is None else now
        if not self.ready:
            return False
        if self.labels_since_sent == 0 and not (self.watch and self.watch.pending()):
            return False  # reports alone are sent too (with 0 examples: no weight)
        if self.sent_round is not None and (self.global_round or 0) < self.sent_round:
            return False  # one update per round: a second would be refused as a duplicate
        return (self.labels_since_sent >= self.sync_labels
                or now - self.last_sent_at >= interval_s)

    def update_of(self, model: Model, round_: int) -> ModelUpdate | None:
        """``model``'s update for ``round_`` (its parameters, the labels learned since the
        last global), or None if it cannot federate."""
        participant = self.keys.participant
        if isinstance(model, RiskModel):
            return update_from_model(model, participant, round_)
        if not model.has_plain_state:
            return None
        if self._river_base_n is None:  # nothing folded in since start: a restored model's
            # labels before its last fold-in are unknown, so only the lifetime of a model
            # that never folded anything in counts
            self._river_base_n = model.n if model.version not in ("local", "") else 0
        examples = max(model.n - self._river_base_n, 0)
        return update_from_state(model.export_state(), participant, round_, examples)

    def next_update(self, model: Model, interval_s: float,
                    now: float | None = None) -> tuple[int, bytes] | None:
        """``(round, sealed update)`` if one is due (see :meth:`due`), else None. Call
        :meth:`sent` once it is written."""
        if not self.due(interval_s, now):
            return None
        round_ = (self.global_round or 0) + 1
        update = self.update_of(model, round_)
        if update is None:
            self.labels_since_sent = 0
            self.last_sent_at = time.monotonic() if now is None else now  # reports wait too
            log.warning("the model (%s) cannot federate: no FL update sent",
                        type(model).__name__)
            return None
        if self.watch is not None:
            held, new = self.watch.to_send()
            update = dataclasses.replace(update, watch=held, watch_new=new)
        sequence = self._next_sequence()
        return round_, seal_update(update, self.keys.identity.identity, self.keys.aggregator_kem,
                                   sequence)

    def _next_sequence(self) -> int:
        last = self.sent_sequences.last_sequence(self.keys.participant, UPDATE_PURPOSE) or 0
        sequence = max(last + 1, time.time_ns())
        self.sent_sequences.advance(self.keys.participant, UPDATE_PURPOSE, sequence)
        return sequence  # recorded before it is sent: a crash in between only skips a number

    def sent(self, round_: int, now: float | None = None) -> None:
        self.sent_round = round_
        self.labels_since_sent = 0
        self.last_sent_at = time.monotonic() if now is None else now
        if self.watch is not None:
            self.watch.sent()
        self.metrics.count("qsfraud_fl_updates_total")
        log.info("FL update for round %d sent", round_)

    # -- global models ---------------------------------------------------------------------
    def fold(self, pipeline: Any, global_model: GlobalModel) -> None:
        """Between batches: fold ``global_model`` into ``pipeline.model`` (personalised),
        unless it is not newer than the last one folded in or the model already holds it
        (a restart reads the newest global again; the checkpoint may already have it)."""
        if self.global_round is not None and global_model.round <= self.global_round:
            self._refused("stale_round", f"round {global_model.round}, "
                                         f"at {self.global_round} already")
            return
        if self.watch is not None:
            self.watch.listed(global_model)
        model: Model = pipeline.model
        if model.version == global_model.version:
            log.info("FL global model %s (round %d) already in the model", global_model.version,
                     global_model.round)
        elif not federates(model):
            self._refused("model_cannot_federate", type(model).__name__)
            return
        else:
            started = time.perf_counter()
            recent = list(self.recent)
            if isinstance(model, RiskModel):
                mix = fold_in(model, global_model, recent, record=self.mix_record)
            else:
                mix = fold_in_river(model, global_model, recent)
                self._river_base_n = model.n
            self.metrics.gauge("qsfraud_fl_mix", mix)
            log.info("FL global model %s (round %d, %d contributors) folded into the %s with "
                     "mix %.2f in %.0f ms", global_model.version, global_model.round,
                     len(global_model.contributors), type(model).__name__, mix,
                     (time.perf_counter() - started) * 1e3)
        self.global_round = global_model.round
        self.global_version = global_model.version
        self.metrics.count("qsfraud_fl_globals_total", outcome="applied", reason="ok")
        self.metrics.gauge("qsfraud_fl_global_round", global_model.round)
        self.metrics.gauge("qsfraud_fl_global_info", 1, version=global_model.version)

    def _refused(self, reason: str, detail: str) -> None:
        self.metrics.count("qsfraud_fl_globals_total", outcome="refused", reason=reason)
        log.warning("FL global model refused (%s): %s", reason, detail)


class GlobalFollower:
    """A thread that verifies the global topic's records and hands each new global model to
    ``deliver`` (which queues it for the loop). Outside any consumer group: every worker reads
    every global model. The records present at start are verified in order and only the
    newest is delivered, once the start's end is reached."""

    def __init__(self, bootstrap: str, topic: str, trust: Registry, metrics: WorkerMetrics,
                 deliver: Callable[[GlobalModel], None],
                 on_caught_up: Callable[[], None] = lambda: None) -> None:
        self.bootstrap = bootstrap
        self.topic = topic
        self.trust = trust
        self.metrics = metrics
        self.deliver = deliver
        self.on_caught_up = on_caught_up
        self.freshness = InMemoryFreshness()
        self.last_round: int | None = None
        self.caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fl-global-follower",
                                        daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def offer(self, blob: bytes | None) -> GlobalModel | None:
        """Verify one record; the global model if it is a new round, else None (counted)."""
        try:
            if not blob:
                raise UpdateFormatError("global", "empty record")
            model = open_global(blob, self.trust, self.freshness, last_round=self.last_round,
                                window=GLOBAL_WINDOW)
        except (EnvelopeError, UpdateFormatError, ValueError) as exc:
            reason = refusal_reason(exc)
            self.metrics.count("qsfraud_fl_globals_total", outcome="refused", reason=reason)
            log.warning("FL global record refused (%s): %s", reason, exc)
            return None
        self.last_round = model.round
        return model

    def _run(self) -> None:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": "qsfraud-fl",
                             "enable.auto.commit": False, "enable.partition.eof": True,
                             "isolation.level": "read_committed"})
        pending: GlobalModel | None = None
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            while not self._stop.is_set():
                msg = consumer.poll(0.2)
                if msg is None:
                    continue
                err = msg.error()
                if err is not None:
                    if err.code() == KafkaError._PARTITION_EOF:
                        if not self.caught_up.is_set():
                            self.caught_up.set()
                            if pending is not None:
                                self.deliver(pending)
                                pending = None
                            self.on_caught_up()
                    elif err.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
                        log.warning("FL global topic: %s", err)
                    continue
                model = self.offer(msg.value())
                if model is None:
                    continue
                if self.caught_up.is_set():
                    self.deliver(model)
                else:
                    pending = model  # only the newest present at start is folded in
        except Exception:  # the worker keeps scoring with its local model; the error is logged
            log.exception("FL global follower stopped")
        finally:
            self.caught_up.set()
            consumer.close()


def start_client(settings: WorkerSettings, pipeline: Any, metrics: WorkerMetrics,
                 submit: Callable[[str, Callable[[], None]], None]) -> tuple[FlClient,
                                                                           GlobalFollower]:
    """The worker's FL client and its global-model follower (started); ``submit`` is
    :meth:`streams.app.BetweenBatches.submit`, so every fold-in happens between batches."""
    assert settings.fl_identity and settings.fl_aggregator and settings.fl_trust
    keys = load_fl_keys(settings.fl_identity, settings.fl_aggregator, settings.fl_trust)
    ensure_topics(settings.bootstrap, [TopicSpec(settings.fl_updates_topic, 1, {}),
                                       TopicSpec(settings.fl_global_topic, 1, COMPACTED)])
    state_dir = settings.datadir / settings.app_id
    state_dir.mkdir(parents=True, exist_ok=True)
    client = FlClient(keys, state_dir / SEQUENCE_FILE, metrics, settings.fl_sync_labels)
    watch_key = load_watch_key(settings, keys)
    if watch_key is not None:
        client.watch = WatchClient(watch_key, state_dir / WATCH_OWN_FILE, metrics,
                                   settings.fl_watch_min_score, settings.fl_watch_report,
                                   settings.fl_watch_new_devices,
                                   settings.fl_watch_new_min_score)
        pipeline.after_decide = client.watch.after_decide
        log.info("FL watchlist on (reports: %s%s; holds listed rows scoring >= %.2f)",
                 settings.fl_watch_report,
                 " and new devices" if settings.fl_watch_new_devices else "",
                 settings.fl_watch_min_score)

    def deliver(global_model: GlobalModel) -> None:
        submit("fl.global", partial(client.fold, pipeline, global_model))

    def caught_up() -> None:
        submit("fl.ready", partial(setattr, client, "ready", True))

    follower = GlobalFollower(settings.bootstrap, settings.fl_global_topic, keys.trust, metrics,
                              deliver, caught_up)
    follower.start()
    log.info("federated learning on: %s, updates to %s, global models from %s",
             keys.participant, settings.fl_updates_topic, settings.fl_global_topic)
    return client, follower


__all__ = ["FlClient", "FlKeys", "FlSetupError", "GlobalFollower", "WatchClient",
           "fold_in_river", "load_fl_keys", "load_watch_key", "start_client"]
