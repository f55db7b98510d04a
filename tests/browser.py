"""Headless Chromium (Debian's chromium + chromium-driver) driven by Selenium, for checking the
MLflow UI the way a user sees it."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"  # screenshots kept after the run


@contextlib.contextmanager
def chromium():
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1600,1000"):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def page_text(driver, url: str, expected: list[str], screenshot: str, timeout: float = 60) -> str:
    """Open `url`, wait until every expected string is shown, keep a screenshot; returns the text."""
    driver.get(url)
    deadline = time.monotonic() + timeout
    while True:
        text = driver.find_element("tag name", "body").text
        missing = [item for item in expected if item not in text]
        if not missing or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    ARTIFACTS.mkdir(exist_ok=True)
    driver.save_screenshot(str(ARTIFACTS / screenshot))
    assert not missing, f"{url} does not show {missing} (screenshot: test-artifacts/{screenshot})"
    return text
