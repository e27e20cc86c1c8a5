"""pvio.nbd: the NBD protocol — wire layouts, sans-IO server and client cores, their asyncio
adapters, and `pvio nbd`.  Below `blk/`: a guest's disk is exported through it, and blkback
reaches images in other formats through its client."""
