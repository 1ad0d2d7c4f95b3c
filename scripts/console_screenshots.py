"""Screenshots of the web console's pages, 1280x800, for the README.

    python scripts/console_screenshots.py [--out docs/img]

Starts ``gpufaas up --demo --devices sim:4`` on free ports with a temporary data directory,
deploys a workflow of two demo steps side by side and invokes the demo function a few
times (so the functions, workflows, events and breakdown pages have something to show),
opens each page in Debian's headless chromium (apt-get install
chromium chromium-driver) and writes ``console-<page>.png``.
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests.system.browser

from gpufaas.launch import Up
from tests.system import browser

PAGES = browser.PAGES
TEXTS = ["a serverless platform", "GPUs shared by functions", "tensors stored once"]
TWIN = {  # two steps of the demo function side by side: a DAG with the demo alone
    "name": "twin",
    "steps": [
        {"name": "left", "function": "minilm", "inputs": {"text": "$input.text"}},
        {"name": "right", "function": "minilm", "inputs": {"text": "$input.text"}},
    ],
    "outputs": {"left_embedding": "left.embedding", "right_embedding": "right.embedding"},
}
# The playgrounds' submit buttons and the element their result shows up in.
PLAYGROUNDS = {
    "functions": ("#pg-function option", "pg-invoke", ".output .shape"),
    "workflows": ("#wf-function option", "wf-invoke", "#wf-steps"),
}


def post(up: Up, path: str, body: Any) -> None:
    req = urllib.request.Request(
        f"{up.url}{path}",
        data=json.dumps(body).encode(),
        headers={**up.headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        resp.read()


def invoke(up: Up, texts: list[str]) -> None:
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [len(texts)], "data": texts}]}
    post(up, "/v2/models/minilm/infer", body)


def shoot(up: Up, out: Path) -> list[Path]:
    """Sign in, then one PNG per page (each playground run once)."""
    from selenium.webdriver.common.by import By  # noqa: PLC0415 - the dev extra

    key = up.api_key
    assert key is not None
    written = []
    with browser.chromium() as driver:
        browser.sign_in(driver, up.url, key)
        for page, ready in PAGES.items():
            browser.open_page(driver, page, ready, timeout=60)
            if page in PLAYGROUNDS:
                choices, button, result = PLAYGROUNDS[page]
                browser.wait_for(
                    "the playground's choices",
                    functools.partial(driver.find_elements, By.CSS_SELECTOR, choices),
                )
                driver.find_element(By.ID, button).click()
                browser.wait_for(
                    "the playground's result",
                    functools.partial(driver.find_elements, By.CSS_SELECTOR, result),
                    timeout=60,
                )
            path = out / f"console-{page}.png"
            driver.save_screenshot(str(path))
            written.append(path)
    return written


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("docs/img"))
    args = parser.parse_args()
    if (why := browser.missing()) is not None:
        sys.exit(why)
    args.out.mkdir(parents=True, exist_ok=True)
    with (
        tempfile.TemporaryDirectory() as tmp,
        Up.start(Path(tmp) / "data", "--demo", "--devices", "sim:4") as up,
    ):
        up.wait_ready()
        post(up, "/v1/workflows", TWIN)
        for i in range(len(TEXTS)):
            invoke(up, TEXTS[: i + 1])
        for path in shoot(up, args.out):
            print(path)


if __name__ == "__main__":
    main()
