"""NVML Xid events: the driver's report of a GPU error, watched on a thread of their own.

Each critical Xid is logged and counted per GPU (`camelot_gpu_xid_total`) and handed to the
event loop (`on_xid(gpu, xid)`), where the agent decides what restarts (gpufaults.py). Where NVML
is absent (the host backend, a container without the library) or a GPU does not support the
events, the watcher says so once and watches what it can; its loop never dies: an error is
logged and the wait goes on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

from common import metrics

log = logging.getLogger(__name__)

WAIT_MS = 500
# after an unexpected NVML error, before waiting again
ERROR_PAUSE_S = 1.0


class XidWatcher:
    def __init__(self, on_xid: Callable[[int, int], None], loop: asyncio.AbstractEventLoop):
        self.on_xid = on_xid
        self.loop = loop
        self.counts: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._nvml: Any = None
        self._events: Any = None

    def start(self) -> bool:
        """Registers for critical Xids on every GPU NVML sees; False where it cannot watch."""
        try:
            import pynvml

            pynvml.nvmlInit()
        except Exception as e:
            log.info("Xid events not watched: NVML unavailable (%s)", e)
            return False
        self._nvml = pynvml
        try:
            self._events = pynvml.nvmlEventSetCreate()
            watched = 0
            for i in range(pynvml.nvmlDeviceGetCount()):
                handle = pynvml.nvmlDeviceGetHandleByIndex(i)
                try:
                    pynvml.nvmlDeviceRegisterEvents(
                        handle, pynvml.nvmlEventTypeXidCriticalError, self._events
                    )
                    watched += 1
                except pynvml.NVMLError as e:
                    log.warning("GPU %d: Xid events not supported (%s)", i, e)
        except Exception as e:
            log.warning("Xid events not watched: %s", e)
            self._shutdown()
            return False
        if not watched:
            self._shutdown()
            return False
        self._thread = threading.Thread(target=self._run, name="xid", daemon=True)
        self._thread.start()
        log.info("watching Xid events on %d GPU(s)", watched)
        return True

    def _run(self) -> None:
        nvml = self._nvml
        # the _v2 wait where this pynvml has it (the plain one is deprecated in newer drivers)
        wait = getattr(nvml, "nvmlEventSetWait_v2", None) or nvml.nvmlEventSetWait
        while not self._stop.is_set():
            try:
                data = wait(self._events, WAIT_MS)
            except nvml.NVMLError_Timeout:
                continue
            except Exception:
                log.exception("Xid wait failed; watching on")
                self._stop.wait(ERROR_PAUSE_S)
                continue
            try:
                gpu = int(nvml.nvmlDeviceGetIndex(data.device))
                xid = int(data.eventData)
            except Exception:
                log.exception("an Xid event could not be read")
                continue
            self.counts[gpu] = self.counts.get(gpu, 0) + 1
            metrics.GPU_XIDS.labels(str(gpu), str(xid)).inc()
            log.error("GPU %d: Xid %d", gpu, xid)
            self.loop.call_soon_threadsafe(self.on_xid, gpu, xid)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            # the wait returns within WAIT_MS
            self._thread.join(timeout=WAIT_MS / 1000 * 4)
        self._shutdown()

    def _shutdown(self) -> None:
        nvml, self._nvml = self._nvml, None
        if nvml is None:
            return
        try:
            if self._events is not None:
                nvml.nvmlEventSetFree(self._events)
            nvml.nvmlShutdown()
        except Exception as e:
            log.debug("NVML shutdown: %s", e)
        self._events = None
