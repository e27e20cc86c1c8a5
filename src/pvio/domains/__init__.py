"""pvio.domains: what turns a protocol core into a process — the contract between the
toolstack and a domain process (`spec`), running a role (`run`), the Xen driver domain and
guest, the lguest Launcher and guest, and the real-world ends a domain owns (the net frame
path, TAP in a namespace, the console pty)."""
