"""JSON-lines logging on stdout, each line stamped with service, node and replica.

Only `main()` calls `setup`; modules use `logging.getLogger(__name__)` and lazy `%` arguments.
A request id travels in `extra={"request_id": ...}`. `setup` also turns on Python's fault handler:
a process killed by a signal in native code (a SIGFPE inside cuBLAS, say) leaves the Python
frames it was in on stderr, which the agent keeps in the replica's log.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def __init__(self, service: str, node: str, replica: str = "") -> None:
        super().__init__()
        self.stamp = {"service": service, "node": node}
        if replica:
            self.stamp["replica"] = replica

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **self.stamp,
        }
        request_id = getattr(record, "request_id", None)
        if request_id:
            line["request_id"] = request_id
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


def setup(service: str, node: str, replica: str = "", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter(service, node, replica))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    if not faulthandler.is_enabled():
        faulthandler.enable()
