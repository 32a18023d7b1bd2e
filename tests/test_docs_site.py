"""The documentation site is looked at, not only built: headless Chromium opens the built pages.

``make docs`` builds the site (strictly) into ``build/docs/html``; ``make test`` runs it before pytest.
Each page is opened in Debian's Chromium, driven through the DevTools protocol over a pipe (no
WebDriver, no websocket library, no browser download), once the page and its images have loaded:
it must have its title, the navigation, a table, and no image that failed to load (an ``<img>``
whose ``naturalWidth`` is 0). A screenshot of each page is saved under ``build/docs/screenshots``.

Skipped, with the reason, when the site was not built or Chromium is not installed (``.ci/run``
installs it); ``MODAVG_REQUIRE_BROWSER=1`` (set by ``.ci/run``) turns those skips into failures.
"""

import base64
import json
import os
import pathlib
import shutil
import subprocess
import tempfile
import time
from typing import Any, Dict, Iterator, Optional

import pytest

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
SITE = REPOSITORY_ROOT / "build" / "docs" / "html"
SCREENSHOTS = REPOSITORY_ROOT / "build" / "docs" / "screenshots"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
REQUIRED = os.environ.get("MODAVG_REQUIRE_BROWSER") == "1"

# Chromium as the probe of this machine runs it: no network of its own, a fresh profile each time.
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",  # root in CI
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-dev-shm-usage",
    "--hide-scrollbars",
    "--remote-debugging-pipe",  # the DevTools protocol on file descriptors 3 (to it) and 4 (from it)
]

# What a reader would see go wrong, measured in the rendered page.
PAGE_REPORT = """(() => {
  const images = [...document.images];
  return {
    title: document.title,
    heading: (document.querySelector("article h1, main h1, h1") || {}).textContent || "",
    navigation_links: document.querySelectorAll("nav a[href], .sidebar-tree a[href]").length,
    tables: document.querySelectorAll("article table, main table").length,
    images: images.length,
    broken_images: images.filter((image) => !image.complete || image.naturalWidth === 0).map((image) => image.src),
  };
})()"""


def skip_or_fail(reason: str) -> None:
    if REQUIRED:
        pytest.fail(reason)
    pytest.skip(reason)


class Browser:
    """One headless Chromium, spoken to in DevTools-protocol messages (JSON, each ended by a NUL byte)."""

    def __init__(self, executable: str) -> None:
        self.profile = tempfile.mkdtemp(prefix="modavg-chromium-")
        to_browser_read, self.to_browser = os.pipe()
        self.from_browser, from_browser_write = os.pipe()
        command = [executable, *CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", "--window-size=1280,900"]
        # bash (dash takes no descriptor above 9) moves our pipe ends to the two that Chromium reads and writes
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{to_browser_read} 4>&{from_browser_write}', *command],
            pass_fds=(to_browser_read, from_browser_write),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_browser_read)
        os.close(from_browser_write)
        self.buffer = b""
        self.next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self.call("Page.enable", session=True)
        self.call("Runtime.enable", session=True)
        self.call(
            "Emulation.setDeviceMetricsOverride",
            session=True,
            width=1280,
            height=900,
            deviceScaleFactor=1,
            mobile=False,
        )

    def send(self, method: str, session: bool, params: Dict[str, Any]) -> int:
        self.next_id += 1
        message = {"id": self.next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = self.session
        os.write(self.to_browser, json.dumps(message).encode() + b"\0")
        return self.next_id

    def receive(self, deadline: float) -> Dict[str, Any]:
        while b"\0" not in self.buffer:
            if time.monotonic() > deadline:
                raise TimeoutError("Chromium did not answer in time")
            chunk = os.read(self.from_browser, 1 << 16)
            if not chunk:
                raise RuntimeError(f"Chromium closed the DevTools pipe (exit status {self.process.poll()})")
            self.buffer += chunk
        message, self.buffer = self.buffer.split(b"\0", 1)
        return json.loads(message)

    def call(self, method: str, session: bool = False, timeout: float = 30.0, **params: Any) -> Dict[str, Any]:
        wanted = self.send(method, session, params)
        deadline = time.monotonic() + timeout
        while True:
            message = self.receive(deadline)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    def open(self, url: str, timeout: float = 30.0) -> None:
        """Load ``url`` and wait for its load event (images included, as the browser defines it)."""
        wanted = self.send("Page.navigate", True, {"url": url})
        deadline = time.monotonic() + timeout
        navigated = loaded = False
        while not (navigated and loaded):
            message = self.receive(deadline)
            if message.get("id") == wanted:
                if "errorText" in message.get("result", {}):
                    raise RuntimeError(f"{url}: {message['result']['errorText']}")
                navigated = True
            loaded = loaded or message.get("method") == "Page.loadEventFired"

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", session=True, expression=expression, returnByValue=True)
        if "exceptionDetails" in result:
            raise RuntimeError(result["exceptionDetails"])
        return result["result"]["value"]

    def screenshot(self, path: pathlib.Path, full_page: bool = False) -> None:
        params: Dict[str, Any] = {"format": "png", "captureBeyondViewport": full_page}
        data = self.call("Page.captureScreenshot", session=True, **params)["data"]
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            self.call("Browser.close", timeout=5)
        except (OSError, RuntimeError, TimeoutError):
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self.to_browser)
        os.close(self.from_browser)
        shutil.rmtree(self.profile, ignore_errors=True)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not (SITE / "index.html").is_file():
        skip_or_fail(f"the site is not built ({SITE}): run `make docs`")
    if CHROMIUM is None:
        skip_or_fail("Chromium is not installed: apt-get install chromium (.ci/run does)")
    opened = Browser(CHROMIUM)
    yield opened
    opened.close()


def look_at(browser: Browser, page: str, screenshot: Optional[str] = None) -> Dict[str, Any]:
    browser.open((SITE / page).as_uri())
    report = browser.evaluate(PAGE_REPORT)
    browser.screenshot(SCREENSHOTS / (screenshot or page.replace("/", "_").replace(".html", ".png")))
    return report


@pytest.mark.parametrize(
    "page, title, heading",
    [
        ("index.html", "modavg_plugin", "modavg_plugin"),
        ("configuration.html", "Configuration reference", "Configuration reference"),
        ("choosing-an-average.html", "Choosing an average", "Choosing an average"),
    ],
)
def test_page_renders_with_title_navigation_a_table_and_its_images(browser, page, title, heading):
    report = look_at(browser, page)
    assert report["title"].startswith(title), report
    assert report["heading"].strip().rstrip("#¶").strip() == heading, report
    assert report["navigation_links"] >= 10, report  # the sidebar lists every page
    assert report["tables"] >= 1, report
    assert report["broken_images"] == [], report
    assert (SCREENSHOTS / page.replace(".html", ".png")).stat().st_size > 10_000


def test_the_results_page_shows_its_three_figures(browser):
    report = look_at(browser, "choosing-an-average.html")
    assert report["images"] >= 3 and report["broken_images"] == [], report


def test_the_notebook_page_shows_its_figures_as_run_when_the_site_was_built(browser):
    report = look_at(browser, "walkthrough.html")
    assert report["images"] >= 2 and report["broken_images"] == [], report
    assert report["tables"] >= 1, report  # the scores table the notebook prints


def test_configuration_reference_lists_every_registered_name_and_argument(browser):
    import inspect

    from modavg_plugin import AveragingStrategy, AveragingTrigger, MovingAverage
    from modavg_plugin.callbacks import AveragingCallback
    from modavg_plugin.module import ModuleAveraging

    browser.open((SITE / "configuration.html").as_uri())
    # the first column of each argument table, by the heading of the section holding it
    tables = browser.evaluate(
        """[...document.querySelectorAll("article table.arguments")].map((table) => [
             table.closest("section").querySelector("h2, h3").textContent.replace(/[#¶]/g, "").trim(),
             [...table.querySelectorAll("tbody tr td:first-child")].map((cell) => cell.innerText.trim())])"""
    )
    arguments_by_heading = {heading: cells for heading, cells in tables}
    expected = {"ModuleAveraging": ModuleAveraging}
    for family in (MovingAverage, AveragingStrategy, AveragingTrigger, AveragingCallback):
        for name in family.list_available():
            default = " (default)" if name == family.default_implementation else ""
            expected[f'"{name}"{default}: {family.by_name(name).__name__}'] = family.by_name(name)
    for heading, cls in expected.items():
        parameters = inspect.signature(cls.__init__).parameters.values()
        listed = [("**" if p.kind is p.VAR_KEYWORD else "") + p.name for p in parameters if p.name != "self"]
        assert arguments_by_heading.get(heading) == listed, heading


def test_a_missing_image_is_reported(browser, tmp_path):
    """The check itself: an image that cannot load is named."""
    page = tmp_path / "broken.html"
    page.write_text('<title>t</title><nav><a href="#">x</a></nav><main><table></table><img src="nope.png"></main>')
    browser.open(page.as_uri())
    report = browser.evaluate(PAGE_REPORT)
    assert report["broken_images"] == [(tmp_path / "nope.png").as_uri()]
