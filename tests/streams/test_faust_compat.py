"""The seam to faust/mode/aiokafka private code notices any change of what it replaces."""

from __future__ import annotations

import inspect
import tomllib
from pathlib import Path

import pytest

from streams import faust_compat
from streams.faust_compat import (
    PINNED_VERSIONS,
    UPSTREAM,
    IncompatibleVersions,
    check_versions,
    fingerprint,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("target", sorted(UPSTREAM))
def test_the_upstream_source_is_the_one_the_override_was_written_against(target: str) -> None:
    assert fingerprint(target) == UPSTREAM[target], (
        f"{target} changed upstream: review what streams/faust_compat.py does in its place, "
        "then record the new fingerprint")


def _overridden_upstream_methods() -> list[str]:
    """``module:Class.name`` of every upstream method a class of faust_compat overrides."""
    found = []
    for cls in (faust_compat.RawSchema, faust_compat.ConsumerThreadOnLoop,
                faust_compat.Consumer):
        for name, value in vars(cls).items():
            if not callable(value) or name in ("__init__",):
                continue
            for base in cls.__mro__[1:]:
                if name in vars(base):
                    found.append(f"{base.__module__}:{base.__qualname__}.{name}")
                    break
    return found


def test_every_override_has_a_recorded_fingerprint() -> None:
    overridden = _overridden_upstream_methods()
    assert len(overridden) >= 14
    # on_stop stands in for faust's on_thread_stop (mode's on_stop is an empty callback)
    missing = [t for t in overridden
               if t not in UPSTREAM and t != "mode.services:ServiceCallbacks.on_stop"]
    assert missing == []


def test_nothing_else_in_streams_reaches_into_faust_private_code() -> None:
    """The app's wiring goes through faust_compat: no private faust attribute outside it."""
    for path in (ROOT / "streams").glob("*.py"):
        if path.name == "faust_compat.py":
            continue
        text = path.read_text()
        for needle in ("faust_aiokafka", "faust.transport", "_key_partition", "mode.threads",
                       "_drain_messages", "_fetch_max_wait_ms", "_isolation_level",
                       "app.transport.Consumer", "_tp_index"):
            assert needle not in text, f"{path.name} uses {needle}"


def test_the_installed_versions_are_the_pinned_ones_and_pyproject_pins_them() -> None:
    check_versions()
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    for name, version in PINNED_VERSIONS.items():
        assert f"{name}=={version}" in deps


def test_other_versions_are_refused_in_one_line_naming_installed_and_expected() -> None:
    with pytest.raises(IncompatibleVersions) as err:
        check_versions({"faust-streaming": "0.16.0", "aiokafka": "0.14.0",
                        "no-such-package-qsfraud": "1.0"})
    message = str(err.value)
    assert "\n" not in message
    assert "faust-streaming==0.16.0" in message and "faust-streaming==0.15.3" in message
    assert "no-such-package-qsfraud==(none)" in message
    assert "aiokafka" not in message  # the matching one is not named
    assert "pip install" in message


def test_a_fingerprint_is_of_the_installed_source() -> None:
    import hashlib

    from faust.transport.consumer import Consumer

    source = inspect.getsource(Consumer.getmany)
    assert fingerprint("faust.transport.consumer:Consumer.getmany") == hashlib.sha256(
        source.encode()).hexdigest()
