"""pvio.storage: what serves a disk's bytes — the block-backend contract every disk
implements (`backend`), and one raw file served without blocking the event loop
(`rawfile`).  Used by blkback, the NBD server and the lguest Launcher."""
