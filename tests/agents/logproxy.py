"""A tiny logging reverse proxy for the agent-client tests: every request's method, path,
headers and JSON body go to a JSONL file (with the status the server answered), and the answer
is passed back as it arrives (SSE streams chunk by chunk). Standard library only; it sits in
front of a real `ostinato serve` so that what a client sends is seen without changing the
server. `python logproxy.py UPSTREAM_PORT LOG_PATH` prints the port it listens on."""
from __future__ import annotations

import http.client
import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade",
       "proxy-authorization", "proxy-authenticate", "host", "content-length"}


def make_handler(upstream_port: int, log_path: str, lock: threading.Lock):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):       # quiet: the JSONL file is the log
            pass

        def _forward(self):
            n = int(self.headers.get("content-length") or 0)
            body = self.rfile.read(n) if n else b""
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP}
            conn = http.client.HTTPConnection("127.0.0.1", upstream_port, timeout=600)
            conn.request(self.command, self.path, body=body, headers=headers)
            resp = conn.getresponse()
            try:
                parsed = json.loads(body) if body else None
            except ValueError:
                parsed = body.decode(errors="replace")
            record = {"method": self.command, "path": self.path,
                      "headers": {k.lower(): v for k, v in self.headers.items()},
                      "body": parsed, "status": resp.status}
            self.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in HOP:
                    self.send_header(k, v)
            self.send_header("Transfer-Encoding", "chunked")
            self.send_header("Connection", "close")
            self.end_headers()
            answer = []
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                answer.append(chunk)
                self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
            conn.close()
            if resp.status >= 400 or self.path.startswith("/v1/messages/count"):
                record["answer"] = b"".join(answer).decode(errors="replace")[:4000]
            with lock, open(log_path, "a") as f:
                f.write(json.dumps(record) + "\n")
            self.close_connection = True

        do_GET = do_POST = do_DELETE = do_HEAD = _forward

    return Handler


def serve(upstream_port: int, log_path: str) -> ThreadingHTTPServer:
    """A proxy on a free loopback port, serving in a daemon thread."""
    server = ThreadingHTTPServer(("127.0.0.1", 0),
                                 make_handler(upstream_port, log_path, threading.Lock()))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


if __name__ == "__main__":
    s = serve(int(sys.argv[1]), sys.argv[2])
    print(s.server_address[1], flush=True)
    threading.Event().wait()
