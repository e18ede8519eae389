"""End to end: ``attnctl ui`` in a subprocess on a free localhost port, driven in headless Chromium by
Playwright — generate, wait for the images, check they rendered, save screenshots.

Needs the ``e2e`` extra (``playwright``, the Python package; its own browser download is not used) and a
Chromium binary: Debian's ``chromium`` package (``make e2e-setup`` installs both) or ``$ATTNCTL_CHROMIUM``.
Skipped, with the reason, only where no browser is installed. Screenshots go to the test's temporary
folder and, when ``ATTNCTL_SCREENSHOTS`` names a folder (``ATTNCTL_SCREENSHOTS=docs/img``), there too,
with a short tour of the other screens for the documentation; ``ATTNCTL_E2E_STEPS`` sets the steps of the
run (default 4; the docs' screenshots use the toy model's 20).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("streamlit", reason="the UI needs the ui extra: pip install -e '.[ui]'")

BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage"]
SERVER_START_S = 120
TEST_BUDGET_S = 90
"""Page load, a 4-step generation and the checks, all together (the server's start has its own bound)."""
TOUR_S = 300
"""Bound of each wait of the documentation tour (only with ATTNCTL_SCREENSHOTS)."""


def find_chromium() -> str | None:
    for candidate in (os.environ.get("ATTNCTL_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser"), shutil.which("google-chrome"),
                      shutil.which("google-chrome-stable")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


CHROMIUM = find_chromium()
try:
    import playwright.sync_api  # noqa: F401

    PLAYWRIGHT = True
except ImportError:
    PLAYWRIGHT = False

pytestmark = [
    pytest.mark.skipif(not PLAYWRIGHT, reason="no browser driver: the Python package playwright is not installed "
                                              "(make e2e-setup, or pip install -e '.[e2e]')"),
    pytest.mark.skipif(CHROMIUM is None, reason="no browser: Chromium is not installed and could not be "
                                                "(make e2e-setup installs Debian's chromium as root with apt; "
                                                "or set ATTNCTL_CHROMIUM to a Chromium/Chrome binary)"),
]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def toy_or_tiny(tmp_path_factory) -> str:
    """toy-sd3 when it ships with this installation, else a tiny SD3 pipeline folder."""
    from attnctl.toyworld.models import TOY_MODELS

    if (TOY_MODELS["toy-sd3"] / "model_index.json").is_file():
        return "toy-sd3"
    from attnctl.testing import save_pipeline, tiny_sd3_pipeline

    return str(save_pipeline(tiny_sd3_pipeline("sd3"), tmp_path_factory.mktemp("e2e") / "tiny-sd3"))


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    model = toy_or_tiny(tmp_path_factory)
    port = free_port()
    log = tmp_path_factory.mktemp("e2e-server") / "server.log"
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "attnctl", "ui", "--port", str(port), "--model", model],
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"attnctl ui exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"attnctl ui did not answer on {url} within {SERVER_START_S} s:\n{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield {"url": url, "model": model, "log": log}
    finally:
        # the server runs in its own session: stop that process group (attnctl ui and its streamlit child)
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=5)


@pytest.fixture()
def page(tmp_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=BROWSER_ARGS)
        try:
            context = browser.new_context(viewport={"width": 1440, "height": 1000}, device_scale_factor=1)
            yield context.new_page()
        finally:
            browser.close()


APP_STATE = "document.querySelector('[data-testid=\"stApp\"]')?.getAttribute('data-test-script-state')"


def settle(page, timeout_ms: float = 30_000) -> None:
    """Wait until Streamlit has finished the script run an action started (the app's script state)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    with contextlib.suppress(PlaywrightTimeout):  # the run may start a moment after the click, or be over
        page.wait_for_function(f"() => {APP_STATE} === 'running'", timeout=1500)
    page.wait_for_function(f"() => {APP_STATE} === 'notRunning'", timeout=timeout_ms)


def set_number(page, key: str, value: int, timeout_ms: float = 30_000) -> None:
    box = page.locator(f".st-key-{key} input")
    box.fill(str(value), timeout=timeout_ms)
    box.press("Enter")
    settle(page, timeout_ms)


def rendered_images(page, scope: str) -> list[dict]:
    return page.evaluate(
        """(scope) => [...document.querySelectorAll(scope + ' [data-testid="stImage"] img')]
              .map(i => ({complete: i.complete, w: i.naturalWidth, h: i.naturalHeight}))""", scope)


def save(page, name: str, tmp_path: Path, locator=None) -> Path:
    path = tmp_path / name
    (locator or page).screenshot(path=str(path))
    target = os.environ.get("ATTNCTL_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, Path(target) / name)
    return path


def test_generate_in_a_real_browser(server, page, tmp_path):
    deadline = time.monotonic() + TEST_BUDGET_S  # every wait below shares this budget

    def left_ms() -> float:
        return max(1000.0, (deadline - time.monotonic()) * 1000)

    page.goto(server["url"], timeout=left_ms())
    page.locator(".st-key-generate button").wait_for(timeout=left_ms())
    settle(page, left_ms())
    assert page.locator('[data-testid="stException"]').count() == 0
    set_number(page, "steps", int(os.environ.get("ATTNCTL_E2E_STEPS", "4")), left_ms())
    page.locator(".st-key-generate button").click(timeout=left_ms())
    scope = ".st-key-compare"  # the Compare tab (the other tabs' images are in the page too)
    page.wait_for_function(
        """(scope) => [...document.querySelectorAll(scope + ' [data-testid="stImage"] img')]
              .filter(i => i.complete && i.naturalWidth > 0).length >= 2""",
        arg=scope, timeout=left_ms())
    settle(page, left_ms())
    images = rendered_images(page, scope)
    assert len(images) == 2 and all(i["complete"] and i["w"] > 0 and i["h"] > 0 for i in images), images
    assert page.locator('[data-testid="stException"]').count() == 0
    assert page.locator('[data-testid="stAlertContentError"]').count() == 0
    shot = save(page, "ui-compare.png", tmp_path)
    assert shot.stat().st_size > 10_000
    if os.environ.get("ATTNCTL_SCREENSHOTS"):
        tour(page, tmp_path)


def tour(page, tmp_path: Path) -> None:
    """The other screens, for docs/ui.md: controls, attention maps, history, export, epipolar views."""
    results = page.locator(".st-key-results_column")
    # a second control and a second run, so the history has something to compare
    page.locator(".st-key-add_kind").click()
    page.get_by_role("option", name="Attention regulation").click()
    settle(page)
    page.locator(".st-key-add_control button").click()
    settle(page)
    set_number(page, "seed", 3)
    page.locator(".st-key-generate button").click()
    page.locator(".st-key-compare").get_by_text("Run #2 ·").wait_for(timeout=TOUR_S * 1000)
    settle(page, TOUR_S * 1000)
    save(page, "ui-overview.png", tmp_path)
    page.set_viewport_size({"width": 1440, "height": 2600})  # tall enough for whole columns
    settle(page)
    save(page, "ui-controls.png", tmp_path, page.locator(".st-key-controls_column"))
    page.get_by_role("tab", name="Attention").click()
    settle(page)
    save(page, "ui-attention.png", tmp_path, results)
    page.get_by_role("tab", name="History").click()
    settle(page)
    save(page, "ui-history.png", tmp_path, results)
    page.get_by_role("tab", name="Export").click()
    settle(page)
    save(page, "ui-export.png", tmp_path, results)
    # epipolar views alone: the cards removed, an orbit of three views, the views in rows
    for _ in range(2):
        page.locator('[class*="st-key-remove"] button').first.click()
        settle(page)
    page.locator(".st-key-add_kind").click()
    page.get_by_role("option", name="Epipolar views").click()
    settle(page)
    page.locator(".st-key-add_control button").click()
    settle(page)
    page.get_by_text("Orbit", exact=True).click()
    settle(page)
    page.get_by_role("tab", name="Compare").click()
    page.locator(".st-key-generate button").click()
    page.locator(".st-key-compare").get_by_text("Run #3 ·").wait_for(timeout=TOUR_S * 1000)
    settle(page, TOUR_S * 1000)
    save(page, "ui-epipolar.png", tmp_path, page.locator(".st-key-compare"))
