"""Reading the workers' /metrics: the parser against the workers' own renderer, and junk."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from streams.metrics import WorkerMetrics
from ui.worker_metrics import parse_prometheus, summarize

names = st.from_regex(r"[a-z_][a-z0-9_]{0,20}", fullmatch=True)
label_values = st.text(st.characters(blacklist_categories=("Cs", "Cc")), max_size=12)


@given(st.text(max_size=300))
def test_any_text_parses_without_raising(text):
    for name, labels, value in parse_prometheus(text):
        assert isinstance(name, str) and isinstance(labels, dict) and isinstance(value, float)


@given(st.lists(st.tuples(names, st.dictionaries(names, label_values, max_size=3),
                          st.floats(allow_nan=False, allow_infinity=False, width=32)),
                max_size=8))
def test_rendered_samples_read_back(samples):
    lines = []
    for name, labels, value in samples:
        inner = ",".join(f'{k}="{v.replace(chr(92), "/").replace(chr(34), chr(39))}"'
                         for k, v in labels.items())
        lines.append(f"{name}{{{inner}}} {value!r}" if inner else f"{name} {value!r}")
    parsed = parse_prometheus("\n".join(lines))
    assert [(n, v) for n, _, v in parsed] == [(n, float(v)) for n, _, v in samples]
    assert [set(lb) for _, lb, _ in parsed] == [set(lb) for _, lb, _ in samples]


def test_a_workers_own_page_summarizes():
    m = WorkerMetrics("acme")
    m.gauge("qsfraud_consumer_lag", 5, topic="acme.transactions", partition="0")
    m.gauge("qsfraud_consumer_lag", 2, topic="acme.transactions", partition="1")
    m.gauge("qsfraud_consumer_lag", 9, topic="acme.labels", partition="0")
    m.gauge("qsfraud_config_version", 3)
    m.processed(40, now=0.0)
    s = summarize(parse_prometheus(m.render()), "u", at=1.0)
    assert (s.retailer, s.lag, s.config_version) == ("acme", 7.0, 3)
