#!/usr/bin/env python3
"""A hostile worker for the delivery tests: a compromised application pool that does what any
process could with what it is given. It keeps every connection and channel it is ever given
(accepted from its pool sockets or received on its handoff channel) and never closes one,
reads everything that arrives on any of them and appends it to HOARD_FILE, answers every
request it reads in another pool's name (`x-sluice-pool: web`) and writes a second, forged
answer right after each one, as if to answer the client's next request too.

With HOARD_HAND_BACK=1 it also follows the hand-back protocol for a request outside /api/
(as a well-behaved worker of the pool would), but keeps a copy of the connection and goes on
reading and answering on it. It answers the front end's pings, so it stays the pool's
worker."""
import array
import fcntl
import os
import socket
import sys
import threading

names = os.environ.get("LISTEN_FDNAMES", "").split(":")
fds = {name: 3 + i for i, name in reversed(list(enumerate(names)))}
pool_fds = [3 + i for i, n in enumerate(names) if n == "pool"]
control = socket.socket(fileno=fds["control"])
handoff = socket.socket(fileno=fds["handoff"])
hand_back = os.environ.get("HOARD_HAND_BACK") == "1"
out = open(os.environ["HOARD_FILE"], "ab", buffering=0)
lock = threading.Lock()
kept = []


def record(data):
    with lock:
        out.write(data)


def answer(path):
    body = b"hoarded " + path + b"\n"
    forged = b"forged by the hoarder\n"
    return (
        b"HTTP/1.1 200 OK\r\nx-sluice-pool: web\r\nContent-Length: %d\r\n\r\n%s"
        b"HTTP/1.1 200 OK\r\nx-sluice-pool: web\r\nContent-Length: %d\r\n\r\n%s"
        % (len(body), body, len(forged), forged)
    )


def serve(sock, buf=b""):
    """Reads `sock` until it ends, answering every request head it sees."""
    handed = False
    while True:
        while b"\r\n\r\n" in buf:
            head, _, buf = buf.partition(b"\r\n\r\n")
            line = head.split(b"\r\n", 1)[0].split(b" ")
            path = line[1] if len(line) > 1 else b"?"
            if hand_back and not handed and not path.startswith(b"/api"):
                # The protocol's hand-back, with a copy kept.
                try:
                    fd = array.array("i", [sock.fileno()])
                    handoff.sendmsg(
                        [b"\x00" + head + b"\r\n\r\n" + buf],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fd.tobytes())],
                    )
                    handed = True
                except OSError as e:
                    print("hoarder: hand-back: %s" % e, file=sys.stderr)
            try:
                sock.sendall(answer(path))
            except OSError:
                pass
        try:
            data = sock.recv(65536)
        except OSError:
            data = b""
        if not data:
            return
        record(data)
        buf += data


def keep(sock, buf=b""):
    # A worker's end of any connection is blocking, as an accepted socket is; say so if not.
    if fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK:
        record(b"\nHOARDER-GOT-A-NONBLOCKING-FD\n")
    sock.setblocking(True)
    kept.append(sock)
    threading.Thread(target=serve, args=(sock, buf), daemon=True).start()


def accept(fd):
    listener = socket.socket(fileno=fd)
    while True:
        conn, _ = listener.accept()
        keep(conn)


def handoffs():
    while True:
        try:
            msg, ancdata, _, _ = handoff.recvmsg(1 << 20, socket.CMSG_SPACE(64))
        except OSError as e:
            print("hoarder: handoff: %s" % e, file=sys.stderr)
            return
        if not msg and not ancdata:
            return
        record(msg[1:])
        for level, kind, data in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                got = array.array("i")
                got.frombytes(data[: len(data) - len(data) % got.itemsize])
                for fd in got:
                    sock = socket.socket(fileno=fd)
                    # The payload: a PROXY header for a delivered channel, else bytes read.
                    payload = msg[1:]
                    if payload.startswith(b"\r\n\r\n\x00\r\nQUIT\n"):
                        payload = payload[16 + int.from_bytes(payload[14:16], "big"):]
                    keep(sock, payload)


for fd in pool_fds:
    threading.Thread(target=accept, args=(fd,), daemon=True).start()
threading.Thread(target=handoffs, daemon=True).start()
while True:
    msg = control.recv(1 << 20)
    if not msg:
        break
    if msg.startswith(b"ping "):
        seq = msg.split(b" ")[1]
        control.send(b"pong " + seq + b" requests=0 rss_kib=0")
