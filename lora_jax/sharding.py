"""The device mesh and how params, adapters and batches are laid out on it.

Axes: `data` (batch only), `fsdp` (batch, and each weight's largest divisible axis) and
`tensor` (attention/MLP projections split Megatron-style: column-parallel projections on their
output axis, row-parallel ones on their input axis).
"""

from __future__ import annotations

import collections
import math
import re
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from lora_jax.errors import LoraError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")
# Projections whose output features are split (q/k/v, MLP up) and whose input features are (o, down).
_COLUMN = re.compile(r".*(q_proj|k_proj|v_proj|gate_proj|up_proj|query|key|value|intermediate/dense)/kernel")
_ROW = re.compile(r".*(o_proj|down_proj|attention/output/dense|layer_\d+/output/dense)/kernel")


def make_mesh(mesh_cfg: Any, devices: list | None = None) -> Mesh:
    """Mesh with axes (data, fsdp, tensor); one size may be -1 for "the devices left over"."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(mesh_cfg[a]) for a in AXES]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise LoraError(f"mesh {dict(zip(AXES, sizes))}: expected positive sizes, at most one -1")
    known = math.prod(s for s in sizes if s != -1)
    if len(devices) % known:
        raise LoraError(
            f"mesh {dict(zip(AXES, sizes))} needs a multiple of {known} devices, "
            f"but there are {len(devices)}"
        )
    sizes = [len(devices) // known if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise LoraError(
            f"mesh {dict(zip(AXES, sizes))} uses {math.prod(sizes)} devices, "
            f"but there are {len(devices)}; set one axis to -1"
        )
    return Mesh(np.array(devices).reshape(sizes), AXES)


def param_spec(path: str, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Tensor-parallel rule first, then FSDP over the largest remaining divisible axis."""
    spec: list[Any] = [None] * len(shape)
    tp = mesh.shape["tensor"]
    if tp > 1 and len(shape) >= 2:
        axis = -1 if _COLUMN.fullmatch(path) else -2 if _ROW.fullmatch(path) else None
        if axis is not None and shape[axis] % tp == 0:
            spec[axis] = "tensor"
    fsdp = mesh.shape["fsdp"]
    if fsdp > 1:
        free = [i for i in range(len(shape)) if spec[i] is None and shape[i] % fsdp == 0]
        if free:
            spec[max(free, key=lambda i: (shape[i], -i))] = "fsdp"
    return PartitionSpec(*spec)


def param_sharding(mesh: Mesh):
    """(path, shape) -> NamedSharding: what tasks use to create or load params in place."""
    return lambda path, shape: NamedSharding(mesh, param_spec(path, tuple(shape), mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def check_batch(batch_size: int, grad_accum: int, mesh: Mesh) -> None:
    shards = math.prod(mesh.shape[a] for a in BATCH_AXES)
    if grad_accum < 1 or batch_size % grad_accum:
        raise LoraError(f"batch_size {batch_size} does not split into grad_accum={grad_accum} microbatches")
    if (batch_size // grad_accum) % shards:
        raise LoraError(
            f"microbatch of {batch_size // grad_accum} examples is not divisible by the "
            f"{shards} batch shards (data x fsdp) of the mesh"
        )


def to_device(x: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global numpy array (the same on every process) placed shard by shard; an explicit
    transfer (`device_put`) where this process holds every shard."""
    if sharding.is_fully_addressable:
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def device_batches(batches: Iterator[dict[str, np.ndarray]], shardings: dict[str, NamedSharding],
                   ahead: int = 1) -> Iterator[dict[str, jax.Array]]:
    """Global numpy batches placed on device `ahead` batches early: when a step is dispatched,
    the next one's batch is already being copied, so the loop never waits for a transfer."""
    queue: collections.deque = collections.deque()
    for host in batches:
        queue.append({k: to_device(v, shardings[k]) for k, v in host.items()})
        if len(queue) > ahead:
            yield queue.popleft()
    while queue:
        yield queue.popleft()


def like_params(opt_shapes: Any, params: Any, param_sh: Any, default: Any) -> Any:
    """Shardings for optimizer state: a leaf that mirrors a param (its key path ends with the
    param's, same shape; the longest such path wins) is sharded like it; counters and the like
    get `default`."""
    by_path = {}
    for (kp, x), s in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(param_sh)):
        by_path[jax.tree_util.keystr(kp)] = (x.shape, s)

    def pick(kp, leaf):
        key = jax.tree_util.keystr(kp)
        matches = [(len(suffix), s) for suffix, (shape, s) in by_path.items()
                   if key.endswith(suffix) and tuple(leaf.shape) == tuple(shape)]
        return max(matches, key=lambda m: m[0])[1] if matches else default

    return jax.tree_util.tree_map_with_path(pick, opt_shapes)


def place(tree, shardings):
    """Put host-side or single-device values onto (possibly multi-process) shardings."""
    return jax.tree.map(lambda x, s: to_device(np.asarray(x), s), tree, shardings)


def to_host(x: jax.Array) -> np.ndarray:
    """The full value of a (possibly multi-process) array on every process."""
    if x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils

    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
