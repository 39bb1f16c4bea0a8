"""The live meters page in a real browser: headless Chromium (Debian's `chromium` + `chromium-driver`) driven
by Selenium, offline. Loads `/ui`, makes requests through the proxy with the openai SDK, and waits for them to
appear; screenshots (light and dark) go to the test's tmp dir and to tests/out/."""

from __future__ import annotations

import base64
import os
import shutil
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from tests.conftest import Daemon, MockUpstream, route_config

CHROMIUM = os.environ.get("TOKENRELAY_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("TOKENRELAY_CHROMEDRIVER", "/usr/bin/chromedriver")
OUT = Path(__file__).parent / "out"
MESSAGES = [{"role": "user", "content": "Say something about foxes."}]

pytestmark = [
    pytest.mark.skipif(
        not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists()),
        reason=f"headless Chromium not installed ({CHROMIUM}, {CHROMEDRIVER}): "
        "apt-get install -y chromium chromium-driver",
    ),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install '.[test]')")


@pytest.fixture
def browser() -> Iterator[Any]:
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    os.environ["SE_OFFLINE"] = "true"  # Selenium Manager must never download a driver or a browser
    options = Options()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1440,1100",
        "--no-first-run",
        "--disable-extensions",
        "--disable-background-networking",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        yield driver
    finally:
        driver.quit()


def wait_for(condition: Callable[[], Any], timeout: float = 8.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or condition}")
        time.sleep(0.1)


def screenshot(driver: Any, tmp_path: Path, name: str) -> Path:
    path = tmp_path / name
    # The whole page at a laptop's width, not only the window.
    height = int(driver.execute_script("return document.documentElement.scrollHeight"))
    metrics = {"width": 1440, "height": height, "deviceScaleFactor": 1, "mobile": False}
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride", metrics)
    time.sleep(0.3)  # one redraw at the new size
    shot = driver.execute_cdp_cmd("Page.captureScreenshot", {"format": "png"})
    driver.execute_cdp_cmd("Emulation.clearDeviceMetricsOverride", {})
    path.write_bytes(base64.b64decode(shot["data"]))
    OUT.mkdir(exist_ok=True)
    shutil.copy(path, OUT / name)
    return path


def test_page_shows_requests_made_through_the_proxy(
    browser: Any, mock_upstream: MockUpstream, daemon_factory: Callable[..., Daemon], tmp_path: Path
) -> None:
    from selenium.webdriver.common.by import By

    d = daemon_factory(route_config("fast", mock_upstream, deployment_extra="price = { input = 2.5, output = 10.0 }"))
    browser.get(f"{d.url}/ui")
    text = lambda element_id: browser.find_element(By.ID, element_id).text  # noqa: E731
    wait_for(lambda: text("conn") == "live", what="the event stream to connect")
    load_ms = browser.execute_script(
        "const t = performance.getEntriesByType('navigation')[0]; return t.domContentLoadedEventEnd - t.startTime"
    )
    assert load_ms < 1000
    # Nobody has used the proxy yet: the page says how to point an agent at it.
    empty = browser.find_element(By.ID, "empty")
    assert empty.is_displayed()
    assert f'base_url="{d.url}/v1"' in text("snippet") and 'model="fast"' in text("snippet")
    assert text("k-req") == "0"
    screenshot(browser, tmp_path, "ui-empty.png")

    c = openai.OpenAI(base_url=d.base_url, api_key="agent-key-1", max_retries=0)
    c.chat.completions.create(model="fast", messages=MESSAGES)  # type: ignore[arg-type]
    run = openai.OpenAI(base_url=f"{d.url}/run/nightly-42/v1", api_key="agent-key-2", max_retries=0)
    for _ in range(3):
        list(run.chat.completions.create(model="fast", messages=MESSAGES, stream=True))  # type: ignore[arg-type]
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="nope", messages=MESSAGES)  # type: ignore[arg-type]

    # Within a couple of seconds the counters and the last-requests table show them, with no reload.
    wait_for(lambda: text("k-req") == "5", what="the request counter to reach 5")
    wait_for(lambda: text("k-out") != "0", what="a tokens/s figure")  # the mean over the last 5 s
    rows = wait_for(
        lambda: [r.text for r in browser.find_elements(By.CSS_SELECTOR, "#t-recent tbody tr[data-seq]")],
        what="rows in the last-requests table",
    )
    assert len(rows) == 5
    assert rows[0].startswith(rows[0].split()[0]) and "nope" in rows[0] and "404" in rows[0]
    assert "fast → d0" in rows[-1] and "200" in rows[-1] and "nightly-42" in rows[1]
    assert not empty.is_displayed()
    routes = browser.find_element(By.ID, "t-routes").text
    assert "fast" in routes and "d0" in routes and "healthy" in routes
    # Today's cost (read from the ledger every few seconds) reaches the page and its chart.
    wait_for(lambda: text("k-cost").startswith("$") and text("k-cost") != "$0", 10, "today's cost")
    wait_for(lambda: "nightly-42" in browser.find_element(By.ID, "t-runs").text, 10, "the run in the cost table")
    assert "fast" in browser.find_element(By.ID, "c-cost").text
    errors = [e for e in browser.get_log("browser") if e["level"] == "SEVERE"]
    assert errors == [], errors  # no script error, no CSP violation, nothing fetched from elsewhere

    screenshot(browser, tmp_path, "ui.png")
    browser.execute_cdp_cmd(
        "Emulation.setEmulatedMedia", {"features": [{"name": "prefers-color-scheme", "value": "dark"}]}
    )
    background = browser.execute_script("return getComputedStyle(document.body).backgroundColor")
    assert background == "rgb(17, 19, 22)"  # the dark palette
    screenshot(browser, tmp_path, "ui-dark.png")
