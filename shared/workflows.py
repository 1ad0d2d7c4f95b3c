"""Workflows: DAGs of deployed functions, their definition and deploy-time validation.

A workflow is deployed through ``POST /v1/workflows`` as a :class:`WorkflowSpec`.
Each step runs one deployed function; each of the function's inputs is wired to a
reference, either ``$input.<name>`` (a workflow input the invoker supplies) or
``<step>.<output>`` (an output of another step, declared before or after it: the
run order is the topological one, not the list's). :func:`validate_workflow` checks
the spec against the tenant's deployed functions and returns the
:class:`WorkflowRecord` to store; every problem is an ``InvalidArgument`` (or
``NotFound`` for an undeployed function) naming the exact field.

Decisions:

* ``outputs`` omitted: the workflow returns every output of every sink step (a step
  no other step consumes), each named by the output's own name, sinks in the order
  of ``steps``. Two sinks producing the same name is an error on ``outputs`` (name
  them explicitly then). The record stores the resolved mapping in ``spec.outputs``,
  so a stored record always says what it returns.
* ``outputs`` given: it must name at least one output, each ``<step>.<output>``
  (a workflow input cannot be returned as is). A step that nobody consumes and
  that is not in ``outputs`` is allowed: it still runs (for its side effects, or
  while a workflow is being built up), its outputs are dropped.
* Two consumers of one workflow input must agree on its datatype and have
  compatible shapes; the workflow input's shape takes the fixed dimension where
  either has one (``[-1, 384]`` and ``[8, -1]`` give ``[8, 384]``).
* Pure: no I/O, no clock (``now`` is passed in).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Annotated, Final, NamedTuple

import msgspec

from gpufaas.shared.constants import DEFAULT_TENANT
from gpufaas.shared.errors import InvalidArgument, NotFound
from gpufaas.shared.messages import (
    NAME_PATTERN,
    Breakdown,
    FunctionRecord,
    Msg,
    Name,
    NodeId,
    Tenant,
    TensorPayload,
    TensorSpec,
)

# Would live in constants.py; kept here while that module is owned by someone else.
MAX_WORKFLOW_STEPS: Final = 64
INPUT_PREFIX: Final = "$input"

_NAME_RE: Final = re.compile(NAME_PATTERN)


class WorkflowStep(Msg, frozen=True, tag="workflow_step.v1"):
    """One step: a deployed function and, for each of its inputs, where the value comes from."""

    name: Name
    function: Name
    inputs: dict[str, str] = msgspec.field(default_factory=dict)  # function input -> reference


class WorkflowSpec(Msg, frozen=True, tag="workflow_spec.v1"):
    """What a user deploys: named steps, and the workflow outputs as ``name -> step.output``."""

    name: Name
    steps: Annotated[list[WorkflowStep], msgspec.Meta(min_length=1, max_length=MAX_WORKFLOW_STEPS)]
    outputs: dict[str, str] | None = None  # None: the outputs of the sink steps
    slo_ms: Annotated[float, msgspec.Meta(gt=0)] | None = None
    tenant: Tenant = DEFAULT_TENANT


class WorkflowRecord(Msg, frozen=True, tag="workflow.v1"):
    """A validated workflow, as stored: its spec (outputs resolved), run order and tensors."""

    spec: WorkflowSpec
    order: list[str]  # step names, topologically sorted (ties in the order of ``steps``)
    inputs: list[TensorSpec]  # what the invoker supplies, in order of first use
    outputs: list[TensorSpec]  # what the workflow returns, in the order of ``spec.outputs``
    created_at: float


class WorkflowDeployRequest(Msg, frozen=True, tag="workflow_deploy_request.v1"):
    spec: WorkflowSpec


class WorkflowDeployReply(Msg, frozen=True, tag="workflow_deploy_reply.v1"):
    workflow: WorkflowRecord
    created: bool


class WorkflowDeleteRequest(Msg, frozen=True, tag="workflow_delete_request.v1"):
    name: Name
    tenant: Tenant = DEFAULT_TENANT


class WorkflowDeleteReply(Msg, frozen=True, tag="workflow_delete_reply.v1"):
    name: str


class WorkflowInvokeRequest(Msg, frozen=True, tag="workflow_invoke_request.v1"):
    workflow: Name
    request_id: str
    inputs: list[TensorPayload]
    tenant: Tenant = DEFAULT_TENANT
    deadline: float = 0.0  # unix time; 0 = the platform default


class WorkflowInflightRecord(Msg, frozen=True, tag="workflow_inflight.v1"):
    """A workflow invocation a scheduler replica accepted, kept in KV until it is answered
    (as ``InflightRecord`` for a function's): a replica that outlives it runs it again
    under the same dispatch id, so each step already sent is answered from its worker's
    memory, not run twice."""

    replica: str
    reply_to: str
    request: WorkflowInvokeRequest
    dispatch_id: str
    accepted_at: float


class StepReport(Msg, frozen=True, tag="step_report.v1"):
    """How one step ran: where, its breakdown, and how many times (>1: recomputed)."""

    step: str
    function: str
    node: NodeId
    device: str
    breakdown: Breakdown
    runs: int = 1
    output_tiers: list[str] = msgspec.field(default_factory=list)  # where its outputs were


class WorkflowInvokeReply(Msg, frozen=True, tag="workflow_invoke_reply.v1"):
    workflow: str
    request_id: str
    outputs: list[TensorPayload]
    steps: list[StepReport]
    total_us: int = 0


class Ref(NamedTuple):
    """A parsed reference: ``step`` is None for a workflow input (``$input.<name>``)."""

    step: str | None
    name: str


def parse_ref(ref: str) -> Ref:
    """Parse ``$input.<name>`` or ``<step>.<output>``; ``ValueError`` says what is wrong."""
    head, dot, tail = ref.partition(".")
    if not dot or not head or not tail:
        raise ValueError(f"{ref!r} is not '{INPUT_PREFIX}.<name>' or '<step>.<output>'")
    if head.startswith("$"):
        if head != INPUT_PREFIX:
            raise ValueError(
                f"{ref!r} is not '{INPUT_PREFIX}.<name>' or '<step>.<output>'"
                f" ({head!r} is not a known prefix)"
            )
        return Ref(None, tail)
    return Ref(head, tail)


def producers(spec: WorkflowSpec) -> dict[str, set[str]]:
    """Step -> the steps whose outputs it reads (malformed references are ignored)."""
    return {step.name: set(_step_refs(step)) for step in spec.steps}


def consumers(spec: WorkflowSpec) -> dict[str, set[str]]:
    """Step -> the steps that read its outputs (the reverse of :func:`producers`)."""
    result: dict[str, set[str]] = {step.name: set() for step in spec.steps}
    for step, deps in producers(spec).items():
        for dep in deps:
            if dep in result:
                result[dep].add(step)
    return result


def topological_order(spec: WorkflowSpec) -> list[str]:
    """Steps so that each comes after its producers; ties keep the order of ``steps``.

    Raises ``InvalidArgument`` on ``steps`` naming the steps of a cycle.
    """
    deps = producers(spec)
    names = [step.name for step in spec.steps]
    placed: set[str] = set()
    order: list[str] = []
    while len(order) < len(names):
        ready = [n for n in names if n not in placed and deps[n] & set(names) <= placed]
        if not ready:
            cycle = _find_cycle(spec)
            raise InvalidArgument(
                f"steps form a cycle: {' -> '.join(cycle)}; a step cannot depend on itself,"
                " even through other steps",
                field="steps",
            )
        # One at a time so ties follow the list order rather than "waves".
        order.append(ready[0])
        placed.add(ready[0])
    return order


def ready_steps(record: WorkflowRecord, spec: WorkflowSpec, done: set[str]) -> list[str]:
    """The steps not yet done whose producers are all done, in run order.

    They can run concurrently; the caller leaves out the ones it has already started.
    """
    deps = producers(spec)
    return [s for s in record.order if s not in done and deps.get(s, set()) <= done]


def lineage(spec: WorkflowSpec, step: str, lost: set[str]) -> list[str]:
    """The steps to rerun, in run order, to recompute ``step``'s outputs.

    ``step`` itself always; then, transitively, each producer whose outputs are in
    ``lost`` (steps whose outputs are gone). Workflow inputs are never lost: the
    invoker's tensors are kept for the whole run. An unknown step is a ``ValueError``
    (the caller names steps from a validated record).
    """
    deps = producers(spec)
    if step not in deps:
        raise ValueError(f"workflow {spec.name!r} has no step {step!r}")
    rerun = {step}
    pending = [step]
    while pending:
        for dep in deps[pending.pop()]:
            if dep in lost and dep not in rerun and dep in deps:
                rerun.add(dep)
                pending.append(dep)
    return [s for s in topological_order(spec) if s in rerun]


def validate_workflow(
    spec: WorkflowSpec, functions: Mapping[str, FunctionRecord], *, now: float
) -> WorkflowRecord:
    """Check ``spec`` against the tenant's deployed ``functions`` (by name) and build its record.

    Raises ``InvalidArgument`` (or ``NotFound`` for an undeployed function) naming the field.
    """
    if not 1 <= len(spec.steps) <= MAX_WORKFLOW_STEPS:
        raise InvalidArgument(
            f"a workflow has 1 to {MAX_WORKFLOW_STEPS} steps, this one has {len(spec.steps)}",
            field="steps",
        )
    _check_step_names(spec)
    steps = {step.name: step for step in spec.steps}
    records = {
        step.name: _function_of(spec, i, step, functions) for i, step in enumerate(spec.steps)
    }
    for i, step in enumerate(spec.steps):
        _check_wiring(i, step, steps, records)
    order = topological_order(spec)
    inputs = _check_tensors(spec, records, order)
    outputs = _resolve_outputs(spec, records)
    return WorkflowRecord(
        spec=msgspec.structs.replace(spec, outputs={o.name: ref for o, ref in outputs}),
        order=order,
        inputs=inputs,
        outputs=[o for o, _ in outputs],
        created_at=now,
    )


# --- checks --------------------------------------------------------------------------


def _check_step_names(spec: WorkflowSpec) -> None:
    seen: dict[str, int] = {}
    for i, step in enumerate(spec.steps):
        field = f"steps[{i}].name"
        if step.name.startswith("$"):
            raise InvalidArgument(
                f"step name {step.name!r} starts with '$', which is reserved for '{INPUT_PREFIX}'",
                field=field,
            )
        if "." in step.name:
            raise InvalidArgument(
                f"step name {step.name!r} contains '.', which separates step and output"
                " in references ('<step>.<output>')",
                field=field,
            )
        if not _NAME_RE.match(step.name):
            raise InvalidArgument(
                f"step name {step.name!r} is not 1-63 lower-case letters, digits, '_' or '-'"
                " starting with a letter or digit",
                field=field,
            )
        if step.name in seen:
            raise InvalidArgument(
                f"step name {step.name!r} is used by steps[{seen[step.name]}] and steps[{i}];"
                " step names must be unique",
                field=field,
            )
        seen[step.name] = i


def _function_of(
    spec: WorkflowSpec, i: int, step: WorkflowStep, functions: Mapping[str, FunctionRecord]
) -> FunctionRecord:
    record = functions.get(step.function)
    # Another tenant's function is as good as absent.
    if record is None or record.spec.tenant != spec.tenant:
        raise NotFound(
            f"step {step.name!r} names function {step.function!r}, which is not deployed",
            field=f"steps[{i}].function",
        )
    return record


def _check_wiring(
    i: int,
    step: WorkflowStep,
    steps: Mapping[str, WorkflowStep],
    records: Mapping[str, FunctionRecord],
) -> None:
    function = records[step.name]
    takes = [t.name for t in function.inputs]
    for input_name, ref in step.inputs.items():
        field = f"steps[{i}].inputs.{input_name}"
        if input_name not in takes:
            raise InvalidArgument(
                f"step {step.name!r} wires input {input_name!r}, but function"
                f" {step.function!r} has no such input; its inputs are: {_names(takes)}",
                field=field,
            )
        try:
            parsed = parse_ref(ref)
        except ValueError as exc:
            raise InvalidArgument(
                f"step {step.name!r} input {input_name!r}: {exc}", field=field
            ) from None
        if parsed.step is None:
            continue
        if parsed.step == step.name:
            raise InvalidArgument(
                f"step {step.name!r} input {input_name!r} refers to its own output {ref!r};"
                " a step cannot consume its own outputs",
                field=field,
            )
        if parsed.step not in steps:
            raise InvalidArgument(
                f"step {step.name!r} input {input_name!r} refers to step {parsed.step!r},"
                f" which is not in the workflow; its steps are: {_names(steps)}",
                field=field,
            )
        _producer_output(steps[parsed.step], records[parsed.step], parsed.name, field)
    for name in takes:
        if name not in step.inputs:
            raise InvalidArgument(
                f"step {step.name!r} does not wire input {name!r} of function {step.function!r}",
                field=f"steps[{i}].inputs",
            )


def _producer_output(
    producer: WorkflowStep, record: FunctionRecord, output: str, field: str
) -> TensorSpec:
    for spec in record.outputs:
        if spec.name == output:
            return spec
    raise InvalidArgument(
        f"step {producer.name!r} (function {producer.function!r}) has no output {output!r};"
        f" it has: {_names(o.name for o in record.outputs)}",
        field=field,
    )


def _check_tensors(
    spec: WorkflowSpec, records: Mapping[str, FunctionRecord], order: list[str]
) -> list[TensorSpec]:
    """Check every edge's datatype and shape; return the workflow inputs as consumed."""
    index = {step.name: i for i, step in enumerate(spec.steps)}
    # workflow input -> (its merged spec, the first consumer, as "step 'a' input 'x'")
    wf_inputs: dict[str, tuple[TensorSpec, str]] = {}
    for name in order:
        i = index[name]
        step = spec.steps[i]
        wants = {t.name: t for t in records[name].inputs}
        for input_name, ref in step.inputs.items():
            want = wants[input_name]
            field = f"steps[{i}].inputs.{input_name}"
            consumer = f"step {step.name!r} input {input_name!r}"
            parsed = parse_ref(ref)
            if parsed.step is None:
                seen = wf_inputs.get(parsed.name)
                if seen is None:
                    wf_inputs[parsed.name] = (_renamed(want, parsed.name), consumer)
                    continue
                have, first = seen
                if not _compatible(have, want):
                    raise InvalidArgument(
                        f"workflow input {parsed.name!r} feeds {first} ({_describe(have)})"
                        f" and {consumer} ({_describe(want)}), which disagree",
                        field=field,
                    )
                wf_inputs[parsed.name] = (_merged(have, want), first)
                continue
            producer = spec.steps[index[parsed.step]]
            have = _producer_output(producer, records[parsed.step], parsed.name, field)
            if not _compatible(have, want):
                raise InvalidArgument(
                    f"{consumer} (function {step.function!r}) takes {_describe(want)},"
                    f" but {ref!r} (function {producer.function!r}) is {_describe(have)}",
                    field=field,
                )
    return [t for t, _ in wf_inputs.values()]


def _resolve_outputs(
    spec: WorkflowSpec, records: Mapping[str, FunctionRecord]
) -> list[tuple[TensorSpec, str]]:
    """The workflow outputs with their references, explicit or from the sink steps."""
    steps = {step.name: step for step in spec.steps}
    if spec.outputs is not None:
        if not spec.outputs:
            raise InvalidArgument(
                "outputs is empty; name at least one '<step>.<output>', or leave it out"
                " to return the outputs of the last steps",
                field="outputs",
            )
        result = []
        for name, ref in spec.outputs.items():
            field = f"outputs.{name}"
            if not name:
                raise InvalidArgument("a workflow output needs a non-empty name", field=field)
            try:
                parsed = parse_ref(ref)
            except ValueError as exc:
                raise InvalidArgument(f"workflow output {name!r}: {exc}", field=field) from None
            if parsed.step is None:
                raise InvalidArgument(
                    f"workflow output {name!r} is {ref!r}; outputs are '<step>.<output>',"
                    " a workflow input cannot be returned as is",
                    field=field,
                )
            if parsed.step not in steps:
                raise InvalidArgument(
                    f"workflow output {name!r} refers to step {parsed.step!r}, which is not"
                    f" in the workflow; its steps are: {_names(steps)}",
                    field=field,
                )
            have = _producer_output(steps[parsed.step], records[parsed.step], parsed.name, field)
            result.append((_renamed(have, name), ref))
        return result
    consumed = consumers(spec)
    by_name: dict[str, tuple[TensorSpec, str]] = {}
    for step in spec.steps:
        if consumed[step.name]:
            continue
        for out in records[step.name].outputs:
            ref = f"{step.name}.{out.name}"
            if out.name in by_name:
                raise InvalidArgument(
                    f"steps {by_name[out.name][1].partition('.')[0]!r} and {step.name!r} both"
                    f" output {out.name!r} and nothing consumes them; name the workflow"
                    f' outputs explicitly, e.g. "{step.name}_{out.name}": "{ref}"',
                    field="outputs",
                )
            by_name[out.name] = (out, ref)
    if not by_name:
        raise InvalidArgument(
            "the workflow's last steps have no outputs; name at least one in outputs",
            field="outputs",
        )
    return list(by_name.values())


# --- helpers -------------------------------------------------------------------------


def _step_refs(step: WorkflowStep) -> list[str]:
    """The steps named by ``step``'s references, in wiring order, malformed ones skipped."""
    result = []
    for ref in step.inputs.values():
        try:
            parsed = parse_ref(ref)
        except ValueError:
            continue
        if parsed.step is not None and parsed.step not in result:
            result.append(parsed.step)
    return result


def _find_cycle(spec: WorkflowSpec) -> list[str]:
    """One cycle, in data-flow order, closed (``[a, b, a]``); empty if there is none."""
    names = [step.name for step in spec.steps]
    deps = {step.name: _step_refs(step) for step in spec.steps}
    # Data flows producer -> consumer; walk that way so the message reads as it runs.
    feeds: dict[str, list[str]] = {n: [] for n in names}
    for name in names:
        for dep in deps[name]:
            if dep in feeds:
                feeds[dep].append(name)
    state: dict[str, int] = {}  # 1: on the path, 2: finished
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in feeds[node]:
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return []

    for name in names:
        if name not in state and (cycle := visit(name)):
            return cycle
    return []


def _compatible(a: TensorSpec, b: TensorSpec) -> bool:
    if a.datatype != b.datatype or len(a.shape) != len(b.shape):
        return False
    return all(x == y or -1 in (x, y) for x, y in zip(a.shape, b.shape, strict=True))


def _merged(a: TensorSpec, b: TensorSpec) -> TensorSpec:
    shape = [x if x != -1 else y for x, y in zip(a.shape, b.shape, strict=True)]
    return TensorSpec(name=a.name, datatype=a.datatype, shape=shape)


def _renamed(t: TensorSpec, name: str) -> TensorSpec:
    return TensorSpec(name=name, datatype=t.datatype, shape=list(t.shape))


def _describe(t: TensorSpec) -> str:
    return f"{t.datatype} {t.shape}"


def _names(names: Iterable[str]) -> str:
    listed = ", ".join(names)
    return listed or "(none)"
