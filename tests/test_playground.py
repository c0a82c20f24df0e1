"""The playground page in a real headless browser (Debian's chromium driven
by Selenium): type a prompt, move the slider, see both columns fill, and
the steered column differ from the unsteered one."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import llama_steer as ls
import pytest
from conftest import N_THREADS
from server_util import running_server

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
DRIVER = shutil.which("chromedriver")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not (CHROMIUM and DRIVER):
        if os.environ.get("CI"):  # CI installs them (.ci/run): a skip there would hide a broken page
            pytest.fail("chromium and chromedriver are needed (apt-get install chromium chromium-driver)")
        pytest.skip("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    try:
        yield driver
    finally:
        driver.quit()


def test_playground_streams_both_columns(browser, f32_path: Path) -> None:  # type: ignore[no-untyped-def]
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import Select, WebDriverWait

    # full precision: the page's greedy replies equal the library's exactly (tests/test_batching.py)
    m = ls.Model(f32_path, n_ctx=1024, n_threads=N_THREADS, n_seq_max=2, kv_cache="f32")
    happy = ls.extract(m, ls.persona_pairs(m, "happy")[:60], progress=False)
    with m:
        with running_server(m, {"happy": happy}, n_parallel=2) as url:
            browser.get(url + "/")
            wait = WebDriverWait(browser, 60)
            wait.until(lambda d: len(Select(d.find_element(By.ID, "vector")).options) == 1)
            prompt = browser.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("How was your day?")
            slider = browser.find_element(By.ID, "strength")
            for _ in range(8):  # 4 -> 8 in steps of 0.5, as a user's arrow keys would
                slider.send_keys(Keys.ARROW_RIGHT)
            assert browser.find_element(By.ID, "strength-value").text == "8"
            layers = browser.find_element(By.ID, "layers")
            layers.send_keys("8-21")
            max_tokens = browser.find_element(By.ID, "max-tokens")
            max_tokens.clear()
            max_tokens.send_keys("24")
            browser.find_element(By.ID, "go").click()
            wait.until(lambda d: d.find_element(By.ID, "go").is_enabled() and d.find_element(By.ID, "plain").text)
            plain = browser.find_element(By.ID, "plain").text
            steered = browser.find_element(By.ID, "steered").text
            assert browser.find_element(By.ID, "status").text == ""
            assert browser.find_element(By.ID, "steered-title").text == "steered: happy at 8"
        # the page asks for greedy replies: the library's own, modulo whitespace at the ends
        question = m.apply_chat_template([{"role": "user", "content": "How was your day?"}])
        assert plain == m.complete(question, max_tokens=24, temperature=0).strip()
        alone = m.complete(question, max_tokens=24, temperature=0, steer=ls.Steer(happy, 8.0, layers=range(8, 22)))
        assert steered == alone.strip() != plain
