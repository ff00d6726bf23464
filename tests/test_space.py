"""The Spaces demo (examples/space/app.py), served by its own process and driven in headless Chromium.

A real round trip through the page: ship a real conversation's cache with the real model, download the payload the
page offers, upload it again to continue from it, then upload a damaged copy and a payload meant for other
artifacts and read the typed errors the page shows. Needs `bash scripts/setup.sh --space` (gradio, playwright's
Python driver, Debian's chromium); CI runs it.
"""

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from conftest import REPO

from hf_scd.payload import MAGIC

pytest.importorskip("gradio")
playwright = pytest.importorskip("playwright.sync_api")
CHROMIUM = shutil.which("chromium")
if CHROMIUM is None:
    pytest.skip("no chromium on PATH: bash scripts/setup.sh --space installs it", allow_module_level=True)

pytestmark = pytest.mark.slow
# Chromium as this machine runs it: headless, no sandbox as root, and no background calls to a network it lacks.
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
ANSWER = 180_000  # ms: the first request loads the models


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = os.environ | {"GRADIO_ANALYTICS_ENABLED": "False", "TMPDIR": str(tmp_path_factory.mktemp("space"))}
    log = tmp_path_factory.mktemp("log") / "app.log"
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "examples/space/app.py", "--port", str(port)],
            cwd=REPO,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}/"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5):
                break
        except OSError:
            if process.poll() is not None or time.monotonic() > deadline:
                process.kill()
                pytest.fail(f"the demo did not serve {url}:\n{log.read_text()[-3000:]}")
            time.sleep(1)
    yield url
    process.terminate()
    process.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1400})
        page.goto(server)
        yield page
        browser.close()


def _answer(page, element: str) -> str:
    selector = f"#{element} textarea"
    page.wait_for_function(f"document.querySelector({selector!r})?.value.length > 0", timeout=ANSWER)
    return page.input_value(selector)


def _upload(page, path) -> None:
    """Upload `path` in the second tab, in place of the file there if any."""
    clear = page.locator("#resume-upload button[aria-label='Clear']")
    if clear.count():
        clear.click()
    page.locator("#resume-upload input[type=file]").set_input_files(str(path))
    page.locator("#resume-upload", has_text=path.stem).wait_for()


def _refusal(page, error: str) -> str:
    """Continue, and wait for the page to show the library's typed error in place of the results."""
    page.get_by_role("button", name="Continue").click()
    page.locator("#resume-stats", has_text=error).wait_for(timeout=ANSWER)
    assert page.input_value("#resume-scd textarea") == page.input_value("#resume-oracle textarea") == ""
    return page.inner_text("#resume-stats")


def test_ship_download_and_continue_in_a_browser(page, tmp_path):
    page.get_by_role("button", name="Ship the cache").click()
    scd, oracle = _answer(page, "ship-scd"), _answer(page, "ship-oracle")
    stats = page.inner_text("#ship-stats")
    page.screenshot(path=tmp_path / "ship.png", full_page=True)
    ratio = float(re.search(r"([\d.]+)x smaller than BF16 KV", stats).group(1))
    # The default 8x point on a short conversation: everything in the payload counted, the 4 exact sink tokens too.
    assert 5.5 < ratio < 8.0, stats
    # A real model reading a real passage: both answers name the country the passage says holds most of the forest.
    assert "Brazil" in scd and "Brazil" in oracle, (scd, oracle)

    with page.expect_download() as download:
        page.locator("#ship-payload a[download]").click()
    payload = tmp_path / "conversation.scd"
    download.value.save_as(payload)
    blob = payload.read_bytes()
    assert blob.startswith(MAGIC) and len(blob) > 100_000

    page.get_by_role("tab", name="Continue from a payload").click()
    _upload(page, payload)
    page.get_by_role("button", name="Continue").click()
    # The same payload and the same consumer settings give the same greedy answer as the ship tab's.
    assert _answer(page, "resume-scd") == scd
    assert _answer(page, "resume-oracle") == oracle

    truncated = tmp_path / "truncated.scd"
    truncated.write_bytes(blob[: len(blob) // 2])
    _upload(page, truncated)
    assert "it was cut short" in _refusal(page, "TruncatedPayloadError")

    _upload(page, payload)
    page.locator("#resume-route input").fill("fine-tuned")
    page.get_by_role("option", name=re.compile("fine-tuned")).click()
    assert "load the same artifacts on both sides" in _refusal(page, "ArtifactMismatchError")
    page.screenshot(path=tmp_path / "refused.png", full_page=True)
