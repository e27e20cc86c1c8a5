"""pvio.xenstore: XenStore -- the xs_wire codec, the store and its server core (sans-IO),
the asyncio daemon (`pvio xenstored`) and the client library."""
