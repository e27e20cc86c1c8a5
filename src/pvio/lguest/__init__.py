"""pvio.lguest: lguest's (Linux 2.6.23) device bus and DMA drivers, sans-IO.

* `dma` — building `struct lguest_dma`, and the `DmaPort`/`LauncherPort` interfaces (the
  BIND_DMA/SEND_DMA rules themselves are the hypervisor's: `pvio.hypervisor.lguest_rules`);
* `bus` — the descriptor page (Launcher side) and the guest's scan, matching and
  status bits;
* `allocator` — the guest's page allocator;
* `launcher` — the Launcher's port when the Launcher is a domain;
* `block`, `console`, `net` — each device's guest driver and Launcher logic.

Nothing here does I/O: memory, copies and interrupts come through the ports.  The
processes that run these pieces are in `pvio.domains` (the Launcher, the guest, the frame
path to a TAP); tests run them over the hypervisor's core in one process with
`pvio.testing.lguest_world`.
"""
