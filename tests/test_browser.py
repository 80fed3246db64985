"""The page in a real browser: headless Debian Chromium driven by Playwright (which never downloads one)."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from tests.helpers import moving_face_video, running_app

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
DESKTOP = {"width": 1400, "height": 1300}
LAPTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}

if not os.path.exists(CHROMIUM):
    if os.environ.get("CI"):
        raise RuntimeError(f"{CHROMIUM} is missing: CI must install Debian's chromium package")
    pytest.skip("Debian's chromium is not installed (sudo apt-get install -y chromium)", allow_module_level=True)

# How far the content of an element reaches past its right edge (0: nothing is cut off or scrolled away).
OVERFLOW = """e => Math.max(e.scrollWidth - e.clientWidth,
    ...[...e.querySelectorAll('*')].map(c => c.getBoundingClientRect().right - e.getBoundingClientRect().right))"""
# The ids of the components whose status tracker says "Error".
ERROR_BADGES = """() => [...document.querySelectorAll('[data-testid=status-tracker]')]
    .filter(t => t.offsetParent !== null && t.innerText.includes('Error')).map(t => t.closest('[id]')?.id)"""


def test_generate_in_the_browser_plays_a_video(tmp_path, no_face_path, tiny_kit):
    from playwright.sync_api import sync_playwright

    with running_app(tmp_path, "--max-steps", "100") as (url, _), sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport=DESKTOP)
        page.goto(url)
        # The examples: thumbnails of the photos in the first tab; Generate right under the prompt; the negative
        # prompt waits in "Advanced"; the control panel shows only its kind chooser until a kind is chosen.
        examples = page.locator("#examples")
        examples.locator("img").first.wait_for(timeout=30_000)
        assert examples.locator("img").count() >= 3
        prompt_box, generate_box = page.locator("#prompt").bounding_box(), page.locator("#generate").bounding_box()
        assert 0 <= generate_box["y"] - (prompt_box["y"] + prompt_box["height"]) < 40
        assert not page.locator("#negative-prompt").is_visible()
        page.get_by_role("tab", name="Control").click()
        page.locator("#control-kind").wait_for()
        hidden = ("#control-images", "#control-frames", "#control-video", "#control-strength", "#control-preview")
        assert not any(page.locator(part).is_visible() for part in hidden)
        page.get_by_role("tab", name="Examples").click()
        examples.get_by_text("a woman smiling and waving").click()  # fills the photo and the prompt
        page.locator("#crops img").wait_for(timeout=60_000)  # the aligned face is shown
        assert "smiling and waving" in page.locator("#prompt textarea").input_value()
        long_prompt = "an astronaut smiling and waving at the camera, floating weightless in a space station"
        page.locator("#prompt textarea").fill(long_prompt)  # long in the history table: it must wrap
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
        # The history: whole captions, every column of the settings in view.
        caption = page.locator("#history").get_by_text("seed 1234").filter(visible=True).first
        caption.wait_for(timeout=30_000)
        page.locator("#history-table").get_by_text("64x64").filter(visible=True).first.wait_for(timeout=30_000)
        time.sleep(1)  # the last layout pass
        assert caption.evaluate(OVERFLOW) <= 1
        assert page.locator("#history-table").evaluate(OVERFLOW) <= 1
        shot = tmp_path / "page.png"
        page.screenshot(path=str(shot), full_page=True)

        # An error is one message: the last video and the seed stay, and the message goes away on its own.
        page.locator("#faces input[type=file]").set_input_files(str(no_face_path))
        page.locator("#face-notes").get_by_text("No face was found").wait_for(timeout=60_000)
        page.locator("#generate").click()
        toast = page.locator(".toast-body.error")
        toast.get_by_text("No face was found").first.wait_for(timeout=30_000)
        shown = time.monotonic()
        page.locator("#generate").click()  # a second error joins the first message's toast
        toast.get_by_text("No face was found").nth(1).wait_for(timeout=30_000)
        assert page.evaluate(ERROR_BADGES) == []
        assert video.evaluate("v => v.duration") == duration
        assert page.locator("#seed input").is_visible() and page.locator("#seed input").input_value() == "1234"
        toast.wait_for(state="detached", timeout=20_000)
        assert time.monotonic() - shown < 9  # gradio's default: 10 s

        # Stop ends a long run at once (gradio cancels the event; the worker stops at its next step).
        examples.get_by_text("a woman smiling and waving").click()
        page.locator("#crops img").wait_for(timeout=60_000)
        page.get_by_role("tab", name="Advanced").click()
        for slider, value in (("#frames", "32"), ("#steps", "100")):
            page.locator(f"{slider} input[type=number]").fill(value)
            page.locator(f"{slider} input[type=number]").press("Enter")
        page.locator("#generate").click()
        page.locator("#preview").get_by_text("Denoising").first.wait_for(timeout=60_000)
        # The time shown runs on (gradio's own timer restarted at every step and read "| 0.0s").
        page.wait_for_function(
            "() => /Denoising: step \\d+ of 100, [1-9]\\d* s/.test(document.querySelector('#preview').innerText)",
            timeout=30_000,
        )
        assert "0.0s" not in page.locator("#preview").inner_text()
        page.locator("#stop").click()
        stopped = time.monotonic()
        page.locator("#seed-used").get_by_text("Stopped.").wait_for(timeout=20_000)
        page.wait_for_function(  # no progress left on the page
            "() => ![...document.querySelectorAll('[data-testid=status-tracker]')]"
            ".some(t => t.offsetParent !== null && /Denoising|Decoding/.test(t.innerText))",
            timeout=20_000,
        )
        assert time.monotonic() - stopped < 20  # a 32-frame, 100-step tiny run takes about a minute

        # Beyond the release: fast mode sets its own steps, a style LoRA, a ControlNet on a driving video's edges
        # (previewed before the run), and a time estimate from the last video.
        for slider, value in (("#frames", "8"), ("#steps", "4")):
            page.locator(f"{slider} input[type=number]").fill(value)
            page.locator(f"{slider} input[type=number]").press("Enter")
        page.get_by_role("tab", name="Beyond the release").click()
        page.locator("#fast input").check()
        page.get_by_role("tab", name="Advanced").click()
        page.wait_for_function("() => document.querySelector('#steps input[type=number]').value === '6'")
        page.get_by_role("tab", name="Beyond the release").click()
        page.locator("#fast input").uncheck()  # the user's 4 steps come back, not the release's 30
        page.get_by_role("tab", name="Advanced").click()
        page.wait_for_function("() => document.querySelector('#steps input[type=number]').value === '4'")
        page.get_by_role("tab", name="Beyond the release").click()
        page.locator("#fast input").check()
        page.locator("#loras input").click()
        page.get_by_role("option", name="tiny-style", exact=True).click()
        page.get_by_role("tab", name="Control").click()
        page.locator("#control-kind input").click()
        page.get_by_role("option", name="Edges from a video (canny ControlNet)").click()
        page.locator("#control-video").wait_for()
        assert not page.locator("#control-images").is_visible()  # keyframes mean nothing to canny
        page.locator("#control-video input[type=file]").set_input_files(str(moving_face_video(tmp_path, 10)))
        page.locator("#control-preview img").first.wait_for(timeout=60_000)  # the edges the model will get
        assert page.locator("#control-preview img").count() == 8
        page.locator("#seed input").fill("77")
        page.locator("#generate").click()
        page.get_by_text("Seed used: 77").wait_for(timeout=180_000)
        page.locator("#estimate").get_by_text("Estimated denoising time").wait_for(timeout=30_000)
        page.locator("#history").get_by_text("seed 77").first.wait_for(timeout=30_000)
        # Then a long video (past the motion module's 32 frames) with FreeInit and a sketch keyframe at frame 3.
        page.get_by_role("tab", name="Beyond the release").click()
        page.locator("#fast input").uncheck()
        page.locator("#free-init input").check()
        page.get_by_role("tab", name="Control").click()
        page.locator("#control-kind input").click()
        page.get_by_role("option", name="Sketch keyframes (SparseCtrl)").click()
        page.locator("#control-images input[type=file]").set_input_files(str(no_face_path))
        page.locator("#control-frames textarea").fill("3")
        page.locator("#control-frames textarea").press("Tab")
        page.locator("#control-preview").get_by_text("frame 3").first.wait_for(timeout=60_000)
        page.get_by_role("tab", name="Advanced").click()
        page.locator("#steps input[type=number]").fill("2")
        page.locator("#steps input[type=number]").press("Enter")
        page.locator("#seed input").fill("78")
        page.locator("#generate").click()
        page.get_by_text("Seed used: 78").wait_for(timeout=180_000)
        page.get_by_role("tab", name="Control").click()
        page.locator("#control-kind input").click()
        page.get_by_role("option", name="None").click()  # SparseCtrl has no long-video windows
        page.get_by_role("tab", name="Advanced").click()
        page.locator("#frames input[type=number]").fill("40")
        page.locator("#frames input[type=number]").press("Enter")
        page.locator("#seed input").fill("79")
        page.locator("#generate").click()
        page.get_by_text("Seed used: 79").wait_for(timeout=180_000)
        page.wait_for_function(  # 40 frames at 9 fps
            "() => { const v = document.querySelector('#result video'); return v && v.duration > 4; }", timeout=30_000
        )

        # The history remembers the options: a row brings its settings back (the fast-mode video: 6 steps).
        table = page.locator("#history-table")
        table.get_by_text("canny 1").first.wait_for(timeout=30_000)
        table.get_by_text("fast, LoRA tiny-style").first.click()
        page.wait_for_function("() => document.querySelector('#steps input[type=number]').value === '6'")
        page.get_by_role("tab", name="Beyond the release").click()
        assert page.locator("#fast input").is_checked()

        # One screen to work in, on a laptop: with any options tab open, Generate and the result are in view.
        page.set_viewport_size(LAPTOP)
        for tab in ("Examples", "Advanced", "Beyond the release", "Control"):
            page.get_by_role("tab", name=tab).click()
            page.evaluate("window.scrollTo(0, 0)")  # without scrolling
            time.sleep(0.5)
            for part in ("#generate", "#result video"):
                box = page.locator(part).bounding_box()
                assert box and 0 <= box["y"] and box["y"] + min(box["height"], 60) <= LAPTOP["height"], (tab, part)
        page.screenshot(path=str(tmp_path / "laptop.png"))

        # A phone: the examples fit, captions stay whole, and the settings table shows all of every row.
        page.set_viewport_size(PHONE)
        page.get_by_role("tab", name="Examples").click()
        time.sleep(1)
        assert examples.evaluate(OVERFLOW) <= 1
        assert caption.evaluate(OVERFLOW) <= 1
        assert table.evaluate(OVERFLOW) <= 1
        assert table.get_by_text("seed 1234, tiny-single-file, 8 frames").first.is_visible()
        assert page.locator("#preview").evaluate(OVERFLOW) <= 1  # the preview strip fits its box
        page.screenshot(path=str(tmp_path / "phone.png"), full_page=True)
        browser.close()
    assert shot.stat().st_size > 10_000
    if os.environ.get("IDANIMATOR_SCREENSHOTS"):  # to look at: the page at 1400, 1280x800 and 390 px
        for name in ("page.png", "laptop.png", "phone.png"):
            shutil.copy(tmp_path / name, Path(os.environ["IDANIMATOR_SCREENSHOTS"]) / name)
    if os.environ.get("IDANIMATOR_UPDATE_SCREENSHOT"):
        docs = Path(__file__).resolve().parent.parent / "docs"
        docs.mkdir(exist_ok=True)
        shutil.copy(shot, docs / "screenshot.png")
