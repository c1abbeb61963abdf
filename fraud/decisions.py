"""From a risk score to allow / verify / hold / block, with the reasons why.

Precedence, as in commercial fraud engines:

1. block lists (customer, instrument, device, IP) and rules whose action is ``block``;
2. allow lists (a trusted customer, instrument, device or IP is allowed);
3. otherwise the most severe of the score band and any other rule that fired
   (``verify`` = step-up such as 3-D Secure or an OTP, ``hold`` = manual review).

Everything comes from :class:`PolicyConfig`, versioned plain data (``to_dict``/``from_dict``)
that admins push as signed JSON; :class:`Policy` holds the current one and can swap it at run
time.

>>> config = PolicyConfig.from_dict({"v": 1, "version": 3,
...     "thresholds": {"verify": 0.5, "hold": 0.8, "block": 0.95},
...     "block": {"devices": ["d-evil"]},
...     "rules": [{"name": "big-ticket", "field": "amount", "op": ">", "value": 5000,
...                "action": "hold"}]})
>>> tx = {"tx_id": "t1", "retailer_id": "acme", "amount": 7200.0, "device_id": "d1"}
>>> d = decide(tx, 0.2, config, contributions=[("amount_log", 1.7)])
>>> d.action, d.reasons, d.config_version
('hold', ('rule:big-ticket', 'amount_log +1.70'), 3)
>>> decide({**tx, "device_id": "d-evil"}, 0.01, config).action
'block'
>>> decide({**tx, "amount": 10.0}, 0.6, config).action
'verify'
"""

from __future__ import annotations

import dataclasses
import math
import operator
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from fraud.models.risk import ModelParams
from fraud.models.river_spec import check_spec
from fraud.schema import ACTIONS, WATCH_FIELDS, Decision, SchemaError, Transaction

POLICY_VERSION: Final = 1
LIST_KINDS: Final = ("customers", "instruments", "devices", "ips")
_LIST_FIELDS: Final = {
    "customers": "customer_id",
    "instruments": "payment_instrument",
    "devices": "device_id",
    "ips": "ip",
}
_SEVERITY: Final = {a: i for i, a in enumerate(ACTIONS)}
_OPS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


@dataclass(frozen=True, slots=True)
class Rule:
    """``field op value -> action``. ``field`` is a transaction field (``amount``,
    ``channel``, ...), an extra field, ``score``, or ``feature:<name>`` for a feature value."""

    name: str
    field: str
    op: str
    value: Any
    action: str

    def fires(self, tx: Mapping[str, Any], score: float, features: Mapping[str, float]) -> bool:
        if self.field == "score":
            actual: Any = score
        elif self.field.startswith("feature:"):
            actual = features.get(self.field[8:])
        else:
            actual = tx.get(self.field)
            if actual is None:
                extras = tx.get("extras")
                if isinstance(extras, Mapping):
                    actual = extras.get(self.field)
        if actual is None:
            return False
        try:
            return bool(_OPS[self.op](actual, self.value))
        except TypeError:
            return False

    def to_dict(self) -> dict[str, Any]:
        value = list(self.value) if isinstance(self.value, tuple | frozenset) else self.value
        return {"name": self.name, "field": self.field, "op": self.op, "value": value,
                "action": self.action}

    @classmethod
    def from_dict(cls, d: Any, where: str = "rules") -> Rule:
        if not isinstance(d, Mapping):
            raise SchemaError(where, "expected an object")
        for key in ("name", "field", "op", "action"):
            if not isinstance(d.get(key), str) or not d[key]:
                raise SchemaError(f"{where}.{key}", "is required (a string)")
        if d["op"] not in _OPS:
            raise SchemaError(f"{where}.op", f"must be one of {', '.join(_OPS)}; got {d['op']!r}")
        if d["action"] not in ACTIONS or d["action"] == "allow":
            raise SchemaError(
                f"{where}.action", f"must be verify, hold or block; got {d['action']!r}"
            )
        if "value" not in d:
            raise SchemaError(f"{where}.value", "is required")
        value = d["value"]
        if d["op"] in ("in", "not in"):
            if not isinstance(value, list | tuple):
                raise SchemaError(f"{where}.value", "expected a list for 'in'")
            value = tuple(value)
        elif isinstance(value, float) and not math.isfinite(value):
            raise SchemaError(f"{where}.value", "must be finite")
        return cls(str(d["name"]), str(d["field"]), str(d["op"]), value, str(d["action"]))


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Score bands: ``>= verify`` steps up, ``>= hold`` goes to review, ``>= block`` blocks."""

    verify: float = 0.5
    hold: float = 0.8
    block: float = 0.95

    def action(self, score: float) -> str:
        if score >= self.block:
            return "block"
        if score >= self.hold:
            return "hold"
        if score >= self.verify:
            return "verify"
        return "allow"


def _entity_lists(d: Any, where: str) -> dict[str, frozenset[str]]:
    if d is None:
        d = {}
    if not isinstance(d, Mapping):
        raise SchemaError(where, "expected an object of lists")
    out: dict[str, frozenset[str]] = {}
    for key, values in d.items():
        if key not in LIST_KINDS:
            raise SchemaError(f"{where}.{key}", f"unknown list; use {', '.join(LIST_KINDS)}")
        if not isinstance(values, list | tuple) or not all(isinstance(v, str) for v in values):
            raise SchemaError(f"{where}.{key}", "expected a list of strings")
        out[key] = frozenset(values)
    return {k: out.get(k, frozenset()) for k in LIST_KINDS}


@dataclass(frozen=True, slots=True)
class PolicyConfig:
    """Versioned, plain-data decision policy: thresholds, lists, rules, model parameters."""

    version: int = 0
    thresholds: Thresholds = field(default_factory=Thresholds)
    block: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: {k: frozenset() for k in LIST_KINDS}
    )
    allow: Mapping[str, frozenset[str]] = field(
        default_factory=lambda: {k: frozenset() for k in LIST_KINDS}
    )
    rules: tuple[Rule, ...] = ()
    model: ModelParams = field(default_factory=ModelParams)
    top_reasons: int = 3
    # a River model spec (fraud.models.river_spec) run instead of the default RiskModel
    river_model: tuple[dict[str, Any], ...] | None = None

    @classmethod
    def from_dict(cls, d: Any) -> PolicyConfig:
        """Validate plain data; a ``SchemaError`` names the bad field."""
        if not isinstance(d, Mapping):
            raise SchemaError("policy", f"expected an object, got {type(d).__name__}")
        if d.get("v", POLICY_VERSION) != POLICY_VERSION:
            raise SchemaError("v", f"unsupported policy version {d.get('v')!r}")
        known = {"v", "kind", "version", "thresholds", "block", "allow", "rules", "model",
                 "top_reasons", "river_model"}
        for key in d:
            if key not in known:
                raise SchemaError(str(key), "unknown policy field")
        version = d.get("version", 0)
        if isinstance(version, bool) or not isinstance(version, int) or version < 0:
            raise SchemaError("version", f"expected a non-negative integer, got {version!r}")
        th = d.get("thresholds") or {}
        if not isinstance(th, Mapping):
            raise SchemaError("thresholds", "expected an object")
        values: dict[str, float] = {}
        for key, value in th.items():
            if key not in ("verify", "hold", "block"):
                raise SchemaError(f"thresholds.{key}", "unknown threshold")
            if isinstance(value, bool) or not isinstance(value, int | float) or not (
                0.0 <= value <= 1.0
            ):
                raise SchemaError(
                    f"thresholds.{key}", f"expected a number in [0, 1], got {value!r}"
                )
            values[key] = float(value)
        thresholds = Thresholds(**values)
        if not thresholds.verify <= thresholds.hold <= thresholds.block:
            raise SchemaError("thresholds", "need verify <= hold <= block")
        rules = d.get("rules") or []
        if not isinstance(rules, list | tuple):
            raise SchemaError("rules", "expected a list")
        top = d.get("top_reasons", 3)
        if isinstance(top, bool) or not isinstance(top, int) or top < 0:
            raise SchemaError("top_reasons", f"expected a non-negative integer, got {top!r}")
        model = d.get("model")
        if model is not None and not isinstance(model, Mapping):
            raise SchemaError("model", "expected an object")
        river_model = d.get("river_model")
        if river_model is not None:
            try:
                river_model = tuple(check_spec(river_model))
            except SchemaError as exc:
                raise SchemaError(f"river_{exc.field}", str(exc).split(": ", 1)[-1]) from None
        return cls(
            version=version,
            thresholds=thresholds,
            block=_entity_lists(d.get("block"), "block"),
            allow=_entity_lists(d.get("allow"), "allow"),
            rules=tuple(Rule.from_dict(r, f"rules[{i}]") for i, r in enumerate(rules)),
            model=ModelParams.from_dict(model),
            top_reasons=top,
            river_model=river_model,
        )

    def to_dict(self) -> dict[str, Any]:
        out = {
            "v": POLICY_VERSION,
            "kind": "policy",
            "version": self.version,
            "thresholds": {"verify": self.thresholds.verify, "hold": self.thresholds.hold,
                           "block": self.thresholds.block},
            "block": {k: sorted(v) for k, v in self.block.items() if v},
            "allow": {k: sorted(v) for k, v in self.allow.items() if v},
            "rules": [r.to_dict() for r in self.rules],
            "model": self.model.to_dict(),
            "top_reasons": self.top_reasons,
        }
        if self.river_model is not None:
            out["river_model"] = [dict(step) for step in self.river_model]
        return out


def _as_mapping(tx: Transaction | Mapping[str, Any]) -> Mapping[str, Any]:
    if isinstance(tx, Transaction):
        return {
            "tx_id": tx.tx_id, "retailer_id": tx.retailer_id, "amount": tx.amount,
            "currency": tx.currency, "customer_id": tx.customer_id,
            "payment_instrument": tx.payment_instrument, "device_id": tx.device_id,
            "ip": tx.ip, "channel": tx.channel, "store_id": tx.store_id,
            "terminal_id": tx.terminal_id, "coupon_code": tx.coupon_code,
            "item_count": tx.item_count, "address_mismatch": tx.address_mismatch,
            "occurred_at": tx.occurred_at, "extras": tx.extras,
        }
    return tx


def _field(tx: Transaction | Mapping[str, Any], name: str) -> Any:
    """One field of ``tx``, without building :func:`_as_mapping`'s dict of all of them."""
    return getattr(tx, name) if isinstance(tx, Transaction) else tx.get(name)


def _listed(tx: Transaction | Mapping[str, Any], lists: Mapping[str, frozenset[str]],
            tag: str) -> list[str]:
    """``<tag>:<entity>`` for each of ``tx``'s entities found in its list."""
    hits = []
    for kind, name in _LIST_FIELDS.items():
        ids = lists[kind]
        if ids:  # most lists are empty: no field lookup then
            value = _field(tx, name)
            if value is not None and value in ids:
                hits.append(f"{tag}:{kind[:-1]}")
    return hits


def decide(
    tx: Transaction | Mapping[str, Any],
    score: float,
    config: PolicyConfig,
    contributions: Iterable[tuple[str, float]] = (),
    features: Mapping[str, float] | None = None,
    model_version: str = "",
    timings: Mapping[str, float] | None = None,
) -> Decision:
    """Decide one transaction. ``contributions`` are the model's top ``(feature, weight*z)``.

    Reasons: list hits (``blocklist:device``, ``allowlist:customer``), fired rules
    (``rule:<name>``), the score band (``score>=hold``) and the top feature contributions.
    ``features`` are needed only by rules on ``feature:<name>`` fields.
    """
    score = 0.0 if not score > 0.0 else 1.0 if score > 1.0 else float(score)
    reasons = _listed(tx, config.block, "blocklist")
    action = ""
    fired: list[Rule] = []
    if config.rules:
        t = _as_mapping(tx)
        feats = features or {}
        fired = [r for r in config.rules if r.fires(t, score, feats)]
    for rule in fired:
        if rule.action == "block":
            reasons.append(f"rule:{rule.name}")
    if reasons:
        action = "block"
    else:
        reasons = _listed(tx, config.allow, "allowlist")
        if reasons:
            action = "allow"
    if not action:
        action = config.thresholds.action(score)
        if action != "allow":
            reasons.append(f"score>={action}")
        for rule in fired:
            reasons.append(f"rule:{rule.name}")
            if _SEVERITY[rule.action] > _SEVERITY[action]:
                action = rule.action
    if config.top_reasons:
        # %-formatting: the same text as f"{k} {c:+.2f}", in half the time
        reasons += ["%s %+.2f" % kc  # noqa: UP031
                    for kc in list(contributions)[: config.top_reasons]]
    stamp = dict(timings or {})
    stamp.setdefault("decided", time.time())
    if isinstance(tx, Transaction):  # validated: both are non-empty strings
        tx_id, retailer = tx.tx_id, tx.retailer_id
    else:
        tx_id, retailer = str(tx.get("tx_id") or ""), str(tx.get("retailer_id") or "")
    return Decision(
        tx_id=tx_id,
        retailer_id=retailer,
        score=score,
        action=action,
        reasons=tuple(reasons),
        model_version=model_version,
        config_version=config.version,
        timings=stamp,
    )



NEW_DEVICE_MIN_SCORE: Final = 0.2
"""The own score a row needs before the new-device rule of :class:`Watchlist` holds it."""


@dataclass(frozen=True, slots=True)
class Watchlist:
    """Instruments and devices other retailers reported, known only as keyed hashes.

    ``reported`` maps a hashed key to how many *other* retailers reported it; ``key_of(kind,
    value)`` hashes one of this transaction's entities the same way (the hashing and its key
    live outside ``fraud``: ``fl.watchlist``). A listed entity raises a decision whose score is
    at least ``min_score`` to at least ``action``, never lowers it; the retailer's own allow
    list still wins. ``min_score`` 0 holds every listed entity; above 0, only those the own
    model also finds somewhat suspicious (fewer false holds where a listed card's owner keeps
    buying, and fewer attacks caught: fl/README.md, "Cross-retailer watchlist").

    ``new_devices`` maps hashed devices to how many other retailers saw them for the first
    time lately: a transaction whose device is new here too (the caller says so:
    ``new_here``) and that the own model scores at least ``new_min_score`` is raised as well
    (two signals and a score: a new device alone is an ordinary customer's new phone).

    >>> key_of = lambda kind, value: f"{kind}/{value}"
    >>> watch = Watchlist({"instrument/pi-9": 2}, key_of)
    >>> tx = {"tx_id": "t1", "retailer_id": "acme", "payment_instrument": "pi-9"}
    >>> d = watch.escalate(decide(tx, 0.1, PolicyConfig()), tx)
    >>> d.action, d.reasons
    ('hold', ('watchlist:instrument reported by 2 other retailers',))
    >>> watch.escalate(decide({**tx, "payment_instrument": "pi-1"}, 0.1, PolicyConfig()),
    ...                tx | {"payment_instrument": "pi-1"}).action
    'allow'
    >>> new = Watchlist({}, key_of, new_devices={"device/d-7": 1})
    >>> tx = {"tx_id": "t2", "retailer_id": "acme", "device_id": "d-7"}
    >>> new.escalate(decide(tx, 0.3, PolicyConfig()), tx, new_here=True).reasons
    ('watchlist:device new at 1 other retailer',)
    >>> new.escalate(decide(tx, 0.3, PolicyConfig()), tx).action  # known here: no
    'allow'
    """

    reported: Mapping[str, int]
    key_of: Callable[[str, str], str]
    action: str = "hold"
    min_score: float = 0.0
    new_devices: Mapping[str, int] = field(default_factory=dict)
    new_min_score: float = NEW_DEVICE_MIN_SCORE

    def __post_init__(self) -> None:
        if self.action not in ("verify", "hold", "block"):
            raise ValueError(f"watchlist action must be verify, hold or block, got "
                             f"{self.action!r}")
        for name in ("min_score", "new_min_score"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"watchlist {name} must be in [0, 1], got {value!r}")

    def hit(self, tx: Transaction | Mapping[str, Any]) -> tuple[str, int] | None:
        """``(kind, retailers)`` of ``tx``'s most-reported listed entity, or None."""
        if not self.reported:
            return None
        best: tuple[str, int] | None = None
        for kind, name in WATCH_FIELDS.items():
            value = _field(tx, name)
            if value:
                count = self.reported.get(self.key_of(kind, str(value)), 0)
                if count > 0 and (best is None or count > best[1]):
                    best = (kind, count)
        return best

    def new_device_hit(self, tx: Transaction | Mapping[str, Any]) -> int:
        """How many other retailers listed ``tx``'s device as new (0: none)."""
        value = _field(tx, WATCH_FIELDS["device"]) if self.new_devices else None
        return self.new_devices.get(self.key_of("device", str(value)), 0) if value else 0

    def escalate(self, decision: Decision, tx: Transaction | Mapping[str, Any], *,
                 new_here: bool = False) -> Decision:
        """``decision`` raised to ``action`` if ``tx`` names a listed entity (or, when
        ``new_here``, a device listed as new elsewhere); its reason says which kind and how
        many retailers reported it."""
        if (_SEVERITY[decision.action] >= _SEVERITY[self.action]
                or any(r.startswith("allowlist:") for r in decision.reasons)):
            return decision
        found = self.hit(tx) if decision.score >= self.min_score else None
        if found is not None:
            kind, count = found
            what = f"{kind} reported by"
        elif new_here and decision.score >= self.new_min_score:
            count = self.new_device_hit(tx)
            if count == 0:
                return decision
            what = "device new at"
        else:
            return decision
        plural = "" if count == 1 else "s"
        reason = f"watchlist:{what} {count} other retailer{plural}"
        return dataclasses.replace(decision, action=self.action,
                                   reasons=(reason, *decision.reasons))


class Policy:
    """Holds the current :class:`PolicyConfig`; ``replace`` swaps it atomically at run time.

    >>> policy = Policy()
    >>> policy.replace(PolicyConfig.from_dict({"version": 2}))
    >>> policy.config.version
    2
    >>> policy.replace(PolicyConfig.from_dict({"version": 1}))
    Traceback (most recent call last):
    ...
    ValueError: policy version 1 is older than the current 2
    """

    def __init__(self, config: PolicyConfig | None = None) -> None:
        self.config = config or PolicyConfig()

    def replace(self, config: PolicyConfig, allow_older: bool = False) -> None:
        if config.version < self.config.version and not allow_older:
            raise ValueError(
                f"policy version {config.version} is older than the current {self.config.version}"
            )
        self.config = config

    def decide(
        self,
        tx: Transaction | Mapping[str, Any],
        score: float,
        contributions: Sequence[tuple[str, float]] = (),
        features: Mapping[str, float] | None = None,
        model_version: str = "",
        timings: Mapping[str, float] | None = None,
    ) -> Decision:
        return decide(tx, score, self.config, contributions, features, model_version, timings)
