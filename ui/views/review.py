"""Review queue: hold and verify decisions, oldest first; an analyst's verdict becomes a label."""

from __future__ import annotations

import time

import streamlit as st

from ui import runtime
from ui.format import ACTION_BADGES, clock, millis, money, reasons_in_words
from ui.store import DecisionRow
from ui.widgets import kafka_banner, retailer_filter

SHOWN = 20
# How long the outcome of the last verdict stays on screen (the queue refreshes meanwhile).
# A comment, not a docstring: Streamlit's magic would print a bare string on the page.
NOTE_S = 10.0

rt = runtime.current()
st.title("Review queue")
st.caption("Transactions held for review or sent to step-up verification, oldest first. "
           "A verdict is published once, as a label the retailer's model learns from.")
retailers = retailer_filter(rt, "review_retailers")


def verdict(row: DecisionRow, is_fraud: bool) -> None:
    d = row.decision
    if rt.publisher is None:
        st.session_state["review_note"] = ("error", "No Kafka configured: nothing was sent.",
                                           time.monotonic())
        return
    try:
        state = rt.publisher.publish(d.retailer_id, d.tx_id, row.key, is_fraud)
    except Exception as exc:  # BufferError, KafkaException: say so, keep the row
        rt.store.settle_verdict(d.tx_id, str(exc))
        st.session_state["review_note"] = ("error", f"Could not send the verdict: {exc}",
                                           time.monotonic())
        return
    word = "fraud" if is_fraud else "legitimate"
    notes = {
        "sent": ("success", f"{d.tx_id} labelled {word}."),
        "sending": ("warning", f"{d.tx_id} labelled {word}; Kafka has not confirmed yet, "
                               "it will be sent when Kafka answers."),
        "already": ("info", f"{d.tx_id} already has a verdict: nothing sent."),
        "failed": ("error", f"Kafka refused the verdict for {d.tx_id}; it is back in the queue."),
    }
    st.session_state["review_note"] = (*notes[state], time.monotonic())


@st.fragment(run_every=rt.settings.refresh_s * 2)
def queue() -> None:
    reachable = kafka_banner(rt)
    if rt.publisher is not None:
        rt.publisher.poll()  # settle verdicts Kafka confirmed late
    note = st.session_state.get("review_note")
    if note is not None and time.monotonic() - note[2] < NOTE_S:
        getattr(st, note[0])(note[1])
    loaded = rt.store.status.labels_loaded
    if reachable and not loaded:
        st.info("Reading past verdicts from Kafka before accepting new ones ...",
                icon=":material/hourglass_top:")
    rows = rt.store.review_queue(retailers)
    if not rows:
        if reachable:
            st.success("The queue is empty: nothing waits for review.",
                       icon=":material/check_circle:")
        else:
            st.info("Nothing to review in what was read from Kafka.", icon=":material/inbox:")
        return
    st.markdown(f"**{len(rows):,} waiting** · showing the oldest {min(len(rows), SHOWN)}")
    amounts = rt.store.amounts(r.decision.tx_id for r in rows[:SHOWN])
    for row in rows[:SHOWN]:
        d = row.decision
        with st.container(border=True):
            info, buttons = st.columns([5, 2])
            amount = money(*amounts[d.tx_id]) if d.tx_id in amounts else "-"
            badge = ACTION_BADGES[d.action]
            info.markdown(f"{badge} · {d.retailer_id} · **{amount}** · score "
                          f"**{d.score:.2f}** · {clock(row.decided_at)} · "
                          f"latency {millis(row.latency_s)}  \n`{d.tx_id}` · customer "
                          f"`{row.key or '-'}`")
            info.caption(reasons_in_words(d.reasons, limit=4))
            disabled = not (reachable and loaded)
            buttons.button("Confirm fraud", key=f"fraud-{d.tx_id}", type="primary",
                           disabled=disabled, on_click=verdict, args=(row, True),
                           width="stretch")
            buttons.button("Legitimate", key=f"legit-{d.tx_id}", disabled=disabled,
                           on_click=verdict, args=(row, False), width="stretch")


queue()
