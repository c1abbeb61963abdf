"""``qsfraud worker`` refuses bad Debezium input options with one line, before it starts."""

from __future__ import annotations

from pathlib import Path

import pytest

from qsfraud.cli import main


@pytest.mark.parametrize(("content", "words"), [
    (None, "cannot read"),
    ('retailer = "acme"\n', "no [mapping] table"),
    ('[mapping.fields]\ntx_id = "id"\n', "mapping: no source for"),
])
def test_a_bad_mapping_file_is_one_line_and_no_worker(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], content: str | None, words: str
):
    path = tmp_path / "mapping.toml"
    if content is not None:
        path.write_text(content)
    code = main(["worker", "--retailer", "acme", "--bootstrap", "127.0.0.1:9",
                 "--datadir", str(tmp_path), "--input-format", "debezium",
                 "--mapping", str(path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("qsfraud worker: ") and words in err
    assert err.count("\n") == 1
