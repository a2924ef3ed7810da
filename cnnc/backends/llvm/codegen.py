"""Loop IR → LLVM IR through llvmlite → native object code for the target CPU.

Each loop function becomes one LLVM function named after its kernel (`c1_conv_relu_fwd`),
with noalias pointer arguments; `cnnc_forward(N, buffers)` calls them in order, so running
the network is one native call. Scalars and loop indices live in allocas that LLVM promotes
to registers.

Floating-point arithmetic is exactly what the loop IR says: no fast-math flags, not even
`contract`, and every `x ± a·b` is one explicit `llvm.fma` where the CPU has FMA (else a
multiply and an add). With `contract`, whether LLVM fuses a pair depends on the code around
it: -O0 instruction selection fused some rows of a register block and not others, and at
-O1 the scalar remainder of a vectorized loop paired its multiplies into a vector and added
them one by one. A sample's result then depended on where its thread's slice put it. Spelt
out, each element gets the same operations on every path, at every optimisation level, so
`forward` is bit-identical for any thread count.
"""

from __future__ import annotations

import copy
import dataclasses
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass

import llvmlite.binding as llvm
import llvmlite.ir as ir

from cnnc.backends.llvm.host import LLVM_LOCK, create_machine, initialise
from cnnc.backends.llvm.objects import pack_objects
from cnnc.backends.llvm.parallel import emit_parallel
from cnnc.backends.llvm.team import FINISH, I8P, emit_team, uses_team
from cnnc.backends.target import CpuTarget
from cnnc.graph.ir import BATCH, DType
from cnnc.loops.canonical import shared_code
from cnnc.loops.ir import (
    Assign,
    Binary,
    BinOp,
    Broadcast,
    Buffer,
    Const,
    Expr,
    For,
    If,
    Lane,
    Load,
    LoopFunction,
    LoopKind,
    Ramp,
    Select,
    Stmt,
    Unary,
    UnaryOp,
    Var,
    VecLoad,
    VecStore,
)

ENTRY = "cnnc_forward"
I64 = ir.IntType(64)
I1 = ir.IntType(1)
FLOAT_TYPES = {DType.F32: ir.FloatType(), DType.F64: ir.DoubleType()}
ELEMENT_TYPES = {**FLOAT_TYPES, DType.I32: ir.IntType(32), DType.I64: I64}


@dataclass(frozen=True, slots=True)
class NativeCode:
    object_code: bytes  # object files, one per LLVM module, joined by `pack_objects`
    llvm_ir: str  # after optimisation
    target: CpuTarget


# Kernels are spread over this many LLVM modules, optimised and code-generated at the same
# time on as many cores as there are: LLVM's passes are most of a compile. A fixed number
# keeps the object code the same on every machine, whatever its core count.
MODULE_COUNT = 4
MODULE_SEPARATOR = "\n; ---- next module ----\n"


def compile_functions(functions: tuple[LoopFunction, ...], storage: list[str],
                      opt_level: int = 3, entries: dict[str, list[str]] | None = None, *,
                      target: CpuTarget, sizes: dict[str, int] | None = None,
                      rarely: frozenset[str] = frozenset(), serial: bool = False) -> NativeCode:
    """Generate, verify, optimise (at -O`opt_level`) and emit object code for `target`.
    `entries` maps each entry point to the kernels it runs in order (default:
    `cnnc_forward`, all). `sizes` (each function's printed length, by name) balances the
    modules; it is measured here where the caller has not. The functions named in
    `rarely` (the pack entry point's, run once per change of the parameters) go to a
    module of their own at -O1 at most: their speed hardly matters, and -O3 took seconds
    over their many small copy nests (a 12x8 kernel of stride 6x7: 0.7 s at -O1, 8.5 s
    at -O2). `serial`: code that no thread team will run (a C library's, `--emit lib`)."""
    entries = entries or {ENTRY: [f.name for f in functions]}
    shared = shared_code(functions)  # copies of a kernel are compiled once (loops.canonical)
    compiled = tuple(f for f in functions if shared[f.name] == f.name)
    often = tuple(f for f in compiled if f.name not in rarely)
    seldom = tuple(f for f in compiled if f.name in rarely)
    # each job builds its LLVM IR in the worker too: in Python, that is a quarter of the work
    jobs = [Job(group, storage, None, opt_level, target) for group in _groups(often, sizes)]
    if seldom:
        jobs.append(Job(seldom, storage, None, min(opt_level, 1), target))
    # the entry points call the kernels and need only their signatures: without the bodies,
    # the job a worker is sent is a fraction of the size
    signatures = tuple(dataclasses.replace(f, locals=(), body=()) for f in functions)
    teamed = frozenset(f.name for f in compiled if uses_team(f))  # the bodies tell
    jobs.append(Job(signatures, storage, entries, opt_level, target, teamed, serial, shared))
    initialise()  # before any fork, so that no worker needs LLVM's lock to set it up
    with LLVM_LOCK:
        results = _run_jobs(jobs)
    objects = tuple(obj for obj, _ in results)
    return NativeCode(pack_objects(objects), MODULE_SEPARATOR.join(t for _, t in results),
                      target)


@dataclass(frozen=True, slots=True)
class Job:
    """One LLVM module to compile: kernels (entries None) or the entry points calling them.
    It carries its target because a forked worker compiles it, and a worker asks no host."""

    functions: tuple[LoopFunction, ...]
    storage: list[str]
    entries: dict[str, list[str]] | None
    opt_level: int
    target: CpuTarget
    teamed: frozenset[str] = frozenset()  # kernels that take the thread team (signatures)
    serial: bool = False  # never given a team (backends.llvm.team.emit_team)
    shared: dict[str, str] | None = None  # kernel -> the kernel whose code it calls


def _run_jobs(jobs: list[Job]) -> list[tuple[bytes, str]]:
    """Every module compiled, in forked worker processes where there are several cores:
    llvmlite serialises all calls behind one lock, so threads would not run LLVM at once."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    workers = min(len(jobs), cores)
    if workers < 2 or "fork" not in multiprocessing.get_all_start_methods():
        return [_compile_job(job) for job in jobs]
    context = multiprocessing.get_context("fork")
    try:
        # a forked worker inherits the jobs (an initialiser's arguments are not pickled
        # under fork) and is sent only their numbers: pickling the loop functions cost more
        # than building their LLVM IR
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_receive_jobs,
                                 initargs=(jobs,)) as pool:
            return list(pool.map(_compile_numbered, range(len(jobs))))
    except (OSError, BrokenProcessPool):  # no processes to be had: compile here instead
        return [_compile_job(job) for job in jobs]


_WORKER_JOBS: list[Job] = []  # in a worker process only: the jobs it was forked with


def _receive_jobs(jobs: list[Job]) -> None:
    _WORKER_JOBS[:] = jobs


def _compile_numbered(number: int) -> tuple[bytes, str]:
    return _compile_job(_WORKER_JOBS[number])


def _compile_job(job: Job) -> tuple[bytes, str]:
    """A module of kernels (entries None) or of the entry points calling them, compiled."""
    if job.entries is None:
        module = build_module(job.functions, job.storage, {}, has_fma=job.target.has_fma)
    else:
        module = build_entry_module(job.functions, job.storage, job.entries,
                                    job.target.triple, job.teamed, job.serial, job.shared)
    return _compile_text(str(module), job.opt_level, job.target)


def _groups(functions: tuple[LoopFunction, ...],
            sizes: dict[str, int] | None = None) -> list[tuple[LoopFunction, ...]]:
    """Kernels in MODULE_COUNT groups of about equal size, largest kernels placed first."""
    from cnnc.loops.printer import format_function

    if sizes is None:
        sizes = {f.name: len(format_function(f)) for f in functions}
    bins: list[list[LoopFunction]] = [[] for _ in range(MODULE_COUNT)]
    totals = [0] * MODULE_COUNT
    for function in sorted(functions, key=lambda f: -sizes[f.name]):
        smallest = totals.index(min(totals))
        bins[smallest].append(function)
        totals[smallest] += sizes[function.name]
    return [tuple(group) for group in bins if group]


def _compile_text(text: str, opt_level: int, target: CpuTarget) -> tuple[bytes, str]:
    """One module, in an LLVM context of its own."""
    machine = create_machine(target.triple, target.cpu, target.features, opt_level)
    parsed = llvm.parse_assembly(text, context=llvm.create_context())
    parsed.triple = target.triple
    parsed.data_layout = str(machine.target_data)
    parsed.verify()
    if opt_level > 0:
        tuning = llvm.create_pipeline_tuning_options(speed_level=opt_level)
        tuning.loop_vectorization = True
        tuning.slp_vectorization = True
        builder = llvm.create_pass_builder(machine, tuning)
        builder.getModulePassManager().run(parsed, builder)
    return machine.emit_object(parsed), str(parsed)


def assembly(llvm_ir: str, opt_level: int = 3, *, target: CpuTarget) -> str:
    """`target`'s assembly of (already optimised) LLVM IR text, for `--emit asm`."""
    with LLVM_LOCK:
        machine = create_machine(target.triple, target.cpu, target.features, opt_level)
        return "".join(machine.emit_assembly(llvm.parse_assembly(text))
                       for text in llvm_ir.split(MODULE_SEPARATOR))


def build_module(functions: tuple[LoopFunction, ...], storage: list[str],
                 entries: dict[str, list[str]] | None = None, *, has_fma: bool,
                 triple: str = "") -> ir.Module:
    """The kernels `functions`, and the entry points `entries` (default: none; with some,
    the team's functions, for `triple`). `has_fma`: whether the CPU the module is for has
    fused multiply-add, which `x ± a·b` then is."""
    module = ir.Module(name="cnnc")
    declared = [_declare(module, f) for f in functions]
    for function, llvm_function in zip(functions, declared, strict=True):
        _Emitter(module, function, llvm_function, has_fma).emit()
    if entries:
        emit_team(module, triple, worker=any(uses_team(f) for f in functions))
        _emit_entries(module, functions, declared, storage, entries)
    return module


def build_entry_module(functions: tuple[LoopFunction, ...], storage: list[str],
                       entries: dict[str, list[str]], triple: str,
                       teamed: frozenset[str] = frozenset(),
                       serial: bool = False,
                       shared: dict[str, str] | None = None) -> ir.Module:
    """The entry points, calling kernels defined in the other modules, and the thread
    team's functions (backends.llvm.team) for `triple`. `functions` may be signatures
    only: `teamed` names those that take the team; `shared` maps each kernel to the one
    whose code it calls (`loops.canonical.shared_code`; default: its own)."""
    module = ir.Module(name="cnnc_entries")
    shared = shared or {f.name: f.name for f in functions}
    own = {f.name: _declare(module, f, f.name in teamed) for f in functions
           if shared[f.name] == f.name}
    declared = [own[shared[f.name]] for f in functions]
    emit_team(module, triple, worker=bool(teamed) and not serial, serial=serial)
    _emit_entries(module, functions, declared, storage, entries)
    return module


def _emit_entries(module: ir.Module, functions: tuple[LoopFunction, ...],
                  declared: list[ir.Function], storage: list[str],
                  entries: dict[str, list[str]]) -> None:
    by_name = {f.name: (f, d) for f, d in zip(functions, declared, strict=True)}
    for entry, names in entries.items():
        chosen = [by_name[name] for name in names]
        _emit_entry(module, entry, [c[0] for c in chosen], [c[1] for c in chosen], storage)


def _declare(module: ir.Module, function: LoopFunction, teamed: bool = False) -> ir.Function:
    """`void KERNEL(i64 N, T* buffer, ..., [i8* team])`: the team where it has a parallel
    loop."""
    arg_types = [I64] + [ELEMENT_TYPES[b.dtype].as_pointer() for b in function.buffers]
    if teamed or uses_team(function):
        arg_types.append(I8P)
    llvm_function = ir.Function(module, ir.FunctionType(ir.VoidType(), arg_types), function.name)
    for arg in llvm_function.args[1:len(function.buffers) + 1]:
        arg.add_attribute("noalias")
    return llvm_function


def _emit_entry(module: ir.Module, name: str, functions: list[LoopFunction],
                declared: list[ir.Function], storage: list[str]) -> None:
    """`void NAME(i64 N, i8** buffers)`: calls `functions` in order; buffers as in `storage`,
    then the thread team of the call (null: none), which is sent home at the end."""
    entry = ir.Function(module, ir.FunctionType(ir.VoidType(), [I64, I8P.as_pointer()]),
                        name)
    builder = ir.IRBuilder(entry.append_basic_block("entry"))
    batch, table = entry.args
    team = builder.load(builder.gep(table, [ir.Constant(I64, len(storage))], inbounds=True))
    for function, llvm_function in zip(functions, declared, strict=True):
        args = [batch]
        for buffer in function.buffers:
            slot = builder.gep(table, [ir.Constant(I64, storage.index(buffer.name))],
                               inbounds=True)
            raw = builder.load(slot)
            args.append(builder.bitcast(raw, ELEMENT_TYPES[buffer.dtype].as_pointer()))
        if len(llvm_function.args) > len(function.buffers) + 1:  # it takes the team
            args.append(team)
        builder.call(llvm_function, args)
    builder.call(module.globals[FINISH], [team])
    builder.ret_void()


class _Emitter:
    """Emits one loop function: statements recursively, expressions to SSA values."""

    def __init__(self, module: ir.Module, function: LoopFunction, llvm_function: ir.Function,
                 has_fma: bool):
        self.module = module
        self.function = function
        self.float_type = next(FLOAT_TYPES[b.dtype] for b in function.buffers
                               if b.dtype in FLOAT_TYPES)
        self.builder = ir.IRBuilder(llvm_function.append_basic_block("entry"))
        self.batch = llvm_function.args[0]
        self.pointers = {b.name: arg for b, arg in
                         zip(function.buffers, llvm_function.args[1:len(function.buffers) + 1],
                             strict=True)}
        self.slots: dict[str, ir.AllocaInstr] = {}
        self.has_fma = has_fma  # the CPU's: whether `x ± a·b` is one fused multiply-add
        self.team = llvm_function.args[-1] if uses_team(function) else None
        self.parts = 0  # parallel loops outlined so far, for their functions' names

    def fork(self, llvm_function: ir.Function, batch: ir.Value,
             pointers: dict[str, ir.Value]) -> _Emitter:
        """An emitter of the same loop function's code into `llvm_function` (an outlined
        parallel loop), with these values of N and of the buffers, and no slots yet."""
        other = copy.copy(self)
        other.builder = ir.IRBuilder(llvm_function.append_basic_block("entry"))
        other.batch, other.pointers, other.slots = batch, pointers, {}
        return other

    def emit(self) -> None:
        for local in self.function.locals:
            kind = ELEMENT_TYPES[local.dtype]
            if local.lanes > 1:
                kind = ir.VectorType(kind, local.lanes)
            self.slots[local.name] = self.builder.alloca(kind, name=local.name)
        for stmt in self.function.body:
            self.statement(stmt)
        self.builder.ret_void()

    # -- statements ---------------------------------------------------------------------------
    def statement(self, stmt: Stmt) -> None:
        if isinstance(stmt, For) and stmt.kind is LoopKind.PARALLEL:
            emit_parallel(self, stmt)
        elif isinstance(stmt, For):
            self.loop(stmt)
        elif isinstance(stmt, If):
            with self.builder.if_then(self.expr(stmt.cond)):
                for inner in stmt.body:
                    self.statement(inner)
        elif isinstance(stmt, Assign):
            slot = self.slots[stmt.var]
            self.builder.store(self.convert(self.expr(stmt.value), slot.type.pointee), slot)
        elif isinstance(stmt, VecStore):
            value = self.expr(stmt.value)
            element = ELEMENT_TYPES[self.function.buffer(stmt.buffer).dtype]
            value = self.convert(value, ir.VectorType(element, value.type.count))
            pointer = self.vector_pointer(stmt.buffer, stmt.index, value.type.count)
            self.builder.store(value, pointer, align=self._element_bytes(stmt.buffer))
        else:
            buffer = self.function.buffer(stmt.buffer)
            address = self.address(buffer, stmt.index)
            self.builder.store(self.convert(self.expr(stmt.value), ELEMENT_TYPES[buffer.dtype]),
                               address)

    def loop(self, stmt: For) -> None:
        """for (var = 0; var < extent; ++var): the index in an entry-block alloca."""
        slot = self._index_slot(stmt.var)
        extent = self.expr(stmt.extent)
        self.builder.store(ir.Constant(I64, 0), slot)
        function = self.builder.function
        test = function.append_basic_block(f"{stmt.var}.test")
        body = function.append_basic_block(f"{stmt.var}.body")
        done = function.append_basic_block(f"{stmt.var}.done")
        self.builder.branch(test)
        self.builder.position_at_end(test)
        current = self.builder.load(slot)
        self.builder.cbranch(self.builder.icmp_signed("<", current, extent), body, done)
        self.builder.position_at_end(body)
        for inner in stmt.body:
            self.statement(inner)
        following = self.builder.add(self.builder.load(slot), ir.Constant(I64, 1), flags=["nsw"])
        self.builder.store(following, slot)
        self.builder.branch(test)
        self.builder.position_at_end(done)

    def _index_slot(self, name: str) -> ir.AllocaInstr:
        if name not in self.slots:
            with self.builder.goto_entry_block():
                self.slots[name] = self.builder.alloca(I64, name=name)
        return self.slots[name]

    def address(self, buffer: Buffer, index: tuple[Expr, ...]) -> ir.Value:
        """Row-major flat offset; a batch extent N may be any dimension."""
        offset = None
        for axis, item in enumerate(index):
            stride = 1
            batch_inside = False
            for dim in buffer.shape[axis + 1:]:
                if dim == BATCH:
                    batch_inside = True
                else:
                    stride *= dim
            scale: ir.Value = ir.Constant(I64, stride)
            if batch_inside:
                scale = self.builder.mul(scale, self.batch, flags=["nsw"])
            term = self.builder.mul(self.expr(item), scale, flags=["nsw"])
            offset = term if offset is None else self.builder.add(offset, term, flags=["nsw"])
        return self.builder.gep(self.pointers[buffer.name], [offset], inbounds=True)

    def vector_pointer(self, name: str, index: tuple[Expr, ...], lanes: int) -> ir.Value:
        buffer = self.function.buffer(name)
        kind = ir.VectorType(ELEMENT_TYPES[buffer.dtype], lanes)
        return self.builder.bitcast(self.address(buffer, index), kind.as_pointer())

    def vector_load(self, expr: VecLoad) -> ir.Value:
        """A strided load reads the span from the first lane's element to the last one's
        (never past it) and keeps every stride-th: a few wide loads and a shuffle, where
        lanes separate loads would each cost an instruction."""
        span = (expr.lanes - 1) * expr.stride + 1
        pointer = self.vector_pointer(expr.buffer, expr.index, span)
        loaded = self.builder.load(pointer, align=self._element_bytes(expr.buffer))
        if expr.stride == 1:
            return loaded
        picks = ir.Constant(ir.VectorType(ir.IntType(32), expr.lanes),
                            [i * expr.stride for i in range(expr.lanes)])
        return self.builder.shuffle_vector(loaded, ir.Constant(loaded.type, ir.Undefined),
                                           picks)

    def _element_bytes(self, name: str) -> int:
        """Vector accesses promise only element alignment: numpy aligns no further."""
        return 8 if self.function.buffer(name).dtype in (DType.F64, DType.I64) else 4

    def splat(self, value: ir.Value, lanes: int) -> ir.Value:
        vector_type = ir.VectorType(value.type, lanes)
        single = self.builder.insert_element(ir.Constant(vector_type, ir.Undefined), value,
                                             ir.Constant(ir.IntType(32), 0))
        mask = ir.Constant(ir.VectorType(ir.IntType(32), lanes), [0] * lanes)
        return self.builder.shuffle_vector(single, ir.Constant(vector_type, ir.Undefined), mask)

    def matched(self, left: ir.Value, right: ir.Value) -> tuple[ir.Value, ir.Value]:
        """A scalar beside a vector is broadcast to the vector's lanes."""
        left_vector = isinstance(left.type, ir.VectorType)
        if left_vector == isinstance(right.type, ir.VectorType):
            return left, right
        if left_vector:
            return left, self.splat(right, left.type.count)
        return self.splat(left, right.type.count), right

    # -- expressions --------------------------------------------------------------------------
    def expr(self, expr: Expr) -> ir.Value:
        if isinstance(expr, Var):
            return self.batch if expr.name == BATCH else self.builder.load(self.slots[expr.name])
        if isinstance(expr, Const):
            kind = self.float_type if expr.is_float else I64
            return ir.Constant(kind, expr.value)
        if isinstance(expr, Load):
            buffer = self.function.buffer(expr.buffer)
            value = self.builder.load(self.address(buffer, expr.index))
            return self.builder.sext(value, I64) if buffer.dtype is DType.I32 else value
        if isinstance(expr, VecLoad):
            return self.vector_load(expr)
        if isinstance(expr, Broadcast):
            return self.splat(self.expr(expr.value), expr.lanes)
        if isinstance(expr, Ramp):
            steps = ir.Constant(ir.VectorType(I64, expr.lanes),
                                [i * expr.step for i in range(expr.lanes)])
            return self.builder.add(self.splat(self.expr(expr.base), expr.lanes), steps,
                                    flags=["nsw"])
        if isinstance(expr, Lane):
            return self.builder.extract_element(self.expr(expr.vector),
                                                ir.Constant(ir.IntType(32), expr.lane))
        if isinstance(expr, Select):
            values = [self.expr(e) for e in (expr.cond, expr.then, expr.otherwise)]
            return self.select(*self.widened(values))
        if isinstance(expr, Unary):
            return self.unary(expr.op, self.expr(expr.operand))
        product = _product(expr.left, expr.right) if expr.op in _ADDITIVE else None
        if product is not None:
            return self.multiply_add(expr, *product)
        return self.binary(expr.op, *self.matched(self.expr(expr.left), self.expr(expr.right)))

    def multiply_add(self, expr: Binary, product: Binary, product_on_left: bool) -> ir.Value:
        """`c ± a·b` or `a·b ± c`: one fused multiply-add of floats where the CPU has FMA,
        else (and for indices) a multiply, then an add."""
        factors = [self.expr(product.left), self.expr(product.right)]
        addend = self.expr(expr.right if product_on_left else expr.left)
        element = _element(factors[0].type)
        if not self.has_fma or isinstance(element, ir.IntType):
            term = self.binary(BinOp.MUL, *self.matched(*factors))
            pair = (term, addend) if product_on_left else (addend, term)
            return self.binary(expr.op, *self.matched(*pair))
        # c − a·b = fma(−a, b, c); a·b − c = fma(a, b, −c): negation is exact
        if expr.op is BinOp.SUB:
            if product_on_left:
                addend = self.builder.fneg(addend)
            else:
                factors[0] = self.builder.fneg(factors[0])
        operands = self.widened([*factors, addend])
        return self.builder.call(self.intrinsic("fma", operands[0].type, 3), operands)

    def intrinsic(self, name: str, kind: ir.Type, arity: int) -> ir.Function:
        """llvm.NAME for floats or float vectors of `kind`, taking `arity` of them (llvmlite's
        declare_intrinsic cannot name the vector versions)."""
        suffix = "f32" if _element(kind) == ir.FloatType() else "f64"
        if isinstance(kind, ir.VectorType):
            suffix = f"v{kind.count}{suffix}"
        symbol = f"llvm.{name}.{suffix}"
        return self.module.globals.get(symbol) or ir.Function(
            self.module, ir.FunctionType(kind, [kind] * arity), symbol)

    def widened(self, values: list[ir.Value]) -> list[ir.Value]:
        """Scalars among vectors broadcast to the vectors' lanes."""
        lanes = max((v.type.count for v in values if isinstance(v.type, ir.VectorType)),
                    default=0)
        if not lanes:
            return values
        return [v if isinstance(v.type, ir.VectorType) else self.splat(v, lanes)
                for v in values]

    def select(self, cond: ir.Value, then: ir.Value, otherwise: ir.Value) -> ir.Value:
        chosen = self.builder.select(cond, then, otherwise)
        # which side wins is data (max pooling, relu): a branch would be mispredicted
        chosen.set_metadata("unpredictable", self.module.add_metadata([]))
        return chosen

    def binary(self, op: BinOp, left: ir.Value, right: ir.Value) -> ir.Value:
        b = self.builder
        if op is BinOp.AND:
            return b.and_(left, right)
        if op is BinOp.OR:
            return b.or_(left, right)
        element = _element(left.type)
        is_float = not isinstance(element, ir.IntType)
        if op.is_comparison:
            # ordered: any comparison with NaN is false, as in numpy; llvmlite takes the
            # comparison as its C spelling, which is the operator's value
            if is_float:
                return b.fcmp_ordered(op.value, left, right)
            return b.icmp_signed(op.value, left, right)
        if not is_float:
            if op is BinOp.FLOOR_DIV:  # only on indices known to be >= 0 where it matters
                return b.sdiv(left, right)
            if op is BinOp.MOD:
                return b.srem(left, right)
            return {BinOp.ADD: b.add, BinOp.SUB: b.sub, BinOp.MUL: b.mul}[op](
                left, right, flags=["nsw"])
        if op is BinOp.MAX:  # NaN-propagating, branch-free on x86
            return b.call(self.intrinsic("maximum", left.type, 2), [left, right])
        method = {BinOp.ADD: b.fadd, BinOp.SUB: b.fsub, BinOp.MUL: b.fmul,
                  BinOp.DIV: b.fdiv}[op]
        return method(left, right)

    def unary(self, op: UnaryOp, value: ir.Value) -> ir.Value:
        if op is UnaryOp.NEG:
            return self.builder.fneg(value)
        if op is UnaryOp.ISNAN:
            return self.builder.fcmp_unordered("uno", value, value)
        if op in _INTRINSICS and isinstance(value.type, ir.VectorType):
            return self.builder.call(self.intrinsic(op.value, value.type, 1), [value])
        if op in _INTRINSICS:
            intrinsic = self.module.declare_intrinsic(f"llvm.{op.value}", [value.type])
            return self.builder.call(intrinsic, [value])
        if op is UnaryOp.FLOAT:
            return self.builder.sitofp(value, self.float_type)
        if op in _LIBM and isinstance(value.type, ir.VectorType):
            return self._libm_lanes(op.value, value)
        if op in _LIBM:
            return self.builder.call(self._libm(op.value, value.type), [value])
        raise AssertionError(f"no LLVM lowering of {op.value}")

    def _libm_lanes(self, name: str, value: ir.Value) -> ir.Value:
        """The C library's scalar function on each lane of a vector (it has no vector
        ones): an activation applied to a block's accumulators, tanh or gelu's erf."""
        function = self._libm(name, value.type.element)
        result = ir.Constant(value.type, ir.Undefined)
        for lane in range(value.type.count):
            index = ir.Constant(ir.IntType(32), lane)
            scalar = self.builder.call(function, [self.builder.extract_element(value, index)])
            result = self.builder.insert_element(result, scalar, index)
        return result

    def _libm(self, name: str, kind: ir.Type) -> ir.Function:
        """The C library's function (tanhf for float): correctly rounded to within an ulp."""
        symbol = name + ("f" if kind == ir.FloatType() else "")
        existing = self.module.globals.get(symbol)
        if existing is not None:
            return existing
        return ir.Function(self.module, ir.FunctionType(kind, [kind]), symbol)

    def convert(self, value: ir.Value, wanted: ir.Type) -> ir.Value:
        if value.type == wanted:
            return value
        if isinstance(wanted, ir.VectorType) and value.type == wanted.element:
            return self.splat(value, wanted.count)
        if _integer_width(wanted) and _integer_width(value.type):
            if _integer_width(wanted) < _integer_width(value.type):
                return self.builder.trunc(value, wanted)
            return self.builder.sext(value, wanted)
        raise AssertionError(f"cannot store {value.type} as {wanted}")


# sums and differences, where a product operand becomes one fused multiply-add
_ADDITIVE = (BinOp.ADD, BinOp.SUB)
# unary operators that are an LLVM intrinsic of the same name
_INTRINSICS = (UnaryOp.EXP, UnaryOp.LOG, UnaryOp.SQRT)
# unary operators that are the C library's function of the same name (LLVM has no intrinsic)
_LIBM = (UnaryOp.TANH, UnaryOp.ERF)


def _product(left: Expr, right: Expr) -> tuple[Binary, bool] | None:
    """The product among the operands of a sum or difference, and whether it is the left
    one; the right one where both are (either is a valid choice, but it must be one)."""
    if isinstance(right, Binary) and right.op is BinOp.MUL:
        return right, False
    if isinstance(left, Binary) and left.op is BinOp.MUL:
        return left, True
    return None


def _element(kind: ir.Type) -> ir.Type:
    """The type of each lane of a vector, or the type itself."""
    return kind.element if isinstance(kind, ir.VectorType) else kind


def _integer_width(kind: ir.Type) -> int:
    """Bits of an integer or of each lane of an integer vector; 0 for anything else."""
    element = _element(kind)
    return element.width if isinstance(element, ir.IntType) else 0
