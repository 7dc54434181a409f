"""A file server on 127.0.0.1 for download tests (no network needed)."""

import http.server
import threading
import time


class LocalServer:
    """Serves `files` by name under any route.

    `/broken/<name>` announces the full size and sends half; `/slow/<name>`
    sends the body in `drip_bytes` pieces, `drip_seconds` apart.
    """

    def __init__(self, drip_bytes=4096, drip_seconds=0.05):
        self.files, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                body = server.files.get(self.path.rsplit("/", 1)[-1])
                if body is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                try:
                    if self.path.startswith("/broken/"):
                        self.wfile.write(body[: len(body) // 2])
                    elif self.path.startswith("/slow/"):
                        for start in range(0, len(body), drip_bytes):
                            self.wfile.write(body[start:start + drip_bytes])
                            self.wfile.flush()
                            time.sleep(drip_seconds)
                    else:
                        self.wfile.write(body)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (a deadline test)
                self.close_connection = True

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name, route="files"):
        return f"http://127.0.0.1:{self.port}/{route}/{name}"

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
