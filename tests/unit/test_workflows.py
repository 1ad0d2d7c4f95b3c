"""Unit tests of gpufaas.shared.workflows: workflow specs, deploy-time validation,
run order and lineage. Pure: no NATS, no I/O."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpufaas.shared import messages
from gpufaas.shared.errors import InvalidArgument, NotFound, PlatformError
from gpufaas.shared.messages import (
    Datatype,
    FunctionRecord,
    FunctionSpec,
    ModelSource,
    TensorSpec,
    decode,
    decode_json,
    encode,
)
from gpufaas.shared.workflows import (
    WorkflowRecord,
    WorkflowSpec,
    WorkflowStep,
    consumers,
    lineage,
    parse_ref,
    producers,
    ready_steps,
    topological_order,
    validate_workflow,
)

pytestmark = pytest.mark.unit

NOW = 1_700_000_000.0

Tensors = dict[str, tuple[Datatype, list[int]]]


def fn(name: str, inputs: Tensors, outputs: Tensors, tenant: str = "default") -> FunctionRecord:
    def specs(tensors: Tensors) -> list[TensorSpec]:
        return [TensorSpec(name=n, datatype=d, shape=s) for n, (d, s) in tensors.items()]

    return FunctionRecord(
        spec=FunctionSpec(name=name, model=ModelSource(builtin=name), tenant=tenant),
        inputs=specs(inputs),
        outputs=specs(outputs),
        model_bytes=1024,
        tensor_count=4,
        nodes=["node-a"],
        created_at=NOW - 60,
    )


FUNCTIONS = {
    f.spec.name: f
    for f in [
        fn("minilm", {"text": ("BYTES", [-1])}, {"embedding": ("FP32", [-1, 384])}),
        fn("scorer", {"embedding": ("FP32", [-1, 384])}, {"scores": ("FP32", [-1])}),
        fn("half", {"embedding": ("FP16", [-1, 384])}, {"scores": ("FP32", [-1])}),
        fn("wide", {"embedding": ("FP32", [-1, 768])}, {"scores": ("FP32", [-1])}),
        fn("flat", {"embedding": ("FP32", [-1])}, {"scores": ("FP32", [-1])}),
        fn("batch8", {"embedding": ("FP32", [8, -1])}, {"scores": ("FP32", [-1])}),
        fn(
            "merge",
            {"a": ("FP32", [-1]), "b": ("FP32", [-1])},
            {"scores": ("FP32", [-1]), "best": ("INT64", [-1])},
        ),
        fn("ids", {"text": ("INT64", [-1])}, {"embedding": ("FP32", [-1, 384])}),
        fn("fixed", {"text": ("BYTES", [4])}, {"embedding": ("FP32", [-1, 384])}),
        fn("fixed8", {"text": ("BYTES", [8])}, {"embedding": ("FP32", [-1, 384])}),
        fn("matrix", {"text": ("BYTES", [-1, -1])}, {"embedding": ("FP32", [-1, 384])}),
        fn("identity", {"x": ("FP32", [-1])}, {"x": ("FP32", [-1])}),
        fn("source", {}, {"x": ("FP32", [-1])}),
        fn("sink", {"x": ("FP32", [-1])}, {}),
        fn("private", {"text": ("BYTES", [-1])}, {"x": ("FP32", [-1])}, tenant="acme"),
    ]
}


def step(name: str, function: str, **inputs: str) -> WorkflowStep:
    return WorkflowStep(name=name, function=function, inputs=inputs)


def two_step(**kw: Any) -> WorkflowSpec:
    return WorkflowSpec(
        name="embed-then-score",
        steps=[
            step("embed", "minilm", text="$input.text"),
            step("score", "scorer", embedding="embed.embedding"),
        ],
        **kw,
    )


def diamond(**kw: Any) -> WorkflowSpec:
    # embed -> left, right -> join; declared out of order on purpose.
    return WorkflowSpec(
        name="diamond",
        steps=[
            step("join", "merge", a="left.scores", b="right.scores"),
            step("left", "scorer", embedding="embed.embedding"),
            step("right", "scorer", embedding="embed.embedding"),
            step("embed", "minilm", text="$input.text"),
        ],
        **kw,
    )


def chain(n: int) -> WorkflowSpec:
    steps = [step("s0", "source")] + [
        step(f"s{i}", "identity", x=f"s{i - 1}.x") for i in range(1, n)
    ]
    return WorkflowSpec(name="chain", steps=steps)


def invalid(
    spec: WorkflowSpec, field: str, *words: str, error: type[PlatformError] = InvalidArgument
) -> str:
    with pytest.raises(error) as info:
        validate_workflow(spec, FUNCTIONS, now=NOW)
    assert type(info.value) is error
    assert info.value.field == field, info.value.message
    for word in words:
        assert word in info.value.message, info.value.message
    return info.value.message


# --- valid workflows -----------------------------------------------------------------


def test_two_step_workflow() -> None:
    record = validate_workflow(two_step(slo_ms=500), FUNCTIONS, now=NOW)
    assert record.order == ["embed", "score"]
    assert record.inputs == [TensorSpec(name="text", datatype="BYTES", shape=[-1])]
    assert record.outputs == [TensorSpec(name="scores", datatype="FP32", shape=[-1])]
    assert record.created_at == NOW
    assert record.spec.outputs == {"scores": "score.scores"}  # the default, resolved
    assert record.spec.slo_ms == 500
    assert decode(encode(record), WorkflowRecord) == record


def test_explicit_outputs_are_renamed_and_may_include_intermediates() -> None:
    spec = two_step(outputs={"vec": "embed.embedding", "s": "score.scores"})
    record = validate_workflow(spec, FUNCTIONS, now=NOW)
    assert record.outputs == [
        TensorSpec(name="vec", datatype="FP32", shape=[-1, 384]),
        TensorSpec(name="s", datatype="FP32", shape=[-1]),
    ]
    assert record.spec == spec


def test_diamond() -> None:
    spec = diamond()
    record = validate_workflow(spec, FUNCTIONS, now=NOW)
    assert record.order == ["embed", "left", "right", "join"]
    assert record.outputs == [
        TensorSpec(name="scores", datatype="FP32", shape=[-1]),
        TensorSpec(name="best", datatype="INT64", shape=[-1]),
    ]
    assert producers(spec) == {
        "join": {"left", "right"},
        "left": {"embed"},
        "right": {"embed"},
        "embed": set(),
    }
    assert consumers(spec) == {
        "join": set(),
        "left": {"join"},
        "right": {"join"},
        "embed": {"left", "right"},
    }
    assert ready_steps(record, spec, set()) == ["embed"]
    assert ready_steps(record, spec, {"embed"}) == ["left", "right"]
    assert ready_steps(record, spec, {"embed", "left"}) == ["right"]
    assert ready_steps(record, spec, {"embed", "left", "right"}) == ["join"]
    assert ready_steps(record, spec, {"embed", "left", "right", "join"}) == []


def test_unused_step_still_runs() -> None:
    spec = two_step(outputs={"vec": "embed.embedding"})
    record = validate_workflow(spec, FUNCTIONS, now=NOW)
    assert record.order == ["embed", "score"]
    assert [o.name for o in record.outputs] == ["vec"]


def test_consumers_of_one_input_merge_their_shapes() -> None:
    spec = WorkflowSpec(
        name="fan",
        steps=[
            step("a", "scorer", embedding="$input.e"),
            step("b", "batch8", embedding="$input.e"),
        ],
        outputs={"a": "a.scores", "b": "b.scores"},
    )
    record = validate_workflow(spec, FUNCTIONS, now=NOW)
    assert record.inputs == [TensorSpec(name="e", datatype="FP32", shape=[8, 384])]
    spec = WorkflowSpec(
        name="fan",
        steps=[step("a", "minilm", text="$input.t"), step("b", "fixed", text="$input.t")],
        outputs={"a": "a.embedding", "b": "b.embedding"},
    )
    record = validate_workflow(spec, FUNCTIONS, now=NOW)
    assert record.inputs == [TensorSpec(name="t", datatype="BYTES", shape=[4])]


def test_shapes_with_any_size_are_compatible() -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[step("e", "minilm", text="$input.t"), step("b", "batch8", embedding="e.embedding")],
    )
    assert validate_workflow(spec, FUNCTIONS, now=NOW).order == ["e", "b"]


def test_workflow_with_no_inputs() -> None:
    record = validate_workflow(chain(3), FUNCTIONS, now=NOW)
    assert record.inputs == []
    assert record.order == ["s0", "s1", "s2"]


def test_decode_json_body() -> None:
    body = {
        "name": "embed-then-score",
        "steps": [
            {"name": "embed", "function": "minilm", "inputs": {"text": "$input.text"}},
            {"name": "score", "function": "scorer", "inputs": {"embedding": "embed.embedding"}},
        ],
        "outputs": {"scores": "score.scores"},
        "slo_ms": 500,
    }
    spec = decode_json(json.dumps(body), WorkflowSpec)
    assert spec == two_step(outputs={"scores": "score.scores"}, slo_ms=500)


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "w", "steps": [{"name": "a", "function": "f"}], "extra": 1}, "extra"),
        (
            {"name": "w", "steps": [{"name": "a", "function": "f", "retries": 3}]},
            "steps[0].retries",
        ),
        ({"name": "w", "steps": []}, "steps"),
        ({"name": "w", "steps": [{"name": "a", "function": "f"}] * 65}, "steps"),
        ({"name": "w", "steps": [{"name": "a.b", "function": "f"}]}, "steps[0].name"),
        ({"name": "w", "steps": [{"name": "a", "function": "f"}], "slo_ms": 0}, "slo_ms"),
    ],
)
def test_decode_json_rejects(body: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidArgument) as info:
        decode_json(json.dumps(body), WorkflowSpec)
    assert info.value.field == field


# --- invalid workflows ---------------------------------------------------------------


def test_duplicate_step_name() -> None:
    spec = WorkflowSpec(
        name="w", steps=[step("a", "source"), step("b", "source"), step("a", "source")]
    )
    invalid(spec, "steps[2].name", "'a'", "steps[0]", "unique")


@pytest.mark.parametrize(
    ("name", "word"), [("$input", "'$'"), ("a.b", "'.'"), ("Big", "lower-case")]
)
def test_bad_step_name(name: str, word: str) -> None:
    spec = WorkflowSpec(name="w", steps=[step("ok", "source"), step(name, "source")])
    invalid(spec, "steps[1].name", word)


def test_too_many_steps_built_in_python() -> None:
    invalid(chain(65), "steps", "64")


def test_unknown_function() -> None:
    spec = WorkflowSpec(
        name="w", steps=[step("embed", "minilm", text="$input.t"), step("score", "scorer2")]
    )
    message = invalid(spec, "steps[1].function", error=NotFound)
    assert message == "step 'score' names function 'scorer2', which is not deployed"


def test_other_tenants_function_is_not_deployed() -> None:
    spec = WorkflowSpec(name="w", steps=[step("p", "private", text="$input.t")])
    invalid(spec, "steps[0].function", "'private'", error=NotFound)
    own = WorkflowSpec(name="w", steps=spec.steps, tenant="acme")
    assert validate_workflow(own, FUNCTIONS, now=NOW).order == ["p"]


@pytest.mark.parametrize(
    "ref", ["embed", "embed.", ".embedding", "$inputs.text", "$input.", "$input", ""]
)
def test_malformed_reference(ref: str) -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[step("embed", "minilm", text="$input.t"), step("score", "scorer", embedding=ref)],
    )
    invalid(spec, "steps[1].inputs.embedding", "'$input.<name>' or '<step>.<output>'")


def test_reference_to_unknown_step() -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[
            step("embed", "minilm", text="$input.t"),
            step("score", "scorer", embedding="emb.embedding"),
        ],
    )
    invalid(spec, "steps[1].inputs.embedding", "'emb'", "embed, score")


def test_reference_to_unknown_output_lists_outputs() -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[
            step("embed", "minilm", text="$input.t"),
            step("score", "scorer", embedding="embed.emb"),
        ],
    )
    invalid(spec, "steps[1].inputs.embedding", "no output 'emb'", "it has: embedding")


def test_self_reference() -> None:
    spec = WorkflowSpec(name="w", steps=[step("loop", "identity", x="loop.x")])
    invalid(spec, "steps[0].inputs.x", "its own output")


def test_unwired_function_input() -> None:
    spec = WorkflowSpec(name="w", steps=[step("embed", "minilm")])
    message = invalid(spec, "steps[0].inputs")
    assert message == "step 'embed' does not wire input 'text' of function 'minilm'"


def test_wired_input_the_function_does_not_take() -> None:
    spec = WorkflowSpec(name="w", steps=[step("embed", "minilm", text="$input.t", txt="$input.t")])
    invalid(spec, "steps[0].inputs.txt", "no such input", "its inputs are: text")


def test_cycle_names_its_steps_in_order() -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[
            step("start", "source"),
            step("a", "merge", a="start.x", b="b.scores"),
            step("b", "flat", embedding="a.scores"),
        ],
    )
    message = invalid(spec, "steps")
    assert message.startswith("steps form a cycle: a -> b -> a")


def test_longer_cycle() -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[
            step("a", "identity", x="c.x"),
            step("b", "identity", x="a.x"),
            step("c", "identity", x="b.x"),
        ],
    )
    invalid(spec, "steps", "a -> b -> c -> a")
    with pytest.raises(InvalidArgument):
        topological_order(spec)


@pytest.mark.parametrize(
    ("function", "words"),
    [
        ("half", ["FP16 [-1, 384]", "FP32 [-1, 384]", "'half'", "'minilm'"]),  # datatype
        ("wide", ["FP32 [-1, 768]", "FP32 [-1, 384]"]),  # fixed dimension
        ("flat", ["FP32 [-1]", "FP32 [-1, 384]"]),  # rank
    ],
)
def test_mismatched_tensors_between_steps(function: str, words: list[str]) -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[
            step("embed", "minilm", text="$input.t"),
            step("score", function, embedding="embed.embedding"),
        ],
    )
    invalid(spec, "steps[1].inputs.embedding", "'embed.embedding'", *words)


@pytest.mark.parametrize(
    ("first", "second", "words"),
    [
        ("minilm", "ids", ["BYTES [-1]", "INT64 [-1]"]),  # datatype
        ("fixed", "fixed8", ["BYTES [4]", "BYTES [8]"]),  # fixed dimension
        ("minilm", "matrix", ["BYTES [-1]", "BYTES [-1, -1]"]),  # rank
    ],
)
def test_consumers_of_one_input_disagree(first: str, second: str, words: list[str]) -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[step("a", first, text="$input.text"), step("b", second, text="$input.text")],
        outputs={"a": "a.embedding", "b": "b.embedding"},
    )
    invalid(spec, "steps[1].inputs.text", "workflow input 'text'", "step 'a'", "step 'b'", *words)


def test_outputs_reference_unknown_step() -> None:
    invalid(two_step(outputs={"s": "scor.scores"}), "outputs.s", "'scor'", "embed, score")


def test_outputs_reference_unknown_output() -> None:
    invalid(two_step(outputs={"s": "score.score"}), "outputs.s", "no output 'score'", "scores")


@pytest.mark.parametrize("ref", ["score", "$input.text"])
def test_outputs_reference_malformed_or_input(ref: str) -> None:
    invalid(two_step(outputs={"s": ref}), "outputs.s")


def test_outputs_empty() -> None:
    invalid(two_step(outputs={}), "outputs", "at least one")


def test_default_outputs_collide() -> None:
    spec = WorkflowSpec(
        name="w",
        steps=[
            step("embed", "minilm", text="$input.text"),
            step("a", "scorer", embedding="embed.embedding"),
            step("b", "scorer", embedding="embed.embedding"),
        ],
    )
    invalid(spec, "outputs", "'a'", "'b'", "'scores'", '"b_scores": "b.scores"')


def test_default_outputs_of_sinks_without_outputs() -> None:
    spec = WorkflowSpec(name="w", steps=[step("s", "source"), step("k", "sink", x="s.x")])
    invalid(spec, "outputs", "no outputs")


# --- references and lineage ----------------------------------------------------------


def test_parse_ref() -> None:
    assert parse_ref("$input.text") == (None, "text")
    assert parse_ref("embed.embedding") == ("embed", "embedding")
    assert parse_ref("embed.out.0") == ("embed", "out.0")
    with pytest.raises(ValueError, match="not"):
        parse_ref("embed")


def test_lineage_of_a_step_whose_inputs_are_available() -> None:
    assert lineage(diamond(), "join", set()) == ["join"]
    assert lineage(diamond(), "join", {"join"}) == ["join"]
    assert lineage(diamond(), "embed", {"embed", "left"}) == ["embed"]


def test_lineage_follows_lost_producers_transitively() -> None:
    spec = diamond()
    assert lineage(spec, "join", {"left"}) == ["left", "join"]
    assert lineage(spec, "join", {"left", "right"}) == ["left", "right", "join"]
    # embed's outputs are lost but only needed if left or right must rerun.
    assert lineage(spec, "join", {"embed"}) == ["join"]
    assert lineage(spec, "join", {"embed", "right"}) == ["embed", "right", "join"]
    assert lineage(spec, "join", {"embed", "left", "right", "join"}) == [
        "embed",
        "left",
        "right",
        "join",
    ]


def test_lineage_stops_at_an_available_step() -> None:
    spec = chain(5)
    assert lineage(spec, "s4", {"s0", "s1", "s3"}) == ["s3", "s4"]
    assert lineage(spec, "s4", {"s0", "s1", "s2", "s3"}) == ["s0", "s1", "s2", "s3", "s4"]


def test_lineage_of_unknown_step() -> None:
    with pytest.raises(ValueError, match="no step 'nope'"):
        lineage(diamond(), "nope", set())


def test_tags_are_unique() -> None:
    ours = {t.__struct_config__.tag for t in (WorkflowStep, WorkflowSpec, WorkflowRecord)}
    assert ours == {"workflow_step.v1", "workflow_spec.v1", "workflow.v1"}
    theirs = {
        t.__struct_config__.tag
        for t in vars(messages).values()
        if isinstance(t, type) and issubclass(t, messages.Msg) and t is not messages.Msg
    }
    assert not ours & theirs
