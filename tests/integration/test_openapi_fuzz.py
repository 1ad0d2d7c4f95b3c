"""The gateway's OpenAPI document fuzzed with schemathesis against a running platform: a
fixed seed and bounded cases, every route but the event stream, with an admin key. Every
answer is declared by the document (status, content type, body schema), none is a 5xx,
schema-invalid input is refused, routes refuse requests without a key, and an undeclared
method is a 405 naming the allowed ones.

Not checked: ``positive_data_acceptance`` (that schema-valid input is accepted), since
the server refuses some schema-valid bodies on purpose, by rules a JSON Schema does not
state (one of ``model.builtin``/``path``/``upload``, an expiry in the past, an input that
is not the function's). ``GET /v1/events`` is left out because a stream never ends (the
fuzzer would wait out its timeout on each); ``test_events.py`` covers its parameters.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.integration.conftest import DEMO_BODY, PlatformFactory

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SEED = 16
MAX_EXAMPLES = 75  # per operation in the fuzzing phase (coverage and stateful add more)
FUZZ_TIMEOUT_S = 150.0


def schemathesis_argv(url: str, key: str, report: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/openapi.json",
        "--header",
        f"Authorization: Bearer {key}",
        "--seed",
        str(SEED),
        "--max-examples",
        str(MAX_EXAMPLES),
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--exclude-path",
        "/v1/events",
        "--workers",
        "1",  # one ordered run: the seed then fixes the cases
        "--continue-on-failure",
        "--generation-database",
        "none",
        "--request-timeout",
        "30",
        "--report",
        "json",
        "--report-json-path",
        str(report),
        "--no-color",
    ]


@pytest.mark.timeout(FUZZ_TIMEOUT_S + 60)
async def test_openapi_fuzz_finds_no_server_error_and_no_schema_violation(
    platform_factory: PlatformFactory, tmp_path: Path
) -> None:
    p = await platform_factory()
    assert (await p.client.post("/v1/functions", json=DEMO_BODY)).status == 201
    url = str(p.client.make_url("")).rstrip("/")
    report = tmp_path / "schemathesis.json"
    proc = await asyncio.create_subprocess_exec(
        *schemathesis_argv(url, p.api_key, report),
        cwd=tmp_path,  # its own files (.schemathesis/) stay out of the checkout
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    try:
        output, _ = await asyncio.wait_for(proc.communicate(), FUZZ_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    text = output.decode(errors="replace")
    assert report.exists(), text[-5000:]
    run: dict[str, Any] = json.loads(report.read_text())
    cases = run["test_cases"]
    phases = {name: ph["status"] for name, ph in run["phases"].items()}
    print(
        f"\nschemathesis {run['schemathesis_version']}, seed {run['seed']}: "
        f"{run['operations']['tested']} operations, {cases['generated']} cases in "
        f"{run['running_time']:.1f} s; phases {phases}; failures {run['failures']}; "
        f"errors {run['errors']}"
    )
    assert run["complete"], text[-5000:]
    assert run["failures"] == [], text[-8000:]
    assert run["errors"] == [], text[-8000:]
    assert cases["generated"] >= 1000, cases  # the bound, not a run cut short
    assert run["operations"]["errored"] == 0, run["operations"]
    assert proc.returncode == 0, text[-5000:]
