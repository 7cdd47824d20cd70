"""Predict, then measure: the roofline model on the device at hand.

    python 01_roofline.py                      # sizes chosen for the device (about a minute on CPU)
    python 01_roofline.py --max_square=2048 --out=plots

A kernel can go no faster than its two ceilings allow: it must do its FLOPs at no more than the
peak FLOP/s, and move its bytes at no more than the memory bandwidth. Its lower bound on time is

    t_roofline = max(FLOPs / peak, bytes / bandwidth)

and the ratio FLOPs / bytes, the arithmetic intensity, says which term wins: below the ridge point
(peak / bandwidth, in FLOP per byte) a kernel is memory-bound, above it compute-bound.

The lesson measures both ceilings (matmul FLOP/s per dtype, copy bandwidth counting bytes read
and written) beside the datasheet figures of common.CHIPS. The copy runs in place: on a CPU, an
output in fresh memory pays the operating system a page fault for every 4 KiB it first writes,
which can cost more than the bytes themselves; the fresh-buffer copy is printed beside it.
Then it predicts and measures:
  - axpy, y = a*x + y: 2 FLOPs per 3 words moved, intensity 1/12 in float64, 1/6 in float32;
  - elementwise chains: A+B+C as one fused kernel against op-by-op (eager) dispatch;
  - relu(A@B) with the relu fused into the matmul or run as a second kernel;
  - square matmuls (intensity n/3 in bf16) and skinny ones, M = 1 .. 1024 rows against a fixed
    weight: the batch-size sweep of decoding, memory-bound until M nears the ridge point;
  - attention with the [T, S] score matrix written to memory and without (a fused kernel).
For each: FLOPs, bytes, intensity, roofline time, measured time, and their ratio. The measured
time is the device's own (a profile's kernel times) where there is a device apart from the host:
the wall clock of a call from Python also holds the host's dispatch, and below a few tens of
microseconds on a GPU that is all it measures. A log-log roofline plot with one point per
kernel is written as a PNG.

References: Williams, Waterman & Patterson, "Roofline: an insightful visual performance model for
multicore architectures", CACM 2009; Dao et al., "FlashAttention", 2022, section 3 (the IO
analysis of attention); Pope et al., "Efficiently Scaling Transformer Inference", 2022, section 2
(why decoding at small batch is bound by reading the weights).
"""
import dataclasses
import itertools
import math
import os
import typing

import jax
import jax.numpy as jnp
import numpy as np

import common


@dataclasses.dataclass(frozen=True)
class RooflineConfig:
    dtype: str = "bfloat16"   # dtype of the matmul sweeps, relu(A@B) and attention
    max_square: int = 0       # largest square matmul n, a power of 2 >= 128; 0: 8192 (1024 on CPU)
    weight: int = 0           # W of the skinny sweep's [M, W] @ [W, W]; 0: 8192 (1024 on CPU)
    max_batch: int = 1024     # largest M of the skinny sweep (powers of 2 from 1)
    vector_mib: int = 0       # MiB per elementwise operand; 0: 1024 (128 on CPU), past any cache
    attn_seq: int = 0         # T = S of the attention rows; 0: 4096 (512 on CPU)
    iters: int = 0            # timed runs per kernel, the median of the wall clock is reported
                              # (a GPU's own kernel time: a mean of 16 calls); 0: 10 (5 on CPU)
    out: str = "out"          # directory the roofline PNG is written to

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise common.UserError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        for f in ("max_square", "weight", "vector_mib", "attn_seq", "iters"):
            if getattr(self, f) < 0:
                raise common.UserError(f"{f} must be >= 0 (0 picks a size for the device)")
        if self.max_square and (self.max_square < 128 or self.max_square & (self.max_square - 1)):
            raise common.UserError(f"max_square must be a power of 2 >= 128, got {self.max_square}")
        if self.max_batch < 2 or self.max_batch & (self.max_batch - 1):  # M = 1 against more
            raise common.UserError(f"max_batch must be a power of 2 >= 2, got {self.max_batch}")
        if self.attn_seq and self.attn_seq % 128:
            raise common.UserError(f"attn_seq must be a multiple of 128, got {self.attn_seq}")


def resolve(cfg, on_cpu):
    """Fill the 0 (automatic) fields: small on a CPU, large enough to fill an accelerator."""
    auto = dict(max_square=1024, weight=1024, vector_mib=128, attn_seq=512, iters=5) if on_cpu \
        else dict(max_square=8192, weight=8192, vector_mib=1024, attn_seq=4096, iters=10)
    return dataclasses.replace(cfg, **{k: getattr(cfg, k) or v for k, v in auto.items()})


def attention_shape(on_gpu):
    """(B, H, D) of the attention rows; T = S = attn_seq."""
    return (2, 16, 128) if on_gpu else (1, 4, 64)


def check_sizes(cfg, on_gpu):
    """Refuse sizes whose arrays cannot fit, before the first is built (cfg resolved)."""
    n, W, mib, T = cfg.max_square, cfg.weight, cfg.vector_mib, cfg.attn_seq
    item = jnp.dtype(cfg.dtype).itemsize
    B, H, _ = attention_shape(on_gpu)
    common.check_fits(f"max_square={n}", 3 * n * n * 8, f"the float64 ceiling's three {n} x {n} "
                      f"matrices")
    common.check_fits(f"weight={W}", 2 * W * W * item, f"a [{W}, {W}] weight and relu(A @ B)'s "
                      f"[{W}, {W}] output")
    common.check_fits(f"max_batch={cfg.max_batch} weight={W}", 8 * cfg.max_batch * W * item,
                      f"the skinny sweep's largest inputs, [{cfg.max_batch}, {W}], and their "
                      f"copies")
    common.check_fits(f"vector_mib={mib}", 5 * mib * 2**20, "A + B + C unfused: 3 operands, a "
                      "partial sum and the result")
    common.check_fits(f"attn_seq={T}", 2 * B * H * T * T * 4, f"attention's float32 [T, S] "
                      f"scores and probabilities at B{B} H{H}")


# ----------------------------------------------------------------------------------------------
# Predictions: FLOPs and bytes of each kernel, written out by hand
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Cost:
    flops: float
    bytes: float   # bytes that must cross the memory bus: each input read once, each output written

    @property
    def intensity(self):
        return self.flops / self.bytes


def axpy_cost(n, itemsize):
    """y = a*x + y: a multiply and an add per element; read x and y, write y."""
    return Cost(2 * n, 3 * n * itemsize)


def sum_cost(n, n_inputs, itemsize, fused):
    """A + B + C + ... of `n_inputs` vectors. Fused: read each input once, write one output.
    Eager: each of the n_inputs - 1 adds is its own kernel, reading two vectors and writing one,
    so every intermediate makes a round trip through memory."""
    adds = n_inputs - 1
    words = (n_inputs + 1) * n if fused else 3 * n * adds
    return Cost(adds * n, words * itemsize)


def matmul_cost(M, K, N, itemsize, out_itemsize=None):
    """[M, K] @ [K, N]: 2MKN FLOPs; read both operands, write the [M, N] result."""
    out_itemsize = itemsize if out_itemsize is None else out_itemsize
    return Cost(2 * M * K * N, (M * K + K * N) * itemsize + M * N * out_itemsize)


def relu_matmul_cost(M, K, N, itemsize, fused):
    """relu(A @ B). Fused, the relu is applied to the tile before it is stored; unfused, the
    [M, N] product is written, read back by a second kernel and written again."""
    c = matmul_cost(M, K, N, itemsize)
    extra = 0 if fused else 2 * M * N * itemsize
    return Cost(c.flops + M * N, c.bytes + extra)


def attention_cost(B, T, S, H, D, itemsize, materialized):
    """Non-causal attention softmax(Q K^T / sqrt(D)) V, counted as the FlashAttention papers do:
    4*B*T*S*H*D FLOPs (two matmuls; the softmax's few FLOPs per score are left out). Every variant
    reads Q, K, V and writes O. The materialized one also writes the float32 scores [B, H, T, S]
    and reads them back for the softmax, then writes the probabilities in the input dtype and reads
    them back for P @ V: 2 * (4 + itemsize) bytes per score (the standard implementation, Dao et
    al. 2022, section 2.2, Algorithm 0, with float32 scores as common.attention_reference keeps).
    That is the least such a program moves. XLA's program reads the float32 scores three times
    (the row max, the sum of exponentials, the normalization; H100, jax 0.11.2): 20 bytes a score
    in bf16, so its measured time sits well above this roofline."""
    qkvo = (2 * B * T * H * D + 2 * B * S * H * D) * itemsize
    scores = B * H * T * S * 2 * (4 + itemsize) if materialized else 0
    return Cost(4 * B * T * S * H * D, qkvo + scores)


def roofline_time(cost, peak_flops, bandwidth):
    """The fastest a kernel can run: its FLOPs at peak, or its bytes at full bandwidth, whichever
    takes longer (the two overlap at best, never add up to less)."""
    return max(cost.flops / peak_flops, cost.bytes / bandwidth)


def ridge_point(peak_flops, bandwidth):
    """FLOPs per byte at which the two ceilings meet: less intensity is memory-bound."""
    return peak_flops / bandwidth


def compute_bound_batch(K, N, itemsize, ridge):
    """Smallest M at which [M, K] @ [K, N] reaches the ridge point. The intensity is
    2MKN / (itemsize (MK + KN + MN)), about 2M / itemsize while M << K, N: decoding one token for
    each of M sequences reuses each weight M times. Solving intensity = ridge for M gives
    M = ridge * itemsize * K * N / (2KN - ridge * itemsize * (K + N)); None where even M -> inf
    stays memory-bound (the intensity saturates at 2KN / (itemsize (K + N)))."""
    denom = 2 * K * N - ridge * itemsize * (K + N)
    if denom <= 0:
        return None
    return math.ceil(ridge * itemsize * K * N / denom)


# ----------------------------------------------------------------------------------------------
# Kernels: what is timed
# ----------------------------------------------------------------------------------------------

def axpy(a, x, y):
    return a * x + y


def add3(a, b, c):
    return a + b + c


def add3_eager(a, b, c):
    """The same sum, op by op: outside jit each jnp op is its own compiled kernel, so a + b is
    written to memory and read back before c is added."""
    return jnp.add(jnp.add(a, b), c)


def relu_matmul(a, b):
    return jax.nn.relu(a @ b)


_matmul = jax.jit(jnp.matmul)
_relu = jax.jit(jax.nn.relu)


def relu_matmul_unfused(a, b):
    """relu(A @ B) as two compiled programs: nothing can fuse across the boundary."""
    return _relu(_matmul(a, b))


def attention_fused(q, k, v):
    """cuDNN's fused attention (the FlashAttention algorithm): scores live in on-chip memory
    only. q: [B, T, H, D]; k, v: [B, S, H, D]."""
    return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")


def attention_materialized(q, k, v):
    """common.attention_reference: the [B, H, T, S] scores and probabilities go through memory."""
    return common.attention_reference(q, k, v, causal=False)


def matmul_for(dtype, precision=None):
    """A jitted product of a [M, K] and b for any dtype: int8 accumulates into int32 and fp8
    writes bf16, the outputs the hardware's integer and fp8 matrix units produce.

    For those 8-bit types b is given as [N, K], each operand with K contiguous: the only layout
    an H100's 8-bit matrix instructions read (cuBLAS's "TN"). Given b as [K, N], XLA transposes
    it before every product, a separate kernel: 0.48 ms of an 8192^3 fp8 call's 1.18 ms on an
    H100, where the product itself took 0.70 ms. Other types take a @ b, b [K, N]."""
    out = {"int8": jnp.int32, "float8_e4m3fn": jnp.bfloat16,
           "float8_e5m2": jnp.bfloat16}.get(jnp.dtype(dtype).name)
    if out is None:
        return jax.jit(lambda a, b: jnp.dot(a, b, precision=precision))
    k_major = (((1,), (1,)), ((), ()))                       # contract a's dim 1 with b's dim 1
    return jax.jit(lambda a, b: jax.lax.dot_general(a, b, k_major, precision=precision,
                                                    preferred_element_type=out))


def random_array(key, shape, dtype):
    """Fresh random inputs, never zeros: small integers for int8, N(0, 1) rounded to the dtype for
    floats (float64 needs jax.enable_x64 around the call)."""
    dtype = jnp.dtype(dtype)
    if jnp.issubdtype(dtype, jnp.integer):
        return jax.random.randint(key, shape, -127, 128, jnp.int32).astype(dtype)
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


# ----------------------------------------------------------------------------------------------
# Measuring
# ----------------------------------------------------------------------------------------------

class Measured(typing.NamedTuple):
    """One kernel's time per call, by two clocks. wall_s: the host's, calls issued back to back
    and the last one waited for. device_s: the accelerator's own, the kernels a call ran summed
    from a profile (common.device_seconds); None on a CPU, where the host is the device. A call
    from Python costs the host some microseconds to dispatch (tens on a GPU host); a kernel
    shorter than that leaves the device idle between calls, and the wall clock then times the
    host. The roofline predicts the kernel, so it is checked against the device's clock."""
    wall_s: float
    device_s: typing.Optional[float] = None

    @property
    def s(self):
        return self.wall_s if self.device_s is None else self.device_s


def time_per_call(fn, arg_sets, iters, calls=1):
    """Measured seconds per call of fn: the wall clock's median through common.bench (compile
    apart, warm up, median; a timed run issues `calls` calls back to back and blocks on the last)
    and the device's clock; the inputs rotate through arg_sets."""
    sets = itertools.cycle(arg_sets)  # carried from burst to burst, so every set takes a turn

    def burst():
        out = None
        for _ in range(calls):
            out = fn(*next(sets))
        return out
    wall = common.bench(burst, iters=iters, warmup=1).median_s / calls
    return Measured(wall, common.device_seconds(fn, arg_sets=arg_sets))


def dispatch_floor(iters):
    """Wall seconds per call of a jitted function that does almost nothing: the host's share of
    every call, the floor under any kernel timed from Python by the wall clock."""
    one = jnp.ones((1,), jnp.float32)
    return common.bench(jax.jit(lambda x: x + 1), one, iters=iters, calls=100).median_s


def calls_for(t_predicted, budget_s=2e-3, most=100):
    """How many calls fill about `budget_s` per timed run, given the roofline time of one."""
    return int(min(most, max(1, budget_s // max(t_predicted, 1e-9))))


def arg_rotation(make, set_bytes, cache_bytes=64 * 2**20, most=8):
    """Enough copies of the inputs to exceed the caches (the H100's L2 is 50 MB), up to `most`."""
    count = min(most, max(1, math.ceil(cache_bytes / set_bytes)))
    return [make(i) for i in range(count)]


def measure_matmul(dtype, n, iters, precision=None):
    """FLOP/s of one n x n x n matmul in `dtype` (float64 inside jax.enable_x64)."""
    ka, kb = jax.random.split(jax.random.key(n))
    with jax.enable_x64(jnp.dtype(dtype) == jnp.float64):
        a, b = random_array(ka, (n, n), dtype), random_array(kb, (n, n), dtype)
        t = time_per_call(matmul_for(dtype, precision), [(a, b)], iters)
    return 2 * n**3 / t.s


def measure_copy(mib, iters):
    """Bytes/s of x * 1.0001 over `mib` MiB of float32, read once and written once, both counted:
    (in place, into a fresh buffer). See common.copy_bandwidth for why they can differ."""
    words = mib * 2**20 // 4
    return (common.copy_bandwidth(words, iters),
            common.copy_bandwidth(words, iters, in_place=False))


def xla_bytes(fn, *args):
    """Bytes accessed as XLA's cost model counts them for the compiled fn; None if not reported,
    as for a program that calls a library kernel (cuBLAS on a GPU), which the model counts as 0."""
    ca = jax.jit(fn).lower(*args).compile().cost_analysis()
    if isinstance(ca, (list, tuple)):  # older jax: one dict per program
        ca = ca[0] if ca else None
    counted = (ca or {}).get("bytes accessed")
    return counted if counted and counted > 0 else None


@dataclasses.dataclass
class Ceilings:
    flops: dict            # dtype label -> measured matmul FLOP/s
    bandwidth: float       # measured copy bytes/s, in place
    ds_flops: dict         # dtype label -> datasheet FLOP/s (only the dtypes the table lists)
    ds_bandwidth: float    # datasheet HBM bytes/s, or None
    on_cpu: bool = False   # 16-bit matmuls emulated: held to float32's rate where it is faster

    def peak(self, dtype, datasheet=False):
        """The FLOP/s a kernel in `dtype` is held to. float32 kernels meet the default-precision
        matmul rate; where the datasheet has no figure for a dtype, the measured one stands in.
        On a CPU, XLA runs a 16-bit matmul through float32, so its kernels are held to the faster
        of the two measured rates (as common.ceilings holds lessons 02-05's)."""
        if datasheet and self.has_datasheet(dtype):
            return self.ds_flops[_label(dtype)]
        if self.on_cpu and dtype in ("bfloat16", "float16"):
            return max(self.flops[dtype], self.flops["float32 default"])
        return self.flops[_label(dtype)]

    def has_datasheet(self, dtype):
        return bool(self.ds_bandwidth and self.ds_flops.get(_label(dtype)))


def _label(dtype):
    return "float32 default" if dtype == "float32" else dtype


# (label, dtype, precision): float32 twice, because on recent GPUs XLA's default precision runs
# float32 matmuls on the tensor cores as TF32 (10 mantissa bits); HIGHEST keeps full float32.
CEILING_DTYPES = [("float64", "float64", None),
                  ("float32 highest", "float32", jax.lax.Precision.HIGHEST),
                  ("float32 default", "float32", None),
                  ("bfloat16", "bfloat16", None),
                  ("float16", "float16", None),
                  ("float8_e4m3fn", "float8_e4m3fn", None),
                  ("int8", "int8", None)]


def datasheet_flops(chip):
    if chip is None:
        return {}
    # A TPU's table has no TF32 figure (0): its float32 default runs as bf16 passes.
    return {"float32 highest": chip.f32_flops,
            "float32 default": chip.tf32_flops or chip.bf16_flops, "bfloat16": chip.bf16_flops,
            "float16": chip.bf16_flops, "float8_e4m3fn": chip.fp8_flops, "int8": chip.int8_ops}


def measure_ceilings(cfg, on_cpu):
    """Measured matmul FLOP/s per dtype and copy bandwidth, with the datasheet beside them."""
    chip = common.device_chip()
    ds = datasheet_flops(chip)
    n = cfg.max_square
    flops = {}
    print(f"\nceilings: matmul n x n x n, "
          + ("each kernel's own time, a mean of 16 calls" if jax.devices()[0].platform != "cpu"
             else f"median of {cfg.iters}")
          + f"; copy of {cfg.vector_mib} MiB float32 (wall clock, calls chained)")
    print(f"  {'what':18s} {'n':>5s} {'measured':>14s} {'datasheet':>14s} {'meas/ds':>8s}")
    for label, dtype, precision in CEILING_DTYPES:
        # float64 runs at a fraction of the tensor-core rate: a smaller n keeps it quick.
        size = n // 2 if dtype == "float64" and not on_cpu else n
        try:
            flops[label] = measure_matmul(dtype, size, cfg.iters, precision)
        except (RuntimeError, ValueError, NotImplementedError, TypeError) as e:
            # A backend without a kernel for the dtype says so at compile time (XlaRuntimeError).
            print(f"  {label:18s} {size:5d} {'unsupported':>14s}  ({str(e).splitlines()[0][:60]})")
            continue
        d = ds.get(label) or 0
        ratio = f"{flops[label] / d:7.0%}" if d else f"{'-':>7s}"
        ds_text = f"{d / 1e12:8.1f} TFLOP/s" if d else f"{'-':>14s}"
        print(f"  {label:18s} {size:5d} {flops[label] / 1e12:8.2f} TFLOP/s {ds_text} {ratio:>8s}")
    bw, fresh = measure_copy(cfg.vector_mib, cfg.iters)
    ds_bw = chip.hbm_bw if chip else None
    ds_text = f"{ds_bw / 1e9:11.0f} GB/s" if ds_bw else f"{'-':>14s}"
    for label, b in (("copy (read+write)", bw), ("  to a fresh buffer", fresh)):
        ratio = f"{b / ds_bw:7.0%}" if ds_bw else f"{'-':>7s}"
        print(f"  {label:18s} {'':5s} {b / 1e9:11.1f} GB/s {ds_text} {ratio:>8s}")
    if fresh < 0.8 * bw:
        print(f"  a fresh output runs at {fresh / bw:.0%} of the in-place copy here: the first "
              f"write to each new page faults and the OS zeroes it (common.copy_bandwidth). "
              f"Kernels that write new arrays (A+B+C, attention) pay that cost too; axpy "
              f"updates y in place")
    return Ceilings(flops, bw, {k: v for k, v in ds.items() if v}, ds_bw, on_cpu)


# ----------------------------------------------------------------------------------------------
# The experiments: each returns rows (name, dtype, Cost, measured seconds)
# ----------------------------------------------------------------------------------------------

def run_axpy(cfg):
    rows = []
    for dtype in ("float64", "float32"):
        itemsize = jnp.dtype(dtype).itemsize
        n = cfg.vector_mib * 2**20 // itemsize
        cost = axpy_cost(n, itemsize)
        with jax.enable_x64(dtype == "float64"):  # float64 exists in jax only with x64 enabled
            kx, ky = jax.random.split(jax.random.key(2))
            x, y = random_array(kx, (n,), dtype), random_array(ky, (n,), dtype)
            # y updated in place, as BLAS's axpy does (common.copy_bandwidth: why on a CPU)
            step = jax.jit(axpy, donate_argnums=2)
            held = [y]

            def update():  # each call consumes the last one's y: chained, as in bench_in_place
                held[0] = step(2.0, x, held[0])
                return held[0]
            device = common.device_seconds(update)
            wall = common.bench_in_place(lambda y: step(2.0, x, y), held[0], cfg.iters,
                                         warmup=1).median_s
            t = Measured(wall, device)
        rows.append((f"axpy n={n:,}", dtype, cost, t))
    return rows


def run_fusion(cfg, ceil):
    """A+B+C and relu(A@B), fused and not: bytes predicted, counted by XLA's cost model, and
    implied by the measured time at the measured bandwidth."""
    rows = []
    n = cfg.vector_mib * 2**20 // 4
    ks = jax.random.split(jax.random.key(3), 3)
    a, b, c = (random_array(k, (n,), jnp.float32) for k in ks)
    fused = jax.jit(add3)
    ok = bool(jnp.array_equal(fused(a, b, c), add3_eager(a, b, c)))  # same adds, same order
    xla = {"A+B+C jit": xla_bytes(add3, a, b, c),
           "A+B+C eager": 2 * (xla_bytes(jnp.add, a, b) or math.nan)}
    rows.append(("A+B+C jit", "float32", sum_cost(n, 3, 4, True),
                 time_per_call(fused, [(a, b, c)], cfg.iters)))
    rows.append(("A+B+C eager", "float32", sum_cost(n, 3, 4, False),
                 time_per_call(add3_eager, [(a, b, c)], cfg.iters)))

    # relu(A @ B) with a short K: writing [M, N] costs as much as the matmul, so fusion shows.
    M = N = cfg.weight
    K = max(64, cfg.weight // 32)
    dt = jnp.dtype(cfg.dtype)
    ka, kb = jax.random.split(jax.random.key(4))
    A, B = random_array(ka, (M, K), dt), random_array(kb, (K, N), dt)
    relu_fused = jax.jit(relu_matmul)
    err = float(jnp.max(jnp.abs(relu_fused(A, B).astype(jnp.float32)
                                - relu_matmul_unfused(A, B).astype(jnp.float32))))
    xla["relu(A@B) jit"] = xla_bytes(relu_matmul, A, B)
    xla["relu(A@B) 2 kernels"] = ((xla_bytes(jnp.matmul, A, B) or math.nan)
                                  + (xla_bytes(jax.nn.relu, A @ B) or math.nan))
    for name, fn, fused_ in (("relu(A@B) jit", relu_fused, True),
                             ("relu(A@B) 2 kernels", relu_matmul_unfused, False)):
        cost = relu_matmul_cost(M, K, N, dt.itemsize, fused_)
        t_roof = roofline_time(cost, ceil.peak(cfg.dtype), ceil.bandwidth)
        rows.append((name, cfg.dtype, cost,
                     time_per_call(fn, [(A, B)], cfg.iters, calls_for(t_roof))))

    print(f"\nfusion: bytes predicted, counted by XLA's cost model, and implied by the measured "
          f"time at {ceil.bandwidth / 1e9:.0f} GB/s\n  (A+B+C: n={n:,} float32, fused == eager "
          f"bitwise: {ok}; relu(A@B): [{M}, {K}] @ [{K}, {N}] {cfg.dtype}, fused vs two kernels "
          f"max |diff| {err:.1e})")
    print(f"  {'kernel':22s} {'predicted MB':>13s} {'XLA MB':>10s} {'time x bw MB':>13s}")
    for name, _, cost, t in rows:
        counted = f"{xla[name] / 1e6:10.1f}" if xla[name] and xla[name] > 0 else f"{'-':>10s}"
        print(f"  {name:22s} {cost.bytes / 1e6:13.1f} {counted} {t.s * ceil.bandwidth / 1e6:13.1f}")
    if not all(xla[name] and xla[name] > 0 for name, *_ in rows):  # None, or nan in a sum
        print("  (-: not counted; XLA's cost model sees no bytes in a library call such as cuBLAS)")
    if jax.devices()[0].platform == "cpu":
        print("  (XLA:CPU does not fuse the relu into the matmul: 'jit' runs two kernels too, "
              "and writes the product twice)")
    return rows


def run_square(cfg, ceil):
    dt = jnp.dtype(cfg.dtype)
    rows = []
    n = 128
    while n <= cfg.max_square:
        cost = matmul_cost(n, n, n, dt.itemsize)
        keys = jax.random.split(jax.random.key(n), 16)
        sets = arg_rotation(lambda i: (random_array(keys[2 * i], (n, n), dt),
                                       random_array(keys[2 * i + 1], (n, n), dt)), cost.bytes)
        t_roof = roofline_time(cost, ceil.peak(cfg.dtype), ceil.bandwidth)
        rows.append((f"matmul {n}^3", cfg.dtype, cost,
                     time_per_call(_matmul, sets, cfg.iters, calls_for(t_roof))))
        n *= 2
    return rows


def run_skinny(cfg, ceil):
    """[M, W] @ [W, W] for M = 1, 2, 4, ...: decoding M sequences at once through one weight."""
    dt = jnp.dtype(cfg.dtype)
    W = cfg.weight
    kw, kx = jax.random.split(jax.random.key(5))
    # Copies of the weight, to exceed the caches: a weight that stays in L2 from one call to the
    # next would be read from there, not from memory (the lesson is the memory's). At most 8
    # (arg_rotation): below W = 2048 in bf16 all 8 fit in 64 MiB, an H100's L2 or a CPU's L3.
    ws = arg_rotation(lambda i: random_array(jax.random.fold_in(kw, i), (W, W), dt),
                      W * W * dt.itemsize)
    rows = []
    M = 1
    while M <= cfg.max_batch:
        cost = matmul_cost(M, W, W, dt.itemsize)
        xs = [(random_array(k, (M, W), dt), ws[i % len(ws)])
              for i, k in enumerate(jax.random.split(kx, max(4, len(ws))))]
        t_roof = roofline_time(cost, ceil.peak(cfg.dtype), ceil.bandwidth)
        rows.append((f"skinny M={M} W={W}", cfg.dtype, cost,
                     time_per_call(_matmul, xs, cfg.iters, calls_for(t_roof))))
        M *= 2
    return rows


def skinny_summary(times, t_bytes, t_flops, m_star, W, t_call=None):
    """(the largest M whose time stays within 20% of M = 1's, why): times [s] for M = 1, 2, 4,
    ...; t_bytes and t_flops: M = 1's weight read at the copy bandwidth and its FLOPs at the
    matmul peak; m_star: where the roofline turns compute-bound (None: never); t_call: a call
    that does nothing, on the same clock as times (None where it is not: a device's clock)."""
    flat = 2 ** next((i for i, t in enumerate(times) if t > 1.2 * times[0]), len(times)) // 2
    t0 = times[0]
    if max(t_bytes, t_flops) < 0.5 * t0:
        if t_call is not None and t_call < 0.5 * t0:
            return flat, (f"no bound explains M = 1's {t0 * 1e6:.1f} us: the weight's bytes need "
                          f"{t_bytes * 1e6:.1f} us at the copy bandwidth, its FLOPs "
                          f"{t_flops * 1e6:.1f} us at the peak, and a call that does nothing "
                          f"takes {t_call * 1e6:.1f} us; the kernel runs below both ceilings at "
                          f"this shape")
        return flat, (f"the weight's bytes need only {t_bytes * 1e6:.1f} us at the copy "
                      f"bandwidth: a call's fixed cost holds the time, not the bytes or the FLOPs")
    if flat == 1 and (m_star is None or m_star > 2):
        return flat, (f"M = 1 reads the {W}x{W} weight near the copy bandwidth ({t_bytes * 1e6:.1f}"
                      f" us of its {t0 * 1e6:.1f} us), and M = 2, also below the ridge, reads "
                      f"the same bytes, yet takes {times[1] / t0:.2f}x as long: the product "
                      f"kernel for M > 1 streams the weight more slowly than M = 1's")
    if m_star is None or m_star > flat:
        return flat, f"below the ridge, reading the {W}x{W} weight is the cost, not the FLOPs"
    return flat, (f"a {W}x{W} weight is compute-bound from M = {m_star} on by the roofline, so "
                  f"what holds the time is a call's fixed cost, not the bytes")


def run_attention(cfg, ceil, on_gpu):
    dt = jnp.dtype(cfg.dtype)
    T = S = cfg.attn_seq
    B, H, D = attention_shape(on_gpu)
    kq, kk, kv = jax.random.split(jax.random.key(6), 3)
    q = random_array(kq, (B, T, H, D), dt)      # [B, T, H, D]
    k = random_array(kk, (B, S, H, D), dt)      # [B, S, H, D]
    v = random_array(kv, (B, S, H, D), dt)
    shape = f"B{B} T{T} H{H} D{D}"
    naive = jax.jit(attention_materialized)
    rows = [(f"attn [T,S] written {shape}", cfg.dtype,
             attention_cost(B, T, S, H, D, dt.itemsize, True),
             time_per_call(naive, [(q, k, v)], cfg.iters))]
    fused_cost = attention_cost(B, T, S, H, D, dt.itemsize, False)
    if not on_gpu or dt == jnp.float32:
        print(f"\nattention without [T, S] in memory: predicted {fused_cost.bytes / 1e6:.1f} MB "
              f"against {rows[0][2].bytes / 1e6:.1f} MB; no fused kernel is timed here "
              f"(cuDNN needs a GPU and 16-bit inputs; lesson 05 builds one in JAX)")
        return rows
    fused = jax.jit(attention_fused)
    try:
        out = fused(q, k, v)
    except (RuntimeError, ValueError, NotImplementedError) as e:  # no usable cuDNN on this GPU
        print(f"\nattention: cuDNN's fused kernel is unavailable ({str(e).splitlines()[0][:80]})")
        return rows
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - naive(q, k, v).astype(jnp.float32))))
    print(f"\nattention {shape} {cfg.dtype}: cuDNN against the reference, max |diff| {err:.1e}")
    rows.append((f"attn fused (cuDNN) {shape}", cfg.dtype, fused_cost,
                 time_per_call(fused, [(q, k, v)], cfg.iters)))
    return rows


# ----------------------------------------------------------------------------------------------
# The plot
# ----------------------------------------------------------------------------------------------

def plot_roofline(points, ceil, path, title):
    """Log-log roofline: achieved FLOP/s against intensity, one point per kernel, under the
    bandwidth slope and one flat ceiling per measured dtype (datasheet ones dashed)."""
    try:
        import matplotlib
    except ImportError:  # the tables do not need it
        return None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    xs = np.logspace(-2, 4.5, 200)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for label, peak in ceil.flops.items():
        ax.plot(xs, np.minimum(peak, ceil.bandwidth * xs), lw=1, label=f"{label} (measured)")
    for label in ("bfloat16", "float8_e4m3fn"):
        if ceil.ds_bandwidth and ceil.ds_flops.get(label):
            ax.plot(xs, np.minimum(ceil.ds_flops[label], ceil.ds_bandwidth * xs), "k--", lw=0.8,
                    label=f"{label} (datasheet)")
    families = {}
    for name, intensity, achieved in points:
        families.setdefault(name.split()[0], []).append((intensity, achieved))
    for (family, pts), marker in zip(families.items(), "osD^vPX*"):
        x, y = zip(*pts)
        ax.scatter(x, y, s=22, marker=marker, color="k" if marker == "o" else None, zorder=3,
                   label=family)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved FLOP/s")
    ax.set_title(title)
    ax.grid(True, which="both", lw=0.3)
    ax.legend(fontsize=7, loc="lower right")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------

def print_ridge(cfg, ceil):
    """The ridge point, measured (and datasheet), and the batch M at which a [M, W] @ [W, W]
    product turns compute-bound by each. Returns the measured one (None: never)."""
    itemsize = jnp.dtype(cfg.dtype).itemsize
    print(f"\nridge point ({cfg.dtype} peak / copy bandwidth): "
          f"{ridge_point(ceil.peak(cfg.dtype), ceil.bandwidth):.3g} FLOP/B measured", end="")
    if ceil.has_datasheet(cfg.dtype):
        print(f", {ridge_point(ceil.peak(cfg.dtype, True), ceil.ds_bandwidth):.3g} FLOP/B "
              f"datasheet", end="")
    print()
    if ceil.peak(cfg.dtype) != ceil.flops[_label(cfg.dtype)]:
        print(f"  (the {cfg.dtype} peak is float32's {ceil.peak(cfg.dtype) / 1e12:.3g} TFLOP/s: "
              f"a CPU runs 16-bit matmuls through float32, and here that rate is the faster)")
    W, m_star_measured = cfg.weight, None
    for basis, datasheet in (("measured", False), ("datasheet", True)):
        if datasheet and not ceil.has_datasheet(cfg.dtype):
            continue
        bw = ceil.ds_bandwidth if datasheet else ceil.bandwidth
        m_star = compute_bound_batch(W, W, itemsize,
                                     ridge_point(ceil.peak(cfg.dtype, datasheet), bw))
        if not datasheet:
            m_star_measured = m_star
        print(f"  [M, {W}] @ [{W}, {W}] {cfg.dtype} turns compute-bound at M = "
              f"{m_star if m_star else 'never (W too small)'} ({basis} ceilings; intensity is "
              f"about 2M/{itemsize} FLOP/B while M << {W})")
    return m_star_measured


def print_table(rows, ceil, floor):
    """Every kernel's FLOPs, bytes and intensity, its roofline time and bound, beside its
    measured time and the fraction of the roofline it reaches; floor: a call that does nothing
    (dispatch_floor), in seconds."""
    has_ds = ceil.ds_bandwidth is not None
    on_device = rows[0][3].device_s is not None
    print(f"\nroofline time = max(FLOPs / peak, bytes / bandwidth) with the measured ceilings "
          f"(copy {ceil.bandwidth / 1e9:.0f} GB/s, matmul peak of the row's dtype"
          + ("; a 16-bit row's is float32's where that is faster" if ceil.on_cpu else "")
          + f"); roof% = roofline / measured time, above 100% where a kernel beats a ceiling "
          f"measured with other shapes (a cache holding part of its bytes, a faster matmul "
          f"shape) or in slower samples (on a host busy with other work)"
          + ("; ds%: the same against the datasheet" if has_ds else ""))
    if on_device:
        print(f"measured = kernel us, the device's own clock (the kernels of a call, from a "
              f"profile); wall us = the host's clock, calls back to back. The host needs "
              f"{floor * 1e6:.1f} us to dispatch a call that does nothing: a kernel shorter than "
              f"that waits on the host, and its wall time measures the host, not the kernel")
    else:
        print(f"measured = wall us, calls back to back (on a CPU the host is the device); a call "
              f"that does nothing takes {floor * 1e6:.1f} us")
    print(f"{'kernel':34s} {'dtype':8s} {'GFLOP':>9s} {'MB':>9s} {'FLOP/B':>8s} {'bound':>7s} "
          f"{'roof us':>9s}" + (f" {'kernel us':>10s}" if on_device else "")
          + f" {'wall us':>10s} {'roof%':>6s} {'TFLOP/s':>8s} "
          f"{'GB/s':>7s}" + (f" {'ds%':>5s}" if has_ds else ""))
    for name, dtype, c, t in rows:
        peak = ceil.peak(dtype)
        t_roof = roofline_time(c, peak, ceil.bandwidth)
        bound = "memory" if c.intensity < ridge_point(peak, ceil.bandwidth) else "compute"
        kernel = f" {t.device_s * 1e6:10.1f}" if on_device else ""
        line = (f"{name:34s} {dtype[:8]:8s} {c.flops / 1e9:9.3f} {c.bytes / 1e6:9.1f} "
                f"{c.intensity:8.3f} {bound:>7s} {t_roof * 1e6:9.1f}{kernel} "
                f"{t.wall_s * 1e6:10.1f} {t_roof / t.s:6.0%} {c.flops / t.s / 1e12:8.2f} "
                f"{c.bytes / t.s / 1e9:7.0f}")
        if has_ds:
            t_ds = roofline_time(c, ceil.peak(dtype, datasheet=True), ceil.ds_bandwidth)
            line += f" {t_ds / t.s:5.0%}"
        print(line)


def main():
    cfg = common.parse_flags(RooflineConfig())
    common.make_out_dir(cfg.out)  # before the run: a bad --out fails now
    dev = jax.devices()[0]
    on_cpu = dev.platform == "cpu"
    cfg = resolve(cfg, on_cpu)
    check_sizes(cfg, dev.platform == "gpu")
    chip = common.device_chip()
    print(f"device: {dev.device_kind} ({dev.platform}); datasheet: "
          f"{f'{chip.name} ({chip.source})' if chip else 'none in common.CHIPS, measured only'}")
    print(f"resolved: max_square={cfg.max_square} weight={cfg.weight} max_batch={cfg.max_batch} "
          f"vector_mib={cfg.vector_mib} attn_seq={cfg.attn_seq} iters={cfg.iters}")

    ceil = measure_ceilings(cfg, on_cpu)
    m_star_measured = print_ridge(cfg, ceil)

    rows = run_axpy(cfg) + run_fusion(cfg, ceil)
    rows += run_square(cfg, ceil)
    skinny = run_skinny(cfg, ceil)
    times = [t.s for *_, t in skinny]  # M = 1, 2, 4, ...
    on_device = skinny[0][3].device_s is not None  # else the wall clock, as the empty call's
    floor = dispatch_floor(cfg.iters)
    flat, why = skinny_summary(times, skinny[0][2].bytes / ceil.bandwidth,
                               skinny[0][2].flops / ceil.peak(cfg.dtype), m_star_measured,
                               cfg.weight, None if on_device else floor)
    grows = (f"up to M = {flat}" if flat > 1 else "only at M = 1: M = 2 takes longer already")
    print(f"\nskinny sweep: the measured time stays within 20% of M=1's ({times[0] * 1e6:.1f} us) "
          f"{grows}:\n  {why}")
    rows += skinny
    rows += run_attention(cfg, ceil, dev.platform == "gpu")

    print_table(rows, ceil, floor)

    # The plot comes last: whatever happens while drawing it, the table above is printed.
    points = [(name, c.intensity, c.flops / t.s) for name, _, c, t in rows]
    path = plot_roofline(points, ceil, os.path.join(cfg.out, "roofline.png"),
                         f"roofline: {dev.device_kind}")
    print(f"\nroofline plot: {path or 'not drawn (pip install matplotlib)'}")


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --max_square, --weight, --max_batch, --vector_mib or "
                             "--attn_seq")
