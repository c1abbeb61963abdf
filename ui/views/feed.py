"""Live feed: the newest decisions first, refreshed in place every second."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fraud.schema import ACTIONS, parse_timestamp
from ui import runtime
from ui.format import (
    ACTION_BADGES,
    ACTION_COLORS,
    clock,
    feature_in_words,
    millis,
    money,
    reason_in_words,
    reasons_in_words,
    when,
)
from ui.store import DecisionRow
from ui.widgets import kafka_banner, retailer_filter

SHOWN = 200

rt = runtime.current()
st.title("Live feed")
left, middle, right, pause = st.columns([3, 3, 3, 1.4])
with left:
    retailers = retailer_filter(rt, "feed_retailers")
with middle:
    actions = st.multiselect("Action", ACTIONS, key="feed_actions", placeholder="All actions")
with right:
    low, high = st.slider("Score", 0.0, 1.0, (0.0, 1.0), step=0.01, key="feed_score")
with pause:
    paused = st.toggle("Pause", key="feed_paused", help="Stop refreshing to read the table")


def details(row: DecisionRow) -> None:
    d = row.decision
    tx = rt.store.transaction(d.tx_id)
    st.subheader(f"Transaction {d.tx_id}")
    st.markdown(f"{ACTION_BADGES[d.action]} · {d.retailer_id} · customer `{row.key or '-'}`")
    cols = st.columns(5)
    cols[0].metric("Action", d.action)
    cols[1].metric("Score", f"{d.score:.3f}")
    cols[2].metric("Amount", money(tx["amount"], tx.get("currency")) if tx else "-")
    cols[3].metric("Latency", millis(row.latency_s))
    cols[4].metric("Config", f"v{d.config_version}")
    why, what = st.columns(2)
    with why:
        st.markdown("**Why**")
        for reason in d.reasons or ("no reason recorded",):
            st.markdown(f"- {reason_in_words(reason)}")
        contributions = [(r.rsplit(" ", 1)[0], float(r.rsplit(" ", 1)[1])) for r in d.reasons
                         if r.count(" ") == 1 and r.rsplit(" ", 1)[1][:1] in "+-"]
        if contributions:
            st.markdown("**Top feature contributions**")
            st.dataframe(pd.DataFrame({
                "Feature": [feature_in_words(n) for n, _ in contributions],
                "Contribution": [c for _, c in contributions]}),
                hide_index=True, width="stretch")
    with what:
        st.markdown("**Transaction**")
        if tx is None:
            st.caption("The transaction record is no longer (or not yet) in memory.")
        else:
            shown = {
                "Customer": tx.get("customer_id"), "Card": tx.get("payment_instrument"),
                "Channel": tx.get("channel"), "Device": tx.get("device_id"),
                "IP": tx.get("ip"), "Items": tx.get("item_count"),
                "Coupon": tx.get("coupon_code"),
                "Address mismatch": "yes" if tx.get("address_mismatch") else "no",
                "Occurred": when(parse_timestamp(tx["occurred_at"])) if tx.get("occurred_at")
                else None,
            }
            st.dataframe(pd.DataFrame({"Field": list(shown), "Value": [
                "-" if v is None else str(v) for v in shown.values()]}),
                hide_index=True, width="stretch")
        st.caption(f"Model {d.model_version or '-'} · decided {when(row.decided_at)}")


@st.fragment(run_every=None if paused else rt.settings.refresh_s)
def live() -> None:
    kafka_banner(rt)
    rows = rt.store.feed(retailers, actions, low, high)
    total = len(rows)
    rows = rows[:SHOWN]
    previous: list[str] = st.session_state.get("feed_ids", [])
    picked = st.session_state.get("feed_table", {})
    chosen = tuple(getattr(getattr(picked, "selection", None), "rows", ()) or ())
    if chosen and chosen != st.session_state.get("feed_chosen") and chosen[0] < len(previous):
        st.session_state["feed_selected_tx"] = previous[chosen[0]]
    st.session_state["feed_chosen"] = chosen
    if not rows:
        st.info("No decisions yet. They appear here as soon as a worker writes one to "
                "`<retailer>.decisions`." if rt.store.status.reachable
                else "No decisions to show.", icon=":material/inbox:")
    # The table is drawn even while empty: the browser loads the grid's code with the page,
    # not when the first decision arrives (that took 3-7 s on a busy machine).
    amounts = rt.store.amounts(r.decision.tx_id for r in rows)
    table = pd.DataFrame({
        "Time": [clock(r.decided_at) for r in rows],
        "Retailer": [r.decision.retailer_id for r in rows],
        "Amount": [money(*amounts[r.decision.tx_id]) if r.decision.tx_id in amounts else "-"
                   for r in rows],
        "Score": [r.decision.score for r in rows],
        "Action": [r.decision.action for r in rows],
        "Latency": [millis(r.latency_s) for r in rows],
        "Top reasons": [reasons_in_words(r.decision.reasons) for r in rows],
    })
    styled = table.style.map(lambda a: f"color: {ACTION_COLORS[a]}; font-weight: 600",
                             subset=["Action"])
    if rows:
        st.caption(f"Showing the newest {len(rows):,} of {total:,} decisions in memory · "
                   "click a row for its details")
    st.session_state["feed_ids"] = [r.decision.tx_id for r in rows]
    st.dataframe(
        styled, key="feed_table", on_select="rerun", selection_mode="single-row",
        hide_index=True, width="stretch", height=420,
        column_config={
            "Score": st.column_config.ProgressColumn("Score", min_value=0.0, max_value=1.0,
                                                     format="%.2f"),
            "Time": st.column_config.TextColumn("Time", width="small"),
            # a retailer's id is its topic prefix: wide enough for a name, not truncated
            "Retailer": st.column_config.TextColumn("Retailer", width="medium"),
            "Action": st.column_config.TextColumn("Action", width="small"),
            "Latency": st.column_config.TextColumn("Latency", width="small"),
            "Top reasons": st.column_config.TextColumn("Top reasons", width="large"),
        })
    selected = st.session_state.get("feed_selected_tx")
    if selected:
        match = rt.store.decision(selected)
        if match is not None:
            details(match)


live()
