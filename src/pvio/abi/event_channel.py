"""event_channel.h: event-channel operations, their argument structs and port states.

Errors from event-channel operations are negative errno values (-EINVAL, -EPERM, ...),
as in Xen; EVTCHNSTAT_* are the states EVTCHNOP_status reports.
"""

from __future__ import annotations

from pvio.abi.layout import Layout

# T:140 Event channels
# An event channel is a doorbell between two domains: one end allocates an unbound port
# for a named remote domain (EVTCHNOP_alloc_unbound), publishes the number in XenStore,
# and the other end binds to it (EVTCHNOP_bind_interdomain).  After that EVTCHNOP_send
# on either port sets the other port pending and wakes its owner.  Carrying no data,
# events only say "look at the ring"; the ring's *_event indices decide when one is due.
# :T

#: #define EVTCHN_2L_NR_CHANNELS (sizeof(xen_ulong_t) * sizeof(xen_ulong_t) * 64)
EVTCHN_2L_NR_CHANNELS = 8 * 8 * 64

EVTCHNOP_bind_interdomain = 0
EVTCHNOP_bind_virq = 1
EVTCHNOP_bind_pirq = 2
EVTCHNOP_close = 3
EVTCHNOP_send = 4
EVTCHNOP_status = 5
EVTCHNOP_alloc_unbound = 6
EVTCHNOP_bind_ipi = 7
EVTCHNOP_bind_vcpu = 8
EVTCHNOP_unmask = 9
EVTCHNOP_reset = 10
EVTCHNOP_init_control = 11
EVTCHNOP_expand_array = 12
EVTCHNOP_set_priority = 13

EVTCHNSTAT_closed = 0  # Channel is not in use.
EVTCHNSTAT_unbound = 1  # Channel is waiting interdom connection.
EVTCHNSTAT_interdomain = 2  # Channel is connected to remote domain.
EVTCHNSTAT_pirq = 3  # Channel is bound to a phys IRQ line.
EVTCHNSTAT_virq = 4  # Channel is bound to a virtual IRQ line
EVTCHNSTAT_ipi = 5  # Channel is bound to a virtual IPI line

#   struct evtchn_alloc_unbound {
#       /* IN parameters */
#       domid_t dom, remote_dom;
#       /* OUT parameters */
#       evtchn_port_t port;
#   };
EVTCHN_ALLOC_UNBOUND = Layout(
    "evtchn_alloc_unbound",
    (("dom", "H"), ("remote_dom", "H"), ("port", "I")),
    c_type="struct evtchn_alloc_unbound",
)

#   struct evtchn_bind_interdomain {
#       /* IN parameters. */
#       domid_t remote_dom;
#       evtchn_port_t remote_port;
#       /* OUT parameters. */
#       evtchn_port_t local_port;
#   };
EVTCHN_BIND_INTERDOMAIN = Layout(
    "evtchn_bind_interdomain",
    (("remote_dom", "H"), ("", "2x"), ("remote_port", "I"), ("local_port", "I")),
    c_type="struct evtchn_bind_interdomain",
)

#   struct evtchn_close { evtchn_port_t port; };
#   struct evtchn_send { evtchn_port_t port; };
#   struct evtchn_unmask { evtchn_port_t port; };
EVTCHN_CLOSE = Layout("evtchn_close", (("port", "I"),), c_type="struct evtchn_close")
EVTCHN_SEND = Layout("evtchn_send", (("port", "I"),), c_type="struct evtchn_send")
EVTCHN_UNMASK = Layout("evtchn_unmask", (("port", "I"),), c_type="struct evtchn_unmask")

#   struct evtchn_status {
#       /* IN parameters */
#       domid_t  dom;
#       evtchn_port_t port;
#       /* OUT parameters */
#       uint32_t status;
#       uint32_t vcpu;                 /* VCPU to which this channel is bound.   */
#       union {
#           struct { domid_t dom; } unbound;                          /* EVTCHNSTAT_unbound */
#           struct { domid_t dom; evtchn_port_t port; } interdomain;  /* EVTCHNSTAT_interdomain */
#           uint32_t pirq;             /* EVTCHNSTAT_pirq        */
#           uint32_t virq;             /* EVTCHNSTAT_virq        */
#       } u;
#   };
# The union is laid out as its interdomain arm, the largest: u.unbound.dom shares
# u.interdomain.dom's two bytes.
EVTCHN_STATUS = Layout(
    "evtchn_status",
    (
        ("dom", "H"),
        ("", "2x"),
        ("port", "I"),
        ("status", "I"),
        ("vcpu", "I"),
        ("u_dom", "H"),
        ("", "2x"),
        ("u_port", "I"),
    ),
    c_type="struct evtchn_status",
    c_fields={"u_dom": "u.interdomain.dom", "u_port": "u.interdomain.port"},
)
