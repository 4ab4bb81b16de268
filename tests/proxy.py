"""A fault-injecting TCP proxy for tests: clients connect to it, it forwards to the target, and
partition() cuts the link the way a dropped network does: connections stay open and silent in both
directions (nothing is reset), new ones are accepted and get nothing, and heal() lets the held bytes
through again; slow(s) delays every chunk it forwards by s seconds each way, the way a slow or distant
service does. Threads, no dependencies; one proxy per target."""

from __future__ import annotations

import socket
import threading
import time


class FaultProxy:
    def __init__(self, listen_port: int, target_port: int, host: str = "127.0.0.1") -> None:
        self.host, self.listen_port, self.target_port = host, listen_port, target_port
        self._flowing = threading.Event()
        self._flowing.set()
        self._closed = threading.Event()
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._server = socket.create_server((host, listen_port), reuse_port=False)
        self._server.settimeout(0.5)
        self.connections = 0
        self.latency_s = 0.0
        threading.Thread(target=self._accept, name="proxy-accept", daemon=True).start()

    def partition(self) -> None:
        self._flowing.clear()

    def heal(self) -> None:
        self._flowing.set()

    def slow(self, latency_s: float) -> None:
        """Delay each chunk forwarded, either way, by latency_s (0: full speed again)."""
        self.latency_s = latency_s

    def close(self) -> None:
        self._closed.set()
        self._flowing.set()
        self._server.close()
        with self._lock:
            for sock in self._sockets:
                sock.close()

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                client, _ = self._server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._connect, args=(client,), daemon=True).start()

    def _connect(self, client: socket.socket) -> None:
        self._flowing.wait()  # during a partition a new connection gets nowhere
        try:
            upstream = socket.create_connection((self.host, self.target_port), timeout=10)
        except OSError:
            client.close()
            return
        upstream.settimeout(None)
        with self._lock:
            self._sockets += [client, upstream]
        for src, dst in ((client, upstream), (upstream, client)):
            threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                self._flowing.wait()  # a partition holds what was read until it heals
                if self._closed.is_set():
                    return
                if self.latency_s:
                    time.sleep(self.latency_s)
                dst.sendall(data)
        except OSError:
            pass
        finally:
            self._flowing.wait()  # an end seen during a partition reaches the other side once it heals
            for sock in (src, dst):
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
