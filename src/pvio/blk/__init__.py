"""pvio.blk: the Xen block protocol's two ends — blkfront in a guest domain, blkback in
the driver domain — with the request rules of io/blkif.h, and the storage behind them."""
