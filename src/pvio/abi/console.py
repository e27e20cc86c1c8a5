"""io/console.h: the PV console's shared page, two byte rings.

The guest writes console output to `out` and reads keyboard input from `in`; the console
daemon does the reverse.  The rings work like XenStore's (pvio.ring.bytering), with
different sizes: 1 KiB in, 2 KiB out.
"""

from __future__ import annotations

from pvio.abi.layout import Layout

#   typedef uint32_t XENCONS_RING_IDX;
#   #define MASK_XENCONS_IDX(idx, ring) ((idx) & (sizeof(ring)-1))
#
#   struct xencons_interface {
#       char in[1024];
#       char out[2048];
#       XENCONS_RING_IDX in_cons, in_prod;
#       XENCONS_RING_IDX out_cons, out_prod;
#   };
XENCONS_IN_SIZE = 1024
XENCONS_OUT_SIZE = 2048

XENCONS_INTERFACE = Layout(
    "xencons_interface",
    (
        ("in", f"{XENCONS_IN_SIZE}s"),
        ("out", f"{XENCONS_OUT_SIZE}s"),
        ("in_cons", "I"),
        ("in_prod", "I"),
        ("out_cons", "I"),
        ("out_prod", "I"),
    ),
    c_type="struct xencons_interface",
    c_prologue="#include <xen/io/console.h>",
)
