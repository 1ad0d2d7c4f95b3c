"""Debian's chromium, headless, driven by selenium through chromedriver: the console's
browser tests and ``scripts/console_screenshots.py`` open pages with it.

Nothing is downloaded: selenium is pointed at the executables the ``chromium`` and
``chromium-driver`` packages install, never at its own browser manager.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Final

CHROMIUM: Final = Path("/usr/bin/chromium")
CHROMEDRIVER: Final = Path("/usr/bin/chromedriver")
WIDTH: Final = 1280
HEIGHT: Final = 800
MISSING: Final = (
    "the console's browser tests need Debian's chromium and chromedriver "
    "(apt-get install chromium chromium-driver) and selenium (the dev extra)"
)


def missing() -> str | None:
    """Why a browser cannot be driven here, or None when it can."""
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        return MISSING
    try:
        import selenium  # noqa: F401, PLC0415 - optional: the dev extra
    except ImportError:
        return MISSING
    return None


@contextmanager
def chromium() -> Iterator[Any]:
    """A headless chromium whose viewport is 1280x800 and whose console messages
    ``driver.get_log("browser")`` returns."""
    from selenium import webdriver  # noqa: PLC0415 - optional: the dev extra
    from selenium.webdriver.chrome.service import Service  # noqa: PLC0415

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests may run as root (CI containers): chromium refuses its sandbox
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--no-first-run",
        "--disable-extensions",
        f"--window-size={WIDTH},{HEIGHT}",
    ):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(str(CHROMEDRIVER)))
    try:
        # The viewport itself 1280x800 (a window's frame would take some of it).
        driver.execute_cdp_cmd(
            "Emulation.setDeviceMetricsOverride",
            {"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": False},
        )
        driver.set_page_load_timeout(30)
        yield driver
    finally:
        driver.quit()


PAGES = {  # page: an element that holds its data once it has loaded
    "overview": "#overview .node table",
    "topology": "#topology svg.topo .topo-link",
    "functions": "#functions-table tbody tr",
    "workflows": "#workflows svg.dag .dag-step",
    "events": "#events-body tr",
    "breakdown": "#breakdown-chart rect",
}


def wait_for(what: str, predicate: Callable[[], Any], timeout: float = 20.0) -> Any:
    """Poll ``predicate`` until it returns something true (and return it), or raise
    ``TimeoutError`` naming ``what`` and the last value."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}: {result!r}")
        time.sleep(0.05)


def sign_in(driver: Any, url: str, key: str, *, load: bool = True) -> None:
    """Open the console at ``url`` (unless ``load`` is false: the form is shown already)
    and sign in with ``key`` through its form."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    if load:
        driver.get(f"{url}/console")
    field = wait_for("the sign-in form", lambda: driver.find_elements(By.ID, "api-key"))[0]
    field.send_keys(key)
    driver.find_element(By.ID, "sign-in").click()
    wait_for("the pages' navigation", lambda: driver.find_element(By.ID, "nav").is_displayed())


def open_page(driver: Any, page: str, ready_css: str, timeout: float = 20.0) -> Any:
    """Go to ``#/page`` and wait for an element ``ready_css`` (data on the page)."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    driver.execute_script("location.hash = arguments[0]", f"#/{page}")
    return wait_for(
        f"{ready_css} on #/{page}",
        lambda: driver.find_elements(By.CSS_SELECTOR, ready_css),
        timeout,
    )[0]
