#!/usr/bin/env python3
"""Checks per-request routing and cache publishing the way the front end uses them, with real
worker processes (inherited `pool`, `handoff` and `control` sockets, LISTEN_FDNAMES=
pool:handoff:control):

- `hello` in pool `api` gets `routes\\n/api/ api\\n/ web\\n`; on ONE keep-alive connection
  `GET /api/a` is answered by the worker and `GET /web/b` arrives on this script's end of the
  handoff socketpair with its bytes and the connection fd; the script answers on that fd and the
  client sees the worker's answer, then the script's. Also pipelined, and a cached path.
- `files` on a temp dir: `GET /index.html` publishes `cache 60 /index.html\\n` + the response on
  the control socket; a second GET within 60 s publishes nothing; HEAD, a query string, 404s
  and `no-store` publish nothing.

usage: check_handback.py [TARGET_DIR]   (default: ../../target/release relative to this script)
Only loopback addresses are used; only processes started here are signalled, by pid.
"""
import fcntl
import os
import shutil
import signal
import socket
import sys
import tempfile
import time

STARTED = []  # pids started here, killed at exit if still running


def spawn(argv, pool_sock, handoff_sock, control_sock, pool, threads="2"):
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
                       SLUICE_POOL=pool, SLUICE_THREADS=threads)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    STARTED.append(pid)
    return pid


class Worker:
    """A worker process with its own handoff and control socketpairs and pool socket."""

    def __init__(self, argv, pool, threads="2"):
        self.pool_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.pool_sock.bind(("127.0.0.1", 0))
        self.pool_sock.listen(1024)
        self.port = self.pool_sock.getsockname()[1]
        self.handoff, handoff_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.control, control_w = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.pid = spawn(argv, self.pool_sock, handoff_w, control_w, pool, threads)
        handoff_w.close()
        control_w.close()

    def send(self, msg):
        self.control.send(msg.encode() if isinstance(msg, str) else msg)

    def recv(self, timeout):
        """The next control message (bytes), or None after `timeout` seconds."""
        self.control.settimeout(timeout)
        try:
            data = self.control.recv(1 << 20)
        except socket.timeout:
            return None
        return data or None

    def reply(self, prefix, timeout=3.0):
        """The next message starting with `prefix` (bytes); `stats` and others are skipped."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            msg = self.recv(max(0.01, deadline - time.time()))
            if msg is None:
                return None
            if msg.startswith(prefix):
                return msg
        return None

    def sync(self, seq):
        """Pings and waits for the pong: every control message sent before is applied."""
        self.send(f"ping {seq}")
        return self.reply(f"pong {seq} ".encode()) is not None

    def handback(self, timeout=5.0):
        """(payload, fds) of the next handed-back connection, or (None, []) after `timeout`."""
        self.handoff.settimeout(timeout)
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.handoff, 1 << 20, 4)
        except socket.timeout:
            return None, []
        return data, fds

    def stop(self):
        self.send("stop")
        deadline = time.time() + 10
        while time.time() < deadline:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                STARTED.remove(self.pid)
                return os.WEXITSTATUS(status) if os.WIFEXITED(status) else -os.WTERMSIG(status)
            time.sleep(0.02)
        return None


def read_response(sock, timeout=5.0, head_only=False):
    """Reads one response with a Content-Length body (none when `head_only`, for HEAD);
    returns (head, body) as text."""
    sock.settimeout(timeout)
    data = getattr(sock, "_rest", b"")
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
    if head_only:
        length = 0
    while len(rest) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError("connection closed in a body")
        rest += chunk
    sock._rest = rest[length:]
    return head.decode(), rest[:length].decode(errors="replace")


class Client(socket.socket):
    """A client connection that keeps bytes read past one response for the next one."""


def connect(port):
    c = Client(socket.AF_INET, socket.SOCK_STREAM)
    c.settimeout(5)
    c.connect(("127.0.0.1", port))
    return c


def request(method, path, extra=""):
    return f"{method} {path} HTTP/1.1\r\nHost: t\r\n{extra}\r\n".encode()


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


def answer_as_frontend(fds, body="from the front end\n"):
    """Answers the handed-back connection on its fd, as the front end would, and closes it."""
    conn = socket.socket(fileno=fds[0])
    for extra in fds[1:]:
        os.close(extra)
    conn.sendall(f"HTTP/1.1 200 OK\r\nx-from: frontend\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
    conn.close()


def check_handback(examples):
    w = Worker([os.path.join(examples, "hello")], "api")
    w.send("routes\n/api/ api\n/ web\n")
    w.send("cached\n/api/cached\n")
    check(w.sync(1), "routes and cached sent; worker answers ping")

    # One keep-alive connection: /api/a by the worker, then /web/b handed back.
    c = connect(w.port)
    c.sendall(request("GET", "/api/a"))
    head, body = read_response(c)
    check(head.startswith("HTTP/1.1 200") and "x-sluice-pool: api" in head
          and "Connection: close" not in head,
          f"GET /api/a answered by the worker: {body.strip()!r}")
    c.sendall(request("GET", "/web/b"))
    payload, fds = w.handback()
    check(payload is not None and payload.startswith(b"GET /web/b") and len(fds) == 1,
          f"GET /web/b handed back: payload {payload[:40] if payload else None!r}..., {len(fds)} fd(s)")
    check(payload == request("GET", "/web/b"), "the payload is exactly the unconsumed bytes")
    answer_as_frontend(fds)
    head, body = read_response(c)
    check(head.startswith("HTTP/1.1 200") and "x-from: frontend" in head
          and body == "from the front end\n", "the client then sees the front end's answer")
    c.settimeout(3)
    check(c.recv(1) == b"", "the connection ends when the front end closes it (worker fd closed)")
    c.close()

    # Pipelined on one connection: api, web, api -> worker's answer first, then the front end's;
    # the payload holds the foreign request and everything after it.
    c = connect(w.port)
    c.sendall(request("GET", "/api/one") + request("GET", "/web/two") + request("GET", "/api/three"))
    payload, fds = w.handback()
    check(payload == request("GET", "/web/two") + request("GET", "/api/three") and len(fds) == 1,
          "pipelined: payload starts at the foreign request and holds the rest")
    answer_as_frontend(fds, "fe two\n")
    head1, body1 = read_response(c)
    head2, body2 = read_response(c)
    check("x-sluice-pool: api" in head1 and "x-from: frontend" in head2 and body2 == "fe two\n",
          "pipelined: the worker's answer, then the front end's")
    c.close()

    # A cached path: GET handed back; with a query string, or as POST, served by the worker.
    c = connect(w.port)
    c.sendall(request("GET", "/api/cached?v=1"))
    head, _ = read_response(c)
    check("x-sluice-pool: api" in head, "cached path with a query string: served by the worker")
    c.sendall(request("GET", "/api/./x/../cached"))
    payload, fds = w.handback()
    check(payload is not None and payload.startswith(b"GET /api/./x/../cached") and len(fds) == 1,
          "cached path (canonical form) handed back")
    answer_as_frontend(fds)
    c.close()

    # A bad path and an unrouted table.
    c = connect(w.port)
    c.sendall(request("GET", "/api/%zz"))
    payload, fds = w.handback()
    check(payload is not None and payload.startswith(b"GET /api/%zz") and len(fds) == 1,
          "a path that cannot be canonicalized is handed back")
    answer_as_frontend(fds)
    c.close()

    w.send("ping 2")
    pong = (w.reply(b"pong 2 ") or b"").decode()
    check(" requests=3 " in pong, f"hand-backs are not counted as requests: {pong!r}")

    # An empty table: nothing is handed back.
    w.send("routes\n")
    check(w.sync(3), "empty routes message applied")
    c = connect(w.port)
    c.sendall(request("GET", "/web/b"))
    head, _ = read_response(c)
    check("x-sluice-pool: api" in head, "empty route table: /web/b served by the worker")
    c.close()
    status = w.stop()
    check(status == 0, f"hello stops: exit status {status}")


def check_publish(examples, tmp):
    with open(os.path.join(tmp, "index.html"), "w") as f:
        f.write("<h1>hello</h1>\n")
    with open(os.path.join(tmp, "style.css"), "w") as f:
        f.write("h1 { color: red }\n")
    with open(os.path.join(tmp, ".secret"), "w") as f:
        f.write("no\n")
    w = Worker([os.path.join(examples, "files"), "--root", tmp], "web")
    check(w.sync(1), "files worker answers ping")

    c = connect(w.port)
    c.sendall(request("GET", "/index.html"))
    head, body = read_response(c)
    check(head.startswith("HTTP/1.1 200") and "content-type: text/html; charset=utf-8" in head
          and "cache-control: public, max-age=60" in head and "x-sluice-pool: web" in head
          and body == "<h1>hello</h1>\n", "files: GET /index.html")
    msg = w.reply(b"cache ")
    check(msg is not None and msg.startswith(b"cache 60 /index.html\n"),
          f"published: {msg[:60] if msg else None!r}...")
    published = msg.split(b"\n", 1)[1]
    p_head, _, p_body = published.partition(b"\r\n\r\n")
    p_head = p_head.decode()
    check(p_head.startswith("HTTP/1.1 200 OK\r\n") and "Content-Length: 15" in p_head
          and "cache-control: public, max-age=60" in p_head and p_body == b"<h1>hello</h1>\n",
          "the published message is the response: status line, headers, blank line, body")
    check("Date:" not in p_head and "Connection:" not in p_head,
          "the published response has no Date and no Connection header")
    wire_head = "\r\n".join(l for l in head.split("\r\n") if not l.startswith("Date:"))
    check(wire_head == p_head, "it is the wire response without Date")

    c.sendall(request("GET", "/index.html"))
    read_response(c)
    again = w.reply(b"cache ", timeout=1.5)
    check(again is None, "a second GET within 60 s publishes nothing")

    # Not published: HEAD, query string, 404, dot-file, Authorization.
    c.sendall(request("HEAD", "/style.css"))
    head, _ = read_response(c, head_only=True)
    check(head.startswith("HTTP/1.1 200") and "text/css" in head, "files: HEAD /style.css")
    c.sendall(request("GET", "/style.css?v=2"))
    read_response(c)
    c.sendall(request("GET", "/style.css", "Authorization: Basic eDp5\r\n"))
    read_response(c)
    c.sendall(request("GET", "/missing"))
    head, _ = read_response(c)
    check(head.startswith("HTTP/1.1 404"), "files: missing file -> 404")
    c.sendall(request("GET", "/.secret"))
    head, _ = read_response(c)
    check(head.startswith("HTTP/1.1 404"), "files: dot-file -> 404")
    c.sendall(request("GET", "/../../etc/passwd"))
    head, _ = read_response(c)
    check(head.startswith("HTTP/1.1 4"), f"files: path above the root -> {head.split()[1]}")
    c.sendall(request("DELETE", "/index.html"))
    head, _ = read_response(c)
    check(head.startswith("HTTP/1.1 405"), "files: DELETE -> 405")
    none = w.reply(b"cache ", timeout=1.5)
    check(none is None, f"HEAD, query string, Authorization, 404, 405: nothing published ({none!r})")

    # The directory index: GET / publishes under `/`.
    c.sendall(request("GET", "/"))
    head, body = read_response(c)
    msg = w.reply(b"cache ")
    check(body == "<h1>hello</h1>\n" and msg is not None and msg.startswith(b"cache 60 /\n"),
          "GET / serves index.html and publishes `cache 60 /`")
    c.close()
    status = w.stop()
    check(status == 0, f"files stops: exit status {status}")

    # no-store: never published; SLUICE_CACHE_MAX_ENTRY=0 is checked in the unit tests.
    w = Worker([os.path.join(examples, "files"), "--root", tmp, "--cache-control", "public, no-store, max-age=60"], "web")
    check(w.sync(1), "files --cache-control 'public, no-store, max-age=60' ready")
    c = connect(w.port)
    c.sendall(request("GET", "/index.html"))
    head, _ = read_response(c)
    check("cache-control: public, no-store, max-age=60" in head, "the given Cache-Control is sent")
    check(w.reply(b"cache ", timeout=1.5) is None, "no-store: nothing published")
    c.close()
    check(w.stop() == 0, "files stops")


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "..", "..", "target", "release")
    examples = os.path.join(target, "examples")
    tmp = tempfile.mkdtemp(prefix="sluice-files-")
    try:
        check_handback(examples)
        check_publish(examples, tmp)
    finally:
        cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    print("all hand-back and publishing checks passed")


if __name__ == "__main__":
    main()
