"""pvio.toolstack: what xl/libxl do for Xen — configuration, XenStore layout, starting and
supervising domains (`pvio up`, `pvio list`)."""
