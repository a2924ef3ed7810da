"""Loop IR → text (`--emit loops`): one line a statement, indented by loop depth."""

from __future__ import annotations

from cnnc.loops.ir import (
    Assign,
    Broadcast,
    Const,
    Expr,
    For,
    If,
    Lane,
    Load,
    LoopFunction,
    Ramp,
    Select,
    Stmt,
    Unary,
    Var,
    VecLoad,
    VecStore,
)


def format_functions(functions: tuple[LoopFunction, ...]) -> str:
    return "\n".join(format_function(f) for f in functions)


def format_function(function: LoopFunction) -> str:
    params = ", ".join(f"{'out ' if b.is_output else ''}{b.name}: {b.dtype.value}"
                       f"[{', '.join(str(d) for d in b.shape)}]" for b in function.buffers)
    lines = [f"func {function.name}(N, {params})"]
    lines += [f"  local {local.name}: {local.dtype.value}"
              + (f"x{local.lanes}" if local.lanes > 1 else "") for local in function.locals]
    for stmt in function.body:
        _format_stmt(stmt, 1, lines)
    return "\n".join(lines) + "\n"


def _format_stmt(stmt: Stmt, depth: int, lines: list[str]) -> None:
    pad = "  " * depth
    if isinstance(stmt, For):
        private = f" (private {', '.join(stmt.private)})" if stmt.private else ""
        lines.append(f"{pad}{stmt.kind.value} {stmt.var} in 0..{format_expr(stmt.extent)}"
                     f"{private}:")
        for inner in stmt.body:
            _format_stmt(inner, depth + 1, lines)
    elif isinstance(stmt, If):
        lines.append(f"{pad}if {format_expr(stmt.cond)}:")
        for inner in stmt.body:
            _format_stmt(inner, depth + 1, lines)
    elif isinstance(stmt, Assign):
        lines.append(f"{pad}{stmt.var} = {format_expr(stmt.value)}")
    elif isinstance(stmt, VecStore):
        lines.append(f"{pad}{_format_access(stmt.buffer, stmt.index)}..+lanes = "
                     f"{format_expr(stmt.value)}")
    else:
        lines.append(f"{pad}{_format_access(stmt.buffer, stmt.index)} = {format_expr(stmt.value)}")


def format_expr(expr: Expr, nested: bool = False) -> str:
    if isinstance(expr, Var):
        return expr.name
    if isinstance(expr, Const):
        return repr(expr.value) if expr.is_float else str(expr.value)
    if isinstance(expr, Load):
        return _format_access(expr.buffer, expr.index)
    if isinstance(expr, Unary):
        return f"{expr.op.value}({format_expr(expr.operand)})"
    if isinstance(expr, VecLoad):
        step = f" step {expr.stride}" if expr.stride != 1 else ""
        return f"{_format_access(expr.buffer, expr.index)}..+{expr.lanes}{step}"
    if isinstance(expr, Ramp):
        return f"ramp{expr.lanes}({format_expr(expr.base)}, step {expr.step})"
    if isinstance(expr, Broadcast):
        return f"broadcast{expr.lanes}({format_expr(expr.value)})"
    if isinstance(expr, Lane):
        return f"{format_expr(expr.vector, True)}[lane {expr.lane}]"
    if isinstance(expr, Select):
        return (f"select({format_expr(expr.cond)}, {format_expr(expr.then)}, "
                f"{format_expr(expr.otherwise)})")
    text = f"{format_expr(expr.left, True)} {expr.op.value} {format_expr(expr.right, True)}"
    return f"({text})" if nested else text


def _format_access(buffer: str, index: tuple[Expr, ...]) -> str:
    return f"{buffer}[{', '.join(format_expr(i) for i in index)}]"
