"""Whose fault an error is, for every error pvio's protocol cores raise or answer.

An error says who caused it, so a caller can tell a peer breaking the protocol (answer
in-band, perhaps drop that peer, carry on for everyone else) from its own misuse of an
API (a bug to fix) and from the storage failing under a disk (answer EIO, report it).
"""

from __future__ import annotations

import enum


class Fault(enum.Enum):
    """Who caused an error."""

    #: The peer broke the protocol or asked for something not allowed: a guest breaking
    #: lguest's DMA rules, an NBD client, a XenStore client, a frontend or backend.
    REMOTE = "remote"
    #: pvio's own caller misused an API.
    LOCAL = "local"
    #: The storage under a disk failed.
    STORAGE = "storage"
