"""The page in a real browser: headless Chromium (Playwright) submits a prompt, follows the
progress, and the result plays. Saves a screenshot (docs/serve.png is one of these)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("CADENCE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("CADENCE_SERVE_SCREENSHOT")  # where to keep it; default: the test's tmp dir


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium found (apt install chromium, or set CADENCE_CHROMIUM)")
def test_page_submits_a_prompt_and_plays_the_result_beside_the_baseline(serve, tmp_path):
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    with serve() as client, sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 900, "height": 860})
            page.goto(f"{client.base_url}/")
            page.wait_for_function("document.querySelectorAll('#recipe option').length > 2")
            assert "ref-video" in page.locator("#model").inner_text()
            # a recipe from the measured list (calibration shipped, no compile: quick on a CPU)
            page.select_option("#recipe", label=next(label for label in page.locator("#recipe option").all_inner_texts()
                                                     if label.startswith("magcache(budget=0.3)")))
            assert "dB PSNR" in page.locator("#recipe-measured").inner_text()
            page.fill("#prompt", "a large yellow circle moves right over a blue checkerboard")
            page.fill("#steps", "20")
            page.check("#compare")
            page.click("#generate")
            page.wait_for_selector("#outputs .result", timeout=180_000)
            status = page.locator("#status").inner_text()
            assert "completed" in status, status
            media = page.locator("#outputs .result")
            assert media.count() == 2  # baseline and accelerated, side by side
            for index in range(2):
                element = media.nth(index)
                if element.evaluate("e => e.tagName") == "VIDEO":  # an MP4 where ffmpeg is installed: it plays
                    element.evaluate("e => new Promise(r => e.readyState >= 2 ? r() : e.addEventListener('loadeddata', r))")
                    start = element.evaluate("e => e.currentTime")
                    page.wait_for_timeout(500)
                    assert element.evaluate("e => e.currentTime") != start
                else:  # a looping animated WebP (no ffmpeg here): it loaded and decoded
                    element.evaluate("e => e.decode()")
                    assert element.evaluate("e => e.complete && e.naturalWidth") > 0
            assert "PSNR" in page.locator("#fidelity").inner_text()
            shot = Path(SCREENSHOT) if SCREENSHOT else tmp_path / "serve.png"
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
