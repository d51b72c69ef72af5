#!/usr/bin/env python3
"""Checks the worker control channel the way the front end uses it: inherited `pool`, `handoff`
and `control` sockets (LISTEN_FDS=3, LISTEN_FDNAMES=pool:handoff:control), `ping`/`pong`,
unsolicited `stats`, `stop`, EOF on the control socket; then the `crash` example's failure
behaviours (--hang-on stops pongs, --exit-on exits 3, --exit-after exits 3 after N responses).

usage: check_control.py [TARGET_DIR]   (default: ../../target/release relative to this script)
Only loopback addresses are used; only processes started here are signalled, by pid.
"""
import fcntl
import os
import signal
import socket
import sys
import time

POOL = "ctlpool"
STARTED = []  # pids started here, killed at exit if still running


def spawn(argv, pool_sock, handoff_sock, control_sock, threads="2"):
    pid = os.fork()
    if pid == 0:
        try:
            # Move the sources out of the way, then place them at 3, 4, 5 (dup2 clears CLOEXEC).
            srcs = [fcntl.fcntl(s.fileno(), fcntl.F_DUPFD, 100)
                    for s in (pool_sock, handoff_sock, control_sock)]
            for target, src in zip((3, 4, 5), srcs):
                os.dup2(src, target)
            env = dict(os.environ)
            env.update(LISTEN_FDS="3", LISTEN_PID=str(os.getpid()),
                       LISTEN_FDNAMES="pool:handoff:control",
                       SLUICE_POOL=POOL, SLUICE_THREADS=threads)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    STARTED.append(pid)
    return pid


class Worker:
    """A worker process with its own handoff and control socketpairs."""

    def __init__(self, argv, pool_sock, threads="2"):
        self.handoff, handoff_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control, control_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = spawn(argv, pool_sock, handoff_w, control_w, threads)
        handoff_w.close()
        control_w.close()

    def send(self, msg):
        self.control.send(msg.encode())

    def recv(self, timeout):
        """The next control message, or None after `timeout` seconds."""
        self.control.settimeout(timeout)
        try:
            data = self.control.recv(4096)
        except socket.timeout:
            return None
        return data.decode() if data else None

    def reply(self, prefix, timeout=3.0):
        """The next message starting with `prefix` (others, e.g. stats, are skipped)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = self.recv(max(0.01, deadline - time.time()))
            if msg is None:
                return None
            if msg.startswith(prefix):
                return msg
        return None

    def wait(self, timeout):
        """(exit status or None if still running after `timeout`, seconds taken)."""
        start = time.time()
        while time.time() - start < timeout:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                STARTED.remove(self.pid)
                took = time.time() - start
                if os.WIFEXITED(status):
                    return os.WEXITSTATUS(status), took
                return -os.WTERMSIG(status), took
            time.sleep(0.02)
        return None, time.time() - start

    def kill(self):
        if self.pid in STARTED:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
            STARTED.remove(self.pid)


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


def get(port, path="/", close=True):
    c = socket.create_connection(("127.0.0.1", port), timeout=5)
    conn = "Connection: close\r\n" if close else ""
    c.sendall(f"GET {path} HTTP/1.1\r\nHost: t\r\n{conn}\r\n".encode())
    return c


def check(cond, what):
    print(("ok   " if cond else "FAIL ") + what, flush=True)
    if not cond:
        cleanup()
        sys.exit(1)


def cleanup():
    for pid in list(STARTED):
        try:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        except OSError:
            pass
        STARTED.remove(pid)


def new_pool():
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    return sock, sock.getsockname()[1]


def wait_ready(w):
    """Pings until the worker answers (it is serving by then)."""
    deadline = time.time() + 5
    seq = 1000
    while time.time() < deadline:
        seq += 1
        w.send(f"ping {seq}")
        if w.reply(f"pong {seq} ", timeout=0.5):
            return True
    return False


def check_hello(examples):
    hello = [os.path.join(examples, "hello")]
    pool_sock, port = new_pool()

    w = Worker(hello, pool_sock)
    w.send("ping 7")
    pong = w.reply("pong ")
    fields = (pong or "").split(" ")
    check(len(fields) == 4 and fields[:3] == ["pong", "7", "requests=0"]
          and fields[3].startswith("rss_kib=") and int(fields[3][8:]) > 0,
          f"ping 7 -> {pong!r}")

    for i in range(3):
        c = get(port, f"/r{i}")
        head, body = read_response(c)
        c.close()
        check(head.startswith("HTTP/1.1 200") and f"pid {w.pid}" in body, f"request {i + 1}: {body.strip()}")
    start = time.time()
    stats = w.reply("stats ", timeout=2.5)
    check(stats == "stats requests=3", f"unsolicited {stats!r} after {time.time() - start:.2f}s")
    w.send("ping 8")
    pong = w.reply("pong ")
    check(pong is not None and pong.startswith("pong 8 requests=3 rss_kib="), f"ping 8 -> {pong!r}")
    quiet = w.reply("stats ", timeout=1.5)
    check(quiet is None, "no stats while the count does not change")

    w.send("what is this")
    w.send("ping x")
    w.send("ping 9")
    pong = w.reply("pong ")
    check(pong is not None and pong.startswith("pong 9 requests=3 "), f"unknown messages ignored; ping 9 -> {pong!r}")

    # `stop`: an idle keep-alive connection is closed, one mid-request gets Connection: close.
    idle = get(port, "/idle", close=False)
    read_response(idle)
    busy = socket.create_connection(("127.0.0.1", port), timeout=5)
    busy.sendall(b"GET /busy HTTP/1.1\r\nHost: t\r\n")
    time.sleep(0.2)
    w.send("stop")
    idle.settimeout(3)
    check(idle.recv(1) == b"", "stop: idle keep-alive connection closed")
    busy.sendall(b"\r\n")
    head, _ = read_response(busy)
    check(head.startswith("HTTP/1.1 200") and "Connection: close" in head,
          "stop: request in progress answered with Connection: close")
    busy.settimeout(3)
    check(busy.recv(1) == b"", "stop: that connection is then closed")
    busy.close()
    status, took = w.wait(10)
    check(status == 0, f"stop: exit status {status} after {took:.2f}s")

    # EOF on the control socket: a fresh worker stops gracefully.
    w = Worker(hello, pool_sock)
    check(wait_ready(w), "fresh worker answers ping")
    w.control.close()
    status, took = w.wait(10)
    check(status == 0, f"control socket closed: exit status {status} after {took:.2f}s")
    pool_sock.close()


def check_crash(examples):
    crash = os.path.join(examples, "crash")

    # --hang-on with one thread: no pong once the only thread is stuck.
    pool_sock, port = new_pool()
    w = Worker([crash, "--hang-on", "/hang"], pool_sock, threads="1")
    check(wait_ready(w), "crash --hang-on: answers ping before the hang")
    c = get(port)
    head, body = read_response(c)
    check(head.startswith("HTTP/1.1 200") and f"crash worker pool {POOL} pid {w.pid}" in body
          and f"x-sluice-pool: {POOL}" in head, f"crash answers like hello: {body.strip()}")
    hung = get(port, "/hang")
    time.sleep(0.3)
    w.send("ping 42")
    pong = w.reply("pong 42", timeout=2.0)
    check(pong is None, f"crash --hang-on: no pong within 2 s after GET /hang ({pong!r})")
    hung.settimeout(0.5)
    try:
        got = hung.recv(1)
    except socket.timeout:
        got = None
    check(got is None, "crash --hang-on: GET /hang never answered")
    w.kill()
    hung.close()
    pool_sock.close()

    # --exit-on: exit 3 without answering.
    pool_sock, port = new_pool()
    w = Worker([crash, "--exit-on", "/die"], pool_sock)
    check(wait_ready(w), "crash --exit-on: ready")
    c = get(port, "/ok")
    head, _ = read_response(c)
    check(head.startswith("HTTP/1.1 200"), "crash --exit-on: other paths answered")
    c = get(port, "/die/now")
    status, took = w.wait(5)
    check(status == 3, f"crash --exit-on: GET /die/now -> exit status {status}")
    c.settimeout(2)
    try:
        got = c.recv(1)
    except (ConnectionResetError, socket.timeout):
        got = b""
    check(got == b"", "crash --exit-on: no response")
    pool_sock.close()

    # --exit-after 2: both responses arrive, then exit 3.
    pool_sock, port = new_pool()
    w = Worker([crash, "--exit-after", "2"], pool_sock)
    check(wait_ready(w), "crash --exit-after: ready")
    for i in range(2):
        c = get(port, f"/n{i}")
        head, body = read_response(c)
        check(head.startswith("HTTP/1.1 200") and "crash worker" in body, f"crash --exit-after 2: response {i + 1}")
    status, took = w.wait(5)
    check(status == 3, f"crash --exit-after 2: exit status {status} {took:.2f}s after the second response")
    pool_sock.close()

    # --fail-start: exit 2 at once; unknown flag: usage and exit 2.
    pool_sock, _ = new_pool()
    w = Worker([crash, "--fail-start"], pool_sock)
    status, _ = w.wait(5)
    check(status == 2, f"crash --fail-start: exit status {status}")
    w = Worker([crash, "--bogus"], pool_sock)
    status, _ = w.wait(5)
    check(status == 2, f"crash --bogus: exit status {status}")

    # --start-delay: no pong until the delay has passed.
    w = Worker([crash, "--start-delay", "1.5"], pool_sock)
    start = time.time()
    check(wait_ready(w), "crash --start-delay 1.5: ready eventually")
    took = time.time() - start
    check(took >= 1.4, f"crash --start-delay 1.5: first pong after {took:.2f}s")
    w.send("stop")
    status, _ = w.wait(10)
    check(status == 0, f"crash: stop -> exit status {status}")
    pool_sock.close()


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "target", "release")
    examples = os.path.join(target, "examples")
    try:
        check_hello(examples)
        check_crash(examples)
    finally:
        cleanup()
    print("all control-channel checks passed")


if __name__ == "__main__":
    main()
