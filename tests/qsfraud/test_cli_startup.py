"""Every command's start-up stays light: the CLI's parser imports no model library."""

from __future__ import annotations

import subprocess
import sys

from fraud.evaluation import MODES
from qsfraud.commands.evaluate import MODE_NAMES


def test_building_the_parser_imports_no_model_library() -> None:
    # a CDC process is signalled a few seconds after its launch; River, scipy and numba
    # took ~2 s (5-6 s on a busy machine) when a command module imported them at the top
    code = ("import sys; from qsfraud.cli import build_parser; build_parser(); "
            "print(sorted({m.split('.')[0] for m in sys.modules} & "
            "{'river', 'scipy', 'numba', 'sklearn', 'pandas', 'faust'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_the_evaluate_command_names_the_modes_evaluation_runs() -> None:
    assert set(MODE_NAMES) == set(MODES)
