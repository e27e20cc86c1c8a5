#!/usr/bin/env python3
"""Extract pvio's guided tour from the code, in order, or check that it is whole.

A tour stop is a comment block in the code that opens with a numbered marker and closes
with ``:T``::

    # T:210 The front ring
    # ...what the reader should know here...
    # :T

(``//`` comments work the same way in C files.)  Numbers are grouped in chapters of a
hundred; TOUR.md lists the chapters as headings ``## T:200 Title``.  Within a chapter the
stops are numbered in tens (210, 220, ...); a number in between (215) inserts a stop
without renumbering.

    tools/tour.py            print the tour
    tools/tour.py --check    exit 1, listing problems: a stop in no chapter, a chapter with
                             no stop, a duplicated number, a missing multiple of ten, a
                             marker that is never closed or a close with no marker
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SCAN = ("src", "tests", "tools")
SUFFIXES = {".py", ".c", ".h"}
OPEN = re.compile(r"^\s*(?:#|//)\s*T:(\d+)\s+(.*\S)\s*$")
CLOSE = re.compile(r"^\s*(?:#|//)\s*:T\s*$")
COMMENT = re.compile(r"^\s*(?:#|//) ?(.*)$")
CHAPTER = re.compile(r"^##\s+T:(\d+)\s+(.*\S)\s*$")


@dataclass
class Stop:
    number: int
    title: str
    path: Path
    line: int
    body: list[str] = field(default_factory=list)


def scan(root: Path) -> tuple[list[Stop], list[str]]:
    stops: list[Stop] = []
    problems: list[str] = []
    files = sorted(
        p for d in SCAN if (root / d).exists() for p in (root / d).rglob("*") if p.suffix in SUFFIXES
    )
    for path in files:
        if path.resolve() == Path(__file__).resolve():
            continue
        rel = path.relative_to(root)
        current: Stop | None = None
        for n, text in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if m := OPEN.match(text):
                if current is not None:
                    problems.append(f"{rel}:{current.line}: T:{current.number} is not closed")
                current = Stop(int(m.group(1)), m.group(2), rel, n)
                stops.append(current)
            elif CLOSE.match(text):
                if current is None:
                    problems.append(f"{rel}:{n}: ':T' closes no marker")
                current = None
            elif current is not None:
                c = COMMENT.match(text)
                if c is None:
                    problems.append(f"{rel}:{current.line}: T:{current.number} is not closed")
                    current = None
                else:
                    current.body.append(c.group(1))
        if current is not None:
            problems.append(f"{rel}:{current.line}: T:{current.number} is not closed")
    return stops, problems


def chapters(root: Path) -> dict[int, str]:
    out: dict[int, str] = {}
    for line in (root / "TOUR.md").read_text().splitlines():
        if m := CHAPTER.match(line):
            out[int(m.group(1))] = m.group(2)
    return out


def check(root: Path) -> list[str]:
    stops, problems = scan(root)
    chaps = chapters(root)
    if not chaps:
        problems.append("TOUR.md lists no chapters ('## T:100 Title')")
    for number in chaps:
        if number % 100:
            problems.append(f"TOUR.md: chapter T:{number} is not a multiple of 100")
    seen: dict[int, Stop] = {}
    for stop in stops:
        if stop.number in seen:
            first = seen[stop.number]
            problems.append(
                f"{stop.path}:{stop.line}: T:{stop.number} duplicates {first.path}:{first.line}"
            )
        seen[stop.number] = stop
        if stop.number // 100 * 100 not in chaps:
            problems.append(f"{stop.path}:{stop.line}: T:{stop.number} is in no TOUR.md chapter")
        if stop.number % 100 == 0:
            problems.append(f"{stop.path}:{stop.line}: T:{stop.number} is a chapter number")
    for chapter in sorted(chaps):
        numbers = [n for n in seen if chapter < n < chapter + 100]
        if not numbers:
            problems.append(f"TOUR.md: chapter T:{chapter} has no stops in the code")
            continue
        for tens in range(chapter + 10, max(numbers) + 1, 10):
            if tens not in seen:
                problems.append(f"chapter T:{chapter}: T:{tens} is missing (a gap in the tour)")
    return problems


def render(root: Path) -> str:
    stops, _ = scan(root)
    chaps = chapters(root)
    out: list[str] = []
    current = None
    for stop in sorted(stops, key=lambda s: s.number):
        chapter = stop.number // 100 * 100
        if chapter != current:
            current = chapter
            out.append(f"\n== T:{chapter} {chaps.get(chapter, '(no chapter)')} ==\n")
        out.append(f"-- T:{stop.number} {stop.title}   ({stop.path}:{stop.line})")
        out.extend(f"   {line}" for line in stop.body)
        out.append("")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="check the tour is whole")
    parser.add_argument("--root", type=Path, default=ROOT, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.check:
        problems = check(args.root)
        for p in problems:
            print(p, file=sys.stderr)
        if problems:
            return 1
        stops, _ = scan(args.root)
        print(f"tour: {len(stops)} stops in {len(chapters(args.root))} chapters, no problems")
        return 0
    print(render(args.root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
