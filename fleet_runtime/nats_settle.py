"""A nats-py quirk every subscriber here works around."""

from __future__ import annotations

from nats.aio.client import Client


async def settle(nc: Client) -> None:
    """Return once the server holds every subscription made so far on `nc`.

    nats-py sends SUB through its flusher task but writes PING straight to the socket, so the
    PONG of a flush() right after subscribe() can come back before the server has the
    subscriptions, and a message published at once is then not delivered (seen in tests under
    load). The flusher runs while the first PONG is awaited: the second PING follows the SUBs.
    """
    await nc.flush()
    await nc.flush()
