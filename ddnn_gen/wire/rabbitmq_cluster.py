"""A RabbitMQ cluster on one machine, for ``ddnngen cluster up|down``, the cluster tests and the benchmark.

Every node runs Debian's ``rabbitmq-server`` (3.10) out of one directory: its own node name
(``ddnn<i>@localhost``), AMQP, MQTT and Erlang distribution ports, config, data and logs, under a private
``HOME`` holding the cluster's Erlang cookie, and a private ``epmd`` port, so nothing system-wide is used or
left behind. Node 1 starts first and imports the definitions (users, permissions, topic permissions); the
others find it by classic peer discovery and join its cluster. Once all are up, the durable quorum queue of
every model (``ddnn.req.<model>``, bound to ``amq.topic`` with ``ddnn.req.<model>.*``) is declared, so its
replicas sit on every node. Management is off; ``rabbitmq_mqtt`` is on (MQTT 3.1.1).

Users mirror docs/security.md's roles, with RabbitMQ topic authorisation on ``amq.topic`` (routing keys are
the MQTT topics with ``.`` for ``/``): a device writes only ``ddnn.req.<model>.{username}``, its status and
its telemetry, reads only ``ddnn.reply.{username}`` and its thresholds; a server reads the request queues and writes
replies; an operator writes thresholds; a monitor reads everything. Passwords are generated into
``<dir>/credentials/NAME.password`` (0600) and never appear on a command line.
"""

from __future__ import annotations

import base64
import glob
import hashlib
import json
import logging
import os
import secrets
import signal
import subprocess
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from urllib.parse import quote

from ddnn_gen.wire import topics
from ddnn_gen.wire.broker import free_port, port_open
from ddnn_gen.wire.connection import BrokerConnection, BrokerError
from ddnn_gen.wire.deployment import ROLES as MOSQUITTO_ROLES
from ddnn_gen.wire.deployment import _password_for

log = logging.getLogger(__name__)
# pika logs every connection step at INFO; what matters reaches our own log lines.
logging.getLogger("pika").setLevel(logging.WARNING)
# Edges and aggregators need MQTT brokers (server/app.py refuses --amqp for them): a cluster has the other roles.
ROLES = tuple(role for role in MOSQUITTO_ROLES if role not in ("edge", "aggregator"))

SBIN_GLOB = "/usr/lib/rabbitmq/lib/rabbitmq_server-*/sbin"
EPMD = "/usr/bin/epmd"
STATE_FILE = "cluster.json"
ADMIN = "ddnn-admin"  # declares the queues; its password is in credentials/ like every user's
COOKIE_FILE = ".erlang.cookie"


class ClusterError(BrokerError):
    """The cluster cannot be started, reached or stopped."""


def rabbitmq_sbin() -> Path | None:
    """Where Debian's rabbitmq-server keeps its scripts (the /usr/sbin wrappers switch to the rabbitmq user)."""
    found = sorted(glob.glob(SBIN_GLOB))
    return Path(found[-1]) if found else None


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's ``rabbit_password_hashing_sha256``: base64(salt4 + sha256(salt4 + password))."""
    salt = salt if salt is not None else secrets.token_bytes(4)
    return base64.b64encode(salt + hashlib.sha256(salt + password.encode("utf-8")).digest()).decode("ascii")


def _mqtt_queue(user: str) -> str:
    # The queue RabbitMQ 3.10's MQTT plugin declares for a client's QoS 0/1 subscriptions.
    return f"mqtt-subscription-{user}qos[01]"


def permissions_for(user: str, role: str) -> tuple[dict[str, str], dict[str, str]]:
    """(vhost permissions, amq.topic topic permissions) of ``user`` in ``role``: configure/write/read regexes,
    then write/read regexes over routing keys (``{username}`` is expanded by RabbitMQ)."""
    root = topics.TOPIC_ROOT
    model = "[0-9a-f]{32}"
    own_queue = _mqtt_queue(user)
    mqtt = {"configure": f"^{own_queue}$", "write": rf"^(amq\.topic|{own_queue})$",
            "read": rf"^(amq\.topic|{own_queue})$"}
    if role == "device":
        # Request tier 1 only: devices send to the first server tier (``/t<N>`` is an edge's).
        own = rf"req\.{model}\.{{username}}|status\.{{username}}|device\.{{username}}\.telemetry"
        return mqtt, {"write": rf"^{root}\.({own})$",
                      "read": rf"^{root}\.(reply\.{{username}}|threshold\.{model}(\.{{username}})?)$"}
    if role == "server":
        # AMQP: consume the request queues (declared by the cluster, so no configure), publish replies.
        return ({"configure": "^$", "write": r"^amq\.topic$", "read": rf"^{root}\.req\.{model}(\.t[2-7])?$"},
                {"write": rf"^{root}\.(reply\.[^.]+|server\.{{username}}\.(status|telemetry))$", "read": "^$"})
    if role == "operator":
        return mqtt, {"write": rf"^{root}\.(threshold\..*|control\.{model}\.(target|state))$",
                      "read": rf"^{root}\.(threshold|status|server|device|control)\..*$"}
    if role == "monitor":
        return mqtt, {"write": "^$", "read": rf"^{root}\..*$"}
    raise ClusterError(f"unknown role {role!r}; roles are {', '.join(ROLES)}")


def definitions(users: Mapping[str, str], passwords: Mapping[str, str]) -> dict[str, object]:
    """The definitions node 1 imports at its first boot: the vhost, users, permissions, topic permissions."""
    entries, permissions, topic_permissions = [], [], []
    for user, role in {ADMIN: "admin", **users}.items():
        entries.append({"name": user, "password_hash": password_hash(passwords[user]),
                        "hashing_algorithm": "rabbit_password_hashing_sha256",
                        "tags": ["administrator"] if role == "admin" else []})
        if role == "admin":
            permissions.append({"user": user, "vhost": "/", "configure": ".*", "write": ".*", "read": ".*"})
            continue
        vhost, topic = permissions_for(user, role)
        permissions.append({"user": user, "vhost": "/", **vhost})
        topic_permissions.append({"user": user, "vhost": "/", "exchange": topics.AMQP_EXCHANGE, **topic})
    return {"vhosts": [{"name": "/"}], "users": entries, "permissions": permissions,
            "topic_permissions": topic_permissions}


@dataclass
class Node:
    index: int  # 1-based
    name: str
    amqp_port: int
    mqtt_port: int
    dist_port: int


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie child of ours counts as gone.
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


class RabbitCluster:
    """``nodes`` RabbitMQ nodes in ``directory``; ``users`` is {name: role} (docs/security.md's roles) and
    ``models`` the (model hash, request tier) pairs whose quorum queues are declared. ``load`` finds a
    cluster that ``up`` left running (``ddnngen cluster down`` in another process)."""

    def __init__(self, directory: str | Path, nodes: int = 3, users: Mapping[str, str] | None = None,
                 models: Sequence[tuple[bytes, int]] = (), host: str = "127.0.0.1") -> None:
        if not 1 <= nodes <= 9:
            raise ClusterError(f"a cluster here has 1..9 nodes, not {nodes}")
        users = dict(users or {})
        for user, role in users.items():
            if role not in ROLES:
                raise ClusterError(f"user {user!r}: unknown role {role!r}; roles are {', '.join(ROLES)}")
            if not topics.valid_cluster_id(user) or user == ADMIN:
                raise ClusterError(f"user name {user!r} is invalid on a RabbitMQ cluster: "
                                   f"{topics.DEVICE_ID_RULE}, and no '.' (RabbitMQ turns '/' into '.')")
        self.directory = Path(directory).resolve()
        self.host = host
        self.users = users
        self.models = [(bytes(model_hash), int(tier)) for model_hash, tier in models]
        self.epmd_port = 0
        self.nodes = [Node(i, f"ddnn{i}@localhost", 0, 0, 0) for i in range(1, nodes + 1)]
        self._processes: dict[int, subprocess.Popen[bytes]] = {}

    # ---- paths and identities ------------------------------------------------------------------------

    def node_dir(self, node: Node) -> Path:
        return self.directory / f"node{node.index}"

    def password_file(self, user: str) -> Path:
        return self.directory / "credentials" / f"{user}.password"

    def mqtt(self, user: str, node: int = 1) -> BrokerConnection:
        """How ``user`` reaches node ``node``'s MQTT listener."""
        if user not in self.users:
            raise ClusterError(f"user {user!r} is not one of this cluster's")
        return BrokerConnection(self.host, self.nodes[node - 1].mqtt_port, username=user,
                                password_file=self.password_file(user))

    def mqtt_all(self, user: str, first: int = 1) -> list[BrokerConnection]:
        """``user``'s connections to every node, node ``first`` first: a device's fail-over list."""
        order = [(first - 1 + k) % len(self.nodes) + 1 for k in range(len(self.nodes))]
        return [self.mqtt(user, node) for node in order]

    def amqp_url(self, user: str, node: int = 1) -> str:
        """``amqp://USER@HOST:PORT/%2F``: the password stays in its file (``--amqp-password-file``)."""
        return f"amqp://{quote(user, safe='')}@{self.host}:{self.nodes[node - 1].amqp_port}/%2F"

    def _env(self, node: Node | None) -> dict[str, str]:
        env = {key: value for key, value in os.environ.items() if not key.startswith("RABBITMQ_")}
        env.update(HOME=str(self.directory), ERL_EPMD_PORT=str(self.epmd_port), LANG="C.UTF-8", LC_ALL="C.UTF-8")
        if node is not None:
            base = self.node_dir(node)
            env.update(RABBITMQ_NODENAME=node.name, RABBITMQ_DIST_PORT=str(node.dist_port),
                       RABBITMQ_CONFIG_FILE=str(base / "rabbitmq.conf"),
                       RABBITMQ_ADVANCED_CONFIG_FILE=str(base / "advanced.config"),
                       RABBITMQ_CONF_ENV_FILE=str(base / "rabbitmq-env.conf"),
                       RABBITMQ_ENABLED_PLUGINS_FILE=str(base / "enabled_plugins"),
                       RABBITMQ_MNESIA_BASE=str(base / "data"), RABBITMQ_LOG_BASE=str(base / "log"),
                       RABBITMQ_PID_FILE=str(base / "pid"),
                       RABBITMQ_PLUGINS_EXPAND_DIR=str(base / "plugins-expand"))
        return env

    # ---- start ---------------------------------------------------------------------------------------

    def _write_files(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        cookie = self.directory / COOKIE_FILE
        if not cookie.exists():
            descriptor = os.open(cookie, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o400)
            with os.fdopen(descriptor, "w") as handle:
                handle.write(secrets.token_hex(20))
        passwords = {user: _password_for(self.password_file(user)) for user in [ADMIN, *self.users]}
        definitions_path = self.directory / "definitions.json"
        descriptor = os.open(definitions_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(definitions(self.users, passwords), handle, indent=1)
        self.epmd_port = self.epmd_port or free_port()
        for node in self.nodes:
            node.amqp_port = node.amqp_port or free_port()
            node.mqtt_port = node.mqtt_port or free_port()
            node.dist_port = node.dist_port or free_port()
            base = self.node_dir(node)
            for sub in ("data", "log", "plugins-expand"):
                (base / sub).mkdir(parents=True, exist_ok=True)
            (base / "enabled_plugins").write_text("[rabbitmq_mqtt].\n")
            (base / "advanced.config").write_text("[].\n")
            (base / "rabbitmq-env.conf").write_text("")
            lines = [
                f"listeners.tcp.default = {self.host}:{node.amqp_port}",
                f"mqtt.listeners.tcp.default = {self.host}:{node.mqtt_port}",
                "mqtt.allow_anonymous = false",
                "mqtt.vhost = /",
                f"mqtt.exchange = {topics.AMQP_EXCHANGE}",
                # Request/reply latency: without it Nagle + delayed ACKs add ~40 ms per hop.
                "mqtt.tcp_listen_options.nodelay = true",
                "tcp_listen_options.nodelay = true",
                "definitions.import_backend = local_filesystem",
                f"definitions.local.path = {definitions_path}",
                "cluster_formation.peer_discovery_backend = classic_config",
                f"cluster_formation.classic_config.nodes.1 = {self.nodes[0].name}",
                "log.console = false",
                "log.file.level = warning",
            ]
            (base / "rabbitmq.conf").write_text("\n".join(lines) + "\n")

    def _save_state(self) -> None:
        state = {"epmd_port": self.epmd_port, "host": self.host, "users": self.users,
                 "models": [[model_hash.hex(), tier] for model_hash, tier in self.models],
                 "nodes": [asdict(node) for node in self.nodes]}
        (self.directory / STATE_FILE).write_text(json.dumps(state, indent=1) + "\n")

    @classmethod
    def load(cls, directory: str | Path) -> RabbitCluster:
        path = Path(directory) / STATE_FILE
        try:
            state = json.loads(path.read_text())
            cluster = cls(directory, len(state["nodes"]), state["users"],
                          [(bytes.fromhex(key), tier) for key, tier in state["models"]], state["host"])
            cluster.epmd_port = int(state["epmd_port"])
            cluster.nodes = [Node(**node) for node in state["nodes"]]
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ClusterError(f"{path}: no cluster state to read ({error})") from error
        return cluster

    def start_node(self, index: int, timeout_s: float = 120.0) -> None:
        """Start node ``index`` (again, after :meth:`kill`: it rejoins the cluster) and wait for its listeners."""
        self._spawn(self.nodes[index - 1])
        self._wait_listening([self.nodes[index - 1]], timeout_s)

    def _spawn(self, node: Node) -> None:
        sbin = rabbitmq_sbin()
        if sbin is None:
            raise ClusterError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        (self.node_dir(node) / "pid").unlink(missing_ok=True)
        with open(self.node_dir(node) / "log" / "stdout.log", "ab") as out:
            # Its own session: `cluster up` returns while the nodes run on, and a Ctrl-C there does not reach them.
            self._processes[node.index] = subprocess.Popen([str(sbin / "rabbitmq-server")], env=self._env(node),
                                                           stdout=out, stderr=subprocess.STDOUT,
                                                           stdin=subprocess.DEVNULL, start_new_session=True)

    def _wait_listening(self, nodes: Sequence[Node], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        waiting = list(nodes)
        while waiting:
            for node in list(waiting):
                process = self._processes.get(node.index)
                if process is not None and process.poll() is not None:
                    raise ClusterError(f"{node.name} exited with code {process.returncode}: {self.log_tail(node)}")
                # The MQTT listener opens last, once every plugin has started.
                if port_open(node.amqp_port, self.host) and port_open(node.mqtt_port, self.host):
                    waiting.remove(node)
            if waiting and time.monotonic() > deadline:
                raise ClusterError(f"{', '.join(n.name for n in waiting)} did not open their ports within "
                                   f"{timeout_s:.0f} s: {self.log_tail(waiting[0])}")
            time.sleep(0.1)

    def up(self, timeout_s: float = 180.0) -> RabbitCluster:
        """Start every node, join them into one cluster, declare the request queues; ClusterError on failure
        (with whatever had started stopped again)."""
        self._write_files()
        self._save_state()
        try:
            self._spawn(self.nodes[0])
            self._wait_listening(self.nodes[:1], timeout_s)
            for node in self.nodes[1:]:
                self._spawn(node)
            self._wait_listening(self.nodes[1:], timeout_s)
            members = self.running_nodes()
            if sorted(members) != sorted(node.name for node in self.nodes):
                raise ClusterError(f"the nodes did not form one cluster: running {members}")
            self.declare_queues()
        except BaseException:
            self.down()
            raise
        log.info("RabbitMQ cluster of %d nodes up in %s (MQTT ports %s, AMQP ports %s)", len(self.nodes),
                 self.directory, [n.mqtt_port for n in self.nodes], [n.amqp_port for n in self.nodes])
        return self

    def declare_queues(self) -> None:
        """The durable quorum queue of every model and tier, bound to amq.topic; idempotent."""
        import pika

        credentials = pika.PlainCredentials(ADMIN, _password_for(self.password_file(ADMIN)))
        params = pika.ConnectionParameters(self.host, self.nodes[0].amqp_port, "/", credentials,
                                           connection_attempts=5, retry_delay=1.0)
        connection = pika.BlockingConnection(params)
        try:
            channel = connection.channel()
            for model_hash, tier in self.models:
                queue = topics.request_queue(model_hash, tier)
                channel.queue_declare(queue, durable=True, arguments={"x-queue-type": "quorum"})
                channel.queue_bind(queue, topics.AMQP_EXCHANGE, topics.request_binding(model_hash, tier))
        finally:
            connection.close()

    # ---- inspect -------------------------------------------------------------------------------------

    def ctl(self, *args: str, node: int = 1, timeout_s: float = 60.0) -> str:
        """``rabbitmqctl -n <node> ARGS`` with this cluster's cookie and epmd; its stdout."""
        sbin = rabbitmq_sbin()
        if sbin is None:
            raise ClusterError("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
        try:
            done = subprocess.run([str(sbin / "rabbitmqctl"), "-n", self.nodes[node - 1].name, *args],
                                  env=self._env(None), capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as error:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} did not finish within {timeout_s:.0f} s") from error
        if done.returncode != 0:
            raise ClusterError(f"rabbitmqctl {' '.join(args)} failed: {(done.stderr or done.stdout).strip()}")
        return done.stdout

    def running_nodes(self, node: int = 1) -> list[str]:
        """The nodes ``cluster_status`` (asked of node ``node``) lists as running."""
        status = json.loads(self.ctl("cluster_status", "--formatter", "json", node=node))
        return [str(name) for name in status.get("running_nodes", [])]

    def log_tail(self, node: Node, lines: int = 15) -> str:
        text = []
        for path in sorted((self.node_dir(node) / "log").glob("*.log")):
            try:
                text += path.read_text(errors="replace").splitlines()[-lines:]
            except OSError:
                pass
        return "\n".join(text[-lines:])

    def pid(self, index: int) -> int | None:
        """The Erlang VM's pid of node ``index`` (from its pid file), or None."""
        try:
            return int((self.node_dir(self.nodes[index - 1]) / "pid").read_text().strip())
        except (OSError, ValueError):
            return None

    # ---- stop ----------------------------------------------------------------------------------------

    def kill(self, index: int) -> None:
        """Abrupt death of node ``index`` (SIGKILL of its VM), as a crashed machine."""
        pid = self.pid(index)
        if pid is not None and _alive(pid):
            os.kill(pid, signal.SIGKILL)
            _wait_gone(pid, 10.0)
        process = self._processes.pop(index, None)
        if process is not None:
            process.wait(10)

    def down(self, timeout_s: float = 60.0) -> None:
        """Stop every node (SIGTERM: RabbitMQ shuts down cleanly; SIGKILL after ``timeout_s``) and this cluster's
        epmd; leaves the directory (logs, credentials) in place."""
        pids = {index: pid for index in range(1, len(self.nodes) + 1)
                if (pid := self.pid(index)) is not None and _alive(pid)}
        for pid in pids.values():
            os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout_s
        for pid in pids.values():
            if not _wait_gone(pid, max(0.0, deadline - time.monotonic())):
                log.warning("RabbitMQ VM %d did not stop within %.0f s; killing it", pid, timeout_s)
                os.kill(pid, signal.SIGKILL)
                _wait_gone(pid, 10.0)
        for process in self._processes.values():
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
        self._processes.clear()
        if self.epmd_port and os.path.exists(EPMD):
            # The epmd the first node started on this cluster's port; none of ours is registered with it now.
            subprocess.run([EPMD, "-port", str(self.epmd_port), "-kill"], capture_output=True, timeout=10,
                           env=self._env(None))

    def __enter__(self) -> RabbitCluster:
        return self.up()

    def __exit__(self, *exc: object) -> None:
        self.down()


def _wait_gone(pid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True
