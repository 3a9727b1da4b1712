"""How to reach a broker, in one description that every MQTT client of the project uses: ``ddnn-server``,
every ``ddnngen`` command that talks MQTT, the simulated devices, and (as command-line arguments) the
generated C device program.

A connection is plain TCP unless TLS is asked for (``--tls``, or any of ``--ca-file``/``--cert``). With TLS
the broker's certificate is verified against ``--ca-file`` (else the system's trust store) and its host
name; ``--insecure`` turns both checks off and is never implied. Credentials are a user name and a
password read from a file (never from the command line, where ``ps`` shows it), or a client certificate
(``--cert`` and ``--key``) when the broker takes the identity from certificates.
"""

from __future__ import annotations

import dataclasses
import functools
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import click

from ddnn_gen.errors import DdnnError

DEFAULT_PORT = 1883
DEFAULT_TLS_PORT = 8883
# Longest password read from a password file: the C device reads the same bound.
PASSWORD_MAX_BYTES = 255


class BrokerError(DdnnError):
    """No broker to talk to: Mosquitto missing or not starting, an unreachable or refusing broker."""


class ConnectionConfigError(BrokerError):
    """Broker connection options that do not fit together, or a file they name that cannot be read."""


@dataclass(frozen=True)
class BrokerConnection:
    """One broker and how to authenticate to it. Paths are checked by :meth:`check`."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    tls: bool = False
    ca_file: Path | None = None  # CA bundle the broker's certificate must chain to (default: system store)
    cert_file: Path | None = None  # client certificate (PEM), for brokers that identify clients by certificate
    key_file: Path | None = None  # its private key (PEM)
    username: str | None = None
    password_file: Path | None = None  # first line = the password
    insecure: bool = False  # TLS without verifying the broker's certificate or host name

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """For log lines: ``mqtts://host:port`` or ``mqtt://host:port``."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.address}"

    def check(self) -> BrokerConnection:
        """``self`` if the options fit together and every file named is readable; else ConnectionConfigError."""
        if (self.cert_file is None) != (self.key_file is None):
            raise ConnectionConfigError("--cert and --key go together (a client certificate and its private key)")
        if not self.tls and (self.ca_file or self.cert_file or self.insecure):
            raise ConnectionConfigError("--ca-file, --cert, --key and --insecure need TLS (--tls)")
        if self.password_file is not None and self.username is None:
            raise ConnectionConfigError("--password-file needs --username")
        for what, path in (("--ca-file", self.ca_file), ("--cert", self.cert_file), ("--key", self.key_file),
                           ("--password-file", self.password_file)):
            if path is not None:
                try:
                    with open(path, "rb"):
                        pass
                except OSError as error:
                    raise ConnectionConfigError(f"{what} {path}: cannot read it ({error.strerror})") from error
        if self.password_file is not None:
            self.password()
        return self

    def password(self) -> str | None:
        """The password file's first line (without its line break), or None without a password file."""
        if self.password_file is None:
            return None
        try:
            raw = Path(self.password_file).read_bytes()
        except OSError as error:
            raise ConnectionConfigError(f"--password-file {self.password_file}: cannot read it "
                                        f"({error.strerror})") from error
        line = raw.split(b"\n", 1)[0].rstrip(b"\r")
        if not line:
            raise ConnectionConfigError(f"--password-file {self.password_file}: the first line is empty")
        if len(line) > PASSWORD_MAX_BYTES or b"\0" in line:
            raise ConnectionConfigError(f"--password-file {self.password_file}: the password must be 1.."
                                        f"{PASSWORD_MAX_BYTES} bytes without NUL")
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError as error:
            raise ConnectionConfigError(f"--password-file {self.password_file}: the password is not UTF-8") from error

    def ssl_context(self) -> ssl.SSLContext:
        """TLS 1.2 or newer; the broker's certificate and host name verified unless ``insecure``."""
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        if self.insecure:
            context.check_hostname = False
            context.verify_mode = ssl.CERT_NONE
        try:
            if self.ca_file is not None:
                context.load_verify_locations(cafile=str(self.ca_file))
            else:
                context.load_default_certs()
            if self.cert_file is not None:
                context.load_cert_chain(str(self.cert_file), str(self.key_file))
        except (OSError, ssl.SSLError) as error:
            raise ConnectionConfigError(f"TLS files for {self.url} unusable: {error}") from error
        return context

    def configure(self, client: Any) -> None:
        """Apply TLS and credentials to a paho ``mqtt.Client`` before it connects."""
        if self.tls:
            client.tls_set_context(self.ssl_context())
            if self.insecure:
                client.tls_insecure_set(True)
        if self.username is not None:
            client.username_pw_set(self.username, self.password())

    def runner_args(self) -> list[str]:
        """The same connection as command-line options of ``ddnn-server`` and the C device program."""
        args = ["--broker", self.address]
        if self.tls:
            args.append("--tls")
        for option, value in (("--ca-file", self.ca_file), ("--cert", self.cert_file), ("--key", self.key_file),
                              ("--username", self.username), ("--password-file", self.password_file)):
            if value is not None:
                args += [option, str(value)]
        if self.insecure:
            args.append("--insecure")
        return args

    def as_user(self, username: str | None, password_file: Path | None = None, cert_file: Path | None = None,
                key_file: Path | None = None) -> BrokerConnection:
        """The same broker and TLS settings with another identity."""
        return dataclasses.replace(self, username=username, password_file=password_file, cert_file=cert_file,
                                   key_file=key_file)


def parse_address(address: str, default_port: int = DEFAULT_PORT) -> tuple[str, int]:
    """``HOST[:PORT]`` -> (host, port); raises ConnectionConfigError on nonsense."""
    host, _, port_text = address.rpartition(":") if ":" in address else (address, "", "")
    if not host:
        raise ConnectionConfigError(f"broker address {address!r} is not HOST:PORT")
    if not port_text:
        return host, default_port
    try:
        port = int(port_text)
    except ValueError as exc:
        raise ConnectionConfigError(f"broker port in {address!r} is not a number") from exc
    if not 0 < port < 65536:
        raise ConnectionConfigError(f"broker port {port} is out of range")
    return host, port


def connection_from_options(address: str, tls: bool = False, ca_file: str | Path | None = None,
                            cert_file: str | Path | None = None, key_file: str | Path | None = None,
                            username: str | None = None, password_file: str | Path | None = None,
                            insecure: bool = False) -> BrokerConnection:
    """A checked connection from option values; TLS is implied by a CA file or a client certificate."""
    tls = tls or ca_file is not None or cert_file is not None
    host, port = parse_address(address, DEFAULT_TLS_PORT if tls else DEFAULT_PORT)
    path = lambda value: None if value is None else Path(value)  # noqa: E731
    return BrokerConnection(host, port, tls, path(ca_file), path(cert_file), path(key_file), username,
                            path(password_file), insecure).check()


# ---- the shared command-line options ------------------------------------------------------------------

Command = TypeVar("Command", bound=Callable[..., Any])
_OPTION_NAMES = ("broker_address", "tls", "ca_file", "cert_file", "key_file", "username", "password_file",
                 "insecure")


def broker_options(default: str | None = "127.0.0.1:1883", address_help: str = "MQTT broker.",
                   param: str = "broker") -> Callable[[Command], Command]:
    """``--broker`` and the TLS/credential options, handed to the command as one ``BrokerConnection``
    (parameter ``param``; None when ``default`` is None and no ``--broker`` was given)."""
    file_type = click.Path(dir_okay=False)

    def decorate(command: Command) -> Command:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            values = {name: kwargs.pop(name) for name in _OPTION_NAMES}
            address = values.pop("broker_address")
            if address is None:
                if any(value for value in values.values()):
                    raise click.UsageError("TLS and credential options need --broker (the broker they are for)")
                kwargs[param] = None
            else:
                try:
                    kwargs[param] = connection_from_options(address, **values)
                except ConnectionConfigError as error:
                    raise click.UsageError(str(error)) from error
            return command(*args, **kwargs)

        options = [
            click.option("--broker", "broker_address", default=default, show_default=default is not None,
                         metavar="HOST[:PORT]", help=f"{address_help} Port default: 1883, 8883 with TLS."),
            click.option("--tls", is_flag=True, help="Connect with TLS (implied by --ca-file and --cert)."),
            click.option("--ca-file", type=file_type, default=None,
                         help="CA certificates (PEM) the broker's certificate must chain to; default: the "
                              "system's trust store."),
            click.option("--cert", "cert_file", type=file_type, default=None,
                         help="Client certificate (PEM), for brokers that identify clients by certificate."),
            click.option("--key", "key_file", type=file_type, default=None, help="The client certificate's key."),
            click.option("--username", default=None, help="MQTT user name."),
            click.option("--password-file", type=file_type, default=None,
                         help="File whose first line is the MQTT password (kept off the command line)."),
            click.option("--insecure", is_flag=True,
                         help="TLS without verifying the broker's certificate and host name (testing only)."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper  # type: ignore[return-value]

    return decorate
