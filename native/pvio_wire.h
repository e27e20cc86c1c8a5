/* pvio's hypercall frames, as src/pvio/hypervisor/wire.py declares them.
 *
 * The structs below are wire.C_PROLOGUE verbatim and the constants are wire.py's;
 * tests/native/test_wire_header.py checks both against the Python declaration, so
 * the two never drift apart.
 */
#ifndef PVIO_WIRE_H
#define PVIO_WIRE_H

#include <stdint.h>

struct pvio_hc_frame { uint32_t magic; uint32_t length; uint32_t seq; uint16_t kind; uint16_t nr_ops; };
struct pvio_hc_op { uint16_t hypercall; uint16_t cmd; uint32_t count; uint32_t length; int16_t rc; uint16_t nr_fds; };
struct pvio_createdomain { uint16_t domid; uint16_t flags; uint32_t nr_pages; uint32_t max_grant_frames; char name[32]; };
struct pvio_memory_fd { uint16_t domid; uint16_t pad; uint32_t nr_pages; };
struct pvio_shareable { uint32_t nr_frames; uint32_t first_frame; };
struct pvio_page_fd { uint16_t domid; int16_t status; uint32_t ref; };
struct pvio_push_port { uint32_t port; uint16_t remote_dom; uint16_t pad; uint32_t remote_port; };
struct pvio_push_domain { uint16_t domid; uint16_t pad; };
struct pvio_domaininfo { uint16_t domid; uint16_t flags; uint32_t nr_pages; };

#define PVIO_HC_MAGIC 0x43485650u
#define FRAME_REQUEST 1
#define FRAME_REPLY 2
#define FRAME_PUSH 3
#define FRAME_ERROR 4
#define MAX_FRAME (128 * 1024)
#define MAX_FDS 250

#define HYPERVISOR_grant_table_op 20
#define HYPERVISOR_event_channel_op 32
#define PVIO_HYPERVISOR_domctl 0x7000
#define PVIO_HYPERVISOR_push 0x7002

#define PVIO_DOMCTL_createdomain 1
#define PVIO_DOMCTL_memory_fd 2
#define PVIO_DOMCTL_alloc_shareable 3
#define PVIO_DOMCTL_page_fd 4
#define PVIO_DOMCTL_getdomaininfo 5
#define PVIO_PUSH_port_bound 1
#define PVIO_PUSH_port_unbound 2
#define PVIO_PUSH_domain_dead 4
#define PVIO_PUSH_port_alloc 5
#define PVIO_CDF_copy_transport 1
#define PVIO_CDF_xs_domain 2
#define PVIO_CDF_control 4
#define PVIO_DOMINF_dying 1
#define PVIO_DOMINF_xs_domain 2

#define SHAREABLE_FRAME_BASE (1u << 24)
#define MAX_SHAREABLE_FRAMES 256

#endif
