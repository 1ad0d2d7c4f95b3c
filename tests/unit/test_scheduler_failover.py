"""The takeover decision for a dead replica's inflight records, without NATS."""

from __future__ import annotations

import pytest

from gpufaas.scheduler.failover import (
    INFLIGHT,
    Claim,
    claim_decision,
    gone_for_good,
    token,
)
from gpufaas.shared.messages import InflightRecord, InvokeRequest
from gpufaas.shared.workflows import WorkflowInflightRecord, WorkflowInvokeRequest

pytestmark = pytest.mark.unit


def record(deadline: float = 0.0) -> InflightRecord:
    req = InvokeRequest(function="f", request_id="r1", inputs=[], deadline=deadline)
    return InflightRecord(
        replica="node-a/1/2.5", reply_to="_INBOX.x", request=req, dispatch_id="d1", accepted_at=1.0
    )


def test_a_live_record_is_claimed() -> None:
    assert claim_decision("dead.d1", record(), 100.0, set()) is Claim.CLAIM
    assert claim_decision("dead.d1", record(deadline=200.0), 100.0, set()) is Claim.CLAIM


def test_one_already_adopted_stays_pending_without_a_read() -> None:
    assert claim_decision("dead.d1", None, 100.0, {"dead.d1"}) is Claim.ADOPTED


def test_an_answered_record_is_gone_and_an_expired_one_forgotten() -> None:
    assert claim_decision("dead.d1", None, 100.0, set()) is Claim.GONE
    assert claim_decision("dead.d1", record(deadline=50.0), 100.0, set()) is Claim.EXPIRED


def test_a_dead_replica_is_gone_for_good_once_nothing_is_pending_anywhere() -> None:
    assert gone_for_good("dead", 0, set())
    assert gone_for_good("dead", 0, {"other.d1"})
    assert not gone_for_good("dead", 1, set())
    assert not gone_for_good("dead", 0, {"dead.d1"})  # still being answered here


def test_records_of_both_kinds_decode_and_tokens_are_one_key_token() -> None:
    fn = record()
    wf = WorkflowInflightRecord(
        replica="r",
        reply_to="_INBOX.y",
        request=WorkflowInvokeRequest(workflow="w", request_id="r2", inputs=[]),
        dispatch_id="d2",
        accepted_at=1.0,
    )
    assert INFLIGHT.decode(INFLIGHT.encode(fn)) == fn
    assert INFLIGHT.decode(INFLIGHT.encode(wf)) == wf
    assert token("node-a/12/3.25") == "node-a-12-3-25"
