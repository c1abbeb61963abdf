"""Charts: decisions, scores, labels, model quality, latency, workers and federated rounds."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime

import altair as alt
import pandas as pd
import streamlit as st

from fraud import topics
from fraud.schema import ACTIONS
from ui import charts, runtime
from ui.format import millis, percent
from ui.widgets import kafka_banner, retailer_filter

ACTION_COLORS = alt.Scale(domain=list(ACTIONS),
                          range=["#2e7d32", "#f9a825", "#ef6c00", "#c62828"])
HEIGHT = 240

rt = runtime.current()
st.title("Charts")
retailers = retailer_filter(rt, "charts_retailers")


def empty(text: str) -> None:
    st.info(text, icon=":material/inbox:")


def panel(title: str, data: pd.DataFrame, when_empty: str,
          chart: Callable[[pd.DataFrame], alt.Chart]) -> bool:
    """A titled chart of ``data``, or ``when_empty`` in its place; whether it was drawn."""
    st.subheader(title)
    if data.empty:
        empty(when_empty)
        return False
    st.altair_chart(chart(data).properties(height=HEIGHT), width="stretch")
    return True


def time_axis() -> alt.X:
    return alt.X("time:T", title=None, axis=alt.Axis(format="%H:%M:%S"))


@st.fragment(run_every=rt.settings.refresh_s * 3)
def all_charts() -> None:
    kafka_banner(rt)
    rows = rt.store.feed(retailers)
    labels = [lb for lb in rt.store.labels() if not retailers or lb.retailer_id in retailers]

    top = st.columns(4)
    top[0].metric("Decisions in memory", f"{len(rows):,}")
    flagged = sum(r.decision.action in charts.FLAGGED for r in rows)
    top[1].metric("Flagged", percent(flagged / len(rows)) if rows else "-")
    top[2].metric("Fraud rate (labels)",
                  percent(sum(lb.is_fraud for lb in labels) / len(labels)) if labels else "-")
    lat = sorted(r.latency_s for r in rows if r.latency_s is not None)
    top[3].metric("p95 latency", millis(lat[int(0.95 * (len(lat) - 1))]) if lat else "-")

    a, b = st.columns(2)
    with a:
        panel("Decisions per action", charts.decisions_over_time(rows), "No decisions yet.",
              lambda data: alt.Chart(data).mark_bar().encode(
                  time_axis(), alt.Y("decisions:Q", title="decisions", stack=True),
                  alt.Color("action:N", scale=ACTION_COLORS, title="Action"),
                  tooltip=["time:T", "action:N", "decisions:Q"]))
    with b:
        scores = pd.DataFrame({"score": [r.decision.score for r in rows],
                               "action": [r.decision.action for r in rows]})
        panel("Score distribution", scores, "No decisions yet.",
              lambda data: alt.Chart(data).mark_bar().encode(
                  alt.X("score:Q", bin=alt.Bin(maxbins=40, extent=[0, 1]), title="score"),
                  alt.Y("count():Q", title="decisions", stack=True),
                  alt.Color("action:N", scale=ACTION_COLORS, title="Action")))

    c, d = st.columns(2)
    with c:
        panel("Fraud rate from labels", charts.fraud_rate(labels),
              "No labels yet: chargebacks and analyst verdicts appear here.",
              lambda data: alt.Chart(data).mark_line(point=True).encode(
                  time_axis(), alt.Y("rate:Q", title="fraud rate", axis=alt.Axis(format="%")),
                  tooltip=["time:T", alt.Tooltip("rate:Q", format=".1%"), "labels:Q"]))
    with d:
        if panel("Rolling precision and recall", charts.rolling_precision_recall(rows, labels),
                 "Appears once labels arrive for decided transactions.",
                 lambda data: alt.Chart(
                     data.melt("time", var_name="metric", value_name="value").dropna()
                 ).mark_line().encode(
                     time_axis(), alt.Y("value:Q", title=None, scale=alt.Scale(domain=[0, 1]),
                                        axis=alt.Axis(format="%")),
                     alt.Color("metric:N", title=None),
                     tooltip=["time:T", "metric:N", alt.Tooltip("value:Q", format=".1%")])):
            st.caption("Flagged = verify, hold or block; over the last 200 labelled decisions.")

    e, f = st.columns(2)
    with e:
        panel("Commit → decision latency", charts.latency_percentiles(rows), "No latencies yet.",
              lambda data: alt.Chart(data).mark_line().encode(
                  time_axis(), alt.Y("ms:Q", title="ms"),
                  alt.Color("percentile:N", title=None),
                  tooltip=["time:T", "percentile:N", alt.Tooltip("ms:Q", format=",.1f")]))
    with f:
        st.subheader("Workers: lag and throughput")
        history = rt.metrics.history()
        if not rt.settings.metrics_urls:
            empty("No worker /metrics configured (start the UI with --metrics HOST:PORT).")
        elif not history:
            errors = [s.error for s in rt.metrics.latest() if s.error]
            empty("No worker answered yet" + (f": {errors[0]}" if errors else "."))
        else:
            frame = pd.DataFrame({
                "time": [datetime.fromtimestamp(s.at, UTC) for s in history],
                "worker": [f"{s.retailer} ({s.url.split('//')[-1].split('/')[0]})"
                           for s in history],
                "lag": [s.lag for s in history],
                "throughput": [s.throughput for s in history]})
            several = frame["worker"].nunique() > 1
            for measure, title in (("lag", "lag (records)"), ("throughput", "tx/s")):
                st.altair_chart(alt.Chart(frame).mark_line().encode(
                    time_axis(), alt.Y(f"{measure}:Q", title=title,
                                       scale=alt.Scale(domainMin=0, nice=True)),
                    alt.Color("worker:N", title=None,
                              legend=alt.Legend(orient="top") if several else None),
                    tooltip=["time:T", "worker:N", alt.Tooltip(f"{measure}:Q", format=",.1f")],
                ).properties(height=150), width="stretch")
            if not several:
                st.caption(f"Worker: {frame['worker'].iloc[-1]}")

    frame = charts.federated_rounds(rt.store.records(topics.FL_GLOBAL))
    if panel("Federated learning rounds", frame,
             f"No federated rounds yet: global models published on {topics.FL_GLOBAL} appear "
             "here.",
             lambda data: alt.Chart(data).mark_bar().encode(
                 time_axis(), alt.Y("contributors:Q", title="contributors"),
                 tooltip=["time:T", "round:Q", "contributors:Q", "version:N", "strategy:N"])):
        last = frame.iloc[-1]
        st.caption(f"Round {last['round']:,} · global version {last['version']} · "
                   f"{last['contributors']} contributors · {last['strategy']}")


all_charts()
