"""blkback's statistics: Linux blkback's, plus what batching and notification avoidance achieve."""

from __future__ import annotations

from dataclasses import dataclass, fields


@dataclass
class BlkbackStats:
    """Linux blkback's statistics, plus pvio's batching and notification counters."""

    oo_req: int = 0  # times the loop found the in-flight bound reached
    rd_req: int = 0
    wr_req: int = 0
    f_req: int = 0  # flushes and barriers
    ds_req: int = 0  # discards
    rd_sect: int = 0
    wr_sect: int = 0
    err_req: int = 0  # answered with an error status
    batches: int = 0  # batches taken off the ring
    notify_sent: int = 0  # kicks to the frontend
    notify_received: int = 0  # kicks from the frontend
    grant_ops: int = 0  # map/unmap/copy hypercall batches

    @property
    def requests(self) -> int:
        return self.rd_req + self.wr_req + self.f_req + self.ds_req + self.err_req

    @classmethod
    def total(cls, many: list[BlkbackStats]) -> BlkbackStats:
        """Several rings' statistics added up (a multi-queue device's)."""
        out = cls()
        for st in many:
            for f in fields(cls):
                setattr(out, f.name, getattr(out, f.name) + getattr(st, f.name))
        return out

    def as_keys(self) -> dict[str, str]:
        """statistics/<name> values, with the derived ratios (3 decimals)."""
        keys = {f.name: str(getattr(self, f.name)) for f in fields(self)}
        n = max(self.requests, 1)
        keys["notify_per_req"] = f"{self.notify_sent / n:.3f}"
        keys["req_per_batch"] = f"{self.requests / max(self.batches, 1):.3f}"
        keys["grant_ops_per_req"] = f"{self.grant_ops / n:.3f}"
        return keys
