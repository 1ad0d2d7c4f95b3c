"""The web console in a real browser (Debian's headless chromium) against ``gpufaas up
--demo --devices sim:2``: every page loads without a console error and shows the
platform's data, the playground invokes the demo function, an invocation reaches the
live event list and the breakdown chart, a workflow is drawn as a DAG and invoked from
its playground, each node's links are drawn, the pages are reached by keyboard, and
nothing scrolls sideways at 1280x800."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from typing import Any

import pytest

from gpufaas.launch import Up
from tests.system import browser

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.slow,
    pytest.mark.skipif(browser.missing() is not None, reason=browser.MISSING),
]

PAGES = browser.PAGES


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    data = tmp_path_factory.mktemp("console") / "data"
    with Up.start(data, "--demo", "--devices", "sim:2") as running:
        running.wait_ready()
        post(running, "/v1/workflows", TWIN)
        yield running


@pytest.fixture(scope="module")
def driver(up: Up) -> Iterator[Any]:
    with browser.chromium() as d:
        key = up.api_key
        assert key is not None
        browser.sign_in(d, up.url, key)
        yield d


# Two steps of the demo function side by side on one input (a DAG of one function).
TWIN = {
    "name": "twin",
    "steps": [
        {"name": "left", "function": "minilm", "inputs": {"text": "$input.text"}},
        {"name": "right", "function": "minilm", "inputs": {"text": "$input.text"}},
    ],
    "outputs": {"left_embedding": "left.embedding", "right_embedding": "right.embedding"},
}


def post(up: Up, path: str, body: dict[str, Any]) -> Any:
    req = urllib.request.Request(
        f"{up.url}{path}",
        data=json.dumps(body).encode(),
        headers={**up.headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())


def invoke(up: Up, text: str) -> None:
    """One invocation of the demo function, outside the browser."""
    body = {"inputs": [{"name": "text", "datatype": "BYTES", "shape": [1], "data": [text]}]}
    req = urllib.request.Request(
        f"{up.url}/v2/models/minilm/infer",
        data=json.dumps(body).encode(),
        headers={**up.headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        assert resp.status == 200


def console_errors(driver: Any) -> list[dict[str, Any]]:
    """The browser's console messages of level SEVERE since the last call."""
    return [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def text_of(driver: Any, css: str) -> str:
    """The rendered text of the first element ``css`` matches ("" if none): read in one
    script, so a page redrawing meanwhile cannot leave a stale reference."""
    text = driver.execute_script(
        "return document.querySelector(arguments[0])?.innerText ?? ''", css
    )
    return str(text)


def no_sideways_scroll(driver: Any) -> bool:
    width, client = driver.execute_script(
        "const e = document.scrollingElement; return [e.scrollWidth, e.clientWidth]"
    )
    assert client == browser.WIDTH or client < browser.WIDTH  # a vertical scrollbar's width
    return bool(width <= client)


def test_playground_invoke_shows_an_embedding_and_its_breakdown(driver: Any) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    browser.open_page(driver, "functions", PAGES["functions"])
    assert "minilm" in text_of(driver, "#functions-table")
    browser.wait_for(
        "minilm among the playground's functions",
        lambda: "minilm" in text_of(driver, "#pg-function"),
    )
    text = driver.find_element(By.ID, "pg-text")
    text.clear()
    text.send_keys("a console in a real browser")
    driver.find_element(By.ID, "pg-invoke").click()
    browser.wait_for(
        "the playground's result", lambda: driver.find_elements(By.CSS_SELECTOR, ".output .shape")
    )
    assert text_of(driver, ".output .shape") == "[1, 384]"
    assert "compute" in text_of(driver, "#playground-breakdown")
    assert console_errors(driver) == []


def test_every_page_loads_with_data_and_no_console_error(driver: Any, up: Up) -> None:
    invoke(up, "for the breakdown chart")
    for page, ready in PAGES.items():
        browser.open_page(driver, page, ready)
        assert no_sideways_scroll(driver), page
        assert console_errors(driver) == [], page
        if page == "overview":  # the node and its simulated GPUs
            assert "node-0" in text_of(driver, "#overview")
            assert "gpu:1" in text_of(driver, "#overview")
        if page == "topology":  # sim:2 of dgx1-v100: two PCIe links and one NVLink
            assert "nvlink2" in text_of(driver, "#topology .topo-table")
            links = driver.execute_script(
                "return [...document.querySelectorAll('#topology [data-link]')]"
                ".map(e => e.dataset.link).sort()"
            )
            assert links == ["gpu:0-gpu:1", "host-gpu:0", "host-gpu:1"]


def box_of(driver: Any, node_id: str) -> dict[str, float]:
    """The on-page box of a DAG node (its ``data-id``)."""
    box = driver.execute_script(
        "const r = document.querySelector(`#workflows [data-id='${arguments[0]}'] rect`)"
        ".getBoundingClientRect(); return {x: r.x, y: r.y, w: r.width}",
        node_id,
    )
    return dict(box)


def test_a_workflow_is_drawn_as_a_dag_and_runs_from_its_playground(driver: Any) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    browser.open_page(driver, "workflows", PAGES["workflows"])
    ids = driver.execute_script(
        "return [...document.querySelectorAll('#workflows .dag-node')].map(e => e.dataset.id)"
    )
    assert sorted(ids) == sorted(
        ["in:text", "step:left", "step:right", "out:left_embedding", "out:right_embedding"]
    )
    edges = driver.execute_script(
        "return [...document.querySelectorAll('#workflows .dag-edge')]"
        ".map(e => `${e.dataset.from}>${e.dataset.to}`)"
    )
    assert sorted(edges) == sorted(
        [
            "in:text>step:left",
            "in:text>step:right",
            "step:left>out:left_embedding",
            "step:right>out:right_embedding",
        ]
    )
    # Columns left to right: the input, the two steps one above the other, the outputs.
    inp, left, right = (
        box_of(driver, "in:text"),
        box_of(driver, "step:left"),
        box_of(driver, "step:right"),
    )
    out = box_of(driver, "out:left_embedding")
    assert inp["x"] + inp["w"] < left["x"] == right["x"] < left["x"] + left["w"] < out["x"]
    assert left["y"] < right["y"]
    browser.wait_for("twin in the playground", lambda: "twin" in text_of(driver, "#wf-function"))
    text = driver.find_element(By.ID, "wf-in-text")
    text.clear()
    text.send_keys("a workflow in a browser")
    driver.find_element(By.ID, "wf-invoke").click()
    browser.wait_for("the workflow's steps", lambda: "right" in text_of(driver, "#wf-steps"))
    assert text_of(driver, "#wf-result .output .shape") == "[1, 384]"
    browser.wait_for(  # the run's time and device drawn on its step
        "the step's run on the DAG",
        lambda: (
            " on node-0/gpu:"
            in driver.execute_script(  # an SVG element has no innerText
                "return document.querySelector(\"#workflows [data-id='step:left']\").textContent"
            )
        ),
    )
    assert no_sideways_scroll(driver)
    assert console_errors(driver) == []


def test_an_invocation_appears_live_in_the_events(driver: Any, up: Up) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    browser.open_page(driver, "events", PAGES["events"])
    completed = 'tr[data-kind="invocation.completed"]'
    before = len(driver.find_elements(By.CSS_SELECTOR, completed))
    invoke(up, "live")
    browser.wait_for(
        "the new invocation.completed event in the list (no reload)",
        lambda: len(driver.find_elements(By.CSS_SELECTOR, completed)) > before,
    )
    Select = pytest.importorskip("selenium.webdriver.support.select").Select
    Select(driver.find_element(By.ID, "ev-kind")).select_by_value("invocation.completed")
    rows = driver.find_elements(By.CSS_SELECTOR, "#events-body tr")
    assert rows
    assert all(r.get_attribute("data-kind") == "invocation.completed" for r in rows)
    driver.find_element(By.ID, "ev-function").send_keys("no-such-function")
    browser.wait_for(
        "the function filter to hide every row",
        lambda: not driver.find_elements(By.CSS_SELECTOR, "#events-body tr"),
    )
    assert console_errors(driver) == []


def test_keyboard_reaches_the_pages(driver: Any) -> None:
    from selenium.webdriver.common.action_chains import ActionChains  # noqa: PLC0415
    from selenium.webdriver.common.keys import Keys  # noqa: PLC0415

    headings = {"topology": "Topology and transfers", "workflows": "Workflows", "events": "Events"}
    for page, heading in headings.items():
        browser.open_page(driver, "overview", PAGES["overview"])
        driver.execute_script("document.activeElement.blur(); window.focus()")
        for _ in range(10):  # Tab from the top of the page to the page's link
            ActionChains(driver).send_keys(Keys.TAB).perform()
            if driver.execute_script("return document.activeElement.dataset.page") == page:
                break
        else:
            pytest.fail(f"Tab never reached the {page} link")
        ActionChains(driver).send_keys(Keys.ENTER).perform()
        url = f"#/{page}"
        browser.wait_for(f"{url} after Enter", lambda: driver.current_url.endswith(url))  # noqa: B023 - called before the loop goes on
        browser.wait_for(f"the {page} page", lambda: text_of(driver, "main h2") == heading)  # noqa: B023
    # On the workflows page, Tab reaches the playground's controls in order.
    browser.open_page(driver, "workflows", PAGES["workflows"])
    reached = []
    for _ in range(40):
        ActionChains(driver).send_keys(Keys.TAB).perform()
        reached.append(driver.execute_script("return document.activeElement.id"))
        if reached[-1] == "wf-invoke":
            break
    assert [i for i in reached if i.startswith("wf-")] == ["wf-function", "wf-in-text", "wf-invoke"]
    assert console_errors(driver) == []


def test_a_tenant_key_sees_only_its_own_functions(driver: Any, up: Up) -> None:
    from selenium.webdriver.common.by import By  # noqa: PLC0415

    req = urllib.request.Request(
        f"{up.url}/v1/keys",
        data=json.dumps({"tenant": "acme", "admin": False, "label": "console test"}).encode(),
        headers={**up.headers, "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        tenant_key = json.loads(resp.read())["key"]
    admin_key = up.api_key
    assert admin_key is not None
    try:
        driver.find_element(By.ID, "signout").click()
        browser.wait_for("the sign-in form", lambda: driver.find_elements(By.ID, "api-key"))
        driver.find_element(By.ID, "api-key").send_keys("not-a-key")
        driver.find_element(By.ID, "sign-in").click()
        browser.wait_for("a refused key", lambda: text_of(driver, "#login-error"))
        assert "not valid" in text_of(driver, "#login-error")
        driver.get_log("browser")  # the 401 the browser logs is this refusal
        driver.find_element(By.ID, "api-key").clear()
        browser.sign_in(driver, up.url, tenant_key, load=False)  # the same page, no reload
        browser.open_page(driver, "functions", "#functions")
        browser.wait_for(
            "the tenant's (empty) list", lambda: "No functions" in text_of(driver, "#functions")
        )
        assert "minilm" not in text_of(driver, "main")
        browser.open_page(driver, "events", "#ev-kind")  # not the admin's events either
        browser.wait_for("the tenant's event stream", lambda: "live" in text_of(driver, "#live"))
        assert "minilm" not in text_of(driver, "#events-table")
        browser.open_page(driver, "overview", PAGES["overview"])  # the platform's nodes
        assert console_errors(driver) == []
    finally:
        driver.find_element(By.ID, "signout").click()
        browser.sign_in(driver, up.url, admin_key)
