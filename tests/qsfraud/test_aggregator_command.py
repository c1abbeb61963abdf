"""``qsfraud aggregator`` refuses a key store it cannot use with one line, before Kafka."""

from __future__ import annotations

from pathlib import Path

import pytest

from pqc.keys import init_keystore
from qsfraud.cli import main


def test_a_missing_key_store_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    code = main(["aggregator", "--keys", str(tmp_path / "none"), "--bootstrap", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qsfraud aggregator: cannot load the key store")
    assert err.count("\n") == 1


def test_a_retailer_key_store_is_not_an_aggregator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    init_keystore(tmp_path / "acme", "acme", "retailer")
    code = main(["aggregator", "--keys", str(tmp_path / "acme"), "--bootstrap", "127.0.0.1:9"])
    err = capsys.readouterr().err
    assert code == 2 and "acme is a retailer, not an aggregator" in err


def test_an_unknown_strategy_is_refused_by_the_parser(capsys: pytest.CaptureFixture[str]):
    with pytest.raises(SystemExit):
        main(["aggregator", "--keys", "k", "--bootstrap", "b", "--strategy", "fedsgd"])
    assert "fedsgd" in capsys.readouterr().err
