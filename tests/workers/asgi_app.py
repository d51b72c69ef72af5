"""An ASGI application for uvicorn: says which server answered; /ws echoes WebSocket messages;
/healthz answers 503 while the file named by $UNHEALTHY_FILE exists."""

import os


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            message = await receive()
            if message["type"] == "websocket.disconnect":
                return
            if message.get("text") is not None:
                await send({"type": "websocket.send", "text": message["text"]})
            else:
                await send({"type": "websocket.send", "bytes": message.get("bytes") or b""})
    marker = os.environ.get("UNHEALTHY_FILE")
    if scope["path"] == "/healthz" and marker and os.path.exists(marker):
        await send({"type": "http.response.start", "status": 503, "headers": []})
        await send({"type": "http.response.body", "body": b"unhealthy\n"})
        return
    client = scope.get("client") or ("", 0)
    body = f"uvicorn {scope['path']} {client[0]}\n".encode()
    await send({
        "type": "http.response.start",
        "status": 200,
        "headers": [(b"content-type", b"text/plain"), (b"x-server", b"uvicorn")],
    })
    await send({"type": "http.response.body", "body": body})
