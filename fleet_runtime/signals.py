"""How every process of this project learns it should stop: SIGINT (Ctrl-C), SIGTERM, or a set duration."""

from __future__ import annotations

import asyncio
import signal


def stop_event(duration: float = 0.0) -> asyncio.Event:
    """An event set on SIGINT or SIGTERM, or after `duration` seconds if it is positive.

    Call it from the running event loop. Each program then stops its parts in order
    (drain NATS, write state, close HTTP) instead of dying mid-write.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    if duration > 0:
        loop.call_later(duration, stop.set)
    return stop
