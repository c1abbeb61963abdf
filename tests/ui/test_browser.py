"""The app in headless Chromium against a real worker and real Kafka: a decision reaches the
feed, *Confirm fraud* becomes a label the worker learns, an admin change reaches the worker.

Needs Debian's ``chromium`` and ``chromium-driver`` (``make`` installs them); skips without.
Screenshots of the four pages go to ``.qsfraud/artifacts/ui/`` (1280x800).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from fraud.topics import CONFIG, RetailerTopics
from pqc.keys import KeyStore, init_keystore
from qsfraud.stack.service import free_port
from qsfraud.worker_process import WorkerProcess
from streams.config_stream import ConfigDocument, sign_config
from streams.topics import TopicSpec, ensure_topics
from tests.streams.conftest import collect
from tests.ui.test_pages import labels_on

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / ".qsfraud" / "artifacts" / "ui"
CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
WIDTH, HEIGHT = 1280, 800
HOLD_RULE = {"name": "big-ticket", "field": "amount", "op": ">", "value": 300, "action": "hold"}


@pytest.fixture
def driver() -> Iterator[Any]:
    """Headless Chromium through Debian's chromedriver (selenium-manager never downloads)."""
    missing = [str(p) for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    if missing:
        pytest.skip(f"no browser: {', '.join(missing)} missing (make installs Debian's "
                    "chromium and chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                f"--window-size={WIDTH},{HEIGHT}"):
        options.add_argument(arg)
    d = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)
    try:
        # the viewport itself is 1280x800, whatever the window decorations take
        d.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", {
            "width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False})
        yield d
    finally:
        d.quit()


@pytest.fixture
def admin(tmp_path: Path) -> KeyStore:
    return init_keystore(tmp_path / "admin-keys", "admin-1", "admin")


@pytest.fixture
def worker(kafka_bootstrap: str, unique_name: str, admin: KeyStore,
           tmp_path: Path) -> Iterator[WorkerProcess]:
    """A worker trusting ``admin``, on the shared config topic, after config v1 (a rule that
    holds big tickets, so the review queue gets something)."""
    t = RetailerTopics(unique_name)
    ensure_topics(kafka_bootstrap, [TopicSpec(t.transactions, 2, {}),
                                    TopicSpec(t.decisions, 2, {}), TopicSpec(t.labels, 2, {})])
    doc = ConfigDocument.default().updated(
        {"thresholds.verify": 0.5, "thresholds.hold": 0.8, "thresholds.block": 0.95,
         "rules": [HOLD_RULE]}, version=1, scope="*")
    publish(kafka_bootstrap, CONFIG, b"*", sign_config(doc, admin.identity))
    w = WorkerProcess(kafka_bootstrap, unique_name, tmp_path, "--checkpoint-interval", "1",
                      "--trust", str(admin.path / "registry.json"))
    try:
        w.start()
        wait_for(lambda: config_version(w) == 1, 30, lambda: w.log_tail())
        yield w
    finally:
        w.stop()


@pytest.fixture
def ui_url(kafka_bootstrap: str, unique_name: str, admin: KeyStore, worker: WorkerProcess,
           tmp_path: Path) -> Iterator[str]:
    """``qsfraud ui`` as a child process (admin key, the worker's metrics); always stopped."""
    port = free_port()
    log = (tmp_path / "ui.log").open("wb")
    env = {**os.environ, "QSFRAUD_HOME": str(tmp_path / "home")}
    env.pop("QSFRAUD_CONFIG_TRUST", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "qsfraud", "ui", "--port", str(port), "--bootstrap",
         kafka_bootstrap, "--retailers", unique_name, "--metrics", f"127.0.0.1:{worker.port}",
         "--admin-keys", str(admin.path)],
        cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, (tmp_path / "ui.log").read_text()
        try:
            with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                return bool(r.read() == b"ok")
        except OSError:
            return False

    try:
        wait_for(healthy, 60)
        yield url
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        log.close()


def publish(bootstrap: str, topic: str, key: bytes, value: bytes) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "partitioner": "murmur2_random"})
    p.produce(topic, key=key, value=value)
    assert p.flush(30) == 0


def wait_for(check: Callable[[], object], timeout: float,
             why: Callable[[], str] = lambda: "") -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out after {timeout} s {why()}"
        time.sleep(0.2)


def metric(w: WorkerProcess, name: str, **labels: str) -> float | None:
    """The value of ``name`` (with at least these labels) on the worker's /metrics."""
    try:
        text = w.metrics()
    except OSError:
        return None
    for line in text.splitlines():
        m = re.match(rf"{name}(?:\{{(.*)\}})?\s+(\S+)$", line)
        if m and all(f'{k}="{v}"' in (m.group(1) or "") for k, v in labels.items()):
            return float(m.group(2))
    return None


def config_version(w: WorkerProcess) -> int | None:
    value = metric(w, "qsfraud_config_version")
    return None if value is None else int(value)


def tx(tx_id: str, retailer: str, amount: float) -> dict[str, Any]:
    return {"tx_id": tx_id, "retailer_id": retailer, "amount": amount,
            "customer_id": f"cust-{tx_id}", "payment_instrument": "pi-1", "device_id": "dev-1",
            "ip": "10.0.0.1", "occurred_at": time.time()}


def produce_transaction(bootstrap: str, retailer: str, t: dict[str, Any]) -> None:
    publish(bootstrap, RetailerTopics(retailer).transactions, t["customer_id"].encode(),
            json.dumps(t).encode())


def shows(text: str) -> Callable[[Any], bool]:
    return lambda d: text in d.find_element("tag name", "body").text


def button(d: Any, text: str) -> Any:
    """The first enabled button whose visible text is ``text``, scrolled into view."""
    for b in d.find_elements("xpath", f"//button[normalize-space(.)='{text}']"):
        if b.is_displayed() and b.is_enabled():
            d.execute_script("arguments[0].scrollIntoView({block: 'center'});", b)
            return b
    return None


def reloaded_shows(d: Any, url: str, text: str) -> bool:
    """Load ``url`` afresh; whether the page shows ``text`` once it has rendered."""
    from selenium.common.exceptions import TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(url)
    try:
        WebDriverWait(d, 5).until(shows(text))
    except TimeoutException:
        return False
    return True


def screenshot(d: Any, name: str) -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    time.sleep(0.5)  # let the last fragment run and the charts finish drawing
    path = ARTIFACTS / f"{name}.png"
    assert d.save_screenshot(str(path)), path
    return path


def png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[16:24]
    return int.from_bytes(head[:4], "big"), int.from_bytes(head[4:], "big")


def test_feed_verdict_and_config_change_in_a_real_browser(
    driver: Any, ui_url: str, worker: WorkerProcess, kafka_bootstrap: str, unique_name: str,
    tmp_path: Path,
) -> None:
    try:
        scenario(driver, ui_url, worker, kafka_bootstrap, unique_name)
    except Exception:  # what the browser, the app and the worker saw, then the failure
        print(f"page: {driver.current_url}\n{driver.find_element('tag name', 'body').text}")
        print(f"ui log:\n{(tmp_path / 'ui.log').read_text()[-4000:]}")
        print(f"worker log:\n{worker.log_tail()}")
        screenshot(driver, "failure")
        raise


def scenario(d: Any, ui_url: str, worker: WorkerProcess, kafka_bootstrap: str,
             retailer: str) -> None:
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    d.get(ui_url)
    WebDriverWait(d, 30).until(shows("No decisions yet"))

    # a small ticket is allowed, a big one held by the config's rule; each decision the
    # worker writes shows in the feed
    for i, (tx_id, amount) in enumerate((("small-1", 20.0), ("big-1", 950.0))):
        produce_transaction(kafka_bootstrap, retailer, tx(tx_id, retailer, amount))
        on_kafka = collect(kafka_bootstrap, RetailerTopics(retailer).decisions,
                           lambda ms, n=i + 1: len(ms) >= n, timeout=30)
        assert len(on_kafka) == i + 1, worker.log_tail()
        seen = time.monotonic()
        # each decision, the first too, shows within 5 s of being readable on Kafka
        WebDriverWait(d, 6, poll_frequency=0.1).until(shows(f"of {i + 1} decisions in memory"))
        print(f"decision {i + 1} in the feed {time.monotonic() - seen:.2f} s after Kafka")
        assert time.monotonic() - seen < 5.0
    screenshot(d, "feed")

    d.get(f"{ui_url}/review")
    WebDriverWait(d, 30).until(lambda d: button(d, "Confirm fraud"))
    assert "big-1" in d.find_element("tag name", "body").text
    assert "small-1" not in d.find_element("tag name", "body").text
    screenshot(d, "review")
    button(d, "Confirm fraud").click()
    WebDriverWait(d, 15).until(shows("big-1 labelled fraud."))
    wait_for(lambda: labels_on(kafka_bootstrap, retailer), 15)
    [(key, label)] = labels_on(kafka_bootstrap, retailer)
    assert (key, label.tx_id, label.is_fraud) == (b"cust-big-1", "big-1", True)
    wait_for(lambda: (metric(worker, "qsfraud_labels_total", outcome="learned") or 0) >= 1, 30,
             lambda: worker.metrics())
    WebDriverWait(d, 15).until(shows("The queue is empty"))

    d.get(f"{ui_url}/charts")
    WebDriverWait(d, 30).until(
        lambda d: d.find_elements("css selector", "[data-testid='stVegaLiteChart'] canvas, "
                                                  "[data-testid='stVegaLiteChart'] svg"))
    screenshot(d, "charts")

    d.get(f"{ui_url}/admin")
    WebDriverWait(d, 30).until(shows("v1"))
    hold = WebDriverWait(d, 15).until(
        lambda d: d.find_element("css selector", "input[aria-label='Hold from']"))
    assert hold.get_attribute("value") == "0.80"
    d.execute_script("arguments[0].scrollIntoView({block: 'center'});", hold)
    hold.send_keys(Keys.CONTROL, "a")
    hold.send_keys("0.75", Keys.TAB)
    publish_button = WebDriverWait(d, 15).until(
        lambda d: button(d, "Validate, sign and publish"))
    publish_button.click()
    WebDriverWait(d, 30).until(shows("Published v2"))
    wait_for(lambda: config_version(worker) == 2, 30, lambda: worker.log_tail())
    # the page as an admin sees it next: v2 in effect, and the worker saying it applied v2
    # (the UI scrapes /metrics in the background: reload until it has)
    wait_for(lambda: reloaded_shows(d, f"{ui_url}/admin", f"{retailer} v2"), 30)
    screenshot(d, "admin")

    for name in ("feed", "review", "charts", "admin"):
        assert png_size(ARTIFACTS / f"{name}.png") == (WIDTH, HEIGHT), name
