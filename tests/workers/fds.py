"""A socket worker that reports what it inherited (its LISTEN_* variables and every open fd
below 64) on stdout, then serves HTTP on fd 3."""

import http.server
import os
import socket
import sys

open_fds = []
for fd in range(64):
    try:
        os.fstat(fd)
        open_fds.append(str(fd))
    except OSError:
        pass
print(
    "inherited LISTEN_FDS=%s LISTEN_FDNAMES=%s LISTEN_PID_OK=%s fds=%s"
    % (
        os.environ.get("LISTEN_FDS"),
        os.environ.get("LISTEN_FDNAMES"),
        os.environ.get("LISTEN_PID") == str(os.getpid()),
        ",".join(open_fds),
    ),
    flush=True,
)


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"fds %s\n" % self.path.encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        pass

    def server_activate(self):
        pass


server = Server(("", 0), Handler, bind_and_activate=False)
server.socket = socket.socket(fileno=3)
sys.stdout.flush()
server.serve_forever()
