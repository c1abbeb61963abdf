"""A CPU-weighted stack sampler for every Python process of a run (demo, CDC, workers...).

Put this folder first on PYTHONPATH and set QSFRAUD_SAMPLE_DIR: each Python process then
samples its threads' stacks every 10 ms, weights each sample by the CPU time the thread used
since the previous one (/proc/self/task/TID/stat), and writes ``<argv-tag>-<pid>.json``
(stack -> CPU seconds) to that folder every 10 s. ``scripts/profile/top`` reads them.
Not for production: it costs about 1-2 % of a core per process.
"""

from __future__ import annotations

import json
import os
import re
import sys
import threading
import time
from collections import defaultdict
from types import FrameType

_DIR = os.environ.get("QSFRAUD_SAMPLE_DIR")
_TICK = os.sysconf("SC_CLK_TCK")


def _cpu(tid: int) -> float:
    try:
        with open(f"/proc/self/task/{tid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICK
    except (OSError, IndexError):
        return 0.0


def _tag() -> str:
    argv = " ".join(sys.argv)
    for pattern in (r"cdc-(\w+)\.toml", r"--retailer (\w+)", r"(secantus)", r"(aggregator)",
                    r"(demo)", r"(multiprocessing)", r"(bench)"):
        m = re.search(pattern, argv)
        if m:
            return m.group(1).replace("multiprocessing", "child")
    return "py"


def _sample(path: str) -> None:
    me = threading.get_ident()
    counts: defaultdict[str, float] = defaultdict(float)
    last: dict[int, float] = {}
    last_dump = time.monotonic()
    while True:
        time.sleep(0.01)
        natives = {t.ident: t.native_id for t in threading.enumerate()}
        for ident, frame in sys._current_frames().items():
            if ident == me:
                continue
            tid = natives.get(ident)
            if tid is None:
                continue
            cpu = _cpu(tid)
            used = cpu - last.get(tid, cpu)
            last[tid] = cpu
            if used <= 0:
                continue
            stack: list[str] = []
            f: FrameType | None = frame
            while f is not None and len(stack) < 12:
                code = f.f_code
                stack.append(f"{os.path.basename(code.co_filename)}:{code.co_name}:{f.f_lineno}")
                f = f.f_back
            counts[";".join(reversed(stack))] += used
        if time.monotonic() - last_dump >= 10:
            last_dump = time.monotonic()
            with open(path + ".tmp", "w") as out:
                json.dump(dict(counts), out)
            os.replace(path + ".tmp", path)


if _DIR:
    os.makedirs(_DIR, exist_ok=True)
    threading.Thread(target=_sample, args=(f"{_DIR}/{_tag()}-{os.getpid()}.json",),
                     daemon=True, name="qsfraud-sampler").start()
