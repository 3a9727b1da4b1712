"""A Mosquitto 2 deployment for ddnn: a TLS listener, no anonymous clients, a password file, and
authorization rules in which the broker, not the payload, decides who a client is and what it may do.

Roles (docs/security.md has the whole threat model):

* device D: publishes its requests ``ddnn/req/+/D`` and its status ``ddnn/status/D``; reads only its replies
  ``ddnn/reply/D``, its thresholds ``ddnn/threshold/<model>`` and ``ddnn/threshold/<model>/D`` and the
  feature requests an aggregator sends it ``ddnn/features/D`` (scores first, docs/views.md);
* server S: reads requests through the servers' shared subscriptions ``$share/<group>/ddnn/req/<model>/+``,
  writes replies ``ddnn/reply/+``, feature requests ``ddnn/features/+`` and its own status
  ``ddnn/server/S/status``; reads every device's status ``ddnn/status/+`` (an aggregator answers an event
  without the views of cameras that are offline) and the model-wide thresholds ``ddnn/threshold/<model>``
  (an aggregator's local exit applies them live);
* edge E (``ddnn-server --role edge``): towards its devices, a server's rules plus its tier thresholds
  ``ddnn/tier-threshold/<model>/<tier>[/<device>]``; cloud servers also take the requests of tiers 2 and up
  ``ddnn/req/<model>/+/t<N>``. Its session towards the tier above is a second identity, ``E-up`` (made with
  it): under ``use_username_as_clientid`` one identity is one session, and the edge keeps two. ``E-up`` may
  only publish requests under the edge's id ``ddnn/req/+/E/t<N>`` and read the edge's replies ``ddnn/reply/E``;
* aggregator A (``ddnn-server --role aggregator``, docs/views.md): an edge's rules and its ``A-up``: towards its
  cameras a server (requests, replies, feature requests, their status, its local exit's model-wide
  threshold); with a three-tier multi-view model its tier 1 is an edge, towards the cloud as ``A-up``;
* operator: writes thresholds (the devices' and the tiers') and the controller's target and state
  ``ddnn/control/<model>/{target,state}[/t<N>]``; reads them, every status and all telemetry;
* monitor: reads everything under ``ddnn/`` (requests and replies included), writes nothing.

Why the dynamic-security plugin and not an ``acl_file``: Mosquitto 2.0's ``acl_file`` never checks
subscriptions (security_default.c: "FIXME - implement ACL subscription strings"); it only filters each
message at delivery. A shared subscription hands each message to one member, and a member whose read is
denied drops it: any device could join the servers' group and silently swallow a share of every device's
requests. The dynamic-security plugin, shipped with Mosquitto 2.0, checks the whole subscription filter
(``$share/...`` included) and answers a device's attempt with SUBACK "not authorized". Passwords stay in
Mosquitto's own password file (``$7$`` = PBKDF2-SHA512); the plugin's clients carry no password, so it
leaves authentication to that file and only authorizes.

Every client connects with its user name as client id (``use_username_as_clientid``): one set of
credentials is one MQTT session, so no client can take over another's session by naming its client id.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from ddnn_gen.wire import certs
from ddnn_gen.wire.connection import DEFAULT_TLS_PORT, BrokerConnection, BrokerError
from ddnn_gen.wire.topics import DEVICE_ID_RULE, TOPIC_ROOT, valid_device_id

ROLES = ("device", "server", "edge", "aggregator", "operator", "monitor")
# Roles that keep a second session towards the tier above (NAME-up).
UPSTREAM_OWNERS = ("edge", "aggregator")
# An edge's session towards the tier above: made for every edge user, never listed by hand.
UPSTREAM_ROLE = "edge-upstream"
UPSTREAM_SUFFIX = "-up"
# The server's request limit is 4 MiB + header; the broker's packet limit is larger on purpose, so an
# oversized request reaches a server and earns a TOO_LARGE reply instead of a silent disconnect.
BROKER_MAX_PACKET_BYTES = 16 * 1024 * 1024
# Mosquitto 2.0's mosquitto_passwd: PBKDF2-SHA512, 101 iterations, 12-byte salt, 64-byte hash.
PBKDF2_ITERATIONS = 101
PBKDF2_SALT_BYTES = 12
DYNSEC_PLUGIN = "mosquitto_dynamic_security.so"
DYNSEC_SEARCH = ("/usr/lib/*/mosquitto_dynamic_security.so", "/usr/lib/mosquitto_dynamic_security.so",
                 "/usr/local/lib/mosquitto_dynamic_security.so", "/usr/local/lib/*/mosquitto_dynamic_security.so")
MANIFEST = "deployment.json"


class DeploymentError(BrokerError):
    """A roles description or deployment option that cannot be turned into a safe broker configuration."""


# ---- roles and their rules ------------------------------------------------------------------------------

def parse_roles(text: str, source: str = "roles") -> dict[str, str]:
    """``ROLE NAME`` per line (``#`` starts a comment) -> {name: role}. Names follow the device-id rule (they
    become topic levels and client ids) and are unique across roles."""
    users: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        words = line.split("#", 1)[0].split()
        if not words:
            continue
        if len(words) != 2:
            raise DeploymentError(f"{source}:{number}: expected 'ROLE NAME', got {line.strip()!r}")
        add_user(users, words[1], words[0], f"{source}:{number}")
    return users


def add_user(users: dict[str, str], name: str, role: str, where: str = "") -> None:
    prefix = f"{where}: " if where else ""
    if role not in ROLES:
        raise DeploymentError(f"{prefix}unknown role {role!r}; roles are {', '.join(ROLES)}")
    if not valid_device_id(name):
        raise DeploymentError(f"{prefix}user name {name!r} is invalid: {DEVICE_ID_RULE}")
    if name in users:
        raise DeploymentError(f"{prefix}user {name!r} is listed twice")
    users[name] = role


@dataclass(frozen=True)
class Rule:
    """One dynamic-security ACL entry: ``acltype`` is publishClientSend (the client publishes),
    publishClientReceive (the broker delivers to the client), subscribeLiteral or subscribePattern."""

    acltype: str
    topic: str


def upstream_name(edge: str) -> str:
    """The user name of edge ``edge``'s session towards the tier above."""
    return f"{edge}{UPSTREAM_SUFFIX}"


def with_upstream_identities(users: Mapping[str, str]) -> dict[str, str]:
    """``users`` and, for every edge, its upstream identity (DeploymentError if that name is taken or too long)."""
    expanded = dict(users)
    for name, role in users.items():
        if role not in UPSTREAM_OWNERS:
            continue
        up = upstream_name(name)
        if not valid_device_id(up):
            raise DeploymentError(f"edge {name!r}: its upstream identity {up!r} breaks the rule ({DEVICE_ID_RULE}); "
                                  "use a shorter name")
        if up in users:
            raise DeploymentError(f"edge {name!r}: the user name {up!r} is its upstream identity; rename that user")
        expanded[up] = UPSTREAM_ROLE
    return expanded


def rules_for(name: str, role: str) -> list[Rule]:
    """What user ``name`` of ``role`` may do; everything else is denied."""
    root = TOPIC_ROOT
    send, receive = "publishClientSend", "publishClientReceive"
    literal, pattern = "subscribeLiteral", "subscribePattern"
    if role in UPSTREAM_OWNERS:
        # Towards its devices an edge is a server that also reads its exit's live thresholds. An aggregator
        # (``ddnn-server --role aggregator``) needs the same: a server's rules (the cameras' requests, status
        # and feature requests, the model-wide threshold of its local exit), its tier-1 exit's thresholds when
        # the model has a cloud above, and the NAME-up session towards that cloud.
        return [*rules_for(name, "server"),
                Rule(pattern, f"{root}/tier-threshold/+/+"), Rule(receive, f"{root}/tier-threshold/+/+"),
                Rule(pattern, f"{root}/tier-threshold/+/+/+"), Rule(receive, f"{root}/tier-threshold/+/+/+")]
    if role == UPSTREAM_ROLE:
        edge = name[:-len(UPSTREAM_SUFFIX)]
        return [Rule(send, f"{root}/req/+/{edge}/+"),
                Rule(literal, f"{root}/reply/{edge}"), Rule(receive, f"{root}/reply/{edge}")]
    if role == "device":
        return [Rule(send, f"{root}/req/+/{name}"), Rule(send, f"{root}/status/{name}"),
                Rule(send, f"{root}/device/{name}/telemetry"),
                Rule(literal, f"{root}/reply/{name}"), Rule(receive, f"{root}/reply/{name}"),
                Rule(pattern, f"{root}/threshold/+"), Rule(receive, f"{root}/threshold/+"),
                Rule(pattern, f"{root}/threshold/+/{name}"), Rule(receive, f"{root}/threshold/+/{name}"),
                Rule(literal, f"{root}/features/{name}"), Rule(receive, f"{root}/features/{name}")]
    if role == "server":
        return [Rule(pattern, f"$share/+/{root}/req/+/+"), Rule(receive, f"{root}/req/+/+"),
                # A cloud behind edges: the requests of tiers 2 and up (ddnn/req/<model>/<edge>/t<N>).
                Rule(pattern, f"$share/+/{root}/req/+/+/+"), Rule(receive, f"{root}/req/+/+/+"),
                Rule(send, f"{root}/reply/+"), Rule(send, f"{root}/features/+"),
                Rule(send, f"{root}/server/{name}/status"),
                Rule(send, f"{root}/server/{name}/telemetry"),
                Rule(pattern, f"{root}/status/+"), Rule(receive, f"{root}/status/+"),
                Rule(pattern, f"{root}/threshold/+"), Rule(receive, f"{root}/threshold/+")]
    if role == "operator":
        # The controller (``ddnngen control``) runs as an operator: it reads the target, writes its state.
        return [Rule(send, f"{root}/threshold/+"), Rule(send, f"{root}/threshold/+/+"),
                Rule(pattern, f"{root}/threshold/#"), Rule(receive, f"{root}/threshold/#"),
                Rule(send, f"{root}/tier-threshold/+/+"), Rule(send, f"{root}/tier-threshold/+/+/+"),
                Rule(pattern, f"{root}/tier-threshold/#"), Rule(receive, f"{root}/tier-threshold/#"),
                Rule(send, f"{root}/control/+/target"), Rule(send, f"{root}/control/+/state"),
                # A server tier's controller (``ddnngen control --tier N``): .../target/tN, .../state/tN.
                Rule(send, f"{root}/control/+/target/+"), Rule(send, f"{root}/control/+/state/+"),
                Rule(pattern, f"{root}/control/#"), Rule(receive, f"{root}/control/#"),
                Rule(pattern, f"{root}/status/+"), Rule(receive, f"{root}/status/+"),
                Rule(pattern, f"{root}/server/+/status"), Rule(receive, f"{root}/server/+/status"),
                Rule(pattern, f"{root}/server/+/telemetry"), Rule(receive, f"{root}/server/+/telemetry"),
                Rule(pattern, f"{root}/device/+/telemetry"), Rule(receive, f"{root}/device/+/telemetry")]
    if role == "monitor":
        return [Rule(pattern, f"{root}/#"), Rule(receive, f"{root}/#")]
    raise DeploymentError(f"unknown role {role!r}")


def dynsec_config(users: Mapping[str, str]) -> dict[str, object]:
    """The dynamic-security plugin's configuration: deny by default, one role per user with its rules, and
    clients without passwords (the password file authenticates them)."""
    clients, roles = [], []
    for name, role in sorted(users.items()):
        rolename = f"{role}-{name}"
        clients.append({"username": name, "textname": f"{role} {name}", "roles": [{"rolename": rolename}]})
        roles.append({"rolename": rolename, "acls": [{"acltype": rule.acltype, "topic": rule.topic, "allow": True}
                                                     for rule in rules_for(name, role)]})
    return {"defaultACLAccess": {"publishClientSend": False, "publishClientReceive": False, "subscribe": False,
                                 "unsubscribe": True},
            "clients": clients, "groups": [], "roles": roles}


# ---- passwords --------------------------------------------------------------------------------------------

def hash_password(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2's password-file hash: ``$7$<iterations>$<base64 salt>$<base64 PBKDF2-SHA512>``."""
    salt = secrets.token_bytes(PBKDF2_SALT_BYTES) if salt is None else salt
    digest = hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, iterations)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def check_password_hash(password: str, encoded: str) -> bool:
    """Whether ``encoded`` (a ``$7$`` hash) is the hash of ``password``."""
    parts = encoded.split("$")
    if len(parts) != 5 or parts[1] != "7":
        return False
    salt, digest = base64.b64decode(parts[3]), base64.b64decode(parts[4])
    return secrets.compare_digest(hashlib.pbkdf2_hmac("sha512", password.encode("utf-8"), salt, int(parts[2])),
                                  digest)


def write_password_file(path: Path, passwords: Mapping[str, str], use_mosquitto_passwd: bool = True) -> str:
    """Mosquitto's password file for ``passwords`` ({user: password}). Debian's ``mosquitto_passwd -U`` hashes
    it when installed (passwords never on a command line); else the same hash from hashlib. Returns which."""
    tool = shutil.which("mosquitto_passwd") if use_mosquitto_passwd else None
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor, staging = tempfile.mkstemp(prefix=".passwd-", dir=path.parent)
    try:
        with os.fdopen(descriptor, "w") as handle:  # mkstemp: mode 0600 from the start
            for user, password in sorted(passwords.items()):
                handle.write(f"{user}:{password if tool else hash_password(password)}\n")
        if tool:
            result = subprocess.run([tool, "-U", staging], capture_output=True, text=True, timeout=60)
            if result.returncode != 0:
                raise DeploymentError(f"mosquitto_passwd -U failed: {result.stderr.strip() or result.returncode}")
        os.chmod(staging, 0o640)
        os.replace(staging, path)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    return "mosquitto_passwd" if tool else "hashlib"


def _password_for(path: Path) -> str:
    """The password stored in ``path`` (kept across runs), else a new random one written there (0600)."""
    if path.exists():
        password = path.read_text().split("\n", 1)[0].strip()
        if password:
            return password
    password = secrets.token_urlsafe(24)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(password + "\n")
    return password


# ---- the whole deployment ---------------------------------------------------------------------------------

def find_dynsec_plugin() -> Path | None:
    for pattern in DYNSEC_SEARCH:
        for found in sorted(glob.glob(pattern)):
            return Path(found)
    return None


@dataclass
class Deployment:
    """What broker-config wrote into ``directory``; :meth:`connection` gives each user's client settings."""

    directory: Path
    users: dict[str, str]
    ca_file: Path
    cert_file: Path
    key_file: Path
    plugin: Path
    port: int = DEFAULT_TLS_PORT
    bind: str = "0.0.0.0"
    client_certificates: bool = False
    install_dir: Path | None = None  # where the files live on the broker host, when not `directory`
    client_certs: dict[str, certs.CertificateFiles] = field(default_factory=dict)

    @property
    def password_path(self) -> Path:
        return self.directory / "passwd"

    @property
    def dynsec_path(self) -> Path:
        return self.directory / "dynamic-security.json"

    @property
    def conf_path(self) -> Path:
        return self.directory / "mosquitto.conf"

    def password_file(self, user: str) -> Path:
        return self.directory / "credentials" / f"{user}.password"

    def connection(self, user: str, host: str = "127.0.0.1", port: int | None = None) -> BrokerConnection:
        """How ``user`` reaches this broker: TLS against the deployment's CA, with the user's credentials."""
        if user not in self.users:
            raise DeploymentError(f"user {user!r} is not part of this deployment")
        cert = self.client_certs.get(user)
        return BrokerConnection(host, port or self.port, tls=True, ca_file=self.ca_file,
                                cert_file=cert.cert if cert else None, key_file=cert.key if cert else None,
                                username=None if self.client_certificates else user,
                                password_file=None if self.client_certificates else self.password_file(user))

    def security_lines(self, port: int | None = None, bind: str | None = None) -> list[str]:
        """The configuration lines that make the broker safe: global ones, then the TLS listener."""
        base = self.install_dir or self.directory

        def installed(path: Path) -> str:
            path = Path(path).resolve()
            try:
                return str(base / path.relative_to(self.directory.resolve()))
            except ValueError:
                return str(path)

        for path in (base, self.ca_file, self.cert_file, self.key_file, self.plugin):
            _check_no_blanks(path)
        lines = ["per_listener_settings false", "allow_anonymous false"]
        if not self.client_certificates:  # else the certificate's common name is the identity, no password
            lines.append(f"password_file {installed(self.password_path)}")
        lines += [
            f"plugin {self.plugin}",
            f"plugin_opt_config_file {installed(self.dynsec_path)}",
            f"max_packet_size {BROKER_MAX_PACKET_BYTES}",
            # Request/reply latency: without it Nagle + delayed ACKs add ~40 ms per hop.
            "set_tcp_nodelay true",
            # Servers ack requests only after replying; a wide in-flight window lets them batch. What waits
            # for a client beyond it is bounded (a device that is away falls back to its local answer).
            "max_inflight_messages 1000",
            "max_queued_messages 10000",
            "persistent_client_expiration 1h",
            f"listener {port or self.port} {bind or self.bind}",
            f"cafile {installed(self.ca_file)}",
            f"certfile {installed(self.cert_file)}",
            f"keyfile {installed(self.key_file)}",
            f"require_certificate {'true' if self.client_certificates else 'false'}",
        ]
        if self.client_certificates:
            lines.append("use_identity_as_username true")
        # Per-listener, so after `listener`: before it, Mosquitto would open a default listener on 1883.
        lines.append("use_username_as_clientid true")
        return lines

    def write(self) -> None:
        """(Re)write passwd, dynamic-security.json, mosquitto.conf and the manifest; passwords kept across runs."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if not self.client_certificates:
            passwords = {user: _password_for(self.password_file(user)) for user in self.users}
            write_password_file(self.password_path, passwords)
        _write_private(self.dynsec_path, json.dumps(dynsec_config(self.users), indent=1) + "\n")
        header = ["# Mosquitto deployment for ddnn, written by `ddnngen broker-config`; see docs/security.md.",
                  "# TLS only, no anonymous clients; passwords in passwd ($7$ = PBKDF2-SHA512); who may publish,",
                  "# subscribe and receive what: dynamic-security.json (deny by default)."]
        persistence = ["persistence true", f"persistence_location {self.install_dir or self.directory}/data/"]
        self.conf_path.write_text("\n".join(header + self.security_lines() + persistence) + "\n")
        (self.directory / "data").mkdir(exist_ok=True)
        self._let_mosquitto_read()
        manifest = {"users": self.users, "ca_file": str(self.ca_file), "cert_file": str(self.cert_file),
                    "key_file": str(self.key_file), "plugin": str(self.plugin), "port": self.port, "bind": self.bind,
                    "client_certificates": self.client_certificates,
                    "install_dir": str(self.install_dir) if self.install_dir else None,
                    "client_certs": {user: [str(files.cert), str(files.key)]
                                     for user, files in self.client_certs.items()}}
        (self.directory / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")

    def _let_mosquitto_read(self) -> None:
        """Run as root, hand the files the broker reads to the ``mosquitto`` group (Debian's broker drops to
        that user before it reads them) and its persistence folder to the ``mosquitto`` user."""
        if os.geteuid() != 0:
            return
        try:
            import grp
            import pwd

            gid = grp.getgrnam("mosquitto").gr_gid
            uid = pwd.getpwnam("mosquitto").pw_uid
        except (ImportError, KeyError):
            return
        for path in (self.password_path, self.dynsec_path, self.key_file):
            if path.exists() and self.directory.resolve() in path.resolve().parents:
                os.chown(path, -1, gid)
                os.chmod(path, 0o640)
        os.chown(self.directory / "data", uid, gid)

    @classmethod
    def load(cls, directory: Path) -> Deployment:
        try:
            manifest = json.loads((directory / MANIFEST).read_text())
        except (OSError, ValueError) as error:
            raise DeploymentError(f"{directory} holds no deployment written by broker-config: {error}") from error
        return cls(directory, dict(manifest["users"]), Path(manifest["ca_file"]), Path(manifest["cert_file"]),
                   Path(manifest["key_file"]), Path(manifest["plugin"]), int(manifest["port"]), manifest["bind"],
                   bool(manifest["client_certificates"]),
                   Path(manifest["install_dir"]) if manifest.get("install_dir") else None,
                   {user: certs.CertificateFiles(Path(c), Path(k))
                    for user, (c, k) in manifest.get("client_certs", {}).items()})


def _check_no_blanks(path: Path) -> None:
    if any(char.isspace() for char in str(path)):
        # mosquitto.conf has no quoting: the rest of a line after its first blank would be lost.
        raise DeploymentError(f"{path}: Mosquitto's configuration cannot name paths with blanks; use a folder "
                              "without them (or --install-dir)")


def _write_private(path: Path, text: str) -> None:
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    with os.fdopen(descriptor, "w") as handle:
        handle.write(text)
    os.chmod(path, 0o640)


def make_deployment(directory: Path, users: Mapping[str, str], *, server_names: Iterable[str] = (),
                    ca_file: Path | None = None, cert_file: Path | None = None, key_file: Path | None = None,
                    port: int = DEFAULT_TLS_PORT, bind: str = "0.0.0.0", client_certificates: bool = False,
                    plugin: Path | None = None, install_dir: Path | None = None) -> Deployment:
    """Write a deployment. Without ``cert_file`` a private CA (``certs/ca.crt``) and a broker certificate for
    ``server_names`` are made; with ``client_certificates`` every user also gets a client certificate (made
    when the CA's key is at hand)."""
    directory = Path(directory).resolve()
    _check_no_blanks(install_dir or directory)
    if not users:
        raise DeploymentError("no users: give at least one device and one server")
    for name, role in users.items():
        if role != UPSTREAM_ROLE:  # a deployment read back holds the upstream identities it made
            add_user({}, name, role)
    users = with_upstream_identities({name: role for name, role in users.items() if role != UPSTREAM_ROLE})
    plugin = plugin or find_dynsec_plugin()
    if plugin is None or not Path(plugin).exists():
        raise DeploymentError(f"Mosquitto's dynamic-security plugin ({DYNSEC_PLUGIN}) was not found; install "
                              "mosquitto 2.0 or pass --dynsec-plugin PATH")
    cert_dir = directory / "certs"
    client_certs: dict[str, certs.CertificateFiles] = {}
    if cert_file is None:
        names = list(server_names) or ["localhost", "127.0.0.1"]
        if ca_file is not None:
            raise DeploymentError("--ca-file without --cert-file/--key-file: give the broker's certificate too, or "
                                  "neither to make a private CA")
        ca = _reuse_or_make_ca(cert_dir)
        broker_cert = certs.make_certificate(cert_dir, ca, "broker", names)  # always for today's names
        ca_file, cert_file, key_file = ca.cert, broker_cert.cert, broker_cert.key
        if client_certificates:
            client_certs = {user: _reuse_or_make(cert_dir / "clients", ca, user, None) for user in users}
    elif ca_file is None or key_file is None:
        raise DeploymentError("--cert-file needs --key-file and --ca-file (the CA that signed the clients' and "
                              "the broker's certificates)")
    deployment = Deployment(directory, dict(users), Path(ca_file).resolve(), Path(cert_file).resolve(),
                            Path(key_file).resolve(), Path(plugin), port, bind, client_certificates, install_dir,
                            client_certs)
    deployment.write()
    return deployment


def _reuse_or_make_ca(directory: Path) -> certs.CertificateFiles:
    existing = certs.CertificateFiles(directory / "ca.crt", directory / "ca.key")
    return existing if existing.cert.exists() and existing.key.exists() else certs.make_ca(directory)


def _reuse_or_make(directory: Path, ca: certs.CertificateFiles, name: str,
                   server_names: list[str] | None) -> certs.CertificateFiles:
    existing = certs.CertificateFiles(directory / f"{name}.crt", directory / f"{name}.key")
    if existing.cert.exists() and existing.key.exists():
        return existing
    return certs.make_certificate(directory, ca, name, server_names)
