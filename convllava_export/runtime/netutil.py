"""The server's listening socket, bound before the model loads: a busy or forbidden port is
reported in one line at once, not after a minute of loading."""

from __future__ import annotations

import errno
import socket

from ..errors import ConvLlavaError


def host_port(host: str, port: int) -> str:
    """HOST:PORT as in a URL ([::1]:8000 for IPv6)."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_listen_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket on host:port (IPv4 or IPv6, name or address; port 0: any free one).

    SO_REUSEADDR as uvicorn sets it: a restart may reuse a port whose old connections linger
    in TIME_WAIT, while a port another process listens on is still refused.
    """
    where = host_port(host, port)
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise ConvLlavaError(f"cannot listen on {where}: cannot resolve host '{host}' ({exc.strerror}) — pass an address such as 127.0.0.1 or 0.0.0.0 to --host") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            why = "address already in use — pick another --port (or stop the process that holds it)"
        elif exc.errno == errno.EACCES:
            why = "permission denied — ports below 1024 need root (or CAP_NET_BIND_SERVICE); pick a --port of 1024 or more" if 0 < port < 1024 else "permission denied"
        elif exc.errno == errno.EADDRNOTAVAIL:
            why = f"'{host}' is not an address of this machine — pass one of its addresses, 127.0.0.1 or 0.0.0.0 to --host"
        else:
            why = exc.strerror or str(exc)
        raise ConvLlavaError(f"cannot listen on {where}: {why}") from None
    return sock
