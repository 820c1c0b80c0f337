"""Running the app under uvicorn: in the foreground (`retinalens serve`) or in a thread (tests, benchmarks).

One process, one event loop, one model: uvicorn runs the app object itself (never an import string
with several workers), so the model is loaded exactly once. We bind the socket ourselves, so that
`--port 0` works and the address printed is the one really served.
"""

from __future__ import annotations

import ipaddress
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .._console import console
from ..errors import RetinaLensError
from ._deps import require
from .app import create_app
from .service import ServeConfig


def bind_socket(host: str, port: int) -> socket.socket:
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind, proto)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(2048)  # from now on connections wait in the backlog, also before uvicorn accepts them
    except OSError as exc:
        raise RetinaLensError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def _server(app: Any, cfg: ServeConfig) -> Any:
    uvicorn = require("uvicorn")
    # h11: pure Python, the same everywhere; the event loop is not where the time goes (the model is).
    # access_log off: uvicorn's logs each URL with its query; security.Guard logs the route template instead.
    return uvicorn.Server(uvicorn.Config(app, http="h11", log_level=cfg.log_level, access_log=False,
                                         timeout_graceful_shutdown=5))


def run_server(cfg: ServeConfig) -> None:
    """Serve until Ctrl-C. This process is the server's own, so its cores are split among the model
    calls here: PyTorch's and the BLAS library's thread counts are process-wide (an in-process server,
    in tests, leaves them be). The BLAS limit matters as much as PyTorch's: OpenBLAS workers spin
    after each of the gate's small matrix products: on 2 cores, 49 against 24 ms of CPU per request from
    one client."""
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(cfg.model_threads)
    threadpool_limits(cfg.model_threads)
    app = create_app(cfg)
    sock = bind_socket(cfg.host, cfg.port)
    service = app.state.service
    say = console()
    say.print(f"RetinaLens serving model {service.model.bundle.path.name} ({service.version.sha256[:12]}) "
              f"on {url_of(sock)}\nfeedback: {service.store.safe_url} (images in {service.store.images_dir})\n"
              f"model calls: {cfg.model_calls} at a time, {torch.get_num_threads()} thread(s) each, "
              f"up to {cfg.max_batch} images per call",
              highlight=False, soft_wrap=True)
    if not ipaddress.ip_address(sock.getsockname()[0]).is_loopback:  # ServeConfig made sure of a token
        say.print("[yellow]note:[/] reachable from other machines, with an API token but over plain HTTP: "
                  "put a reverse proxy with TLS in front", soft_wrap=True)
    try:
        _server(app, cfg).run(sockets=[sock])
    except KeyboardInterrupt:  # uvicorn shut down cleanly, then re-raised the Ctrl-C: a normal end
        console().print("stopped")


@contextmanager
def running_server(cfg: ServeConfig, app: Any = None, start_timeout: float = 60.0) -> Iterator[str]:
    """Serve in a background thread; yields the base URL, stops the server on exit."""
    app = app or create_app(cfg)
    sock = bind_socket(cfg.host, cfg.port)
    server = _server(app, cfg)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="retinalens-serve", daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            sock.close()
            raise RetinaLensError("the server did not start")
        time.sleep(0.02)
    try:
        yield url_of(sock)
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()


def child_env(**extra: str) -> dict[str, str]:
    """This environment for a child Python process that imports this very retinalens (also when it
    runs uninstalled, from a checkout)."""
    src = str(Path(__file__).resolve().parents[2])  # .../src/retinalens/serve/server.py -> .../src
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [src, os.environ.get("PYTHONPATH")])), **extra)


class ServerProcess:
    """`retinalens serve` in a child process (benchmarks, tests, scripts): its URL and its log lines.

    Its output (stdout and stderr: the startup lines, the access log, errors) is read all along, so that the pipe
    never fills and `log` holds everything it wrote."""

    def __init__(self, bundle: str | Path, *options: str, start_timeout: float = 120.0) -> None:
        env = child_env(COLUMNS="300")
        self.proc = subprocess.Popen([sys.executable, "-m", "retinalens.cli.main", "serve", str(bundle),
                                      "--port", "0", *options], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, env=env)
        self.log: list[str] = []
        self._url: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        try:
            self.url = self._url.get(timeout=start_timeout)
        except queue.Empty:
            self.url = ""
        if not self.url:
            self.kill()
            raise RetinaLensError("the server did not start:\n" + "".join(self.log[-20:]))

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.log.append(line)
            match = re.search(r" on (http://\S+)", line)
            if match:
                self._url.put(match.group(1))
        self._url.put("")  # exited: wake the waiter

    def stop(self, timeout: float = 15.0) -> int:
        """Ctrl-C (a graceful shutdown), then the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        return self.proc.wait()

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs (what a crash or the OOM killer does)."""
        self.proc.kill()
        self.proc.wait()

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
