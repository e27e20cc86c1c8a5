"""lguest (Linux 2.6.23) include/linux/lguest_launcher.h: the device bus and DMA I/O.

lguest ran only on i386, so its layouts are the 32-bit ABI's: `unsigned long` is four
bytes and guest-physical addresses are 32-bit.  pvio keeps those bytes exactly, and the
layout probe compiles the quoted definitions with ``gcc -m32``.  The definitions below are
quoted from the 2.6.23 header (the probe's C prologue carries the same text).
"""

from __future__ import annotations

from pvio.abi.layout import ABI_X86_32, Layout

# T:160 lguest's bus and DMA buffers
# lguest has no rings.  The Launcher puts a page of device descriptors just above the
# guest's memory (type, features, status, and where the device's own page is), and all
# I/O goes through two hypercalls: BIND_DMA offers an array of receive buffers on a
# "key" (an address in the device's page), SEND_DMA copies a buffer to whoever bound
# that key.  A buffer (lguest_dma) is up to 16 address/length pairs, each inside one
# page; the host writes used_len to say how much it copied.
# :T

#: asm-i386/lguest_hcall.h (2.6.23)
LHCALL_BIND_DMA = 12
LHCALL_SEND_DMA = 13

#: #define LGUEST_MAX_DMA_SECTIONS 16
LGUEST_MAX_DMA_SECTIONS = 16
#: #define LGUEST_MAX_DMA 32   (DMA arrays one guest may bind)
LGUEST_MAX_DMA = 32
#: #define LGUEST_MAX_DEVICES (LGUEST_MAX_DMA/2)
LGUEST_MAX_DEVICES = LGUEST_MAX_DMA // 2
#: #define LGUEST_CONSOLE_DMA_KEY 0
LGUEST_CONSOLE_DMA_KEY = 0
LGUEST_PAGE_SIZE = 4096
#: #define LGUEST_IRQS 32 (drivers/lguest/lg.h): interrupt lines a guest has; 0 is the
#: timer, and 0 in BIND_DMA means "unbind".
LGUEST_IRQS = 32
#: The number of `struct lguest_dma` in one BIND_DMA array: lguest's hypercall passed it
#: as ``u16 numdmas`` (arg3 >> 8) and checked only that the array lay in memory; its
#: drivers bind 1 or 8.  pvio refuses a larger count instead of truncating it.
MAX_DMAS_PER_BIND = 0xFFFF
#: pvio's violation notices (interrupts at or above this are never bound by a guest):
#: when a domain's SEND_DMA or BIND_DMA on a key is refused, the hypervisor raises
#: ``VIOLATION_IRQ_BASE + irq`` in every other domain bound at that key with ``irq`` (the
#: Launcher), which marks the device FAILED.
VIOLATION_IRQ_BASE = LGUEST_IRQS
#: The violation notice of irq 0 (which no binding can use): raised in a guest's
#: supervisor (its Launcher) when the guest broke the rules at a key in a shared region
#: the supervisor is not bound at: its network device's LAN page.
GUEST_VIOLATION_IRQ = VIOLATION_IRQ_BASE + 0

C_PROLOGUE = """
typedef unsigned char u8; typedef unsigned short u16; typedef unsigned int u32;
#define LGUEST_MAX_DMA_SECTIONS 16
struct lguest_dma {
	/* 0 if free to be used, filled by the Host. */
	u32 used_len;
	unsigned long addr[LGUEST_MAX_DMA_SECTIONS];
	u16 len[LGUEST_MAX_DMA_SECTIONS];
};
struct lguest_block_page {
	/* 0 is a read, 1 is a write. */
	int type;
	u32 sector;	/* Offset in device = sector * 512. */
	u32 bytes;	/* Length expected to be read/written in bytes */
	/* 0 = pending, 1 = done, 2 = done, error */
	int result;
	u32 num_sectors; /* Disk length = num_sectors * 512 */
};
struct lguest_net {
	/* Simply the mac address (with multicast bit meaning promisc). */
	unsigned char mac[6];
};
struct lguest_device_desc {
	u16 type;
	u16 features;
	u16 status;
	u16 num_pages;
	u32 pfn;
};
"""

#   struct lguest_dma {
#       /* 0 if free to be used, filled by the Host. */
#       u32 used_len;
#       unsigned long addr[LGUEST_MAX_DMA_SECTIONS];
#       u16 len[LGUEST_MAX_DMA_SECTIONS];
#   };
LGUEST_DMA = Layout(
    "lguest_dma",
    (
        ("used_len", "I"),
        ("addr", f"{LGUEST_MAX_DMA_SECTIONS}I"),
        ("len", f"{LGUEST_MAX_DMA_SECTIONS}H"),
    ),
    c_type="struct lguest_dma",
    abi=ABI_X86_32,
    c_prologue=C_PROLOGUE,
)

#   struct lguest_block_page {
#       int type;        /* 0 is a read, 1 is a write. */
#       u32 sector;      /* Offset in device = sector * 512. */
#       u32 bytes;       /* Length expected to be read/written in bytes */
#       int result;      /* 0 = pending, 1 = done, 2 = done, error */
#       u32 num_sectors; /* Disk length = num_sectors * 512 */
#   };
LGUEST_BLOCK_PAGE = Layout(
    "lguest_block_page",
    (("type", "i"), ("sector", "I"), ("bytes", "I"), ("result", "i"), ("num_sectors", "I")),
    c_type="struct lguest_block_page",
    abi=ABI_X86_32,
    c_prologue=C_PROLOGUE,
)
LGUEST_BLOCK_READ = 0
LGUEST_BLOCK_WRITE = 1
LGUEST_BLOCK_RESULT_PENDING = 0
LGUEST_BLOCK_RESULT_OK = 1
LGUEST_BLOCK_RESULT_ERROR = 2
LGUEST_SECTOR_SIZE = 512

#   struct lguest_net {
#       /* Simply the mac address (with multicast bit meaning promisc). */
#       unsigned char mac[6];
#   };
LGUEST_NET = Layout(
    "lguest_net",
    (("mac", "6s"),),
    c_type="struct lguest_net",
    abi=ABI_X86_32,
    c_prologue=C_PROLOGUE,
)
#: Slots in the shared LAN page.
LGUEST_NET_SLOTS = LGUEST_PAGE_SIZE // LGUEST_NET.size

#   struct lguest_device_desc {
#       u16 type;
#   #define LGUEST_DEVICE_T_CONSOLE 1
#   #define LGUEST_DEVICE_T_NET     2
#   #define LGUEST_DEVICE_T_BLOCK   3
#       u16 features;
#   #define LGUEST_NET_F_NOCSUM         0x4000 /* Don't bother checksumming */
#   #define LGUEST_DEVICE_F_RANDOMNESS  0x8000 /* IRQ is fairly random */
#       u16 status;
#   /* 256 and above are device specific. */
#   #define LGUEST_DEVICE_S_ACKNOWLEDGE 1   /* We have seen device. */
#   #define LGUEST_DEVICE_S_DRIVER      2   /* We have found a driver */
#   #define LGUEST_DEVICE_S_DRIVER_OK   4   /* Driver says OK! */
#   #define LGUEST_DEVICE_S_REMOVED     8   /* Device has gone away. */
#   #define LGUEST_DEVICE_S_REMOVED_ACK 16  /* Driver has been told. */
#   #define LGUEST_DEVICE_S_FAILED      128 /* Something actually failed */
#       u16 num_pages;
#       u32 pfn;
#   };
LGUEST_DEVICE_DESC = Layout(
    "lguest_device_desc",
    (("type", "H"), ("features", "H"), ("status", "H"), ("num_pages", "H"), ("pfn", "I")),
    c_type="struct lguest_device_desc",
    abi=ABI_X86_32,
    c_prologue=C_PROLOGUE,
)

LGUEST_DEVICE_T_CONSOLE = 1
LGUEST_DEVICE_T_NET = 2
LGUEST_DEVICE_T_BLOCK = 3

LGUEST_NET_F_NOCSUM = 0x4000
LGUEST_DEVICE_F_RANDOMNESS = 0x8000

LGUEST_DEVICE_S_ACKNOWLEDGE = 1
LGUEST_DEVICE_S_DRIVER = 2
LGUEST_DEVICE_S_DRIVER_OK = 4
LGUEST_DEVICE_S_REMOVED = 8
LGUEST_DEVICE_S_REMOVED_ACK = 16
LGUEST_DEVICE_S_FAILED = 128
