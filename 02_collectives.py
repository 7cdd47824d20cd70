"""Collectives from nearest-neighbour sends: all-gather, reduce-scatter and all-reduce on a ring.

    XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true python 02_collectives.py   # GPUs
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python 02_collectives.py    # 8 CPU devices
    python 02_collectives.py --sizes_mib=64,1024 --dtype=float32 --pieces=8

N devices sit on a ring; each step, every device sends one chunk to its right-hand neighbour
while receiving one from its left, with `jax.lax.ppermute` inside `jax.shard_map`:
  - all-gather: every device starts with its own block and, N-1 times, passes on the block it
    received last; after N-1 steps each has all N blocks;
  - reduce-scatter: each device cuts its block into N chunks; a running sum travels the ring,
    every receiver adding its own copy of that chunk, and after N-1 steps device i holds the
    full sum of chunk i;
  - all-reduce: a reduce-scatter followed by an all-gather of the summed chunks;
  - pipelined: each step's chunk travels as several pieces, so the copy (all-gather) or the add
    (reduce-scatter) of one piece runs while the next is on the wire, as NCCL does with its
    chunks; only the last piece's copy or add is exposed;
  - bidirectional: half of the pieces go clockwise and half counter-clockwise at once, so a
    torus with independent links each way (TPU ICI) moves the data in half the time. GPUs
    behind an NVSwitch have one budget of NVLink bandwidth per direction instead, shared by all
    peers, and on 2 devices both directions lead to the same neighbour.
Every device sends (N-1)/N of the array per pass, and one pass is the least any algorithm can
do (each device must receive the N-1 parts it lacks), so the ring is bandwidth-optimal; it pays
N-1 latencies instead, which matters only for small arrays (Patarasuk & Yuan, "Bandwidth optimal
all-reduce algorithms for clusters of workstations", JPDC 2009; the NCCL ring).

Predicted time: bytes x (N-1)/N over the link bandwidth of common.CHIPS (twice the bytes for an
all-reduce: two passes). Measured next to XLA's built-ins (`lax.all_gather`, `lax.psum_scatter`,
`lax.psum`, on GPUs NCCL) in the same run, and as bus bandwidth: bytes each device sends, over
time (the nccl-tests convention, so the figures of the three collectives compare directly).

Then a collective matmul: y = x @ w with x sharded by rows and w by columns, as a tensor-parallel
layer meets a sequence-sharded activation. The plain way all-gathers x, then multiplies; the
collective matmul multiplies the block it holds while the next block is in flight, so the
transfer hides behind the matmul (Wang et al., "Overlap communication with dependent computation
via decomposition in large deep learning models", ASPLOS 2023; the shard_map collective matmul
of the JAX docs). On GPUs this needs XLA's latency-hiding scheduler to place the matmul between
the start and the end of the transfer: run with
XLA_FLAGS=--xla_gpu_enable_latency_hiding_scheduler=true.
"""
import dataclasses
import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import common


@dataclasses.dataclass(frozen=True)
class CollectivesConfig:
    sizes_mib: tuple = ()      # MiB per device of each block; empty: 64,256,1024 (GPU), 0.25 (CPU)
    dtype: str = "bfloat16"    # element type of the benchmarked arrays
    width: int = 1024          # a block is [rows, width]; rows follow from the size
    devices: int = 0           # ring size N; 0: every local device
    iters: int = 0             # timed runs per collective (median reported); 0: 10 (GPU), 3 (CPU)
    pieces: int = 0            # pieces each ring step is pipelined in; 0: 4 (GPU), 2 (CPU)
    mm_m: int = 0              # collective matmul: rows of x (tokens); 0: 16384 (256 CPU)
    mm_k: int = 0              # contraction dim; 0: 8192 (128 CPU)
    mm_f: int = 0              # columns of w over all devices; 0: 8192 (256 CPU)

    def __post_init__(self):
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise common.UserError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if any(s <= 0 for s in self.sizes_mib):
            raise common.UserError(f"sizes_mib must be > 0, got {self.sizes_mib}")
        for f in ("width",):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("devices", "iters", "pieces", "mm_m", "mm_k", "mm_f"):
            if getattr(self, f) < 0:
                raise common.UserError(f"{f} must be >= 0 (0 picks a size for the device)")


# ----------------------------------------------------------------------------------------------
# shard_map, and the ring's bookkeeping
# ----------------------------------------------------------------------------------------------

def shard_map(f, mesh, in_specs, out_specs):
    """jax.shard_map with the replication check off. A ring computes the same value on every
    device, but from ppermutes, which the checker treats as device-varying, so it would refuse
    out_specs=P() (replicated). The flag was renamed check_rep -> check_vma across jax versions."""
    names = inspect.signature(jax.shard_map).parameters
    flag = "check_vma" if "check_vma" in names else "check_rep"
    return jax.shard_map(f, mesh=mesh, in_specs=in_specs, out_specs=out_specs, **{flag: False})


def jit_static(f):
    """jit, with the mesh, axis name and flags as compile-time constants. Outside jit, shard_map
    would run op by op, one dispatch per ring step. A nested list of numbers is taken as the
    array it spells, as jnp's functions take it (jit alone would see a list of scalars)."""
    names = [a for a in ("mesh", "axis_name", "pieces", "bidirectional")
             if a in inspect.signature(f).parameters]
    jitted = jax.jit(f, static_argnames=names)
    as_array = lambda a: jnp.asarray(a) if isinstance(a, list) else a

    @functools.wraps(f)
    def call(*args, **kwargs):
        return jitted(*map(as_array, args), **{k: as_array(a) for k, a in kwargs.items()})
    return call


def _shift(x, axis_name, n, direction):
    """Send x to the neighbour `direction` (+1 right, -1 left) steps along the ring; receive
    from the other side. One collective-permute: every device sends and receives once."""
    return jax.lax.ppermute(x, axis_name, [(i, (i + direction) % n) for i in range(n)])


def _num_blocks(x, mesh, axis_name, pieces=1):
    if not common.is_integer(pieces):
        raise common.UserError(f"pieces must be an integer, got {pieces!r}")
    if axis_name not in mesh.shape:
        raise common.UserError(f"mesh has no axis {axis_name!r} (axes: {', '.join(mesh.shape)})")
    n = mesh.shape[axis_name]
    if x.ndim < 1 or x.shape[0] % n:
        raise common.UserError(f"an array of shape {tuple(x.shape)} does not split into {n} equal "
                               f"blocks along its first dimension (mesh axis {axis_name!r})")
    return n


# ----------------------------------------------------------------------------------------------
# Ring algorithms, per device (inside shard_map): b is this device's block [S, ...]
# ----------------------------------------------------------------------------------------------

def _lanes(rows, pieces, bidirectional):
    """[(first row, end row, direction)]: slices of the rows that travel as rings of their own.
    pieces > 1 pipelines the ring, as NCCL does with its chunks: the copy or the add of one
    piece runs while the next piece is on the wire, so only the last piece's is exposed.
    bidirectional: every other slice goes counter-clockwise, using the links of both
    directions (on 2 devices both lead to the same neighbour: it is then pieces=2)."""
    k = max(1, min(rows, pieces * (2 if bidirectional else 1)))
    bounds = [rows * j // k for j in range(k + 1)]
    return [(lo, hi, -1 if bidirectional and j % 2 else 1)
            for j, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:]))]


def _all_gather_local(b, axis_name, n, pieces=1, bidirectional=False):
    """N-1 steps; at step s device i receives block (i - d*s) mod N of each lane (d: its
    direction) and passes it on at step s+1. The output starts as N copies of the local block
    (right at place i, and written while the first transfer is in flight); each piece received
    is written over its place. Assembling the output once after the last transfer writes fewer
    bytes but none of them beside a transfer, and was slower on 2 GPUs (BENCHMARKS.md)."""
    index = jax.lax.axis_index(axis_name)
    S = b.shape[0]
    lanes = _lanes(S, pieces, bidirectional)
    out = jnp.tile(b, (n,) + (1,) * (b.ndim - 1))  # [N*S, ...]
    parts = [b[lo:hi] for lo, hi, _ in lanes]
    for s in range(1, n):
        for j, (lo, _, d) in enumerate(lanes):
            parts[j] = _shift(parts[j], axis_name, n, d)
            out = jax.lax.dynamic_update_slice_in_dim(out, parts[j], ((index - d * s) % n) * S + lo,
                                                      axis=0)
    return out


def _reduce_scatter_local(b, axis_name, n, pieces=1, bidirectional=False):
    """b: [S, ...] with S % N == 0, cut into N chunks [S/N, ...]. Device i starts a running sum
    with its chunk i - d and sends it on; at step s it adds its own chunk i - d(s+1) to what it
    received, so after N-1 steps it holds the sum over devices of chunk i. Each lane does this
    for its rows of the chunks."""
    index = jax.lax.axis_index(axis_name)
    c = b.shape[0] // n
    chunks = b.reshape((n, c) + b.shape[1:])  # [N, S/N, ...]
    lanes = _lanes(c, pieces, bidirectional)
    out = None if len(lanes) == 1 else jnp.zeros((c,) + b.shape[1:], b.dtype)
    for lo, hi, d in lanes:
        acc = chunks[(index - d) % n, lo:hi]
        for s in range(1, n):
            acc = _shift(acc, axis_name, n, d) + chunks[(index - d * (s + 1)) % n, lo:hi]
        out = acc if out is None else out.at[lo:hi].set(acc)
    return out  # [S/N, ...]


# ----------------------------------------------------------------------------------------------
# The public collectives: a global x [N*S, ...] sharded on its first dim, blocks s_0..s_{N-1}
# ----------------------------------------------------------------------------------------------

@jit_static
def ring_all_gather(x, mesh, axis_name, pieces=1, bidirectional=False):
    """The same global value as x, replicated on every device of the axis."""
    n = _num_blocks(x, mesh, axis_name, pieces)
    local = lambda b: _all_gather_local(b, axis_name, n, pieces, bidirectional)
    return shard_map(local, mesh, P(axis_name), P())(x)


@jit_static
def ring_reduce_scatter(x, mesh, axis_name, pieces=1, bidirectional=False):
    """s_0 + ... + s_{N-1}, shape [S, ...], sharded along its first dimension. S must be a
    multiple of N: the result is split evenly (as lax.psum_scatter requires too)."""
    n = _num_blocks(x, mesh, axis_name, pieces)
    S = x.shape[0] // n
    if S % n:
        raise common.UserError(f"reduce-scatter of blocks of {S} rows over {n} devices: {S} is "
                               f"not a multiple of {n}, so the sum cannot be split evenly")
    local = lambda b: _reduce_scatter_local(b, axis_name, n, pieces, bidirectional)
    return shard_map(local, mesh, P(axis_name), P(axis_name))(x)


@jit_static
def ring_all_reduce(x, mesh, axis_name, pieces=1, bidirectional=False):
    """s_0 + ... + s_{N-1}, shape [S, ...], replicated: a reduce-scatter then an all-gather.
    Blocks whose S is not a multiple of N are padded with zero rows, which the sum ignores."""
    n = _num_blocks(x, mesh, axis_name, pieces)
    S = x.shape[0] // n
    pad = -S % n

    def local(b):
        b = jnp.pad(b, [(0, pad)] + [(0, 0)] * (b.ndim - 1))
        r = _reduce_scatter_local(b, axis_name, n, pieces, bidirectional)  # [(S+pad)/N, ...]
        return _all_gather_local(r, axis_name, n, pieces, bidirectional)[:S]

    return shard_map(local, mesh, P(axis_name), P())(x)


# The peers: XLA's own collectives (NCCL on GPUs), same contracts.
@jit_static
def builtin_all_gather(x, mesh, axis_name):
    _num_blocks(x, mesh, axis_name)
    f = lambda b: jax.lax.all_gather(b, axis_name, tiled=True)
    return shard_map(f, mesh, P(axis_name), P())(x)


@jit_static
def builtin_reduce_scatter(x, mesh, axis_name):
    _num_blocks(x, mesh, axis_name)
    f = lambda b: jax.lax.psum_scatter(b, axis_name, scatter_dimension=0, tiled=True)
    return shard_map(f, mesh, P(axis_name), P(axis_name))(x)


@jit_static
def builtin_all_reduce(x, mesh, axis_name):
    _num_blocks(x, mesh, axis_name)
    return shard_map(lambda b: jax.lax.psum(b, axis_name), mesh, P(axis_name), P())(x)


@jit_static
def ring_shift(x, mesh, axis_name):
    """One ring step alone: every block moves to the next device. Its time is the link's."""
    n = _num_blocks(x, mesh, axis_name)
    f = lambda b: _shift(b, axis_name, n, 1)
    return shard_map(f, mesh, P(axis_name), P(axis_name))(x)


# ----------------------------------------------------------------------------------------------
# Collective matmul: y = x @ w, x [M, K] sharded by rows, w [K, F] by columns, y [M, F] by columns
# ----------------------------------------------------------------------------------------------

@jit_static
def matmul_all_gather(x, w, mesh, axis_name):
    """The plain way, one jit'd matmul with its output sharded by columns: XLA all-gathers x,
    then multiplies."""
    y = jnp.einsum("mk,kf->mf", x, w)
    return jax.lax.with_sharding_constraint(y, NamedSharding(mesh, P(None, axis_name)))


@jit_static
def collective_matmul(x, w, mesh, axis_name):
    """Each device multiplies the block of x it holds while passing it on: at step s it sends
    the block it has (arriving next step at its neighbour) and multiplies it by its columns of
    w, so the transfer of step s overlaps the matmul of step s. N matmuls of [M/N, K] x [K, F/N],
    N-1 transfers of [M/N, K]; only the last matmul is not overlapped."""
    n = _num_blocks(x, mesh, axis_name)
    if w.ndim != 2 or w.shape[1] % n:
        raise common.UserError(f"w must be [K, F] with F a multiple of the {n} devices, got "
                               f"{tuple(w.shape)}")
    if x.shape[1] != w.shape[0]:
        raise common.UserError(f"x {tuple(x.shape)} and w {tuple(w.shape)} do not multiply")

    def local(xb, wb):  # xb [M/N, K], wb [K, F/N]
        index = jax.lax.axis_index(axis_name)
        m = xb.shape[0]
        y = jnp.zeros((n * m, wb.shape[1]), jnp.result_type(xb, wb))  # [M, F/N]
        chunk = xb
        for s in range(n):
            nxt = _shift(chunk, axis_name, n, 1) if s < n - 1 else None  # in flight during the dot
            y_s = jnp.einsum("mk,kf->mf", chunk, wb)  # the rows of block index - s
            y = jax.lax.dynamic_update_slice_in_dim(y, y_s, ((index - s) % n) * m, axis=0)
            chunk = nxt
        return y

    return shard_map(local, mesh, (P(axis_name, None), P(None, axis_name)),
                     P(None, axis_name))(x, w)


# ----------------------------------------------------------------------------------------------
# Predictions
# ----------------------------------------------------------------------------------------------

def ring_bytes_sent(kind, block_bytes, n):
    """Bytes each device sends. block_bytes: one device's input block. All-gather: the gathered
    array (N blocks) x (N-1)/N; reduce-scatter: the block x (N-1)/N; all-reduce: both passes."""
    return {"all-gather": (n - 1) * block_bytes,
            "reduce-scatter": block_bytes * (n - 1) / n,
            "all-reduce": 2 * block_bytes * (n - 1) / n,
            "shift": block_bytes}[kind]


def link_bandwidth():
    """(one-way bytes/s per device, its source), or (None, reason) where the table has no entry."""
    chip = common.device_chip()
    if chip is None:
        return None, f"no link figure for {jax.devices()[0].device_kind}"
    return chip.link_bw, f"{chip.name} datasheet, {chip.link_bw / 1e9:.0f} GB/s one way"


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def _fmt_ms(t):
    return "n/a" if t is None else f"{t * 1e3:.3f}"


def _rel_err(a, b):
    """max |a - b| / max |b|. In bf16 it is mostly the ring's own rounding: each of its N - 1
    hops adds in bf16, where the built-in all-reduce (on a CPU at least) sums in float32 and
    rounds once, to the exact sum's nearest bf16."""
    a, b = a.astype(jnp.float32), b.astype(jnp.float32)
    return float(jnp.max(jnp.abs(a - b)) / jnp.maximum(jnp.max(jnp.abs(b)), 1e-30))


def measure_collectives(mesh, sizes, block_rows, dtype, width, variants, iters, link_bw):
    """For each block size: each collective's ring variants and the built-in one timed (checked
    against the built-in first), beside the prediction sent / link bandwidth; then one ring step
    alone. Where no datasheet gives the link (a CPU's simulated devices), the prediction's basis
    is that one ring step, measured. Returns the rows (collective, MiB, bytes sent, predicted s,
    {variant: s}, built-in s, max error) and the last size's measured link bandwidth [B/s]."""
    n = mesh.shape["ring"]
    rows = []
    for mib in sizes:
        r = block_rows(mib)
        block_bytes = r * width * dtype.itemsize
        shape = (n * r, width)  # the global array: N blocks [r, width]
        x = jax.jit(lambda key: jax.random.normal(key, shape, dtype),
                    out_shardings=NamedSharding(mesh, P("ring")))(jax.random.key(len(rows)))
        # One ring step alone: what the link does with nothing else to do.
        t_shift = common.bench(functools.partial(ring_shift, mesh=mesh, axis_name="ring"), x,
                               iters=iters).median_s
        bw_basis = link_bw or (block_bytes / t_shift if n > 1 else None)
        for kind, ring, builtin in (("all-gather", ring_all_gather, builtin_all_gather),
                                    ("reduce-scatter", ring_reduce_scatter, builtin_reduce_scatter),
                                    ("all-reduce", ring_all_reduce, builtin_all_reduce)):
            fi = functools.partial(builtin, mesh=mesh, axis_name="ring")
            want, times, err = fi(x), {}, 0.0
            for name, kw in variants:
                fr = functools.partial(ring, mesh=mesh, axis_name="ring", **kw)
                err = max(err, _rel_err(fr(x), want))  # correct first
                times[name] = common.bench(fr, x, iters=iters).median_s
            del want
            t_builtin = common.bench(fi, x, iters=iters).median_s
            sent = ring_bytes_sent(kind, block_bytes, n)
            pred = sent / bw_basis if bw_basis else None
            rows.append((kind, block_bytes / 2**20, sent, pred, times, t_builtin, err))
        rows.append(("one ppermute", block_bytes / 2**20, block_bytes if n > 1 else 0,
                     block_bytes / link_bw if link_bw and n > 1 else None, {"ring": t_shift},
                     None, 0.0))
        del x
    return rows, block_bytes / t_shift


def print_collectives_table(rows, names, dtype_name, n, k, link_bw, on_gpu):
    """measure_collectives' rows: each variant's time beside the prediction and the built-in's,
    and the bus bandwidth of the best variant against the built-in's."""
    basis = ("link bandwidth" if link_bw else
             "the bandwidth of one ppermute of the same block, measured (no datasheet link)")
    print(f"\nring collectives, {dtype_name}, N={n}: ring = one piece per step, x{k} = {k} pieces "
          f"pipelined, bidir = {k} pieces each way (at most a chunk's rows). GB/s = bytes each "
          f"device sends / time (bus bandwidth); predicted = sent / {basis}; err = max "
          f"|ring - built-in| / max |built-in| over the variants")
    if not on_gpu and jax.devices()[0].platform == "cpu":
        print("on a CPU the devices are threads of one process and a ppermute is a copy in "
              "memory: no copy engine runs beside the adds and copies, so pieces add steps and "
              "hide nothing")
    print(f"{'collective':<15}{'MiB/dev':>8}{'sent MiB':>9}{'pred ms':>9}"
          + "".join(f" {name + ' ms':>12}" for name in names)
          + f"{'built-in ms':>12}{'best GB/s':>10}{'built GB/s':>11}{'best/built':>11}{'err':>9}")
    for kind, mib, sent, pred, times, t_builtin, err in rows:
        best = min(times.values())
        bw = lambda t: f"{sent / t / 1e9:.1f}" if t else "n/a"
        ratio = f"{t_builtin / best:.2f}x" if t_builtin else ""
        print(f"{kind:<15}{mib:>8.1f}{sent / 2**20:>9.1f}{_fmt_ms(pred):>9}"
              + "".join(f" {_fmt_ms(times.get(name)):>12}" for name in names)
              + f"{_fmt_ms(t_builtin):>12}{bw(best):>10}{bw(t_builtin):>11}{ratio:>11}{err:>9.1e}")


def measure_collective_matmul(mesh, M, K, F, dtype_name, iters, link_bw):
    """M tokens of width K against a [K, F] weight split by columns: the plain all-gather then
    matmul against the collective matmul, each beside its prediction (link_bw: the datasheet's,
    else measured; None on one device)."""
    n, dtype = mesh.shape["ring"], jnp.dtype(dtype_name)
    kx, kw = jax.random.split(jax.random.key(1))
    xm = jax.device_put(jax.random.normal(kx, (M, K), dtype), NamedSharding(mesh, P("ring", None)))
    wm = jax.device_put(jax.random.normal(kw, (K, F), dtype) / math.sqrt(K),
                        NamedSharding(mesh, P(None, "ring")))
    f_plain = functools.partial(matmul_all_gather, mesh=mesh, axis_name="ring")
    f_coll = functools.partial(collective_matmul, mesh=mesh, axis_name="ring")
    mm_err = _rel_err(f_coll(xm, wm), f_plain(xm, wm))
    t_plain = common.bench(f_plain, xm, wm, iters=iters).median_s
    t_coll = common.bench(f_coll, xm, wm, iters=iters).median_s
    peak, _, peak_src = common.ceilings(dtype_name)
    t_mm = 2 * M * K * (F // n) / peak  # the matmul alone, per device, at peak
    t_comm = (n - 1) * (M // n) * K * dtype.itemsize / link_bw if link_bw else None
    # Plain: transfer, then matmul. Collective: N-1 transfers overlap N-1 of the N matmuls.
    pred_plain = t_comm + t_mm if t_comm is not None else None
    pred_coll = max(t_comm, t_mm * (n - 1) / n) + t_mm / n if t_comm is not None else None

    print(f"\ncollective matmul [{M}, {K}] x [{K}, {F}], x split by rows, w by columns, "
          f"{dtype_name}; peak {peak / 1e12:.3g} TFLOP/s ({peak_src}); relative error {mm_err:.1e}")
    print(f"{'version':<30}{'pred ms':>9}{'ms':>10}{'TFLOP/s/dev':>13}{'speedup':>9}")
    flops = 2 * M * K * F / n
    for name, pred, t in (("all-gather, then matmul (jit)", pred_plain, t_plain),
                          ("collective matmul (ring)", pred_coll, t_coll)):
        print(f"{name:<30}{_fmt_ms(pred):>9}{t * 1e3:>10.3f}{flops / t / 1e12:>13.4g}"
              f"{t_plain / t:>8.2f}x")


def main():
    cfg = common.parse_flags(CollectivesConfig())
    on_gpu = jax.devices()[0].platform == "gpu"
    devices = jax.devices()
    n = cfg.devices or len(devices)
    if n > len(devices):
        raise common.UserError(f"devices={n}, but only {len(devices)} exist")
    mesh = Mesh(np.array(devices[:n]), ("ring",))
    sizes = cfg.sizes_mib or ((64, 256, 1024) if on_gpu else (0.25,))
    dtype = jnp.dtype(cfg.dtype)
    link_bw, link_src = link_bandwidth()
    print(f"{n} x {devices[0].device_kind}, jax {jax.__version__}; link: {link_src}")
    if n == 1:
        print("one device: every collective is a copy; on a CPU set "
              "XLA_FLAGS=--xla_force_host_platform_device_count=8 to simulate 8 devices")

    def split(given, default):  # a size left to the script: rounded to a multiple of the devices
        return given or max(n, default - default % n)
    M = split(cfg.mm_m, 16384 if on_gpu else 256)
    K = cfg.mm_k or (8192 if on_gpu else 128)
    F = split(cfg.mm_f, 8192 if on_gpu else 256)
    if M % n or F % n:
        raise common.UserError(f"mm_m={M} and mm_f={F} must be multiples of {n} devices")
    k = cfg.pieces or (4 if on_gpu else 2)
    iters = cfg.iters or (10 if on_gpu else 3)
    variants = (("ring", {}), (f"ring x{k}", {"pieces": k}),
                (f"bidir x{k}", {"pieces": k, "bidirectional": True}))
    def block_rows(mib):  # a block of about mib MiB: rows of `width`, a multiple of N of them
        r = max(1, int(mib * 2**20 / (cfg.width * dtype.itemsize)))
        return max(n, r - r % n)  # reduce-scatter splits each block into N chunks

    # Per device: its block, two gathered outputs of N blocks (ring and built-in) and the ring's
    # copies; a CPU's simulated devices all live in the host's memory. Refused before any is built.
    on_host = 1 if on_gpu or jax.devices()[0].platform == "tpu" else n
    for mib in sizes:
        common.check_fits(f"sizes_mib={mib:g} width={cfg.width}",
                          on_host * (2 * n + 3) * block_rows(mib) * cfg.width * dtype.itemsize,
                          f"a block, the gathered outputs and the ring's copies on {n} devices")
    common.check_fits(f"mm_m={M} mm_k={K} mm_f={F}",
                      dtype.itemsize * (2 * M * K + K * F + 2 * M * F),
                      "the collective matmul's x (and its gathered copy), w and two products")
    rows, link_measured = measure_collectives(mesh, sizes, block_rows, dtype, cfg.width,
                                              variants, iters, link_bw)
    print_collectives_table(rows, [name for name, _ in variants], cfg.dtype, n, k, link_bw,
                            on_gpu)
    mm_link = link_bw or (link_measured if n > 1 else None)
    measure_collective_matmul(mesh, M, K, F, cfg.dtype, iters, mm_link)


if __name__ == "__main__":
    common.run(main, smaller="try smaller --sizes_mib, or a smaller --mm_m, --mm_k or --mm_f")
