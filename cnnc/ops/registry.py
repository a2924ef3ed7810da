"""The op registry: one `OpDef` an op, holding everything a stage asks about it.

Each stage is a loop over nodes or kernels that looks their op up here by name (`get`), and
never lists op names itself: shapes calls `shape`, the reference interpreter `reference`,
autodiff `gradient`, fusion reads `fusion`, lowering calls `lower` and `schedule`, the
summary `flops`, initialisation each `ParamDef.init`. An op family lives in one file of
`cnnc/ops/` that registers its ops when the registry first loads it; `check_complete` says
which rule an op lacks for a stage that will ask for it.

This module is a leaf: it imports the IRs only, so a stage (or a schedule pattern) can import
it without importing every op file. `get` loads the op files on first use.
"""

from __future__ import annotations

import enum
import importlib
import math
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cnnc.graph.ir import DType, Node, Shape


class ShapeProblem(Exception):
    """Raised by a shape rule; shapes turns it into a diagnostic at the layer's line with
    the chain of shapes that led there. The message is the whole error."""


class Fusion(enum.Enum):
    """How the fuse pass groups an op with its neighbours into one kernel."""

    ANCHOR = "anchor"  # starts a kernel that epilogues (and maybe a pool) may join
    EPILOGUE = "epilogue"  # elementwise on an anchor's result, applied as it is stored
    POOL = "pool"  # may run inside an anchor's batch loop (`OpDef.takes_pool` anchors)
    ALONE = "alone"  # always a kernel of its own
    ALIAS = "alias"  # no kernel: a second name for its input's memory (NCHW is contiguous)


class Slot(enum.IntEnum):
    """Where an epilogue goes in an anchor's kernel; at most one op each, in this order."""

    BIAS = 1  # starts the accumulators (so the sum is bias + Σ, in the kernels' order)
    ACTIVATION = 2  # applied to each result as it is stored


@dataclass(frozen=True, slots=True)
class InitContext:
    """What a parameter's initialiser may look at: its tensor, the node reading it, the graph
    and the seeded generator shared by every parameter (drawn in graph order)."""

    shape: tuple[int, ...]
    dtype: np.dtype
    node: Node
    graph: Any  # cnnc.graph.ir.Graph
    rng: np.random.Generator

    @property
    def activation(self) -> str | None:
        """The activation of the layer that reads this parameter, if it has one."""
        if not self.graph.has_layer(self.node.layer):
            return None
        return self.graph.layer(self.node.layer).activation

    @property
    def activation_attrs(self) -> object:
        """The attributes of that activation's node (leaky_relu's slope), or None."""
        name = self.activation
        return next((n.attrs for n in self.graph.nodes
                     if n.layer == self.node.layer and n.op == name), None)


Initialiser = Callable[[InitContext], np.ndarray]


def zeros(ctx: InitContext) -> np.ndarray:
    return np.zeros(ctx.shape, dtype=ctx.dtype)


def ones(ctx: InitContext) -> np.ndarray:
    return np.ones(ctx.shape, dtype=ctx.dtype)


def fan_scaled(ctx: InitContext) -> np.ndarray:
    """He's N(0, factor / fan_in) for a layer ending in a relu-like activation (one with a
    `he_factor`: 2 for relu and relu6, 2 / (1 + slope²) for leaky_relu, as torch's
    kaiming_normal_), Glorot's U(±sqrt(6 / (fan_in + fan_out))) otherwise; fans of an
    [out, in, kh, kw] or [out, in] weight."""
    fan_in = math.prod(ctx.shape[1:])
    fan_out = ctx.shape[0] * math.prod(ctx.shape[2:])
    factor = get(ctx.activation).he_factor if ctx.activation is not None else None
    if factor is not None:
        values = ctx.rng.normal(0.0, math.sqrt(factor(ctx.activation_attrs) / fan_in),
                                size=ctx.shape)
    else:
        limit = math.sqrt(6.0 / (fan_in + fan_out))
        values = ctx.rng.uniform(-limit, limit, size=ctx.shape)
    return values.astype(ctx.dtype)


@dataclass(frozen=True, slots=True)
class ParamDef:
    """A tensor an op owns, named `LAYER.NAME`: the last inputs of the op's nodes, in order,
    each started by its own initialiser."""

    name: str
    init: Initialiser | None
    # "param": trained by the optimizer; "buffer": state the training step updates but no
    # gradient reaches (batch norm's running statistics), saved with the parameters;
    # "noise": random numbers the runtime draws for each training call (dropout's)
    role: str = "param"


@dataclass(frozen=True, slots=True)
class OutputDef:
    """An output besides the first, named `LAYER.NAME` (max pooling's argmax)."""

    name: str
    dtype: DType | None = None  # None: the network's dtype


@dataclass(frozen=True, slots=True)
class ShapeContext:
    """A shape rule's view of its node: the input shapes and words for error messages."""

    node: Node
    inputs: list[Shape | None]
    subject: str  # how the error names this node's layer, e.g. "conv c3"
    sources: list[str]  # how it names the layer that made each input

    @property
    def x(self) -> Shape:
        return self.inputs[0]


@dataclass(frozen=True, slots=True)
class Mode:
    """How the reference and the kernels run an op: training (dropout drops, batch norm uses
    the batch's statistics) or inference."""

    training: bool = False


ShapeRule = Callable[[ShapeContext], dict[str, Shape]]
ReferenceRule = Callable[[Node, list[np.ndarray], tuple[int, ...], Mode], Any]
# (node, gradient of its first output or None for a loss, autodiff's builder) ->
# [(tensor, one contribution to its gradient)]
GradientRule = Callable[[Node, str | None, Any], list[tuple[str, str]]]
LowerRule = Callable[[Any, Any], Any]  # (Kernel, KernelProgram) -> LoopFunction
ScheduleRule = Callable[[Any, Any, Any], Any]  # (Kernel, KernelProgram, Machine) -> Lowered | None
# a pool inside a scheduled anchor: (Kernel, KernelProgram, Machine, whether it runs in the
# anchor's batch loop) -> (its loop function, or None for the plain loops; what
# --explain-schedule says of it)
PoolScheduleRule = Callable[[Any, Any, Any, bool], tuple[Any, str]]
FlopsRule = Callable[[Any, Node], int]  # (graph, node) -> FLOPs for one sample
# (loop IR Expr, the activation node's attributes or None) -> Expr
ElementwiseRule = Callable[[Any, Any], Any]


def no_flops(graph: Any, node: Node) -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    """Everything cnnc knows about one op. `inputs` names the data inputs (None: any number,
    at least two); `params` follow them. Backward ops have no gradient rule."""

    name: str
    doc: str
    inputs: tuple[str, ...] | None
    shape: ShapeRule
    reference: ReferenceRule
    fusion: Fusion
    outputs: tuple[OutputDef, ...] = ()  # after the first, which is the layer's value
    params: tuple[ParamDef, ...] = ()
    gradient: GradientRule | None = None
    lower: LowerRule | None = None
    schedule: ScheduleRule | None = None
    flops: FlopsRule = no_flops
    kernel_tag: str = ""  # in the name of the forward kernel it anchors: LAYER_TAG_fwd
    pool_tag: str = ""  # a POOL op in its anchor's kernel name: c1_conv_relu_maxpool_fwd
    slot: Slot | None = None  # an epilogue's place in its anchor's kernel
    elementwise: ElementwiseRule | None = None  # an epilogue's value from the anchor's
    takes_pool: bool = False  # an anchor whose kernel may run a following POOL op
    pool_schedule: PoolScheduleRule | None = None  # a POOL op's code inside a scheduled anchor
    differentiable: bool = True  # False: a backward op (the gradient of nothing)
    activation: bool = False  # may end a layer: `conv c: 6 5x5 -> NAME`, or a line of its own
    sums: bool = False  # adds its inputs: autodiff sums a tensor's gradients with it
    # an activation with arguments, `leaky_relu(0.1)`, `clip(0, 6)`: (the arguments, as
    # floats, none or as many as `activation_arity` allows) -> its attributes, or ValueError
    # with the words of what was wrong
    activation_attrs: Callable[..., object] | None = None
    # how many arguments it takes: None for none, or at most one where it has
    # activation_attrs; clip's (2,), hardsigmoid's (0, 2)
    activation_arity: tuple[int, ...] | None = None
    # its arguments in words with an example, for a wrong count: "min and max: clip(0, 6)"
    activation_usage: str = ""
    # an activation after which weights start with He's N(0, factor / fan_in): (its
    # attributes) -> the factor (2 for relu), see fan_scaled
    he_factor: Callable[[object], float] | None = None
    # an op that computes otherwise at inference (batch norm, dropout): (node, the inference
    # pass's builder) -> the nodes that compute its first output in `forward` (passes/inference.py)
    inference: Callable[[Node, Any], list[Node]] | None = None
    # an op with buffers the training step updates (batch norm's running statistics):
    # (node, KernelProgram, name) -> the LoopFunction that updates them in place
    update_buffers: Callable[[Node, Any, str], Any] | None = None
    # a program using the op (after its network line), on which tests/ops checks the op's
    # gradient rule against finite differences and its kernels against the reference
    example: str = ""


# -- statements of the language and optimizers --------------------------------------------

@dataclass(frozen=True, slots=True)
class Step:
    """One primitive op a layer statement becomes; `suffix` names its output `LAYER.SUFFIX`
    unless it is the layer's last op, whose output is the layer's own name."""

    op: str
    attrs: object = None
    suffix: str = ""


# (the statement's AST node, irgen's LayerContext) -> the layer's ops, first to last; the
# context reports errors and marks the layer broken (see frontend/irgen.py)
StepsRule = Callable[[Any, Any], list[Step]]


@dataclass(frozen=True, slots=True)
class LayerDef:
    """A layer statement of the language (`conv`, `maxpool`, ...), keyed by its keyword.
    `positional` says in words what each positional argument is, by its grammar terminal,
    for syntax errors: (("INT", "a filter count like 6"), ("DIMS", "a kernel size ..."))."""

    keyword: str
    steps: StepsRule
    positional: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True, slots=True)
class LossDef:
    """`loss NAME ...`: the op it adds, its options (frontend OptionSpecs) and its target."""

    op: str
    options: dict[str, Any]
    target: str  # the target tensor's name, e.g. loss.labels
    target_dtype: DType | None  # None: the network's dtype
    attrs: Callable[[dict[str, Any]], object]  # the loss node's attributes, from the options
    # an activation the network must end in, and only there (softmax: it reads probabilities)
    needs_output: str | None = None
    # the op added instead where the last layer does not end in `needs_output`: it reads the
    # last layer's values as logits and applies that activation itself (cross-entropy's
    # softmax_cross_entropy); None: ending in `needs_output` is required
    logits_op: str | None = None


# The optimizer's scalars, in this order, in a small buffer the runtime passes at every step:
# what every OptimizerDef's update reads (each reads the fields it needs). Settings that
# change the update's form (nesterov, weight_decay) are constants of its code instead: an
# update without them is the same code it always was.
HYPER_FIELDS = ("lr", "momentum", "beta1", "beta2", "eps", "correction1", "correction2")


# A network with a loss line but no train line is trained with this optimizer and these
# settings (a module file records them).
DEFAULT_OPTIMIZER = "sgd"
DEFAULT_SETTINGS = {"lr": 0.01, "momentum": 0.0}


@dataclass(frozen=True, slots=True)
class OptimizerDef:
    """`train NAME ...`: the state each parameter keeps and the loop IR of one step."""

    name: str
    options: dict[str, Any]  # its own options of the train line (frontend OptionSpecs)
    states: tuple[str, ...]  # per parameter, named PARAM.STATE, shaped like it
    # (name, param, grad, states, hyper, settings) -> LoopFunction; `settings` are the train
    # line's (DEFAULT_SETTINGS without one), so a setting may be missing: its default applies
    lower_update: Callable[..., Any]
    # the train line's validated options -> the words of a problem between them, or None
    # (sgd: nesterov needs momentum); irgen reports it at the train line
    check: Callable[[dict[str, Any]], str | None] | None = None


_OPS: dict[str, OpDef] = {}
_LAYERS: dict[str, LayerDef] = {}
_LOSSES: dict[str, LossDef] = {}
_OPTIMIZERS: dict[str, OptimizerDef] = {}
_LOADED = False


def register_layer(layer: LayerDef) -> LayerDef:
    assert layer.keyword not in _LAYERS, f"statement {layer.keyword} is registered twice"
    _LAYERS[layer.keyword] = layer
    return layer


def register_loss(loss: LossDef) -> LossDef:
    assert loss.op not in _LOSSES, f"loss {loss.op} is registered twice"
    _LOSSES[loss.op] = loss
    return loss


def register_optimizer(optimizer: OptimizerDef) -> OptimizerDef:
    assert optimizer.name not in _OPTIMIZERS, f"optimizer {optimizer.name} is registered twice"
    _OPTIMIZERS[optimizer.name] = optimizer
    return optimizer


def layer(keyword: str) -> LayerDef:
    _load()
    return _LAYERS[keyword]


def layers() -> dict[str, LayerDef]:
    _load()
    return dict(_LAYERS)


def losses() -> dict[str, LossDef]:
    _load()
    return dict(_LOSSES)


def optimizers() -> dict[str, OptimizerDef]:
    _load()
    return dict(_OPTIMIZERS)


def gradient_sum() -> str:
    """The op autodiff adds the gradients of a tensor read by several ops with."""
    return next(op.name for op in all_ops() if op.sums)


def activations() -> tuple[str, ...]:
    """The words that may follow `->`: the ops marked `activation`."""
    return tuple(op.name for op in all_ops() if op.activation)


def register(op: OpDef) -> OpDef:
    assert op.name not in _OPS, f"op {op.name} is registered twice"
    _OPS[op.name] = op
    return op


def get(name: str) -> OpDef:
    """The definition of op `name` (AssertionError for an op no file defines)."""
    _load()
    assert name in _OPS, f"no op {name!r} is registered"
    return _OPS[name]


def all_ops() -> tuple[OpDef, ...]:
    _load()
    return tuple(_OPS.values())


def _load() -> None:
    """Import every op file of this folder, once (each registers its ops as it loads)."""
    global _LOADED
    if _LOADED:
        return
    folder = Path(__file__).parent
    # helper modules (window.py, lowering.py) register nothing: importing them is harmless
    for module in pkgutil.iter_modules([str(folder)]):
        importlib.import_module(f"cnnc.ops.{module.name}")
    _LOADED = True  # only now: an op file that fails to import fails every lookup alike


def check_node(node: Node) -> None:
    """A node has as many inputs as its op takes (AssertionError otherwise): its data inputs
    and then its parameters, or, for an op of any number of inputs, at least two."""
    op = get(node.op)
    if op.inputs is None:
        assert len(node.inputs) >= 2, f"{node.op} of {len(node.inputs)} input(s)"
    else:
        wanted = len(op.inputs) + len(op.params)
        assert len(node.inputs) == wanted, \
            f"{node.op} takes {wanted} inputs, but a node of it has {len(node.inputs)}"
    assert len(node.outputs) == 1 + len(op.outputs), \
        f"{node.op} makes {1 + len(op.outputs)} outputs, but a node of it has {len(node.outputs)}"


def check_complete(op: OpDef) -> list[str]:
    """The rules `op` lacks that some stage will ask for; empty when it has them all."""
    missing = []
    if op.differentiable and op.gradient is None:
        missing.append("a gradient rule (autodiff)")
    if op.fusion is not Fusion.ALIAS and op.lower is None:
        missing.append("a plain loop lowering (loops)")
    if op.fusion is Fusion.EPILOGUE and op.slot is None:
        missing.append("an epilogue slot (fuse)")
    if op.slot is Slot.ACTIVATION and op.elementwise is None:
        missing.append("its elementwise value, applied in an anchor's kernel (loops)")
    if op.fusion is Fusion.POOL and op.lower is None:
        missing.append("a lowering to run inside an anchor (loops)")
    if op.inputs is not None and not op.inputs:
        missing.append("at least one input (shapes)")
    return missing
