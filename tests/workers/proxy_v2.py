"""A socket worker that expects a PROXY v2 header on every connection and answers each
request with the client address it names ("proxy ADDR:PORT"), or "no proxy header"."""

import ipaddress
import socket
import struct
import threading

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def read_exact(conn, n):
    data = b""
    while len(data) < n:
        chunk = conn.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def client_of(conn):
    head = read_exact(conn, 16)
    if head[:12] != SIGNATURE:
        return None, head
    family, length = head[13], struct.unpack("!H", head[14:16])[0]
    body = read_exact(conn, length)
    if family == 0x11:
        return "%s:%d" % (ipaddress.IPv4Address(body[0:4]), struct.unpack("!H", body[8:10])[0]), b""
    if family == 0x21:
        return "[%s]:%d" % (ipaddress.IPv6Address(body[0:16]), struct.unpack("!H", body[32:34])[0]), b""
    return "unknown", b""


def serve(conn):
    with conn:
        try:
            client, rest = client_of(conn)
        except EOFError:
            return
        data = rest
        while True:
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                data += chunk
            _, data = data.split(b"\r\n\r\n", 1)
            body = ("proxy %s\n" % client if client else "no proxy header\n").encode()
            conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


listener = socket.socket(fileno=3)
while True:
    conn, _ = listener.accept()
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
