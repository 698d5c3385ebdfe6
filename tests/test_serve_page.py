"""The web page of ``queryshift serve``, driven in headless Chromium (Debian's chromium + chromium-driver)."""

from __future__ import annotations

import os
import shutil
import tempfile
import threading

import pytest

pytest.importorskip("uvicorn", reason="queryshift serve needs the 'serve' extra (fastapi, uvicorn, httpx)")
pytest.importorskip("selenium", reason="the page test needs selenium (the 'serve' extra)")

import uvicorn  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from queryshift.serve.app import create_app  # noqa: E402

from .serve_helpers import free_port, png_bytes, service  # noqa: E402
from .test_serve_av import av_service, mp4_bytes, wav_bytes  # noqa: E402, F401 - av_service is a fixture

os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never try to download a browser or driver
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(
    not (CHROMIUM and DRIVER),
    reason="headless browser test needs Debian's 'chromium' and 'chromium-driver' (make system-deps installs them "
           "where apt is available)")


def serve_in_thread(s):
    """Run the app of service ``s`` on a free port in a thread; yields its URL until the test ends."""
    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(create_app(s), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    for _ in range(600):  # bounded wait for the port to open
        if uv.started:
            break
        thread.join(0.1)
    assert uv.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}"
    uv.should_exit = True
    thread.join(30)


@pytest.fixture
def server(tmp_path):
    s = service(tmp_path, start_worker=True, micro_batch=2, adapt_batch=4, max_wait=0.0, max_update_rate=50.0)
    for url in serve_in_thread(s):
        yield s, url


@pytest.fixture
def av_server(av_service):  # noqa: F811 - the fixture imported above
    for url in serve_in_thread(av_service):
        yield av_service, url


@pytest.fixture
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    profile = tempfile.mkdtemp(prefix="queryshift-chromium-")
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1200,1000", f"--user-data-dir={profile}"):
        options.add_argument(arg)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=DRIVER))
    yield driver
    driver.quit()
    shutil.rmtree(profile, ignore_errors=True)


def wait(driver, condition, what):
    return WebDriverWait(driver, 60, poll_frequency=0.2).until(lambda d: condition(d), message=what)


def test_page_searches_uploads_toggles_and_plots(server, browser, tmp_path):
    s, url = server
    d = browser
    d.get(url + "/")
    wait(d, lambda d: "rest on shapes-clip" in d.find_element(By.ID, "info").text, "the server info")

    # a text query: a grid of gallery images with scores
    d.find_element(By.ID, "query").send_keys(s.dataset.texts[10])
    d.find_element(By.ID, "search-btn").click()
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results.grid .result img")) == 12, "12 image results")
    first = d.find_element(By.CSS_SELECTOR, "#results .result")
    assert first.get_attribute("data-id") == "2"  # text 10 describes image 2
    wait(d, lambda d: d.execute_script(
        "return document.querySelector('#results img').naturalWidth") > 0, "the gallery image to load")
    assert "source parameters" in d.find_element(By.ID, "status").text  # nothing adapted before it

    # an uploaded image: a list of captions with scores
    path = tmp_path / "query.png"
    path.write_bytes(png_bytes(s.dataset.load_image(4)))
    d.find_element(By.ID, "image-file").send_keys(str(path))
    wait(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#results.list .result")) == 12, "12 caption results")
    assert int(d.find_element(By.CSS_SELECTOR, "#results .result").get_attribute("data-id")) in s.dataset.img2txt[4]

    # the worker adapts (micro-batch 2); the stats and the live plot follow
    query = d.find_element(By.ID, "query")
    for i in range(3):
        query.clear()
        query.send_keys(s.dataset.texts[20 + i])
        d.find_element(By.ID, "search-btn").click()
    wait(d, lambda d: int(d.find_element(By.ID, "stat-updates").text) >= 1, "an update in the stats line")
    wait(d, lambda d: int(d.find_element(By.ID, "plot-uniformity").get_attribute("data-points") or 0) >= 1,
         "a point in the uniformity plot")
    wait(d, lambda d: s.answering.adapted["text"], "adapted text parameters")
    query.clear()
    query.send_keys(s.dataset.texts[10])
    d.find_element(By.ID, "search-btn").click()
    wait(d, lambda d: "adapted parameters" in d.find_element(By.ID, "status").text, "an adapted answer")

    # the adapt toggle off: the source parameters answer
    d.find_element(By.ID, "adapt").click()
    d.find_element(By.ID, "search-btn").click()
    wait(d, lambda d: "source parameters" in d.find_element(By.ID, "status").text, "a source answer")

    # every chart and the adapt box say what they show
    assert "collapse" in d.find_element(By.CSS_SELECTOR, "#plot-uniformity .help").text
    assert "source model answers" in d.find_element(By.ID, "adapt-help").text

    # the reset button: POST /reset puts every lane back to the source parameters
    assert s.answering.adapted["text"]
    d.find_element(By.ID, "reset-btn").click()
    wait(d, lambda d: "back to the source parameters" in d.find_element(By.ID, "status").text, "the reset message")
    assert s.manual_resets == 1 and not s.answering.adapted["text"]
    wait(d, lambda d: d.find_element(By.ID, "stat-manual-resets").text == "1", "the manual reset in the stats line")

    # bad input is shown, not swallowed
    query.clear()
    query.send_keys("!!! ...")
    d.find_element(By.ID, "search-btn").click()
    wait(d, lambda d: "error 422" in d.find_element(By.ID, "error").text, "the 422 message")
    d.save_screenshot(str(tmp_path / "page.png"))


def test_page_uploads_sounds_and_videos_to_their_lanes(av_server, browser, tmp_path):
    """With a video and an audio tower the file box takes sounds and videos: a WAV searches the gallery's clips
    and an MP4 its soundtracks, each through its own lane, the result names listed."""
    from queryshift.data.shapes_av import clip

    s, url = av_server
    d = browser
    d.get(url + "/")
    wait(d, lambda d: "audio queries" in d.find_element(By.ID, "info").text, "the server info")
    accept = d.find_element(By.ID, "image-file").get_attribute("accept")
    assert "audio/*" in accept and "video/*" in accept and "image/*" not in accept
    assert d.find_element(By.ID, "file-kinds").text == "a video or a sound"
    frames, audio, _ = clip("test", 3)
    (tmp_path / "q.wav").write_bytes(wav_bytes(audio))
    (tmp_path / "q.mp4").write_bytes(mp4_bytes(frames))
    for path, lane, gallery in (("q.wav", "audio", "video"), ("q.mp4", "video", "audio")):
        before = s.lanes[lane].queries
        d.find_element(By.ID, "image-file").send_keys(str(tmp_path / path))
        wait(d, lambda d, lane=lane, before=before: s.lanes[lane].queries == before + 1, f"a query on the {lane} lane")
        names = set(s.dataset.items[gallery])  # the answer is drawn after the request counted: wait for it

        def listed(d, names=names):
            shown = {r.text.split(" ", 1)[-1] for r in d.find_elements(By.CSS_SELECTOR, "#results.list .result")}
            return shown and shown <= names

        wait(d, listed, f"the {gallery} names listed")
        assert d.find_element(By.ID, "error").text == ""
