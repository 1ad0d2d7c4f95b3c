"""Exported programs (``torch.export``) rebuilt over borrowed weights, and their runner.

The tensor store splits a .pt2 archive into its program (the graph in torch's JSON schema,
``models/model.json``) and its weights by name; a worker rebuilds a module from the two
without copying a weight. The program comes from a user's file, and torch's deserializer
was not written for hostile input (it evaluates symbolic shapes with sympy's ``eval`` and
resolves call targets by name), so whatever it would evaluate is checked first
(``program_check``). Weights are shared across tenants by content, so a program runs in
its functional form: a buffer it updates becomes an output, kept in the instance's own
copy of that buffer, and every operator it calls is a functional one.
"""

from __future__ import annotations

import json
import math
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, cast

import numpy as np
import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind, OutputKind
from torch.export.passes import move_to_device_pass

from gpufaas.shared.errors import InvalidArgument, ModelInvalid
from gpufaas.shared.messages import Datatype, TensorSpec
from gpufaas.shared.tensors import NUMPY_DTYPES, check_shape, element_count
from gpufaas.worker.program_check import check_document, disallowed_nodes
from gpufaas.worker.runners import Output

PT2_FILE: Final = "model.pt2"
PROGRAM_RECORD: Final = "models/model.json"  # below the archive's root folder

# A buffer or parameter update is kept in the instance's own copy (ExportedRunner).
_OUTPUT_KINDS: Final = frozenset(
    {
        OutputKind.USER_OUTPUT,
        OutputKind.USER_INPUT_MUTATION,
        OutputKind.BUFFER_MUTATION,
        OutputKind.PARAMETER_MUTATION,
    }
)
_MUTATIONS: Final = frozenset({OutputKind.BUFFER_MUTATION, OutputKind.PARAMETER_MUTATION})
_WEIGHT_KINDS: Final = {
    InputKind.PARAMETER: "parameter",
    InputKind.BUFFER: "buffer",
    InputKind.CONSTANT_TENSOR: "tensor_constant",
}


def _kserve_datatypes() -> dict[torch.dtype, Datatype]:
    """KServe datatype of each torch dtype: the shared numpy table, plus BF16 (no numpy type)."""
    table = {
        torch.from_numpy(np.empty(0, np.dtype(np_type))).dtype: cast(Datatype, datatype)
        for datatype, np_type in NUMPY_DTYPES.items()
    }
    table[torch.bfloat16] = "BF16"
    return table


KSERVE_DATATYPES: Final = _kserve_datatypes()


def read_program(path: Path) -> bytes:
    """The program record of a .pt2 archive (its weights are not read)."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = [n for n in archive.namelist() if n.partition("/")[2] == PROGRAM_RECORD]
            if len(names) != 1:
                raise ModelInvalid(f"{path.name} holds no exported program", field="model")
            return archive.read(names[0])
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, OSError, ValueError) as exc:
        raise ModelInvalid(
            f"cannot read a program from {path.name}: {exc}", field="model"
        ) from None


def load_program(program: bytes, weights: Mapping[str, torch.Tensor]) -> ExportedProgram:
    """The exported program over ``weights`` (by state_dict/constant name), none copied.

    Raises ModelInvalid naming the tensor when one is missing, extra, or of another dtype
    or shape than the program was exported with, or when the program is unsafe or broken.
    """
    doc, dialect = _checked_document(program)
    kinds = _weight_kinds(doc)
    for name in kinds:
        if name not in weights:
            raise ModelInvalid(f"weight {name!r} of the program is missing", field="model")
    for name in weights:
        if name not in kinds:
            raise ModelInvalid(f"weight {name!r} is not used by the program", field="model")
    devices = {t.device for t in weights.values()}
    if len(devices) > 1:
        raise ModelInvalid(
            f"the weights are on several devices: {sorted(map(str, devices))}", field="model"
        )
    state_dict: dict[str, torch.Tensor] = {}
    constants: dict[str, torch.Tensor] = {}
    for name, kind in kinds.items():
        tensor = weights[name]
        if kind == "parameter":
            state_dict[name] = torch.nn.Parameter(tensor, requires_grad=False)
        elif kind == "buffer":
            state_dict[name] = tensor
        else:
            constants[name] = tensor
    ep = _deserialize(doc, state_dict, constants)
    _check_weights(ep, weights)
    device = next(iter(devices), torch.device("cpu"))
    if device.type != "cpu":
        # The program was traced on the CPU: devices burnt into its nodes follow the weights
        # (first, so that functionalizing traces it where its weights are).
        ep = move_to_device_pass(ep, device)
    ep = functional_form(ep, dialect)
    for spec in ep.graph_signature.output_specs:
        if spec.kind not in _OUTPUT_KINDS:
            raise ModelInvalid(
                f"the program has a {spec.kind.name} output {spec.arg}, which is not supported",
                field="model",
            )
    return ep


def _deserialize(
    doc: dict[str, Any], state_dict: dict[str, torch.Tensor], constants: dict[str, torch.Tensor]
) -> ExportedProgram:
    """torch's own reader of the program schema, handed tensors instead of pickles.

    Private API (``torch._export.serde``): the public ``torch.export.load`` reads a whole
    archive, copies every weight and unpickles what it finds, which is what this avoids.
    """
    from torch._export.serde import schema  # noqa: PLC0415 - private, kept to this function
    from torch._export.serde.serialize import (  # noqa: PLC0415
        ExportedProgramDeserializer,
        _dict_to_dataclass,
    )

    try:
        serialized = _dict_to_dataclass(schema.ExportedProgram, doc)  # type: ignore[no-untyped-call]
        return ExportedProgramDeserializer().deserialize(serialized, state_dict, constants, None)
    except Exception as exc:  # torch reports a broken program with assorted exception types
        raise ModelInvalid(
            f"the exported program cannot be rebuilt: {exc}", field="model"
        ) from None


def functional_form(ep: ExportedProgram, dialect: str) -> ExportedProgram:
    """The program with nothing in place: as it is when every node is an allowed functional
    operator, else functionalized (``run_decompositions``: buffer updates become outputs).

    The form is judged from the nodes, never from the dialect the file claims: a file that
    claims the functional ATEN dialect with a node that is not is refused as crafted, and so
    is a program whose functional form still calls something outside the allowlist.
    """
    bad = next(disallowed_nodes(ep.graph_module), None)
    if bad is None:
        return ep  # already functional: run_decompositions would only cost seconds
    if dialect != "TRAINING":
        raise ModelInvalid(
            f"the program claims the functional {dialect} dialect, but node {bad[0]!r} calls "
            f"{bad[1]}, which is not an allowed functional operator",
            field="model",
        )
    try:
        with warnings.catch_warnings():
            # torch 2.13 deep-copies its own pytree specs and warns about itself doing so.
            warnings.filterwarnings("ignore", "`isinstance.treespec, LeafSpec", FutureWarning)
            ep = ep.run_decompositions({})
    except Exception as exc:  # torch reports what it cannot functionalize in assorted ways
        raise ModelInvalid(
            f"the program cannot be made functional (node {bad[0]!r} calls {bad[1]}): {exc}",
            field="model",
        ) from None
    bad = next(disallowed_nodes(ep.graph_module), None)
    if bad is not None:
        raise ModelInvalid(
            f"node {bad[0]!r} of the program's functional form calls {bad[1]}, which is not "
            "an allowed functional operator",
            field="model",
        )
    return ep


def _checked_document(program: bytes) -> tuple[dict[str, Any], str]:
    """The program's JSON and the dialect it claims, refused if it holds what the
    deserializer would run as code."""
    try:
        doc = json.loads(program)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ModelInvalid(f"the exported program is not JSON ({exc})", field="model") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("graph_module"), dict):
        raise ModelInvalid("the exported program has no graph_module", field="model")
    # Guards are Python source that ep.module() would exec; inputs are checked here instead.
    doc["guards_code"] = []
    dialect = check_document(doc)
    # torch is told the permissive dialect; what the program is comes from its nodes.
    doc["verifiers"] = ["TRAINING"]
    return doc, dialect


def _weight_kinds(doc: dict[str, Any]) -> dict[str, str]:
    """Weight name -> "parameter", "buffer" (persistent) or "constant", from the signature.

    Read from the JSON because the deserializer insists on being given them all.
    """
    kinds: dict[str, str] = {}
    try:
        for spec in doc["graph_module"]["signature"]["input_specs"]:
            ((kind, value),) = spec.items()
            if kind == "parameter":
                kinds[value["parameter_name"]] = "parameter"
            elif kind == "buffer":
                kinds[value["buffer_name"]] = "buffer" if value["persistent"] else "constant"
            elif kind == "tensor_constant":
                kinds[value["tensor_constant_name"]] = "constant"
            elif kind != "user_input":
                raise ModelInvalid(
                    f"the program takes a {kind} input, which is not supported", field="model"
                )
    except (KeyError, TypeError, ValueError, AttributeError):
        raise ModelInvalid(
            "the exported program has a malformed signature", field="model"
        ) from None
    return kinds


def _check_weights(ep: ExportedProgram, weights: Mapping[str, torch.Tensor]) -> None:
    """Each weight must have the dtype and shape the program was exported with."""
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    for spec in ep.graph_signature.input_specs:
        if spec.kind not in _WEIGHT_KINDS or spec.target is None:
            continue
        expected = placeholders[spec.arg.name].meta["val"]
        tensor = weights[spec.target]
        if tensor.dtype != expected.dtype:
            raise ModelInvalid(
                f"weight {spec.target!r} has dtype {tensor.dtype}, the program expects "
                f"{expected.dtype}",
                field="model",
            )
        if tuple(tensor.shape) != tuple(expected.shape):
            raise ModelInvalid(
                f"weight {spec.target!r} has shape {tuple(tensor.shape)}, the program expects "
                f"{tuple(expected.shape)}",
                field="model",
            )


@dataclass(frozen=True, slots=True)
class _Dim:
    """One input dimension: a fixed size, or a named symbol with its range (``None``: open)."""

    size: int | None
    symbol: str | None = None
    low: int | None = None
    high: int | None = None


@dataclass(frozen=True, slots=True)
class _Input:
    name: str
    dtype: torch.dtype
    datatype: Datatype
    dims: list[_Dim]


class ExportedRunner:
    """Runs an exported program over borrowed weights: raw tensors in, raw tensors out.

    Inputs and outputs follow the program's signature (outputs are ``output__<i>``, or the
    keys of a returned dict); inputs are checked against it before the graph runs. Not
    batchable: a program's dimensions need not be a batch, so requests run one at a time.
    """

    batchable = False

    def __init__(self, model_dir: Path, weights: Mapping[str, torch.Tensor]) -> None:
        """For ``RUNNERS``: the program is read from ``model_dir/model.pt2``, not its weights."""
        self._build(read_program(model_dir / PT2_FILE), weights)

    @classmethod
    def from_program(cls, program: bytes, weights: Mapping[str, torch.Tensor]) -> ExportedRunner:
        """A runner over a program split from its weights by the tensor store."""
        runner = cls.__new__(cls)
        runner._build(program, weights)
        return runner

    def _build(self, program: bytes, weights: Mapping[str, torch.Tensor]) -> None:
        self.program = load_program(program, weights)
        self._own_updated_weights()
        self.module = self.program.module(check_guards=False)
        self._device = next(iter(weights.values())).device if weights else torch.device("cpu")
        self._in_spec = self.program.call_spec.in_spec
        self._inputs = self._input_specs()
        self.inputs = [
            TensorSpec(
                name=i.name,
                datatype=i.datatype,
                shape=[-1 if d.size is None else d.size for d in i.dims],
            )
            for i in self._inputs
        ]
        self.outputs = self._output_specs()

    def _own_updated_weights(self) -> None:
        """Give each buffer (or parameter) the program updates a copy of this instance's own:
        the module writes its new value there, never into the shared bytes it started from."""
        ep = self.program
        for spec in ep.graph_signature.output_specs:
            if spec.kind not in _MUTATIONS or spec.target is None:
                continue
            if spec.target in ep.state_dict:
                shared = ep.state_dict[spec.target]
                own = shared.detach().clone()
                ep.state_dict[spec.target] = (
                    torch.nn.Parameter(own, requires_grad=False)
                    if isinstance(shared, torch.nn.Parameter)
                    else own
                )
            else:
                ep.constants[spec.target] = ep.constants[spec.target].detach().clone()

    def _input_specs(self) -> list[_Input]:
        nodes = {n.name: n for n in self.program.graph.nodes if n.op == "placeholder"}
        ranges = self.program.range_constraints
        specs = []
        for name in self.program.graph_signature.user_inputs:
            val = nodes[name].meta.get("val")
            if not isinstance(val, torch.Tensor):
                raise ModelInvalid(f"program input {name!r} is not a tensor", field="model")
            dims = []
            sizes: tuple[int | torch.SymInt, ...] = tuple(val.shape)  # SymInt where dynamic
            for size in sizes:
                if isinstance(size, int):
                    dims.append(_Dim(size))
                    continue
                expr = size.node.expr
                bounds = ranges.get(expr)
                if getattr(expr, "is_Symbol", False) and bounds is not None:
                    dims.append(_Dim(None, str(expr), _bound(bounds.lower), _bound(bounds.upper)))
                else:
                    dims.append(_Dim(None))  # a derived size: left to the module's own check
            specs.append(_Input(name, val.dtype, _datatype(val.dtype, f"input {name!r}"), dims))
        return specs

    def _output_specs(self) -> list[TensorSpec]:
        nodes = {n.name: n for n in self.program.graph.nodes}
        names = self.program.graph_signature.user_outputs
        out_spec = self.program.call_spec.out_spec
        self._output_names = [f"output__{i}" for i in range(len(names))]
        if (
            out_spec is not None
            and out_spec.type is dict
            and all(c.is_leaf() for c in out_spec.children())
            and all(isinstance(k, str) for k in out_spec.context)
        ):
            self._output_names = list(out_spec.context)
        specs = []
        for out_name, node_name in zip(self._output_names, names, strict=True):
            val = nodes[node_name].meta.get("val") if node_name in nodes else None
            if not isinstance(val, torch.Tensor):
                raise ModelInvalid(f"program output {out_name!r} is not a tensor", field="model")
            specs.append(
                TensorSpec(
                    name=out_name,
                    datatype=_datatype(val.dtype, f"output {out_name!r}"),
                    shape=[d if isinstance(d, int) else -1 for d in val.shape],
                )
            )
        return specs

    def sample(self, batch: int) -> Mapping[str, tuple[list[int], bytes]]:
        """Zero inputs at each dynamic dimension's lower bound (``batch`` is not a dimension
        an exported program is known to have)."""
        out = {}
        for spec in self._inputs:
            shape = [d.size if d.size is not None else max(d.low or 1, 1) for d in spec.dims]
            nbytes = math.prod(shape) * torch.empty((), dtype=spec.dtype).element_size()
            out[spec.name] = (shape, bytes(nbytes))
        return out

    def infer(self, inputs: Mapping[str, tuple[list[int], bytes]]) -> dict[str, Output]:
        unknown = sorted(set(inputs) - {i.name for i in self._inputs})
        if unknown:
            raise InvalidArgument(f"unknown input {unknown[0]!r}", field=f"inputs[{unknown[0]}]")
        bound: dict[str, tuple[int, str]] = {}
        flat = [self._tensor(spec, inputs, bound) for spec in self._inputs]
        with torch.inference_mode():
            args, kwargs = pytree.tree_unflatten(flat, self._in_spec)
            leaves = pytree.tree_leaves(self.module(*args, **kwargs))
            outputs = {}
            for name, spec, tensor in zip(self._output_names, self.outputs, leaves, strict=True):
                host = tensor.detach().to("cpu").contiguous()
                data = host.reshape(-1).view(torch.uint8).numpy().data
                outputs[name] = Output(spec.datatype, list(host.shape), data)
        return outputs

    def _tensor(
        self,
        spec: _Input,
        inputs: Mapping[str, tuple[list[int], bytes]],
        bound: dict[str, tuple[int, str]],
    ) -> torch.Tensor:
        """One input decoded after checking its shape against the signature and other inputs."""
        field = f"inputs[{spec.name}]"
        if spec.name not in inputs:
            raise InvalidArgument(f"input {spec.name!r} is missing", field=field)
        shape, raw = inputs[spec.name]
        shape = check_shape(shape, f"{field}.shape")
        if len(shape) != len(spec.dims):
            raise InvalidArgument(
                f"{spec.name} must have {len(spec.dims)} dimensions, got shape {shape}",
                field=f"{field}.shape",
            )
        for axis, (size, dim) in enumerate(zip(shape, spec.dims, strict=True)):
            where = f"{spec.name} dimension {axis}"
            if dim.size is not None and size != dim.size:
                raise InvalidArgument(
                    f"{where} must be {dim.size}, got {size}", field=f"{field}.shape"
                )
            if dim.low is not None and size < dim.low:
                raise InvalidArgument(
                    f"{where} must be at least {dim.low}, got {size}", field=f"{field}.shape"
                )
            if dim.high is not None and size > dim.high:
                raise InvalidArgument(
                    f"{where} must be at most {dim.high}, got {size}", field=f"{field}.shape"
                )
            if dim.symbol is not None:
                first = bound.setdefault(dim.symbol, (size, where))
                if first[0] != size:
                    raise InvalidArgument(
                        f"{where} must equal {first[1]} ({first[0]}), got {size}",
                        field=f"{field}.shape",
                    )
        nbytes = element_count(shape) * spec.dtype.itemsize
        if len(raw) != nbytes:
            raise InvalidArgument(
                f"{spec.datatype} {shape} needs {nbytes} bytes, got {len(raw)}",
                field=f"{field}.data",
            )
        if nbytes == 0:
            tensor = torch.empty(shape, dtype=spec.dtype)
        else:
            # A writable copy: torch.frombuffer warns on (and would alias) read-only bytes.
            tensor = torch.frombuffer(bytearray(raw), dtype=spec.dtype).reshape(shape)
        return tensor.to(self._device)


def _datatype(dtype: torch.dtype, what: str) -> Datatype:
    datatype = KSERVE_DATATYPES.get(dtype)
    if datatype is None:
        raise ModelInvalid(f"{what} has dtype {dtype}, which has no KServe datatype", field="model")
    return datatype


def _bound(value: object) -> int | None:
    """A range end as an int; ``None`` for an infinite one (sympy's oo or torch's int_oo)."""
    return int(value) if getattr(value, "is_Integer", False) else None  # type: ignore[call-overload]
