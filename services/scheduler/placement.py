"""Where a function's instance goes: locality first (GPU-enabled FaaS, Tetris).

Prefer a node that already has a warm instance of the function; else a node where the
whole model is on a GPU (the memory manager's published model cache: an instance there
starts without a host-to-GPU copy); else the node where the largest share of the model's
tensors is already resident (θ, from the tensor store), so a new instance starts without
loading weights; else the least loaded node that has room for what is left to load.
Pure: the scheduler gathers the facts, this orders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpufaas.shared.errors import Unavailable


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the scheduler knows of one live node for one function."""

    node: str
    warm: bool  # an instance of the function is loaded there
    theta: float  # resident bytes of the model / model bytes, 0..1
    bytes_to_load: int  # model bytes not yet resident there
    functions: int  # instances placed there (the load)
    free_bytes: int | None  # room on its GPU; None when unknown (no GPU, or not reported)
    near: bool = False  # it holds the request's input tubes (no copy between nodes)
    on_gpu: bool = False  # the whole model is on one of its GPUs (the model cache)


def choose(views: Sequence[NodeView]) -> str:
    """The node to place on: warm, then the model on a GPU, then highest θ, then where the
    inputs are (a tie on θ
    goes to the node holding the request's input tubes: on it they need no copy), then
    least loaded, among those with room.

    Free bytes count what is in use, idle copies included, which the node's tensor store
    can evict: when no node has room by that count, every node is a candidate, and the
    chosen node's store makes room or answers 507. Raises ``Unavailable`` with no nodes.
    """
    if not views:
        raise Unavailable("no node with a worker is up")
    fits = [v for v in views if v.free_bytes is None or v.free_bytes >= v.bytes_to_load]
    return min(
        fits or views,
        key=lambda v: (
            not v.warm,
            not v.on_gpu,
            -round(v.theta, 6),
            not v.near,
            v.functions,
            v.node,
        ),
    ).node


def bring_to_inputs(paid_s: float, next_copy_s: float, cold_start_s: float) -> bool:
    """Whether a workflow step's function should get an instance on the node that holds
    its input tubes rather than copy them to an instance elsewhere: once the copies paid
    so far for that node, with the next one, cost as much as a cold start there (rent
    until the price of buying: never more than twice the better of the two choices)."""
    return paid_s + next_copy_s >= cold_start_s
