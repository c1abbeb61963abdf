"""Pieces every page shows: the Kafka status line and the retailer filter."""

from __future__ import annotations

import time

import streamlit as st

from ui.runtime import Runtime


def kafka_banner(rt: Runtime) -> bool:
    """Say plainly whether Kafka is reachable; True when it is."""
    if rt.settings.bootstrap is None:
        st.error(f"No Kafka configured: {rt.settings.bootstrap_error}", icon=":material/cloud_off:")
        return False
    status = rt.store.status
    if status.reachable is None:
        st.info(f"Connecting to Kafka at {rt.settings.bootstrap} ...",
                icon=":material/hourglass_top:")
        return False
    if not status.reachable:
        down = max(0, int(time.time() - status.since))
        st.error(f"Kafka is unreachable at {rt.settings.bootstrap} (for {down} s). What you "
                 "see is the last data read; the app reconnects by itself when Kafka is back."
                 + (f"  \nDetail: {status.error}" if status.error else ""),
                 icon=":material/cloud_off:")
        return False
    return True


def retailer_filter(rt: Runtime, key: str) -> list[str]:
    known = list(rt.store.status.retailers)
    return st.multiselect("Retailer", known, key=key, placeholder="All retailers")
