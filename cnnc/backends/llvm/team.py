"""The thread team a call's parallel loops run on, in generated code: `cnnc_parallel_for`,
which kernels call for a parallel loop, and `cnnc_team_worker`, which each helper thread
runs for the length of one call.

A team is a block of 64-bit words (its layout: runtime.team) the runtime allocates for one
call (zeroed, WANTED set to the helpers it starts, JOINED to -1) and passes in the buffer
table's last slot; a null slot runs every parallel loop on the calling thread. The calling thread
("main") runs the kernels; helpers only take chunks of parallel loops:

- A helper joins by adding 1 to PRESENT, unless CLOSED is set there. At its first
  parallel loop, main waits (a bounded spin: a helper's thread may be late or never come)
  for WANTED helpers, then sets CLOSED: the team is then fixed at JOINED helpers, so a late
  helper leaves at once and no one waits for it.
- Main publishes a loop (function, context, extent, chunk), resets NEXT and DONE, then
  bumps EPOCH. Everyone takes chunks by adding to NEXT until it passes the extent; each
  helper then adds 1 to DONE, and main returns once DONE is JOINED. Main writes the next
  loop's fields only after that, so a helper never reads a half-written one.
- At the end of the entry point main sets CLOSED and STOP; helpers return.

Which thread runs which chunk changes nothing computed: a parallel loop's iterations are
independent (loops.ir.For), so results are bit-identical for any team size.
"""

from __future__ import annotations

import llvmlite.ir as ir

from cnnc.loops.ir import For, LoopFunction, LoopKind
from cnnc.loops.walk import walk
from cnnc.runtime.team import (
    CHUNK,
    CLOSED,
    CTX,
    DONE,
    EPOCH,
    EXTENT,
    FN,
    JOINED,
    NEXT,
    PRESENT,
    STOP,
    WANTED,
)

I64 = ir.IntType(64)
I8P = ir.IntType(8).as_pointer()
VOID = ir.VoidType()

# main waits at most this long for helpers to join: cycles where the target counts them
# (x86's time stamp counter, about a millisecond), else spin iterations
WAIT_CYCLES = 3_000_000
WAIT_SPINS = 1 << 21
# a loop is cut into about this many chunks a thread: enough to even out a late start
CHUNKS_PER_THREAD = 4

PARALLEL_FOR = "cnnc_parallel_for"
WORKER = "cnnc_team_worker"
FINISH = "cnnc_team_finish"
# void part(i8* context, i64 first, i64 end): one parallel loop's iterations first..end-1
PART_TYPE = ir.FunctionType(VOID, [I8P, I64, I64])
PARALLEL_FOR_TYPE = ir.FunctionType(VOID, [I8P, PART_TYPE.as_pointer(), I8P, I64])


def uses_team(function: LoopFunction) -> bool:
    """Whether the function has a parallel loop, and so takes the team as its last
    argument."""
    return any(isinstance(node, For) and node.kind is LoopKind.PARALLEL
               for node in walk(function))


def declare_parallel_for(module: ir.Module) -> ir.Function:
    existing = module.globals.get(PARALLEL_FOR)
    if existing is not None:
        return existing
    return ir.Function(module, PARALLEL_FOR_TYPE, PARALLEL_FOR)


def emit_team(module: ir.Module, triple: str, worker: bool, serial: bool = False) -> None:
    """Define the team's functions in `module` (the entry points' module); the helpers'
    entry point only where some kernel has a parallel loop (`worker`), so that the runtime
    starts no team for code that would not use it. `serial`: code that is never given a
    team (a C library's), whose parallel loops run whole on the calling thread."""
    if serial:
        _emit_serial(module)
        return
    _Team(module, triple.startswith(("x86_64", "i386", "i686"))).emit(worker)


def _emit_serial(module: ir.Module) -> None:
    """`cnnc_parallel_for` as the team's own path for a null team: part(context, 0, extent),
    so the arithmetic is the same; and no atomics, which 32-bit ARM's register allocator
    fails on (64-bit ones, in the team's functions at -O3)."""
    function = declare_parallel_for(module)
    _, part, context, extent = function.args
    builder = ir.IRBuilder(function.append_basic_block("entry"))
    builder.call(part, [context, ir.Constant(I64, 0), extent])
    builder.ret_void()
    finish = ir.Function(module, ir.FunctionType(VOID, [I8P]), FINISH)
    finish.linkage = "internal"
    ir.IRBuilder(finish.append_basic_block("entry")).ret_void()


class _Team:
    def __init__(self, module: ir.Module, x86: bool) -> None:
        self.module = module
        self.x86 = x86
        self.parallel_for = declare_parallel_for(module)
        self.work = ir.Function(module, ir.FunctionType(
            VOID, [I64.as_pointer(), PART_TYPE.as_pointer(), I8P, I64, I64]), "cnnc_team_work")
        self.close = ir.Function(module, ir.FunctionType(I64, [I64.as_pointer()]),
                                 "cnnc_team_close")
        for internal in (self.work, self.close):
            internal.linkage = "internal"

    def emit(self, worker: bool) -> None:
        self.emit_work()
        self.emit_close()
        self.emit_parallel_for()
        if worker:
            self.emit_worker()
        self.emit_finish()

    # -- small pieces -----------------------------------------------------------------------
    @staticmethod
    def word(builder: ir.IRBuilder, team: ir.Value, index: int) -> ir.Value:
        return builder.gep(team, [ir.Constant(I64, index)], inbounds=True)

    def load(self, builder: ir.IRBuilder, team: ir.Value, index: int,
             ordering: str = "acquire") -> ir.Value:
        return builder.load_atomic(self.word(builder, team, index), ordering, 8)

    def store(self, builder: ir.IRBuilder, team: ir.Value, index: int, value: ir.Value,
              ordering: str = "release") -> None:
        builder.store_atomic(value, self.word(builder, team, index), ordering, 8)

    def pause(self, builder: ir.IRBuilder) -> None:
        """A spin-wait hint to the CPU (x86's `pause`); elsewhere nothing."""
        if self.x86:
            pause = self.module.declare_intrinsic("llvm.x86.sse2.pause",
                                                  fnty=ir.FunctionType(VOID, []))
            builder.call(pause, [])

    def spin_until(self, builder: ir.IRBuilder, done) -> None:
        """Loop until `done(builder)` (an i1 computed afresh each time) holds."""
        function = builder.function
        test = function.append_basic_block("spin.test")
        wait = function.append_basic_block("spin.wait")
        after = function.append_basic_block("spin.done")
        builder.branch(test)
        builder.position_at_end(test)
        builder.cbranch(done(builder), after, wait)
        builder.position_at_end(wait)
        self.pause(builder)
        builder.branch(test)
        builder.position_at_end(after)

    # -- the functions ----------------------------------------------------------------------
    def emit_work(self) -> None:
        """Take chunks of the published loop until none is left."""
        team, part, context, extent, chunk = self.work.args
        builder = ir.IRBuilder(self.work.append_basic_block("entry"))
        take = self.work.append_basic_block("take")
        run = self.work.append_basic_block("run")
        done = self.work.append_basic_block("done")
        builder.branch(take)
        builder.position_at_end(take)
        first = builder.atomic_rmw("add", self.word(builder, team, NEXT), chunk, "monotonic")
        builder.cbranch(builder.icmp_signed(">=", first, extent), done, run)
        builder.position_at_end(run)
        end = builder.add(first, chunk)
        end = builder.select(builder.icmp_signed("<", end, extent), end, extent)
        builder.call(part, [context, first, end])
        builder.branch(take)
        builder.position_at_end(done)
        builder.ret_void()

    def emit_close(self) -> None:
        """Wait (bounded) for the helpers asked for, then close the team: JOINED."""
        team, = self.close.args
        builder = ir.IRBuilder(self.close.append_basic_block("entry"))
        wanted = self.load(builder, team, WANTED, "monotonic")
        clock = None
        if self.x86:
            clock = self.module.declare_intrinsic("llvm.readcyclecounter",
                                                  fnty=ir.FunctionType(I64, []))
            start = builder.call(clock, [])
        spins = builder.alloca(I64)
        builder.store(ir.Constant(I64, 0), spins)

        def ready(b: ir.IRBuilder) -> ir.Value:
            present = b.icmp_signed(">=", self.load(b, team, PRESENT), wanted)
            count = b.load(spins)
            b.store(b.add(count, ir.Constant(I64, 1)), spins)
            late = b.icmp_signed(">=", count, ir.Constant(I64, WAIT_SPINS))
            if clock is not None:
                waited = b.sub(b.call(clock, []), start)
                late = b.or_(late, b.icmp_unsigned(">=", waited,
                                                   ir.Constant(I64, WAIT_CYCLES)))
            return b.or_(present, late)

        self.spin_until(builder, ready)
        old = builder.atomic_rmw("or", self.word(builder, team, PRESENT),
                                 ir.Constant(I64, CLOSED), "seq_cst")
        joined = builder.and_(old, ir.Constant(I64, CLOSED - 1))
        builder.store(joined, self.word(builder, team, JOINED))
        builder.ret(joined)

    def emit_parallel_for(self) -> None:
        """`cnnc_parallel_for(team, part, context, extent)`: part(context, a, b) over 0..extent
        cut into chunks, on the team; with no team, or nothing to share, all here."""
        raw, part, context, extent = self.parallel_for.args
        function = self.parallel_for
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        serial = function.append_basic_block("serial")
        check = function.append_basic_block("check")
        closing = function.append_basic_block("closing")
        joined_block = function.append_basic_block("joined")
        publish = function.append_basic_block("publish")
        team = builder.bitcast(raw, I64.as_pointer())
        alone = builder.or_(builder.icmp_unsigned("==", raw, ir.Constant(I8P, None)),
                            builder.icmp_signed("<", extent, ir.Constant(I64, 2)))
        builder.cbranch(alone, serial, check)

        builder.position_at_end(serial)
        builder.call(part, [context, ir.Constant(I64, 0), extent])
        builder.ret_void()

        builder.position_at_end(check)
        known = builder.load(self.word(builder, team, JOINED))
        builder.cbranch(builder.icmp_signed("<", known, ir.Constant(I64, 0)), closing,
                        joined_block)
        builder.position_at_end(closing)
        closed = builder.call(self.close, [team])
        builder.branch(joined_block)
        builder.position_at_end(joined_block)
        joined = builder.phi(I64)
        joined.add_incoming(known, check)
        joined.add_incoming(closed, closing)
        builder.cbranch(builder.icmp_signed("==", joined, ir.Constant(I64, 0)), serial, publish)

        builder.position_at_end(publish)
        threads = builder.add(joined, ir.Constant(I64, 1))
        chunk = builder.sdiv(extent, builder.mul(threads, ir.Constant(I64, CHUNKS_PER_THREAD)))
        chunk = builder.select(builder.icmp_signed("<", chunk, ir.Constant(I64, 1)),
                               ir.Constant(I64, 1), chunk)
        for index, value in ((FN, builder.ptrtoint(part, I64)),
                             (CTX, builder.ptrtoint(context, I64)), (EXTENT, extent),
                             (CHUNK, chunk), (NEXT, ir.Constant(I64, 0)),
                             (DONE, ir.Constant(I64, 0))):
            self.store(builder, team, index, value, "monotonic")
        epoch = self.load(builder, team, EPOCH, "monotonic")
        self.store(builder, team, EPOCH, builder.add(epoch, ir.Constant(I64, 1)), "seq_cst")
        builder.call(self.work, [team, part, context, extent, chunk])
        self.spin_until(builder, lambda b: b.icmp_signed(
            ">=", self.load(b, team, DONE), joined))
        builder.ret_void()

    def emit_worker(self) -> None:
        """`cnnc_team_worker(team)`: a helper thread's whole part in one call."""
        function = ir.Function(self.module, ir.FunctionType(VOID, [I8P]), WORKER)
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        team = builder.bitcast(function.args[0], I64.as_pointer())
        seen = builder.alloca(I64)
        builder.store(ir.Constant(I64, 0), seen)
        join = function.append_basic_block("join")
        attempt = function.append_basic_block("attempt")
        wait = function.append_basic_block("wait")
        run = function.append_basic_block("run")
        idle = function.append_basic_block("idle")
        leave = function.append_basic_block("leave")
        builder.branch(join)

        builder.position_at_end(join)  # add 1 to PRESENT unless the team is closed
        present = self.load(builder, team, PRESENT)
        closed = builder.icmp_unsigned("!=", builder.and_(present, ir.Constant(I64, CLOSED)),
                                       ir.Constant(I64, 0))
        builder.cbranch(closed, leave, attempt)
        builder.position_at_end(attempt)
        swapped = builder.cmpxchg(self.word(builder, team, PRESENT), present,
                                  builder.add(present, ir.Constant(I64, 1)), "seq_cst",
                                  "seq_cst")
        builder.cbranch(builder.extract_value(swapped, 1), wait, join)

        builder.position_at_end(wait)  # a new loop, or the end of the call
        epoch = self.load(builder, team, EPOCH)
        builder.cbranch(builder.icmp_unsigned("!=", epoch, builder.load(seen)), run, idle)

        builder.position_at_end(run)
        part = builder.inttoptr(self.load(builder, team, FN, "monotonic"),
                                PART_TYPE.as_pointer())
        context = builder.inttoptr(self.load(builder, team, CTX, "monotonic"), I8P)
        builder.call(self.work, [team, part, context, self.load(builder, team, EXTENT,
                                                                 "monotonic"),
                                 self.load(builder, team, CHUNK, "monotonic")])
        builder.store(epoch, seen)
        builder.atomic_rmw("add", self.word(builder, team, DONE), ir.Constant(I64, 1),
                           "release")
        builder.branch(wait)

        builder.position_at_end(idle)
        stop = self.load(builder, team, STOP)
        self.pause(builder)
        builder.cbranch(builder.icmp_unsigned("!=", stop, ir.Constant(I64, 0)), leave, wait)

        builder.position_at_end(leave)
        builder.ret_void()

    def emit_finish(self) -> None:
        """`cnnc_team_finish(team)`, at the end of an entry point: close, and send the
        helpers home (a null team: nothing)."""
        function = ir.Function(self.module, ir.FunctionType(VOID, [I8P]), FINISH)
        function.linkage = "internal"
        builder = ir.IRBuilder(function.append_basic_block("entry"))
        some = function.append_basic_block("some")
        none = function.append_basic_block("none")
        raw = function.args[0]
        builder.cbranch(builder.icmp_unsigned("==", raw, ir.Constant(I8P, None)), none, some)
        builder.position_at_end(some)
        team = builder.bitcast(raw, I64.as_pointer())
        builder.atomic_rmw("or", self.word(builder, team, PRESENT), ir.Constant(I64, CLOSED),
                           "seq_cst")
        self.store(builder, team, STOP, ir.Constant(I64, 1), "seq_cst")
        builder.branch(none)
        builder.position_at_end(none)
        builder.ret_void()
