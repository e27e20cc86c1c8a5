"""pvio.hypervisor: domains, memory, grant tables, event channels and lguest DMA.

The part of pvio that plays Xen's hypervisor (and lguest's host) between processes.

Sans-IO cores: `core.Hypervisor` (domain table, batched hypercall dispatch, teardown),
`domain` (`DomainRecord`, what the core keeps per domain, and the `Platform` it asks
for I/O), `grant_table` (the hypervisor's side of GNTTABOP_*), `granting` (the granting
domain's side: references, free list, grant/end access), `event_channel` (ports),
`lguest_dma` (BIND_DMA/SEND_DMA) and `lguest_rules` (the DMA rules it enforces),
`wire` (frames), `session` (one connection), `accounts` (what domains make the
hypervisor hold, against the host's bounds),
`client_core` (the client's frame sequencing and event-port bits).

Adapters: `daemon` (``pvio hypervisor --socket PATH``), `aio` (a domain's asyncio
connection: ``await aio.connect(path, name)``), `inprocess` (the same `client.Domain`
API against a core in the same process), `platform` (memfds, eventfds, and the host's
limits), `listener` (accepting with a back-off).

A domain's API is `client.Domain`, a façade over one part per job: `client_channel`
(the counted hypercall line), `client_memory` (own frames, shareable pages, granting),
`client_mapping` (mapping and copying others' grants; its docstring states the two data
transports, "map" and "copy", and their threat model), `client_events` (event-channel
ports) and `client_lguest` (regions, BIND_DMA/SEND_DMA, interrupts).
"""
