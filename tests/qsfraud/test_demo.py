"""``qsfraud demo`` end to end: databases -> CDC -> Kafka -> workers -> decisions, then cleanup."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.integration
def test_demo_decides_for_both_retailers_and_leaves_nothing_running(tmp_path: Path):
    root = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "qsfraud", "demo", "--duration", "35", "--rate", "100",
         "--root", str(root)],
        capture_output=True, text=True, timeout=400,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    last = {}
    for line in result.stdout.splitlines():
        m = re.match(r"(acme|globex)\s+committed=(\d+) decided=(\d+)", line)
        if m:
            last[m.group(1)] = (int(m.group(2)), int(m.group(3)))
    assert set(last) == {"acme", "globex"}, result.stdout[-2000:]
    for retailer, (committed, decided) in last.items():
        assert committed > 500, (retailer, committed)
        # the workers keep up with 100 tx/s: what is left undecided at the end is what was
        # committed in its last moments (the CDC's transaction markers once made them fall
        # minutes behind, with a read of Kafka per batch)
        assert decided >= 0.8 * committed, (retailer, result.stdout[-2000:])
    assert "every process it started has exited" in result.stdout
    ps = subprocess.run(["ps", "-eo", "stat=,args="], capture_output=True, text=True).stdout
    assert [line for line in ps.splitlines()
            if str(root) in line and not line.startswith("Z")] == []
