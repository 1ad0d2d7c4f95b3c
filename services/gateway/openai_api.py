"""OpenAI-compatible ``POST /v1/embeddings``, so the ``openai`` SDK works with ``base_url``.

``model`` is a function's name; only an embedding function (one ``BYTES`` [N] text input,
one ``FP32`` [N, dim] output, as the demo's) answers. ``input`` (a string or a list of
them) goes as one request of ``len(input)`` rows, capped by the function's ``max_rows``;
``encoding_format`` is ``float`` or ``base64`` (the float32 little-endian bytes);
``dimensions``, if given, must be the model's. ``usage`` counts the tokens the model read
(``token_counts.py``; 0 when this gateway's node does not hold the model's tokenizer).
Errors leave in OpenAI's shape, ``{"error": {message, type, param, code}}``, with the
status of the platform's error table and the gateway's ``X-Request-ID``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from typing import Annotated, Any, Final, Literal

import msgspec
import numpy as np
import orjson
from aiohttp import web

from gpufaas.gateway import app as gw
from gpufaas.gateway.admission import admitted
from gpufaas.gateway.auth import Handler
from gpufaas.gateway.bodies import Body
from gpufaas.gateway.inference import Tensor, run_function
from gpufaas.gateway.openapi import ErrorShape, RouteDoc
from gpufaas.gateway.token_counts import TokenCounter
from gpufaas.shared.errors import Internal, InvalidArgument, PayloadTooLarge
from gpufaas.shared.messages import FunctionRecord, convert
from gpufaas.shared.tensors import encode_bytes_elements

TOKENS = web.AppKey("token_counter", TokenCounter)
FLOAT32_LE: Final = np.dtype("<f4")


class EmbeddingsBody(Body):
    """``POST /v1/embeddings`` (OpenAI's request; token-id arrays are not taken)."""

    model: str
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, msgspec.Meta(ge=1)] | None = None
    user: str | None = None  # accepted and ignored, as a hint for abuse monitoring


# --- errors in OpenAI's shape --------------------------------------------------------

OPENAI_ERROR_SCHEMA: Final[dict[str, Any]] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string", "description": "e.g. invalid_request_error"},
                "param": {"type": ["string", "null"], "description": "the field at fault"},
                "code": {"type": ["string", "null"], "description": "e.g. model_not_found"},
            },
        }
    },
}
# The gateway's field names where OpenAI's request calls them otherwise.
_PARAMS: Final = {"model_name": "model", "name": "model"}
# Our codes where OpenAI's clients know another (the openai SDK's exception classes go by
# the status; these are for people reading the body).
_CODES: Final = {
    "not_found": "model_not_found",
    "unauthenticated": "invalid_api_key",
    "overloaded": "rate_limit_exceeded",
}


def openai_error(body: dict[str, Any], status: int) -> dict[str, Any]:
    """The gateway's error body (``{code, error, field}``) in OpenAI's shape."""
    code = str(body.get("code", "internal"))
    field = body.get("field")
    param = None if field is None else _PARAMS.get(field, field)
    if param is not None and param.startswith("inputs"):
        param = "input"  # the one input tensor is OpenAI's ``input``
    if status >= 500:
        kind = "server_error"
    elif status == 429:
        kind = "requests"
    else:
        kind = "invalid_request_error"
    message = str(body.get("error", ""))
    return {
        "error": {"message": message, "type": kind, "param": param, "code": _CODES.get(code, code)}
    }


OPENAI_ERRORS: Final = ErrorShape("OpenAIError", OPENAI_ERROR_SCHEMA, openai_error)


# --- the endpoint --------------------------------------------------------------------


def embedding_io(record: FunctionRecord) -> tuple[str, str, int]:
    """An embedding function's input and output names and its width; 400 naming ``model``
    for any other function."""
    ins, outs = record.inputs, record.outputs
    if (
        len(ins) == 1
        and ins[0].datatype == "BYTES"
        and len(ins[0].shape) == 1
        and len(outs) == 1
        and outs[0].datatype == "FP32"
        and len(outs[0].shape) == 2
        and outs[0].shape[1] > 0
    ):
        return ins[0].name, outs[0].name, outs[0].shape[1]
    name = record.spec.name
    raise InvalidArgument(
        f"model {name!r} is not an embedding function (one BYTES [N] text input, one FP32 "
        f"[N, dim] output); call it with POST /v2/models/{name}/infer",
        field="model",
    )


def _texts(raw: Any) -> tuple[EmbeddingsBody, list[str]]:
    """The body and its texts; token-id arrays and an empty list are 400 naming ``input``."""
    given = raw.get("input") if isinstance(raw, dict) else None
    items = given if isinstance(given, list) else [given]
    if any(isinstance(x, int | list) and not isinstance(x, bool) for x in items):
        raise InvalidArgument(
            "token-id arrays are not supported as input; send a string or a list of strings",
            field="input",
        )
    body = convert(raw, EmbeddingsBody)
    texts = [body.input] if isinstance(body.input, str) else body.input
    if not texts:
        raise InvalidArgument("input must not be an empty list", field="input")
    return body, texts


def _encoded(texts: list[str]) -> bytes:
    try:
        return encode_bytes_elements([t.encode("utf-8") for t in texts])
    except UnicodeEncodeError:  # a lone surrogate escaped in the JSON
        raise InvalidArgument(
            "input holds a string that is not valid UTF-8", field="input"
        ) from None


async def embeddings(request: web.Request) -> web.Response:
    """``POST /v1/embeddings``: one invocation of the function for the whole list."""
    body, texts = _texts(await gw.read_json(request))
    record = await gw.require_function(request, body.model)
    text_in, out_name, dim = embedding_io(record)
    if body.dimensions is not None and body.dimensions != dim:
        raise InvalidArgument(
            f"model {body.model!r} makes {dim}-dimensional embeddings; dimensions cannot "
            f"change that (got {body.dimensions})",
            field="dimensions",
        )
    n, max_rows = len(texts), record.spec.options.max_rows
    if n > max_rows:
        raise PayloadTooLarge(
            f"input has {n} items; model {body.model!r} takes at most {max_rows} per "
            "request (its max_rows option)",
            field="input",
        )
    tensor = Tensor(text_in, "BYTES", [n], _encoded(texts))
    counting = asyncio.ensure_future(request.app[TOKENS].count(record.spec, texts))
    try:
        _, outs = await run_function(request, record, [tensor], [out_name])
    except BaseException:
        counting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await counting
        raise
    tokens = await counting or 0
    (out,) = outs
    if out.datatype != "FP32" or out.shape != [n, dim] or len(out.data) != n * dim * 4:
        raise Internal(
            f"model {body.model!r} answered {out.datatype} {out.shape}, not FP32 [{n}, {dim}]"
        )
    return _reply(body, record.spec.name, out, tokens)


def _reply(body: EmbeddingsBody, name: str, out: Tensor, tokens: int) -> web.Response:
    """OpenAI's reply: each row a JSON list of floats (float32 values, written as such) or
    its little-endian bytes in base64."""
    n, dim = out.shape
    row_bytes = dim * FLOAT32_LE.itemsize
    view = memoryview(out.data).cast("B")
    if body.encoding_format == "base64":
        rows: list[Any] = [
            base64.b64encode(view[i * row_bytes : (i + 1) * row_bytes]).decode("ascii")
            for i in range(n)
        ]
    else:
        matrix = (
            np.frombuffer(view, dtype=FLOAT32_LE).reshape(n, dim).astype(np.float32, copy=False)
        )
        rows = list(matrix)
    result = {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": row} for i, row in enumerate(rows)
        ],
        "model": name,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
    }
    return web.Response(
        body=orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY),
        content_type="application/json",
    )


ROUTES: list[tuple[RouteDoc, Handler]] = [
    (
        RouteDoc(
            "POST",
            "/v1/embeddings",
            "Embeddings, OpenAI-compatible (model = an embedding function's name)",
            EmbeddingsBody,
            errors=OPENAI_ERRORS,
        ),
        admitted(embeddings),
    ),
]
