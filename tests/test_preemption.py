"""SIGTERM / SIGINT mid-run: the step is finished and checkpointed, and rerunning continues exactly."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lora_jax.adapter_io import load_adapter, read_info
from lora_jax.adapters import Adapter
from lora_jax.paths import nest
from lora_jax.preemption import StopSignals

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# No periodic checkpoint before the end: whatever the rerun continues from, the stop wrote.
ARGS = ["--config=configs/planted.py", "--config.log_every=1", "--config.eval_every=0",
        "--config.steps=60", "--config.ckpt_every=1000", "--config.planted_rank.width=384",
        "--config.batch_size=512"]
TWO_PROCESSES = ["--config.steps=40", "--config.planted_rank.width=128", "--config.batch_size=128"]
STOPPED = (r"^stopped by {} after step (\d+); checkpoint written to .*/ckpt/\1; "
           r"rerun the same command to continue$")


def _env(devices):
    return {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}",
            "JAX_PLATFORMS": "cpu"}


def _start(workdir, devices=1, extra=()):
    cmd = [sys.executable, "-m", "experiments.train", *ARGS, f"--workdir={workdir}", *extra]
    return subprocess.Popen(cmd, cwd=ROOT, env=_env(devices), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def _finish(proc):
    out, err = proc.communicate(timeout=300)
    return proc.returncode, out, err


def _train_steps(workdir):
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().splitlines()
    return [json.loads(line)["step"] for line in lines if line.endswith("}") and '"loss"' in line]


def _wait_for_step(workdir, step, procs):
    deadline = time.time() + 240
    while max(_train_steps(workdir), default=0) < step:
        assert all(p.poll() is None for p in procs) and time.time() < deadline, "run ended too early"
        time.sleep(0.02)


def _on_one_device(adapter_dir):
    """Shardings that read an adapter saved by any topology (e.g. 2 processes) into this process."""
    one = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    layout = read_info(str(adapter_dir))["layout"]
    return nest({p: Adapter(one, one, m["scale"], tuple(m["stack"]), tuple(m["inputs"]),
                            tuple(m["outputs"]), m["dropout"]) for p, m in layout.items()})


def _assert_same_adapter(a_dir, b_dir):
    a, _ = load_adapter(str(a_dir / "adapter"), _on_one_device(a_dir / "adapter"))
    b, _ = load_adapter(str(b_dir / "adapter"), _on_one_device(b_dir / "adapter"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    rc, _, err = _finish(_start(workdir))
    assert rc == 0, err[-3000:]
    return workdir


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_run_checkpoints_the_step_and_the_rerun_continues_exactly(tmp_path, straight, sig):
    proc = _start(tmp_path)
    _wait_for_step(tmp_path, 10, [proc])
    proc.send_signal(sig)
    rc, _, err = _finish(proc)
    assert rc == 128 + sig, err[-3000:]
    last = err.strip().splitlines()[-1]
    match = re.match(STOPPED.format(sig.name), last)
    assert match, err[-3000:]
    stopped = int(match.group(1))
    assert 10 <= stopped < 60 and not (tmp_path / "adapter").exists()
    assert (tmp_path / "ckpt" / str(stopped)).is_dir()
    rc, out, err = _finish(_start(tmp_path))
    assert rc == 0, err[-3000:]
    assert f"resuming at step {stopped}" in out + err
    assert _train_steps(tmp_path) == list(range(1, 61))  # none repeated, none lost
    _assert_same_adapter(straight, tmp_path)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_pair(workdir):
    port = _free_port()
    return [_start(workdir, 4, [*TWO_PROCESSES, f"--coordinator_address=127.0.0.1:{port}",
                                "--num_processes=2", f"--process_id={i}"]) for i in range(2)]


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    straight, stopped_dir = tmp_path / "straight", tmp_path / "stopped"
    for p in _start_pair(straight):
        rc, _, err = _finish(p)
        assert rc == 0, err[-3000:]
    procs = _start_pair(stopped_dir)
    _wait_for_step(stopped_dir, 10, procs)
    procs[1].send_signal(signal.SIGTERM)  # only process 1 hears it; process 0 writes the metrics
    results = [_finish(p) for p in procs]
    steps = set()
    for rc, _, err in results:
        assert rc == 128 + signal.SIGTERM, err[-3000:]
        match = re.match(STOPPED.format("SIGTERM"), err.strip().splitlines()[-1])
        assert match, err[-3000:]
        steps.add(int(match.group(1)))
    assert len(steps) == 1 and 10 <= min(steps) < 40, steps
    for p in _start_pair(stopped_dir):
        rc, _, err = _finish(p)
        assert rc == 0, err[-3000:]
    assert _train_steps(stopped_dir) == list(range(1, 41))
    _assert_same_adapter(straight, stopped_dir)


def test_previous_handlers_are_back_after_the_run():
    def interrupt(signum, frame):  # the handler the user had (Python's default raises the same)
        raise KeyboardInterrupt

    outer = signal.signal(signal.SIGINT, interrupt)  # not whatever an earlier test left behind
    try:
        before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        with StopSignals() as stop:
            assert signal.getsignal(signal.SIGTERM) != before[signal.SIGTERM]
            signal.raise_signal(signal.SIGTERM)
            assert stop.agreed(last=False) == signal.SIGTERM
            with pytest.raises(KeyboardInterrupt):  # a second Ctrl-C while stopping aborts at once
                signal.raise_signal(signal.SIGINT)
        assert {s: signal.getsignal(s) for s in before} == before
    finally:
        signal.signal(signal.SIGINT, outer)
