"""Topic names and the ids that appear in them (devices, servers, groups); see docs/protocol.md."""

from __future__ import annotations

import re

from ddnn_gen.errors import DdnnError

TOPIC_ROOT = "ddnn"
DEFAULT_SHARE_GROUP = "ddnn-servers"
DEVICE_ID_BYTES = 32
# The one rule for device ids, shared with c_runtime/ddnn_protocol.c (ddnn_device_id_valid): ids end up
# in topic names, broker ACL patterns (%c/%u), file names and command lines, so they are short ASCII
# words: no topic separators or wildcards, no control characters, nothing that reads as a CLI flag.
DEVICE_ID_RULE = "1..32 characters of A-Z a-z 0-9 _ . - starting with a letter or digit"
_DEVICE_ID = re.compile(rb"[A-Za-z0-9][A-Za-z0-9_.-]{0,31}")


class DeviceIdError(DdnnError, ValueError):
    """A device id that breaks DEVICE_ID_RULE."""


def valid_device_id(raw: bytes | str) -> bool:
    """Whether ``raw`` follows DEVICE_ID_RULE."""
    if isinstance(raw, str):
        try:
            raw = raw.encode("ascii")
        except UnicodeEncodeError:
            return False
    return _DEVICE_ID.fullmatch(raw) is not None


def check_device_id(device_id: str) -> str:
    """``device_id`` if it follows DEVICE_ID_RULE, else DeviceIdError (a ValueError) naming the rule."""
    if not valid_device_id(device_id):
        raise DeviceIdError(f"device id {device_id!r} is invalid: {DEVICE_ID_RULE}")
    return device_id


_MODEL_KEY = re.compile(r"[0-9a-f]{32}")


def model_key(model_hash: bytes) -> str:
    """Topic segment naming a model: hex of the 16 wire hash bytes."""
    return model_hash.hex()


MAX_TIER = 7


def _tier_suffix(tier: int) -> str:
    if not 1 <= tier <= MAX_TIER:
        raise ValueError(f"requests go to tiers 1..{MAX_TIER}, not {tier}")
    return "" if tier == 1 else f"/t{tier}"


def request_topic(model_hash: bytes, device_id: str, tier: int = 1) -> str:
    """Where ``device_id`` publishes requests for a model's tier ``tier`` (1: the first server tier, what
    devices send to; 2 and up: what an edge sends on). The sender's id is part of the topic so the broker,
    not the payload, says who sent a request: an ACL (``pattern write ddnn/req/+/%u``) lets a device publish
    only under its own id, and the server answers only that id. Tiers above the first get their own topic
    level, so an edge and a cloud sharing a broker never receive each other's requests."""
    return f"{TOPIC_ROOT}/req/{model_key(model_hash)}/{check_device_id(device_id)}{_tier_suffix(tier)}"


def request_subscription(model_hash: bytes, group: str = DEFAULT_SHARE_GROUP, tier: int = 1) -> str:
    """A server's subscription to one model it holds, at the tier it serves: servers of one group split that
    model's requests, and a server never receives (and races the right one with UNKNOWN_MODEL for) a model
    it does not hold."""
    return f"$share/{check_name(group, 'group')}/{TOPIC_ROOT}/req/{model_key(model_hash)}/+{_tier_suffix(tier)}"


def parse_request_topic(topic: str) -> tuple[str, str, int] | None:
    """(model key, sender id, tier) of a request topic, or None when the topic is not one (or its id is
    invalid)."""
    parts = topic.split("/")
    if len(parts) == 5 and parts[4][:1] == "t" and parts[4][1:].isdigit() and 2 <= int(parts[4][1:]) <= MAX_TIER:
        tier = int(parts[4][1:])
    elif len(parts) == 4:
        tier = 1
    else:
        return None
    if (parts[0] != TOPIC_ROOT or parts[1] != "req" or _MODEL_KEY.fullmatch(parts[2]) is None
            or not valid_device_id(parts[3])):
        return None
    return parts[2], parts[3], tier


def check_name(name: str, what: str) -> str:
    """A server id or shared-subscription group: the device-id rule (they become topic levels and client ids)."""
    if not valid_device_id(name):
        raise DeviceIdError(f"{what} {name!r} is invalid: {DEVICE_ID_RULE}")
    return name


def reply_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/reply/{check_device_id(device_id)}"


def feature_request_topic(device_id: str) -> str:
    """Where an aggregator asks camera ``device_id`` for an event's split (scores first, docs/views.md): only
    servers may publish here, only that device reads it."""
    return f"{TOPIC_ROOT}/features/{check_device_id(device_id)}"


def threshold_topic(model_hash: bytes, device_id: str | None = None) -> str:
    base = f"{TOPIC_ROOT}/threshold/{model_key(model_hash)}"
    return base if device_id is None else f"{base}/{check_device_id(device_id)}"


def tier_threshold_topic(model_hash: bytes, tier: int, device_id: str | None = None) -> str:
    """The retained threshold of a server tier's early exit (an edge's), model-wide or for one device's
    requests; the device's own exit keeps threshold_topic."""
    if not 1 <= tier <= MAX_TIER:
        raise ValueError(f"tier thresholds are for server tiers 1..{MAX_TIER}, not {tier}")
    base = f"{TOPIC_ROOT}/tier-threshold/{model_key(model_hash)}/{tier}"
    return base if device_id is None else f"{base}/{check_device_id(device_id)}"


def status_topic(device_id: str) -> str:
    return f"{TOPIC_ROOT}/status/{check_device_id(device_id)}"


STATUS_SUBSCRIPTION = f"{TOPIC_ROOT}/status/+"  # every device's status (an aggregator follows its cameras')


def parse_status_topic(topic: str) -> str | None:
    """The device id of a device status topic, or None when ``topic`` is not one with a valid id."""
    prefix = f"{TOPIC_ROOT}/status/"
    if not topic.startswith(prefix) or not valid_device_id(topic[len(prefix):]):
        return None
    return topic[len(prefix):]


def server_status_topic(server_id: str) -> str:
    return f"{TOPIC_ROOT}/server/{check_name(server_id, 'server id')}/status"


def server_telemetry_topic(server_id: str) -> str:
    """Where a server publishes its load every ``--telemetry-interval`` s (JSON, wire/telemetry.py)."""
    return f"{TOPIC_ROOT}/server/{check_name(server_id, 'server id')}/telemetry"


def device_telemetry_topic(device_id: str) -> str:
    """Where a device publishes its periodic counters (JSON, wire/telemetry.py)."""
    return f"{TOPIC_ROOT}/device/{check_device_id(device_id)}/telemetry"


TELEMETRY_SUBSCRIPTIONS = (f"{TOPIC_ROOT}/server/+/telemetry", f"{TOPIC_ROOT}/device/+/telemetry")


def parse_telemetry_topic(topic: str) -> tuple[str, str] | None:
    """("server" | "device", its id) of a telemetry topic, or None when the topic is not one (or its id is
    invalid)."""
    parts = topic.split("/")
    if (len(parts) != 4 or parts[0] != TOPIC_ROOT or parts[1] not in ("server", "device")
            or parts[3] != "telemetry" or not valid_device_id(parts[2])):
        return None
    return parts[1], parts[2]


def _control_tier_suffix(tier: int) -> str:
    # The device exit's controller keeps the plain topics; a server tier's (``ddnngen control --tier N``) gets
    # its own, so one controller per hop of a model runs side by side.
    if not 0 <= tier <= MAX_TIER:
        raise ValueError(f"controllers are for exits 0..{MAX_TIER}, not {tier}")
    return f"/t{tier}" if tier else ""


def control_state_topic(model_hash: bytes, tier: int = 0) -> str:
    """Where ``ddnngen control`` publishes (retained) its target and recent decisions for a model's exit
    ``tier`` (0: the devices')."""
    return f"{TOPIC_ROOT}/control/{model_key(model_hash)}/state{_control_tier_suffix(tier)}"


def control_target_topic(model_hash: bytes, tier: int = 0) -> str:
    """Where the operator sets (retained) the controller's target for a model's exit ``tier``."""
    return f"{TOPIC_ROOT}/control/{model_key(model_hash)}/target{_control_tier_suffix(tier)}"


CONTROL_STATE_SUBSCRIPTION = f"{TOPIC_ROOT}/control/+/state"
CONTROL_TIER_STATE_SUBSCRIPTION = f"{TOPIC_ROOT}/control/+/state/+"


def parse_control_topic(topic: str) -> tuple[str, str] | None:
    """(model key, "state" | "target") of a device-exit controller's topic, or None when the topic is not one."""
    routed = parse_control_tier_topic(topic)
    if routed is None or routed[2]:
        return None
    return routed[0], routed[1]


def parse_control_tier_topic(topic: str) -> tuple[str, str, int] | None:
    """(model key, "state" | "target", exit tier) of any controller topic, or None when the topic is not one."""
    parts = topic.split("/")
    if (len(parts) not in (4, 5) or parts[0] != TOPIC_ROOT or parts[1] != "control"
            or _MODEL_KEY.fullmatch(parts[2]) is None or parts[3] not in ("state", "target")):
        return None
    tier = 0
    if len(parts) == 5:
        match = re.fullmatch(r"t([1-7])", parts[4])
        if match is None or int(match.group(1)) > MAX_TIER:
            return None
        tier = int(match.group(1))
    return parts[2], parts[3], tier


# ---- the same topics on a RabbitMQ cluster (AMQP 0-9-1 names; docs/deployment.md) -------------------------
# RabbitMQ's MQTT plugin publishes into ``amq.topic`` with the topic's ``/`` turned into ``.`` (and back on
# delivery), so ``ddnn/req/<model>/<device>`` arrives as routing key ``ddnn.req.<model>.<device>``. A ``.``
# inside a device id would turn into a topic level there, so ids on such a cluster must not contain one.

AMQP_EXCHANGE = "amq.topic"


def valid_cluster_id(name: str) -> bool:
    """The device-id rule, without ``.`` (which RabbitMQ's topic translation would split)."""
    return valid_device_id(name) and "." not in name


def request_queue(model_hash: bytes, tier: int = 1) -> str:
    """The durable quorum queue holding one model's requests for one tier, which servers consume."""
    return f"{TOPIC_ROOT}.req.{model_key(model_hash)}{_tier_suffix(tier).replace('/', '.')}"


def request_binding(model_hash: bytes, tier: int = 1) -> str:
    """The binding key of that queue on ``amq.topic``: every device's requests for the model and tier."""
    return f"{TOPIC_ROOT}.req.{model_key(model_hash)}.*{_tier_suffix(tier).replace('/', '.')}"


def routing_key(topic: str) -> str:
    """The AMQP routing key RabbitMQ's MQTT plugin uses for ``topic``."""
    return topic.replace("/", ".")


def topic_of(routing_key_: str) -> str:
    """The MQTT topic of an AMQP routing key (the inverse of :func:`routing_key` for ids without ``.``)."""
    return routing_key_.replace(".", "/")
