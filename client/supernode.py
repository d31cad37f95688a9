"""The site's SuperNode process: Flower's own `flower-supernode`, with its two fixed waits set by the site.

Flower's SuperNode (1.41 and 1.42) asks the SuperLink for a message; when there is none it sleeps 3 s
(`flwr/supernode/start_client_internal.py`), and while a ClientApp runs it looks for the reply every 0.5 s. It
sends its reply and asks for the next message at once, before the server has aggregated the replies, so every
message exchange of a round waits out almost the whole 3 s: 2 exchanges in a plain round, 5 with SecAgg+.

`fedsilo client start` runs the SuperNode as `python -m client.supernode ARGS`: this module sets those two waits
(`FEDSILO_POLL_SECONDS` and `FEDSILO_REPLY_POLL_SECONDS`, which `client.deploy.supernode_env` sets from the site
config's `poll_seconds`; after a reply, the idle wait starts at 0.05 s and grows to `poll_seconds`, since a round's
next message usually follows within a second) and hands over to Flower's `flower-supernode` entry point with the
same arguments.
Nothing else changes, and nothing on disk is patched: `client.compat.set_supernode_polls` is the one place that
knows the two waits, and `tests/unit/test_client_deploy.py` fails on a Flower whose SuperNode no longer has them.
A shorter idle wait costs the SuperLink one more small request per site per wait (at 0.5 s: 2 per second per
idle site).

It also sets the SuperNode's heartbeat interval (`FEDSILO_HEARTBEAT_SECONDS`, from the site config's
`heartbeat_seconds`; Flower's is a fixed 30 s): the SuperLink counts a site gone, and a round stops waiting for
it, after 2 intervals without a heartbeat (`client.compat.set_supernode_heartbeat`).
"""

from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger(__name__)

POLL_ENV = "FEDSILO_POLL_SECONDS"
REPLY_POLL_ENV = "FEDSILO_REPLY_POLL_SECONDS"
REPLY_POLL_SECONDS = "0.1"
HEARTBEAT_ENV = "FEDSILO_HEARTBEAT_SECONDS"


def _seconds(name: str, low: float = 0.01, high: float = 60) -> float | None:
    value = os.environ.get(name)
    if value is None:
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not low <= seconds <= high:
        raise SystemExit(f"fedsilo: {name} must be a number of seconds from {low:g} to {high:g}, got {value!r}.")
    return seconds


def main() -> None:
    from client import compat
    from common.compat import FlowerCompatError, quicken_object_pulls

    idle = _seconds(POLL_ENV) or compat.FLOWER_IDLE_POLL_SECONDS
    reply = _seconds(REPLY_POLL_ENV) or compat.FLOWER_REPLY_POLL_SECONDS
    heartbeat = _seconds(HEARTBEAT_ENV, compat.HEARTBEAT_MIN_INTERVAL, compat.HEARTBEAT_MAX_INTERVAL)
    try:
        compat.set_supernode_polls(idle, reply)
    except FlowerCompatError as exc:  # slower rounds, nothing else: the site still runs Flower's own SuperNode
        logging.basicConfig(level=logging.INFO)
        log.warning("client: %s; the SuperNode keeps Flower's own waits (%gs idle, %gs for a reply).", exc,
                    compat.FLOWER_IDLE_POLL_SECONDS, compat.FLOWER_REPLY_POLL_SECONDS)
    if heartbeat is not None:
        try:
            compat.set_supernode_heartbeat(heartbeat)
        except FlowerCompatError as exc:  # a dead site is noticed later, nothing else
            logging.basicConfig(level=logging.INFO)
            log.warning("client: %s; the SuperNode keeps Flower's own heartbeat (%gs).", exc,
                        compat.HEARTBEAT_DEFAULT_INTERVAL)
    quicken_object_pulls(log, "client")
    sys.argv[0] = "flower-supernode"
    compat.flower_supernode()


if __name__ == "__main__":
    main()
