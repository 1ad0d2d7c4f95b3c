"""Every NATS subject the platform uses is built here and nowhere else.

Shapes: ``gpufaas.v1.<service>.<verb>`` for cluster-wide requests (served by a queue
group), ``gpufaas.v1.node.<node>.<service>.<verb>`` for node-local services and
``gpufaas.v1.events.<kind>`` for events.
"""

from __future__ import annotations

import re
from typing import Final

from gpufaas.shared.constants import API_VERSION, SUBJECT_ROOT

# \Z, not $: $ also matches before a trailing newline, which no subject may hold.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+\Z")
_KIND = re.compile(r"^[a-z0-9_-]+(\.[a-z0-9_-]+)*\Z")
_KIND_PATTERN = re.compile(r"^(>|([a-z0-9_-]+|\*)(\.([a-z0-9_-]+|\*))*(\.>)?)\Z")

PREFIX: Final = f"{SUBJECT_ROOT}.{API_VERSION}"
EVENTS_PREFIX: Final = f"{PREFIX}.events"
EVENTS_ALL: Final = f"{EVENTS_PREFIX}.>"


def token(value: str, what: str = "token") -> str:
    """Return ``value`` if it is a single safe subject token (no dots, spaces or wildcards)."""
    if not _TOKEN.match(value):
        raise ValueError(f"{what} {value!r} is not a valid subject token ([A-Za-z0-9_-]+)")
    return value


def cluster(service: str, verb: str) -> str:
    """A request subject served by a cluster-wide service (scheduler replicas)."""
    return f"{PREFIX}.{token(service, 'service')}.{token(verb, 'verb')}"


def node(node_id: str, service: str, verb: str) -> str:
    """A request subject served by one node's service."""
    return f"{PREFIX}.node.{token(node_id, 'node id')}.{token(service, 'service')}.{token(verb, 'verb')}"


ANY_TENANT: Final = "*"


def worker(node_id: str, tenant: str, verb: str) -> str:
    """A worker verb for one tenant's functions on a node, served by that tenant's worker
    process (``ANY_TENANT``: the wildcard a node's single shared worker serves)."""
    who = tenant if tenant == ANY_TENANT else token(tenant, "tenant")
    return f"{PREFIX}.node.{token(node_id, 'node id')}.worker.{who}.{token(verb, 'verb')}"


def node_service_all(node_id: str, service: str) -> str:
    """Wildcard over every verb of one node's service."""
    return f"{PREFIX}.node.{token(node_id, 'node id')}.{token(service, 'service')}.*"


def event(kind: str) -> str:
    """The subject an event of ``kind`` (e.g. ``function.deployed``) is published on."""
    if not _KIND.match(kind):
        raise ValueError(f"event kind {kind!r} is not valid")
    return f"{EVENTS_PREFIX}.{kind}"


def event_kind(subject: str) -> str:
    """Inverse of :func:`event`."""
    if not subject.startswith(EVENTS_PREFIX + "."):
        raise ValueError(f"{subject!r} is not an event subject")
    return subject[len(EVENTS_PREFIX) + 1 :]


def kv_key(bucket: str, key: str) -> str:
    """The subject a KV bucket stores ``key`` under (a plain publish to it is a put that
    waits for no acknowledgement)."""
    return f"$KV.{bucket}.{key}"


def event_filter(kind_pattern: str) -> str:
    """A subscription filter for events: ``function.*``, ``invocation.completed``, ``>``."""
    if not _KIND_PATTERN.match(kind_pattern):
        raise ValueError(f"event kind pattern {kind_pattern!r} is not valid")
    return f"{EVENTS_PREFIX}.{kind_pattern}"


# Cluster-wide scheduler verbs.
SCHED_DEPLOY: Final = cluster("scheduler", "deploy")
SCHED_DELETE: Final = cluster("scheduler", "delete")
SCHED_SCALE: Final = cluster("scheduler", "scale")  # the model repository's load/unload
SCHED_INVOKE: Final = cluster("scheduler", "invoke")
SCHED_WORKFLOW_DEPLOY: Final = cluster("scheduler", "workflow_deploy")
SCHED_WORKFLOW_DELETE: Final = cluster("scheduler", "workflow_delete")
SCHED_WORKFLOW_INVOKE: Final = cluster("scheduler", "workflow_invoke")
# Every replica's load each tick (arrivals, queued, in flight per function): the leader
# autoscales from the sum; published, no reply.
SCHED_LOAD: Final = cluster("scheduler", "load")
# Each replica's own subject, answered while it is connected: "no responders" there tells
# a survivor at once that the replica died (failover), not its liveness key's TTL later.
SCHED_REPLICA_ALL: Final = f"{PREFIX}.scheduler.replica.*"


def scheduler_replica(replica: str) -> str:
    """The subject one scheduler replica (its KV token) answers on, alone."""
    return f"{PREFIX}.scheduler.replica.{token(replica, 'replica')}"


# Node-local verbs, completed with a node id by :func:`node`.
WORKER_LOAD: Final = "load"
WORKER_UNLOAD: Final = "unload"
WORKER_RUN: Final = "run"
WORKER_PROFILE: Final = "profile"
# The node's worker pool (``node(node, "worker", verb)``): bind a tenant to a worker
# process; a spare process says it is ready; the pool binds a spare by its own subject.
WORKER_BIND: Final = "bind"
WORKER_SPARE_READY: Final = "spare_ready"
# A tenant's process, idle, asks the pool whether it may exit: the pool says yes only once
# it no longer counts the process as the tenant's, so no bind can return a dying process.
WORKER_RETIRE: Final = "retire"
TENSORSTORE_REGISTER: Final = "register"
TENSORSTORE_STATS: Final = "stats"
TENSORSTORE_RENEW: Final = "renew"
TENSORSTORE_RELEASE: Final = "release"
TENSORSTORE_LOCALITY: Final = "locality"
# Asked by the node's memory manager: which models' copies each GPU holds, and the two
# actions it takes on them (drop an idle copy; place one ahead of a queued request).
TENSORSTORE_RESIDENCY: Final = "residency"
TENSORSTORE_EVICT: Final = "evict"
TENSORSTORE_PREFETCH: Final = "prefetch"
TRANSFER_RESOLVE: Final = "resolve"
TRANSFER_ENSURE: Final = "ensure"
TRANSFER_ADOPT: Final = "adopt"  # a worker's new output tube onto a (simulated) GPU tier
TRANSFER_FETCH: Final = "fetch"  # between transfer services: a chunk of a local tube
TRANSFER_RELEASE: Final = "release"  # the memory manager: a tube's GPU copy out, to host
TRANSFER_LINKS: Final = "links"  # the node's links and the bytes each carried (the console)
MEMORY_CAPACITY: Final = "capacity"
MEMORY_ALLOC: Final = "alloc"
MEMORY_FREE: Final = "free"
MEMORY_RENEW: Final = "renew"
MEMORY_STATS: Final = "stats"
MEMORY_LIST: Final = "list"  # an owner's allocations on a device (the transfer sweeper's)
MEMORY_OBSERVE: Final = "observe"  # published by workers per request: no reply
MEMORY_QUEUE_VIEW: Final = "queue_view"  # published by scheduler replicas: no reply
PING: Final = "ping"
RECONNECTED: Final = "reconnected"  # a responder's connection is back (``Reconnected``)
SCHED_RECONNECTED: Final = f"{PREFIX}.scheduler_reconnected"  # a scheduler replica's
WORKERS_RECONNECTED: Final = f"{PREFIX}.node.*.worker.{RECONNECTED}"  # any node's workers
SERVICE_STATS: Final = "service_stats"  # every service: endpoint and loop statistics
# Every service of every node answers a request here (no queue group): a scrape of the
# whole mesh's statistics gathers the replies for a moment.
STATS_ALL: Final = f"{PREFIX}.stats"
