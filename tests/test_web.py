"""The web page (`python infer.py MODEL --serve`), driven in a real headless browser: Debian's Chromium through
Playwright with the system browser (no browser download). Skips where Chromium, Gradio or Playwright is absent;
.ci/run installs them. The screenshot README shows is taken here (BEATGEN_SCREENSHOT=path keeps a copy)."""

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest
import soundfile

from conftest import ROOT, click_song, tiny_encodec_model, tiny_qwen

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed")
# what the probe of this machine found Chromium needs here: no sandbox as root, no network chatter
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`python infer.py model --serve --port P` on a tiny untrained model (the play constraint makes its maps
    playable anyway), from a working directory outside the repo → (base URL, working directory)."""
    pytest.importorskip("gradio")
    work = tmp_path_factory.mktemp("web")
    sys.path.insert(0, str(ROOT))
    import data
    from audio import create_audio_tokenizer
    tiny_encodec_model().save_pretrained(work / "encodec")
    tiny_qwen(work / "model")
    data.save_metadata(work / "model", create_audio_tokenizer(model=str(work / "encodec"), device="cpu"),
                       str(work / "encodec"), 10.0, 32767)
    port = free_port()
    log = open(work / "server.log", "w")
    process = subprocess.Popen([sys.executable, str(ROOT / "infer.py"), "model", "--serve", "--port", str(port),
                                "--device", "cpu"], cwd=work, stdout=log, stderr=subprocess.STDOUT,
                               env={**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"})
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            break
        except OSError:
            assert process.poll() is None, (work / "server.log").read_text()[-3000:]
            time.sleep(1)
    else:
        process.kill()
        pytest.fail("the page did not come up: " + (work / "server.log").read_text()[-3000:])
    yield url, work
    process.terminate()
    process.wait(timeout=30)
    log.close()


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def test_page_maps_an_uploaded_song(server, browser, tmp_path):
    url, work = server
    song = tmp_path / "Click Song.wav"
    soundfile.write(song, click_song(24.0, np.arange(0.3, 24, 0.35)), 24000)
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.goto(url)
    page.locator("#song input[type=file]").set_input_files(str(song))
    page.locator("#difficulties").get_by_label("Hard").check()
    page.locator("#bpm input").fill("120")
    page.locator("#generate").click()
    score = page.locator("#score textarea")
    page.wait_for_function("document.querySelector('#score textarea') && "
                           "document.querySelector('#score textarea').value.includes('ExpertPlus')", timeout=240_000)
    lines = score.input_value()
    assert "wrote Click Song_beatgen.zip: Hard, Expert, ExpertPlus over" in lines, lines    # by rank; no server paths
    assert lines.count("parity errors 0 red / 0 blue, vision blocks 0, impossible doubles 0") == 3, lines
    assert page.locator("#preview img").count() == 1
    clicks = page.locator("#clicks").inner_html()           # the player's source: the click track file
    assert "_clicks.wav" in clicks, clicks[-2000:]
    page.screenshot(path=str(tmp_path / "page.png"), full_page=True)
    if os.environ.get("BEATGEN_SCREENSHOT"):
        shutil.copy(tmp_path / "page.png", os.environ["BEATGEN_SCREENSHOT"])
    with page.expect_download() as download:
        page.locator("#map a").first.click()
    zip_path = tmp_path / "map.zip"
    download.value.save_as(zip_path)
    # the checks the command's output gets: read back, every difficulty listed, playable
    import utils
    from maps import read_map
    beatmap = read_map(zip_path)
    assert beatmap.bpm == 120 and sorted(beatmap.difficulties) == [("Standard", name) for name in
                                                                     ("Expert", "ExpertPlus", "Hard")]
    for difficulty in beatmap.difficulties.values():
        stats = utils.map_stats(difficulty.notes, beatmap.bpm)
        assert (stats["parity_errors_red"], stats["parity_errors_blue"], stats["vision_blocks"],
                stats["impossible_doubles"]) == (0, 0, 0, 0)
    page.close()


def test_page_says_what_is_wrong_and_keeps_serving(server, browser, tmp_path):
    url, _ = server
    fake = tmp_path / "not a song.mp3"
    fake.write_text("this is text, not audio")
    page = browser.new_page()
    page.goto(url)
    page.locator("#song input[type=file]").set_input_files(str(fake))
    page.locator("#generate").click()
    page.get_by_text("cannot decode audio").first.wait_for(timeout=120_000)
    page.close()
    assert urllib.request.urlopen(url, timeout=10).status == 200          # still serving
