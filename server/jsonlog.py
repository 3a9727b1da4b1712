"""``--log-format json``: every log record as one JSON object per line, for log shippers. A record logged
with ``extra={"ddnn": {...}}`` (the per-request lines of metrics.request_log) carries those fields at the
top level."""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        fields = getattr(record, "ddnn", None)
        if isinstance(fields, dict):
            line.update(fields)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        # default=str: a message argument that is not JSON (bytes, a path) is written as its text, not lost.
        return json.dumps(line, default=str)
