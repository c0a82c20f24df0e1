"""Take the README's screenshot of the playground: a real server on the
bundled model, headless chromium, a prompt, the slider at +8, both columns
streamed.

    python scripts/playground_screenshot.py [-o docs/playground.png]
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def main() -> int:
    import llama_steer as ls
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
    from server_util import running_server

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-o", "--output", default=str(ROOT / "docs" / "playground.png"))
    ap.add_argument("--prompt", default="How was your weekend?")
    args = ap.parse_args()
    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not (chromium and driver_path):
        print("needs chromium and chromedriver (apt-get install chromium chromium-driver)", file=sys.stderr)
        return 2
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1150,620"):
        opts.add_argument(arg)
    m = ls.Model(ls.default_model_path(), n_ctx=2048, n_seq_max=2)
    happy = ls.extract(m, ls.persona_pairs(m, "happy"), progress=False)
    with m, running_server(m, {"happy": happy}, n_parallel=2) as url:
        driver = webdriver.Chrome(service=Service(driver_path), options=opts)
        try:
            driver.get(url + "/")
            wait = WebDriverWait(driver, 120)
            wait.until(lambda d: d.find_element(By.ID, "vector").get_attribute("value"))
            box = driver.find_element(By.ID, "prompt")
            box.clear()
            box.send_keys(args.prompt)
            for _ in range(8):
                driver.find_element(By.ID, "strength").send_keys(Keys.ARROW_RIGHT)
            driver.find_element(By.ID, "layers").send_keys("8-21")
            n = driver.find_element(By.ID, "max-tokens")
            n.clear()
            n.send_keys("64")
            driver.find_element(By.ID, "go").click()
            wait.until(lambda d: d.find_element(By.ID, "go").is_enabled() and d.find_element(By.ID, "plain").text)
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            driver.save_screenshot(args.output)
        finally:
            driver.quit()
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
