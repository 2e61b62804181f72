"""Every user error is one clear line that says what was wrong and what was expected."""

import re

import jax
import jax.numpy as jnp
import pytest
import zoo

import lora_jax
from lora_jax import LoraError, LoraSpec


def _raises(match, fn, *args, **kw):
    with pytest.raises(LoraError) as info:
        fn(*args, **kw)
    msg = str(info.value)
    assert "\n" not in msg, msg
    assert re.search(match, msg), msg


def _init(case, **spec_kw):
    spec = LoraSpec(**{"targets": case.targets, "rank": 2, **spec_kw})
    return lora_jax.init(jax.random.key(0), case.fn, case.params, *case.args, spec=spec)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(rank=0), r"rank=0; expected a positive integer"),
        (dict(rank=-3), r"rank=-3; expected a positive integer"),
        (dict(alpha=0.0), r"alpha=0.0; expected a number > 0"),
        (dict(alpha=-1), r"alpha=-1; expected a number > 0"),
        (dict(scaling="sqrt"), r"scaling='sqrt'; expected one of"),
        (dict(init="zeros"), r"init='zeros'; expected one of"),
        (dict(dropout=1.0), r"dropout=1.0; expected 0 <= dropout < 1"),
        (dict(targets="(unclosed"), r"not a valid regex"),
        (dict(targets=[]), r"targets is empty"),
        (dict(rank_pattern={"w1": 0}), r"rank_pattern\['w1'\]=0; expected a positive integer"),
    ],
)
def test_bad_spec_values(kw, match):
    _raises(match, LoraSpec, **{"targets": "w1", **kw})


def test_targets_matching_nothing_show_closest_paths():
    case = zoo.linen_block()
    _raises(r"target '\.\*/qeury/kernel' matches no parameter; closest paths: .*query/kernel",
            _init, case, targets=r".*/qeury/kernel")


def test_one_of_several_targets_matching_nothing_is_refused():
    case = zoo.plain_mlp()
    _raises(r"target 'w9' matches no parameter", _init, case, targets=["w0", "w9"])


def test_patterns_matching_nothing():
    case = zoo.plain_mlp()
    _raises(r"rank_pattern key 'W1' matches no targeted parameter", _init, case, rank_pattern={"W1": 2})
    _raises(r"alpha_pattern key 'w7' matches no targeted parameter", _init, case, alpha_pattern={"w7": 2.0})


def test_rank_larger_than_the_weight_allows():
    case = zoo.plain_mlp()  # w2 maps 12 -> 2
    _raises(r"rank 3 for 'w2' exceeds what its 12x2 map allows \(at most 2\)", _init, case, rank=3)


def test_target_never_used_by_the_function():
    case = zoo.plain_mlp()
    params = {**case.params, "unused": jnp.ones((4, 4))}
    spec = LoraSpec(targets="unused", rank=1)
    _raises(r"target 'unused' matches a parameter that the function never uses",
            lora_jax.init, jax.random.key(0), case.fn, params, *case.args, spec=spec)


def test_adapters_that_do_not_fit_the_params():
    case = zoo.plain_mlp()
    ad = _init(case)
    other = {k: jnp.ones((v.shape[0] + 1, v.shape[1])) for k, v in case.params.items()}
    _raises(r"adapter for 'w0' has A \(5, 2\), B \(2, 12\); weight \(6, 12\) needs A \(6, 2\)",
            lora_jax.apply, case.fn, other, ad, *case.args)
    _raises(r"adapter for 'w0' has no matching weight in params",
            lora_jax.apply, case.fn, {"v": case.params["w1"]}, ad, *case.args)


def test_adapters_that_do_not_fit_the_function():
    params = {"w": jax.random.normal(jax.random.key(0), (4, 3, 5))}
    x = jnp.ones((2, 4, 3))
    over_first = lambda p, x: jnp.einsum("bij,ikl->bjkl", x, p["w"])
    over_two = lambda p, x: jnp.einsum("bij,ijk->bk", x, p["w"])
    ad = lora_jax.init(jax.random.key(0), over_first, params, x, spec=LoraSpec("w", rank=2))
    _raises(r"adapter for 'w' factors W over axes \[0\], but here W is contracted over axes "
            r"\[0, 1\]; create the adapter with lora_jax.init on this function",
            lora_jax.apply, over_two, params, ad, x)


def test_weight_reaching_an_unfactorable_op():
    case = zoo.plain_mlp()
    spec = LoraSpec(targets="w0", rank=2)
    fn = lambda p, x: case.fn({**p, "w0": p["w0"][:, ::-1]}, x)
    _raises(r"weight 'w0' reaches '(rev|gather|slice)', which LoRA cannot factor; "
            r"pass allow_materialize=True", lora_jax.init, jax.random.key(0), fn, case.params,
            *case.args, spec=spec)


def test_weight_returned_by_the_function():
    case = zoo.plain_mlp()
    ad = _init(case, targets="w0")
    _raises(r"fn returns the adapted weight 'w0' itself", lora_jax.apply,
            lambda p, x: (case.fn(p, x), p["w0"]), case.params, ad, *case.args)


def test_weight_carried_through_a_loop():
    case = zoo.plain_mlp()
    ad = _init(case, targets="w1")

    def fn(p, x):
        def body(i, carry):
            h, w = carry
            return jnp.tanh(h @ w), w.T  # not loop-invariant, so it stays a carry

        h, _ = jax.lax.fori_loop(0, 2, body, (jnp.tanh(x @ p["w0"]), p["w1"]))
        return h @ p["w2"]

    _raises(r"weight 'w1' leaves '(while|scan)' as a loop carry", lora_jax.apply, fn,
            case.params, ad, *case.args)


def test_params_with_a_non_array_leaf():
    case = zoo.plain_mlp()
    spec = LoraSpec(targets=r"w\d", rank=2)
    bad = {**case.params, "act": lambda x: x}
    _raises(r"params leaf 'act' is a function, not an array; pass only the arrays as params",
            lora_jax.init, jax.random.key(0), case.fn, bad, *case.args, spec=spec)
    ad = _init(case)
    _raises(r"params leaf 'name' is a str, not an array", lora_jax.apply, case.fn,
            {**case.params, "name": "mlp"}, ad, *case.args)


def test_unpartitioned_equinox_module():
    eqx = pytest.importorskip("equinox")
    mlp = eqx.nn.MLP(3, 2, 4, 1, key=jax.random.key(0))
    _raises(r"params leaf 'activation' is a .*, not an array; pass only the arrays as params \(e.g. "
            r"eqx.partition", lora_jax.init, jax.random.key(0), lambda m, x: m(x), mlp,
            jnp.ones(3), spec=LoraSpec(targets=r".*weight", rank=1))


def test_grouped_conv_says_why():
    w = jax.random.normal(jax.random.key(0), (3, 3, 2, 8))
    x = jnp.ones((1, 5, 5, 8))

    def conv(p, x):
        return jax.lax.conv_general_dilated(x, p["w"], (1, 1), "SAME", feature_group_count=4,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    _raises(r"weight 'w' reaches 'conv_general_dilated' \(a grouped conv with feature_group_count=4: "
            r"each group would need its own adapter\), which LoRA cannot factor",
            lora_jax.init, jax.random.key(0), conv, {"w": w}, x, spec=LoraSpec(targets="w", rank=2))


def test_weight_changed_in_a_remat_result_is_followed_but_a_changed_carry_is_not():
    case = zoo.plain_mlp()

    def fn(p, x):  # the remat hands w0 back unchanged: fine
        w0, h = jax.checkpoint(lambda w, x: (w, jnp.tanh(x @ w)))(p["w0"], x)
        return case.fn({**p, "w0": w0}, x) + h.sum()

    _init(zoo.Case(fn, case.params, case.args, r"w\d"))

    def loop(p, x):
        w, h = jax.lax.fori_loop(0, 2, lambda i, c: (c[0] * 2.0, jnp.tanh(c[1] @ c[0] @ c[0].T)),
                                 (p["w1"], jnp.tanh(x @ p["w0"])))
        return h @ p["w2"]

    _raises(r"weight 'w1' leaves '(while|scan)' as a loop carry that '(while|scan)' changes",
            _init, zoo.Case(loop, case.params, case.args, r"w\d"))
