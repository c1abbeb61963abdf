"""Every page under ``streamlit.testing.v1.AppTest``: empty state, Kafka unreachable, data from
real Kafka, the review verdict, and the admin guard and publish."""

from __future__ import annotations

import ast
import time
from pathlib import Path

import pytest

from fraud.schema import Label
from fraud.topics import RetailerTopics
from pqc.keys import init_keystore
from qsfraud.stack.service import free_port
from streams.topics import read_topic
from tests.ui.conftest import PAGES, app, decision, produce_decisions, run_until, texts


def labels_on(bootstrap: str, retailer: str) -> list[tuple[bytes | None, Label]]:
    topic = RetailerTopics(retailer).labels
    out = []
    for partition in range(2):
        out += [(key, Label.from_json(value))
                for _, key, value in read_topic(bootstrap, topic, partition) if value]
    return out


def test_every_page_says_plainly_when_kafka_is_unreachable(ui_env):
    ui_env.setenv("QSFRAUD_BOOTSTRAP", f"127.0.0.1:{free_port()}")
    at = app()
    for page in PAGES:
        run_until(at, lambda a: "Kafka is unreachable" in texts(a), page=page)
    assert "reconnects by itself" in texts(at)


def test_without_any_kafka_configured_the_app_says_how_to_give_one(ui_env):
    at = run_until(app(), lambda a: bool(a.error))
    assert "No Kafka configured" in texts(at)
    assert "QSFRAUD_BOOTSTRAP" in texts(at)


def test_empty_state_on_every_page(ui_env, kafka_bootstrap, unique_name):
    ui_env.setenv("QSFRAUD_BOOTSTRAP", kafka_bootstrap)
    ui_env.setenv("QSFRAUD_UI_RETAILERS", unique_name)
    at = app()
    run_until(at, lambda a: "No decisions yet" in texts(a), page="views/feed.py")
    run_until(at, lambda a: "The queue is empty" in texts(a), page="views/review.py")
    run_until(at, lambda a: "No federated rounds yet" in texts(a), page="views/charts.py")
    shown = texts(at)
    assert "No labels yet" in shown and "No worker /metrics configured" in shown
    assert not at.dataframe
    run_until(at, lambda a: "Read only" in texts(a), page="views/admin.py")


def test_feed_shows_decisions_newest_first_with_details(ui_env, kafka_bootstrap, unique_name):
    now = time.time()
    produce_decisions(kafka_bootstrap, unique_name, [
        (decision("tx-old", unique_name, 0.10, "allow", now - 5), "cust-1", 12.5),
        (decision("tx-new", unique_name, 0.91, "hold", now, ("rule:big-ticket", "score>=hold",
                                                              "customer_n_10m +1.70")),
         "cust-2", 1234.5),
    ])
    ui_env.setenv("QSFRAUD_BOOTSTRAP", kafka_bootstrap)
    ui_env.setenv("QSFRAUD_UI_RETAILERS", unique_name)
    at = run_until(app(), lambda a: bool(a.dataframe) and len(a.dataframe[0].value) == 2
                   and "-" not in list(a.dataframe[0].value["Amount"]))  # both topics read
    table = at.dataframe[0].value
    assert list(table.columns) == ["Time", "Retailer", "Amount", "Score", "Action",
                                   "Latency", "Top reasons"]
    first = table.iloc[0]
    assert (first["Amount"], first["Action"], first["Latency"]) == ("€1,234.50", "hold",
                                                                    "12 ms")
    assert first["Top reasons"] == ('rule "big-ticket" fired; score above the hold threshold; '
                                    "many customer transactions in 10 min (raises risk)")
    assert table.iloc[1]["Amount"] == "€12.50"

    at.session_state["feed_selected_tx"] = "tx-new"
    at.run()
    shown = texts(at)
    assert "Transaction tx-new" in shown
    assert "Amount: €1,234.50" in shown and "Latency: 12 ms" in shown
    details = at.dataframe[-1].value
    assert dict(zip(details["Field"], details["Value"], strict=True))["Customer"] == "cust-2"

    at.multiselect(key="feed_actions").set_value(["allow"]).run()
    run_until(at, lambda a: len(a.dataframe[0].value) == 1)
    assert at.dataframe[0].value.iloc[0]["Action"] == "allow"


def test_a_verdict_is_published_once_and_leaves_every_queue(ui_env, kafka_bootstrap,
                                                            unique_name):
    now = time.time()
    produce_decisions(kafka_bootstrap, unique_name, [
        (decision("tx-hold", unique_name, 0.85, "hold", now - 3), "cust-7", 99.0),
        (decision("tx-verify", unique_name, 0.6, "verify", now - 2), "cust-8", 20.0),
        (decision("tx-allow", unique_name, 0.1, "allow", now - 1), "cust-9", 5.0),
    ])
    ui_env.setenv("QSFRAUD_BOOTSTRAP", kafka_bootstrap)
    ui_env.setenv("QSFRAUD_UI_RETAILERS", unique_name)

    def ready(a):
        return any(b.key == "fraud-tx-verify" and not b.disabled for b in a.button)

    first = app()
    run_until(first, ready, page="views/review.py")
    order = [b.key for b in first.button if b.key.startswith("fraud-")]
    assert order == ["fraud-tx-hold", "fraud-tx-verify"]  # oldest first, no allow
    first.button(key="fraud-tx-hold").click().run()
    assert "tx-hold labelled fraud" in texts(first)
    assert [b.key for b in first.button if b.key.startswith("fraud-")] == ["fraud-tx-verify"]

    second = app()  # another analyst's session on the same process
    run_until(second, ready, page="views/review.py")
    assert "fraud-tx-hold" not in [b.key for b in second.button]
    second.button(key="legit-tx-verify").click().run()

    labels = labels_on(kafka_bootstrap, unique_name)
    assert sorted((key, lb.tx_id, lb.is_fraud, lb.source) for key, lb in labels) == [
        (b"cust-7", "tx-hold", True, "analyst"), (b"cust-8", "tx-verify", False, "analyst")]


def test_analyst_session_cannot_change_config_and_is_told_why(ui_env, kafka_bootstrap):
    ui_env.setenv("QSFRAUD_BOOTSTRAP", kafka_bootstrap)
    at = run_until(app(), lambda a: "Read only" in texts(a), page="views/admin.py")
    assert "analyst session" in texts(at) and "QSFRAUD_ADMIN_KEYS" in texts(at)
    submit = [b for b in at.button if b.label == "Validate, sign and publish"]
    assert submit and submit[0].disabled
    assert all(w.disabled for w in at.number_input)


def test_admin_publishes_a_valid_config_and_sees_errors_next_to_the_field(
        ui_env, kafka_bootstrap, unique_name, tmp_path):
    keys = tmp_path / "admin"
    init_keystore(keys, "admin-ui", "admin")
    t = RetailerTopics(unique_name)
    produce_decisions(kafka_bootstrap, unique_name, [])  # creates the retailer's topics
    ui_env.setenv("QSFRAUD_BOOTSTRAP", kafka_bootstrap)
    ui_env.setenv("QSFRAUD_UI_RETAILERS", unique_name)
    ui_env.setenv("QSFRAUD_ADMIN_KEYS", str(keys))
    ui_env.setenv("QSFRAUD_CONFIG_TRUST", str(keys / "registry.json"))
    at = run_until(app(), lambda a: unique_name in a.selectbox(key="admin_scope").options,
                   page="views/admin.py")
    at.selectbox(key="admin_scope").set_value(unique_name).run()
    assert "Read only" not in texts(at)

    def field(label):
        return next(w for w in at.number_input if w.label == label)

    def submit():
        next(b for b in at.button if b.label == "Validate, sign and publish").click().run()

    field("Verify from").set_value(0.9)
    submit()
    assert [e.value for e in at.error] == ["thresholds: need verify <= hold <= block",
                                           "Not published: see the field marked above."]

    field("Verify from").set_value(0.3)
    next(w for w in at.text_area if w.label == "Devices").set_value("dev-evil\ndev-bad")
    submit()
    assert not at.error, [e.value for e in at.error]
    assert f"v1 scope={unique_name} thresholds=0.3/0.8/0.95" in texts(at)

    at = run_until(at, lambda a: "Version in effect: v1" in texts(a))
    history = at.dataframe[0].value
    mine = history[history["Scope"] == unique_name]
    assert list(mine["Outcome"]) == ["applied"] and list(mine["Signed by"]) == ["admin-ui"]
    assert t.decisions  # the retailer's topics came from the registry
    assert next(w for w in at.text_area if w.label == "Devices").value == "dev-bad\ndev-evil"


@pytest.mark.parametrize("page", PAGES)
def test_no_page_raises_with_data(ui_env, kafka_bootstrap, unique_name, page):
    produce_decisions(kafka_bootstrap, unique_name, [
        (decision(f"tx-{i}", unique_name, i / 10, ["allow", "verify", "hold", "block"][i % 4],
                  time.time() - i), f"c{i}", 10.0 * i) for i in range(10)])
    ui_env.setenv("QSFRAUD_BOOTSTRAP", kafka_bootstrap)
    ui_env.setenv("QSFRAUD_UI_RETAILERS", unique_name)
    at = run_until(app(), lambda a: "feed_ids" in a.session_state
                   and len(a.session_state["feed_ids"]) == 10)
    at.switch_page(page).run()
    assert not at.exception
    assert "Kafka is unreachable" not in texts(at)


def test_no_page_has_a_bare_string_that_streamlit_magic_would_print():
    # Streamlit writes any bare expression of a page script to the page, except the module
    # docstring: an attribute docstring there showed up as text on the review queue
    root = Path(__file__).resolve().parents[2] / "ui"
    for page in ("app.py", *PAGES):
        body = ast.parse((root / page).read_text()).body
        stray = [n.lineno for n in body[1:] if isinstance(n, ast.Expr)
                 and isinstance(n.value, ast.Constant) and isinstance(n.value.value, str)]
        assert stray == [], f"{page}: bare strings at lines {stray}"
