"""A workflow step's function brought to its inputs' node by cost (rent, then buy)."""

from __future__ import annotations

from typing import Any, cast

import pytest

from gpufaas.scheduler.placement import bring_to_inputs
from gpufaas.scheduler.workflow_locality import InputLocality, bytes_away
from gpufaas.shared import constants as c
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import Breakdown, InvokeReply, Placement, TensorPayload, Tube
from gpufaas.shared.shm import new_id

pytestmark = pytest.mark.unit

REF = FunctionRef("t", "scorer")


def tube_on(node: str, nbytes: int) -> TensorPayload:
    tube = Tube(
        id=new_id(),
        tenant="t",
        datatype="FP32",
        shape=[nbytes // 4],
        nbytes=nbytes,
        placements=[Placement(node=node, tier="gpu:0", segment="gpu")],
    )
    return TensorPayload(name="x", datatype="FP32", shape=[nbytes // 4], tube=tube)


def inline(nbytes: int) -> TensorPayload:
    return TensorPayload(name="x", datatype="FP32", shape=[nbytes // 4], data=bytes(nbytes))


def reply(node: str, transfer_us: int, *, cold: bool = False, load_us: int = 0) -> InvokeReply:
    b = Breakdown(transfer_us=transfer_us, cold=cold, load_us=load_us)
    return InvokeReply(
        function="scorer", request_id="r", outputs=[], node=node, device="gpu:0", breakdown=b
    )


def test_copies_are_rented_until_they_cost_a_cold_start() -> None:
    assert not bring_to_inputs(0.0, 0.001, 0.25)
    assert not bring_to_inputs(0.2, 0.049, 0.25)
    assert bring_to_inputs(0.2, 0.05, 0.25)
    assert bring_to_inputs(0.0, 0.3, 0.25)  # one copy dearer than a cold start: at once


def test_only_tubes_held_nowhere_among_the_nodes_count() -> None:
    inputs = [tube_on("node-a", 4096), tube_on("node-b", 1024), inline(512)]
    assert bytes_away(inputs, ["node-b"]) == 4096
    assert bytes_away(inputs, ["node-a", "node-b"]) == 0
    assert bytes_away(inputs, []) == 5120


def test_a_reply_adds_the_copy_it_paid_and_learns_the_link_and_the_cold_start() -> None:
    loc = InputLocality(cast(Any, None), cast(Any, None))
    inputs = [tube_on("node-a", 10_000_000)]
    loc.observe(REF, inputs, reply("node-a", 5_000))  # ran where its input was: no copy
    assert loc.paid == {}
    loc.observe(REF, inputs, reply("node-b", 20_000))  # 10 MB in 20 ms: 500 MB/s
    assert loc.paid == {(REF.key, "node-a"): pytest.approx(0.02)}
    assert loc.link_bps == pytest.approx(0.8 * c.WORKFLOW_LINK_BYTES_PER_S + 0.2 * 500e6)
    loc.observe(REF, [inline(1536)], reply("node-b", 10))  # inline: nothing copied
    assert loc.paid == {(REF.key, "node-a"): pytest.approx(0.02)}
    loc.observe(REF, [], reply("node-b", 0, cold=True, load_us=80_000))
    assert loc.cold_s == {REF.key: pytest.approx(0.08)}
    loc.forget(REF)
    assert (loc.paid, loc.cold_s) == ({}, {})
