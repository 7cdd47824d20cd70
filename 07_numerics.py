"""Numerics: what low precision costs, and where it is safe.

    python 07_numerics.py                      # about a minute on CPU
    python 07_numerics.py --n=65536 --steps=500 --optimizer=sgd

Fewer bits are faster: a bf16 matmul runs at many times the float32 rate, and fp8 / int8 at up to
twice bf16, while every byte saved is bandwidth saved. The price is rounding error, and the lesson
measures where it bites, in three parts.

1. Summing a vector in float32, bfloat16, float16 and fp8 accumulators, three ways by hand
   beside jnp.sum's own reduction: sequentially (lax.scan, one rounding per add: error grows
   like n * u, and stalls outright once the sum's half-ulp exceeds the addends), pairwise (a
   tree: log2(n) * u) and Kahan's compensated sum (about 2u, independent of n). Errors against
   the exact float64 sum of the same inputs. Then the order dependence: float addition is not
   associative, so a shuffled vector sums to different bits; reproducible bits need a fixed
   reduction order, or exact (integer) accumulation.
2. Quantization: int8 absmax with one scale per tensor, per channel and per block, and fp8
   (e4m3, e5m2) with a per-tensor scale, on weight-like data and on activation-like data with
   outlier channels; the error of int8 and fp8 matmuls against bf16; and, where the device has
   the units, their speed against bf16.
3. Mixed precision in training: a few hundred steps of the tiny model in float32 (whose
   matmuls JAX runs in TF32 on an NVIDIA GPU, its default precision), in pure bf16
   (weights stored in bf16) and in bf16 compute with float32 master weights. An update smaller
   than half a bf16 ulp of its weight rounds away to nothing; the script counts how many do.
   Then 8-bit training: the same master weights with every layer's matmul, forward and
   backward, on fp8 inputs (fp8_einsum: e4m3 activations and weights, e5m2 gradients, a scale
   per tensor), the loss it costs against bf16's. 09_train.py --fp8=true trains with it and
   times it on a GPU.

References: Higham, "The accuracy of floating point summation", SIAM J. Sci. Comput. 1993 (error
bounds of recursive, pairwise and compensated sums); Kahan, "Further remarks on reducing
truncation errors", CACM 1965; Micikevicius et al., "Mixed Precision Training", ICLR 2018
(float32 master weights, section 3.1); Micikevicius et al., "FP8 Formats for Deep Learning", 2022
(e4m3 and e5m2); Dettmers et al., "LLM.int8()", NeurIPS 2022 (outlier features, section 4);
DeepSeek-AI, "DeepSeek-V3 Technical Report", 2024, section 3.3 (fine-grained fp8 block scaling).
"""
import dataclasses
import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

import common

roofline = common.import_script("01_roofline")


@dataclasses.dataclass(frozen=True)
class NumericsConfig:
    n: int = 4096                 # length of the summed vector
    shuffles: int = 16            # random orders for the order-dependence experiment
    rows: int = 0                 # tokens of activation data; 0: 2048 (512 on CPU)
    dim: int = 0                  # K = N of the weight data; 0: 4096 (512 on CPU)
    block: int = 128              # per-block scaling: elements per block along the contraction dim
    outlier_frac: float = 0.01    # fraction of activation channels that carry outliers
    outlier_scale: float = 50.0   # their magnitude relative to the rest (LLM.int8, section 4)
    mm_size: int = 0              # n of the bf16 / fp8 / int8 speed test; 0: 8192 (512 on CPU)
    steps: int = 0                # training steps per precision mode; 0: 300 (200 on CPU)
    batch_size: int = 0           # sequences per step; 0: 16 (8 on CPU)
    seq_len: int = 0              # tokens per sequence; 0: 128 (64 on CPU)
    optimizer: str = "adamw"      # adamw or sgd
    lr: float = 0.0               # peak learning rate; 0: 1e-3 for adamw, 0.5 for sgd
    seed: int = 0                 # of every random input and the model's init
    iters: int = 0                # timed runs per matmul; 0: 10 (3 on CPU)
    out: str = "out"              # directory for the loss-curve PNG

    def __post_init__(self):
        for f in ("n", "shuffles", "block"):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("rows", "dim", "mm_size", "iters", "steps", "batch_size", "seq_len"):
            if getattr(self, f) < 0:
                raise common.UserError(f"{f} must be >= 0 (0 picks a size for the device)")
        if self.dim and self.dim % self.block:
            raise common.UserError(f"block={self.block} must divide dim={self.dim}")
        if not 0 <= self.outlier_frac < 1 or not 0 < self.outlier_scale <= 1e6:
            # (LLM.int8's outlier features are some 20x the rest; at 1e37 the float32
            # products of such channels overflow)
            raise common.UserError("outlier_frac must be in [0, 1) and outlier_scale in "
                                   "(0, 1e6]")
        if self.optimizer not in ("adamw", "sgd"):
            raise common.UserError(f"optimizer must be adamw or sgd, got {self.optimizer!r}")
        if not 0 <= self.lr < math.inf or 0 < self.lr * 0.1 < np.finfo(np.float32).tiny:
            raise common.UserError(f"lr must be > 0 (or 0 for the optimizer's default), and its "
                                   f"tenth (the cosine's end) above 0 in float32; got {self.lr}")


def resolve(cfg, on_cpu):
    auto = dict(rows=512, dim=512, mm_size=512, iters=3, steps=200, batch_size=8, seq_len=64) \
        if on_cpu else dict(rows=2048, dim=4096, mm_size=8192, iters=10, steps=300,
                            batch_size=16, seq_len=128)
    auto["lr"] = 1e-3 if cfg.optimizer == "adamw" else 0.5
    cfg = dataclasses.replace(cfg, **{k: getattr(cfg, k) or v for k, v in auto.items()})
    if cfg.dim % cfg.block:
        raise common.UserError(f"block={cfg.block} must divide dim={cfg.dim}")
    if cfg.steps >= 2**31:  # the step number travels as an int32
        raise common.UserError(f"steps must be < 2**31, got {cfg.steps}")
    # Sizes that cannot fit are refused before the first array (XLA aborts the process on a
    # shape past 2^63 elements): float64 references on the host, quantized copies beside them.
    common.check_fits(f"n={cfg.n}", 4 * 8 * cfg.n, "the summed vector in float64 and its copies")
    common.check_fits(f"shuffles={cfg.shuffles} n={cfg.n}", 8 * cfg.shuffles * cfg.n,
                      "the order experiment's permutations of the vector")
    common.check_fits(f"rows={cfg.rows} dim={cfg.dim}",
                      8 * (6 * cfg.rows * cfg.dim + 3 * cfg.dim * cfg.dim),
                      "the quantization test's float64 activations, weight and their copies")
    common.check_fits(f"mm_size={cfg.mm_size}", 3 * 4 * cfg.mm_size**2,
                      "the speed test's operands and product")
    tiny, B, T = common.Config.preset("tiny"), cfg.batch_size, cfg.seq_len
    common.check_fits(f"batch_size={B} seq_len={T}",
                      4 * 3 * (tiny.n_layers * B * tiny.n_heads * T * T + B * T * tiny.vocab_size),
                      "part 3's float32 attention scores and probabilities, kept for the "
                      "backward pass, their gradients, and the logits")
    return cfg


# ----------------------------------------------------------------------------------------------
# 1. Summation
# ----------------------------------------------------------------------------------------------

ACCUMULATORS = ("float32", "bfloat16", "float16", "float8_e5m2", "float8_e4m3fn")


def add_in(dtype, a, b):
    """a + b rounded once to `dtype`, as an adder of that width returns it. The float32 sum of two
    narrower floats is exact (or so far from a rounding tie that rounding it again changes
    nothing), so rounding it to `dtype` gives the correctly rounded sum. The optimization barrier
    keeps XLA from skipping the rounding: by default it may keep excess precision
    (--xla_allow_excess_precision) when a value is rounded down and widened again."""
    s = a.astype(jnp.float32) + b.astype(jnp.float32)
    return jax.lax.optimization_barrier(s.astype(dtype))


def sequential_sum(x, dtype):
    """((x0 + x1) + x2) + ...: one rounding per add, the error bound grows like n * u (Higham
    1993, eq. 2.6); once |sum| * u exceeds the addends, adding them changes nothing."""
    def step(acc, xi):
        return add_in(dtype, acc, xi), None
    acc, _ = jax.lax.scan(step, jnp.zeros(x.shape[1:], dtype), x.astype(dtype))
    return acc


def pairwise_sum(x, dtype):
    """A balanced tree of adds: each input passes through log2(n) roundings, not n. Zeros pad the
    length to a power of two (adding zero is exact)."""
    x = x.astype(dtype)
    n = x.shape[0]
    x = jnp.pad(x, [(0, (1 << max(n - 1, 0).bit_length()) - n)] + [(0, 0)] * (x.ndim - 1))
    while x.shape[0] > 1:
        x = add_in(dtype, x[0::2], x[1::2])
    return x[0]


def kahan_sum(x, dtype):
    """Compensated summation (Kahan 1965): c carries the low part that the last add rounded off,
    and is subtracted from the next addend. Error about 2u + O(n u^2), independent of n to first
    order; every operation here is rounded to `dtype`, c included."""
    def step(carry, xi):
        s, c = carry
        y = add_in(dtype, xi, -c)
        t = add_in(dtype, s, y)
        c = add_in(dtype, add_in(dtype, t, -s), -y)  # (t - s) - y: what the add lost, negated
        return (t, c), None
    zero = jnp.zeros(x.shape[1:], dtype)
    (s, _), _ = jax.lax.scan(step, (zero, zero), x.astype(dtype))
    return s


def library_sum(x, dtype):
    """jnp.sum on an array of `dtype`. JAX widens bfloat16 and float16 to float32 for the reduction
    and rounds only the result (jax.jit(jnp.sum).lower(x).as_text() shows the convert); the fp8
    types XLA:CPU reduces as they are, in fp8, and XLA:GPU in float16. The barrier keeps the
    inputs rounded to `dtype` first (without it XLA:GPU sums the float32 inputs themselves:
    other numbers than the reference's)."""
    return jnp.sum(jax.lax.optimization_barrier(x.astype(dtype)), axis=0)


SUMS = {"sequential": sequential_sum, "pairwise": pairwise_sum, "kahan": kahan_sum,
        "jnp.sum": library_sum}


def exact_sum(x, dtype):
    """The exact sum, as float64, of x rounded to `dtype` (math.fsum is exactly rounded): the
    reference that isolates the accumulation error from the rounding of the inputs. Inputs that
    hold inf or NaN sum to what IEEE arithmetic gives them (inf + -inf is NaN)."""
    values = np.asarray(jnp.asarray(x).astype(dtype).astype(jnp.float32), np.float64)
    if not np.isfinite(values).all():  # (fsum raises on inf + -inf)
        with np.errstate(invalid="ignore"):
            return float(np.sum(values))
    return math.fsum(values)


def relative_error(value, reference):
    value = float(value)
    if value == reference or math.isnan(value) and math.isnan(reference):
        return 0.0  # an exact sum, an infinite one got right, or NaN where the true sum is
    if math.isnan(reference):  # (inf - inf): no number is right
        return math.inf
    if not math.isfinite(value):
        return math.inf
    if reference == 0:  # (an empty sum, or one that cancels): exact, or infinitely far
        return 0.0 if value == 0 else math.inf
    return abs(value - reference) / abs(reference)


def unit_roundoff(dtype):
    """u = 2^-(mantissa bits + 1): the largest relative error of one rounding to nearest."""
    return 2.0 ** -(jnp.finfo(dtype).nmant + 1)


def fixed_point_sum(x, frac_bits):
    """Sum with exact integer arithmetic: x rounded to multiples of 2^-frac_bits, added as int32.
    Integer addition is associative (even wrapping modulo 2^32, as long as the total fits), so the
    result is bit-identical in any order."""
    q = jnp.round(x * 2.0**frac_bits).astype(jnp.int32)
    return jnp.sum(q, dtype=jnp.int32).astype(jnp.float32) / 2.0**frac_bits


def run_summation(cfg):
    rng = np.random.default_rng(cfg.seed)
    x = jnp.asarray(rng.uniform(0.0, 1.0, cfg.n), jnp.float32)
    sums = {name: jax.jit(fn, static_argnums=1) for name, fn in SUMS.items()}
    n = cfg.n
    print(f"\n1. summing n={n} values from uniform(0, 1): relative error against the exact sum of "
          f"the same inputs\n   bounds to first order: sequential n*u, pairwise log2(n)*u, "
          f"Kahan 2u + O(n*u^2) (u: unit\n   roundoff; the second term rules once n*u is not "
          f"small, as in fp8); 'rounded': the exact sum rounded once\n   to the "
          f"accumulator, the best any method can return; 'inf': an overflow past 'max'"
          f"\n   (to inf, or to NaN in e4m3fn, which has no inf)")
    print(f"   {'accumulator':14s} {'u':>8s} {'max':>8s} " + " ".join(f"{m:>11s}" for m in SUMS)
          + f" {'rounded':>9s} {'exact sum':>10s}")
    table = {}
    for dtype in ACCUMULATORS:
        ref = exact_sum(x, dtype)
        errs = {m: relative_error(sums[m](x, dtype), ref) for m in SUMS}
        table[dtype] = errs
        best = relative_error(jnp.asarray(ref, jnp.float32).astype(dtype), ref)
        print(f"   {dtype:14s} {unit_roundoff(dtype):8.1e} {float(jnp.finfo(dtype).max):8.0e} "
              + " ".join(f"{errs[m]:11.2e}" for m in SUMS) + f" {best:9.2e} {ref:10.2f}")

    # Order dependence: the same numbers in other orders.
    perms = [rng.permutation(n) for _ in range(cfg.shuffles)]
    frac_bits = 30 - math.ceil(math.log2(n))  # n values below 1 sum to < 2^30: no int32 overflow
    fixed = jax.jit(fixed_point_sum, static_argnums=1)
    results = {"sequential f32": [sums["sequential"](x[p], jnp.float32) for p in perms],
               "pairwise f32": [sums["pairwise"](x[p], jnp.float32) for p in perms],
               "kahan f32": [sums["kahan"](x[p], jnp.float32) for p in perms],
               "jnp.sum f32": [jnp.sum(x[p]) for p in perms],
               f"fixed point 2^-{frac_bits}": [fixed(x[p], frac_bits) for p in perms]}
    ref = exact_sum(x, jnp.float32)
    print(f"\n   order: {cfg.shuffles} shuffles of the same vector (exact sum {ref:.6f})")
    print(f"   {'method':22s} {'distinct results':>16s} {'spread / sum':>13s}")
    for name, vals in results.items():
        v = np.array([float(r) for r in vals])
        print(f"   {name:22s} {len(set(v.tolist())):16d} {(v.max() - v.min()) / ref:13.1e}")
    again = float(sums["pairwise"](x, jnp.float32)) == float(sums["pairwise"](x, jnp.float32))
    print(f"   the same order twice gives the same bits: {again}. Bit-reproducible sums need a "
          f"fixed order (the same\n   program, shapes and device count; on GPUs no kernel that "
          f"adds in arrival order, such as atomic\n   scatter-adds: XLA_FLAGS="
          f"--xla_gpu_deterministic_ops=true rules them out) or exact accumulation, like the\n"
          f"   fixed-point sum.")
    return table


# ----------------------------------------------------------------------------------------------
# 2. Quantization
# ----------------------------------------------------------------------------------------------

# name -> (storage dtype, largest magnitude the format holds)
FORMATS = {"int8": (jnp.int8, 127.0),
           "e4m3": (jnp.float8_e4m3fn, float(jnp.finfo(jnp.float8_e4m3fn).max)),   # 448
           "e5m2": (jnp.float8_e5m2, float(jnp.finfo(jnp.float8_e5m2).max))}       # 57344


def _grouped(x, axis, block):
    """x viewed as groups that share one scale, and the axes to reduce within a group.
    axis=None: the whole tensor; block=None: all of `axis` (per-channel); else `block`
    consecutive elements along `axis`, x reshaped [..., K/block, block, ...]."""
    if x.size == 0:
        raise common.UserError(f"nothing to quantize: x has shape {x.shape}")
    if axis is None:
        return x, tuple(range(x.ndim))
    if not -x.ndim <= axis < x.ndim:
        raise common.UserError(f"axis={axis} is out of range for x of shape {x.shape}")
    axis = axis % x.ndim
    if block is None:
        return x, (axis,)
    K = x.shape[axis]
    if block < 1 or K % block:
        raise common.UserError(f"block={block} does not divide the dimension of size {K}")
    return x.reshape(x.shape[:axis] + (K // block, block) + x.shape[axis + 1:]), (axis + 1,)


def quantize(x, fmt, axis=None, block=None):
    """Absmax quantization: (q, scale) with x ~= q * scale, scale = max|x| / qmax per group, so
    the largest element of each group lands on the format's largest value. int8 rounds to the
    nearest integer (error <= scale / 2); fp8 rounds to the nearest fp8 value (relative error
    <= 2^-4 for e4m3, 2^-3 for e5m2, down to the subnormals). A group whose largest magnitude is
    below qmax x float32's smallest normal (1.5e-36 for int8) keeps the scale at that floor
    (_scale) and lands below qmax, coarser; float32's subnormals quantize to 0."""
    if fmt not in FORMATS:
        raise common.UserError(f"quantize: fmt must be one of {', '.join(FORMATS)}, got {fmt!r}")
    dtype, qmax = FORMATS[fmt]
    xg, red = _grouped(x.astype(jnp.float32), axis, block)
    amax = jnp.max(jnp.abs(xg), axis=red, keepdims=True)
    scale = _scale(amax, qmax)
    y = xg / scale
    if fmt == "int8":
        q = jnp.clip(jnp.round(y), -qmax, qmax).astype(dtype)
    else:
        q = y.astype(dtype)
    return q.reshape(x.shape), scale


def _scale(amax, qmax):
    """amax / qmax, or 1 for a group of zeros. Never below float32's smallest normal number,
    which a group of tiny values (amax < 448 x 1.2e-38) would flush to 0, and 0 / 0 is NaN. A
    NaN or inf in the group stays visible: its scale is NaN or inf, and every value of the
    group dequantizes to NaN."""
    return jnp.where(amax == 0, 1.0, jnp.maximum(amax / qmax, jnp.finfo(jnp.float32).tiny))


def dequantize(q, scale, axis=None, block=None):
    qg, _ = _grouped(q.astype(jnp.float32), axis, block)
    return (qg * scale).reshape(q.shape)


def int8_matmul(x, w):
    """x [M, K] @ w [K, N] in int8 with int32 accumulation, one scale per row of x (token) and
    per column of w (output channel): both scales sit outside the sum over K and factor out."""
    qx, sx = quantize(x, "int8", axis=1)                             # [M, K], [M, 1]
    qw, sw = quantize(w, "int8", axis=0)                             # [K, N], [1, N]
    acc = jnp.dot(qx, qw, preferred_element_type=jnp.int32)          # [M, N] exact
    return acc.astype(jnp.float32) * sx * sw


def fp8_matmul(x, w, fmt="e4m3", per_channel=False):
    """x @ w on fp8 inputs, the product rounded to bf16 (an fp8 matmul's usual output type; the
    tensor cores accumulate in a wider type), then scaled in float32: per-tensor or per-row /
    per-column scales, applied after the sum. Returns float32."""
    axes = (1, 0) if per_channel else (None, None)
    qx, sx = quantize(x, fmt, axis=axes[0])
    qw, sw = quantize(w, fmt, axis=axes[1])
    acc = jnp.dot(qx, qw, preferred_element_type=jnp.bfloat16)
    return acc.astype(jnp.float32) * sx * sw


def blocked_matmul(x, w, fmt, block):
    """Block-scaled x @ w: a scale per `block` elements along K, so each block's partial sum has
    its own scale product. Written by dequantizing first (the same products, summed in float32);
    a block-scaled kernel applies the scales per K-block inside its loop (DeepSeek-V3, 3.3)."""
    qx, sx = quantize(x, fmt, axis=1, block=block)
    qw, sw = quantize(w, fmt, axis=0, block=block)
    return jnp.dot(dequantize(qx, sx, 1, block), dequantize(qw, sw, 0, block),
                   precision=jax.lax.Precision.HIGHEST)


def bf16_matmul(x, w):
    return jnp.dot(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16),
                   preferred_element_type=jnp.float32)


# fp8 training (Micikevicius et al. 2022, "FP8 Formats"): every matmul of the forward and backward
# passes on fp8 inputs. Weights and activations in e4m3 (more mantissa), gradients in e5m2 (more
# range: they span more orders of magnitude), each tensor with one scale computed from its own
# current max ("current scaling"; Transformer Engine's default instead reuses the maxima of past
# steps, "delayed scaling", below, to save waiting on the pass that finds the max). On an H100 the
# 1B step of 09_train.py runs at 1.17x bf16 with current scaling and 1.22x with delayed
# scaling (--fp8_scaling=delayed; BENCHMARKS.md).

@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_einsum(spec, x, w):
    """jnp.einsum(spec, x, w) for two operands, each quantized to e4m3 with a per-tensor scale; its
    gradient quantizes the incoming gradient to e5m2 and runs both backward products in fp8 too. The
    products' outputs come back in x's dtype (the tensor cores accumulate fp8 products in a wider
    type, nominally float32, though DeepSeek-V3, section 3.3.2, measures only about 14 bits kept on
    Hopper); the scales multiply afterwards, outside the sum. x and w share one dtype."""
    return _fp8_einsum_fwd(spec, x, w)[0]


def _operands(spec):
    """"btd,dhk->bthk" -> ("btd", "dhk", "bthk")."""
    try:
        ins, out = spec.replace(" ", "").split("->")
        a, b = ins.split(",")
    except ValueError:
        raise common.UserError(f"the fp8 einsums take two operands and an explicit output, "
                               f"as 'btd,df->btf'; got {spec!r}") from None
    return a, b, out


def _check_fp8_inputs(name, spec, x, w):
    """Both operands of one float dtype, and not float16: the products of two fp8 values reach
    448^2, past float16's largest (65504), where the output is summed in the inputs' dtype."""
    _operands(spec)
    if x.dtype != w.dtype:
        raise common.UserError(f"{name}: x is {x.dtype}, w is {w.dtype}; give both one dtype")
    if not jnp.issubdtype(x.dtype, jnp.floating) or x.dtype == jnp.float16:
        raise common.UserError(f"{name} takes bfloat16 or float32 inputs, got {x.dtype}")


def _fp8_einsum_fwd(spec, x, w):
    _check_fp8_inputs("fp8_einsum", spec, x, w)
    qx, sx = quantize(x, "e4m3")
    qw, sw = quantize(w, "e4m3")
    y = jnp.einsum(spec, qx, qw, preferred_element_type=x.dtype)
    return y * (sx * sw).reshape(()).astype(x.dtype), (qx, sx, qw, sw)  # residuals: fp8 + scales


def _fp8_einsum_bwd(spec, res, g):
    """For y = einsum("a,b->o", x, w): dx = einsum("o,b->a", g, w), dw = einsum("a,o->b", x, g),
    each on the saved fp8 operands and the e5m2 gradient (e4m3 x e5m2: a pair the fp8 units
    take; two e5m2 operands they do not)."""
    qx, sx, qw, sw = res
    a, b, o = _operands(spec)
    qg, sg = quantize(g, "e5m2")
    dx = jnp.einsum(f"{o},{b}->{a}", qg, qw, preferred_element_type=g.dtype)
    dw = jnp.einsum(f"{a},{o}->{b}", qx, qg, preferred_element_type=g.dtype)
    return (dx * (sg * sw).reshape(()).astype(g.dtype),
            dw * (sx * sg).reshape(()).astype(g.dtype))


fp8_einsum.defvjp(_fp8_einsum_fwd, _fp8_einsum_bwd)


# Delayed scaling: each tensor's scale comes from its maximum as recorded at the step before, so
# the conversion to fp8 need not wait for a pass over the tensor; this step's maxima are still
# found, for the next step. The scales live outside the function, as state of the training loop:
# amax = {"x": ..., "w": ..., "g": ...}, float32 scalars, one such dict per matmul of the model
# (common.forward's dot_state carries them, layer by layer).
# They go in as an argument and their "gradient" comes back as this step's maxima, so the step
# that takes gradients gets the new maxima with them (as Flax's fp8 layers do) and stores them
# instead of stepping along them. A value past the recorded maximum saturates at the format's
# largest; a maximum of 0 means a scale of 1. Before the first step nothing is recorded, and
# scales of 1 are far off: the gradient of a first step so taken on the small preset points
# 0.70 (cosine) the way bf16's does and is 7.5% zeros, against 0.99 and none with current
# scaling. So 09_train.py first runs one forward and backward pass through record_amax_einsum,
# which quantizes nothing and records the maxima the first step's scales then come from.

def delayed_amax(n_layers):
    """common.forward's dot_state for fp8_einsum_delayed before the first step: no maximum
    recorded yet, for each weight matmul of each layer."""
    return {name: {k: jnp.zeros((n_layers,), jnp.float32) for k in ("x", "w", "g")}
            for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def fp8_einsum_delayed(spec, x, w, amax):
    """fp8_einsum with the scales from `amax`, the maxima of x, w and the incoming gradient
    recorded at an earlier step. Its VJP returns, as amax's cotangent, this step's maxima."""
    return _fp8_delayed_fwd(spec, x, w, amax)[0]


def _saturate(x, fmt, amax):
    """x in fp8 with the scale a recorded maximum gives: (q, scale), values past it clipped."""
    dtype, qmax = FORMATS[fmt]
    scale = _scale(amax, qmax)
    return jnp.clip(x.astype(jnp.float32) / scale, -qmax, qmax).astype(dtype), scale


def _amax(x):
    return jnp.max(jnp.abs(x)).astype(jnp.float32)


def _fp8_delayed_fwd(spec, x, w, amax):
    _check_fp8_inputs("fp8_einsum_delayed", spec, x, w)
    qx, sx = _saturate(x, "e4m3", amax["x"])
    qw, sw = _saturate(w, "e4m3", amax["w"])
    y = jnp.einsum(spec, qx, qw, preferred_element_type=x.dtype)
    return (y * (sx * sw).astype(x.dtype),
            (qx, sx, qw, sw, amax["g"], {"x": _amax(x), "w": _amax(w)}))


def _fp8_delayed_bwd(spec, res, g):
    qx, sx, qw, sw, amax_g, seen = res
    qg, sg = _saturate(g, "e5m2", amax_g)
    a, b, o = _operands(spec)
    dx = jnp.einsum(f"{o},{b}->{a}", qg, qw, preferred_element_type=g.dtype)
    dw = jnp.einsum(f"{a},{o}->{b}", qx, qg, preferred_element_type=g.dtype)
    return (dx * (sg * sw).astype(g.dtype), dw * (sx * sg).astype(g.dtype),
            dict(seen, g=_amax(g)))


fp8_einsum_delayed.defvjp(_fp8_delayed_fwd, _fp8_delayed_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def record_amax_einsum(spec, x, w, amax):
    """jnp.einsum(spec, x, w), unquantized, with fp8_einsum_delayed's signature: its VJP returns
    the maxima of x, w and the incoming gradient as amax's cotangent (amax's value is unused).
    One pass through it before training gives delayed scaling its first recorded maxima."""
    return jnp.einsum(spec, x, w)


def _record_fwd(spec, x, w, amax):
    _operands(spec)
    return jnp.einsum(spec, x, w), (x, w)


def _record_bwd(spec, res, g):
    x, w = res
    a, b, o = _operands(spec)
    return (jnp.einsum(f"{o},{b}->{a}", g, w).astype(x.dtype),
            jnp.einsum(f"{a},{o}->{b}", x, g).astype(w.dtype),
            {"x": _amax(x), "w": _amax(w), "g": _amax(g)})


record_amax_einsum.defvjp(_record_fwd, _record_bwd)


def weight_like(rng, K, N):
    """[K, N]: heavy-tailed (Student t, 4 degrees of freedom) with channels of different scale,
    like a trained layer's weights, std about 0.02."""
    w = rng.standard_t(4, (K, N)) / math.sqrt(2)
    return (0.02 * w * rng.lognormal(0.0, 0.5, (1, N))).astype(np.float32)


def activation_like(rng, M, K, outlier_frac, outlier_scale):
    """[M, K]: unit normal, except a few feature channels that are `outlier_scale` times larger in
    every token (the systematic outlier features of LLM.int8, section 4)."""
    x = rng.standard_normal((M, K))
    cols = rng.choice(K, max(1, int(outlier_frac * K)), replace=False) if outlier_frac else []
    x[:, cols] *= outlier_scale
    return x.astype(np.float32)


def rms_error(approx, exact):
    """||approx - exact|| / ||exact||, in float64."""
    a, e = np.asarray(approx, np.float64), np.asarray(exact, np.float64)
    return float(np.linalg.norm(a - e) / np.linalg.norm(e))


# scheme -> (format, granularity); granularity: None per tensor, "channel", or "block"
SCHEMES = {"bf16 (cast)": (None, None),
           "int8 per tensor": ("int8", None),
           "int8 per channel": ("int8", "channel"),
           "int8 per block": ("int8", "block"),
           "e4m3 per tensor": ("e4m3", None),
           "e4m3 per channel": ("e4m3", "channel"),
           "e5m2 per tensor": ("e5m2", None)}


def round_trip(x, scheme, axis, block):
    fmt, gran = SCHEMES[scheme]
    if fmt is None:
        return x.astype(jnp.bfloat16).astype(jnp.float32)
    ax = None if gran is None else axis
    blk = block if gran == "block" else None
    return dequantize(*quantize(x, fmt, ax, blk), ax, blk)


def scheme_matmul(x, w, scheme, block):
    fmt, gran = SCHEMES[scheme]
    if fmt is None:
        return bf16_matmul(x, w)
    if gran == "block":
        return blocked_matmul(x, w, fmt, block)
    if fmt == "int8" and gran == "channel":
        return int8_matmul(x, w)
    if fmt == "int8":  # per tensor: one scale each, still an int8 x int8 -> int32 product
        qx, sx = quantize(x, "int8")
        qw, sw = quantize(w, "int8")
        return jnp.dot(qx, qw, preferred_element_type=jnp.int32).astype(jnp.float32) * sx * sw
    return fp8_matmul(x, w, fmt, per_channel=gran == "channel")


def run_quantization(cfg):
    rng = np.random.default_rng(cfg.seed + 1)
    K = N = cfg.dim
    w = weight_like(rng, K, N)
    x = activation_like(rng, cfg.rows, K, cfg.outlier_frac, cfg.outlier_scale)
    x_clean = activation_like(rng, cfg.rows, K, 0.0, 1.0)
    y_ref = x.astype(np.float64) @ w.astype(np.float64)
    y_clean = x_clean.astype(np.float64) @ w.astype(np.float64)
    wj, xj, xcj = jnp.asarray(w), jnp.asarray(x), jnp.asarray(x_clean)
    print(f"\n2. quantization: relative RMS error ||q - x|| / ||x||. weights [{K}, {N}] t(4) with "
          f"per-channel scales;\n   activations [{cfg.rows}, {K}] normal, with and without "
          f"{cfg.outlier_frac:.0%} of channels x{cfg.outlier_scale:g}; channel = output column of "
          f"W, token row of X;\n   block = {cfg.block} along K; matmul X @ W against float64")
    print(f"   {'scheme':18s} {'weights':>9s} {'acts':>9s} {'acts+outl':>9s} {'X@W':>9s} "
          f"{'X@W outl':>9s}")
    table = {}
    rt = jax.jit(round_trip, static_argnums=(1, 2, 3))
    mm = jax.jit(scheme_matmul, static_argnums=(2, 3))
    for scheme in SCHEMES:
        errs = [rms_error(rt(wj, scheme, 0, cfg.block), w),
                rms_error(rt(xcj, scheme, 1, cfg.block), x_clean),
                rms_error(rt(xj, scheme, 1, cfg.block), x)]
        try:  # the device's own low-precision dot: int8 -> int32, fp8 -> bf16
            errs += [rms_error(mm(xcj, wj, scheme, cfg.block), y_clean),
                     rms_error(mm(xj, wj, scheme, cfg.block), y_ref)]
        except (RuntimeError, ValueError, NotImplementedError) as e:  # no kernel for the pair
            print(f"   {scheme}: no matmul on this device ({str(e).splitlines()[0][:70]})")
            errs += [math.nan, math.nan]
        table[scheme] = errs
        print(f"   {scheme:18s} " + " ".join(f"{e:9.2e}" for e in errs))
    return table


def run_matmul_speed(cfg):
    """bf16 against fp8 and int8 at mm_size^3, next to the datasheet (where the chip is known)."""
    chip = common.device_chip()
    ds = roofline.datasheet_flops(chip)
    n = cfg.mm_size
    print(f"\n   speed, {n}^3 matmuls (fp8 -> bf16 out, int8 -> int32 out), median of {cfg.iters}:")
    print(f"   {'dtype':14s} {'measured':>14s} {'datasheet':>14s} {'meas/ds':>8s} {'vs bf16':>8s}")
    rates = {}
    for dtype in ("bfloat16", "float8_e4m3fn", "int8"):
        try:
            rates[dtype] = roofline.measure_matmul(dtype, n, cfg.iters)
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            print(f"   {dtype:14s} {'unsupported':>14s} ({str(e).splitlines()[0][:60]})")
            continue
        d = ds.get(dtype) or 0
        unit = "TOP/s  " if dtype == "int8" else "TFLOP/s"    # integer multiply-adds
        ds_text = (f"{d / 1e12:8.1f} {unit} {rates[dtype] / d:8.0%}" if d
                   else f"{'-':>14s} {'-':>8s}")
        print(f"   {dtype:14s} {rates[dtype] / 1e12:8.2f} {unit} {ds_text}"
              + f" {rates[dtype] / rates.get('bfloat16', math.nan):7.2f}x")
    return rates


# ----------------------------------------------------------------------------------------------
# 3. Mixed precision training
# ----------------------------------------------------------------------------------------------

# mode -> (weight storage dtype, compute dtype, fp8 matmuls)
MODES = {"float32": ("float32", "float32", False),
         "bf16 pure": ("bfloat16", "bfloat16", False),
         "bf16 + f32 master": ("float32", "bfloat16", False),
         "fp8 + f32 master": ("float32", "bfloat16", True)}    # fp8_einsum in every layer


def half_gap(p, u, dtype=jnp.bfloat16):
    """Half the distance from p (stored in `dtype`) to its neighbour in the direction p - u moves:
    an update u with |u| below it rounds back to p. (Below a power of two the spacing halves, so
    the neighbour on that side is the one that counts.)"""
    p = p.astype(dtype)
    nxt = jnp.nextafter(p, jnp.where(u > 0, -jnp.inf, jnp.inf).astype(dtype))
    return 0.5 * jnp.abs(nxt.astype(jnp.float32) - p.astype(jnp.float32))


def apply_update(p, u):
    """p - u computed in float32, stored back in p's dtype: in bf16, |u| < half_gap is lost."""
    return (p.astype(jnp.float32) - u).astype(p.dtype)


def opt_init(w):
    zeros = jnp.zeros(w.shape, jnp.float32)
    return {"mu": zeros, "nu": zeros, "count": jnp.zeros((), jnp.int32)}


def opt_updates(g, state, w, lr, cfg, decay, wd=0.1, b1=0.9, b2=0.95):
    """The step u each weight takes (w_new = w - u), in float32, for AdamW (Loshchilov & Hutter
    2019) or plain SGD. g, w, decay: [P], all weights of the model as one vector. The optimizer
    state stays float32 in every mode: only where the weights live changes."""
    g = g.astype(jnp.float32)
    count = state["count"] + 1
    if cfg.optimizer == "sgd":
        return lr * g, dict(state, count=count)
    mu = b1 * state["mu"] + (1 - b1) * g
    nu = b2 * state["nu"] + (1 - b2) * g * g
    m_hat, v_hat = mu / (1 - b1**count), nu / (1 - b2**count)
    u = lr * (m_hat / (jnp.sqrt(v_hat) + 1e-8) + wd * decay * w.astype(jnp.float32))
    return u, {"mu": mu, "nu": nu, "count": count}


def lr_at(step, cfg):
    """Linear warmup over 10% of the steps, then cosine decay to 10% of the peak: the small late
    steps are the ones pure bf16 loses."""
    warm = max(1, cfg.steps // 10)
    frac = jnp.clip((step - warm) / max(1, cfg.steps - warm), 0.0, 1.0)
    return jnp.where(step < warm, cfg.lr * (step + 1) / warm,
                     cfg.lr * (0.1 + 0.45 * (1 + jnp.cos(jnp.pi * frac))))


def make_grad_fn(model_cfg, fp8=False):
    """Loss and gradients with the weights given in the compute dtype. Mixed precision computes
    the gradients of a bf16 copy of the master weights, so the pure-bf16 and master-weight modes
    share this program, and the gradients arrive in bf16 in both. fp8: the layers' matmuls, and
    their gradients', through fp8_einsum (the output head stays bf16, as fp8 recipes keep it)."""
    dot = fp8_einsum if fp8 else None

    def loss_fn(params, x, y):
        return common.cross_entropy(common.forward(params, x, model_cfg, dot=dot), y)
    return jax.jit(jax.value_and_grad(loss_fn))


def make_update_fn(cfg, unravel, decay, compute_dtype):
    """One optimizer step on the stored weights w [P] (one vector: jax.flatten_util.ravel_pytree
    of the params, unravel its inverse), the share of updates that vanish, and the new weights as
    a params pytree in the compute dtype for the next forward pass."""
    @jax.jit
    def update(w, opt, grads):
        g, _ = ravel_pytree(grads)                             # [P], in the compute dtype
        lr = lr_at(opt["count"], cfg)
        u, opt = opt_updates(g, opt, w, lr, cfg, decay)
        new = apply_update(w, u)
        moved = jnp.sum(u != 0)
        # Updates that would vanish if the weights were stored in bf16 (in every mode) ...
        small = jnp.sum((u != 0) & (jnp.abs(u) < half_gap(w, u)))
        # ... and those that did vanish: the stored weight did not change.
        lost = jnp.sum((u != 0) & (new == w))
        compute = jax.tree.map(lambda a: a.astype(compute_dtype), unravel(new))
        return new, compute, opt, {"lr": lr, "below_half_ulp": small / moved, "lost": lost / moved}

    return update


def train(mode, cfg, data, log_every, grad_fns, model_cfg=None):
    """`steps` steps in one precision mode of the model (the tiny preset by default); grad_fns
    caches the gradient program per compute dtype. Every mode starts from the same float32
    initialization, rounded to its storage dtype."""
    param_dtype, dtype, fp8 = MODES[mode]
    model_cfg = model_cfg or common.Config.preset("tiny")
    model_cfg = dataclasses.replace(model_cfg, param_dtype=param_dtype, dtype=dtype,
                                    max_seq_len=max(model_cfg.max_seq_len, cfg.seq_len))
    init_cfg = dataclasses.replace(model_cfg, param_dtype="float32", dtype="float32")
    # impl="rbg": XLA's own random bit generator, far quicker to compile on a CPU than threefry
    key = jax.random.key(cfg.seed, impl="rbg")
    params = jax.jit(common.init_params, static_argnums=0)(init_cfg, key)
    params = jax.tree.map(lambda p: p.astype(param_dtype), params)
    w, unravel = ravel_pytree(params)                          # [P] in the storage dtype
    decay, _ = ravel_pytree(jax.tree.map(  # weight decay on matrices, not on the norm gains
        lambda axes, p: jnp.full(p.shape, float("norm" not in axes)),
        common.logical_axes(model_cfg), params, is_leaf=lambda a: isinstance(a, tuple)))
    compute = jax.tree.map(lambda p: p.astype(dtype), params)
    if (dtype, fp8) not in grad_fns:
        grad_fns[dtype, fp8] = make_grad_fn(dataclasses.replace(model_cfg, param_dtype=dtype), fp8)
    grad_fn, update = grad_fns[dtype, fp8], make_update_fn(cfg, unravel, decay, dtype)
    opt = opt_init(w)
    history = []
    for step in range(cfg.steps):
        x, y = common.get_batch(data, step, cfg.batch_size, cfg.seq_len, cfg.seed)
        loss, grads = grad_fn(compute, x, y)
        w, compute, opt, m = update(w, opt, grads)
        history.append(dict(m, loss=loss))
        if (step + 1) % log_every == 0 or step == 0:
            m = jax.device_get(history[-1])
            print(f"   {mode:18s} step {step + 1:4d} | loss {m['loss']:.4f} | lr {m['lr']:.1e} | "
                  f"below half-ulp {m['below_half_ulp']:6.1%} | lost {m['lost']:6.1%}")
    history = {k: np.array([float(h[k]) for h in history]) for k in history[0]}
    return history


def run_training(cfg):
    train_tokens, _ = common.load_corpus(max_bytes=2**21)
    print(f"\n3. mixed precision: tiny preset, {cfg.steps} steps of {cfg.optimizer} (peak lr "
          f"{cfg.lr:g}, cosine to 10%), batch {cfg.batch_size} x {cfg.seq_len} bytes of Python "
          f"source;\n   'below half-ulp': updates smaller than half the bf16 spacing at their "
          f"weight; 'lost': updates after which the stored weight did not change" + (
              "\n   float32's matmuls run in TF32 here (JAX's default precision on this GPU)"
              if jax.devices()[0].platform == "gpu" else ""))
    log_every = max(1, cfg.steps // 5)
    grad_fns = {}
    return {mode: train(mode, cfg, train_tokens, log_every, grad_fns) for mode in MODES}


def report_stall(histories, cfg):
    """Where pure bf16 falls behind, and why: the step from which it loses most updates, the loss
    gap at the end, and the arithmetic of one lost update. A run whose loss went NaN or inf says
    so instead: it diverged, and the comparison means nothing."""
    diverged = {mode: int(np.argmin(np.isfinite(h["loss"]))) + 1
                for mode, h in histories.items() if not np.isfinite(h["loss"]).all()}
    if diverged:
        print("\n   diverged (the loss not finite from step " + ", ".join(
            f"{s} in {m}" for m, s in diverged.items()) + f"): lower --lr ({cfg.lr:g} here); "
            f"the comparison of precisions below means nothing")
        return
    pure, f32 = histories["bf16 pure"], histories["float32"]
    master = histories["bf16 + f32 master"]
    tail = max(1, cfg.steps // 10)
    lost = np.convolve(pure["lost"], np.ones(tail) / tail, mode="valid")
    over = np.nonzero(lost > 0.5)[0]
    w = 0.02  # a typical weight (the init's std)
    half = float(half_gap(jnp.float32(w), jnp.float32(1.0)))
    moves = ("Adam moves a weight by lr * |m / sqrt(v)|, rarely more than lr" if cfg.optimizer
             == "adamw" else "SGD moves a weight by lr * |g|, and most |g| are far below 1")
    since = ""
    if len(over):
        step = over[0] + tail  # the last step of the first window past one half
        since = f"; more than half from step {step} on (lr {pure['lr'][step - 1]:.1e})"
    print(f"\n   pure bf16 lost {pure['lost'][-tail:].mean():.0%} of its updates over the last "
          f"{tail} steps{since}.\n   There its mean loss minus float32's is "
          f"{(pure['loss'] - f32['loss'])[-tail:].mean():+.4f}; bf16 compute with float32 "
          f"master weights gives {(master['loss'] - f32['loss'])[-tail:].mean():+.4f}, "
          f"and with every layer's matmul in fp8 too "
          f"{(histories['fp8 + f32 master']['loss'] - f32['loss'])[-tail:].mean():+.4f}.\n"
          f"   Why: w = {w} lies in [2^-6, 2^-5), where bf16 values are 2^-13 apart; an update "
          f"below half that, {half:.1e},\n   rounds back to w. {moves}, so as the learning rate "
          f"decays"
          f"\n   (to {cfg.lr * 0.1:.0e}) "
          f"ever more updates fall below the line. The float32 master keeps every update and\n"
          f"   rounds only the copy the forward pass reads (Micikevicius et al. 2018, "
          f"section 3.1).")


def plot_training(histories, path, window=10):
    """Three panels: the loss curves, each mode's loss minus float32's (smoothed over `window`
    steps, fewer in a run shorter than 2 windows), and the share of updates lost to rounding
    beside the learning rate."""
    try:
        import matplotlib
    except ImportError:  # the tables do not need it
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    base = histories["float32"]["loss"]
    # A window longer than the run would leave no point to draw (np.convolve's "valid" part of a
    # short array and a long kernel is the kernel's overhang, not the array's means).
    window = max(1, min(window, len(base) // 2))

    def smooth(v):
        return np.convolve(v, np.ones(window) / window, mode="valid")

    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for mode, h in histories.items():
        steps = np.arange(len(h["loss"]) - window + 1) + window
        ax1.plot(steps, smooth(h["loss"]), label=mode)
        ax2.plot(steps, smooth(h["loss"] - base), label=mode)
        ax3.plot(np.arange(1, len(h["lost"]) + 1), 100 * h["lost"], label=f"{mode}: lost")
    ax3.plot(np.arange(1, len(base) + 1), 100 * histories["bf16 pure"]["below_half_ulp"], "k:",
             label="bf16 pure: below half-ulp")
    lr = histories["float32"]["lr"]
    ax3.plot(np.arange(1, len(lr) + 1), 100 * lr / lr.max(), "c--", lw=0.8,
             label="learning rate (% of peak)")
    ax1.set_ylabel(f"training loss ({window}-step mean)")
    ax2.set_ylabel("loss minus float32's")
    ax3.set_ylabel("% of updates lost to rounding")
    for ax in (ax1, ax2, ax3):
        ax.set_xlabel("step")
        ax.grid(True, lw=0.3)
        ax.legend(fontsize=8)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------

def main():
    cfg = common.parse_flags(NumericsConfig())
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    cfg = resolve(cfg, on_cpu)
    common.make_out_dir(cfg.out)  # before the run: a bad --out fails now, a refused run makes none
    print(f"device: {dev.device_kind} ({dev.platform}); resolved: rows={cfg.rows} dim={cfg.dim} "
          f"mm_size={cfg.mm_size} lr={cfg.lr:g} iters={cfg.iters} steps={cfg.steps} "
          f"batch_size={cfg.batch_size} seq_len={cfg.seq_len}")

    sums = run_summation(cfg)
    quant = run_quantization(cfg)
    rates = run_matmul_speed(cfg)
    histories = run_training(cfg)
    report_stall(histories, cfg)

    print("\nsummary (errors are relative; speed against the bf16 matmul measured in this run)")
    print(f"{'experiment':39s} {'result':>12s}   {'against':s}")
    for dtype in ("bfloat16", "float16", "float8_e5m2"):
        e = sums[dtype]
        print(f"{'sum ' + dtype + ' seq/pair/kahan':39s} {e['sequential']:12.2e}   pairwise "
              f"{e['pairwise']:.2e}, Kahan {e['kahan']:.2e}")
    for scheme in ("int8 per tensor", "int8 per channel", "int8 per block", "e4m3 per tensor"):
        print(f"{'X@W outliers ' + scheme:39s} {quant[scheme][4]:12.2e}   bf16 "
              f"{quant['bf16 (cast)'][4]:.2e}")
    for dtype in ("float8_e4m3fn", "int8"):
        if dtype in rates and "bfloat16" in rates:
            name = f"{dtype} matmul {cfg.mm_size}^3"
            unit = "TOP/s" if dtype == "int8" else "TFLOP/s"
            print(f"{name:39s} {rates[dtype] / 1e12:12.3g}   {unit}; bf16 "
                  f"{rates['bfloat16'] / 1e12:.3g} ({rates[dtype] / rates['bfloat16']:.2f}x)")
    for mode, h in histories.items():
        tail = max(1, cfg.steps // 10)
        name = f"train {mode} loss, last 10%"
        print(f"{name:39s} {h['loss'][-tail:].mean():12.4f}   float32 "
              f"{histories['float32']['loss'][-tail:].mean():.4f}; lost updates, last {tail} "
              f"steps {h['lost'][-tail:].mean():.1%}")

    # The plot comes last: whatever happens while drawing it, the summary above is printed.
    path = plot_training(histories, os.path.join(cfg.out, "mixed_precision.png"))
    print(f"\nloss curves: {path or 'not drawn (pip install matplotlib)'}")


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --rows, --dim, --mm_size, --batch_size or --seq_len")
