"""What this replica tells others each tick: its load (to the autoscaling leader) and, per
node, its queue view (to that node's memory manager: what queued requests will touch)."""

from __future__ import annotations

import contextlib

import nats.errors

from gpufaas.scheduler.dispatch import Dispatcher
from gpufaas.scheduler.host import Host
from gpufaas.scheduler.leader import Leader
from gpufaas.scheduler.profiles import compute_s
from gpufaas.scheduler.queues import FunctionQueue
from gpufaas.shared import subjects
from gpufaas.shared.identity import FunctionRef
from gpufaas.shared.messages import (
    FunctionLoadReport,
    FunctionRecord,
    ProfileRecord,
    QueueEntry,
    QueueView,
    SchedulerLoad,
    encode,
)
from gpufaas.shared.registry import first_gpu

# Input tubes per function and node in a queue view: the first queued requests' (what the
# memory manager can bring to a GPU before they run), not the whole queue's.
VIEW_TUBES = 64


def memory_name(ref: FunctionRef) -> str:
    """A function as queue views, the workers' memory observations and ``memory.rejected``
    events name it: its one spelling, ``ref.key``."""
    return ref.key


def from_memory_name(name: str) -> FunctionRef:
    """The inverse of :func:`memory_name` (the older ``tenant/name`` accepted too, from a
    memory service that has not restarted since)."""
    return FunctionRef.parse(name.replace("/", ".", 1))


def queue_entries(
    fq: FunctionQueue, record: FunctionRecord, profile: ProfileRecord | None
) -> dict[str, QueueEntry]:
    """One function's entry in each of its nodes' views (queued requests will run on one
    of its instances)."""
    queued, per_request_s = fq.queued(), compute_s(profile)
    return {
        node: QueueEntry(
            memory_name(fq.ref),
            record.spec.model,
            queued,
            fq.in_flight.get(node, 0),
            fq.next_deadline(),
            per_request_s,
            fq.queued_tubes(node, VIEW_TUBES),
            device=first_gpu(record, node),
        )
        for node in record.nodes
    }


class LoadPublisher:
    """Each tick: this replica's load report and its queue views; idle queues are dropped."""

    def __init__(self, host: Host, dispatcher: Dispatcher, leader: Leader) -> None:
        self.host = host
        self.dispatcher = dispatcher
        self.leader = leader

    async def publish(self, now: float) -> None:
        reports = []
        views: dict[str, list[QueueEntry]] = {}
        queues = self.dispatcher.queues
        for key, fq in list(queues.items()):
            queued, in_flight = fq.queued(), sum(fq.in_flight.values())
            if not (fq.arrivals or queued or in_flight):
                del queues[key]
                continue
            reports.append(FunctionLoadReport(key, fq.arrivals, queued, in_flight))
            fq.arrivals = 0
            record = await self.dispatcher.cache.record(fq.ref)
            if record is None:
                continue
            profile = await self.dispatcher.profiles.of(fq.ref)
            for node, entry in queue_entries(fq, record, profile).items():
                views.setdefault(node, []).append(entry)
        load = SchedulerLoad(replica=self.host.replica, at=now, functions=reports)
        self.leader.report(load)  # our own, without waiting for it to loop back
        with contextlib.suppress(nats.errors.Error):
            await self.host.nc.publish(subjects.SCHED_LOAD, encode(load))
            for node, entries in views.items():
                view = QueueView(replica=self.host.replica, node=node, at=now, entries=entries)
                await self.host.nc.publish(
                    subjects.node(node, "memory", subjects.MEMORY_QUEUE_VIEW), encode(view)
                )
