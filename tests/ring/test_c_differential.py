"""pvio's rings against Xen's io/ring.h macros, compiled from /usr/include/xen.

tests/c/ring_peer.c is a blkif ring end built from the real macros (DEFINE_RING_TYPES via
blkif.h).  The same random script of ring operations is run four ways: both ends in C
(the reference), both ends in Python, C front with Python back and Python front with C
back in two processes sharing one mmap'd file, with the indices started just below 2**32
so that they wrap.  Every request and response is checked field by field on arrival, every
step's result (how many entries moved, each notify decision, each final check) must equal
the reference, and the ring's bytes at the end must be identical.  Native (x86_64) and
x86_32 (-m32: 108-byte slots that straddle the pages of a multi-page ring) are covered,
with Python mapping each page separately so its view of the ring is scattered.

The stress tests let the two processes run freely, sleeping on eventfds only when the final
check says so; a notify wrongly skipped leaves an end asleep and fails by timeout.
"""

from __future__ import annotations

import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from cprobe import build
from pvio.abi.blkif import ABI_NATIVE, ABI_X86_32_BLKIF, BlkifABI
from pvio.ring import SharedRing
from ringpeer import (
    map_pages,
    run_lockstep,
    run_solo,
    stress_back,
    stress_front,
)

C_SOURCE = Path(__file__).resolve().parents[1] / "c" / "ring_peer.c"
PEER_PY = Path(__file__).resolve().parents[1] / "ringpeer.py"
SRC = Path(__file__).resolve().parents[2] / "src"

#: Indices start here so that they wrap past 2**32 early in every script.
START = 0xFFFF_FFFF - 40

# (ABI name, blkif ABI, ring page order, compile with -m32)
CASES = [
    pytest.param("native", ABI_NATIVE, 0, False, id="x86_64-order0"),
    pytest.param("native", ABI_NATIVE, 2, False, id="x86_64-order2"),
    pytest.param("x86_32", ABI_X86_32_BLKIF, 1, True, id="x86_32-order1"),
    pytest.param("x86_32", ABI_X86_32_BLKIF, 4, True, id="x86_32-order4"),
]


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> dict[bool, Path]:
    out = tmp_path_factory.mktemp("ring_peer")
    source = C_SOURCE.read_text()
    return {
        False: build(source, out, "ring_peer"),
        True: build(source, out, "ring_peer32", m32=True),
    }


def make_script(seed: int, nr_ents: int, steps: int = 400) -> str:
    """A random but well-formed sequence of front and back steps."""
    rng = random.Random(seed)
    big = max(2, nr_ents + 3)
    ops = [
        (lambda: f"Q{rng.randint(1, big)}", 5),
        (lambda: "P", 5),
        (lambda: "U", 1),
        (lambda: f"R{rng.randint(1, big)}", 4),
        (lambda: "F", 3),
        (lambda: f"t{rng.randint(1, big)}", 5),
        (lambda: f"s{rng.randint(1, big)}", 5),
        (lambda: "p", 5),
        (lambda: "u", 1),
        (lambda: "f", 3),
    ]
    makers = [m for m, w in ops for _ in range(w)]
    return " ".join(rng.choice(makers)() for _ in range(steps))


def ring_file(path: Path, order: int) -> Path:
    path.write_bytes(bytes(4096 << order))
    return path


def c_solo(exe: Path, path: Path, order: int, script: str) -> tuple[list[str], bytes]:
    ring_file(path, order)
    proc = subprocess.run([str(exe), "solo", str(path), str(order), str(START), script],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, (proc.returncode, proc.stderr, proc.stdout[-2000:])
    return proc.stdout.splitlines(), path.read_bytes()


def py_solo(abi: BlkifABI, path: Path, order: int, script: str,
            scattered: bool) -> tuple[list[str], bytes]:
    ring_file(path, order)
    sring = SharedRing.for_blkif(map_pages(path, order, scattered=scattered), abi)
    log = run_solo(sring, abi, START, script)
    del sring
    return log, path.read_bytes()


def lockstep(exe: Path, c_role: str, abi: BlkifABI, path: Path, order: int,
             script: str) -> tuple[list[str], bytes]:
    """C plays `c_role`, Python (this process) the other end, token-passing between."""
    ring_file(path, order)
    to_c_r, to_c_w = os.pipe()
    to_py_r, to_py_w = os.pipe()
    out_path = path.with_suffix(".c-log")
    with out_path.open("w") as out:
        proc = subprocess.Popen(
            [str(exe), "lockstep", c_role, str(path), str(order), str(START), script,
             str(to_c_r), str(to_py_w)],
            stdout=out, stderr=subprocess.PIPE, text=True, pass_fds=(to_c_r, to_py_w),
        )
    try:
        os.close(to_c_r)
        os.close(to_py_w)
        py_role = "back" if c_role == "front" else "front"
        sring = SharedRing.for_blkif(map_pages(path, order, scattered=True), abi)
        py_log = run_lockstep(py_role, sring, abi, START, script, to_py_r, to_c_w)
        _, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (proc.returncode, err, out_path.read_text()[-2000:])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(to_py_r)
        os.close(to_c_w)
    c_log = out_path.read_text().splitlines()
    merged = sorted(c_log + py_log, key=lambda line: int(line.split()[0]))
    return merged, path.read_bytes()


def _results(log: list[str], op: str) -> set[str]:
    return {line.split()[2] for line in log if line.split()[1] == op}


@pytest.mark.parametrize(("abi_name", "abi", "order", "m32"), CASES)
def test_python_and_c_agree_step_by_step_and_byte_for_byte(
    peers: dict[bool, Path], tmp_path: Path, abi_name: str, abi: BlkifABI, order: int,
    m32: bool,
) -> None:
    nr_ents = abi.ring_size(order)
    script = make_script(seed=order * 7 + m32, nr_ents=nr_ents)
    ref_log, ref_bytes = c_solo(peers[m32], tmp_path / "c.ring", order, script)

    # the reference itself exercises what we compare: both notify outcomes, both final
    # check outcomes, and indices that wrapped past 2**32
    for op in ("P", "p", "F", "f"):
        assert _results(ref_log, op) == {"0", "1"}, op
    moved = sum(int(line.split()[2]) for line in ref_log if line.split()[1].startswith("Q"))
    assert moved > 41, "the script must carry the indices past 2**32"
    assert ref_bytes != bytes(len(ref_bytes))

    for scattered in (False, True):
        log, data = py_solo(abi, tmp_path / f"py-{scattered}.ring", order, script, scattered)
        assert log == ref_log, f"python solo (scattered={scattered}) diverges"
        assert data == ref_bytes, f"python solo (scattered={scattered}) ring bytes differ"

    for c_role in ("front", "back"):
        log, data = lockstep(peers[m32], c_role, abi, tmp_path / f"mix-{c_role}.ring", order,
                             script)
        assert log == ref_log, f"C {c_role} with python diverges from the C reference"
        assert data == ref_bytes, f"C {c_role} with python: ring bytes differ"


def test_ring_bytes_match_after_every_prefix(peers: dict[bool, Path], tmp_path: Path) -> None:
    """The page after 1, 2, ... n steps: C macros and Python agree after each prefix."""
    order = 1
    abi = ABI_X86_32_BLKIF
    script = make_script(seed=99, nr_ents=abi.ring_size(order), steps=60).split()
    for n in range(1, len(script) + 1, 3):
        prefix = " ".join(script[:n])
        _, c_bytes = c_solo(peers[True], tmp_path / "c.ring", order, prefix)
        _, py_bytes = py_solo(abi, tmp_path / "py.ring", order, prefix, scattered=True)
        assert c_bytes == py_bytes, f"ring bytes differ after {n} steps: {prefix}"


# ---- free-running two-process stress over event channels ------------------------------


def _stress_mixed(exe: Path, c_role: str, abi: BlkifABI, abi_name: str, path: Path,
                  order: int, count: int, seed: int) -> str:
    ring_file(path, order)
    to_c = os.eventfd(0)
    to_py = os.eventfd(0)
    proc = subprocess.Popen(
        [str(exe), "stress", c_role, str(path), str(order), str(START), str(count),
         str(to_c), str(to_py), str(seed)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, pass_fds=(to_c, to_py),
    )
    try:
        sring = SharedRing.for_blkif(map_pages(path, order, scattered=True), abi)
        run = stress_back if c_role == "front" else stress_front
        py_notifies, _ = run(sring, abi, START, count, to_py, to_c, seed + 1)
        out, err = proc.communicate(timeout=30)
        assert proc.returncode == 0, (proc.returncode, err, out)
        # the run did go through the event-index protocol: C slept, Python woke it
        c_sleeps = int(out.split("sleeps")[1])
        assert c_sleeps > 0 and py_notifies > 0, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(to_c)
        os.close(to_py)
    return out


STRESS_CASES = [
    pytest.param("native", ABI_NATIVE, 0, False, id="x86_64-order0"),
    pytest.param("x86_32", ABI_X86_32_BLKIF, 1, True, id="x86_32-order1"),
]


@pytest.mark.parametrize("c_role", ["front", "back"])
@pytest.mark.parametrize(("abi_name", "abi", "order", "m32"), STRESS_CASES)
def test_stress_c_and_python_never_lose_a_wakeup(
    peers: dict[bool, Path], tmp_path: Path, c_role: str, abi_name: str, abi: BlkifABI,
    order: int, m32: bool,
) -> None:
    out = _stress_mixed(peers[m32], c_role, abi, abi_name, tmp_path / "stress.ring", order,
                        count=6000, seed=order * 31 + 7)
    assert f"{c_role} done 6000" in out


@pytest.mark.parametrize("child_role", ["front", "back"])
def test_stress_python_and_python_never_lose_a_wakeup(tmp_path: Path, child_role: str) -> None:
    """Two Python processes: a child plays `child_role`, this process the other end."""
    order, count = 0, 4000
    path = ring_file(tmp_path / "py.ring", order)
    to_child = os.eventfd(0)
    to_us = os.eventfd(0)
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    proc = subprocess.Popen(
        [sys.executable, str(PEER_PY), "stress", child_role, str(path), str(order),
         str(START), str(count), str(to_child), str(to_us), "5", "native"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
        pass_fds=(to_child, to_us),
    )
    try:
        sring = SharedRing.for_blkif(map_pages(path, order, scattered=False), ABI_NATIVE)
        run = stress_back if child_role == "front" else stress_front
        run(sring, ABI_NATIVE, START, count, to_us, to_child, 11)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, (proc.returncode, err, out)
        assert f"{child_role} done {count}" in out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(to_child)
        os.close(to_us)
