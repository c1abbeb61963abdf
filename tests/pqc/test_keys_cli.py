"""`qsfraud keys init | show | trust | rotate` end to end, through the real CLI entry point."""

from __future__ import annotations

import json
import os

from pqc import envelope
from pqc.freshness import InMemoryFreshness
from pqc.keys import load_keystore
from qsfraud.cli import main


def test_keys_cli_flow(tmp_path, capsys):
    agg, ret = str(tmp_path / "agg"), str(tmp_path / "ret")
    assert main(["keys", "init", "--dir", agg, "--name", "aggregator", "--role", "aggregator"]) == 0
    assert main(["keys", "init", "--dir", ret, "--name", "retailer-1", "--role", "retailer"]) == 0
    for store, other in ((agg, ret), (ret, agg)):
        bundle = str(tmp_path / f"{os.path.basename(other)}.json")
        assert main(["keys", "show", "--dir", other, "--export", bundle]) == 0
        assert main(["keys", "trust", "--dir", store, bundle]) == 0
    capsys.readouterr()

    retailer = load_keystore(ret)
    recipient = retailer.registry.current_kem_key("aggregator")
    old = envelope.seal(b"u", retailer.identity, recipient, "model-update", 1)

    assert main(["keys", "rotate", "--dir", agg, "--overlap-hours", "1"]) == 0
    out = capsys.readouterr().out
    assert "expires" in out
    rotated = load_keystore(agg)
    payload, _ = envelope.open(old, rotated.kem, rotated.registry, freshness=InMemoryFreshness())
    assert payload == b"u"

    assert main(["keys", "show", "--dir", agg]) == 0
    out = capsys.readouterr().out
    assert rotated.kem.current.key_id.hex() in out
    for key in (*rotated.kem.keys, *rotated.identity.keys):
        assert key.private.seed.hex() not in out

    assert main(["keys", "show", "--dir", agg, "--export", "-"]) == 0
    bundle = json.loads(capsys.readouterr().out)
    assert all("seed" not in key for key in bundle["keys"])


def test_keys_cli_user_errors(tmp_path, capsys):
    d = str(tmp_path / "k")
    assert main(["keys", "show", "--dir", d]) == 2
    assert "keys init" in capsys.readouterr().err
    assert main(["keys", "init", "--dir", d, "--name", "a b", "--role", "admin"]) == 2
    assert main(["keys", "init", "--dir", d, "--name", "admin-1", "--role", "admin"]) == 0
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["keys", "trust", "--dir", d, str(bad)]) == 2
    assert main(["keys", "trust", "--dir", d, str(tmp_path / "missing.json")]) == 2
    assert main(["keys", "rotate", "--dir", d, "--overlap-hours", "-1"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.count("qsfraud keys:") == 4
