"""Per-family XLA compile options: YNNPACK fusions off for BERT on CPU, nowhere else."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

import lora_jax
from lora_jax import trainer
from lora_jax.models import from_config
from lora_jax.models.compile_options import compiler_options
from tests.test_train import tiny

BERT = {"architectures": ["BertModel"], "model_type": "bert", "vocab_size": 64, "hidden_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64,
        "max_position_embeddings": 32, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
LLAMA = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 64,
         "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 4,
         "num_key_value_heads": 4, "rms_norm_eps": 1e-5, "max_position_embeddings": 64}
OFF = {"xla_cpu_experimental_ynn_fusion_type": ""}


def test_only_bert_on_cpu_gets_options():
    assert compiler_options("bert", "cpu") == OFF
    assert compiler_options("llama", "cpu") == {}
    assert compiler_options("bert", "gpu") == {} and compiler_options("bert", "tpu") == {}
    assert from_config(BERT, seed=0).compiler_options == OFF
    assert from_config(LLAMA, seed=0).compiler_options == {}


def _compiled_text(model, options) -> str:
    ids = jnp.arange(64, dtype=jnp.int32).reshape(4, 16) % 64
    spec = lora_jax.LoraSpec(rank=4, targets=(".*query.*kernel", ".*value.*kernel"))
    adapters = lora_jax.init(jax.random.key(0), model.fn, model.params, ids, spec=spec)

    def loss(a):
        return jnp.sum(lora_jax.apply(model.fn, model.params, a, ids) ** 2)

    return jax.jit(jax.grad(loss), compiler_options=options).lower(adapters).compile().as_text()


def test_bert_step_compiles_without_ynnpack_fusions():
    model = from_config(BERT, seed=0)
    assert "__ynn_fusion" in _compiled_text(model, {})  # jaxlib's default uses them on this step
    assert "__ynn_fusion" not in _compiled_text(model, model.compiler_options)


def test_main_job_compiles_step_and_forward_with_the_tasks_options(tmp_path, monkeypatch):
    seen, jit, build = [], jax.jit, trainer.build_task

    def recording_jit(*args, **kwargs):
        seen.append(kwargs.get("compiler_options"))
        return jit(*args, **kwargs)

    def task_with_options(*args, **kwargs):
        return dataclasses.replace(build(*args, **kwargs), compiler_options=OFF)

    monkeypatch.setattr(jax, "jit", recording_jit)
    monkeypatch.setattr(trainer, "build_task", task_with_options)
    trainer.train_and_evaluate(tiny(steps=3, ckpt_every=3, log_every=1), str(tmp_path))
    assert seen.count(OFF) == 2  # the train step and the evaluation forward


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_unknown_platform_gets_none(family):
    assert compiler_options(family, "metal") == {}
