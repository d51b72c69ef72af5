#!/usr/bin/env python3
"""Checks a worker binary the way the front end starts it: inherited `pool` listening socket and
`handoff` SEQPACKET socket (LISTEN_FDS convention), handed-off connections with the bytes
already read, a message without an fd, and a graceful stop on SIGTERM.

usage: check_inherited.py PATH/TO/hello
"""
import fcntl
import os
import signal
import socket
import sys
import time

POOL = "testpool"


def spawn(binary, pool_sock, handoff_sock):
    pid = os.fork()
    if pid == 0:
        try:
            # Move the sources out of the way, then place them at 3 and 4 (dup2 clears CLOEXEC).
            srcs = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100) for s in (pool_sock, handoff_sock)]
            for target, src in zip((3, 4), srcs):
                os.dup2(src, target)
            env = dict(os.environ)
            env.update(LISTEN_FDS="2", LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES="pool:handoff",
                       SLUICE_POOL=POOL, SLUICE_THREADS="2")
            os.execve(binary, [binary], env)
        finally:
            os._exit(127)
    return pid


def read_response(sock, timeout=5.0):
    """Reads one response with a Content-Length body; returns (head, body)."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed before a full head: {data!r}")
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value)
    while len(rest) < length:
        rest += sock.recv(65536)
    return head.decode(), rest[:length].decode()


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what)
    if not cond:
        sys.exit(1)


def main():
    binary = sys.argv[1]
    pool_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    pool_sock.bind(("127.0.0.1", 0))
    pool_sock.listen(1024)
    pool_port = pool_sock.getsockname()[1]
    front_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = spawn(binary, pool_sock, worker_end)
    worker_end.close()
    time.sleep(0.3)

    # (a) a connection accepted by the worker from the inherited pool socket.
    c = socket.create_connection(("127.0.0.1", pool_port))
    c.sendall(b"GET /direct HTTP/1.1\r\nHost: t\r\n\r\n")
    head, body = read_response(c)
    check(head.startswith("HTTP/1.1 200") and f"pool {POOL} pid {pid}" in body, f"pool socket: {body.strip()}")
    check(f"x-sluice-pool: {POOL}" in head, "x-sluice-pool header")

    # (b) a connection the "front end" accepted and read from, handed off with its bytes.
    front = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    front.bind(("127.0.0.1", 0))
    front.listen(16)
    client = socket.create_connection(front.getsockname())
    client.sendall(b"GET /handed HTTP/1.1\r\nHost: t\r\n\r\nGET /second HTTP/1.1\r\nHo")
    conn, _ = front.accept()
    time.sleep(0.05)
    already_read = conn.recv(65536)
    socket.send_fds(front_end, [already_read], [conn.fileno()])
    conn.close()
    head, body = read_response(client)
    check(head.startswith("HTTP/1.1 200") and f"pool {POOL}" in body, f"handed-off request: {body.strip()}")
    client.sendall(b"st: t\r\n\r\n")  # the rest of the pipelined second request
    head, body = read_response(client)
    check(head.startswith("HTTP/1.1 200"), "second request on the handed-off connection (split across the handoff)")

    # (c) a message with no fd is dropped; the next handoff still works.
    front_end.send(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    client2 = socket.create_connection(front.getsockname())
    client2.sendall(b"GET /again HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n")
    conn, _ = front.accept()
    time.sleep(0.05)
    socket.send_fds(front_end, [conn.recv(65536)], [conn.fileno()])
    conn.close()
    head, body = read_response(client2)
    check(head.startswith("HTTP/1.1 200") and "Connection: close" in head, "handoff after a message without an fd")
    client2.settimeout(3)
    check(client2.recv(1) == b"", "server closes after Connection: close (client sees EOF)")
    client2.close()

    # (d) graceful stop: an idle keep-alive connection is closed, the process exits 0 quickly,
    # and the pool socket (our copy) keeps queuing.
    idle = socket.create_connection(("127.0.0.1", pool_port))
    idle.sendall(b"GET /idle HTTP/1.1\r\nHost: t\r\n\r\n")
    read_response(idle)
    start = time.time()
    os.kill(pid, signal.SIGTERM)
    idle.settimeout(5)
    check(idle.recv(1) == b"", "idle keep-alive connection closed on SIGTERM")
    _, status = os.waitpid(pid, 0)
    took = time.time() - start
    check(os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0 and took < 5, f"exit 0 after SIGTERM in {took:.2f}s")
    queued = socket.create_connection(("127.0.0.1", pool_port), timeout=2)
    queued.sendall(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
    check(True, "pool socket still accepts connections into its queue after the worker exited")

    # A new worker inherits the queue and answers the waiting connection.
    front_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = spawn(binary, pool_sock, worker_end)
    worker_end.close()
    head, body = read_response(queued)
    check(head.startswith("HTTP/1.1 200") and f"pid {pid}" in body, "queued connection answered by the next worker")
    os.kill(pid, signal.SIGTERM)
    os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
