"""AST → graph IR: names every layer, checks the order of lines and every option, and
decomposes each layer into primitive ops on named tensors.

Errors are collected, not raised one by one: `generate` returns every diagnostic it found
together with a graph in which a layer that had an error is marked broken, so shape checking
can still look at the independent parts of the program and all errors are reported together.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections import Counter
from dataclasses import dataclass, field

from cnnc.diagnostics import Diagnostic, Note, Span
from cnnc.frontend import blocks
from cnnc.frontend import options as opts
from cnnc.frontend import syntax as ast
from cnnc.frontend.parse_errors import activation_names, statement_keywords
from cnnc.graph.ir import (
    BATCH,
    DType,
    Graph,
    Layer,
    Node,
    Phase,
    Role,
    Tensor,
    TrainConfig,
)
from cnnc.ops import registry
from cnnc.ops.registry import Step

MAX_NAME = 64  # characters of a network or layer name
LOSS_TENSOR = "loss"


@dataclass
class _LayerLine:
    """A layer statement together with the activation line that may follow it."""

    stmt: ast.LayerStmt
    activation: ast.Word | None


@dataclass
class _Sections:
    network: ast.NetworkStmt | None = None
    input: ast.InputStmt | None = None
    layers: list[_LayerLine] = field(default_factory=list)
    loss: ast.LossStmt | None = None
    train: ast.TrainStmt | None = None


@dataclass(frozen=True, slots=True)
class IrgenResult:
    graph: Graph
    diagnostics: tuple[Diagnostic, ...]
    broken_layers: frozenset[str]  # layers whose output shape cannot be known
    warnings: tuple[Diagnostic, ...] = ()


def generate(program: ast.Program, dtype: str | None = None) -> IrgenResult:
    """Build the graph of `program`; `dtype` ("f32"/"f64") overrides the input line's."""
    builder = _Builder(program.file)
    program, block_errors = blocks.expand(program)
    builder.diagnostics += block_errors
    sections = builder.sections(program)
    graph = builder.build(sections, dtype)
    return IrgenResult(graph, tuple(builder.diagnostics), frozenset(builder.broken),
                       tuple(builder.warnings))


def suggest(word: str, valid: tuple[str, ...] | list[str]) -> str:
    """`; did you mean 'x'?` for a near miss, else the list of valid words."""
    close = difflib.get_close_matches(word, valid, n=1, cutoff=0.6)
    if close:
        return f"; did you mean {close[0]!r}?"
    return "; expected one of " + ", ".join(valid)


class _Builder:
    def __init__(self, file: str) -> None:
        self.file = file
        self.diagnostics: list[Diagnostic] = []
        self.broken: set[str] = set()
        self.tensors: list[Tensor] = []
        self.nodes: list[Node] = []
        self.layers: list[Layer] = []
        self.names: dict[str, Span] = {}
        self.dtype = DType.F32
        self.values: dict[str, str] = {}  # a name a line may read -> its tensor
        self.later: dict[str, Span] = {}  # every label of the program, for "defined later"
        self.scopes: list[ast.ScopeStmt] = []  # the used blocks the current line is in
        self.warnings: list[Diagnostic] = []

    def error(self, message: str, span: Span | None, notes: tuple[Note, ...] = ()) -> None:
        self.diagnostics.append(Diagnostic(message, span, notes + self._use_notes()))

    def warning(self, message: str, span: Span | None, notes: tuple[Note, ...] = ()) -> None:
        self.warnings.append(Diagnostic(message, span, notes, severity="warning"))

    def _use_notes(self) -> tuple[Note, ...]:
        """Inside a used block, where each enclosing block was used."""
        return tuple(Note(f"in block {scope.block.text}, used as {scope.prefix.text} here",
                          scope.span) for scope in reversed(self.scopes))

    def start_span(self) -> Span:
        return Span.point(self.file, 1, 1)

    # -- the order of lines -------------------------------------------------------------------
    def sections(self, program: ast.Program) -> _Sections:
        found = _Sections()
        for index, stmt in enumerate(program.statements):
            if isinstance(stmt, ast.NetworkStmt):
                self._network_line(found, stmt, index)
            elif isinstance(stmt, ast.InputStmt):
                self._input_line(found, stmt)
            elif isinstance(stmt, ast.ActivationStmt):
                self._activation_line(found, stmt)
            elif isinstance(stmt, ast.LossStmt):
                self._once(found, "loss", stmt)
            elif isinstance(stmt, ast.TrainStmt):
                self._once(found, "train", stmt)
            elif isinstance(stmt, ast.ScopeStmt):
                found.layers.append(_LayerLine(stmt, None))
            else:
                named = f"{_kind_of(stmt)} {stmt.name.text}" if stmt.name else _kind_of(stmt)
                self._after_loss_check(found, stmt.span, named)
                found.layers.append(_LayerLine(stmt, getattr(stmt, "activation", None)))
        self._missing_lines(found)
        return found

    def _network_line(self, found: _Sections, stmt: ast.NetworkStmt, index: int) -> None:
        if found.network is None and index > 0:
            self.error("the network line must be the first line of the program", stmt.span)
        self._check_length(stmt.name.text, stmt.name.span)
        self._once(found, "network", stmt)

    def _check_length(self, name: str, span: Span) -> bool:
        """Names become symbols, file names and archive entries: they get a sane length."""
        if len(name) <= MAX_NAME:
            return True
        self.error(f"the name {name[:16]!r}... is {len(name):,} characters long; a name has "
                   f"at most {MAX_NAME}", span)
        return False

    def _input_line(self, found: _Sections, stmt: ast.InputStmt) -> None:
        if found.layers and found.input is None:
            first = found.layers[0].stmt
            self.error("the input line must come before the first layer", stmt.span,
                       (Note("the first layer is here", first.span),))
        self._once(found, "input", stmt)

    def _once(self, found: _Sections, section: str, stmt: ast.Statement) -> None:
        first = getattr(found, section)
        if first is not None:
            self.error(f"a second {section} line; a program has one",
                       stmt.span, (Note(f"the first {section} line is here", first.span),))
            return
        setattr(found, section, stmt)

    def _activation_line(self, found: _Sections, stmt: ast.ActivationStmt) -> None:
        word = stmt.activation
        if word.text not in activation_names():
            words = statement_keywords() + activation_names()
            self.error(f"unknown statement {word.text!r}{suggest(word.text, words)}", word.span)
            return
        self._after_loss_check(found, stmt.span, word.text)
        if not found.layers:
            self.error(f"{word.text} on a line of its own applies to the layer above, "
                       "but there is no layer above it", stmt.span)
            return
        above = found.layers[-1]
        if isinstance(above.stmt, ast.ScopeStmt):
            self.error(f"{word.text} on a line of its own applies to the layer above, but the "
                       f"line above uses block {above.stmt.block.text}; end the block's last "
                       "line with it instead", stmt.span)
            return
        if isinstance(above.stmt, ast.ActivationLayerStmt):
            self.error(f"{word.text} on a line of its own applies to the layer above, but that "
                       f"is an activation layer already; write 'activation NAME: {word.text}' "
                       "for another one", stmt.span)
            return
        if above.activation is not None:
            self.error(f"the layer above already has the activation {above.activation.text}; "
                       "a layer takes one", stmt.span,
                       (Note("that activation is here", above.activation.span),))
            return
        above.activation = word

    def _after_loss_check(self, found: _Sections, span: Span, what: str) -> None:
        if found.loss is not None:
            self.error(f"{what} comes after the loss line; layers go above it", span,
                       (Note("the loss line is here", found.loss.span),))

    def _missing_lines(self, found: _Sections) -> None:
        if found.network is None:
            self.error("missing the line 'network NAME'; a program starts with it",
                       self.start_span())
        if found.input is None:
            where = found.layers[0].stmt.span if found.layers else self.start_span()
            self.error("missing the input line, e.g. 'input image: 1x28x28', "
                       "before the first layer", where)
        if not found.layers and found.input is not None:
            self.error("the network has no layers", found.input.span)
        if found.train is not None and found.loss is None:
            self.error("the train line needs a loss line, e.g. 'loss cross_entropy', "
                       "to know what to minimise", found.train.span)

    # -- building the graph -------------------------------------------------------------------
    def build(self, found: _Sections, dtype: str | None) -> Graph:
        input_name = self._input(found.input, dtype)
        self.values[input_name] = input_name
        self.later = _labels(found)
        current = input_name
        kind_counts: Counter[str] = Counter()
        for line in found.layers:
            if isinstance(line.stmt, ast.ScopeStmt):
                current = self._scope(line.stmt, current)
                continue
            kind = _kind_of(line.stmt)
            kind_counts[kind] += 1
            current = self._layer(line, kind, kind_counts[kind], current)
        self._unread(current)
        loss, target = self._loss(found, current)
        train = self._train(found.train)
        name = found.network.name.text if found.network else "network"
        return Graph(name, self.dtype, tuple(self.tensors), tuple(self.nodes),
                     tuple(self.layers), input_name, current, loss, target, train)

    def _input(self, stmt: ast.InputStmt | None, dtype: str | None) -> str:
        if stmt is None:
            name, span, shape, auto = "input", self.start_span(), None, True
            self.broken.add(name)
        else:
            name = stmt.name.text if stmt.name else "input"
            span, auto = stmt.span, stmt.name is None
            values = self.checked_options(stmt.options, opts.INPUT_OPTIONS, "input", name)
            self.dtype = DType(dtype or values.get("dtype") or "f32")
            shape = self._input_shape(stmt.shape)
            if shape is None:
                self.broken.add(name)
        self._claim(name, span, None)
        full_shape = None if shape is None else (BATCH, *shape)
        self.tensors.append(Tensor(name, Role.INPUT, self.dtype, full_shape))
        self.layers.append(Layer(name, "input", auto, name, span))
        return name

    def _input_shape(self, dims: ast.Dims) -> tuple[int, ...] | None:
        if len(dims.values) not in (1, 2, 3):
            self.error("the input shape must be CxHxW like 1x28x28, a feature count like 784, "
                       f"or a 2-D sample like 4x5, got {dims.text}", dims.span)
            return None
        if min(dims.values) < 1 or max(dims.values) > opts.MAX_SIZE:
            self.error(f"input sizes must be from 1 to {opts.MAX_SIZE}, got {dims.text}",
                       dims.span)
            return None
        return dims.values

    def _claim(self, name: str, span: Span, auto_kind: str | None) -> str:
        """Register a layer name; a duplicate is reported and given a private unique name."""
        if not self._check_length(name, span):
            name = name[:MAX_NAME]
        first = self.names.get(name)
        if first is None:
            self.names[name] = span
            return name
        how = f" (the automatic name of this {auto_kind})" if auto_kind else ""
        self.error(f"duplicate name {name!r}{how}; names are unique within a network", span,
                   (Note(f"{name!r} is first used here", first),))
        unique = f"{name}~{len(self.names)}"
        self.names[unique] = span
        return unique

    def checked_options(self, given: tuple[ast.Option, ...], table: dict[str, opts.OptionSpec],
                 owner: str, layer: str) -> dict[str, object]:
        """Validated option values, defaults filled; a bad option marks `layer` broken."""
        values = {key: spec.default for key, spec in table.items()}
        seen: dict[str, ast.Option] = {}
        for option in given:
            key = option.key.text
            if key in seen:
                self.error(f"{owner}: the option {key} is given twice", option.span,
                           (Note("first given here", seen[key].span),))
            elif key not in table:
                valid = list(table) or ["(none)"]
                self.error(f"{owner} has no option {key!r}{suggest(key, valid)}", option.key.span)
            else:
                try:
                    values[key] = table[key].validate(option.value)
                except opts.OptionError as problem:
                    self.error(f"{owner}: {key} expects {problem}", option.value.span)
                else:
                    seen[key] = option
                    continue
            self.broken.add(layer)
            seen.setdefault(key, option)
        return values

    # -- layers -------------------------------------------------------------------------------
    def _layer(self, line: _LayerLine, kind: str, index: int, current: str) -> str:
        stmt = line.stmt
        auto = stmt.name is None
        given = f"{kind}{index}" if auto else stmt.name.text
        name = self._claim(given, stmt.name.span if stmt.name else stmt.span,
                           kind if auto else None)
        owner = name if auto else f"{kind} {name}"
        inputs, stmt = self._inputs(stmt, current, name, owner)
        steps = registry.layer(kind).steps(stmt, LayerContext(self, stmt, name, owner))
        activation = self._activation(line.activation, name)
        if activation is not None:
            steps.append(activation)
        if not steps:  # an activation layer whose activation was wrong (said already)
            self.broken.add(name)
        params = [self._params(step.op, name) for step in steps]
        current = inputs[0]
        for position, step in enumerate(steps):
            last = position == len(steps) - 1
            data = inputs if position == 0 else (current,)
            current = self._emit(step, (*data, *params[position]),
                                 name if last else f"{name}.{step.suffix}", name, stmt.span)
        uses = tuple(scope.span for scope in reversed(self.scopes))
        self.layers.append(Layer(name, kind, auto, current, stmt.span,
                                 activation.op if activation else None, uses))
        self.values[name] = current
        return current

    def _inputs(self, stmt: ast.LayerStmt, current: str, name: str, owner: str
                ) -> tuple[tuple[str, ...], ast.LayerStmt]:
        """What the layer reads (the line above, its `from=`, or a merge's names) and the
        statement without its `from=` option, which no op's option table knows."""
        if isinstance(stmt, ast.MergeStmt):
            return tuple(self._resolve(word, current, name, owner) for word in stmt.inputs), stmt
        given = [o for o in stmt.options if o.key.text == "from"]
        if not given:
            return (current,), stmt
        rest = tuple(o for o in stmt.options if o.key.text != "from")
        stmt = dataclasses.replace(stmt, options=rest)
        if len(given) > 1:
            self.error(f"{owner}: the option from is given twice", given[1].span,
                       (Note("first given here", given[0].span),))
        value = given[0].value
        if not isinstance(value, ast.Word):
            self.error(f"{owner}: from expects the name of a layer above, got {value.text}",
                       value.span)
            self.broken.add(name)
            return (current,), stmt
        return (self._resolve(value, current, name, owner),), stmt

    def _resolve(self, word: ast.Word, current: str, name: str, owner: str) -> str:
        """The tensor a name stands for; an unknown or later name is reported (the layer is
        broken and reads the line above meanwhile)."""
        tensor = self.values.get(word.text)
        if tensor is not None:
            return tensor
        self.broken.add(name)
        later = self.later.get(word.text)
        if word.text == name:
            self.error(f"{owner} reads its own output; a layer reads only the layers above "
                       "it", word.span)
        elif later is not None and (later.line, later.col) >= (word.span.line, word.span.col):
            self.error(f"{owner} reads {word.text!r}, which is defined later; a layer reads "
                       "only the layers above it", word.span,
                       (Note(f"{word.text!r} is defined here", later),))
        else:
            known = [n for n in self.values if "~" not in n]
            close = difflib.get_close_matches(word.text, known, n=1, cutoff=0.6)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            self.error(f"{owner} reads {word.text!r}, but no layer above has that name{hint}",
                       word.span)
        return current

    def _scope(self, stmt: ast.ScopeStmt, current: str) -> str:
        """Entering a used block: PREFIX.in names what it reads; leaving: PREFIX names
        what its last line made."""
        prefix = stmt.prefix.text
        if stmt.opening:
            self.scopes.append(stmt)
            self.values[f"{prefix}.in"] = current
            return current
        self.scopes.pop()
        if self._claim(prefix, stmt.prefix.span, None) == prefix:
            self.values[prefix] = current
        return current

    def _unread(self, output: str) -> None:
        """A layer whose output nothing reads is most likely a wrong `from=` or name."""
        read = {name for node in self.nodes for name in node.inputs}
        for layer in self.layers[1:]:
            if layer.output != output and layer.output not in read and \
                    layer.name not in self.broken:
                self.warning(f"the output of {layer.display} is never read; a later line "
                             "names it, or the line below it reads it", layer.span)

    def _params(self, op: str, layer: str) -> tuple[str, ...]:
        """The parameter tensors of one op of `layer`, named LAYER.PARAM."""
        declared = registry.get(op).params
        names = tuple(f"{layer}.{param.name}" for param in declared)
        self.tensors += [Tensor(name, Role(param.role), self.dtype)
                         for name, param in zip(names, declared, strict=True)]
        return names

    def _emit(self, step: Step, inputs: tuple[str, ...], out: str, layer: str,
              span: Span) -> str:
        self.tensors.append(Tensor(out, Role.VALUE, self.dtype))
        outputs: tuple[str, ...] = (out,)
        for extra in registry.get(step.op).outputs:  # e.g. where each maximum was
            outputs += (f"{layer}.{extra.name}",)
            self.tensors.append(Tensor(outputs[-1], Role.VALUE, extra.dtype or self.dtype))
        self.nodes.append(Node(step.op, inputs, outputs, layer, span, step.attrs))
        return out

    def _activation(self, act: ast.Act | None, layer: str) -> Step | None:
        """The activation's op with its attributes (`leaky_relu(0.1)`: its slope)."""
        if act is None or act.text == "none":
            return None
        if act.text not in activation_names():
            self.error(f"unknown activation {act.text!r}{suggest(act.text, activation_names())}",
                       act.name.span)
            return None
        op = registry.get(act.text)
        args = self._activation_args(act, op, layer)
        if args is None:
            return Step(act.text)  # the layer is broken: its attributes are never read
        if op.activation_attrs is None:
            return Step(act.text)
        try:
            return Step(act.text, op.activation_attrs(*args))
        except ValueError as problem:
            self.error(f"{act.text}: {problem}", act.span)
            self.broken.add(layer)
            return Step(act.text)

    def _activation_args(self, act: ast.Act, op: registry.OpDef, layer: str
                         ) -> tuple[float, ...] | None:
        """The activation's arguments as numbers, as many as it takes; None after an error."""
        arity = op.activation_arity or ((0, 1) if op.activation_attrs else (0,))
        problem = None
        if len(act.args) not in arity:
            problem = _arity_words(act.text, arity, op.activation_usage)
        word = next((a for a in act.args if not isinstance(a, ast.Number)), None)
        if problem is None and word is not None:
            problem = (f"{act.text}: an argument is a number like 0.1, inf or -inf, "
                       f"got {word.text!r}")
        if problem is not None:
            self.error(problem, act.span)
            self.broken.add(layer)
            return None
        return tuple(float(arg.value) for arg in act.args)

    def checked_count(self, number: ast.Number, what: str, owner: str, layer: str) -> int:
        """A filter or unit count; a bad one is reported and replaced by 1 (layer broken)."""
        value = number.value
        if isinstance(value, int) and 1 <= value <= opts.MAX_SIZE:
            return value
        bound = "at least 1" if value < 1 else f"at most {opts.MAX_SIZE}"
        self.error(f"{owner}: {what} must be {bound}, got {number.text}", number.span)
        self.broken.add(layer)
        return 1

    def checked_kernel(self, dims: ast.Dims, what: str, owner: str, layer: str) -> tuple[int, int]:
        values = dims.values
        if len(values) != 2:
            self.error(f"{owner}: {what} must be HxW like 3x3, got {dims.text}", dims.span)
        elif min(values) < 1 or max(values) > opts.MAX_SIZE:
            self.error(f"{owner}: {what} sizes must be from 1 to {opts.MAX_SIZE}, "
                       f"got {dims.text}", dims.span)
        else:
            return values[0], values[1]
        self.broken.add(layer)
        return 1, 1

    # -- loss and training --------------------------------------------------------------------
    def _loss(self, found: _Sections, output: str) -> tuple[str | None, str | None]:
        stmt = found.loss
        if stmt is None:
            return None, None
        kind = stmt.kind.text
        losses = registry.losses()
        if kind not in losses:
            self.error(f"unknown loss {kind!r}{suggest(kind, tuple(losses))}", stmt.kind.span)
            return None, None
        loss = losses[kind]
        values = self.checked_options(stmt.options, loss.options, f"loss {kind}", LOSS_TENSOR)
        op = loss.op if loss.needs_output is None else self._output_rules(found, stmt, loss)
        self.tensors.append(Tensor(loss.target, Role.TARGET, loss.target_dtype or self.dtype))
        self.tensors.append(Tensor(LOSS_TENSOR, Role.LOSS, self.dtype, ()))
        self.nodes.append(Node(op, (output, loss.target), (LOSS_TENSOR,), LOSS_TENSOR,
                               stmt.span, loss.attrs(values), Phase.LOSS))
        return LOSS_TENSOR, loss.target

    def _output_rules(self, found: _Sections, loss: ast.LossStmt,
                      definition: registry.LossDef) -> str:
        """The op of a loss that reads, say, probabilities: activation `needs_output`
        (softmax) may end the last layer and only that one. Where it does, the loss is
        `op`; where it does not, `logits_op`, which applies the activation itself (cross-
        entropy of logits), or, for a loss without one, an error."""
        wanted = definition.needs_output
        if not found.layers:
            return definition.op
        displays = [layer.display for layer in self.layers[1:]]
        # the layer lines, without the markers of where used blocks start and end
        lines = [line for line in found.layers if not isinstance(line.stmt, ast.ScopeStmt)]
        if not lines:
            return definition.op
        for position, line in enumerate(lines[:-1]):
            if line.activation is not None and line.activation.text == wanted:
                self.error(f"{wanted} must be the last layer before loss {loss.kind.text}, but "
                           f"{displays[position + 1]} follows it", line.activation.span,
                           (Note("the loss is here", loss.span),))
        last = lines[-1]
        if last.activation is not None and last.activation.text == wanted:
            return definition.op
        if definition.logits_op is not None:
            return definition.logits_op
        ends = f"ends in {last.activation.text}" if last.activation else "has no activation"
        self.error(f"loss {loss.kind.text} needs a {wanted} output, but the last layer, "
                   f"{displays[-1]}, {ends}; end it with '-> {wanted}'", loss.span,
                   (Note("the last layer is here", last.stmt.span),))
        return definition.op

    def _train(self, stmt: ast.TrainStmt | None) -> TrainConfig | None:
        if stmt is None:
            return None
        optimizer = stmt.optimizer.text
        optimizers = registry.optimizers()
        if optimizer not in optimizers:
            valid = tuple(optimizers)
            self.error(f"unknown optimizer {optimizer!r}{suggest(optimizer, valid)}",
                       stmt.optimizer.span)
            return None
        table = opts.train_options(optimizers[optimizer].options)
        values = self.checked_options(stmt.options, table, f"train {optimizer}", "train")
        check = optimizers[optimizer].check  # options that are fine alone but not together
        problem = check(values) if check and "train" not in self.broken else None
        if problem:
            self.error(problem, stmt.span)
        return TrainConfig(optimizer, tuple(values.items()), stmt.span)


def _arity_words(name: str, arity: tuple[int, ...], usage: str) -> str:
    """`clip takes 2 arguments, min and max: clip(0, 6)`, `relu takes no argument; write
    relu`, `leaky_relu takes 1 argument or none, the slope: leaky_relu(0.1)`."""
    counts = sorted(n for n in arity if n)
    if not counts:
        return f"{name} takes no argument; write {name}"
    plural = "argument" if counts == [1] else "arguments"
    none = " or none" if 0 in arity else ""
    return f"{name} takes {' or '.join(map(str, counts))} {plural}{none}, {usage}"


def _kind_of(stmt: ast.LayerStmt) -> str:
    if isinstance(stmt, (ast.PoolStmt, ast.MergeStmt, ast.GlobalPoolStmt,
                         ast.ActivationLayerStmt)):
        return stmt.kind.text
    return type(stmt).__name__.removesuffix("Stmt").lower()


def _labels(found: _Sections) -> dict[str, Span]:
    """Every name a line of the program gives, where it first does."""
    labels: dict[str, Span] = {}
    for line in found.layers:
        word = line.stmt.prefix if isinstance(line.stmt, ast.ScopeStmt) else line.stmt.name
        if word is not None:
            labels.setdefault(word.text, word.span)
    return labels


def _option_span(stmt: ast.ConvStmt | ast.PoolStmt, key: str) -> Span:
    return next(o.span for o in stmt.options if o.key.text == key)


class LayerContext:
    """What an op file's `LayerDef.steps` may ask of irgen for one layer statement: its name
    and how to report errors (every error marks the layer broken)."""

    def __init__(self, builder: _Builder, stmt: ast.LayerStmt, name: str, owner: str) -> None:
        self._builder = builder
        self._stmt = stmt
        self.name = name
        self.owner = owner  # the layer as messages name it: `conv c1`, or `maxpool1`

    def error(self, message: str, span: Span) -> None:
        self._builder.error(message, span)
        self._builder.broken.add(self.name)

    def count(self, number: ast.Number, what: str) -> int:
        return self._builder.checked_count(number, what, self.owner, self.name)

    def kernel(self, dims: ast.Dims, what: str) -> tuple[int, int]:
        return self._builder.checked_kernel(dims, what, self.owner, self.name)

    def options(self, given: tuple[ast.Option, ...], table: dict[str, opts.OptionSpec]
                ) -> dict[str, object]:
        return self._builder.checked_options(given, table, self.owner, self.name)

    def option_span(self, key: str) -> Span:
        return _option_span(self._stmt, key)
