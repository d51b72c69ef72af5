// A Node.js http server on the socket sluice passes as fd 3.
const http = require("http");
const server = http.createServer((req, res) => {
  const body = `node ${req.url} ${req.socket.remoteAddress}\n`;
  res.writeHead(200, { "Content-Type": "text/plain", "X-Server": "node" });
  res.end(body);
});
server.keepAliveTimeout = 120000;
server.listen({ fd: 3 });
