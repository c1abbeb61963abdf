"""`qsfraud config set | show | history` against real Kafka, through the CLI entry point."""

from __future__ import annotations

import json

from pqc.keys import init_keystore
from qsfraud.cli import main


def test_set_show_history_round_trip(tmp_path, kafka_bootstrap, unique_name, capsys):
    keys = tmp_path / "admin"
    init_keystore(keys, "admin-1", "admin")
    common = ["--bootstrap", kafka_bootstrap, "--topic", unique_name,
              "--trust", str(keys / "registry.json")]
    assert main(["config", "set", *common, "--keys", str(keys), "thresholds.verify=0.4"]) == 0
    assert main(["config", "set", *common, "--keys", str(keys), "fl.sync_interval_s=60"]) == 0
    assert "published v2" in capsys.readouterr().out

    assert main(["config", "show", *common, "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["version"] == 2
    assert shown["policy"]["thresholds"]["verify"] == 0.4
    assert shown["fl"]["sync_interval_s"] == 60.0

    assert main(["config", "history", *common]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["applied", "applied"]
