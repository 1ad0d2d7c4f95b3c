"""What an exported program may contain: functional ATen operators, bounded shape arithmetic.

A program comes from a tenant's file and its weights are shared, by content, with every
other model holding the same bytes. So it may only compute: the operators it calls are an
allowlist of functional ATen operators (no in-place or ``out=`` variant, no I/O, no
uninitialised memory, no view with strides of its own choosing), checked on the graph it
will run, and its symbolic shapes are parsed here, bounded in size and in the integers
they can reach, before sympy ``eval``s them.
"""

from __future__ import annotations

import math
import operator
import re
from collections.abc import Iterator
from typing import Any, Final

import torch

from gpufaas.shared.errors import ModelInvalid

# Functional ATen operators (packet names; every overload that mutates nothing is allowed):
# what the demo MiniLM export and common inference models (transformers, CNNs) use.
# Deliberately absent: every in-place (``x_``) and ``out=`` form; ``batch_norm``,
# ``native_batch_norm`` and ``instance_norm`` (their schemas hide an in-place update of the
# running statistics: they are decomposed into the functional ``_native_batch_norm_legit_*``);
# ``empty*`` (uninitialised memory: another request's freed bytes); ``as_strided`` and
# ``_reshape_alias`` (a view with arbitrary strides reads past its tensor, into others);
# ``save``, ``from_file``, ``_print`` and anything else with I/O or effects.
ATEN_ALLOWED: Final = frozenset(
    [
        "abs",
        "acos",
        "acosh",
        "asin",
        "asinh",
        "atan",
        "atanh",
        "atan2",
        "ceil",
        "cos",
        "cosh",
        "erf",
        "erfc",
        "erfinv",
        "exp",
        "exp2",
        "expm1",
        "floor",
        "frac",
        "log",
        "log10",
        "log1p",
        "log2",
        "neg",
        "reciprocal",
        "round",
        "rsqrt",
        "sigmoid",
        "sign",
        "sgn",
        "sin",
        "sinh",
        "sqrt",
        "square",
        "tan",
        "tanh",
        "trunc",
        "relu",
        "relu6",
        "gelu",
        "silu",
        "mish",
        "elu",
        "selu",
        "celu",
        "leaky_relu",
        "hardtanh",
        "hardswish",
        "hardsigmoid",
        "softplus",
        "softshrink",
        "hardshrink",
        "logit",
        "glu",
        "prelu",
        "_prelu_kernel",
        "threshold",
        "positive",
        "isnan",
        "isinf",
        "isfinite",
        "nan_to_num",
        "clamp",
        "clamp_min",
        "clamp_max",
        "clip",
        "add",
        "sub",
        "rsub",
        "mul",
        "div",
        "true_divide",
        "floor_divide",
        "remainder",
        "fmod",
        "pow",
        "maximum",
        "minimum",
        "fmax",
        "fmin",
        "eq",
        "ne",
        "lt",
        "le",
        "gt",
        "ge",
        "logical_and",
        "logical_or",
        "logical_xor",
        "logical_not",
        "bitwise_and",
        "bitwise_or",
        "bitwise_xor",
        "bitwise_not",
        "where",
        "lerp",
        "addcmul",
        "addcdiv",
        "hypot",
        "xlogy",
        "copysign",
        "masked_fill",
        "sum",
        "mean",
        "prod",
        "amax",
        "amin",
        "max",
        "min",
        "argmax",
        "argmin",
        "aminmax",
        "var",
        "std",
        "var_mean",
        "std_mean",
        "logsumexp",
        "cumsum",
        "cumprod",
        "any",
        "all",
        "norm",
        "linalg_vector_norm",
        "count_nonzero",
        "sort",
        "argsort",
        "topk",
        "linear",
        "matmul",
        "mm",
        "bmm",
        "addmm",
        "addmv",
        "baddbmm",
        "mv",
        "dot",
        "outer",
        "einsum",
        "t",
        "bilinear",
        "_addmm_activation",
        "conv1d",
        "conv2d",
        "conv3d",
        "convolution",
        "_convolution",
        "conv_transpose1d",
        "conv_transpose2d",
        "conv_transpose3d",
        "layer_norm",
        "native_layer_norm",
        "group_norm",
        "native_group_norm",
        "rms_norm",
        "_native_batch_norm_legit_no_training",
        "_native_batch_norm_legit_functional",
        "softmax",
        "_softmax",
        "log_softmax",
        "_log_softmax",
        "_safe_softmax",
        "scaled_dot_product_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_flash_attention",
        "dropout",
        "native_dropout",
        "max_pool1d",
        "max_pool2d",
        "max_pool3d",
        "max_pool2d_with_indices",
        "max_pool3d_with_indices",
        "avg_pool1d",
        "avg_pool2d",
        "avg_pool3d",
        "adaptive_avg_pool1d",
        "adaptive_avg_pool2d",
        "adaptive_avg_pool3d",
        "_adaptive_avg_pool2d",
        "_adaptive_avg_pool3d",
        "adaptive_max_pool1d",
        "adaptive_max_pool2d",
        "upsample_nearest1d",
        "upsample_nearest2d",
        "upsample_nearest3d",
        "upsample_bilinear2d",
        "upsample_bicubic2d",
        "upsample_linear1d",
        "pixel_shuffle",
        "pixel_unshuffle",
        "view",
        "view_as",
        "reshape",
        "_unsafe_view",
        "flatten",
        "unflatten",
        "squeeze",
        "unsqueeze",
        "transpose",
        "permute",
        "expand",
        "expand_as",
        "broadcast_to",
        "slice",
        "select",
        "narrow",
        "index_select",
        "gather",
        "take_along_dim",
        "index",
        "index_put",
        "scatter",
        "scatter_add",
        "scatter_reduce",
        "index_add",
        "index_copy",
        "index_fill",
        "slice_scatter",
        "select_scatter",
        "diagonal_scatter",
        "cat",
        "concat",
        "concatenate",
        "stack",
        "split",
        "split_with_sizes",
        "chunk",
        "unbind",
        "tensor_split",
        "movedim",
        "swapaxes",
        "flip",
        "roll",
        "repeat",
        "repeat_interleave",
        "tile",
        "tril",
        "triu",
        "diag",
        "diagonal",
        "constant_pad_nd",
        "pad",
        "reflection_pad1d",
        "reflection_pad2d",
        "replication_pad1d",
        "replication_pad2d",
        "unfold",
        "embedding",
        "one_hot",
        "contiguous",
        "clone",
        "detach",
        "alias",
        "lift_fresh_copy",
        "_to_copy",
        "to",
        "type_as",
        "copy",
        "fill",
        "zero",
        "view_copy",
        "permute_copy",
        "transpose_copy",
        "unsqueeze_copy",
        "squeeze_copy",
        "slice_copy",
        "select_copy",
        "expand_copy",
        "t_copy",
        "split_copy",
        "split_with_sizes_copy",
        "unbind_copy",
        "alias_copy",
        "detach_copy",
        "full",
        "full_like",
        "zeros",
        "zeros_like",
        "ones",
        "ones_like",
        "arange",
        "linspace",
        "scalar_tensor",
        "new_full",
        "new_zeros",
        "new_ones",
        "eye",
        "rand",
        "randn",
        "randint",
        "rand_like",
        "randn_like",
        "bernoulli",
        "_assert_tensor_metadata",
        "_assert_scalar",
        "sym_constrain_range",
        "sym_constrain_range_for_size",
        "sym_size",
        "sym_stride",
        "sym_numel",
        "sym_storage_offset",
        "_local_scalar_dense",
        "item",
        "bucketize",
        "searchsorted",
    ]
)
# Operators whose in-place use a TRAINING export may record: the platform functionalizes
# them (``run_decompositions``) into allowed ones, so a file may name them.
ATEN_DECOMPOSED: Final = frozenset(
    {f"{name}_" for name in ATEN_ALLOWED}
    | {"batch_norm", "native_batch_norm", "_native_batch_norm_legit", "instance_norm"}
)
_ATEN_TARGET: Final = re.compile(r"torch\.ops\.aten\.(\w+)\.(\w+)", re.ASCII)
_PYTHON_TARGETS: Final = frozenset(
    {f"_operator.{op}" for op in ("getitem", "add", "sub", "mul", "floordiv", "truediv")}
    | {f"_operator.{op}" for op in ("mod", "neg", "pow", "eq", "ne", "lt", "le", "gt", "ge")}
    | {f"_operator.{op}" for op in ("and_", "or_", "not_")}
    | {f"torch.sym_{op}" for op in ("float", "int", "max", "min", "not", "ite", "sqrt", "sum")}
    | {f"math.{op}" for op in ("ceil", "floor", "trunc", "sqrt")}
)
_MODULES: Final = {"_operator": operator, "torch": torch, "math": math}
PYTHON_FUNCTIONS: Final = frozenset(
    getattr(_MODULES[module], name)
    for module, _, name in (t.rpartition(".") for t in _PYTHON_TARGETS)
)
DIALECTS: Final = frozenset({"TRAINING", "ATEN"})  # what torch.export.save writes

# Names that reach FX code generation (get_attr targets, module attributes): dotted words only.
_NAME: Final = re.compile(r"[\w.]*", re.ASCII)
INT_LIMIT: Final = 1 << 64  # every integer in a program fits int64 (or uint64)


def check_document(doc: dict[str, Any]) -> str:
    """Check the program's JSON before torch reads it; returns the dialect it claims.

    Every call target, name, integer and symbolic expression anywhere in it is checked.
    """
    verifiers = doc.get("verifiers")
    if (
        not isinstance(verifiers, list)
        or len(verifiers) != 1
        or not isinstance(verifiers[0], str)
        or verifiers[0] not in DIALECTS
    ):
        raise ModelInvalid(
            f"the program claims the dialect {verifiers!r}; only torch.export's "
            f"{sorted(DIALECTS)} are accepted",
            field="model",
        )
    stack: list[Any] = [doc]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, dict):
            for key, value in item.items():
                if key == "target" and "inputs" in item:
                    _check_target(value, item.get("name"))
                elif key == "expr_str":
                    check_expr(value)
                elif key in ("name", "forward_arg_names") or key.endswith("_name"):
                    for name in value if isinstance(value, list) else [value]:
                        _check_name(name)
                elif key != "metadata":  # stack traces, module paths: text, never evaluated
                    stack.append(value)
        elif type(item) is int and not -INT_LIMIT < item < INT_LIMIT:
            raise ModelInvalid(f"the program has an integer out of range: {item}", field="model")
    return str(verifiers[0])


def _check_target(target: object, node: object) -> None:
    """A call target must be allowed ATen (or one the platform functionalizes), or arithmetic."""
    if isinstance(target, str):
        if target in _PYTHON_TARGETS:
            return
        aten = _ATEN_TARGET.fullmatch(target)
        if aten is not None and aten.group(1) in ATEN_ALLOWED | ATEN_DECOMPOSED:
            return
    raise ModelInvalid(
        f"node {node!r} of the program calls {target!r}, which is not allowed (not a "
        "functional ATen operator)",
        field="model",
    )


def _check_name(name: object) -> None:
    if name is not None and (not isinstance(name, str) or _NAME.fullmatch(name) is None):
        raise ModelInvalid(f"the program has an invalid name {name!r}", field="model")


def disallowed_nodes(gm: torch.fx.GraphModule) -> Iterator[tuple[str, str]]:
    """(node, operator) of each node of a graph that is not an allowed functional call."""
    for module in gm.modules():
        if module is not gm:
            yield module.__class__.__name__, "a submodule"
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        if node.op != "call_function":
            yield node.name, f"{node.op} {node.target}"
        elif not is_allowed(node.target):
            yield node.name, str(node.target)


def is_allowed(target: object) -> bool:
    """An allowed ATen overload that mutates nothing, or plain arithmetic."""
    if isinstance(target, torch._ops.OpOverload):
        return (
            target.namespace == "aten"
            and target._opname in ATEN_ALLOWED
            and not target._schema.is_mutable
        )
    try:
        return target in PYTHON_FUNCTIONS
    except TypeError:  # unhashable
        return False


# --- symbolic shape expressions ---------------------------------------------------------

# sympy ``srepr`` (what torch writes) or infix; only these names may appear.
_EXPR_TOKEN: Final = re.compile(
    r"\s*(?:([A-Za-z_]\w*)|(\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)|('[\w.+-]*')|(\*\*|[-+*/(),=]))",
    re.ASCII,
)
_EXPR_FUNCTIONS: Final = frozenset(
    "Symbol Integer Rational Float Add Mul Pow Mod Max Min Abs floor ceiling "  # noqa: SIM905 - a word list reads better as text
    "Eq Ne Lt Le Gt Ge Equality Unequality StrictLessThan StrictGreaterThan LessThan "
    "GreaterThan And Or Not FloorDiv ModularIndexing Where PythonMod CleanDiv CeilToInt "
    "FloorToInt CeilDiv LShift RShift PowByNatural FloatPow FloatTrueDiv IntTrueDiv "
    "IsNonOverlappingAndDenseIndicator TruncToFloat TruncToInt RoundToInt RoundDecimal "
    "ToFloat Identity".split()
)
_EXPR_CONSTANTS: Final = frozenset(
    "true false True False BooleanTrue BooleanFalse oo zoo nan Infinity "  # noqa: SIM905
    "NegativeInfinity NegativeOne One Zero Half".split()
)
_EXPR_KEYWORDS: Final = frozenset(
    "positive negative nonnegative nonpositive integer real finite infinite zero nonzero "  # noqa: SIM905
    "even odd commutative precision evaluate".split()
)
# Functions whose second argument is an exponent (LShift(a, b) = a * 2**b).
_EXPONENTIAL: Final = frozenset({"Pow", "PowByNatural", "FloatPow", "LShift"})
EXPR_MAX_CHARS: Final = 2000
EXPR_MAX_DEPTH: Final = 32
EXPR_MAX_BITS: Final = 4096  # of any value the expression can reach, symbols at 2**64
_SYMBOL_BITS: Final = 64


def check_expr(text: object) -> None:
    """A symbolic shape must be bounded arithmetic over symbols (no ``2**10**10``)."""
    if not isinstance(text, str):
        raise ModelInvalid("the program has a malformed symbolic shape", field="model")
    _ExprParser(text).parse()


class _ExprParser:
    """Recursive descent over sympy's expression syntax, bounding every value's size.

    Each rule returns an upper bound on log2 of the magnitude its value can reach when every
    symbol is at most 2**64; an exponent multiplies its base's bound by 2**(its own), so a
    tower like ``2**10**10`` (or ``Pow(s0, s0)``) is refused before sympy would compute it.
    """

    def __init__(self, text: str) -> None:
        self.text = text
        self.tokens = self._tokens(text)
        self.pos = 0

    def _bad(self, why: str) -> ModelInvalid:
        return ModelInvalid(
            f"the program has a symbolic shape that is not {why}: {self.text[:80]!r}",
            field="model",
        )

    def _tokens(self, text: str) -> list[tuple[str, str]]:
        if len(text) > EXPR_MAX_CHARS:
            raise self._bad(f"at most {EXPR_MAX_CHARS} characters")
        body, pos, out = text.rstrip(), 0, []
        while pos < len(body):
            m = _EXPR_TOKEN.match(body, pos)
            if m is None:
                raise self._bad("plain arithmetic")
            group = m.lastindex or 4  # the one alternative that matched
            out.append((("name", "number", "string", "op")[group - 1], m.group(group)))
            pos = m.end()
        return out

    def parse(self) -> float:
        bits = self._sum(0)
        if self.pos != len(self.tokens):
            raise self._bad("plain arithmetic")
        return bits

    def _peek(self) -> str | None:
        return self.tokens[self.pos][1] if self.pos < len(self.tokens) else None

    def _take(self, want: str | None = None) -> tuple[str, str]:
        if self.pos >= len(self.tokens) or (want is not None and self._peek() != want):
            raise self._bad("plain arithmetic")
        self.pos += 1
        return self.tokens[self.pos - 1]

    def _bounded(self, bits: float) -> float:
        if bits > EXPR_MAX_BITS:
            raise self._bad(f"bounded (it can reach 2**{min(bits, 1e9):.0f})")
        return bits

    def _sum(self, depth: int) -> float:
        if depth > EXPR_MAX_DEPTH:
            raise self._bad(f"nested at most {EXPR_MAX_DEPTH} deep")
        bits = self._product(depth)
        while self._peek() in ("+", "-"):
            self._take()
            bits = self._bounded(max(bits, self._product(depth)) + 1)
        return bits

    def _product(self, depth: int) -> float:
        bits = self._unary(depth)
        while self._peek() in ("*", "/"):
            self._take()
            bits = self._bounded(bits + self._unary(depth))
        return bits

    def _unary(self, depth: int) -> float:
        if self._peek() in ("-", "+"):
            self._take()
            return self._unary(depth + 1)
        base = self._atom(depth)
        if self._peek() == "**":  # right-associative, binds tighter than unary minus
            self._take()
            return self._power(base, self._unary(depth + 1))
        return base

    def _power(self, base: float, exponent: float) -> float:
        if exponent > 64:
            raise self._bad("bounded (an exponent can be too large)")
        return self._bounded(max(base, 1) * 2**exponent)

    def _atom(self, depth: int) -> float:
        kind, value = self._take()
        if kind == "number":
            number = float(value)
            if not math.isfinite(number) or abs(number) >= INT_LIMIT:
                raise self._bad("bounded (a number is too large)")
            return math.log2(abs(number) + 1)
        if kind == "string":  # a symbol's name, or a number sympy would parse (3.4 bits/digit)
            return max(_SYMBOL_BITS, 3.4 * len(value))
        if value == "(":
            bits = self._sum(depth + 1)
            self._take(")")
            return bits
        if kind != "name":
            raise self._bad("plain arithmetic")
        if value in _EXPR_FUNCTIONS and self._peek() == "(":
            return self._call(value, depth + 1)
        if value in _EXPR_CONSTANTS:
            return 1
        raise self._bad("plain arithmetic")

    def _call(self, function: str, depth: int) -> float:
        self._take("(")
        args: list[float] = []
        while self._peek() != ")":
            if args:
                self._take(",")
            if self.pos + 1 < len(self.tokens) and self.tokens[self.pos + 1][1] == "=":
                if self._take()[1] not in _EXPR_KEYWORDS:
                    raise self._bad("plain arithmetic")
                self._take("=")
                self._sum(depth)  # a flag's value (True/False): no magnitude
                continue
            args.append(self._sum(depth))
        self._take(")")
        if function == "Symbol":
            return _SYMBOL_BITS
        if function in _EXPONENTIAL and len(args) == 2:
            return self._power(args[0], args[1])
        if function in _EXPONENTIAL:
            raise self._bad("plain arithmetic")
        return self._bounded(sum(args) + len(args))
