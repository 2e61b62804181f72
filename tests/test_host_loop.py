"""The step loop never waits on the host: no reads between log steps, batches placed explicitly
and one step early, one compile (the trace counter)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax._src import array

from lora_jax import sharding as shd
from lora_jax import trainer
from tests.test_train import tiny


@pytest.fixture
def host_reads(monkeypatch):
    """Counts every read of a device array's value into host memory (float(), np.asarray, ...)."""
    reads = []
    value = array.ArrayImpl._value
    monkeypatch.setattr(array.ArrayImpl, "_value",
                        property(lambda self: (reads.append(self.shape), value.fget(self))[1]))
    return reads


def test_host_reads_do_not_grow_with_the_steps_between_logs(tmp_path, host_reads, monkeypatch):
    # a numpy batch handed to the step would be an implicit (blocking) transfer: refused here
    monkeypatch.setattr(trainer, "STEP_GUARD", lambda: jax.transfer_guard_host_to_device("disallow"))
    float(jnp.ones(()) + 1)  # the counter sees a read
    assert len(host_reads) == 1
    counts, traces = {}, {}
    for steps in (4, 9):
        del host_reads[:]
        c = tiny(steps=steps, log_every=steps, ckpt_every=steps, eval_every=0)
        res = trainer.train_and_evaluate(c, str(tmp_path / str(steps)))
        counts[steps], traces[steps] = len(host_reads), res["step_traces"]
    assert counts[4] == counts[9] > 0, counts  # 5 more steps, not one more read
    assert traces == {4: 1, 9: 1}


def test_the_step_guard_would_catch_a_host_batch(tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "STEP_GUARD", lambda: jax.transfer_guard_host_to_device("disallow"))
    monkeypatch.setattr(shd, "device_batches", lambda batches, shardings: batches)  # numpy batches
    with pytest.raises(Exception, match="Disallowed host-to-device"):
        trainer.train_and_evaluate(tiny(steps=3, log_every=3, ckpt_every=3), str(tmp_path))


def test_device_batches_places_the_next_batch_before_the_current_is_used(monkeypatch):
    placed = []
    monkeypatch.setattr(shd, "to_device", lambda x, s: placed.append(int(x[0])) or x)
    host = ({"x": np.full(2, i)} for i in range(4))
    seen = []
    for batch in shd.device_batches(host, {"x": None}):
        seen.append((int(batch["x"][0]), list(placed)))
    assert [b for b, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == [0, 1] and seen[2][1] == [0, 1, 2, 3]  # one ahead; the tail drains
