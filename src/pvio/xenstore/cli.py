"""`pvio xenstored`: run the XenStore daemon."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path

import click

from pvio.jsonfile import write_json
from pvio.trace import TRACE_DIR, follow
from pvio.xenstore.daemon import XenStoreDaemon, raise_nofile, run
from pvio.xenstore.quotas import Quotas

#: Seconds between rewrites of the status file (`--status`).
STATUS_INTERVAL = 1.0


async def report(daemon: XenStoreDaemon, path: str) -> None:
    """What the daemon serves into `path`, now and every STATUS_INTERVAL seconds."""
    trace_dir = Path(path).resolve().parent.parent / TRACE_DIR  # the stack's, beside domains/
    while True:
        write_json(path, {"pid": os.getpid(), "time": time.time(), **daemon.server.census(),
                          **daemon.statistics()})
        follow(trace_dir, "xenstored")
        await asyncio.sleep(STATUS_INTERVAL)


@click.command("xenstored")
@click.option("--socket", "socket_path", required=True, type=click.Path(dir_okay=False),
              help="UNIX socket for dom0 clients (XENSTORED_PATH).")
@click.option("--db", type=click.Path(dir_okay=False), default=None,
              help="Keep the store in this file across restarts (atomic snapshots).")
@click.option("--control", "control_path", type=click.Path(dir_okay=False), default=None,
              help="Control socket for attaching domain connections [SOCKET.control].")
@click.option("--sync-interval", type=float, default=0.0, show_default=True,
              help="Seconds to coalesce --db snapshots; 0 = before each reply.")
@click.option("--status", type=click.Path(dir_okay=False), default=None,
              help="Write the connections, watches and transactions here every second, for pvio top.")
@click.option("--quota-nodes", type=int, default=Quotas.nodes_per_domain, show_default=True,
              help="Nodes a domain may own (-E).")
@click.option("--quota-node-size", type=int, default=Quotas.node_size, show_default=True,
              help="Bytes a domain's node may hold (-S).")
@click.option("--quota-watches", type=int, default=Quotas.watches_per_domain, show_default=True,
              help="Watches per domain (-W).")
@click.option("--quota-transactions", type=int, default=Quotas.transactions_per_conn,
              show_default=True, help="Open transactions per connection (-t).")
@click.option("--quota-perms", type=int, default=Quotas.perms_per_node, show_default=True,
              help="Permission entries a domain may set on a node (-A).")
@click.option("--quota-path-max", type=int, default=Quotas.path_max, show_default=True,
              help="Path length below a domain's home (-M).")
@click.option("--hypervisor", type=click.Path(dir_okay=False), default=None,
              help="Hypervisor socket: become a domain and serve introduced domains over "
                   "their XenStore pages (grant 1) and event channels.")
@click.option("--domid", type=int, default=None,
              help="With --hypervisor: the domid to be (the one domains grant their page to).")
def xenstored(
    socket_path: str,
    db: str | None,
    control_path: str | None,
    sync_interval: float,
    status: str | None,
    quota_nodes: int,
    quota_node_size: int,
    quota_watches: int,
    quota_transactions: int,
    quota_perms: int,
    quota_path_max: int,
    hypervisor: str | None,
    domid: int | None,
) -> None:
    """Serve XenStore (xs_wire) on a UNIX socket, as Xen's xenstored does."""
    quotas = Quotas(
        nodes_per_domain=quota_nodes,
        node_size=quota_node_size,
        watches_per_domain=quota_watches,
        transactions_per_conn=quota_transactions,
        perms_per_node=quota_perms,
        path_max=quota_path_max,
    )
    daemon = XenStoreDaemon(
        socket_path, db=db, control_path=control_path, quotas=quotas, sync_interval=sync_interval,
        hypervisor=hypervisor, domid=domid,
    )

    raise_nofile()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")

    async def main() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        ready = asyncio.Event()
        waiter = asyncio.ensure_future(ready.wait())
        waiter.add_done_callback(lambda _: click.echo(f"xenstored: listening on {socket_path}"))
        reporter = asyncio.ensure_future(report(daemon, status)) if status else None
        try:
            await run(daemon, ready)
        except asyncio.CancelledError:
            pass
        finally:
            if reporter is not None:
                reporter.cancel()

    asyncio.run(main())
