"""``qsfraud watch-key``: one consortium key, a sealed copy per retailer that only it opens."""

from __future__ import annotations

from pathlib import Path

import pytest

from fl.watchlist import open_watch_key
from pqc.errors import WrongRecipient
from pqc.freshness import InMemoryFreshness
from qsfraud.cli import main
from streams.fl_sync import WATCH_KEY_FILE, FlKeys, load_watch_key
from streams.settings import WorkerSettings
from tests.fl.conftest import make_federation


def test_each_retailer_gets_its_own_copy_of_one_key(tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]):
    fed = make_federation(tmp_path)
    r0, r1 = fed.retailers[0], fed.retailers[1]
    code = main(["watch-key", "--admin", str(fed.admin.path),
                 f"retailer-0={r0.path / WATCH_KEY_FILE}",
                 f"retailer-1={r1.path / WATCH_KEY_FILE}"])
    assert code == 0 and capsys.readouterr().out.count("consortium key sealed") == 2
    keys = []
    for store in (r0, r1):  # the worker finds it in its key store, no flag needed
        settings = WorkerSettings(retailer="r", bootstrap="", fl_identity=store.path,
                                  fl_aggregator=store.path, fl_trust=store.path / "registry.json")
        keys.append(load_watch_key(settings, FlKeys(store, fed.aggregator_kem, store.registry)))
    assert keys[0] is not None and keys[0] == keys[1]
    with pytest.raises(WrongRecipient):  # nor the aggregator nor another retailer opens a copy
        open_watch_key((r0.path / WATCH_KEY_FILE).read_bytes(), fed.aggregator.kem,
                       fed.aggregator.registry, InMemoryFreshness())


def test_an_untrusted_or_non_retailer_name_is_one_line(tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]):
    fed = make_federation(tmp_path)
    for name in ("retailer-x", "aggregator"):
        code = main(["watch-key", "--admin", str(fed.admin.path), f"{name}={tmp_path / 'k'}"])
        err = capsys.readouterr().err
        assert code == 2 and "does not trust it as a retailer" in err and err.count("\n") == 1
    assert not (tmp_path / "k").exists()
    code = main(["watch-key", "--admin", str(fed.retailers[0].path),
                 f"retailer-1={tmp_path / 'k'}"])
    assert code == 2 and "cannot load the admin key store" in capsys.readouterr().err
