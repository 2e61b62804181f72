"""A side's subprocess for `benchmarks.gpu`: configurations in on stdin, one `RESULT {json}` line
out per configuration, each under its own time limit.

    python -m benchmarks.gpu_worker jax|torch      # started by benchmarks.gpu, not by hand

A worker imports its framework at once and touches the device only at its first configuration,
so the next side's worker can be started (imports) while the current one still measures. A
hang or crash costs that configuration only: the driver kills the worker's process group and
starts a fresh worker for the next one.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback

PREFIX = "RESULT "


class Worker:
    """The driver's handle on one worker process (its own process group, stderr to `log`)."""

    def __init__(self, side: str, env: dict, log_path: str):
        self.side, self.log_path = side, log_path
        with open(log_path, "a") as log:
            log.write(f"=== {side} worker, {time.strftime('%H:%M:%S')}\n")
            self.log_start = log.tell()
            self.proc = subprocess.Popen(
                [sys.executable, "-u", "-m", "benchmarks.gpu_worker", side], stdin=subprocess.PIPE,
                stdout=subprocess.PIPE, stderr=log, text=True, env=env, start_new_session=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()
        self.asked = 0

    def _read(self) -> None:
        for line in self.proc.stdout:
            if line.startswith(PREFIX):
                self.lines.put(line[len(PREFIX):])
        self.lines.put(None)  # end of output: the worker exited

    def alive(self) -> bool:
        return self.proc.poll() is None

    def ask(self, cfg: dict, timeout_s: float) -> dict:
        """The worker's result for `cfg`, or an error if it dies or takes longer than timeout_s."""
        self.asked += 1
        try:
            self.proc.stdin.write(json.dumps(cfg) + "\n")
            self.proc.stdin.flush()
            line = self.lines.get(timeout=max(timeout_s, 1.0))
        except queue.Empty:
            self.kill()
            return {"error": f"timed out after {timeout_s:.0f} s (worker killed)"}
        except BrokenPipeError:
            line = None
        if line is None:
            self.proc.wait()
            return {"error": f"worker exited ({self.proc.returncode}): {self.log_tail()}"}
        return json.loads(line)

    def log_tail(self, lines: int = 3) -> str:
        with open(self.log_path) as f:
            f.seek(self.log_start)
            text = [ln for ln in f.read().strip().splitlines() if "JAX_TRACEBACK_FILTERING" not in ln
                    and not ln.startswith("===")]
        return " | ".join(text[-lines:])[-1500:]

    def kill(self) -> None:
        if self.alive():
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()

    def close(self, grace_s: float = 20.0) -> None:
        """End the worker (its device memory is freed when the process exits)."""
        if self.alive():
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=grace_s)
            except (subprocess.TimeoutExpired, BrokenPipeError):
                self.kill()


def main() -> None:
    side = sys.argv[1]
    if side == "jax":
        from benchmarks import gpu_jax as impl
    elif side == "torch":
        from benchmarks import gpu_torch as impl
    else:
        raise SystemExit(f"error: side must be jax or torch, got {side!r}")
    for line in sys.stdin:
        cfg = json.loads(line)
        try:
            result = impl.run(cfg)
        except Exception as e:  # one configuration's failure is its result; the worker goes on
            traceback.print_exc()
            first = str(e).strip().splitlines()[0] if str(e).strip() else ""
            result = {"error": f"{type(e).__name__}: {first}"[:1500]}
        print(PREFIX + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
