"""``ddnn-server``: resume DDNN inference at the split layer for devices talking MQTT."""

from __future__ import annotations

import dataclasses
import logging
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

import click

from ddnn_gen.errors import DdnnError
from ddnn_gen.wire import codec, topics
from ddnn_gen.wire.broker import Broker
from ddnn_gen.wire.connection import DEFAULT_PORT, DEFAULT_TLS_PORT, BrokerConnection, broker_options, parse_address
from ddnn_server.aggregator import MAX_OPEN_EVENTS
from ddnn_server.app import Server, ServerConfig
from ddnn_server.jsonlog import JsonFormatter
from ddnn_server.transport import RECEIVE_MAXIMUM

log = logging.getLogger("ddnn_server")

# How long to wait for the broker before saying so (the server keeps trying in the background).
QUIET_CONNECT_S = 3.0


def _name_option(what: str) -> object:
    def check(_ctx: click.Context, _param: click.Parameter, value: str | None) -> str | None:
        if value is not None and not topics.valid_device_id(value):
            raise click.BadParameter(f"{value!r} is invalid: {topics.DEVICE_ID_RULE}")
        return value

    return check


def _upstream(broker: BrokerConnection, address: str | None, username: str | None, password_file: str | None,
              cert: str | None, key: str | None) -> BrokerConnection | None:
    """An edge's connection to the tier above: this server's TLS settings, at --upstream (default: the same
    broker), as --upstream-username or --upstream-cert (default: this server's identity). None: nothing given."""
    if address is None and username is None and password_file is None and cert is None and key is None:
        return None
    if password_file is not None and username is None:
        raise click.BadParameter("needs --upstream-username", param_hint="--upstream-password-file")
    if (cert is None) != (key is None):
        raise click.BadParameter("--upstream-cert and --upstream-key go together", param_hint="--upstream-cert")
    host, port = (parse_address(address, DEFAULT_TLS_PORT if broker.tls else DEFAULT_PORT) if address
                  else (broker.host, broker.port))
    upstream = dataclasses.replace(broker, host=host, port=port)
    if username is not None:
        upstream = dataclasses.replace(upstream, username=username,
                                       password_file=Path(password_file) if password_file else None)
    if cert is not None and key is not None:
        upstream = dataclasses.replace(upstream, cert_file=Path(cert), key_file=Path(key))
    return upstream.check()


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@broker_options(default=None, address_help="MQTT broker; default: start a private Mosquitto on a free loopback "
                                            "port (plain TCP, anonymous).")
@click.option("--amqp", "amqp_urls", multiple=True, metavar="amqp://USER@HOST:PORT/VHOST",
              help="A RabbitMQ cluster node (repeat for each node, tried in turn when one is lost): consume the "
                   "models' quorum queues over AMQP instead of MQTT (docs/deployment.md). Instead of --broker.")
@click.option("--amqp-password-file", type=click.Path(dir_okay=False, exists=True), default=None,
              help="File whose first line is the AMQP user's password.")
@click.option("--transport", "transport", type=click.Choice(["paho-mqtt", "paho-c", "c-mqtt"]),
              default="paho-mqtt",
              show_default=True,
              help="MQTT client library. paho-mqtt acknowledges a request once its reply is accepted, so a server "
                   "that dies gets it again (with --server-id). paho-c (Paho C through cffi) takes requests in "
                   "batches at a fraction of the CPU, but Paho C acknowledges on arrival: a crash loses what the "
                   "server held to the devices' local fallback (docs/deployment.md). c-mqtt (the server's own MQTT 5 "
                   "client in C) reads and writes whole batches at the least CPU, and acknowledges a request once "
                   "the server takes it: a crash loses only what it held.")
@click.option("--models", "models_dir", required=True, type=click.Path(exists=True),
              help="Directory of model files (*.npz), or one model file.")
@click.option("--workers", default=2, show_default=True, type=click.IntRange(1, 256), help="Worker threads.")
@click.option("--max-batch", default=32, show_default=True, type=click.IntRange(1, 4096),
              help="Largest batch of requests for one model.")
@click.option("--max-wait-ms", default=0.0, show_default=True, type=click.FloatRange(0, 10000),
              help="How long the oldest request waits for others to batch with; 0 batches whatever queued "
                   "up while the workers were busy (lowest latency).")
@click.option("--group", default=topics.DEFAULT_SHARE_GROUP, show_default=True, callback=_name_option("group"),
              help="Shared-subscription group; servers in one group split the load.")
@click.option("--server-id", default=None, callback=_name_option("server id"),
              help="Fixed MQTT client id: makes the session persistent so a restarted server gets the "
                   "requests that were in flight when it died.")
@click.option("--session-expiry", default=300, show_default=True, type=click.IntRange(0, 2**31),
              help="Seconds the broker keeps a --server-id session while the server is away.")
@click.option("--max-request-bytes", default=codec.MAX_REQUEST_BYTES, show_default=True,
              type=click.IntRange(codec.REQUEST_HEADER_BYTES + 8, 2**30))
@click.option("--max-queue", default=1024, show_default=True, type=click.IntRange(1, 10**6),
              help="Requests waiting per model; more are answered UNAVAILABLE (busy).")
@click.option("--receive-maximum", default=RECEIVE_MAXIMUM, show_default=True, type=click.IntRange(1, 65535),
              help="MQTT 5 Receive Maximum (with --amqp: the prefetch count): requests the broker may "
                   "have in flight to this server.")
@click.option("--role", type=click.Choice(["cloud", "edge", "aggregator"]), default="cloud", show_default=True,
              help="cloud: run every tier from where requests resume to the final exit. edge: run the model's "
                   "edge tier, answer at its exit when confident, send the rest on to the cloud (--upstream). "
                   "aggregator: for multi-view models, gather each event's views, answer from the aggregated "
                   "local exit when confident, else from tier 1 on the aggregated splits (docs/views.md).")
@click.option("--event-deadline-ms", default=100.0, show_default=True, type=click.FloatRange(1, 600000),
              help="Aggregator: how long an event waits for its missing views after its first one arrived; then "
                   "it is answered from the views present.")
@click.option("--feature-deadline-ms", default=None, type=click.FloatRange(1, 600000),
              help="Aggregator, scores first: how long an event whose exit sums were not confident waits for the "
                   "splits it asked its cameras for; then tier 1 runs on those that came. Default: "
                   "--event-deadline-ms.")
@click.option("--max-open-events", default=MAX_OPEN_EVENTS, show_default=True, type=click.IntRange(1, 10**6),
              help="Aggregator: events gathering views at once; a new event beyond is answered UNAVAILABLE.")
@click.option("--upstream", "upstream_address", default=None, metavar="HOST[:PORT]",
              help="Edge: the broker the cloud listens on (default: this server's broker); reached with the same "
                   "TLS settings and credentials.")
@click.option("--upstream-username", default=None,
              help="Edge: the user name of its session towards the tier above (broker-config's edge role makes "
                   "NAME-up); default: --username, which a broker that names sessions by user name refuses when "
                   "the tier above is on the same broker.")
@click.option("--upstream-password-file", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Edge: that user's password file.")
@click.option("--upstream-cert", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Edge: that session's client certificate (with --upstream-key), where the broker identifies "
                   "clients by certificate.")
@click.option("--upstream-key", default=None, type=click.Path(exists=True, dir_okay=False),
              help="Edge: its private key.")
@click.option("--upstream-timeout-ms", default=1000.0, show_default=True, type=click.FloatRange(1, 600000),
              help="Edge: how long to wait for the cloud before answering with the edge's own exit (fallback).")
@click.option("--from-tier", default=None, type=click.IntRange(1, 7),
              help="Cloud: the tier requests resume at (default: after the device for two-tier models, after the "
                   "last edge tier for deeper ones; 1 when a deeper model runs without an edge).")
@click.option("--plan", "plan_path", default=None, type=click.Path(exists=True, dir_okay=False),
              help="A plan file (ddnngen plan -o): for its model, run what it places at --location (role, first "
                   "tier, the edge exit's threshold); other models follow --role.")
@click.option("--location", type=click.Choice(["edge", "cloud"]), default=None,
              help="With --plan: which of the plan's locations this server is (default: cloud).")
@click.option("--gpu", default=None, type=int, is_flag=False, flag_value=0,
              help="Run the server tier on this CUDA device with CuPy (optional).")
@click.option("--forward", "forward", type=click.Choice(["numpy", "chainer"]), default="numpy", show_default=True,
              help="How the server tiers run on the CPU: the NumPy forward (bit-identical to Chainer's, without its "
                   "per-call cost) or Chainer itself, the reference. --gpu always runs Chainer.")
@click.option("--metrics-port", default=0, show_default=True, type=click.IntRange(0, 65535),
              help="Expose Prometheus metrics on http://ADDRESS:PORT/metrics; 0: off.")
@click.option("--metrics-address", default="127.0.0.1", show_default=True,
              help="Address the metrics endpoint binds to (0.0.0.0 for a scraper on another host).")
@click.option("--log-format", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="json: one JSON object per log line, and one line per request (model, device, status, "
                   "times) on the ddnn_server.requests logger.")
@click.option("--telemetry-interval", "telemetry_interval", default=2.0, show_default=True,
              type=click.FloatRange(0, 3600),
              help="Publish this server's load (JSON) on ddnn/server/<id>/telemetry every this many seconds; 0: off.")
@click.option("-v", "--verbose", count=True, help="More logging (-v info, -vv debug).")
def main(broker: BrokerConnection | None, amqp_urls: tuple[str, ...], amqp_password_file: str | None,
         transport: str, models_dir: str, workers: int, max_batch: int, max_wait_ms: float,
         group: str, server_id: str | None, session_expiry: int, max_request_bytes: int, max_queue: int,
         receive_maximum: int, role: str, event_deadline_ms: float, feature_deadline_ms: float | None,
         max_open_events: int,
         upstream_address: str | None, upstream_username: str | None, upstream_password_file: str | None,
         upstream_cert: str | None, upstream_key: str | None, upstream_timeout_ms: float,
         from_tier: int | None, plan_path: str | None, location: str | None, gpu: int | None, forward: str,
         metrics_port: int, metrics_address: str, log_format: str, telemetry_interval: float, verbose: int) -> None:
    """Serve every model in --models to devices over MQTT until SIGTERM/SIGINT."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if log_format == "json"
                         else logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler])
    if 0 < telemetry_interval < 0.1:
        raise click.BadParameter("0 (off) or at least 0.1 s", param_hint="--telemetry-interval")
    if log_format == "json":
        # Asked for explicitly: the per-request lines show whatever the level of the rest.
        logging.getLogger("ddnn_server.requests").setLevel(logging.INFO)
    private: Broker | None = None
    try:
        amqp = []
        if amqp_urls:
            from ddnn_server.amqp_transport import parse_amqp_url

            if broker is not None:
                raise click.BadParameter("--amqp and --broker are two transports: give one", param_hint="--amqp")
            amqp = [parse_amqp_url(url, amqp_password_file) for url in amqp_urls]
            if transport != "paho-mqtt":
                raise click.BadParameter("--amqp is its own transport", param_hint="--transport")
            broker = BrokerConnection()  # unused: requests and replies go over AMQP
        elif amqp_password_file is not None:
            raise click.BadParameter("only for --amqp", param_hint="--amqp-password-file")
        if broker is None:
            private = Broker().start()
            click.echo(f"ddnn-server: started private mosquitto at {private.address}", err=True)
            broker = private.connection()
        if location is not None and plan_path is None:
            raise click.BadParameter("a location is one of a plan's; give --plan", param_hint="--location")
        # An aggregator of a three-tier multi-view model runs tier 1 as an edge: it too has a tier above.
        reaches_up = role in ("edge", "aggregator") or (plan_path and location == "edge")
        if upstream_address and not reaches_up:
            raise click.BadParameter("only an edge (or an aggregator) has a tier above to send to",
                                     param_hint="--upstream")
        upstream = _upstream(broker, upstream_address, upstream_username, upstream_password_file, upstream_cert,
                             upstream_key)
        if upstream is not None and not reaches_up:
            raise click.BadParameter("only an edge (or an aggregator) has a tier above to reach",
                                     param_hint="--upstream-username")
        config = ServerConfig(broker, models_dir, workers, max_batch, max_wait_ms, group, server_id,
                              session_expiry, max_request_bytes, gpu=gpu, forward=forward, max_queue=max_queue,
                              receive_maximum=receive_maximum, role=role, from_tier=from_tier, upstream=upstream,
                              upstream_timeout_ms=upstream_timeout_ms, plan=plan_path, location=location or "cloud",
                              metrics_port=metrics_port, metrics_address=metrics_address,
                              log_requests=log_format == "json", telemetry_interval_s=telemetry_interval,
                              event_deadline_ms=event_deadline_ms, feature_deadline_ms=feature_deadline_ms,
                              max_open_events=max_open_events,
                              amqp=amqp, transport=transport)
        server = Server(config).start()
    except DdnnError as error:
        if private is not None:
            private.cleanup()
        raise click.ClickException(str(error)) from error
    stop = threading.Event()

    def _signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, _signal)
    signal.signal(signal.SIGINT, _signal)
    models = ", ".join(f"{m.name}={topics.model_key(m.hash_bytes)}" + ("" if m.role == "cloud" and m.entry_tier <= 1
                                                                        else f" ({m.role}, tier {m.entry_tier})")
                       for m in server.store.models())
    if not server.wait_ready(QUIET_CONNECT_S):
        problem = server.transport.connection_problem
        click.echo(f"ddnn-server: waiting for the broker at {server.transport.url}"
                   + (f" ({problem})" if problem else "") + "; retrying in the background", err=True)
        reported = problem
        while not stop.is_set() and not server.wait_ready(0.5):
            problem = server.transport.connection_problem
            if problem and problem != reported:
                click.echo(f"ddnn-server: still waiting for the broker at {server.transport.url} ({problem})", err=True)
                reported = problem
    if not stop.is_set():
        # Tests and scripts wait for this line before sending work: the subscriptions are in place.
        click.echo(f"ddnn-server: ready on {server.transport.url} serving {models}", err=True)
    while not stop.wait(0.5):
        pass
    server.stop()
    if private is not None:
        private.cleanup()
