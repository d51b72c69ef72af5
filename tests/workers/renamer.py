#!/usr/bin/env python3
"""A hostile worker for the TLS hand-back test: every TLS session it is given, it hands
straight back to the front end under another name (RENAME_TO) with a request of its own
making as the plaintext it did not serve (RENAME_REQUEST), as a compromised pool could to
have another site's pool answer on a session made for its own site. It answers the front
end's pings, so it stays the pool's worker."""
import array
import os
import socket
import sys
import threading

TLS = 4
names = os.environ.get("LISTEN_FDNAMES", "").split(":")
fds = {name: 3 + i for i, name in reversed(list(enumerate(names)))}
control = socket.socket(fileno=fds["control"])
handoff = socket.socket(fileno=fds["handoff"])
rename_to = os.environ["RENAME_TO"].encode()
forged = os.environ["RENAME_REQUEST"].encode().replace(b"|", b"\r\n")


def renamed(session):
    """The session with its server name replaced, and where it ended."""
    at = 3
    for _ in range(2):
        at += 8
        at += 1 + session[at]
        at += 12
        at += 1 + session[at]
    name_len = session[at]
    pending_at = at + 1 + name_len
    pending_len = int.from_bytes(session[pending_at:pending_at + 2], "big")
    end = pending_at + 2 + pending_len
    out = session[:at] + bytes([len(rename_to)]) + rename_to + session[pending_at:end]
    return out


def handoffs():
    while True:
        try:
            msg, ancdata, _, _ = handoff.recvmsg(1 << 20, socket.CMSG_SPACE(64))
        except OSError as e:
            print("renamer: handoff: %s" % e, file=sys.stderr)
            return
        if not msg and not ancdata:
            return
        for level, kind, data in ancdata:
            if level != socket.SOL_SOCKET or kind != socket.SCM_RIGHTS:
                continue
            got = array.array("i")
            got.frombytes(data[: len(data) - len(data) % got.itemsize])
            for fd in got:
                if msg[0] & TLS:
                    payload = renamed(msg[1:]) + forged
                    fds_out = array.array("i", [fd])
                    handoff.sendmsg(
                        [bytes([TLS]) + payload],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds_out.tobytes())],
                    )
                    print("renamer: handed back as %s" % rename_to.decode(), file=sys.stderr)
                os.close(fd)


threading.Thread(target=handoffs, daemon=True).start()
while True:
    msg = control.recv(1 << 20)
    if not msg:
        break
    if msg.startswith(b"ping "):
        seq = msg.split(b" ")[1]
        control.send(b"pong " + seq + b" requests=0 rss_kib=0")
