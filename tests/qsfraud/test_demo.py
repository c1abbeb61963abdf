"""``qsfraud demo`` end to end: three retailers' databases -> CDC -> Kafka -> workers ->
decisions, the aggregator and the FL topics, the headless summary, and cleanup (also on
Ctrl-C)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from fraud.metrics import average_precision
from qsfraud.commands.demo import _defaults
from qsfraud.demo import Demo, DemoSettings, RetailerTally, worker_fl_flags
from qsfraud.stack.service import port_is_free

RETAILER_KEYS = {"written", "captured", "decided", "actions", "p50_ms", "p99_ms",
                 "average_precision", "recall", "attack_caught"}


def left_running(root: Path) -> list[str]:
    """Live processes whose command line names ``root`` (every role and service of a demo
    does: configs, data and key stores live under it). ``-ww``: ps would otherwise cut the
    lines to $COLUMNS, which pytest sets, and find nothing."""
    ps = subprocess.run(["ps", "-ww", "-eo", "stat=,args="], capture_output=True,
                        text=True).stdout
    return [line for line in ps.splitlines() if str(root) in line and not line.startswith("Z")]


def kill_left(root: Path, *ports: int) -> None:
    """kill -9 what a demo that had to be killed left behind: its roles and services (in
    sessions of their own) and whatever listens on ``ports`` (the UI)."""
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True,
                        text=True).stdout
    pids = {int(line.split()[0]) for line in ps.splitlines() if str(root) in line}
    for port in ports:
        ss = subprocess.run(["ss", "-Htlnp", f"sport = :{port}"], capture_output=True,
                            text=True).stdout
        pids |= {int(p) for p in re.findall(r"pid=(\d+)", ss)}
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


KILLED = ("cdc-acme", "worker-globex", "aggregator")


def ctrl_c(proc: subprocess.Popen[str], root: Path, *ports: int) -> str:
    """Ctrl-C a demo (also when an assert failed) and return its output; kill -9 what is left
    if it does not stop: its children are in sessions of their own, so killing the demo alone
    would leave them running."""
    proc.send_signal(signal.SIGINT)
    try:
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
            kill_left(root, *ports)
    return out


@pytest.fixture(scope="module")
def headless(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One headless run with the faults and the hostile inputs together (each run starts the
    whole stack, which is most of its time): kill -9 acme's CDC, globex's worker and the
    aggregator once each and restart the broker once, and 15 % into the writes, malformed
    rows in every database (wrong type, missing field, NaN and negative amounts, a timestamp
    in 2099, 100 KB strings), garbage, oversized, too deep and wrongly shaped records on every
    retailer's input and label topics, an unsigned and an untrusted config document."""
    root = tmp_path_factory.mktemp("demo") / "run"
    result = subprocess.run(
        [sys.executable, "-m", "qsfraud", "demo", "--headless", "--faults", "--hostile",
         "--duration", "90", "--rate", "20", "--fl-interval", "6", "--report-every", "10",
         "--root", str(root)],
        capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return {"root": root, "stdout": result.stdout,
            "summary": json.loads(result.stdout.splitlines()[-1]),
            "audit": json.loads((root / "audit.json").read_text())}


def test_cli_defaults_are_the_demo_settings():
    settings = DemoSettings()
    assert _defaults() == {"rate": settings.rate, "days": settings.days,
                           "tx_per_day": settings.tx_per_day,
                           "report_every": settings.report_every,
                           "fl_interval_s": settings.fl_interval_s,
                           "partitions": settings.partitions}


def test_tally_label_metrics_join_labels_and_first_decisions_in_either_order() -> None:
    """The status line's AP and recall, kept as labels and decisions come, are those of
    every decided transaction whose label was sent, with its first decision."""
    tally = RetailerTally()
    tally.label("a", True)  # the label before the decision
    tally.decide("a", "block", 0.9)
    tally.decide("b", "allow", 0.2)
    tally.label("b", False)
    tally.decide("c", "allow", 0.4)  # a fraud let through
    tally.label("c", True)
    tally.decide("d", "verify", 0.7)  # decided, not labelled: not counted
    tally.label("e", False)  # labelled, not decided: not counted
    truth, scores = [1, 0, 1], [0.9, 0.2, 0.4]
    ap, recall = tally.label_metrics()
    assert ap == average_precision(truth, scores)
    assert recall == 0.5
    assert tally.actions() == {"block": 1, "allow": 2, "verify": 1}


def test_fl_flags_are_detected_from_the_worker_help():
    help_text = subprocess.run([sys.executable, "-m", "qsfraud", "worker", "--help"],
                               capture_output=True, text=True, check=True).stdout
    assert worker_fl_flags() == all(
        flag in help_text for flag in ("--fl-identity", "--fl-aggregator", "--fl-trust"))


@pytest.mark.integration
def test_headless_summary_is_the_last_line_with_every_figure(headless: dict[str, Any]):
    summary = headless["summary"]
    assert set(summary) == {"retailers", "fl", "startup", "hops_ms"}
    assert set(summary["retailers"]) == set(Demo.RETAILERS)
    for retailer, figures in summary["retailers"].items():
        assert set(figures) == RETAILER_KEYS, retailer
        # 90 s at 20 a second: over a thousand, whatever the load did to the pacing
        assert figures["written"] > 1000, (retailer, figures)
        assert figures["captured"] == figures["written"], (retailer, figures)
        assert figures["decided"] == figures["written"], (retailer, figures)
        assert sum(figures["actions"].values()) == figures["decided"]
        assert set(figures["actions"]) <= {"allow", "verify", "hold", "block"}
        assert 0 <= figures["p50_ms"] <= figures["p99_ms"]
        assert set(figures["attack_caught"]) == {"caught", "of"}
    assert set(summary["fl"]) == {"rounds", "contributors", "version"}
    assert "every process it started has exited" in headless["stdout"]


@pytest.mark.integration
def test_summary_times_the_start_and_each_hop_to_the_decision(headless: dict[str, Any]):
    startup = headless["summary"]["startup"]
    assert 0 < startup["stack_ready_s"] < startup["workers_ready_s"]
    for retailer in Demo.RETAILERS:
        assert startup["workers_ready_s"] < startup["first_decision_s"][retailer]
        assert f"{retailer:8} first decision" in headless["stdout"]
        hops = headless["summary"]["hops_ms"][retailer]
        assert list(hops) == ["encoded", "produced", "visible", "received", "decided"]
        # every decided purchase of this run has its stamps (the CDC's and the worker's
        # clocks are this machine's); "visible" is when the demo's own consumer read it,
        # which may come after the worker's
        assert hops["decided"]["n"] > 1000, hops
        p50 = {stage: hops[stage]["p50"] for stage in hops}
        assert p50["encoded"] <= p50["produced"] <= p50["received"] <= p50["decided"], hops
        assert p50["produced"] <= p50["visible"], hops
        assert hops["decided"]["p99"] == headless["summary"]["retailers"][retailer]["p99_ms"]


@pytest.mark.integration
def test_every_written_transaction_has_exactly_one_decision(headless: dict[str, Any]):
    for retailer, audit in headless["audit"]["retailers"].items():
        assert audit["written"] > 1000, retailer
        # each transaction read back from the retailer's database has a decision ...
        assert audit["missing"] == 0, (retailer, audit)
        # ... one: redeliveries repeat it byte for byte (at-least-once, dedup by tx_id)
        assert audit["conflicting"] == 0, (retailer, audit)
        assert audit["decided_not_written"] == 0, (retailer, audit)


@pytest.mark.integration
def test_fl_topics_carry_only_sealed_and_signed_envelopes(headless: dict[str, Any]):
    fl = headless["audit"]["fl"]
    # every record on qsfraud.fl.updates opens with the aggregator's KEM key and a trusted
    # retailer's signature; every one on qsfraud.fl.global verifies as the aggregator's
    assert fl["updates_refused"] == [] and fl["updates_opened"] == fl["updates"]
    assert fl["globals_refused"] == [] and fl["globals_verified"] == fl["globals"]
    if not headless["audit"]["fl_enabled"]:
        assert fl["updates"] == 0 and headless["summary"]["fl"]["rounds"] == 0
        pytest.skip("`qsfraud worker` has no --fl-identity/--fl-aggregator/--fl-trust yet: "
                    "workers do not federate, so rounds and contributors cannot be checked "
                    "(this part runs once they do)")
    assert fl["updates"] > 0
    summary = headless["summary"]["fl"]
    assert summary["rounds"] >= 3, summary
    assert set(summary["contributors"]) == set(Demo.RETAILERS), summary
    assert summary["version"]


@pytest.mark.integration
def test_headless_run_leaves_nothing_running(headless: dict[str, Any]):
    assert left_running(headless["root"]) == []


@pytest.mark.integration
def test_ctrl_c_stops_every_process_with_the_ui(tmp_path: Path):
    root = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsfraud", "demo", "--rate", "20", "--report-every", "2",
         "--ui-port", "0", "--root", str(root)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    assert proc.stdout is not None
    lines: list[str] = []
    ui_port = 0
    deadline = time.monotonic() + 300
    try:
        # interrupt while purchases are written and decided, the UI up
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("acme") and "decided=0 " not in line and "tx/s" in line:
                break
            assert time.monotonic() < deadline, "".join(lines[-30:])
        ui = [line.split()[1] for line in lines if line.startswith("UI: http://127.0.0.1:")]
        assert ui, lines
        ui_port = int(ui[0].rsplit(":", 1)[1])
        assert left_running(root), "the demo's processes should be running now"
        # streamlit takes a few seconds to listen (more on a loaded machine)
        while port_is_free("127.0.0.1", ui_port) and time.monotonic() < deadline:
            time.sleep(0.5)
        assert not port_is_free("127.0.0.1", ui_port), "the UI should be serving now"
    finally:
        out = ctrl_c(proc, root, *([ui_port] if ui_port else []))
    lines.append(out)
    assert proc.returncode == 0, "".join(lines[-30:])
    assert "every process it started has exited" in out
    assert left_running(root) == []
    # the UI (streamlit, whose command line does not name the root) stopped too
    assert port_is_free("127.0.0.1", ui_port)


@pytest.mark.integration
def test_ctrl_c_while_the_stack_starts_stops_every_process(tmp_path: Path):
    root = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsfraud", "demo", "--headless", "--duration", "30",
         "--root", str(root)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        # the services start side by side and the model's loops compile beside them; Kafka
        # takes seconds to answer
        deadline = time.monotonic() + 60
        while not (root / "stack" / "kafka").exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.0)
    finally:
        out = ctrl_c(proc, root)
    assert proc.returncode == 0, out
    assert "stack ready" not in out, "the Ctrl-C should have come while the stack started"
    assert "every process it started has exited" in out
    assert left_running(root) == []
    ps = subprocess.run(["ps", "-ww", "-eo", "pid=,args="], capture_output=True, text=True)
    assert "RiskModel.warm_up" not in ps.stdout


@pytest.mark.integration
def test_fault_run_loses_and_doubles_no_decision(headless: dict[str, Any]):
    """The roles killed come back (the demo supervises them as a container runtime would),
    and no purchase lacks a decision or has two (the exactly-once test above, on this run)."""
    audit, stdout = headless["audit"], headless["stdout"][-3000:]
    faults = audit["faults"]
    assert [(f["fault"], f["target"]) for f in faults] == [
        *(("kill -9", role) for role in KILLED), ("restart", "kafka")], stdout
    assert all(audit["restarts"].get(role, 0) >= 1 for role in KILLED), audit
    broker_restart = faults[-1]["at_s"]
    for event in audit["restart_events"]:
        # before the broker's restart only the roles killed exited, by the SIGKILL; a role
        # may exit when the broker goes away, and is started again
        if event["at_s"] < broker_restart:
            assert event["role"] in KILLED and event["code"] == -9, audit["restart_events"]
    for retailer, figures in audit["retailers"].items():
        assert figures["written"] > 1000, (retailer, figures)
        assert figures["missing"] == 0, (retailer, figures, stdout)
        assert figures["conflicting"] == 0, (retailer, figures)
        assert figures["decided_not_written"] == 0, (retailer, figures)


@pytest.mark.integration
def test_hostile_inputs_end_in_dead_letters_and_stop_no_process(headless: dict[str, Any]):
    audit = headless["audit"]
    hostile = audit["hostile"]
    assert hostile["sent"] == 3 + 4 + 3 + 3 * 2 * 5 + 2
    assert hostile["unmatched"] == [], hostile["unmatched"]
    for item in hostile["items"]:
        # each in a dead-letter topic of the retailer it was sent to, with a reason
        retailer = item["where"].split()[0].split(".")[0]
        topic, reason = item["dead_letter"].split(": ", 1)
        assert topic.split(".")[0] == retailer and topic.endswith(".dlq"), item
        assert reason and reason != "?", item
    assert hostile["decided"] == []
    # two bad config documents, rejected by each of the three workers
    assert hostile["config_rejection_reports"] >= 2 * 3
    # sent 15 % into the writes, before the broker's restart: until then no role exited
    # but by the faults' SIGKILL (test_fault_run_loses_and_doubles_no_decision checks that)
    assert hostile["at_s"] < audit["faults"][-1]["at_s"], (hostile["at_s"], audit["faults"])


@pytest.mark.integration
def test_mariadb_orders_commit_each_purchase_as_its_own_transaction(
        mariadb: Any, unique_name: str) -> None:
    """The latency is measured from each purchase's COMMIT: one binlog transaction each."""
    import mysql.connector

    from qsfraud.demo import MariaDBOrders
    from qsfraud.stack import CDC_USER

    orders = MariaDBOrders(mariadb.host, mariadb.port, database=unique_name)
    try:
        orders.reset()
        admin = mysql.connector.connect(host=mariadb.host, port=mariadb.port,  # binlog rights
                                        user=CDC_USER.user, password=CDC_USER.password)
        cur = admin.cursor()
        cur.execute("SHOW MASTER STATUS")
        status = cur.fetchone()
        assert status is not None
        log_file, position = str(status[0]), str(status[1])  # type: ignore[index]
        rows = [row for _, row in zip(range(5), Demo(DemoSettings(root=Path("unused"))).rows(),
                                      strict=False)]
        orders.insert(rows)
        assert orders.ids() == {r["tx_id"] for r in rows}
        cur.execute(f"SHOW BINLOG EVENTS IN '{log_file}' FROM {position}")
        events = [str(e[2]) for e in cur.fetchall()]  # type: ignore[index]
        admin.close()
        assert events.count("Xid") == 5 and events.count("Write_rows_v1") == 5, events
    finally:
        orders.close()
