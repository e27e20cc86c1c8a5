"""Linux <net/if.h> and <linux/if_tun.h>: the ifreq TUNSETIFF takes, and TUN/TAP flags.

Used by `pvio.domains.tap` to create a TAP interface.  Native ABI (x86_64): the struct is
passed to the running kernel by ioctl, never shared with a 32-bit peer.
"""

from __future__ import annotations

from pvio.abi.layout import ABI_X86_64, Layout

C_PROLOGUE = "#include <net/if.h>\n"
C_PROLOGUE_VIRTIO = "#include <linux/virtio_net.h>\n"

#: <net/if.h>: # define IFNAMSIZ IF_NAMESIZE (16, including the NUL)
IFNAMSIZ = 16

#   struct ifreq {
#       union { char ifrn_name[IFNAMSIZ]; } ifr_ifrn;     /* # define ifr_name ... */
#       union {
#           struct sockaddr ifru_addr; ...
#           short int ifru_flags;                          /* # define ifr_flags ... */
#           int ifru_ivalue; ...
#           struct ifmap ifru_map;                         /* the largest: 24 bytes */
#           ...
#       } ifr_ifru;
#   };
# Declared as TUNSETIFF uses it: the name, the flags, and the rest of the union.
IFREQ_FLAGS = Layout(
    "ifreq_flags",
    (("ifr_name", f"{IFNAMSIZ}s"), ("ifr_flags", "h"), ("", "22x")),
    c_type="struct ifreq",
    abi=ABI_X86_64,
    c_prologue=C_PROLOGUE,
)

#: <linux/if_tun.h>: #define TUNSETIFF _IOW('T', 202, int)
TUNSETIFF = 0x400454CA
#: #define IFF_TAP 0x0002
IFF_TAP = 0x0002
#: #define IFF_NO_PI 0x1000   (no 4-byte packet-information header before each frame)
IFF_NO_PI = 0x1000
#: #define IFF_VNET_HDR 0x4000   (a struct virtio_net_hdr before each frame)
IFF_VNET_HDR = 0x4000
#: #define IFF_MULTI_QUEUE 0x0100   (each TUNSETIFF of the same name adds a queue: one fd
#: each, and the kernel spreads the flows it sends over them)
IFF_MULTI_QUEUE = 0x0100
#: #define TUNSETOFFLOAD _IOW('T', 208, unsigned int)
TUNSETOFFLOAD = 0x400454D0
#: #define TUN_F_CSUM 0x01   (the reader takes packets whose checksum is left to it)
TUN_F_CSUM = 0x01
#: #define TUN_F_TSO4 0x02, TUN_F_TSO6 0x04: the kernel may hand the TAP TCP segments of up
#: to 64 KiB (GSO), described by the virtio_net_hdr before each frame
TUN_F_TSO4 = 0x02
TUN_F_TSO6 = 0x04

#   <linux/virtio_net.h>
#   struct virtio_net_hdr {
#   #define VIRTIO_NET_HDR_F_NEEDS_CSUM 1   /* Use csum_start, csum_offset */
#   #define VIRTIO_NET_HDR_F_DATA_VALID 2   /* Csum is valid */
#       __u8 flags;
#       __u8 gso_type;
#       __virtio16 hdr_len;
#       __virtio16 gso_size;
#       __virtio16 csum_start;
#       __virtio16 csum_offset;
#   };
# What a TAP opened with IFF_VNET_HDR puts before each frame it hands out and expects
# before each frame written to it (little-endian: a modern virtio header on x86).
VIRTIO_NET_HDR = Layout(
    "virtio_net_hdr",
    (("flags", "B"), ("gso_type", "B"), ("hdr_len", "H"), ("gso_size", "H"), ("csum_start", "H"),
     ("csum_offset", "H")),
    c_type="struct virtio_net_hdr",
    abi=ABI_X86_64,
    c_prologue=C_PROLOGUE_VIRTIO,
)
VIRTIO_NET_HDR_F_NEEDS_CSUM = 1
VIRTIO_NET_HDR_F_DATA_VALID = 2
#: virtio_net_hdr.gso_type (linux/virtio_net.h)
VIRTIO_NET_HDR_GSO_NONE = 0
VIRTIO_NET_HDR_GSO_TCPV4 = 1
VIRTIO_NET_HDR_GSO_UDP = 3
VIRTIO_NET_HDR_GSO_TCPV6 = 4
VIRTIO_NET_HDR_GSO_ECN = 0x80
