"""Admin: the config in effect, a signed change, and what workers did with each version."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from fraud import topics
from fraud.decisions import LIST_KINDS
from fraud.schema import SchemaError
from streams.config_history import read_config_records, replay
from ui import admin, runtime
from ui.format import clock, when
from ui.kafka_reader import decode_json, publish_config
from ui.widgets import kafka_banner

LIST_LABELS = {"customers": "Customers", "instruments": "Cards (payment instruments)",
               "devices": "Devices", "ips": "IP addresses"}

rt = runtime.current()
st.title("Admin")
reachable = kafka_banner(rt)
keys, why_not = runtime.admin_store(rt.settings)
registry, registry_note = runtime.trust_registry(rt.settings, keys)
if keys is None:
    st.warning(f"Read only: {why_not}.", icon=":material/lock:")
if registry_note:
    st.caption(registry_note)

scopes = ["*", *rt.store.status.retailers]
scope = st.selectbox("Scope", scopes, key="admin_scope",
                     format_func=lambda s: "every retailer (*)" if s == "*" else s)
records = [(r.offset, r.key, r.value) for r in rt.store.records(topics.CONFIG)]
replayed = replay(records, scope, registry)
current = replayed.current

versions = {s.retailer or s.url: s.config_version for s in rt.metrics.latest() if not s.error}
cols = st.columns(3)
cols[0].metric("Version in effect", f"v{current.version}")
cols[1].metric("Signed by", current.issued_by or "built-in defaults")
cols[2].metric("Issued", f"{clock(current.issued_at)} UTC" if current.issued_at else "-",
               help=when(current.issued_at) if current.issued_at else None)
if versions:
    st.caption("Workers report: " + ", ".join(
        f"{w} v{v}" if v is not None else f"{w} (no version)" for w, v in versions.items()))

edit, history, rejected = st.tabs(["Edit", "History", "Rejected by workers"])

with edit:
    form0 = admin.ConfigForm.of(current)
    errors: dict[str, str] = st.session_state.get("admin_errors", {})
    locked = keys is None
    with st.form("admin_form", border=False):
        st.markdown("#### Score thresholds")
        t = st.columns(3)
        verify = t[0].number_input("Verify from", 0.0, 1.0, form0.verify, 0.01, format="%.2f",
                                   disabled=locked, key=f"th_verify_{current.version}")
        hold = t[1].number_input("Hold from", 0.0, 1.0, form0.hold, 0.01, format="%.2f",
                                 disabled=locked, key=f"th_hold_{current.version}")
        block_at = t[2].number_input("Block from", 0.0, 1.0, form0.block_at, 0.01,
                                     format="%.2f", disabled=locked,
                                     key=f"th_block_{current.version}")
        if "thresholds" in errors:
            st.error(errors["thresholds"], icon=":material/error:")

        lists: dict[str, dict[str, str]] = {"block": {}, "allow": {}}
        for which, title in (("block", "Block lists"), ("allow", "Allow lists")):
            st.markdown(f"#### {title} (one entry per line)")
            row = st.columns(len(LIST_KINDS))
            for i, kind in enumerate(LIST_KINDS):
                lists[which][kind] = row[i].text_area(
                    LIST_LABELS[kind], getattr(form0, which)[kind], height=90,
                    disabled=locked, key=f"{which}_{kind}_{current.version}")
            if which in errors:
                st.error(errors[which], icon=":material/error:")

        st.markdown("#### Model")
        presets = list(admin.MODEL_PRESETS)
        model = st.radio("Model", presets, index=presets.index(form0.model),
                         format_func=lambda k: admin.MODEL_PRESETS[k][0], disabled=locked,
                         key=f"model_{current.version}", label_visibility="collapsed")
        custom = st.text_area("Custom River spec (used only with the custom choice)",
                              form0.custom_spec, height=120, disabled=locked,
                              key=f"spec_{current.version}")
        top = st.number_input("Reasons given per decision", 0, 10, form0.top_reasons,
                              disabled=locked, key=f"top_{current.version}")
        if "model" in errors:
            st.error(errors["model"], icon=":material/error:")
        if "top_reasons" in errors:
            st.error(errors["top_reasons"], icon=":material/error:")

        st.markdown("#### Federated learning")
        sync = st.number_input("Sync interval (seconds)", value=form0.fl_sync_interval_s,
                               step=30.0, disabled=locked, key=f"fl_{current.version}")
        if "fl" in errors:
            st.error(errors["fl"], icon=":material/error:")
        if "general" in errors:
            st.error(errors["general"], icon=":material/error:")
        elif errors:  # the page may be scrolled here: say where the problem is
            st.error("Not published: see the field marked above.", icon=":material/error:")
        submitted = st.form_submit_button("Validate, sign and publish", type="primary",
                                          disabled=locked or not reachable)

    if submitted and keys is not None and rt.settings.bootstrap:
        form = admin.ConfigForm(verify, hold, block_at, lists["block"], lists["allow"], model,
                                custom, int(top), float(sync))
        with rt.publish_lock:
            try:
                fresh = replay(read_config_records(rt.settings.bootstrap, topics.CONFIG,
                                                   timeout=10), scope, registry)
                doc = admin.build(fresh.current, form, version=fresh.next_version, scope=scope,
                                  issued_by=keys.identity.name)
            except SchemaError as exc:
                st.session_state["admin_errors"] = {admin.field_of(exc): str(exc)}
                st.rerun()
            except Exception as exc:  # Kafka: timed out, unreachable
                st.session_state["admin_errors"] = {"general": f"Cannot read the config: {exc}"}
                st.rerun()
            blob, outcome = admin.sign_and_check(doc, keys, registry)
            if outcome.document is None:
                st.session_state["admin_errors"] = {
                    "general": f"A worker would reject this ({outcome.reason}): {outcome.error}"}
                st.rerun()
            try:
                publish_config(rt.settings.bootstrap, topics.CONFIG, scope, blob)
            except Exception as exc:
                st.session_state["admin_errors"] = {"general": f"Not published: {exc}"}
                st.rerun()
        st.session_state["admin_errors"] = {}
        st.session_state["admin_published"] = doc.summary()
        st.rerun()
    published = st.session_state.pop("admin_published", None)
    if published:
        st.success(f"Published {published}, signed by {keys.identity.name if keys else '?'}. "
                   "Workers apply it within seconds.", icon=":material/check_circle:")

with history:
    if not replayed.entries:
        st.info(f"No config published yet: workers use the built-in defaults "
                f"({topics.CONFIG} is empty).", icon=":material/inbox:")
    else:
        rows = []
        for e in reversed(replayed.entries):
            o = e.outcome
            shown = o.document
            rows.append({
                "Offset": e.offset, "Scope": e.key or "-",
                "Outcome": {"ignored": "other scope"}.get(o.status, o.status),
                "Version": f"v{o.version}" if o.version else "-",
                "Signed by": o.signer or "-",
                "Issued": when(shown.issued_at) if shown is not None and shown.issued_at else "-",
                "Why": f"{o.reason}: {o.error}" if o.status == "rejected" else "",
            })
        colours = {"applied": "#2e7d32", "rejected": "#c62828"}
        st.dataframe(pd.DataFrame(rows).style.map(
            lambda v: f"color: {colours.get(v, '#616161')}; font-weight: 600",
            subset=["Outcome"]), hide_index=True, width="stretch")
        st.caption(f"As a worker of scope {scope} sees {topics.CONFIG}; newest first.")

with rejected:
    reports = [decode_json(r.value) for r in rt.store.records(topics.CONFIG_REJECTED)]
    reports = [r for r in reports if isinstance(r, dict)]
    if not reports:
        st.info("No worker has rejected a config.", icon=":material/check_circle:")
    else:
        st.dataframe(pd.DataFrame([{
            "When": when(float(r.get("rejected_at") or 0)),
            "Worker": r.get("worker") or "-", "Retailer": r.get("retailer_id") or "-",
            "Version": f"v{r['version']}" if r.get("version") else "-",
            "Reason": r.get("reason") or "-", "Detail": r.get("error") or "",
        } for r in reversed(reports)]), hide_index=True, width="stretch")
