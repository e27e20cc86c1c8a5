"""pvio.testing: test doubles and helpers shipped with pvio (in the spirit of trio.testing).

`lguest_dma` — an in-process host implementing lguest's DMA rules for guests and
Launchers living in one process.
"""
