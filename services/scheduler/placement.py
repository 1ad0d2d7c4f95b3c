"""Where a function's instance goes: a GPU of a node, locality first (GPU-enabled FaaS,
Tetris, FaaSTube).

Every GPU of every live node is a candidate (a node without GPUs is one candidate). Prefer
the GPU that already has a warm instance of the function; else a GPU whose model cache
holds the whole model (the memory manager's published cache: an instance there starts
without a host-to-GPU copy); else the node where the largest share of the model's tensors
is already resident (θ, from the tensor store), so a new instance starts without loading
weights; then, among GPUs not crowded (within a slack of the least loaded), the GPU
holding the request's input tubes, then an NVLink neighbour of it (the fastest link
first), then another device of their node (no copy between nodes); then the least loaded
GPU, then the least loaded node; among those with room for the model. Pure: the scheduler gathers the facts, this orders them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from gpufaas.shared.errors import Unavailable
from gpufaas.shared.identity import gpu_number

# How close a candidate is to the request's input tubes (lower is closer).
ON_INPUT_GPU: Final = 0  # the GPU that holds them: no copy at all
NEIGHBOUR: Final = 1  # a GPU linked to theirs directly (NVLink): one peer copy
SAME_NODE: Final = 2  # another device of their node: through the host, no network
FAR: Final = 3  # another node, or no inputs to be near
# Nearness to the inputs wins among GPUs at most this many instances above the least
# loaded one with room; a GPU more crowded comes after every such GPU (locality under a
# load bound, as consistent hashing with bounded loads: no GPU takes every step of every
# workflow whose data it holds).
LOAD_SLACK: Final = 1


@dataclass(frozen=True, slots=True)
class NodeView:
    """What the scheduler knows of one candidate for one function: a GPU of a live node
    (``gpu``), or a node without GPUs (``gpu`` None)."""

    node: str
    warm: bool  # an instance of the function is loaded there
    theta: float  # resident bytes of the model on the node / model bytes, 0..1
    bytes_to_load: int  # model bytes the GPU lacks (the node's, for a node without GPUs)
    functions: int  # instances placed on this GPU (the load)
    free_bytes: int | None  # room on the GPU; None when unknown (no GPU, or not reported)
    near: int = FAR  # how close to the request's input tubes (ON_INPUT_GPU .. FAR)
    on_gpu: bool = False  # the whole model is on this GPU (its model cache)
    gpu: str | None = None  # "gpu:N"; None on a node without GPUs
    link_gbps: float = 0.0  # a NEIGHBOUR's link bandwidth from the inputs' GPU
    node_functions: int = 0  # instances placed on the node, all its GPUs together


def choose(views: Sequence[NodeView]) -> NodeView:
    """The candidate to place on: warm, then the model on that GPU, then highest θ, then,
    among GPUs not crowded (at most ``LOAD_SLACK`` instances above the least loaded), the
    nearest to the request's input tubes (the GPU holding them, then its fastest NVLink
    neighbour, then another device of their node), then the least loaded GPU, then the
    least loaded node; crowded GPUs after all of those; among those with room.

    Nearness is bounded by load: an NVLink copy costs about a millisecond, queueing behind
    other functions' batches on a busy GPU tens, so a consumer step goes to its producer's
    GPU or a neighbour unless they are crowded (``bench/workflow_placement.py``).

    Free bytes count what is in use, idle copies included, which the node's tensor store
    can evict: when no GPU has room by that count, every one is a candidate, and the
    chosen node's store makes room or answers 507. Raises ``Unavailable`` with none.
    """
    if not views:
        raise Unavailable("no node with a worker is up")
    fits = [v for v in views if v.free_bytes is None or v.free_bytes >= v.bytes_to_load] or views
    least = min(v.functions for v in fits)

    def crowded(v: NodeView) -> bool:
        return v.functions > least + LOAD_SLACK

    return min(
        fits,
        key=lambda v: (
            not v.warm,
            not v.on_gpu,
            -round(v.theta, 6),
            crowded(v),
            v.near,
            -v.link_gbps,
            v.functions,
            v.node_functions,
            v.node,
            gpu_number(v.gpu),
        ),
    )


def nearness(
    node: str,
    gpu: str | None,
    inputs: tuple[str, str] | None,
    links: dict[tuple[str, str], float],
) -> tuple[int, float]:
    """How close ``gpu`` of ``node`` is to inputs on ``inputs`` = (node, tier), and the
    bandwidth of the link between their GPUs when they are neighbours; ``links`` maps a
    pair of ``node``'s GPUs (both orders) to its GB/s."""
    if inputs is None or inputs[0] != node:
        return FAR, 0.0
    tier = inputs[1]
    if gpu is not None and tier == gpu:
        return ON_INPUT_GPU, 0.0
    gbps = links.get((tier, gpu), 0.0) if gpu is not None else 0.0
    if gbps > 0:
        return NEIGHBOUR, gbps
    return SAME_NODE, 0.0


def bring_to_inputs(paid_s: float, next_copy_s: float, cold_start_s: float) -> bool:
    """Whether a workflow step's function should get an instance on the node that holds
    its input tubes rather than copy them to an instance elsewhere: once the copies paid
    so far for that node, with the next one, cost as much as a cold start there (rent
    until the price of buying: never more than twice the better of the two choices)."""
    return paid_s + next_copy_s >= cold_start_s
