"""A polite stop: SIGTERM (a preemptible VM, a scheduler) or SIGINT (Ctrl-C) ends a run cleanly.

The handlers only note the signal; the training loop asks `StopSignals.agreed()` after each step
and, when it says stop, checkpoints that step and raises `TrainingStopped`. With several
processes the decision is all-reduced, so every process stops after (and saves) the same step
even if only one of them was signalled. A SIGINT while a stop is already pending aborts at once.
`python -m experiments.train` prints its one line (`stopped by SIGTERM after step N; ...`) and
exits 128 + the signal number (143, 130), as a shell does; rerunning the command continues.
`TrainingStopped` is a LoraError, so library callers that catch those see it too.
"""

from __future__ import annotations

import signal
import threading
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.errors import LoraError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class TrainingStopped(LoraError):
    """The run stopped on a signal after writing a checkpoint; rerunning the command continues it."""

    def __init__(self, message: str, signum: int, step: int):
        super().__init__(message)
        self.signum, self.step = signum, step


class StopSignals:
    """Context manager: catch SIGTERM/SIGINT while training, restore the previous handlers after.

    Outside the main thread (where Python cannot install handlers) it does nothing. With several
    processes each call to `agreed` starts a tiny all-reduce of the flags and reads the one
    started at the previous step, so the host is never made to wait for the current step.
    """

    def __init__(self) -> None:
        self.signum = 0
        self._previous: dict[int, Any] = {}
        self._pending: jax.Array | None = None
        self._multi = jax.process_count() > 1
        if self._multi:
            mesh = Mesh(np.array(jax.devices()), ("all",))
            self._flags_sh = NamedSharding(mesh, PartitionSpec("all"))
            self._reduce = jax.jit(jnp.max, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._note) for s in SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

    def _note(self, signum: int, frame: Any) -> None:
        if self.signum and signum == signal.SIGINT:  # impatient: hand over to the old handler
            self._restore()
            signal.raise_signal(signum)
            return
        self.signum = self.signum or signum

    def agreed(self, last: bool) -> int:
        """The signal to stop on (0: go on), the same on every process.

        `last`: this is the final step, so wait for this step's flags rather than the previous one's.
        """
        if not self._multi:
            return self.signum
        local = np.full(len(jax.local_devices()), self.signum, np.int32)
        current = self._reduce(jax.make_array_from_process_local_data(self._flags_sh, local))
        previous, self._pending = self._pending, current
        ready = current if last else previous
        return 0 if ready is None else int(np.asarray(ready.addressable_data(0)))


def stop_message(signum: int, step: int, directory: str) -> str:
    return (f"stopped by {signal.Signals(signum).name} after step {step}; checkpoint written to "
            f"{directory}/{step}; rerun the same command to continue")
