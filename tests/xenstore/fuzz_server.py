"""Coverage-guided fuzzing (atheris/libFuzzer) of the XenStore server core.

Each input is read as a script: which connection (dom0, or domains 1 and 2) sends the
next frame, the frame's type, tx_id and payload (paths from a small alphabet, so that
requests meet each other's nodes), and now and then raw bytes fed straight into a
connection's stream (truncated headers, huge lengths).  After every input the store
must pass its own consistency check and no request may have hit an internal error.

    python tests/xenstore/fuzz_server.py -max_total_time=60     # by hand
    (tests/xenstore/test_atheris.py runs it briefly in CI)
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports():
    from pvio.xenstore.server import XenStoreServer

WORDS = [b"a", b"b", b"/", b"/a", b"/a/b", b"@introduceDomain", b"@releaseDomain",
         b"/local/domain/1", b"/local/domain/2/x", b"rel", b"n0", b"r1", b"b2", b"T", b"F",
         b"1", b"2", b"0", b"", b"tok"]


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    server = XenStoreServer()
    server.introduce(1)
    server.introduce(2)
    conns = [server.connect(0), server.connect(1), server.connect(2)]
    for _ in range(fdp.ConsumeIntInRange(1, 24)):
        if fdp.remaining_bytes() == 0:
            break
        which = fdp.ConsumeIntInRange(0, 3)
        if which == 3:  # raw bytes into some stream
            server.receive(conns[fdp.ConsumeIntInRange(0, 2)], fdp.ConsumeBytes(24))
            continue
        type_ = fdp.ConsumeIntInRange(0, 25)
        tx_id = fdp.ConsumeIntInRange(0, 3)
        parts = [WORDS[fdp.ConsumeIntInRange(0, len(WORDS) - 1)]
                 for _ in range(fdp.ConsumeIntInRange(0, 4))]
        payload = b"\0".join(parts) + (b"\0" if fdp.ConsumeBool() else b"")
        frame = struct.pack("<4I", type_, 1, tx_id, len(payload)) + payload
        conn = conns[which]
        if conn in server.conns:
            server.receive(conn, frame)
        if type_ == 9 and 1 not in server.domains:  # RELEASE: domain 1 may come back
            server.introduce(1)
            conns[1] = server.connect(1)
    problems = server.store.check()
    if problems or server.internal_errors:
        raise AssertionError(f"{problems} internal_errors={server.internal_errors}")


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
