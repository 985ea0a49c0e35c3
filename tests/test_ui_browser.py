"""The real page of `svd-animate ui`, served by the real command, driven in headless Chromium (Debian's
/usr/bin/chromium through Playwright; `.ci/run` installs it): uploads, step 1 (poses), step 2 (animate), the
downloads, errors, cancel and the queue, as a visitor sees them."""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import av
import pytest

playwright = pytest.importorskip("playwright.sync_api")

from pose.skeleton import PoseSequence  # noqa: E402
from tests.conftest import ROOT  # noqa: E402

CHROMIUM = os.environ.get("SVD_ANIMATE_CHROMIUM", "/usr/bin/chromium")
CLIP = "driving_controlnext_v2_01.mp4"
ENDLESS = 100_000  # sampling steps no run finishes within a test: only Cancel ends it
REF = "ref_controlnext_v2_01.jpeg"
# What a closed network needs: no background connections, no sandbox as root (env README: Chromium here)
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
                 "--disable-background-networking", "--disable-component-update"]

pytestmark = [pytest.mark.browser, pytest.mark.realdata,
              pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is absent (apt-get install "
                                 "chromium; .ci/run does)")]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, url: str, output_dir: Path, process: subprocess.Popen):
        self.url, self.output_dir, self.process = url, output_dir, process

    def entries(self) -> list[str]:
        """The job folders (and anything else) in the output folder, uploads left out."""
        return sorted(p.name for p in self.output_dir.iterdir() if p.name != "uploads")


@pytest.fixture(scope="module")
def server(tmp_path_factory, shared_data):
    base = tmp_path_factory.mktemp("ui")
    port = free_port()
    env = {**os.environ, "SVD_ANIMATE_CACHE": str(base / "pose-cache"), "HF_HUB_OFFLINE": "1",
           "HF_HUB_CACHE": str(base / "hub"), "GLOG_minloglevel": "2",
           "GRADIO_HEARTBEAT_INTERVAL": "1"}  # a visitor who leaves is seen within a second (15 s by default)
    env.pop("GRADIO_TEMP_DIR", None)  # uploads must go to --output-dir/uploads
    log = open(base / "server.log", "w")
    process = subprocess.Popen([sys.executable, "-m", "svd_animate", "ui", "--preset", "tiny", "--port", str(port),
                                "--output-dir", str(base / "site"), "--detector", "mediapipe", "--device", "cpu",
                                "--examples", str(shared_data)], cwd=ROOT, env=env, stdout=log,
                               stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the ui server did not start:\n{(base / 'server.log').read_text()[-3000:]}")
            time.sleep(0.5)
    yield Server(url, base / "site", process)
    process.terminate()
    try:
        process.wait(20)
    except subprocess.TimeoutExpired:
        process.kill()
    log.close()


@pytest.fixture(scope="module")
def browser():
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, server):
    context = browser.new_context(viewport={"width": 1400, "height": 1500})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(server.url)
    page.wait_for_selector("#show-poses")
    yield page
    context.close()


def status(page) -> str:
    return page.locator("#status").inner_text().strip()


def wait_for_status(page, *prefixes, timeout=120_000) -> str:
    condition = " || ".join(f"t.startsWith({p!r})" for p in prefixes)
    page.wait_for_function(f"() => {{ const t = document.querySelector('#status').innerText.trim(); "
                           f"return {condition}; }}", timeout=timeout)
    return status(page)


def upload(page, reference=None, video=None):
    if reference is not None:
        page.locator("#reference input[type=file]").set_input_files(str(reference))
        page.wait_for_selector("#reference img")
    if video is not None:
        page.locator("#driving input[type=file]").set_input_files(str(video))
        page.wait_for_function("() => document.querySelector('#driving video, #driving .error, #driving [src]')")


def set_option(page, name: str, value: str):
    page.locator(f"#opt-{name} input, #opt-{name} textarea").first.fill(value)


def choose(page, name: str, value: str):
    """Pick `value` in the dropdown of option `name`, as a visitor does."""
    page.locator(f"#opt-{name} input").click()
    page.locator(f"ul[role=listbox] li[aria-label={value!r}]").click()
    page.wait_for_function(f"() => document.querySelector('#opt-{name} input').value === {value!r}")


def video_element(page, elem_id: str) -> dict:
    """The page's <video> in `elem_id` once the browser has read its metadata: duration and size."""
    page.wait_for_function(f"() => {{ const v = document.querySelector('#{elem_id} video'); "
                           "return v && v.readyState >= 1 && v.duration > 0; }")
    return page.evaluate(f"() => {{ const v = document.querySelector('#{elem_id} video'); "
                         f"return {{src: v.currentSrc, duration: v.duration, width: v.videoWidth}}; }}")


def saved_folder(text: str) -> Path:
    return Path(re.search(r"Saved in (.+)\.$", text).group(1))


def test_poses_then_animation_in_the_page(page, server, shared_data, tmp_path):
    upload(page, shared_data / REF, shared_data / CLIP)
    set_option(page, "max_frames", "8")

    page.click("#show-poses")
    text = wait_for_status(page, "Poses:", "Error")
    assert text.startswith("Poses: 8 frames at 7.25 fps, align ls"), text
    preview = video_element(page, "preview")
    assert preview["duration"] == pytest.approx(8 / 7.25, abs=0.15)
    assert PoseSequence.load(saved_folder(text) / "poses.npz").meta["align"]["method"] == "ls"

    choose(page, "align", "none")  # look again with another alignment: the raw poses come from the cache
    page.click("#show-poses")
    text = wait_for_status(page, "Poses: 8 frames at 7.25 fps, align none", "Error")
    assert text.startswith("Poses: 8 frames at 7.25 fps, align none"), text
    assert PoseSequence.load(saved_folder(text) / "poses.npz").meta["align"]["method"] == "none"
    choose(page, "align", "ls")

    page.locator("#opt-side_by_side input").check()
    page.click("#animate")
    text = wait_for_status(page, "Animation:", "Error")
    assert text.startswith("Animation: 8 frames at 7.25 fps"), text
    assert "RANDOM WEIGHTS" in text
    result = video_element(page, "result")  # Chromium can play it
    assert result["duration"] == pytest.approx(8 / 7.25, abs=0.15)
    assert result["width"] == 2 * 64  # skeleton | result
    folder = saved_folder(text)
    (video,) = folder.glob("*.mp4")
    with av.open(str(video)) as container:
        assert sum(1 for _ in container.decode(video=0)) == 8
    assert len(PoseSequence.load(folder / "poses.npz")) == 8
    links = page.locator("#downloads a").evaluate_all("links => links.map(a => decodeURIComponent(a.getAttribute('download') || a.href))")
    assert any(name.endswith(".mp4") for name in links) and any("poses.npz" in name for name in links), links
    assert "Traceback" not in page.inner_text("body")
    assert any((server.output_dir / "uploads").rglob(CLIP))  # uploads live in --output-dir too
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    if os.environ.get("SVD_ANIMATE_SCREENSHOT"):  # refreshes docs/ui.png: SVD_ANIMATE_SCREENSHOT=docs/ui.png
        shutil.copy(tmp_path / "ui.png", os.environ["SVD_ANIMATE_SCREENSHOT"])


def test_a_file_that_is_not_a_video_is_one_line_in_the_page(page, server, shared_data, tmp_path):
    before = server.entries()
    notes = tmp_path / "notes.mp4"
    notes.write_text("this is a shopping list, not a video")
    upload(page, shared_data / REF)
    page.locator("#driving input[type=file]").set_input_files(str(notes))
    page.click("#show-poses")
    text = wait_for_status(page, "Error", "Poses:")
    assert text.startswith("Error: ") and "notes.mp4" in text and "\n" not in text, text
    assert "Traceback" not in page.inner_text("body")
    assert server.entries() == before


def test_a_text_file_uploaded_as_the_reference_is_one_line_in_the_page(page, server, shared_data, tmp_path):
    before = server.entries()
    notes = tmp_path / "notes.png"
    notes.write_text("a shopping list with an image's name")
    page.locator("#reference input[type=file]").set_input_files(str(notes))
    upload(page, video=shared_data / CLIP)
    page.click("#show-poses")
    text = wait_for_status(page, "Error", "Poses:")
    assert re.fullmatch(r"Error: \S*notes\.png: not a readable image", text), text  # not Gradio's generic error
    assert "Traceback" not in page.inner_text("body")
    assert server.entries() == before


def test_animate_without_inputs_says_what_is_missing(page, server):
    page.click("#animate")
    assert wait_for_status(page, "Error") == "Error: no reference image: upload one, or pick an example"


def test_cancel_stops_the_job_and_leaves_no_file(page, server, shared_data):
    before = server.entries()
    upload(page, shared_data / REF, shared_data / CLIP)
    set_option(page, "max_frames", "8")
    set_option(page, "steps", str(ENDLESS))
    page.click("#animate")
    page.wait_for_function("() => document.body.innerText.includes('sampling (steps)')")  # the progress, in the page
    page.click("#cancel")
    text = wait_for_status(page, "Cancelled", "Animation:", "Error", timeout=60_000)
    assert text == "Cancelled: the job was stopped and nothing was written."
    assert server.entries() == before  # no job folder, no .partial left
    page.click("#show-poses")  # the worker is free again: had the endless job gone on, this would never run
    assert wait_for_status(page, "Poses:", "Error", timeout=90_000).startswith("Poses:")


def test_a_second_visitor_sees_their_place_in_the_queue(browser, server, shared_data):
    visitors = []
    for _ in range(2):
        context = browser.new_context(viewport={"width": 1400, "height": 1500})
        visitor = context.new_page()
        visitor.set_default_timeout(60_000)
        visitor.goto(server.url)
        upload(visitor, shared_data / REF, shared_data / CLIP)
        set_option(visitor, "max_frames", "8")
        visitors.append((context, visitor))
    (_, first), (_, second) = visitors
    try:
        set_option(first, "steps", str(ENDLESS))
        first.click("#animate")
        first.wait_for_function("() => document.body.innerText.includes('sampling (steps)')")
        second.click("#show-poses")
        second.wait_for_function("() => /queue: *1\\/1/.test(document.body.innerText)")
        first.click("#cancel")
        assert wait_for_status(first, "Cancelled", "Animation:", "Error").startswith("Cancelled")
        assert wait_for_status(second, "Poses:", "Error").startswith("Poses:")
    finally:
        for context, _ in visitors:
            context.close()


def test_ticking_fast_shows_its_settings_and_keeps_an_edit(page, server):
    set_option(page, "seed", "7")
    page.locator("#opt-fast input").check()
    page.wait_for_function("() => document.querySelector('#opt-steps input').value === '10'")  # the fast steps
    assert page.locator("#opt-seed input").input_value() == "7"
    page.click("#advanced")
    assert page.locator("#opt-sigma_schedule input").input_value() == "ays"
    page.locator("#opt-fast input").uncheck()
    page.wait_for_function("() => document.querySelector('#opt-steps input').value === '3'")  # the tiny preset's


def test_a_visitors_uploads_go_when_they_leave(browser, server, shared_data, tmp_path):
    mine = tmp_path / "leaving.jpeg"  # a name no other visitor uploads
    shutil.copy(shared_data / REF, mine)
    context = browser.new_context(viewport={"width": 1400, "height": 1500})
    visitor = context.new_page()
    visitor.set_default_timeout(60_000)
    visitor.goto(server.url)
    upload(visitor, mine, shared_data / CLIP)
    set_option(visitor, "max_frames", "8")
    visitor.click("#show-poses")
    assert wait_for_status(visitor, "Poses:", "Error").startswith("Poses:")
    uploads = server.output_dir / "uploads"
    assert any(uploads.rglob(mine.name))
    context.close()
    deadline = time.monotonic() + 30
    while any(uploads.rglob(mine.name)):
        assert time.monotonic() < deadline, "the upload outlived its visitor"
        time.sleep(0.2)
    assert mine.is_file() and server.process.poll() is None
