"""Request/reply over NATS with typed messages and typed errors.

A request either returns the decoded reply or raises a :class:`PlatformError`:
errors travel back as headers (code, message) plus an ``ErrorReply`` body, no
responders become ``Unavailable`` and a timeout ``DeadlineExceeded``.
"""

from __future__ import annotations

import nats.errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg as NatsMsg

from gpufaas.shared import constants as c
from gpufaas.shared.errors import (
    DeadlineExceeded,
    PlatformError,
    Unavailable,
    from_code,
)
from gpufaas.shared.messages import ErrorReply, M, Msg, decode, encode


async def request(
    nc: NATS,
    subject: str,
    msg: Msg,
    reply_type: type[M],
    *,
    timeout: float,
    request_id: str | None = None,
    what: str | None = None,
) -> M:
    """Send ``msg`` and return the typed reply, or raise the typed error it carried."""
    headers = {c.HDR_REQUEST_ID: request_id} if request_id else None
    target = what or subject
    try:
        resp = await nc.request(subject, encode(msg), timeout=timeout, headers=headers)
    except nats.errors.NoRespondersError:
        raise Unavailable(f"no {target} is running to answer") from None
    except nats.errors.TimeoutError:
        raise DeadlineExceeded(f"{target} did not answer within {timeout:g} s") from None
    except (nats.errors.ConnectionClosedError, nats.errors.ConnectionDrainingError):
        raise Unavailable("the NATS connection is closed") from None
    return decode_reply(resp, reply_type)


def decode_reply(resp: NatsMsg, reply_type: type[M]) -> M:
    """Raise the error a reply carries, or decode it as ``reply_type``."""
    if resp.headers and c.HDR_ERROR_CODE in resp.headers:
        err = decode(resp.data, ErrorReply)
        raise from_code(err.code, err.message, err.field, err.retry_after_s)
    return decode(resp.data, reply_type)


def error_reply(error: PlatformError) -> tuple[bytes, dict[str, str]]:
    """Body and headers of an error reply."""
    body = encode(
        ErrorReply(
            code=error.code,
            message=error.message,
            field=error.field,
            retry_after_s=error.retry_after_s,
        )
    )
    headers = {c.HDR_ERROR_CODE: error.code, c.HDR_ERROR_MESSAGE: error.message[:256]}
    return body, headers
