"""fedsilo's SuperLink: Flower's own `flower-superlink`, with one change: only departments' Fleet API requests are
answered for the network; the Control API (submit, list, stop jobs; read their logs) and the Runtime API (where the
ServerApp pulls and pushes the departments' messages) answer only the operator.

Flower 1.41 serves all three APIs on one HTTPS port, and open-source Flower has no account authentication for the
Control API, so anyone who can reach the port with the CA certificate (every department can) could submit a job that
spends every site's budget. Here a request for any path outside `/v1/fleet/` is refused with 403 unless it comes
from this host (loopback, or the address it reached, which only this host can originate) or from a network the
operator named with `--operator-network`. Departments keep using the port for the Fleet API, where Flower's node
authentication applies as before.

This module builds the SuperLink exactly as `flower-superlink` does (its argument parser, app factory and lifespan;
private functions of Flower, reached through `server.compat`) and wraps the app in `OperatorOnly`.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import sys
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from typing import Any

log = logging.getLogger(__name__)

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FLEET_PREFIX = "/v1/fleet/"  # what departments' SuperNodes use (node-authenticated by Flower)
HEALTH_PATHS = frozenset({"/health"})
FORBIDDEN = 403


def is_operator(client: tuple[str, int] | None, server: tuple[str, int] | None,
                operator_networks: Sequence[Network]) -> bool:
    """Whether a connection comes from this host or from a network the operator named."""
    if client is None:
        return False
    try:
        ip = ipaddress.ip_address(client[0])
    except ValueError:
        return False
    if ip.is_loopback or (server is not None and client[0] == server[0]):
        return True
    return any(ip in net for net in operator_networks)


class OperatorOnly:
    """ASGI middleware: Fleet API paths for everyone; every other path for the operator only."""

    def __init__(self, app: ASGIApp, operator_networks: Sequence[Network] = ()) -> None:
        self.app = app
        self.operator_networks = tuple(operator_networks)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path = str(scope.get("path", ""))
            public = path.startswith(FLEET_PREFIX) or path in HEALTH_PATHS
            if not public and not is_operator(scope.get("client"), scope.get("server"), self.operator_networks):
                log.warning("superlink: refused %s %s from %s: the Control and Runtime APIs answer only the "
                            "operator", scope.get("method"), path, (scope.get("client") or ("?",))[0])
                await _forbidden(send)
                return
        elif scope["type"] != "lifespan":  # websockets: none of Flower's APIs use them
            await _forbidden(send)
            return
        await self.app(scope, receive, send)


async def _forbidden(send: Send) -> None:
    body = json.dumps({"detail": "fedsilo: the Control and Runtime APIs of this SuperLink answer only the "
                                 "operator (this host or --operator-network)."}).encode()
    await send({"type": "http.response.start", "status": FORBIDDEN,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _split_args(argv: list[str]) -> tuple[list[Network], list[str]]:
    """fedsilo's own flags (`--operator-network CIDR`, repeatable); the rest are flower-superlink's."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--operator-network", action="append", default=[])
    ours, rest = parser.parse_known_args(argv)
    networks: list[Network] = []
    for value in ours.operator_network:
        try:
            networks.append(ipaddress.ip_network(value, strict=False))
        except ValueError as exc:
            raise SystemExit(f"fedsilo superlink: --operator-network {value!r}: {exc}") from exc
    return networks, rest


def main(argv: list[str] | None = None) -> None:
    import uvicorn

    from server.compat import (
        SuperLinkLifespan,
        console_handler,
        create_app,
        get_uvicorn_log_config,
        parse_superlink_lifespan_config,
    )

    networks, rest = _split_args(sys.argv[1:] if argv is None else argv)
    sys.argv = [sys.argv[0], *rest]  # Flower's parser reads sys.argv
    config = parse_superlink_lifespan_config()
    app = OperatorOnly(create_app(config, SuperLinkLifespan), networks)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # Flower's records are printed by its own console handler, without colour codes (this output is the server's
    # log: a file, a journal), and not again by the root handler above (which printed each twice, and Flower's
    # DEBUG records, a poll every second).
    console_handler.colored = False
    logging.getLogger("flwr").propagate = False
    log.info("superlink: Fleet API open on %s:%s; Control and Runtime APIs for this host%s", config.host,
             config.port, "".join(f", {n}" for n in networks))
    uvicorn.run(app=app, host=config.host, port=config.port, reload=False, access_log=True,
                log_config=get_uvicorn_log_config(console_handler.level), ssl_keyfile=config.ssl_keyfile,
                ssl_certfile=config.ssl_certfile, workers=1)


if __name__ == "__main__":
    main()
