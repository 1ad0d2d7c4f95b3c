"""The mesh's NATS identities: one user per role, each limited to the subjects it needs.

Roles (docs/architecture.md §7, "The authenticated mesh"): ``admin`` (``gpufaas up`` and
the CLI: everything), ``gateway``, ``scheduler``, ``node`` (one user per node, for its
memory, tensorstore, transfer and worker pool manager) and ``worker`` (one per node, for
the worker processes that run tenants' programs). The server side is rendered here for
``gpufaas up`` and for compose's ``nats/auth.conf``; the client side
(:func:`connect_options`) is what every process passes to ``nats.connect``.
"""

from __future__ import annotations

import argparse
import json
import ssl
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from gpufaas.shared import constants as c
from gpufaas.shared import subjects
from gpufaas.shared.config import Config
from gpufaas.shared.errors import InvalidArgument

ROLES: Final = ("admin", "gateway", "scheduler", "node", "worker")
NODE_ROLES: Final = ("node", "worker")  # one user per node
INBOX: Final = "_INBOX"
# A responder may answer each request it received once, for this long (a cold load of a
# large model through a worker takes minutes; the server's default is 2).
RESPONSE_EXPIRES: Final = "15m"

P = subjects.PREFIX
ALL_BUCKETS: Final = (
    c.KV_FUNCTIONS,
    c.KV_NODES,
    c.KV_TUBES,
    c.KV_TENSORS,
    c.KV_MEMORY,
    c.KV_PROFILES,
    c.KV_WORKFLOWS,
    c.KV_INFLIGHT,
    c.KV_REPLICAS,
    c.KV_LEASES,
    c.KV_KEYS,
)
OBJECT_STORE: Final = c.TUBES_OBJECT_BUCKET  # the tubes' object tier (stream OBJ_tubes)
JS_API: Final = "$JS.API"
# What no role but admin may do to JetStream: remove or reshape streams, touch servers.
JS_ADMIN_ONLY: Final = (
    f"{JS_API}.STREAM.DELETE.>",
    f"{JS_API}.STREAM.UPDATE.>",
    f"{JS_API}.META.>",
    f"{JS_API}.SERVER.>",
    f"{JS_API}.ACCOUNT.>",
)


def user_name(role: str, node: str = "") -> str:
    """The NATS user of ``role`` (``node_<id>`` / ``worker_<id>`` for the per-node roles)."""
    if role not in ROLES:
        raise ValueError(f"unknown NATS role {role!r}; one of {', '.join(ROLES)}")
    if role in NODE_ROLES:
        return f"{role}_{subjects.token(node, 'node id')}"
    return role


def inbox_prefix(user: str) -> str:
    """Each user's own inboxes: only it may subscribe below them."""
    return f"{INBOX}.{user}"


def _node_verb(node: str, service: str, verb: str) -> str:
    """``gpufaas.v1.node.<node>.<service>.<verb>``, where ``node`` may be ``*`` (a pattern)."""
    return f"{P}.node.{node}.{service}.{verb}"


def _stream_read(stream: str) -> list[str]:
    """Reading one stream: its info, a message by subject (direct or not), ordered consumers."""
    return [
        f"{JS_API}.DIRECT.GET.{stream}",
        f"{JS_API}.DIRECT.GET.{stream}.>",
        f"{JS_API}.STREAM.MSG.GET.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}",
        f"{JS_API}.CONSUMER.CREATE.{stream}.>",
        f"{JS_API}.CONSUMER.DELETE.{stream}.*",
        f"{JS_API}.CONSUMER.INFO.{stream}.*",
        f"{JS_API}.CONSUMER.MSG.NEXT.{stream}.*",  # pull consumers (object-store reads)
        f"$JS.FC.{stream}.>",
    ]


def _streams() -> list[str]:
    objects = [f"OBJ_{OBJECT_STORE}", f"OBJ_{c.MODELS_OBJECT_BUCKET}"]
    return [f"KV_{b}" for b in ALL_BUCKETS] + [*objects, c.EVENTS_STREAM]


@dataclass(frozen=True, slots=True)
class Permissions:
    """One user's permissions, as nats-server's config-file ``permissions`` block."""

    pub_allow: list[str] = field(default_factory=list)
    pub_deny: list[str] = field(default_factory=list)
    sub_allow: list[str] = field(default_factory=list)
    sub_deny: list[str] = field(default_factory=list)
    responses: bool = False  # may answer requests it received (allow_responses)

    def to_conf(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "publish": {"allow": self.pub_allow}
            | ({"deny": self.pub_deny} if self.pub_deny else {}),
            "subscribe": {"allow": self.sub_allow}
            | ({"deny": self.sub_deny} if self.sub_deny else {}),
        }
        if self.responses:
            out["allow_responses"] = {"max": 1, "expires": RESPONSE_EXPIRES}
        return out


def permissions(role: str, node: str = "") -> Permissions | None:
    """The permissions of ``role`` (``None``: admin, unrestricted)."""
    me = user_name(role, node)
    inbox = f"{inbox_prefix(me)}.>"
    platform_js = [
        f"{JS_API}.>",
        "$KV.>",
        f"$O.{OBJECT_STORE}.>",
        f"$O.{c.MODELS_OBJECT_BUCKET}.>",  # uploaded models (the gateway writes them)
        "$JS.FC.>",
    ]
    if role == "admin":
        return None
    if role == "gateway":
        verbs = (
            "deploy",
            "delete",
            "invoke",
            "workflow_deploy",
            "workflow_delete",
            "workflow_invoke",
            "scale",  # the model repository's load and unload
        )
        return Permissions(
            pub_allow=[subjects.cluster("scheduler", v) for v in verbs]
            + [
                _node_verb("*", "tensorstore", subjects.TENSORSTORE_STATS),
                _node_verb("*", "memory", subjects.MEMORY_STATS),
                _node_verb("*", "transfer", subjects.TRANSFER_LINKS),
                # Big outputs, read from their node when no shm is shared (remote_tubes.py).
                _node_verb("*", "transfer", subjects.TRANSFER_FETCH),
                # A warm function's direct route (gateway/direct.py): its tenant's worker.
                _node_verb("*", "worker", f"*.{subjects.WORKER_RUN}"),
                subjects.STATS_ALL,
                subjects.EVENTS_ALL,
                *platform_js,
            ],
            pub_deny=list(JS_ADMIN_ONLY),
            sub_allow=[
                inbox,
                subjects.SCHED_RECONNECTED,
                subjects.SCHED_LOAD,  # the replicas' queues, shown in GET /v1/functions
                subjects.event("worker.exited"),  # a direct route's process died
                subjects.WORKERS_RECONNECTED,  # ... or reconnected
            ],
        )
    if role == "scheduler":
        return Permissions(
            pub_allow=[
                subjects.SCHED_LOAD,
                subjects.SCHED_REPLICA_ALL,  # is a replica alive (failover)
                _node_verb("*", "worker", ">"),
                _node_verb("*", "tensorstore", subjects.TENSORSTORE_LOCALITY),
                _node_verb("*", "memory", subjects.MEMORY_QUEUE_VIEW),
                subjects.EVENTS_ALL,
                subjects.SCHED_RECONNECTED,  # back after a drop: gateways send again
                f"{INBOX}.>",  # a survivor answers a dead replica's callers (failover)
                *platform_js,
            ],
            pub_deny=list(JS_ADMIN_ONLY),
            sub_allow=[
                f"{P}.scheduler.>",
                subjects.STATS_ALL,
                subjects.event("memory.rejected"),
                subjects.event("worker.exited"),  # a pool's crashed process: resend its requests
                subjects.WORKERS_RECONNECTED,  # a worker back after a drop: resend too
                inbox,
            ],
            responses=True,
        )
    if role == "node":
        return _node_permissions(node, inbox)
    return _worker_permissions(node, inbox)


def _node_permissions(node: str, inbox: str) -> Permissions:
    """A node's services: their own node's subjects, peers' ``transfer.fetch``, the buckets
    they write (their own node's keys in ``nodes`` and ``memory``)."""
    js = [f"{JS_API}.INFO", f"{JS_API}.STREAM.INFO.*"]
    for stream in _streams():  # every stream but the API keys' (gateway, admin) is read
        js += [f"{JS_API}.STREAM.CREATE.{stream}"]
        js += _stream_read(stream) if stream != f"KV_{c.KV_KEYS}" else []
    js += [f"{JS_API}.STREAM.PURGE.KV_{c.KV_TUBES}", f"{JS_API}.STREAM.PURGE.OBJ_{OBJECT_STORE}"]
    js += [f"{JS_API}.STREAM.MSG.DELETE.OBJ_{OBJECT_STORE}"]
    return Permissions(
        pub_allow=[
            f"{P}.node.{node}.>",
            _node_verb("*", "transfer", subjects.TRANSFER_FETCH),
            subjects.EVENTS_ALL,
            *js,
            subjects.kv_key(c.KV_NODES, f"{node}.>"),
            subjects.kv_key(c.KV_MEMORY, f"{node}.>"),
            subjects.kv_key(c.KV_TUBES, ">"),
            subjects.kv_key(c.KV_TENSORS, ">"),
            f"$O.{OBJECT_STORE}.>",
        ],
        sub_allow=[f"{P}.node.{node}.>", subjects.STATS_ALL, inbox],
        responses=True,
    )


def _worker_permissions(node: str, inbox: str) -> Permissions:
    """Worker processes run tenants' programs: their node's store, transfer and memory verbs
    they call, the ``tubes`` bucket, reads of ``functions``; nothing of the scheduler, no
    heartbeat, no other node, no event, no reply they were not asked for."""
    reads: list[str] = []
    for bucket in (c.KV_FUNCTIONS, c.KV_TUBES):
        stream = f"KV_{bucket}"
        reads += [
            f"{JS_API}.DIRECT.GET.{stream}",
            f"{JS_API}.DIRECT.GET.{stream}.>",
            f"{JS_API}.STREAM.MSG.GET.{stream}",
        ]
    own = f"{P}.node.{node}.worker"
    return Permissions(
        pub_allow=[
            *(
                _node_verb(node, "tensorstore", v)
                for v in (
                    subjects.TENSORSTORE_REGISTER,
                    subjects.TENSORSTORE_RENEW,
                    subjects.TENSORSTORE_RELEASE,
                )
            ),
            _node_verb(node, "transfer", subjects.TRANSFER_ENSURE),
            _node_verb(node, "transfer", subjects.TRANSFER_ADOPT),
            _node_verb(node, "memory", subjects.MEMORY_OBSERVE),
            f"{own}.{subjects.WORKER_RETIRE}",
            f"{own}.{subjects.WORKER_SPARE_READY}",
            f"{own}.{subjects.RECONNECTED}",
            f"{JS_API}.INFO",
            f"{JS_API}.STREAM.INFO.*",
            *reads,
            subjects.kv_key(c.KV_TUBES, ">"),
        ],
        sub_allow=[f"{own}.>", f"{P}.worker.>", subjects.STATS_ALL, inbox],
        sub_deny=[
            f"{own}.{v}"
            for v in (subjects.WORKER_BIND, subjects.WORKER_RETIRE, subjects.WORKER_SPARE_READY)
        ],
        responses=True,
    )


def users_for(nodes: Sequence[str]) -> list[str]:
    """Every user of a mesh with these nodes."""
    fixed = [user_name(r) for r in ROLES if r not in NODE_ROLES]
    return fixed + [user_name(r, n) for n in nodes for r in NODE_ROLES]


def role_of(user: str) -> tuple[str, str]:
    """Inverse of :func:`user_name`: (role, node)."""
    role, _, node = user.partition("_")
    return role, node


def password_variable(user: str) -> str:
    """The nats-server config variable holding ``user``'s password (compose)."""
    return "PW_" + "".join(ch if ch.isalnum() else "_" for ch in user).upper()


def render_authorization(passwords: dict[str, str], *, variables: bool = False) -> str:
    """An ``authorization`` block with every user of ``passwords`` and its permissions.

    ``variables``: each password is a config variable (``$PW_<USER>``, defined in an
    included secrets file) instead of the literal, so the table can be committed.
    """
    lines = ["authorization {", "  users: ["]
    for user, password in passwords.items():
        entry: dict[str, Any] = {"user": user}
        perms = permissions(*role_of(user))
        body = json.dumps(entry)[1:-1]
        pw = f"${password_variable(user)}" if variables else json.dumps(password)
        body += f", password: {pw}"
        if perms is not None:
            body += f', "permissions": {json.dumps(perms.to_conf())}'
        lines.append(f"    {{{body}}}")
    lines += ["  ]", "}"]
    return "\n".join(lines) + "\n"


# --- client side -------------------------------------------------------------------------


def read_password(path: str) -> str:
    """The password in ``path`` (whitespace stripped); a clear error if it cannot be read."""
    try:
        password = Path(path).read_text().strip()
    except OSError as exc:
        raise InvalidArgument(
            f"GPUFAAS_NATS_PASSWORD_FILE={path!r} cannot be read: {exc.strerror}",
            field="GPUFAAS_NATS_PASSWORD_FILE",
        ) from None
    if not password:
        raise InvalidArgument(
            f"GPUFAAS_NATS_PASSWORD_FILE={path!r} is empty", field="GPUFAAS_NATS_PASSWORD_FILE"
        )
    return password


def tls_context(config: Config) -> ssl.SSLContext | None:
    """A client TLS context when a CA (or a client certificate) is configured."""
    if not (config.nats_tls_ca or config.nats_tls_cert):
        return None
    ctx = ssl.create_default_context(cafile=config.nats_tls_ca or None)
    if config.nats_tls_cert:
        ctx.load_cert_chain(config.nats_tls_cert, config.nats_tls_key or None)
    return ctx


def connect_options(config: Config) -> dict[str, Any]:
    """``nats.connect`` keyword arguments for this process's identity (none: anonymous)."""
    opts: dict[str, Any] = {}
    if bool(config.nats_user) != bool(config.nats_password_file):
        raise InvalidArgument(
            "GPUFAAS_NATS_USER and GPUFAAS_NATS_PASSWORD_FILE are set together or not at all",
            field="GPUFAAS_NATS_USER",
        )
    if config.nats_user:
        opts |= {
            "user": config.nats_user,
            "password": read_password(config.nats_password_file),
            "inbox_prefix": inbox_prefix(config.nats_user),
        }
    ctx = tls_context(config)
    if ctx is not None:
        opts["tls"] = ctx
    return opts


def worker_identity(config: Config) -> dict[str, str]:
    """The environment the worker pool manager gives its processes: the ``worker`` role's
    identity in place of its own (nothing when none is configured)."""
    if not config.worker_nats_user:
        return {}
    return {
        "GPUFAAS_NATS_USER": config.worker_nats_user,
        "GPUFAAS_NATS_PASSWORD_FILE": config.worker_nats_password_file,
        "GPUFAAS_WORKER_NATS_USER": "",
        "GPUFAAS_WORKER_NATS_PASSWORD_FILE": "",
    }


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m gpufaas.shared.nats_auth NODE...``: compose's ``nats/auth.conf``."""
    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("nodes", nargs="+", help="node ids (compose: gpu-node-1)")
    args = parser.parse_args(argv)
    users = users_for(args.nodes)
    sys.stdout.write(
        "# Generated by `python -m gpufaas.shared.nats_auth "
        + " ".join(args.nodes)
        + "`: the mesh's users and permissions.\n"
        "# Passwords are variables defined in the secrets file gen-secrets.sh writes.\n"
        'include "../secrets/nats-passwords.conf"\n'
        + render_authorization(dict.fromkeys(users, ""), variables=True)
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
