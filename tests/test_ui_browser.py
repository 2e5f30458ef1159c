"""The web page in a real headless Chromium: type a prompt, set a small size, click Generate, see the video.

Needs the ``playwright`` package and Debian's ``chromium`` at /usr/bin/chromium (``playwright install`` downloads
are not used); skipped with the reason when either is missing.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket

import pytest

from easyanimate.ui.app import launch
from easyanimate.ui.generation import Studio

CHROMIUM = os.environ.get("EASYANIMATE_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture
def browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright package is not installed")
    if not os.path.isfile(CHROMIUM):
        pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install -y chromium, or set EASYANIMATE_CHROMIUM)")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@contextlib.contextmanager
def served_page(browser, tiny_model_dir, tmp_path, model_name="tiny"):
    """The app on a free local port with the tiny model as ``model_name``; yields (page, studio)."""
    from playwright.sync_api import expect

    shutil.copytree(tiny_model_dir, tmp_path / "models" / model_name)
    studio = Studio(tmp_path / "models", tmp_path / "loras", tmp_path / "samples")
    demo = launch(studio, host="127.0.0.1", port=free_port(), prevent_thread_lock=True)
    try:
        page = browser.new_page()
        page.goto(demo.local_url)
        expect(page.locator("#generate")).to_be_visible(timeout=30_000)
        yield page, studio
    finally:
        demo.close()


def set_number(page, elem_id: str, value: str) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(value)
    box.press("Enter")


def test_page_generates_a_video_when_generate_is_clicked(browser, tiny_model_dir, tmp_path):
    from playwright.sync_api import expect

    with served_page(browser, tiny_model_dir, tmp_path) as (page, studio):
        page.locator("#prompt textarea").fill("a red ball rolls across a wooden table")
        for elem_id, value in [("width", "96"), ("height", "64"), ("frames", "8"), ("steps", "2")]:
            set_number(page, elem_id, value)
        page.locator("#generate").click()
        video = page.locator("#result-video video")
        expect(video).to_be_visible(timeout=120_000)
        assert video.get_attribute("src").endswith(".mp4")

        (settings_file,) = studio.output.root.glob("*.json")
        settings = json.loads(settings_file.read_text())
        assert settings["prompt"] == "a red ball rolls across a wooden table"
        assert (settings["width"], settings["height"], settings["frames"], settings["steps"]) == (96, 64, 8, 2)
        assert (studio.output.root / settings["output"]).is_file()


def test_template_start_image_fills_the_inputs_and_generates(browser, tiny_model_dir, tmp_path):
    """The image-to-video templates (as the original's five) fill start image, prompt and the demo's size."""
    from playwright.sync_api import expect

    from easyanimate.demo.examples import IMAGE_TEMPLATES
    from easyanimate.ui.app import DEFAULT_MODEL_NAME

    template = IMAGE_TEMPLATES[2]  # the 48 x 96 one: the size must follow the template
    # named as the demo, which is preselected: the page starts at the demo's size
    with served_page(browser, tiny_model_dir, tmp_path, DEFAULT_MODEL_NAME) as (page, studio):
        assert page.locator("#width input[type=number]").input_value() == "64"  # the demo's size, not 672 x 384
        expect(page.locator("#image-templates")).to_be_hidden()
        page.get_by_label("Image to Video").check()
        templates = page.locator("#image-templates")
        expect(templates).to_be_visible()
        templates.locator("tbody tr").nth(2).click()
        expect(page.locator("#prompt textarea")).to_have_value(template.prompt)
        expect(page.locator("#width input[type=number]")).to_have_value("96")
        expect(page.locator("#height input[type=number]")).to_have_value("48")
        set_number(page, "steps", "2")
        page.locator("#generate").click()
        expect(page.locator("#result-video video")).to_be_visible(timeout=120_000)

        (settings_file,) = studio.output.root.glob("*.json")
        settings = json.loads(settings_file.read_text())
        assert settings["kind"] == "Image to Video" and settings["prompt"] == template.prompt
        assert settings["start_image"] == template.image
        assert (settings["width"], settings["height"], settings["frames"]) == (96, 48, 16)


def test_stop_ends_this_pages_running_generation_at_the_next_step(browser, tiny_model_dir, tmp_path):
    """Stop, pressed while the page's generation samples, stops it at the next step (the page says so and nothing is
    saved); the next Generate runs."""
    from playwright.sync_api import expect

    with served_page(browser, tiny_model_dir, tmp_path) as (page, studio):
        for elem_id, value in [("width", "128"), ("height", "128"), ("frames", "16"), ("steps", "100")]:  # long enough to press Stop
            set_number(page, elem_id, value)
        page.locator("#generate").click()
        expect(page.get_by_text("Sampling")).to_be_visible(timeout=60_000)
        page.locator("#stop").click()
        expect(page.get_by_text("cancelled after step").first).to_be_visible(timeout=60_000)
        assert not list(studio.output.root.glob("*.mp4"))

        set_number(page, "steps", "2")
        page.locator("#generate").click()
        expect(page.locator("#result-video video")).to_be_visible(timeout=120_000)
        assert len(list(studio.output.root.glob("*.mp4"))) == 1
