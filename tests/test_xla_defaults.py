"""The project's XLA:CPU defaults: set once, never over a user's own value, and in effect."""

import os

import jax
import jax.numpy as jnp
import pytest

import lora_jax  # noqa: F401  (sets the defaults on import)
from lora_jax.xla_defaults import CPU_FLAGS, MEASURED_JAXLIB, apply_defaults

FLAG = next(iter(CPU_FLAGS))


def test_appended_to_the_users_flags_once():
    env = {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}
    apply_defaults(env, MEASURED_JAXLIB)
    apply_defaults(env, MEASURED_JAXLIB)
    assert env["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=8 {FLAG}="


def test_a_users_own_value_another_jaxlib_or_the_opt_out_leave_xla_flags_alone():
    own = {"XLA_FLAGS": f"{FLAG}=LIBRARY_FUSION_TYPE_DOT"}
    assert apply_defaults(dict(own), MEASURED_JAXLIB) == own["XLA_FLAGS"]
    assert apply_defaults({}, "0.11.0") == ""
    assert apply_defaults({"LORA_JAX_XLA_DEFAULTS": "0"}, MEASURED_JAXLIB) == ""


@pytest.mark.skipif(os.environ.get("LORA_JAX_XLA_DEFAULTS") == "0", reason="defaults switched off")
def test_this_process_compiles_without_ynnpack_fusions():
    x = jnp.ones((64, 64))
    text = jax.jit(lambda a: (a @ a).sum(axis=0)).lower(x).compile().as_text()
    if jax.devices()[0].platform == "cpu":
        assert "ynn_fusion" not in text
