"""The studio in a real browser (Playwright driving Debian's chromium, offline): generate, erase, undo,
attention maps. Full-page screenshots land in $STUDIO_TEST_ARTIFACTS/browser (default test-artifacts/)."""
import os
import re
from functools import partial
from pathlib import Path

import pytest
from conftest import free_port

try:
    from playwright.sync_api import expect, sync_playwright
except ImportError:  # reported by the `page` fixture
    sync_playwright = None

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run", "--no-default-browser-check",
        "--disable-background-networking", "--disable-component-update", "--disable-sync", "--disable-default-apps",
        "--metrics-recording-only", "--disable-extensions",
        "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]  # offline: other hosts fail at once
ARTIFACTS = Path(os.environ.get("STUDIO_TEST_ARTIFACTS", "test-artifacts")) / "browser"
WAIT = 120_000  # ms; the CPU is slow and shared
OFFLINE_NOISE = re.compile(r"Failed to load resource|net::ERR_|fonts\.googleapis|fonts\.gstatic")


@pytest.fixture(scope="module")
def studio():
    """The app on localhost over its own toy-model manager. The erasure report that follows an erasure
    (36 generations) runs 2 denoising steps instead of 20: this suite checks the UI, test_erase.py the numbers."""
    missing = ("playwright is not installed (pip install -e '.[test]')" if sync_playwright is None else
               f"{CHROMIUM} is missing (apt-get install chromium)" if not os.access(CHROMIUM, os.X_OK) else None)
    if missing:  # CI must run these; a local checkout may lack the browser
        (pytest.fail if os.environ.get("CI") == "true" else pytest.skip)(f"browser tests need a browser: {missing}")
    from components import erase_tab
    from components.app import launch
    from studio.manager import PipelineManager

    manager = PipelineManager("builtin", device="cpu")
    manager.pipe.set_progress_bar_config(disable=True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(erase_tab, "erasure_report", partial(erase_tab.erasure_report, steps=2))
        demo = launch(manager, port=free_port(), block=False)
        yield manager, demo.local_url
        demo.close()


@pytest.fixture(scope="module")
def page(studio):
    """One headless chromium page on the studio; collects page errors and console errors."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.set_default_timeout(WAIT)
        expect.set_options(timeout=WAIT)
        pg.errors = []

        def on_console(message):
            if message.type == "error" and not OFFLINE_NOISE.search(message.text):
                pg.errors.append(f"console: {message.text}")

        pg.on("console", on_console)
        pg.on("pageerror", lambda e: pg.errors.append(f"page error: {e}"))
        try:
            pg.goto(studio[1])
            expect(pg.locator(".history")).to_contain_text("0 of 0 edits applied")
        finally:
            shot(pg, "0-opened")
        yield pg
        browser.close()


@pytest.fixture(autouse=True)
def final_shot_and_no_errors(page, request):
    """After each test, pass or fail: a screenshot, then no uncaught errors in the page."""
    yield
    shot(page, f"{request.node.name}-end")
    errors, page.errors[:] = list(page.errors), []
    assert not errors, "\n".join(errors)


def shot(page, name: str) -> None:
    page.screenshot(path=str(ARTIFACTS / f"{name}.png"), full_page=True)


def panel(page):
    return page.get_by_role("tabpanel")  # only the selected tab is shown


def block(page, label: str):
    """A component's box, found by its floating label (galleries, images)."""
    return panel(page).locator(".block").filter(has=page.get_by_test_id("block-label").filter(has_text=label))


def expect_images(where, at_least: int = 1) -> None:
    """`where` shows at least this many loaded, non-empty <img>."""
    expect(where.locator("img").nth(at_least - 1)).to_be_visible()
    where.page.wait_for_function("([el, n]) => [...el.querySelectorAll('img')]"
                                 ".filter(i => i.complete && i.naturalWidth > 0).length >= n",
                                 arg=[where.element_handle(), at_least])


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name, exact=True).click()
    expect(page.get_by_role("tab", name=name, exact=True)).to_have_attribute("aria-selected", "true")


def set_slider(page, label: str, value) -> None:
    box = panel(page).get_by_label(f"number input for {label}", exact=True)
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def test_generate_shows_images(page):
    open_tab(page, "Generate")
    panel(page).get_by_label("Prompt", exact=True).fill("a red circle")
    set_slider(page, "Batch", 2)
    panel(page).get_by_text("Settings", exact=True).click()
    set_slider(page, "Steps", 4)
    shot(page, "1-generate-settings")
    panel(page).get_by_role("button", name="Generate", exact=True).click()
    expect(panel(page)).to_contain_text("2 image(s) in")
    expect_images(block(page, "Images"), 2)
    shot(page, "2-generated")


def test_erase_shows_in_history_and_undo_restores(page, studio):
    manager = studio[0]
    f0 = manager.fingerprint()
    history = page.locator(".history")
    open_tab(page, "Erase")
    expect(panel(page).get_by_label("Erase (comma-separated)")).to_have_value("red")
    expect(panel(page).get_by_role("radio", name="Closed form (UCE)")).to_be_checked()
    set_slider(page, "Report seeds", 1)
    panel(page).get_by_role("button", name="Erase", exact=True).click()
    expect(panel(page)).to_contain_text("Applied: erase 'red'")
    expect(history).to_contain_text("1 of 1 edits applied")
    expect(history.get_by_role("row").filter(has_text="erase 'red'")).to_contain_text("✓")
    expect_images(block(page, "Before / after"), 2)  # the report that follows; it steps the stack while it runs
    assert manager.stack.position == 1 and manager.fingerprint() != f0
    shot(page, "3-erased")

    history.get_by_role("button", name="↶ Undo").click()
    expect(history).to_contain_text("0 of 1 edits applied")
    expect(history.get_by_role("row").filter(has_text="erase 'red'")).to_contain_text("undone")
    assert manager.stack.position == 0 and manager.fingerprint() == f0
    shot(page, "4-undone")


def test_attention_maps_appear(page):
    open_tab(page, "Attention")
    panel(page).get_by_label("Prompt", exact=True).fill("a red circle and a blue square")
    set_slider(page, "Steps", 4)
    panel(page).get_by_role("button", name="Run", exact=True).click()
    expect(panel(page)).to_contain_text("· 4 steps ·")
    expect_images(block(page, "Word maps"), 2)
    expect(panel(page).get_by_role("row").filter(has_text="circle").first).to_be_visible()  # the per-word table
    shot(page, "5-attention")
