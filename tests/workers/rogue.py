#!/usr/bin/env python3
"""A hostile worker for the isolation tests: it takes its pool's sockets as any worker does
(LISTEN_FDS / LISTEN_FDNAMES), answers every connection itself, and sends the front end what
a compromised application would: cache publications for another pool's paths, malformed and
oversized numbers, and garbage on the handoff channel. After SIGTERM (a recycle or a stop) it
publishes a path of its own pool, then exits. It only touches the fds it inherited."""
import ctypes
import os
import signal
import socket
import sys
import threading
import time

names = os.environ.get("LISTEN_FDNAMES", "").split(":")
fds = {name: 3 + i for i, name in reversed(list(enumerate(names)))}
pool_fds = [3 + i for i, n in enumerate(names) if n == "pool"]
control = socket.socket(fileno=fds["control"])
handoff = socket.socket(fileno=fds["handoff"])


def response(body):
    return (
        "HTTP/1.1 200 OK\r\nCache-Control: public, max-age=300\r\n"
        "x-sluice-pool: rogue\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
    ).encode()


def publish(path, body):
    try:
        control.send(b"cache test\t" + path.encode() + b"\n" + response(body))
    except OSError as e:
        print("rogue: publish %s: %s" % (path, e), file=sys.stderr)


def stopped(signum, frame):
    publish("/api/after-retire", "published while retiring\n")
    time.sleep(0.5)
    os._exit(0)


signal.signal(signal.SIGTERM, stopped)

for path in ["/admin/forged", "/api/../admin/forged2"]:
    publish(path, "forged by the api pool\n")
for bad in [
    b"cache 18446744073709551615 /x\n" + response("overflow"),
    b"pong 1 requests=99999999999999999999999 rss_kib=1",
    b"cache test\t/api/x\nnot a response",
    b"cache /api/x\n" + response("no host"),
    b"cache Test\t/api/x\n" + response("a host not normalized"),
    b"\xff" * 100,
    b"",
]:
    control.send(bad)
# Garbage on the handoff channel: a message without a connection, one with a non-stream fd.
handoff.send(b"\x00GET / HTTP/1.1\r\n\r\n")
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
handoff.sendmsg([b"\x00x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(
    __import__("array").array("i", [a.fileno()]))))])
# Take over the reuseport group's steering through its own pool socket: replace the group's
# program with a classic BPF one, then detach it (the kernel would then hash connections over
# every pool's sockets).
libc = ctypes.CDLL(None, use_errno=True)


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_ushort), ("jt", ctypes.c_ubyte),
                ("jf", ctypes.c_ubyte), ("k", ctypes.c_uint)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.POINTER(SockFilter))]


insns = (SockFilter * 1)(SockFilter(0x06, 0, 0, 0))  # ret #0: always socket 0
fprog = SockFprog(1, insns)
zero = ctypes.c_int(0)
for name, opt, arg, size in [("attach", 51, ctypes.byref(fprog), ctypes.sizeof(fprog)),
                             ("detach", 68, ctypes.byref(zero), 4)]:
    rc = libc.setsockopt(pool_fds[0], 1, opt, arg, size)
    print("rogue: reuseport %s: rc=%d errno=%d" % (name, rc, ctypes.get_errno()), flush=True)
publish("/api/legit", "published by the api pool\n")
# More entries than the kernel's set of cached paths holds (4096), all expiring in a second.
for i in range(4200):
    control.send(b"cache test\t/api/many/%d\n" % i + response("many\n").replace(b"300", b"1"))
sys.stdout.write("rogue %d ready\n" % os.getpid())
sys.stdout.flush()


def serve(fd):
    listener = socket.socket(fileno=fd)
    while True:
        conn, _ = listener.accept()
        try:
            conn.settimeout(2)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    break
                data += chunk
            conn.sendall(response("rogue\n").replace(b"public", b"private"))
        except OSError:
            pass
        finally:
            conn.close()


for fd in pool_fds:
    threading.Thread(target=serve, args=(fd,), daemon=True).start()
while True:
    time.sleep(1)
