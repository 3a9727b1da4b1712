"""A private Mosquitto broker on a free loopback port, for ddnn-server without --broker, the demo,
the benchmark and the tests: anonymous and plain TCP, or (``Broker.secure``) the TLS listener, password
file and authorization rules of a ``ddnngen broker-config`` deployment (ddnn_gen/wire/deployment.py).

The broker's packet limit is deliberately larger than the server's request limit, so an oversized
request still reaches a server and earns a TOO_LARGE error reply instead of a silent disconnect.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from ddnn_gen.wire.connection import DEFAULT_PORT, BrokerConnection, BrokerError, parse_address
from ddnn_gen.wire.deployment import BROKER_MAX_PACKET_BYTES, Deployment, make_deployment

log = logging.getLogger(__name__)

__all__ = ["BROKER_MAX_PACKET_BYTES", "Broker", "BrokerError", "free_port", "parse_broker"]


def parse_broker(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` -> (host, port); raises BrokerError on nonsense."""
    return parse_address(address, default_port)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections on ``host:port``."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class Broker:
    """Mosquitto in a temp dir. ``stop()`` then ``start()`` restarts it on the same port (tests kill it)."""

    def __init__(self, port: int | None = None, persistence: bool = True, executable: str | None = None,
                 deployment: Deployment | None = None) -> None:
        found = executable or shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if found is None:
            raise BrokerError("mosquitto is not installed (apt-get install mosquitto), or pass --broker HOST:PORT "
                              "to use a running broker")
        self.executable = found
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._dir = Path(tempfile.mkdtemp(prefix="ddnn-broker-"))
        self._persistence = persistence
        self._process: subprocess.Popen[bytes] | None = None
        self._log_handle = None
        self.deployment = deployment

    @classmethod
    def secure(cls, users: dict[str, str], client_certificates: bool = False, **kwargs: object) -> Broker:
        """A broker (not started) with a fresh deployment in its temp dir: a private CA, a certificate for
        127.0.0.1/localhost, ``users`` ({name: role}) with generated passwords (or client certificates)."""
        broker = cls(**kwargs)  # type: ignore[arg-type]
        broker.deployment = make_deployment(broker._dir / "deployment", users, port=broker.port, bind=broker.host,
                                            client_certificates=client_certificates)
        return broker

    def connection(self, user: str | None = None) -> BrokerConnection:
        """How a client reaches this broker: plain, or as ``user`` of the secure broker's deployment."""
        if self.deployment is None:
            return BrokerConnection(self.host, self.port)
        if user is None:
            raise BrokerError("this broker takes no anonymous clients: name a user of its deployment")
        return self.deployment.connection(user, self.host, self.port)

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def config_path(self) -> Path:
        return self._dir / "mosquitto.conf"

    @property
    def log_path(self) -> Path:
        return self._dir / "mosquitto.log"

    def _write_config(self) -> None:
        lines = ["log_dest stderr", "log_type error", "log_type warning", "log_type notice"]
        if os.geteuid() == 0:
            # Run as root, Mosquitto drops to the `mosquitto` user before reading keys and password files,
            # which this temp dir keeps private; a private broker may stay root.
            lines.append("user root")
        if self.deployment is not None:
            lines += self.deployment.security_lines(self.port, self.host)
        else:
            lines += [
                f"max_packet_size {BROKER_MAX_PACKET_BYTES}",
                # Servers ack requests only after replying; a high in-flight window lets them batch.
                "max_inflight_messages 1000",
                "max_queued_messages 200000",
                "persistent_client_expiration 1h",
                # Request/reply latency: without it Nagle + delayed ACKs add ~40 ms per hop.
                "set_tcp_nodelay true",
                f"listener {self.port} 127.0.0.1",
                "allow_anonymous true",
            ]
        if self._persistence:
            lines += ["persistence true", f"persistence_location {self._dir}/", "autosave_interval 1"]
        self.config_path.write_text("\n".join(lines) + "\n")

    def start(self, timeout_s: float = 10.0) -> Broker:
        if self.running:
            return self
        self._write_config()
        self._log_handle = open(self.log_path, "ab")  # noqa: SIM115 - lives as long as the process
        try:
            self._process = subprocess.Popen([self.executable, "-c", str(self.config_path)],
                                             stdout=self._log_handle, stderr=subprocess.STDOUT,
                                             stdin=subprocess.DEVNULL)
        except OSError as exc:
            self._close_log()
            raise BrokerError(f"cannot run {self.executable}: {exc}; mosquitto is not installed "
                              "(apt-get install mosquitto) or pass --broker HOST:PORT") from exc
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                raise BrokerError(f"mosquitto exited with code {self._process.returncode}: {self.log_tail()}")
            if port_open(self.port):
                log.info("mosquitto listening on %s (config %s)", self.address, self.config_path)
                return self
            time.sleep(0.05)
        self.stop()
        raise BrokerError(f"mosquitto did not open port {self.port} within {timeout_s:.0f} s: {self.log_tail()}")

    @property
    def running(self) -> bool:
        return self._process is not None and self._process.poll() is None

    def kill(self) -> None:
        """Abrupt death (SIGKILL), as a crashed broker: tests use it for broker-loss behaviour."""
        if self._process is not None and self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._close_log()

    def stop(self, timeout_s: float = 5.0) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._close_log()

    def _close_log(self) -> None:
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)

    def __enter__(self) -> Broker:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.cleanup()
