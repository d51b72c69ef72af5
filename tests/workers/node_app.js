// A Node.js http server on the socket sluice passes as fd 3 (or, with PORT set, on
// 127.0.0.1:PORT by itself: the benchmark's "alone" figure).
const http = require("http");
const server = http.createServer((req, res) => {
  const body = `node ${req.url} ${req.socket.remoteAddress}\n`;
  res.writeHead(200, { "Content-Type": "text/plain", "X-Server": "node" });
  res.end(body);
});
server.keepAliveTimeout = 120000;
server.listen(process.env.PORT ? { port: Number(process.env.PORT), host: "127.0.0.1" } : { fd: 3 });
