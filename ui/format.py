"""How the UI says things: reasons in words, money, percentages, milliseconds, times.

>>> reason_in_words("blocklist:device"), reason_in_words("rule:big-ticket")
('device on the block list', 'rule "big-ticket" fired')
>>> reason_in_words("score>=hold"), reason_in_words("customer_n_10m +1.70")
('score above the hold threshold', 'many customer transactions in 10 min (raises risk)')
>>> reason_in_words("amount_log -0.40")
'high amount (lowers risk)'
>>> money(1234.5, "EUR"), percent(0.1234), millis(0.0123)
('€1,234.50', '12.3%', '12 ms')
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

_SPECIAL: Final = {
    "amount_log": "high amount",
    "item_count": "many items",
    "address_mismatch": "billing and shipping address differ",
    "channel_web": "web channel",
    "channel_app": "app channel",
    "channel_pos": "in-store (POS) channel",
    "has_coupon": "coupon used",
    "hour_sin": "time of day",
    "hour_cos": "time of day",
    "customer_amount_z": "unusual amount for this customer",
    "customer_new": "new customer",
    "customer_new_device": "customer on a new device",
    "customer_devices": "many devices for this customer",
    "customer_new_ip": "customer from a new IP",
    "device_instruments": "many cards on this device",
    "device_customers": "many customers on this device",
    "coupon_reuse_rate": "coupon reused often",
}
_WINDOW: Final = {"10m": "10 min", "1h": "1 h", "24h": "24 h"}
_CONTRIBUTION: Final = re.compile(r"^(\w+) ([+-]\d+(?:\.\d+)?)$")
_LISTS: Final = {"customer": "customer", "instrument": "card", "device": "device", "ip": "IP",
                 "customers": "customer", "instruments": "card", "devices": "device",
                 "ips": "IP"}
_SYMBOLS: Final = {"EUR": "€", "USD": "$", "GBP": "£"}


def feature_in_words(name: str) -> str:
    """``customer_amt_1h`` -> ``customer amount in 1 h``; unknown names lose underscores."""
    if name in _SPECIAL:
        return _SPECIAL[name]
    entity, _, rest = name.partition("_")
    who = _LISTS.get(entity, entity)
    kind, _, window = rest.rpartition("_")
    if window in _WINDOW and kind == "n":
        return f"many {who} transactions in {_WINDOW[window]}"
    if window in _WINDOW and kind == "amt":
        return f"high {who} spend in {_WINDOW[window]}"
    if rest == "since_last_log":
        return f"time since the {who}'s last transaction"
    return name.replace("_", " ")


def reason_in_words(reason: str) -> str:
    kind, sep, what = reason.partition(":")
    if sep and kind == "blocklist":
        return f"{_LISTS.get(what, what)} on the block list"
    if sep and kind == "allowlist":
        return f"trusted {_LISTS.get(what, what)} (allow list)"
    if sep and kind == "rule":
        return f'rule "{what}" fired'
    if reason.startswith("score>="):
        return f"score above the {reason[7:]} threshold"
    match = _CONTRIBUTION.match(reason)
    if match:
        direction = "raises" if float(match.group(2)) >= 0 else "lowers"
        return f"{feature_in_words(match.group(1))} ({direction} risk)"
    return reason


def reasons_in_words(reasons: tuple[str, ...] | list[str], limit: int = 3) -> str:
    return "; ".join(reason_in_words(r) for r in list(reasons)[:limit]) or "-"


def money(amount: float | None, currency: str | None = "EUR") -> str:
    if amount is None:
        return "-"
    code = currency or "EUR"
    symbol = _SYMBOLS.get(code)
    return f"{symbol}{amount:,.2f}" if symbol else f"{amount:,.2f} {code}"


def percent(fraction: float | None, digits: int = 1) -> str:
    return "-" if fraction is None else f"{fraction * 100:.{digits}f}%"


def millis(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1000.0
    if ms >= 10_000:
        return f"{seconds:,.1f} s"
    return f"{ms:,.0f} ms" if ms >= 10 else f"{ms:.1f} ms"


ACTION_COLORS: Final = {"allow": "#2e7d32", "verify": "#b28704", "hold": "#ef6c00",
                        "block": "#c62828"}
ACTION_BADGES: Final = {"allow": ":green-badge[allow]", "verify": ":yellow-badge[verify]",
                        "hold": ":orange-badge[hold]", "block": ":red-badge[block]"}
"""Streamlit markdown badges: colour without emoji (which not every browser font has)."""


def clock(ts: float) -> str:
    """``HH:MM:SS`` in UTC (the same on every analyst's screen)."""
    return datetime.fromtimestamp(ts, UTC).strftime("%H:%M:%S")


def when(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")
