"""The page in a real browser: headless Debian Chromium driven by Playwright (which never downloads one)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from tests.helpers import running_app

CHROMIUM = "/usr/bin/chromium"
ARGS = [
    "--no-sandbox",
    "--headless=new",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--autoplay-policy=no-user-gesture-required",
]

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: CI must install Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (sudo apt-get install -y chromium)", allow_module_level=True)


def test_generate_in_the_browser_plays_a_video(tmp_path, astronaut_path, tiny_kit):
    from playwright.sync_api import sync_playwright

    with running_app(tmp_path) as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1300})
        page.goto(url)
        page.locator("#faces input[type=file]").set_input_files(str(astronaut_path))
        page.locator("#crops img").wait_for(timeout=60_000)  # the aligned face is shown
        page.locator("#prompt textarea").fill("an astronaut smiling and waving")
        page.locator("#backbone input").click()
        page.get_by_role("option", name="Tiny random model (single file)").click()
        page.locator("#randomize input").uncheck()
        page.locator("#seed input").fill("1234")
        page.locator("#generate").click()
        page.get_by_text("Seed used: 1234").wait_for(timeout=120_000)
        video = page.locator("#result video")
        video.wait_for(timeout=30_000)
        page.wait_for_function(
            "() => { const v = document.querySelector('#result video');"
            " return v && v.readyState >= 1 && isFinite(v.duration) && v.duration > 0; }",
            timeout=30_000,
        )
        duration = video.evaluate("v => v.duration")
        assert duration > 0.5  # 8 frames at 9 fps
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("IDANIMATOR_UPDATE_SCREENSHOT"):
        docs = Path(__file__).resolve().parent.parent / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(shot, docs / "screenshot.png")
