"""Ring errors, named by cause and by whose fault they are."""

from __future__ import annotations


class RingError(Exception):
    """Base of pvio.ring's errors."""

    #: "remote" when the peer broke the protocol, "local" when the caller misused the API.
    fault = "local"


class RingBroken(RingError):
    """The peer published an impossible index: the ring is unusable from now on.

    `check` names the failed test (an io/ring.h macro such as RING_REQUEST_PROD_OVERFLOW,
    or pvio's own stricter check), `field` the shared field that was wrong, and `values`
    the index values involved, as the local end saw them.  `wire_error` is what to report
    to the peer where the protocol has a way to (XENSTORE_ERROR_RINGIDX), else None.
    """

    fault = "remote"

    def __init__(
        self,
        ring: str,
        check: str,
        field: str,
        values: dict[str, int],
        *,
        wire_error: int | None = None,
    ) -> None:
        self.ring = ring
        self.check = check
        self.field = field
        self.values = dict(values)
        self.wire_error = wire_error
        shown = ", ".join(f"{k}={v:#010x}" for k, v in self.values.items())
        super().__init__(f"{ring}: peer broke the ring ({check}: bad {field}; {shown})")

    def again(self) -> RingBroken:
        """A fresh copy, raised on every later use of a ring already found broken."""
        return RingBroken(
            self.ring, self.check, self.field, self.values, wire_error=self.wire_error
        )


class RingUsageError(RingError, ValueError):
    """The local caller asked for something the ring cannot do (full ring, wrong size)."""
