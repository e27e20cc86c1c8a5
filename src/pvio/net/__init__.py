"""pvio.net: netfront and netback over io/netif.h (the Xen network device)."""
