"""`python -m experiments.train` as a user runs it: kill and resume, 1 vs 8 devices, 2 processes."""

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

from lora_jax.adapter_io import load_adapter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLANTED = ["--config=configs/planted.py", "--config.log_every=1", "--config.eval_every=0"]
# Short runs with the warm-up they always had (min(10, steps - 1)), now that it must end before the last step.
EIGHT_STEPS = ["--config.steps=8", "--config.optimizer.warmup_steps=7"]
TWO_STEPS = ["--config.steps=2", "--config.optimizer.warmup_steps=1"]


def _env(devices: int) -> dict:
    env = dict(os.environ)
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
    env["JAX_PLATFORMS"] = "cpu"
    return env


def _cmd(workdir, *args):
    own_config = any(a.startswith("--config=") for a in args)
    return [sys.executable, "-m", "experiments.train", *([] if own_config else PLANTED),
            f"--workdir={workdir}", *args]


def _run(workdir, *args, devices=1, check=True):
    proc = subprocess.run(_cmd(workdir, *args), cwd=ROOT, env=_env(devices), capture_output=True,
                          text=True, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f) if "loss" in r}


def test_sigkill_mid_run_then_rerun_gives_the_uninterrupted_adapter(tmp_path):
    args = ["--config.steps=150", "--config.ckpt_every=10", "--config.planted_rank.width=384",
            "--config.batch_size=512"]
    _run(tmp_path / "straight", *args)
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_cmd(killed, *args), cwd=ROOT, env=_env(1), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (killed / "ckpt" / "20").is_dir():
        assert proc.poll() is None and time.time() < deadline, "run ended before it could be killed"
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (killed / "adapter").exists()  # it really died mid-run
    rerun = _run(killed, *args)
    assert "resuming at step" in rerun.stdout + rerun.stderr
    a, _ = load_adapter(str(tmp_path / "straight" / "adapter"))
    b, _ = load_adapter(str(killed / "adapter"))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.fixture(scope="module")
def eight_device_losses(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("eight")
    _run(workdir, *EIGHT_STEPS, "--config.mesh.fsdp=2", devices=8)
    return _losses(workdir)


def test_one_device_and_eight_devices_give_the_same_losses(tmp_path, eight_device_losses):
    _run(tmp_path, *EIGHT_STEPS, devices=1)
    one = _losses(tmp_path)
    assert sorted(one) == sorted(eight_device_losses) == list(range(1, 9))
    for step, loss in one.items():
        assert abs(loss - eight_device_losses[step]) <= 1e-5, (step, loss, eight_device_losses[step])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path, eight_device_losses):
    port = _free_port()
    procs = [
        subprocess.Popen(
            _cmd(tmp_path, *EIGHT_STEPS, "--config.mesh.fsdp=2",
                 f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"),
            cwd=ROOT, env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs):
        assert p.returncode == 0, err[-3000:]
    two = _losses(tmp_path)
    assert sorted(two) == sorted(eight_device_losses)
    for step, loss in two.items():
        assert abs(loss - eight_device_losses[step]) <= 1e-5, (step, loss, eight_device_losses[step])


@pytest.mark.parametrize(
    "args, match",
    [
        (["--config.lora.rnak=8"], r"^error: bad flag or config override: .rnak. Did you mean \"rank\""),
        (["--config=configs/nope.py"], r"^error: cannot load config file configs/nope.py"),
        (["--config.lora.rank=0"], r"^error: lora\.rank=0; expected an integer >= 1$"),
        (["--config.mesh.tensor=3"], r"^error: mesh .* needs a multiple of 3 devices"),
        (["--config.batch_size=60"], r"^error: microbatch of 60 examples is not divisible by the 8 batch"),
        (["--config.lora.targets=layers_.*/kernal"], r"^error: target .* matches no parameter; closest"),
        (["--config.method=half"], r"^error: method='half'; expected one of"),
        (["--config.model.dropout=True"], r"^error: model\.dropout=True, but task 'planted_rank' has no"),
        (["--config=configs/r16.py", "--config.model.path=/no/such/model"], r"^error: .*/no/such/model"),
    ],
)
def test_bad_input_is_one_line_a_nonzero_exit_and_nothing_written(tmp_path, args, match):
    proc = _run(tmp_path / "run", *args, devices=8, check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and re.search(match, lines[0]), proc.stderr[-2000:]
    assert not (tmp_path / "run").exists()


def test_workdir_of_another_config_is_refused_unless_resume_is_false(tmp_path):
    _run(tmp_path, *TWO_STEPS)
    before = sorted(os.listdir(tmp_path))
    proc = _run(tmp_path, *TWO_STEPS, "--config.lora.rank=2", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: workdir {tmp_path} holds a run of a "
                                                           "different config (differs in: lora)")
    assert sorted(os.listdir(tmp_path)) == before
    _run(tmp_path, *TWO_STEPS, "--config.lora.rank=2", "--config.resume=False")
