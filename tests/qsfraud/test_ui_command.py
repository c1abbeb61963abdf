"""``qsfraud ui``: its options reach the app's environment, and it serves the app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.request

from qsfraud.cli import build_parser
from qsfraud.commands.ui import environment, streamlit_command
from qsfraud.stack.service import free_port
from ui.runtime import UiSettings


def test_options_become_the_streamlit_command_and_environment(monkeypatch):
    monkeypatch.delenv("QSFRAUD_ADMIN_KEYS", raising=False)
    args = build_parser().parse_args([
        "ui", "--port", "9999", "--bootstrap", "k:9092", "--metrics", "w1:6066",
        "--metrics", "http://w2:7000/metrics", "--retailers", "acme,globex",
        "--admin-keys", "/keys/admin"])
    command = streamlit_command(args)
    assert command[1:4] == ["-m", "streamlit", "run"] and command[4].endswith("ui/app.py")
    assert command[command.index("--server.port") + 1] == "9999"
    assert command[command.index("--server.address") + 1] == "127.0.0.1"
    # no full garbage collection after each of the live pages' reruns (every second)
    assert command[command.index("--runner.postScriptGC") + 1] == "false"
    env = environment(args)
    settings = UiSettings.from_env(env)
    assert settings.bootstrap == "k:9092"
    assert settings.metrics_urls == ("http://w1:6066/metrics", "http://w2:7000/metrics")
    assert settings.retailers == ("acme", "globex")
    assert settings.admin_keys == "/keys/admin"


def test_without_an_admin_key_the_settings_have_none(monkeypatch):
    monkeypatch.delenv("QSFRAUD_ADMIN_KEYS", raising=False)
    args = build_parser().parse_args(["ui", "--bootstrap", "k:1"])
    assert args.port == 8501
    assert UiSettings.from_env(environment(args)).admin_keys is None


def test_qsfraud_ui_serves_the_app_and_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "qsfraud", "ui", "--port", str(port),
                             "--bootstrap", f"127.0.0.1:{free_port()}"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health",
                                            timeout=2) as r:
                    assert r.read() == b"ok"
                    break
            except OSError:
                assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
                assert time.monotonic() < deadline, "the UI did not answer in 60 s"
                time.sleep(0.5)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
            assert b"<html" in r.read().lower()
        proc.send_signal(signal.SIGTERM)  # exec'd: streamlit itself gets it
        assert proc.wait(30) is not None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
