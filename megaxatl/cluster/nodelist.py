"""Expand a SLURM node list ("gpu[01-03,07],login1") into host names, as `scontrol show hostnames`.

The job templates use `scontrol` when it is on PATH and this parser otherwise (tests, or a login
node without the SLURM client). Supports comma-separated items, several bracket groups per item
("rack[1-2]-n[01-02]"), zero-padded ranges and single numbers inside brackets.

    python -m megaxatl.cluster.nodelist "gpu[01-03,07]"     -> one host per line
"""

from __future__ import annotations

import re
import sys

_GROUP = re.compile(r"\[([^\[\]]*)\]")


def _split_top(s: str) -> list[str]:
    """Split at commas outside brackets."""
    out, depth, cur = [], 0, ""
    for ch in s:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError(f"unbalanced ']' in node list {s!r}")
        if ch == "," and depth == 0:
            out.append(cur)
            cur = ""
        else:
            cur += ch
    if depth:
        raise ValueError(f"unbalanced '[' in node list {s!r}")
    out.append(cur)
    return [x for x in (o.strip() for o in out) if x]


def _range(spec: str, whole: str) -> list[str]:
    out = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            if not (lo.isdigit() and hi.isdigit()) or int(hi) < int(lo):
                raise ValueError(f"bad range '{part}' in node list {whole!r}")
            width = len(lo)
            out += [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
        elif part.isdigit():
            out.append(part)
        else:
            raise ValueError(f"bad item '{part}' in node list {whole!r}")
    return out


def expand(nodelist: str) -> list[str]:
    hosts: list[str] = []
    for item in _split_top(nodelist):
        m = _GROUP.search(item)
        if m is None:
            hosts.append(item)
            continue
        head, tail = item[:m.start()], item[m.end():]
        for num in _range(m.group(1), nodelist):
            hosts += expand(head + num + tail)  # later groups in the same item
    return hosts


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m megaxatl.cluster.nodelist NODELIST", file=sys.stderr)
        return 2
    try:
        print("\n".join(expand(args[0])))
    except ValueError as e:
        print(f"nodelist: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
