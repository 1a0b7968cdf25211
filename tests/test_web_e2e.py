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
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-dev-shm-usage",
]
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
        "c.querySelector('.path').textContent === 'chelsea.png').dataset.id"
    )
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


def _no_404(page) -> list[str]:
    """Collect the URLs the page got a 404 for."""
    missing: list[str] = []
    page.on("response", lambda r: missing.append(r.url) if r.status == 404 else None)
    return missing


def test_calibrated_results_render_before_explanations(browser, live_server: str) -> None:  # noqa: F811
    """Explanations (word weights, heatmaps) are fetched after the results are shown, per card."""
    page, errors = _page(browser, 1280, 900)
    held = []
    page.route("**/api/heatmap/**", lambda route: held.append(route))
    page.route("**/api/explain", lambda route: held.append(route))
    page.goto(live_server + "/search?mode=text")
    page.check("#calibrate")
    page.fill("#text-query", "a cup of coffee")
    page.click("#text-submit")
    ids = _wait_results(page, 0)  # shown while every explanation request is still unanswered
    assert len(ids) == 10 and page.locator("#results img.heatmap").count() == 10
    assert page.is_hidden("#explanation")
    assert len(held) >= 1
    for route in held:
        route.continue_()
    page.unroute("**/api/heatmap/**")
    page.unroute("**/api/explain")
    page.wait_for_selector("#explanation:not([hidden]) .token")
    _all_loaded(page, "#results img")
    explain_calls: list[str] = []
    page.on("request", lambda r: explain_calls.append(r.url) if "/api/explain" in r.url else None)
    page.click("#tab-composed")  # switch away and back: the word explanation comes from the cache
    page.click("#tab-text")
    page.wait_for_selector("#explanation:not([hidden]) .token")
    assert explain_calls == []
    assert errors == [], errors
    page.close()


def test_tabs_keep_their_own_results(browser, live_server: str) -> None:  # noqa: F811
    page, errors = _page(browser, 1280, 900)
    page.goto(live_server + "/search?mode=text")
    page.fill("#text-query", "a horse")
    page.click("#text-submit")
    assert len(_wait_results(page, 0)) == 10
    page.click("#tab-composed")
    assert page.locator("#results .card").count() == 0  # text results do not stay under Composed
    page.click("#tab-text")
    assert page.locator("#results .card").count() == 10  # and come back with their tab
    assert errors == [], errors
    page.close()


def test_wordpiece_words_and_file_names_do_not_break_mid_word(browser, live_server: str) -> None:  # noqa: F811
    page, errors = _page(browser, 390, 844)
    page.goto(live_server + "/search?mode=text")
    page.check("#calibrate")
    page.fill("#text-query", "a snowboarder below the astronaut")
    page.click("#text-submit")
    _wait_results(page, 0)
    page.wait_for_selector("#explanation:not([hidden]) .token")
    words = page.locator("#tokens .word").evaluate_all("els => els.map(e => e.textContent)")
    assert "snowboarder" in words and "below" in words, words  # pieces of one word form one word
    gaps = page.evaluate("""() => [...document.querySelectorAll('#tokens .word')].flatMap(w => {
        const r = [...w.children].map(c => c.getBoundingClientRect());
        return r.slice(1).map((b, i) => [Math.abs(b.left - r[i].right), Math.abs(b.top - r[i].top)]); })""")
    assert all(dx < 1 and dy < 1 for dx, dy in gaps), gaps  # no gap, same line
    styles = page.evaluate("""() => ['.reference figcaption', '#tokens .word'].map(s => {
        const e = document.querySelector(s); const c = getComputedStyle(e); return [c.wordBreak, c.whiteSpace]; })""")
    assert all(wb != "break-all" for wb, _ in styles), styles
    assert styles[1][1] == "nowrap"
    page.goto(live_server + "/")
    assert page.evaluate("() => getComputedStyle(document.querySelector('.index-card h2')).wordBreak") != "break-all"
    assert errors == [], errors
    page.close()


def test_click_to_refine_leaves_no_selection_ring(browser, live_server: str) -> None:  # noqa: F811
    page, errors = _page(browser, 1280, 900)
    page.goto(live_server + "/search?mode=text")
    page.fill("#text-query", "a cat")
    page.click("#text-submit")
    ids = _wait_results(page, 0)
    page.click(f"#results .card[data-id='{ids[1]}']")  # click-to-refine: becomes the reference
    assert page.evaluate("() => document.activeElement.id") == "modification"
    n = _searches(page)
    page.fill("#modification", "at night")
    page.click("#composed-submit")
    ids = _wait_results(page, n)
    # a card focused by the mouse (press on it, release elsewhere: no click) shows no ring
    box = page.locator(f"#results .card[data-id='{ids[0]}']").bounding_box()
    page.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 3)
    page.mouse.down()
    page.mouse.move(1, 1)
    page.mouse.up()
    assert page.evaluate("() => document.activeElement.dataset.id") == ids[0]
    style = "e => { const c = getComputedStyle(e); return [c.borderTopColor, c.boxShadow, c.outlineStyle]; }"
    plain = page.locator(f"#results .card[data-id='{ids[1]}']").evaluate(style)
    looks = page.evaluate(f"() => ({style})(document.activeElement)")
    assert looks == plain and looks[2] == "none", (looks, plain)  # looks like any other card
    page.keyboard.press("Tab")  # keyboard focus does show a ring
    page.keyboard.press("Shift+Tab")
    assert page.evaluate("() => document.activeElement.dataset.id") == ids[0]
    ring = page.evaluate(f"() => ({style})(document.activeElement)")
    assert ring != plain, ring
    assert errors == [], errors
    page.close()


def test_api_link_favicon_and_screenshots_of_every_page(browser, live_server: str) -> None:  # noqa: F811
    """The API link opens the Swagger UI page (rendered offline); no page asks for a missing file;
    every page at desktop and phone width is kept as a screenshot."""
    for width, height, tag in ((1280, 900, "desktop"), (390, 844, "phone")):
        page, errors = _page(browser, width, height)
        missing = _no_404(page)
        page.goto(live_server + "/")
        _all_loaded(page, "img")
        page.screenshot(path=str(ARTIFACTS / f"10-{tag}-home.png"), full_page=True)
        page.goto(live_server + "/search?mode=text")
        page.fill("#text-query", "a rocket at night")
        page.click("#text-submit")
        _wait_results(page, 0)
        _all_loaded(page, "#results img")
        page.screenshot(path=str(ARTIFACTS / f"11-{tag}-text.png"), full_page=True)
        page.check("#calibrate")
        page.wait_for_selector("#explanation:not([hidden]) .token")
        _all_loaded(page, "#results img")
        page.screenshot(path=str(ARTIFACTS / f"12-{tag}-calibrated.png"), full_page=True)
        page.goto(live_server + "/search?mode=composed")
        page.wait_for_selector("#picker .card")
        _all_loaded(page, "#picker img")
        page.screenshot(path=str(ARTIFACTS / f"13-{tag}-composed-picker.png"), full_page=True)
        page.locator("#picker .card").first.click()
        page.fill("#modification", "at night")
        page.click("#composed-submit")
        _wait_results(page, 0)
        _all_loaded(page, "#results img, #reference-img")
        page.screenshot(path=str(ARTIFACTS / f"14-{tag}-composed.png"), full_page=True)
        assert page.evaluate("() => document.documentElement.scrollWidth") <= width
        page.click("a.api-link")
        page.wait_for_url("**/docs")
        page.wait_for_selector(".swagger-ui .opblock", timeout=TIMEOUT_MS)  # rendered without any CDN
        assert page.locator(".swagger-ui .opblock").count() >= 9
        page.screenshot(path=str(ARTIFACTS / f"15-{tag}-docs.png"), full_page=True)
        assert missing == [], missing
        assert errors == [], errors
        page.close()
