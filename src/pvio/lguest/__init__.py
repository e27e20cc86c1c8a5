"""pvio.lguest: lguest's (Linux 2.6.23) device bus and DMA drivers, sans-IO.

* `dma` — the BIND_DMA/SEND_DMA rules and the `DmaPort`/`LauncherPort` interfaces;
* `bus` — the descriptor page (Launcher side) and the guest's scan, matching and
  status bits;
* `block`, `console`, `net` — each device's guest driver and Launcher logic.

Nothing here does I/O: memory, copies and interrupts come through the ports.  The TAP
adapter is `pvio.domains.tap`; tests run these pieces over the hypervisor's core in one
process with `pvio.testing.lguest_world`.
"""
