"""`pvio up` as a real subprocess for end-to-end tests (`pvio.testing.up.UpProcess`), with
what the Xen-side tests ask of it: the NBD URI of a guest's vbd, XENSTORED_PATH for Xen's
own XenStore tools, and waiting for a condition with a deadline."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator

from pvio.testing.up import UpProcess


class PvioUp(UpProcess):
    @contextlib.contextmanager
    def serving(self) -> Iterator[PvioUp]:
        """Started, and at the end stopped: `pvio up` must have exited cleanly (0)."""
        self.start()
        try:
            yield self
        finally:
            code = self.stop()
            self.kill()
            assert code == 0, self.output()

    def nbd_uri(self, domain: str = "guest1", vdev: str = "xvda") -> str:
        return str(self.device(domain, vdev=vdev)["nbd"])

    @property
    def xenstored_path(self) -> str:
        return str(self.status["xenstored_path"])

    def xs_env(self) -> dict[str, str]:
        return os.environ | {"XENSTORED_PATH": self.xenstored_path}

    def wait_for(self, predicate: Callable[[], object], timeout: float = 60.0, what: str = "condition") -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                if predicate():
                    return
            time.sleep(0.1)
        raise AssertionError(f"timed out waiting for {what}:\n{self.output()}")
