"""07_numerics: summation against exact references (math.fsum, ml_dtypes arithmetic in numpy),
the error ordering of the three sums, quantization round trips within their bounds, and the
rounding rule behind the pure-bf16 stall."""
import functools
import math
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import common

nm = common.import_script("07_numerics")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


SUMS = {m: jax.jit(f, static_argnums=1) for m, f in nm.SUMS.items()}  # compiled once per shape


def uniform(n, seed=0):
    return jnp.asarray(np.random.default_rng(seed).uniform(0.0, 1.0, n), jnp.float32)


# ---- summation -------------------------------------------------------------------------------

def numpy_sequential(x, dtype):
    """Reference: a Python loop in ml_dtypes scalars, each add rounded to `dtype`."""
    t = np.dtype(dtype).type
    s = t(0)
    for xi in np.asarray(x).astype(dtype):
        s = t(s + xi)
    return float(s)


def numpy_kahan(x, dtype):
    t = np.dtype(dtype).type
    s = c = t(0)
    for xi in np.asarray(x).astype(dtype):
        y = t(xi - c)
        u = t(s + y)
        c = t(t(u - s) - y)
        s = u
    return float(s)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float8_e5m2])
def test_sequential_and_kahan_round_every_add(dtype):
    """Bit-for-bit the same as the scalar loop: no add kept excess precision."""
    x = uniform(300, seed=1)
    assert float(SUMS["sequential"](x, dtype)) == numpy_sequential(x, dtype)
    assert float(SUMS["kahan"](x, dtype)) == numpy_kahan(x, dtype)


@pytest.mark.parametrize("n", [1, 7, 64, 1000])
def test_float32_sums_match_fsum(n):
    x = uniform(n, seed=2)
    ref = nm.exact_sum(x, jnp.float32)
    for name, fn in SUMS.items():
        assert float(fn(x, jnp.float32)) == pytest.approx(ref, rel=1e-5), name
    # Kahan is within two float32 roundings
    assert abs(float(SUMS["kahan"](x, jnp.float32)) - ref) <= 2 * 2**-24 * ref


def test_pairwise_pads_non_power_of_two():
    x = jnp.arange(1, 12, dtype=jnp.float32)  # 11 elements, sum 66, exact in any order
    assert float(SUMS["pairwise"](x, jnp.float32)) == 66.0
    assert float(SUMS["pairwise"](x, jnp.bfloat16)) == 66.0


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bf16_error_ordering(seed):
    """sequential > pairwise >= Kahan for bf16 accumulators (Higham 1993)."""
    x = uniform(2048, seed)
    ref = nm.exact_sum(x, jnp.bfloat16)
    got = {m: float(SUMS[m](x, jnp.bfloat16)) for m in ("sequential", "pairwise", "kahan")}
    err = {m: nm.relative_error(v, ref) for m, v in got.items()}
    assert err["sequential"] > err["pairwise"] >= err["kahan"]
    # the sequential sum stalls: from 256 on the bf16 half-ulp (1) exceeds every addend
    assert got["sequential"] <= 512
    # and Kahan's error is the final rounding's: within one bf16 ulp of the exact sum
    assert err["kahan"] <= 2 * nm.unit_roundoff(jnp.bfloat16)


def test_overflow_is_reported_as_inf():
    x = jnp.full((64,), 100.0, jnp.float32)  # sum 6400 > 448, the largest float8_e4m3fn
    assert nm.relative_error(SUMS["pairwise"](x, jnp.float8_e4m3fn), 6400.0) == math.inf


def test_unit_roundoff():
    assert nm.unit_roundoff(jnp.float32) == 2.0**-24
    assert nm.unit_roundoff(jnp.bfloat16) == 2.0**-8
    assert nm.unit_roundoff(jnp.float8_e4m3fn) == 2.0**-4


def test_fixed_point_sum_is_order_independent_and_accurate():
    x = uniform(1000, seed=3)
    rng = np.random.default_rng(0)
    sums = {float(nm.fixed_point_sum(x[rng.permutation(1000)], 20)) for _ in range(5)}
    assert len(sums) == 1
    assert sums.pop() == pytest.approx(nm.exact_sum(x, jnp.float32), abs=1000 * 2.0**-21)


# ---- quantization ----------------------------------------------------------------------------

def data(shape, seed=0, outliers=True):
    rng = np.random.default_rng(seed)
    if outliers:
        return jnp.asarray(nm.activation_like(rng, *shape, 0.05, 30.0))
    return jnp.asarray(nm.weight_like(rng, *shape))


@pytest.mark.parametrize("axis, block", [(None, None), (0, None), (1, None), (1, 16), (0, 8)])
def test_int8_round_trip_within_half_a_scale(axis, block):
    x = data((24, 48))
    q, scale = nm.quantize(x, "int8", axis, block)
    assert q.dtype == jnp.int8 and q.shape == x.shape
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127  # absmax lands on the largest code
    err = jnp.abs(nm.dequantize(q, scale, axis, block) - x)
    bound, _ = nm._grouped(jnp.ones_like(x), axis, block)
    bound = (bound * scale / 2).reshape(x.shape)            # each element's own scale / 2
    assert bool(jnp.all(err <= bound * (1 + 1e-6) + 1e-12))


@pytest.mark.parametrize("fmt, rel", [("e4m3", 2.0**-4), ("e5m2", 2.0**-3)])
@pytest.mark.parametrize("axis", [None, 1])
def test_fp8_round_trip_within_half_an_ulp(fmt, rel, axis):
    assert nm.FORMATS[fmt][1] == {"int8": 127.0, "e4m3": 448.0, "e5m2": 57344.0}[fmt]
    x = data((32, 64), seed=1)
    q, scale = nm.quantize(x, fmt, axis)
    dtype, qmax = nm.FORMATS[fmt]
    assert q.dtype == dtype
    assert float(jnp.max(jnp.abs(q.astype(jnp.float32)))) == qmax
    err = jnp.abs(nm.dequantize(q, scale, axis) - x)
    tiny = float(jnp.finfo(dtype).smallest_subnormal) / 2    # below the normals: absolute error
    bound = jnp.maximum(rel * jnp.abs(x), tiny * jnp.broadcast_to(scale, x.shape))
    assert bool(jnp.all(err <= bound * (1 + 1e-6)))


def test_finer_scales_give_smaller_errors_on_outlier_data():
    x = data((64, 256), seed=2)
    errs = [nm.rms_error(nm.round_trip(x, s, 1, 32), x)
            for s in ("int8 per tensor", "int8 per channel", "int8 per block")]
    assert errs[0] > errs[1] > errs[2]


def test_quantize_rejects_a_block_that_does_not_divide():
    with pytest.raises(common.UserError):
        nm.quantize(jnp.ones((4, 10)), "int8", axis=1, block=4)


def test_int8_matmul_equals_exact_integer_product():
    x, w = data((8, 64), seed=3), data((64, 16), seed=4, outliers=False)
    qx, sx = nm.quantize(x, "int8", axis=1)
    qw, sw = nm.quantize(w, "int8", axis=0)
    exact = (np.asarray(qx, np.int64) @ np.asarray(qw, np.int64)) * np.asarray(sx) * np.asarray(sw)
    np.testing.assert_allclose(np.asarray(nm.int8_matmul(x, w)), exact, rtol=1e-6)
    # and it approximates the float product to int8 accuracy
    assert nm.rms_error(nm.int8_matmul(x, w), np.asarray(x) @ np.asarray(w)) < 0.05


@pytest.mark.parametrize("scheme", list(nm.SCHEMES))
def test_scheme_matmuls_approximate_the_float64_product(scheme):
    x, w = data((16, 64), seed=5), data((64, 32), seed=6, outliers=False)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    err = nm.rms_error(nm.scheme_matmul(x, w, scheme, 16), ref)
    limit = {"bf16 (cast)": 1e-2, "e5m2 per tensor": 0.15}.get(scheme, 0.1)
    assert err < limit


def test_scheme_matmuls_gain_from_finer_scales_on_outlier_data():
    """Per channel (a scale per row of x) confines an outlier's coarse scale to its own row, and
    blocks further still: the products' errors fall in that order, in int8 as in e4m3."""
    x, w = data((16, 64), seed=5), data((64, 32), seed=6, outliers=False)
    ref = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    err = {s: nm.rms_error(nm.scheme_matmul(x, w, s, 16), ref) for s in nm.SCHEMES}
    assert err["int8 per tensor"] > err["int8 per channel"] > err["int8 per block"]
    assert err["e4m3 per tensor"] > err["e4m3 per channel"]


# ---- mixed precision -------------------------------------------------------------------------

@pytest.mark.parametrize("spec,xs,ws", [("btd,dhk->bthk", (2, 8, 32), (32, 4, 8)),
                                        ("bthk,hkd->btd", (2, 8, 4, 8), (4, 8, 32)),
                                        ("btf,fd->btd", (2, 8, 64), (64, 32))])
def test_fp8_einsum_and_its_gradients_run_in_fp8(spec, xs, ws):
    """Forward and both backward products take fp8 operands (e4m3 x e4m3, then e5m2 against
    e4m3), and the results stay within fp8's rounding of the float32 einsum: e4m3 keeps 3
    mantissa bits (relative error up to 2^-4 per value), e5m2 2 bits (2^-3)."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal(xs), jnp.bfloat16)
    w = jnp.asarray(0.1 * rng.standard_normal(ws), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal(jnp.einsum(spec, x, w).shape), jnp.float32)

    def loss(dot, a, b):
        return jnp.sum(ct * dot(spec, a, b).astype(jnp.float32))
    fp8 = jax.value_and_grad(functools.partial(loss, nm.fp8_einsum), argnums=(0, 1))
    exact = jax.value_and_grad(functools.partial(loss, jnp.einsum), argnums=(0, 1))
    (_, got), (_, want) = fp8(x, w), exact(x.astype(jnp.float32), w.astype(jnp.float32))
    y = nm.fp8_einsum(spec, x, w)
    y_want = jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    errors = [nm.rms_error(a.astype(jnp.float32), b) for a, b in [(y, y_want), *zip(got, want)]]
    assert all(0.005 < e < 0.1 for e in errors), errors       # rounded, but only as fp8 rounds
    assert [g.dtype for g in got] == [jnp.bfloat16, jnp.bfloat16]
    hlo = jax.jit(fp8).lower(x, w).as_text()
    operands = sorted(re.findall(r"dot_general.*: \(tensor<[^>]*x(\w+)>, tensor<[^>]*x(\w+)>\)",
                                 hlo))
    assert operands == [("f8E4M3FN", "f8E4M3FN"), ("f8E4M3FN", "f8E5M2"), ("f8E5M2", "f8E4M3FN")]


def test_delayed_scaling_is_current_scaling_when_the_recorded_maxima_are_current():
    """With last step's maxima equal to this step's, fp8_einsum_delayed computes what
    fp8_einsum does, bit for bit, and hands back this step's maxima as their cotangent. With
    maxima recorded smaller than the values, they saturate at the format's largest instead of
    overflowing."""
    rng = np.random.default_rng(1)
    spec = "btd,df->btf"
    x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.bfloat16)
    w = jnp.asarray(0.1 * rng.standard_normal((32, 16)), jnp.bfloat16)
    ct = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.bfloat16)

    def loss(dot, a, b, *amax):
        return jnp.sum((ct * dot(spec, a, b, *amax)).astype(jnp.float32))
    current = jax.value_and_grad(functools.partial(loss, nm.fp8_einsum), argnums=(0, 1))(x, w)
    seen = {k: jnp.max(jnp.abs(v)).astype(jnp.float32) for k, v in (("x", x), ("w", w),
                                                                    ("g", ct))}
    delayed = jax.value_and_grad(functools.partial(loss, nm.fp8_einsum_delayed),
                                 argnums=(0, 1, 2))(x, w, seen)
    np.testing.assert_array_equal(delayed[0], current[0])
    for got, want in zip(delayed[1][:2], current[1]):
        np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))
    assert {k: float(v) for k, v in delayed[1][2].items()} == {k: float(v) for k, v in seen.items()}
    low = {k: v / 4 for k, v in seen.items()}      # the values have grown 4x since the last step
    y = nm.fp8_einsum_delayed(spec, x, w, low)
    assert bool(jnp.all(jnp.isfinite(y)))
    assert float(jnp.max(jnp.abs(y))) <= float(jnp.max(jnp.abs(jnp.einsum(
        spec, jnp.clip(x.astype(jnp.float32), -low["x"], low["x"]),
        jnp.clip(w.astype(jnp.float32), -low["w"], low["w"]))))) * 1.2


def test_record_amax_einsum_is_the_plain_product_and_hands_back_the_maxima():
    """The calibration pass before delayed scaling's first step: the product and its gradients
    are jnp.einsum's, unquantized; amax's cotangent is the maxima of x, w and the incoming
    gradient, whatever amax held."""
    rng = np.random.default_rng(2)
    spec = "btd,df->btf"
    x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((32, 16)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    amax = {k: jnp.float32(0.0) for k in "xwg"}
    y, vjp = jax.vjp(lambda a, b, m: nm.record_amax_einsum(spec, a, b, m), x, w, amax)
    want_y, want_vjp = jax.vjp(lambda a, b: jnp.einsum(spec, a, b), x, w)
    np.testing.assert_array_equal(y, want_y)
    dx, dw, seen = vjp(ct)
    for got, want in zip((dx, dw), want_vjp(ct)):  # the same sums, maybe in another order
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert {k: float(v) for k, v in seen.items()} == {
        k: float(jnp.max(jnp.abs(v))) for k, v in (("x", x), ("w", w), ("g", ct))}


def test_quantize_keeps_tiny_groups_and_shows_a_nan():
    """A group of tiny values (amax / qmax below float32's smallest normal number, which a CPU
    flushes to 0) still quantizes and comes back, where a scale of 0 gave NaN; a NaN in a group
    makes its scale NaN, visible, where a fallback scale of 1 clipped its other values."""
    tiny = jnp.array([1e-36, -5e-37, 2e-37], jnp.float32)
    for fmt in ("int8", "e4m3", "e5m2"):
        q, scale = nm.quantize(tiny, fmt)
        back = nm.dequantize(q, scale)
        assert bool(jnp.all(jnp.isfinite(back))), fmt
        np.testing.assert_allclose(back, tiny, rtol=0.15)
        q, scale = nm.quantize(jnp.array([1.0, 2.0, jnp.nan, 1000.0]), fmt)
        assert bool(jnp.isnan(scale).all()), fmt
    x = jnp.full((2, 8), 1e-37, jnp.float32)   # was NaN; the product of the scales underflows
    y = nm.fp8_einsum("ab,bc->ac", x, jnp.ones((8, 3), jnp.float32))
    assert bool(jnp.all(jnp.isfinite(y))) and float(jnp.max(jnp.abs(y))) < 1e-36


def test_numerics_helpers_refuse_what_they_cannot_do():
    x = jnp.ones((4, 8), jnp.float32)
    for call, match in ((lambda: nm.quantize(x, "int8", axis=2), "axis=2 is out of range"),
                        (lambda: nm.quantize(x, "int8", axis=1, block=0), "block=0"),
                        (lambda: nm.quantize(x[:0], "int8"), "nothing to quantize"),
                        (lambda: nm.fp8_einsum("ab,bc", x, x.T), "explicit output"),
                        (lambda: nm.fp8_einsum("ab,bc->ac", x.astype(jnp.float16),
                                               x.T.astype(jnp.float16)), "bfloat16 or float32"),
                        (lambda: nm.fp8_einsum("ab,bc->ac", x.astype(jnp.int32),
                                               x.T.astype(jnp.int32)), "bfloat16 or float32"),
                        (lambda: nm.fp8_einsum("ab,bc->ac", x, x.T.astype(jnp.bfloat16)),
                         "give both one dtype"),
                        (lambda: nm.quantize(x, "fp4"), "fmt must be one of")):
        with pytest.raises(common.UserError, match=match):
            call()
    # The sums run along the first axis of any array; a sum that cancels to 0 is measured.
    v = jnp.asarray(np.random.default_rng(0).uniform(size=(5, 3)), jnp.float32)
    for name, fn in nm.SUMS.items():
        np.testing.assert_allclose(fn(v, jnp.float32), v.sum(axis=0), rtol=1e-6, err_msg=name)
    assert nm.relative_error(0.0, 0.0) == 0.0 and nm.relative_error(1e-9, 0.0) == math.inf
    # Sums through inf: IEEE's answer is the reference, and a method that gets it has no error
    assert math.isnan(nm.exact_sum(jnp.array([jnp.inf, -jnp.inf]), "float32"))
    assert nm.exact_sum(jnp.array([1.0, jnp.inf]), "float32") == math.inf
    assert nm.relative_error(math.inf, math.inf) == 0.0
    assert nm.relative_error(-math.inf, math.inf) == math.inf
    assert nm.relative_error(math.nan, math.nan) == 0.0  # exact_sum is NaN for inf - inf
    assert nm.relative_error(1.0, math.nan) == math.inf
    # record_amax_einsum's gradients come back in each operand's own dtype
    amax = {k: jnp.float32(0) for k in "xwg"}
    dx, dw = jax.grad(lambda a, b: nm.record_amax_einsum("ab,bc->ac", a, b, amax).sum(),
                      argnums=(0, 1))(x.astype(jnp.bfloat16), x.T)
    assert (dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.float32)


def test_half_gap_of_bf16():
    p = jnp.array([1.0, 1.0, 0.02, -3.0], jnp.float32)
    u = jnp.array([-1e-9, 1e-9, 1e-9, 1e-9], jnp.float32)  # up from 1, down from 1, ...
    g = np.asarray(nm.half_gap(p, u))
    assert g[0] == 2.0**-8            # above 1.0 the bf16 spacing is 2^-7
    assert g[1] == 2.0**-9            # below 1.0 it is 2^-8
    assert g[2] == 2.0**-14           # 0.02 lies in [2^-6, 2^-5): spacing 2^-13
    assert g[3] == 2.0**-7            # -3 moves toward -inf by p - u: spacing 2^-6


def test_updates_below_half_gap_are_lost_in_bf16():
    """The rule the training printout relies on: round(p - u) == p exactly when |u| < half_gap."""
    rng = np.random.default_rng(0)
    p = jnp.asarray(rng.normal(0, 0.05, 20000).astype(ml_dtypes.bfloat16))
    u = rng.normal(0, 1, 20000) * 10.0 ** rng.uniform(-7, -2, 20000)  # from tiny to large
    u = jnp.asarray(u, jnp.float32)
    lost = np.asarray(nm.apply_update(p, u) == p)
    pred = np.asarray(jnp.abs(u) < nm.half_gap(p, u))
    tie = np.asarray(jnp.abs(u) == nm.half_gap(p, u))
    assert 0.1 < pred.mean() < 0.9       # both outcomes occur
    np.testing.assert_array_equal(lost[~tie], pred[~tie])
    # in float32 storage the same updates survive
    assert not np.asarray(nm.apply_update(p.astype(jnp.float32), u) == p.astype(jnp.float32))[
        np.asarray(jnp.abs(u) > 1e-6)].any()


def test_pure_bf16_loses_the_updates_master_weights_keep():
    """One optimizer step from the same weights and gradients, stored in bf16 and in float32."""
    cfg = nm.NumericsConfig(steps=100, lr=1e-3)
    model = common.Config.preset("tiny")
    rng = np.random.default_rng(1)

    def init(spec):  # common.init_params' distribution, drawn by numpy (nothing to compile)
        if spec.init == "ones":
            return jnp.ones(spec.shape, jnp.float32)
        return jnp.asarray(spec.scale * rng.standard_normal(spec.shape), jnp.float32)

    master = jax.tree.map(init, common.param_specs(model),
                          is_leaf=lambda x: isinstance(x, common.ParamSpec))
    grads = jax.tree.map(lambda p: jnp.asarray(1e-3 * rng.standard_normal(p.shape), jnp.float32),
                         master)
    decay = jnp.ones(sum(p.size for p in jax.tree.leaves(master)), jnp.float32)
    out = {}
    for mode in ("bf16 pure", "bf16 + f32 master"):
        param_dtype, dtype, _ = nm.MODES[mode]
        w, unravel = ravel_pytree(jax.tree.map(lambda p: p.astype(param_dtype), master))
        g = jax.tree.map(lambda x: x.astype(dtype), grads)  # gradients of the bf16 copy
        update = nm.make_update_fn(cfg, unravel, decay, dtype)
        new, compute, _, stats = update(w, nm.opt_init(w), g)
        assert new.dtype == param_dtype
        assert all(c.dtype == jnp.bfloat16 for c in jax.tree.leaves(compute))
        assert jax.tree.map(jnp.shape, compute) == jax.tree.map(jnp.shape, master)
        out[mode] = (w, new, stats)
    _, _, pure = out["bf16 pure"]
    old, new, kept = out["bf16 + f32 master"]
    # AdamW's first step moves every weight by about lr_0 = 1e-4 (warmup's first tenth of 1e-3):
    # more than half a bf16 ulp at |w| < 2^-5, less above, and far less than at the norm gains (1.0)
    assert float(pure["lost"]) > 0.05
    assert float(pure["lost"]) == pytest.approx(float(pure["below_half_ulp"]), abs=1e-3)
    assert float(kept["below_half_ulp"]) == pytest.approx(float(pure["below_half_ulp"]), abs=1e-2)
    assert float(kept["lost"]) == 0.0
    # weights with no gradient and no decay do not move: not updates, so none lost
    param_dtype, dtype, _ = nm.MODES["bf16 + f32 master"]
    w, unravel = ravel_pytree(jax.tree.map(lambda p: p.astype(param_dtype), master))
    flat, unravel_g = ravel_pytree(jax.tree.map(lambda x: x.astype(dtype), grads))
    half = flat.size // 2
    update = nm.make_update_fn(cfg, unravel, decay.at[:half].set(0), dtype)
    stats = update(w, nm.opt_init(w), unravel_g(flat.at[:half].set(0)))[3]
    assert float(stats["lost"]) == 0.0
    # the float32 master moved by the whole step: on the first one Adam's m_hat / sqrt(v_hat) is
    # sign(g), so |delta| = lr_0 * |sign(g) + wd * w|, within 2% of lr_0 for |w| < 0.2 (where |g|
    # is not so small that Adam's epsilon, 1e-8, counts)
    delta = np.asarray(old) - np.asarray(new)
    g_flat = np.asarray(ravel_pytree(jax.tree.map(lambda x: x.astype(jnp.bfloat16), grads))[0],
                        np.float32)
    big = (np.abs(g_flat) > 1e-6) & (np.abs(np.asarray(old)) < 0.2)
    np.testing.assert_allclose(np.abs(delta)[big], float(pure["lr"]), rtol=2e-2)
    assert big.mean() > 0.95


def test_config_rejects_bad_values():
    with pytest.raises(common.UserError):
        nm.NumericsConfig(optimizer="lion")
    with pytest.raises(common.UserError):
        nm.NumericsConfig(dim=100, block=64)
    with pytest.raises(common.UserError):
        nm.NumericsConfig(n=0)
    for lr in (1e-45, 1e-37):  # the cosine's end subnormal or 0 in float32: every lr printed 0
        with pytest.raises(common.UserError, match="above 0 in float32"):
            nm.NumericsConfig(lr=lr)
    nm.NumericsConfig(lr=0.0)  # 0: the optimizer's default
    with pytest.raises(common.UserError, match="outlier_scale in"):    # NaN tables past 1e38
        nm.NumericsConfig(outlier_scale=1e39)


def test_a_diverged_run_is_said_not_compared(capsys):
    """Losses that went NaN make the precision comparison meaningless: the report says where it
    diverged and what to change, and gives no stall explanation."""
    ok = {"loss": np.array([3.0, 2.5]), "lr": np.array([1e-3, 1e-4]), "lost": np.zeros(2)}
    bad = dict(ok, loss=np.array([3.0, np.nan]))
    nm.report_stall({mode: bad if mode == "bf16 pure" else ok for mode in nm.MODES},
                    nm.NumericsConfig(steps=2, lr=1e6))
    out = capsys.readouterr().out
    assert "diverged (the loss not finite from step 2 in bf16 pure): lower --lr" in out
    assert "Why:" not in out


@pytest.mark.parametrize("steps, window", [(1, 1), (5, 2), (12, 6), (40, 10)])
def test_plot_training_smooths_short_runs_over_a_shorter_window(steps, window, tmp_path,
                                                                monkeypatch):
    """A run shorter than two 10-step windows is smoothed over half its length: the loss panel
    holds the running means of `window` steps, one per step from step `window` on."""
    figure = pytest.importorskip("matplotlib.figure")
    drawn = {}
    monkeypatch.setattr(figure.Figure, "savefig",
                        lambda fig, path, **kw: drawn.update(lines=fig.axes[0].get_lines()))
    loss = np.arange(steps, dtype=np.float64) ** 2
    h = {"loss": loss, "lost": np.zeros(steps), "below_half_ulp": np.zeros(steps),
         "lr": np.linspace(1.0, 0.1, steps)}
    path = str(tmp_path / "mixed_precision.png")
    assert nm.plot_training({mode: h for mode in nm.MODES}, path) == path
    x, y = drawn["lines"][0].get_data()
    np.testing.assert_array_equal(x, np.arange(window, steps + 1))
    np.testing.assert_allclose(y, [loss[i:i + window].mean() for i in range(steps - window + 1)])


def test_cli_refuses_a_file_as_out_before_the_experiments(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "07_numerics.py"), f"--out={a_file}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --out={a_file} is a file, not a directory"
    assert "summing" not in r.stdout  # refused before the first experiment


def test_sizes_past_the_memory_are_refused_before_any_array(monkeypatch):
    monkeypatch.setattr(common, "memory_limit", lambda: (16e9, "a test's memory"))
    nm.resolve(nm.NumericsConfig(), on_cpu=False)  # the GPU defaults fit in 16 GB
    for kw, match in [({"n": 10**9}, "^n=1000000000 needs 32 GB for the summed vector"),
                      ({"dim": 2**15}, "^rows=2048 dim=32768 needs 29 GB for the quantization"),
                      ({"mm_size": 2**16}, "^mm_size=65536 needs 51.5 GB for the speed test"),
                      ({"seq_len": 2 * 10**6, "batch_size": 1},
                       "^batch_size=1 seq_len=2000000 needs 3.84e\\+05 GB for part 3's")]:
        with pytest.raises(common.UserError, match=match + ".* more than the 16 GB of a test's"):
            nm.resolve(nm.NumericsConfig(**kw), on_cpu=False)
    with pytest.raises(common.UserError, match=r"^steps must be < 2\*\*31"):
        nm.resolve(nm.NumericsConfig(steps=2**31), on_cpu=False)


def test_fixed_point_sum_rounds_each_value_to_the_nearest_step():
    """Each value goes to the nearest multiple of 2^-frac_bits (truncation would bias the sum
    down by half a step per value)."""
    x = uniform(1000, seed=4)
    want = np.sum(np.round(np.asarray(x, np.float64) * 2.0**20).astype(np.int64)) / 2.0**20
    assert float(nm.fixed_point_sum(x, 20)) == pytest.approx(want, abs=1e-4)
    assert float(nm.fixed_point_sum(jnp.array([0.9, 0.8], jnp.float32), 1)) == 2.0


def test_fp8_per_channel_matmul_scales_each_output_column():
    """A weight column 1e-4 times the others: with one scale for the tensor its values fall in
    e4m3's subnormals (or to 0); with a scale per output column they keep e4m3's 2^-4."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 64)).astype(np.float32)
    w = rng.standard_normal((64, 8)).astype(np.float32)
    w[:, 0] *= 1e-4
    want = x.astype(np.float64) @ w.astype(np.float64)
    col = lambda y: nm.rms_error(np.asarray(y)[:, 0], want[:, 0])
    per_channel = col(nm.fp8_matmul(jnp.asarray(x), jnp.asarray(w), "e4m3", per_channel=True))
    per_tensor = col(nm.fp8_matmul(jnp.asarray(x), jnp.asarray(w), "e4m3", per_channel=False))
    assert per_channel < 0.05 < per_tensor


def test_delayed_scaling_hands_back_this_steps_maxima_not_the_recorded_ones():
    rng = np.random.default_rng(3)
    spec = "btd,df->btf"
    x = jnp.asarray(rng.standard_normal((2, 8, 32)), jnp.float32)
    w = jnp.asarray(0.1 * rng.standard_normal((32, 16)), jnp.float32)
    ct = jnp.asarray(rng.standard_normal((2, 8, 16)), jnp.float32)
    stale = {k: jnp.float32(0.5) for k in "xwg"}
    _, vjp = jax.vjp(lambda a, b, m: nm.fp8_einsum_delayed(spec, a, b, m), x, w, stale)
    seen = vjp(ct)[2]
    assert {k: float(v) for k, v in seen.items()} == {
        k: float(jnp.max(jnp.abs(v))) for k, v in (("x", x), ("w", w), ("g", ct))}


def test_lr_schedule_peaks_at_the_end_of_warmup_and_ends_at_a_tenth():
    cfg = nm.NumericsConfig(steps=100, lr=1e-3)  # warmup: 10 steps
    lr = [float(nm.lr_at(jnp.int32(s), cfg)) for s in range(101)]
    assert lr[0] == pytest.approx(1e-4) and lr[9] == pytest.approx(1e-3)
    assert lr[10] == pytest.approx(1e-3) and max(lr) == pytest.approx(1e-3)
    assert lr[100] == pytest.approx(1e-4)
    assert all(a >= b for a, b in zip(lr[10:], lr[11:]))


def test_sgd_is_plain_sgd():
    cfg = nm.NumericsConfig(optimizer="sgd", lr=0.5)
    g = jnp.asarray([1.0, -2.0, 0.25], jnp.float32)
    w = jnp.asarray([3.0, 3.0, 3.0], jnp.float32)
    u, state = nm.opt_updates(g, nm.opt_init(w), w, 0.5, cfg, jnp.ones(3))
    np.testing.assert_array_equal(u, 0.5 * g)
    assert int(state["count"]) == 1


def test_weight_decay_spares_the_norm_gains(monkeypatch):
    """train() decays the matrices and not the norms' gains: caught where it builds the update."""
    class Built(Exception):
        pass

    def capture(cfg, unravel, decay, dtype):
        raise Built(unravel(decay))
    monkeypatch.setattr(nm, "make_update_fn", capture)
    with pytest.raises(Built) as e:
        nm.train("float32", nm.NumericsConfig(steps=1, batch_size=1, seq_len=8), None, 1, {})
    decay = e.value.args[0]
    for name in ("attn_norm", "mlp_norm"):
        assert not np.asarray(decay["layers"][name]).any()
    assert not np.asarray(decay["final_norm"]).any()
    assert np.asarray(decay["layers"]["wq"]).all() and np.asarray(decay["embed"]).all()
