"""Probe: can a process outside MPS share a GPU with MPS clients, and open their CUDA IPC handles?

Run with the MPS daemon up. Roles: `mps` (an MPS client, the daemon's pipe directory) and
`plain` (CUDA_MPS_PIPE_DIRECTORY pointed at an empty folder, so the driver falls back to its
own context). Each runs fp16 4096^2 matmuls for a few seconds and prints TFLOP/s; the first
`mps` process exports an IPC handle of a filled buffer that the others open and check.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time


def worker(role: str, handle_path: str, seconds: float, export: bool) -> None:
    import cupy as cp

    out: dict[str, object] = {"role": role, "pid": os.getpid()}
    try:
        if export:
            buf = cp.full(1 << 20, 7, dtype=cp.int32)
            cp.cuda.runtime.deviceSynchronize()
            h = cp.cuda.runtime.ipcGetMemHandle(buf.data.ptr)
            with open(handle_path + ".tmp", "wb") as f:
                f.write(bytes(h))
            os.replace(handle_path + ".tmp", handle_path)
        else:
            for _ in range(100):
                if os.path.exists(handle_path):
                    break
                time.sleep(0.05)
            with open(handle_path, "rb") as f:
                h = f.read()
            try:
                ptr = cp.cuda.runtime.ipcOpenMemHandle(h)
                mem = cp.cuda.UnownedMemory(ptr, 4 << 20, None)
                arr = cp.ndarray((1 << 20,), cp.int32, cp.cuda.MemoryPointer(mem, 0))
                out["ipc_ok"] = bool(int(arr.sum()) == 7 << 20)
            except Exception as e:  # noqa: BLE001
                out["ipc_ok"] = f"{type(e).__name__}: {e}"
        a = cp.random.rand(4096, 4096, dtype=cp.float32).astype(cp.float16)
        b = cp.random.rand(4096, 4096, dtype=cp.float32).astype(cp.float16)
        for _ in range(3):
            a @ b
        cp.cuda.runtime.deviceSynchronize()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            for _ in range(10):
                a @ b
            cp.cuda.runtime.deviceSynchronize()
            n += 10
        dt = time.perf_counter() - t0
        out["tflops"] = round(2 * 4096**3 * n / dt / 1e12, 1)
        if export:
            time.sleep(1.0)  # keep the exported buffer alive while the others read it
    except Exception as e:  # noqa: BLE001
        out["error"] = f"{type(e).__name__}: {e}"
    print(json.dumps(out), flush=True)


def run(roles: list[str], seconds: float) -> list[dict[str, object]]:
    handle = f"/tmp/probe_handle_{os.getpid()}_{time.time_ns()}"
    procs = []
    for i, role in enumerate(roles):
        env = dict(os.environ)
        if role == "plain":
            os.makedirs("/tmp/no_mps_here", exist_ok=True)
            env["CUDA_MPS_PIPE_DIRECTORY"] = "/tmp/no_mps_here"
        export = i == 0
        procs.append(
            subprocess.Popen(
                [sys.executable, __file__, "worker", role, handle, str(seconds), str(int(export))],
                env=env,
                stdout=subprocess.PIPE,
                text=True,
            )
        )
    res = []
    for p in procs:
        o, _ = p.communicate(timeout=120)
        res.append(json.loads(o.strip().splitlines()[-1]) if o.strip() else {"error": "no output"})
    return res


def main() -> None:
    if sys.argv[1:2] == ["worker"]:
        worker(sys.argv[2], sys.argv[3], float(sys.argv[4]), sys.argv[5] == "1")
        return
    cases = {
        "mps alone": ["mps"],
        "plain alone": ["plain"],
        "mps+mps": ["mps", "mps"],
        "mps exports, plain opens (together)": ["mps", "plain"],
        "plain exports, mps opens (together)": ["plain", "mps"],
        "plain+plain": ["plain", "plain"],
    }
    out = {name: run(roles, 3.0) for name, roles in cases.items()}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
