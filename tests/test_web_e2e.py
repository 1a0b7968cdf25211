"""Real-browser end-to-end test of the web demo in headless Chromium (Debian ``chromium``
driven by Playwright's Python package; ``.ci/run`` installs it). Screenshots go to
``test-artifacts/web/``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from web_support import live_server, web_app, web_data  # noqa: F401

CHROMIUM = os.environ.get("CALIBCLIP_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts" / "web"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--no-first-run", "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000
pytestmark = pytest.mark.skipif(
    not os.path.exists(CHROMIUM),
    reason=f"needs Chromium at {CHROMIUM} (Debian: apt-get install chromium; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="needs the playwright Python package (test extra)")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield b
        b.close()


def _page(browser, width: int, height: int):
    page = browser.new_page(viewport={"width": width, "height": height})
    page.set_default_timeout(TIMEOUT_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


def _searches(page) -> int:
    """How many result sets the page has rendered so far."""
    return int(page.get_attribute("#app", "data-searches") or 0)


def _wait_results(page, after: int) -> list[str]:
    """Wait until the page has rendered more than ``after`` result sets; the shown result ids."""
    page.wait_for_function(
        "n => parseInt(document.getElementById('app').dataset.searches || '0', 10) > n"
        " && !document.getElementById('app').classList.contains('busy')",
        arg=after,
    )
    return page.locator("#results .card").evaluate_all("els => els.map(e => e.dataset.id)")


def _all_loaded(page, selector: str) -> None:
    """Wait until every image matching ``selector`` has loaded (so screenshots show them)."""
    page.wait_for_function(
        "sel => [...document.querySelectorAll(sel)].every(i => { i.loading = 'eager';"
        " return i.complete && i.naturalWidth > 0; })",
        arg=selector,
    )


def test_text_search_calibration_composed_and_refine(browser, live_server: str, web_data) -> None:  # noqa: F811
    page, errors = _page(browser, 1280, 900)
    page.goto(live_server + "/")
    assert page.locator(".index-card").count() == 1
    page.screenshot(path=str(ARTIFACTS / "01-home.png"), full_page=True)

    # text search
    page.click("text=Text search")
    page.fill("#text-query", "a cup of coffee")
    page.click("#text-submit")
    ids = _wait_results(page, 0)
    assert len(ids) == 10  # whole gallery (k=20 > 10 photos)
    _all_loaded(page, "#results img")  # every thumbnail URL serves a real image
    page.screenshot(path=str(ARTIFACTS / "02-text-search.png"), full_page=True)

    # calibration toggle: re-runs the query, shows dominant words and per-result heatmaps
    assert page.is_enabled("#calibrate")  # the test index has calibrated vectors
    n = _searches(page)
    page.check("#calibrate")
    _wait_results(page, n)
    page.wait_for_selector("#explanation:not([hidden]) .token")
    page.wait_for_selector("#results img.heatmap")
    assert "coffee" in page.text_content("#tokens")
    assert page.locator("#results img.heatmap").count() == 10
    _all_loaded(page, "#results img")
    page.screenshot(path=str(ARTIFACTS / "03-calibrated.png"), full_page=True)
    n = _searches(page)
    page.uncheck("#calibrate")
    _wait_results(page, n)
    assert page.is_hidden("#explanation")

    # composed: upload a reference, submit a modification
    page.click("#tab-composed")
    page.wait_for_selector("#picker .card")  # random references offered
    page.set_input_files("#upload-input", str(web_data["images"] / "chelsea.png"))
    page.wait_for_function("() => document.getElementById('upload-status').textContent.startsWith('Uploaded')")
    assert page.get_attribute("#reference-img", "src").startswith("/api/images/u-")
    n = _searches(page)
    page.fill("#modification", "in a garden with grass")
    page.click("#composed-submit")
    ids = _wait_results(page, n)
    assert len(ids) == 10
    _all_loaded(page, "#results img, #reference-img")
    page.screenshot(path=str(ARTIFACTS / "04-composed-upload.png"), full_page=True)

    # click a result: it becomes the reference; its annotated suggestions appear; refine again
    chelsea_id = page.evaluate(
        "() => [...document.querySelectorAll('#results .card')].find(c => "
        "c.querySelector('.path').textContent === 'chelsea.png').dataset.id")
    page.click(f"#results .card[data-id='{chelsea_id}']")
    assert page.get_attribute("#reference-img", "src").startswith(f"/api/images/{chelsea_id}?")
    page.wait_for_selector("#suggestions .chip")
    n = _searches(page)
    page.click("#suggestions .chip:text('a cup of coffee instead of the cat')")
    _wait_results(page, n)
    assert page.locator("#results .card.target").count() == 1
    assert "ground-truth target at rank" in page.text_content("#status")
    page.screenshot(path=str(ARTIFACTS / "05-refined-with-target.png"), full_page=True)
    assert errors == [], errors
    page.close()


def test_phone_width_layout(browser, live_server: str) -> None:  # noqa: F811
    page, errors = _page(browser, 390, 844)
    page.goto(live_server + "/search?mode=text")
    page.fill("#text-query", "an astronaut")
    page.click("#text-submit")
    _wait_results(page, 0)
    # nothing overflows horizontally on a phone-width screen
    assert page.evaluate("() => document.documentElement.scrollWidth") <= 390
    page.screenshot(path=str(ARTIFACTS / "06-phone.png"), full_page=True)
    assert errors == [], errors
    page.close()


def test_bad_upload_shows_clear_message(browser, live_server: str, tmp_path: Path) -> None:  # noqa: F811
    page, errors = _page(browser, 1024, 768)
    page.goto(live_server + "/search?mode=composed")
    bad = tmp_path / "notes.png"
    bad.write_text("definitely not an image")
    page.set_input_files("#upload-input", str(bad))
    page.wait_for_selector("#upload-status.error")
    assert "not a usable image" in page.text_content("#upload-status")
    assert errors == [], errors
    page.close()
