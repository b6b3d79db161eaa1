"""Find pointer offsets that a Triton kernel multiplies in 32 bits (tools/kernel_static.py reports them).

Program ids, ``tl.arange`` and integer arguments below 2**31 are i32 in Triton, and so is their
product: ``row * stride`` wraps once it passes 2**31 elements (a bf16 logits tensor of 32768 x 128256
holds 4.2e9), and the kernel then reads or writes memory far from its tensor. The fix is a widening
cast of one factor (``tl.program_id(0).to(tl.int64)``), after which the product is i64.

:func:`narrow_products` reads a kernel's TTIR and names every ``arith.muli`` in i32 whose operands
are both runtime values (program ids, ranges, arguments, loop variables; neither a constant) and
whose result reaches the offset of a ``tt.addptr``, through i32 arithmetic or a widening ``extsi``
(widened after the multiply, it has already wrapped). A multiple of a constant (``pid * BLOCK``)
is not reported: it indexes within a row or block, bounded by a dimension's size. Tensor
descriptors take offsets as coordinates, not products, and are not pointer arithmetic.
"""

from __future__ import annotations

import re
import sys

_DEF = re.compile(r"^\s*(%[\w.$-]+) = ([\w.]+)\s*(.*?)\s*(?:loc\((#loc\d*|.*)\))?\s*$")
_VALUE = re.compile(r"%[\w.$-]+(?:#\d+)?")
_LOC = re.compile(r"^(#loc\d*) = loc\((.*)\)")
_FILE_LINE = re.compile(r'^"([^"]+)":(\d+):\d+')
_LOC_REF = re.compile(r"#loc\d*")


def _result_type(rest: str) -> str:
    """The result type printed after `` : ``: after ``to``/``->`` for casts, else the last listed type."""
    types = rest.rsplit(" : ", 1)[-1] if " : " in rest else ""
    for sep in (" to ", " -> "):
        if sep in types:
            return types.split(sep)[-1].strip()
    return types.split(", ")[-1].strip()


def _is_i32(type_: str) -> bool:
    return type_ == "i32" or type_.endswith("xi32>")


def _is_integer(type_: str) -> bool:
    return _is_i32(type_) or type_ == "i64" or type_.endswith("xi64>")


def _where(loc: str | None, locs: dict[str, tuple]) -> str:
    """``file.py:line`` of a ``#locN`` reference, following name aliases; ``?`` when unknown."""
    for _ in range(16):
        entry = locs.get(loc or "")
        if entry is None:
            return "?"
        if entry[0] == "file":
            return f"{entry[1].rsplit('/', 1)[-1]}:{entry[2]}"
        loc = entry[1]
    return "?"


def narrow_products(ttir: str) -> list[str]:
    """``file.py:line`` of each i32 product of two runtime values that reaches a pointer offset."""
    defs: dict[str, tuple[str, list[str], str, str | None]] = {}
    locs: dict[str, tuple] = {}
    offsets = []
    for line in ttir.splitlines():
        if m := _LOC.match(line):  # a file position, or a name, call site or fusion of other locations
            name, body = m.groups()
            at, ref = _FILE_LINE.match(body), _LOC_REF.search(body)
            locs[name] = ("file", *at.groups()) if at else ("alias", ref.group(0) if ref else None)
        elif m := _DEF.match(line):
            name, op, rest, loc = m.groups()
            operands = _VALUE.findall(rest.rsplit(" : ", 1)[0])
            defs[name] = (op, operands, _result_type(rest), loc)
            if op == "tt.addptr" and len(operands) == 2:
                offsets.append(operands[1])

    constant: dict[str, bool] = {}

    def is_constant(value: str) -> bool:
        if value not in constant:
            constant[value] = False  # cycles (none in SSA) and undefined values (arguments) are runtime
            op, operands, _, _ = defs.get(value, ("", [], "", None))
            constant[value] = op == "arith.constant" or (bool(operands) and all(map(is_constant, operands)))
        return constant[value]

    found, seen, work = set(), set(), list(offsets)
    while work:
        value = work.pop()
        if value in seen or value not in defs:
            continue
        seen.add(value)
        op, operands, type_, loc = defs[value]
        if op == "arith.muli" and _is_i32(type_) and not any(map(is_constant, operands)):
            found.add(_where(loc, locs))
        # Walk on through integer arithmetic; a comparison's (i1) result is a mask, not an offset.
        if _is_integer(type_) and op != "arith.cmpi":
            work += operands
    return sorted(found)


if __name__ == "__main__":  # a module of kernel_static.py, not a command of its own
    asked = {"-h", "--help"} & set(sys.argv[1:])  # help asked for is answered; a run as a command is refused
    out = sys.stdout if asked else sys.stderr
    print(__doc__.split("\n\n")[0], file=out)
    print("Not a command of its own: run python tools/kernel_static.py (--help for its options).", file=out)
    sys.exit(0 if asked else 2)
