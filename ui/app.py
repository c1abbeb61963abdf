"""The qsfraud Streamlit app: ``qsfraud ui`` runs ``streamlit run ui/app.py``.

Four pages (ui/views): the live feed and the review queue for analysts, charts for everyone,
and the config panel for admins. Kafka is read by one background thread per process
(:mod:`ui.runtime`); pages only read its store.
"""

from __future__ import annotations

import streamlit as st

from ui import runtime

st.set_page_config(page_title="qsfraud", page_icon=":material/shield:", layout="wide")
rt = runtime.current()

pages = [
    st.Page("views/feed.py", title="Live feed", icon=":material/stream:", default=True),
    st.Page("views/review.py", title="Review queue", icon=":material/fact_check:"),
    st.Page("views/charts.py", title="Charts", icon=":material/monitoring:"),
    st.Page("views/admin.py", title="Admin", icon=":material/admin_panel_settings:"),
]
with st.sidebar:
    st.markdown("### qsfraud")
    st.caption("Real-time fraud decisions")
page = st.navigation(pages)
with st.sidebar:
    st.caption(f"Kafka: {rt.settings.bootstrap or 'not configured'}")
page.run()
