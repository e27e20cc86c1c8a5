"""pvio: paravirtual I/O, done for real, in user space.

Xen's split drivers (grant tables, event channels, XenStore, shared rings, blkif) and
lguest's DMA devices, implemented between ordinary Linux processes with the byte layouts
of the real headers. Start reading at TOUR.md.
"""

__version__ = "0.1.0"

from pvio import compiled as _compiled

# The hottest modules run compiled with mypyc when a build of these very sources is
# there; a build that no longer matches them is never used (pvio/compiled.py).
_compiled.activate()
