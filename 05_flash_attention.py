"""Flash attention in pure JAX: the online softmax over blocks, so the [T, S] matrix never exists.

    python 05_flash_attention.py                # GPU: the benchmark, S = 1k..64k; CPU: small S
    python 05_flash_attention.py --max_len=16384 --block_q=1024 --block_k=2048  # fixed blocks

Lesson 04's attention writes the whole [T, S] score matrix to memory: O(T*S) bytes, and a trip
through HBM for every entry. FlashAttention (Dao et al. 2022, "FlashAttention: fast and
memory-efficient exact attention with IO-awareness", Algorithm 1) computes the same result one
block of keys at a time. The trick is the online softmax (Milakov & Gimelshein 2018): keep, per
query row, the running max m_i and the running sum l_i of exp(score - m_i); when a new block
raises the max, rescale what was accumulated by exp(m_old - m_new). FlashAttention-2 (Dao 2023,
"FlashAttention-2: faster attention with better parallelism and work partitioning", section
3.1.1, Algorithm 1) divides by l_i only once at the end and keeps one number per row for the
backward pass, the logsumexp L_i = m_i + log(l_i); its backward (Algorithm 2, section 3.1.2)
rebuilds each block's probabilities as exp(S_ij - L_i) instead of storing them.

`flash_attention` here is that algorithm in plain JAX: one `lax.scan` over the (query block,
key block) pairs that hold at least one visible entry. With a causal mask the pairs above the
diagonal are never visited, which halves the work; lengths that are not a block multiple are
padded and the padding masked. It is exact, differentiable through a `jax.custom_vjp`, and its
temporary memory grows like T*D (the output accumulator) plus one block, instead of T*S.

What it does not do is keep the blocks on chip: XLA runs each block's matmuls and softmax as
separate kernels, so a block's scores still make a round trip through HBM (or L2). A real
FlashAttention kernel keeps them in registers and shared memory (the block-size arithmetic below
says how big a block may be for that, and what each loop order then reads from HBM: K/V blocks
outside, as in the first paper's Algorithm 1, or query blocks outside, as in FlashAttention-2),
which lesson 08 does with Pallas. So here the memory win
is the full one, while the speed win over the materialized version comes mostly from skipping
the masked blocks; main() measures both against XLA's materialized attention (lesson 04) and
cuDNN's fused kernel. On a CPU it runs the same steps at small sizes, and shows the memory of
the compiled programs up to S=64k without allocating it.
"""
import dataclasses
import functools
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import common

attn04 = common.import_script("04_attention")


@dataclasses.dataclass(frozen=True)
class FlashConfig:
    batch: int = 1             # sequences B
    n_heads: int = 16          # query heads H
    n_kv_heads: int = 16       # key/value heads KH (dividing H)
    head_dim: int = 128        # D
    dtype: str = "bfloat16"    # of q, k, v; the softmax statistics stay float32
    causal: bool = True        # each token sees only those before it
    block_q: int = 0           # query rows per block; 0: a short sweep picks it on GPU, 256 on CPU
    block_k: int = 0           # key rows per block; 0: as block_q (with block_q=0 on GPU the
                               # sweep picks both, and this is ignored)
    min_len: int = 0           # shortest S timed (lengths double); 0: 1024 on GPU, 256 on CPU
    max_len: int = 0           # longest S timed; 0: 65536 on GPU, 512 on CPU
    mem_max_len: int = 65536   # longest S of the compile-only memory table (CPU: 16k, 32k, ...)
    time_budget_s: float = 170  # seconds; no new length past the first is timed after it
    seed: int = 0              # of the random inputs

    def __post_init__(self):
        for f in ("batch", "n_heads", "n_kv_heads", "head_dim", "mem_max_len"):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.mem_max_len > 2**20:  # one compiled program per doubling from 16k
            raise common.UserError(f"mem_max_len must be <= 2**20 (1,048,576), got "
                                   f"{self.mem_max_len}")
        for f in ("block_q", "block_k", "min_len", "max_len"):
            if getattr(self, f) < 0:
                raise common.UserError(f"{f} must be >= 1 (or 0 for the default), "
                                       f"got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise common.UserError(f"n_kv_heads={self.n_kv_heads} must divide "
                                   f"n_heads={self.n_heads}")
        if self.min_len and self.max_len and self.min_len > self.max_len:
            raise common.UserError(f"min_len={self.min_len} exceeds max_len={self.max_len}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise common.UserError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")
        if not (self.time_budget_s > 0 and math.isfinite(self.time_budget_s)):  # nan too
            raise common.UserError(f"time_budget_s must be a positive number of seconds, "
                                   f"got {self.time_budget_s}")


# ----------------------------------------------------------------------------------------------
# Blocks and the schedule of block pairs
# ----------------------------------------------------------------------------------------------

def to_blocks(x, b):
    """[B, L, *heads, D] -> [L/b, B, *heads, b, D], L zero-padded to a multiple of b.

    Block-major, so block i is one contiguous slab that a loop step reads with one index."""
    B, L = x.shape[:2]
    n = -(-L // b)
    x = jnp.pad(x, [(0, 0), (0, n * b - L)] + [(0, 0)] * (x.ndim - 2))
    x = x.reshape(B, n, b, *x.shape[2:])  # [B, n, b, *heads, D]
    heads = list(range(3, x.ndim - 1))
    return x.transpose(1, 0, *heads, 2, x.ndim - 1)


def from_blocks(x, L):
    """Inverse of to_blocks: [n, B, *heads, b, D] -> [B, L, *heads, D]."""
    n, B, b = x.shape[0], x.shape[1], x.shape[-2]
    heads = list(range(2, x.ndim - 2))
    x = x.transpose(1, 0, x.ndim - 2, *heads, x.ndim - 1)  # [B, n, b, *heads, D]
    return x.reshape(B, n * b, *x.shape[3:])[:, :L]


def seg_blocks(seg, b):
    """Segment ids [B, L] -> [L/b, B, b]; padding gets -1 (padded keys are masked anyway)."""
    B, L = seg.shape
    n = -(-L // b)
    seg = jnp.pad(seg, [(0, 0), (0, n * b - L)], constant_values=-1)
    return seg.reshape(B, n, b).swapaxes(0, 1)


def block_schedule(T, S, block_q, block_k, causal, kv_major=False):
    """(i, j) int32 arrays: every pair of query block i and key block j that holds at least one
    visible entry, query-block-major (the forward's order) or key-block-major (the backward's).

    Query t sits at key position t + S - T, so block i's last real query sees keys up to
    min((i+1)*block_q, T) - 1 + S - T; causal key blocks past it are fully masked and left out,
    not computed: for T = S that is nq*(nq+1)/2 of nq*nq pairs with square blocks. The schedule
    is fixed by the shapes, so it is built here in numpy, at trace time, like the block masks of
    splash attention and FlexAttention."""
    nq, nk = -(-T // block_q), -(-S // block_k)
    pairs = []
    for i in range(nq):
        last_key = min((i + 1) * block_q, T) - 1 + (S - T)
        for j in range(nk):
            if not causal or j * block_k <= last_key:
                pairs.append((i, j))
    if kv_major:
        pairs.sort(key=lambda ij: (ij[1], ij[0]))
    pairs = np.array(pairs, np.int32).reshape(-1, 2)
    return pairs[:, 0], pairs[:, 1]


def take(x, i):
    return lax.dynamic_index_in_dim(x, i, keepdims=False)


def put(x, i, value):
    return lax.dynamic_update_index_in_dim(x, value, i, 0)


def block_scores(q_i, k_j, i, j, shape, causal, seg_q_i, seg_k_j):
    """Scaled scores of one block pair, float32 [B, KH, G, bq, bk], and its mask [B or 1, bq, bk]:
    causal by position, segments, and the padding keys past S."""
    T, S, bq, bk, D = shape
    s = jnp.einsum("bkgqd,bksd->bkgqs", q_i, k_j, preferred_element_type=jnp.float32)
    s = s * (1 / math.sqrt(D))
    q_pos = i * bq + jnp.arange(bq) + (S - T)
    k_pos = j * bk + jnp.arange(bk)
    mask = attn04.visible(q_pos, k_pos, causal, seg_q_i, seg_k_j) & (k_pos < S)[None, None, :]
    return s, mask


def _prepare(q, k, v, segment_ids, block_q, block_k):
    """Blocked q, k, v, segment ids, and the static shape tuple (T, S, bq, bk, D)."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    bq, bk = min(block_q, T), min(block_k, S)  # a short sequence is one block, not padding
    q_blk = to_blocks(q.reshape(B, T, KH, H // KH, D), bq)   # [nq, B, KH, G, bq, D]
    k_blk, v_blk = to_blocks(k, bk), to_blocks(v, bk)         # [nk, B, KH, bk, D]
    if segment_ids is None:
        seg_q = seg_k = None
    else:
        seg_q, seg_k = seg_blocks(segment_ids, bq), seg_blocks(segment_ids, bk)  # [n, B, b]
    return q_blk, k_blk, v_blk, seg_q, seg_k, (T, S, bq, bk, D)


# ----------------------------------------------------------------------------------------------
# Forward: FlashAttention-2, Algorithm 1
# ----------------------------------------------------------------------------------------------

def flash_forward(q, k, v, segment_ids, causal, block_q, block_k):
    """(out [B, T, H, D], lse [nq, B, KH, G, bq] float32, the logsumexp of each query row)."""
    B, T, H, D = q.shape
    q_blk, k_blk, v_blk, seg_q, seg_k, shape = _prepare(q, k, v, segment_ids, block_q, block_k)
    pairs = block_schedule(T, k.shape[1], shape[2], shape[3], causal)
    rows = q_blk.shape[:-1]  # [nq, B, KH, G, bq]

    def step(carry, ij):
        o, m, l = carry  # o [nq, B, KH, G, bq, D]; m, l [nq, B, KH, G, bq], all float32
        i, j = ij
        s, mask = block_scores(take(q_blk, i), take(k_blk, j), i, j, shape, causal,
                               None if seg_q is None else take(seg_q, i),
                               None if seg_k is None else take(seg_k, j))
        s = jnp.where(mask[:, None, None], s, -jnp.inf)               # [B, KH, G, bq, bk]
        m_i, l_i, o_i = take(m, i), take(l, i), take(o, i)
        m_new = jnp.maximum(m_i, s.max(axis=-1))
        # A row that has seen only masked keys so far has m_new = -inf; exp(s - 0) is still an
        # exact 0 there, where exp(-inf - -inf) would be NaN.
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        p = jnp.exp(s - m_safe[..., None])                             # [B, KH, G, bq, bk]
        alpha = jnp.exp(m_i - m_safe)  # rescales what was summed under the old max
        l_i = alpha * l_i + p.sum(axis=-1)
        pv = jnp.einsum("bkgqs,bksd->bkgqd", p.astype(v.dtype), take(v_blk, j),
                        preferred_element_type=jnp.float32)
        o_i = alpha[..., None] * o_i + pv  # unnormalized: FA2 divides by l once, at the end
        return (put(o, i, o_i), put(m, i, m_new), put(l, i, l_i)), None

    init = (jnp.zeros(q_blk.shape, jnp.float32), jnp.full(rows, -jnp.inf, jnp.float32),
            jnp.zeros(rows, jnp.float32))
    (o, m, l), _ = lax.scan(step, init, pairs)
    seen = l > 0  # false only for rows that see no key at all: they give 0, as in lesson 04
    o = o / jnp.where(seen, l, 1.0)[..., None]
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, l, 1.0)), -jnp.inf)
    out = from_blocks(o, T).reshape(B, T, H, D).astype(v.dtype)  # as lesson 04
    return out, lse


# ----------------------------------------------------------------------------------------------
# Backward: FlashAttention-2, Algorithm 2
# ----------------------------------------------------------------------------------------------

def flash_backward(q, k, v, segment_ids, out, lse, d_out, causal, block_q, block_k):
    """(dq, dk, dv), recomputing each block's probabilities from the saved logsumexp.

    With P = softmax(S) and dO the output's cotangent: dV = P^T dO, dP = dO V^T,
    dS = P * (dP - rowsum(dO * O)), dQ = dS K / sqrt(D), dK = dS^T Q / sqrt(D)
    (FlashAttention-2, section 3.1.2). The pairs go key-block-major, as FA2's outer loop over
    key blocks; dQ gathers contributions from every key block (FA2 adds them atomically in HBM,
    here a float32 buffer carried through the loop)."""
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    G = H // KH
    q_blk, k_blk, v_blk, seg_q, seg_k, shape = _prepare(q, k, v, segment_ids, block_q, block_k)
    bq = shape[2]
    do_blk = to_blocks(d_out.reshape(B, T, KH, G, D), bq)  # [nq, B, KH, G, bq, D]
    o_blk = to_blocks(out.reshape(B, T, KH, G, D), bq)
    # delta_i = rowsum(dO_i * O_i) = rowsum(P_i * dP_i): one float32 per query row.
    delta = jnp.sum(do_blk.astype(jnp.float32) * o_blk.astype(jnp.float32), axis=-1)
    pairs = block_schedule(T, S, bq, shape[3], causal, kv_major=True)

    def step(carry, ij):
        dq, dk, dv = carry  # float32, blocked like q and k
        i, j = ij
        q_i, k_j, v_j, do_i = take(q_blk, i), take(k_blk, j), take(v_blk, j), take(do_blk, i)
        s, mask = block_scores(q_i, k_j, i, j, shape, causal,
                               None if seg_q is None else take(seg_q, i),
                               None if seg_k is None else take(seg_k, j))
        p = jnp.where(mask[:, None, None], jnp.exp(s - take(lse, i)[..., None]), 0.0)
        dv_j = jnp.einsum("bkgqs,bkgqd->bksd", p.astype(v.dtype), do_i,
                          preferred_element_type=jnp.float32)
        dp = jnp.einsum("bkgqd,bksd->bkgqs", do_i, v_j, preferred_element_type=jnp.float32)
        ds = p * (dp - take(delta, i)[..., None]) * (1 / math.sqrt(D))  # [B, KH, G, bq, bk]
        ds = ds.astype(q.dtype)  # the matmuls take the input dtype, as FA2 feeds bf16 to them
        dq_i = jnp.einsum("bkgqs,bksd->bkgqd", ds, k_j, preferred_element_type=jnp.float32)
        dk_j = jnp.einsum("bkgqs,bkgqd->bksd", ds, q_i, preferred_element_type=jnp.float32)
        return (put(dq, i, take(dq, i) + dq_i), put(dk, j, take(dk, j) + dk_j),
                put(dv, j, take(dv, j) + dv_j)), None

    init = (jnp.zeros(q_blk.shape, jnp.float32), jnp.zeros(k_blk.shape, jnp.float32),
            jnp.zeros(v_blk.shape, jnp.float32))
    (dq, dk, dv), _ = lax.scan(step, init, pairs)
    dq = from_blocks(dq, T).reshape(B, T, H, D).astype(q.dtype)
    return dq, from_blocks(dk, S).astype(k.dtype), from_blocks(dv, S).astype(v.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _flash(q, k, v, segment_ids, causal, block_q, block_k):
    return flash_forward(q, k, v, segment_ids, causal, block_q, block_k)[0]


def _flash_fwd(q, k, v, segment_ids, causal, block_q, block_k):
    out, lse = flash_forward(q, k, v, segment_ids, causal, block_q, block_k)
    return out, (q, k, v, segment_ids, out, lse)  # residuals: O(T*D), never O(T*S)


def _flash_bwd(causal, block_q, block_k, residuals, d_out):
    q, k, v, segment_ids, out, lse = residuals
    dq, dk, dv = flash_backward(q, k, v, segment_ids, out, lse, d_out, causal, block_q, block_k)
    return dq, dk, dv, None  # integer segment ids get no cotangent


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, causal=False, segment_ids=None, block_q=1024, block_k=1024):
    """Exact attention, same layout and semantics as lesson 04's `attention`, computed blockwise
    with the online softmax: q [B, T, H, D]; k, v [B, S, KH, D]; segment_ids [B, T].

    block_q, block_k: rows of Q and of K/V per block (clamped to T and S). Large blocks suit a
    GPU here: each block pair is one loop step of several kernels, so a step must carry enough
    work to hide their launch; the temporary memory grows with block_q * block_k * H."""
    q, k, v, segment_ids = common.check_attention_inputs(q, k, v, segment_ids)  # empty T, S too
    for name, b in (("block_q", block_q), ("block_k", block_k)):
        if not isinstance(b, (int, np.integer)) or b < 1:
            raise common.UserError(f"{name} must be a positive integer, got {b!r}")
    return _flash(q, k, v, segment_ids, bool(causal), int(block_q), int(block_k))


# ----------------------------------------------------------------------------------------------
# The lecture's arithmetic: how big a block may be to stay on chip
# ----------------------------------------------------------------------------------------------

def on_chip_bytes(block_q, block_k, D, bytes_per_value):
    """What one step of a fused kernel holds on chip: Q_i [B_r, d], K_j and V_j [B_c, d] in the
    input dtype; the scores/probabilities S_ij [B_r, B_c], the output accumulator O_i [B_r, d]
    and m_i, l_i [B_r] in float32. The lecture's count, B_r*B_c + d*(2*B_r + 2*B_c) values,
    with a byte size for each, plus the 2*B_r statistics it leaves out."""
    inputs = bytes_per_value * (block_q * D + 2 * block_k * D)
    return inputs + 4 * (block_q * block_k + block_q * D + 2 * block_q)


def hbm_bytes_per_head(N, D, block_q, block_k, bytes_per_value, order):
    """HBM traffic of one head's forward pass over N queries and N keys, no mask, by loop order.

    "fa1" (FlashAttention, Algorithm 1, the lecture's pseudocode): O, l and m are first
    initialized in HBM (line 2: one write); the outer loop walks K/V blocks, so each K_j, V_j is
    read once, but every inner step reads Q_i and the running O_i, m_i, l_i back from HBM and
    writes them again: T_c = N / B_c round trips of the output, here kept in float32 as it
    accumulates.
    "fa2" (FlashAttention-2, Algorithm 1): the outer loop walks query blocks, so Q_i is read and
    O_i, L_i written once, while K and V are read T_r = N / B_r times.
    "materialized" (lesson 04's order): the [N, N] scores written and read in float32, the
    probabilities written and read in the input dtype (12 bytes per entry in bf16)."""
    b = bytes_per_value
    nd = N * D
    if order == "fa1":
        tc = math.ceil(N / block_k)
        return 2 * nd * b + nd * 4 + 2 * N * 4 + tc * (nd * b + 2 * nd * 4 + 2 * 2 * N * 4)
    if order == "fa2":
        tr = math.ceil(N / block_q)
        return 2 * nd * b + N * 4 + tr * 2 * nd * b
    if order == "materialized":
        return 4 * nd * b + (4 + 4 + b + b) * N * N
    raise ValueError(f"order must be fa1, fa2 or materialized, got {order!r}")


def show_loop_orders(D, dtype, blocks, lengths=(1024, 4096, 16384, 65536)):
    """The two FlashAttention loop orders against the materialized one, per head."""
    b = jnp.dtype(dtype).itemsize
    bq, bk = blocks
    print(f"\nHBM bytes of one head's forward, no mask, D={D}, {dtype}, blocks {bq} x {bk}: "
          f"FlashAttention-1's order (K/V outer, O_i read and written per step) against "
          f"FlashAttention-2's (Q outer, K/V re-read per query block) and the materialized one:")
    print(f"  {'N':>6} {'FA1 order':>11} {'FA2 order':>11} {'FA1 / FA2':>10} {'materialized':>13}")
    for N in lengths:
        fa1, fa2, mat = (hbm_bytes_per_head(N, D, bq, bk, b, o)
                         for o in ("fa1", "fa2", "materialized"))
        print(f"  {N:>6} {fa1 / 2**20:8.1f}MiB {fa2 / 2**20:8.1f}MiB {fa1 / fa2:9.2f}x "
              f"{mat / 2**20:10.1f}MiB")
    print(f"  Per (query, key) pair FA2's order reads 2 D b / B_r = {2 * D * b / bq:g} bytes of K "
          f"and V, against {8 + 2 * b} for the\n  materialized scores and probabilities; FA1's "
          f"order adds a float32 round trip of O per key block.\n  Larger blocks divide both "
          f"(Dao et al. 2022, Theorem 2: Theta(N^2 d^2 / M) for on-chip memory M),\n  and query "
          f"blocks running side by side read the same K/V blocks, which a GPU's L2 can serve: "
          f"these\n  counts are upper bounds. FA2's order also gives each query block to one "
          f"program with no writes\n  between steps, which is why the kernels (lesson 08, and "
          f"this file) take it.")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def gb(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB"


def lengths_between(lo, hi, factor=2):
    out = []
    while lo <= hi:
        out.append(lo)
        lo *= factor
    return out


def timed_lengths(cfg, on_gpu):
    """The S of the benchmark: min_len doubling up to max_len, a 0 replaced by the device's
    default. An empty range is an error that names the bound in force, which may be a default
    the user never typed (two typed bounds are compared by FlashConfig already)."""
    device = "GPU" if on_gpu else "CPU"
    lo = cfg.min_len or (1024 if on_gpu else 256)
    hi = cfg.max_len or (65536 if on_gpu else 512)
    lengths = lengths_between(lo, hi)
    if not lengths and cfg.min_len:
        raise common.UserError(f"min_len={lo} exceeds the longest length measured, {hi} "
                               f"(max_len=0 picks {hi} on a {device})")
    if not lengths:
        raise common.UserError(f"max_len={hi} is below the shortest length measured, {lo} "
                               f"(min_len=0 picks {lo} on a {device})")
    return lengths


def check_correctness(seed):
    """Flash vs lesson 04's attention in float32 on awkward shapes (GQA, T not a block multiple):
    forward, and the gradients of a random weighted sum of the output."""
    B, T, H, KH, D = 2, 300, 4, 2, 32
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (B, T, H, D), jnp.float32)
    k = jax.random.normal(ks[1], (B, T, KH, D), jnp.float32)
    v = jax.random.normal(ks[2], (B, T, KH, D), jnp.float32)
    w = jax.random.normal(ks[3], (B, T, H, D), jnp.float32)
    flash = functools.partial(flash_attention, block_q=128, block_k=64)
    for causal in (False, True):
        def out_and_grads(attn):
            def f(q, k, v, w):
                loss = lambda q, k, v: jnp.sum(attn(q, k, v, causal) * w)
                return attn(q, k, v, causal), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)
            return jax.jit(f)(q, k, v, w)
        with jax.default_matmul_precision("float32"):  # no TF32: compare the algorithms
            o_ref, g_ref = out_and_grads(attn04.attention)
            o, g = out_and_grads(flash)
        err_o = float(jnp.max(jnp.abs(o - o_ref)))
        err_g = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(g, g_ref))
        print(f"  {'causal' if causal else 'full  '} B={B} T=S={T} H={H} KH={KH} D={D} blocks "
              f"128x64: max |out - 04's| {err_o:.1e}, max |grad - autodiff of 04's| {err_g:.1e}")


def show_block_arithmetic(D, dtype, chosen):
    """The lecture's sum for one block step, against the on-chip memory of real chips."""
    chips = [common.device_chip(), common.CHIPS["H100"], common.CHIPS["TPU v5 lite"]]
    chips = [c for c in dict.fromkeys(chips) if c is not None and c.on_chip_bytes]
    b = jnp.dtype(dtype).itemsize
    print(f"\non-chip memory of one block step, B_r*B_c + d*(2*B_r + 2*B_c) + 2*B_r values (D={D}, "
          f"Q, K, V in {dtype}; S_ij, O_i, m_i, l_i in float32):")
    names = [f"{c.name} {c.on_chip_bytes / 2**10:,.0f} KiB" for c in chips]
    print(f"  {'B_r x B_c':>13} {'KiB':>8}  " + "  ".join(f"{n:>22}" for n in names))
    for bq, bk in dict.fromkeys(((64, 64), (128, 64), (128, 128), (128, 256), (256, 256), chosen)):
        n = on_chip_bytes(bq, bk, D, b)
        fits = "  ".join(f"{'fits' if n <= c.on_chip_bytes else 'too big':>22}" for c in chips)
        print(f"  {bq:>6} x {bk:<5} {n / 2**10:8.0f}  {fits}")
    print("  A GPU kernel keeps one step in an SM's shared memory and registers, hence FA2's\n"
          "  64..128-row blocks; a TPU core's VMEM holds far larger ones. This file's blocks span\n"
          "  every head too, fit nowhere on chip, and so go through L2/HBM between kernels.")
    # The simplest fused schedule needs no online softmax: one head's whole [S, S] matrix kept
    # on chip. The lecture rounds it down to 8.3 MB at S = 2048 (2048^2 x 2 bytes is 8.39 MB),
    # which fits the 160 MB of on-chip memory it gives a TPU; at S = 16384 it needs 536.9 MB.
    whole = ", ".join(f"{S * S * b / 1e6:,.1f} MB at S = {S}" for S in (2048, 16384))
    print(f"  Without blocks, one head's whole [S, S] scores in {dtype} take {whole}: on chip "
          f"only for short sequences, which is why the blocks and the online softmax matter.")


def input_bytes(cfg, S, n_sets=2):
    """Bytes of make_inputs(cfg, S, n_sets)."""
    H, KH = cfg.n_heads, cfg.n_kv_heads
    return n_sets * cfg.batch * S * (2 * H + 2 * KH) * cfg.head_dim * jnp.dtype(cfg.dtype).itemsize


def make_inputs(cfg, S, n_sets):
    """n_sets of fresh (q, k, v, d_out): rotated between runs so no run reads a warm cache."""
    B, H, KH, D = cfg.batch, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    shapes = ((B, S, H, D), (B, S, KH, D), (B, S, KH, D), (B, S, H, D))
    sets = []
    for key in jax.random.split(jax.random.key(cfg.seed + S), n_sets):
        sets.append(tuple(jax.random.normal(kk, shape, jnp.dtype(cfg.dtype))
                          for kk, shape in zip(jax.random.split(key, 4), shapes)))
    return sets


def attention_program(attn, causal, mode):
    """fwd: (q, k, v) -> out. fwd+bwd: (q, k, v, d_out) -> (out, dq, dk, dv), the attention work
    of one training step."""
    if mode == "fwd":
        return lambda q, k, v: attn(q, k, v, causal)

    def fwd_bwd(q, k, v, d_out):
        out, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, causal), q, k, v)
        return (out,) + vjp(d_out)
    return fwd_bwd


def measure(attn, name, S, cfg, mode, limit=None, arg_sets=None, iters=0):
    """One cell of the tables: compile (fwd or fwd+bwd at length S), read the program's temporary
    memory, and, given inputs, time it unless it cannot fit in `limit` bytes."""
    B, H, KH, D = cfg.batch, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    shapes = [(B, S, H, D), (B, S, KH, D), (B, S, KH, D)]
    if mode != "fwd":
        shapes.append((B, S, H, D))  # d_out
    cell = {"name": name, "S": S, "mode": mode, "temp": None, "need": None, "ms": None, "note": ""}
    if name == "naive" and limit is not None and 4 * B * H * S * S > limit:
        # Not even compiled: XLA's matmul autotuning would try to allocate the matrix.
        cell["note"] = f"f32 scores alone {gb(4 * B * H * S * S)} > {gb(limit)}"
        return cell
    try:
        compiled = jax.jit(attention_program(attn, cfg.causal, mode)).lower(
            *[jax.ShapeDtypeStruct(s, dtype) for s in shapes]).compile()
    except common.UserError:
        raise
    except (RuntimeError, ValueError, NotImplementedError) as e:  # JaxRuntimeError included
        cell["note"] = f"no compile: {short(e)}"
        return cell
    mem = compiled.memory_analysis()
    cell["temp"] = mem.temp_size_in_bytes
    cell["need"] = mem.argument_size_in_bytes + mem.output_size_in_bytes + mem.temp_size_in_bytes
    if limit is not None and cell["need"] > limit:
        cell["note"] = f"needs {gb(cell['need'])} > {gb(limit)}"
    elif arg_sets:
        try:
            t = common.bench(compiled, iters=iters, warmup=1,
                             arg_sets=[a[:len(shapes)] for a in arg_sets])
            cell["ms"] = t.median_s * 1e3
        except RuntimeError as e:  # JaxRuntimeError: out of memory at run time
            cell["note"] = f"failed: {short(e)}"
    return cell


def short(e):
    """An error's first line, cut to fit a table cell; an allocation that failed anywhere in
    the message (XLA's autotuner reports its own a few lines down) is named with its bytes
    whole, which a cut would split."""
    text = str(e)
    asked = re.search(r"allocating (\d+) bytes", text)
    if asked:
        return f"out of memory, {gb(int(asked.group(1)))} asked"
    asked = re.search(r"Out of memory while trying to allocate ([\d.]+) ?([KMGT]i?B)", text)
    if asked:
        return f"out of memory, {asked.group(1)} {asked.group(2)} asked"
    return text.splitlines()[0][:50] if text else type(e).__name__


def pick_blocks(cfg, S, limit):
    """Time fwd+bwd at one length for a few block shapes and keep the fastest: small blocks pay
    the launch of a loop step's kernels more often; large ones compute more of the masked
    diagonal and overflow the L2 cache."""
    print(f"\nblock sweep at S={S}, forward + backward:")
    arg_sets = make_inputs(cfg, S, 1)
    best = None
    for bq, bk in ((512, 1024), (1024, 1024), (1024, 2048), (2048, 2048)):
        attn = functools.partial(flash_attention, block_q=bq, block_k=bk)
        c = measure(attn, "flash", S, cfg, "fwd+bwd", limit, arg_sets, iters=2)
        steps = len(block_schedule(S, S, bq, bk, cfg.causal)[0])
        result = f"{c['ms']:9.2f} ms" if c["ms"] is not None else c["note"]
        print(f"  {bq:>5} x {bk:<5} {steps:6d} block pairs  temp {gb(c['temp'] or 0):>9}  {result}")
        if c["ms"] is not None and (best is None or c["ms"] < best[0]):
            best = (c["ms"], bq, bk)
    return best[1:] if best else (1024, 1024)


def memory_table(cfg, impls, bq, bk, lengths):
    """Compile-only temporary memory, naive vs flash: nothing is allocated, so any S can be shown,
    measured against an H100's HBM as the yardstick."""
    h100 = common.CHIPS["H100"]
    print(f"\ntemporary memory from the compiled programs (nothing allocated), blocks {bq}x{bk}; "
          f"naive fits = arguments + outputs + temporaries within an {h100.name}'s "
          f"{h100.hbm_bytes / 1e9:.0f} GB:")
    print(f"  {'S':>6} {'naive fwd':>10} {'flash fwd':>10} {'naive f+b':>10} {'flash f+b':>10} "
          f"{'naive/flash':>11}  naive f+b fits")
    first_no_fit = None
    for S in lengths:
        c = {(n, m): measure(impls[n], n, S, cfg, m) for n in ("naive", "flash")
             for m in ("fwd", "fwd+bwd")}
        fits = c["naive", "fwd+bwd"]["need"] <= h100.hbm_bytes
        first_no_fit = first_no_fit or (None if fits else S)
        print(f"  {S:6d} " + " ".join(f"{gb(c[n, m]['temp']):>10}" for m in ("fwd", "fwd+bwd")
                                      for n in ("naive", "flash")) +
              f" {c['naive', 'fwd+bwd']['temp'] / c['flash', 'fwd+bwd']['temp']:10.0f}x  "
              f"{'yes' if fits else 'no'}")
    if first_no_fit:
        print(f"  naive fwd+bwd no longer fits an {h100.name} from S={first_no_fit}; flash needs "
              f"{gb(c['flash', 'fwd+bwd']['need'])} in all at S={lengths[-1]}")


def run_blocks(cfg, on_gpu, lengths, limit):
    """(block_q, block_k): the flags', else on a GPU the fastest that fit (pick_blocks, timed at
    the longest length whose inputs leave room for the run's temporaries), else 256 x 256. A
    flag's block past the longest sequence is that sequence (flash_attention clamps it so)."""
    longest = max(lengths[-1], cfg.mem_max_len)
    if cfg.block_q:
        return min(cfg.block_q, longest), min(cfg.block_k or cfg.block_q, longest)
    if not on_gpu:
        return min(256, longest), min(cfg.block_k or 256, longest)
    S = min(16384, lengths[-1])
    while S > lengths[0] and input_bytes(cfg, S) > limit / 2:
        S //= 2
    return pick_blocks(cfg, S, limit)


def check_outputs(impls, q, k, v, causal, S):
    """Print each implementation's largest distance from a float32 reference on the same
    inputs (one forward each)."""
    try:  # waited for here, so that a reference too large is not blamed on the others
        with jax.default_matmul_precision("float32"):
            ref = jax.block_until_ready(jax.jit(attention_program(attn04.attention, causal, "fwd"))(
                *(x.astype(jnp.float32) for x in (q, k, v))))
    except (RuntimeError, ValueError) as e:
        print(f"  S={S}: no float32 reference to check against ({short(e)})")
        return
    errs = []
    for name, attn in impls.items():
        try:
            o = jax.jit(attention_program(attn, causal, "fwd"))(q, k, v)
            errs.append(f"{name} {float(jnp.max(jnp.abs(o.astype(jnp.float32) - ref))):.1e}")
        except common.UserError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as e:
            errs.append(f"{name} n/a ({short(e)})")
    print(f"  S={S}: max |out - float32 reference|: " + ", ".join(errs))


def print_targets(cells, timed, impls):
    """The issue's targets against the measured cells: flash's time over naive's, naive's
    temporary memory over flash's, and where naive stops running."""
    print("\ntargets: flash no slower than naive at S >= 8k; temporary memory at 16k under 1/8 of "
          "naive's; flash runs where naive cannot")
    for mode in ("fwd", "fwd+bwd"):
        no_fit = [S for S in timed if cells[S, "naive", mode]["ms"] is None
                  and cells[S, "flash", mode]["ms"] is not None]
        if no_fit:
            print(f"  naive {mode} cannot run from S={no_fit[0]} "
                  f"({cells[no_fit[0], 'naive', mode]['note']}); flash runs up to S={timed[-1]}")
    for S in timed:
        c = {(n, m): cells[S, n, m] for n in impls for m in ("fwd", "fwd+bwd")}
        parts = []
        for m in ("fwd", "fwd+bwd"):
            if c["flash", m]["ms"] and c["naive", m]["ms"]:
                ratio = c["flash", m]["ms"] / c["naive", m]["ms"]
                parts.append(f"{m} time flash/naive {ratio:.2f}")
            elif c["flash", m]["ms"]:
                parts.append(f"{m}: naive cannot run, flash can")
        fl, nv = c["flash", "fwd+bwd"], c["naive", "fwd+bwd"]
        if fl["temp"] and nv["temp"]:
            parts.append(f"f+b temp naive/flash {nv['temp'] / fl['temp']:.1f}x")
        if "cudnn" in impls and fl["ms"] and c["cudnn", "fwd+bwd"]["ms"]:
            parts.append(f"f+b time flash/cudnn {fl['ms'] / c['cudnn', 'fwd+bwd']['ms']:.1f}")
        print(f"  S={S:6d}: " + "; ".join(parts))


def print_table(cells, timed, impls, cfg, peak):
    """One row per length and implementation: time, TFLOP/s and % of peak forward and forward +
    backward, and the temporary memory XLA planned for each."""
    def tflops(c):  # FlashAttention's count: 4*B*S^2*H*D forward, halved when causal; the
        # backward 2.5x the forward, so forward + backward is 3.5x
        f = attn04.attention_flops(cfg.batch, c["S"], c["S"], cfg.n_heads, cfg.head_dim,
                                   cfg.causal)
        return f * (1 if c["mode"] == "fwd" else 3.5) / (c["ms"] / 1e3) / 1e12

    print(f"\n{'S':>6} {'impl':<6} {'fwd ms':>9} {'TFLOP/s':>8} {'%peak':>6} {'f+b ms':>9} "
          f"{'TFLOP/s':>8} {'%peak':>6} {'temp fwd':>10} {'temp f+b':>10}  note")
    for S in timed:
        for name in impls:
            row, notes = f"{S:6d} {name:<6}", []
            for mode in ("fwd", "fwd+bwd"):
                c = cells[S, name, mode]
                if c["ms"] is None:
                    row += f" {'-':>9} {'-':>8} {'-':>6}"
                    notes.append(f"{mode}: {c['note']}")
                else:
                    row += f" {c['ms']:9.2f} {tflops(c):8.2f} {100 * tflops(c) * 1e12 / peak:5.1f}%"
            for mode in ("fwd", "fwd+bwd"):
                t = cells[S, name, mode]["temp"]
                row += f" {gb(t) if t is not None else '-':>10}"
            print(row + ("  " + "; ".join(notes) if notes else ""))


def main():
    cfg = common.parse_flags(FlashConfig())
    t_start = time.perf_counter()
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    lengths = timed_lengths(cfg, on_gpu)
    # XLA:CPU runs bf16 matmuls at no more than its float32 rate: that is the CPU's ceiling.
    peak, _, basis = common.ceilings(cfg.dtype if dev.platform != "cpu" else "float32")
    limit, where = common.memory_limit(dev)
    if limit and dev.platform == "cpu":
        # XLA:CPU's own count of a program's buffers fell short of what the process took: the
        # naive forward + backward at S = 8192 counted 17 GB and grew to 24.4 GB, past a 25 GB
        # host. Half the host is the limit a cell is measured under.
        limit, where = limit / 2, f"half of {where}: XLA's CPU estimates run 1.4x short"
    print(f"device: {dev.device_kind}; peak {peak / 1e12:.4g} TFLOP/s ({basis}); memory limit "
          f"{f'{gb(limit)} ({where})' if limit else 'none known'}")
    common.check_fits(f"batch={cfg.batch} n_heads={cfg.n_heads} head_dim={cfg.head_dim} at "
                      f"S={lengths[0]}", input_bytes(cfg, lengths[0]),
                      "two sets of q, k, v and the output's gradient")

    print("\ncorrectness, float32, against lesson 04 (forward, and gradients of a weighted sum):")
    check_correctness(cfg.seed)

    bq, bk = run_blocks(cfg, on_gpu, lengths, limit)
    print(f"flash blocks: block_q={bq}, block_k={bk}")
    show_block_arithmetic(cfg.head_dim, cfg.dtype, (bq, bk))
    show_loop_orders(cfg.head_dim, cfg.dtype, (128, 128))

    impls = {"naive": attn04.attention,
             "flash": functools.partial(flash_attention, block_q=bq, block_k=bk)}
    if on_gpu:
        impls["cudnn"] = lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation="cudnn")
    if not on_gpu:  # on a GPU the benchmark table below carries the same columns, measured
        memory_table(cfg, impls, bq, bk,
                     lengths_between(min(16384, cfg.mem_max_len), cfg.mem_max_len))

    shape_txt = (f"B={cfg.batch} H={cfg.n_heads} KH={cfg.n_kv_heads} D={cfg.head_dim} "
                 f"{cfg.dtype}{' causal' if cfg.causal else ''}")
    print(f"\nbenchmark, {shape_txt}, blocks {bq}x{bk}; FLOPs: forward 4*B*S^2*H*D"
          f"{'/2' if cfg.causal else ''}, backward 2.5x forward; peak {peak / 1e12:.4g} TFLOP/s")
    cells, timed = {}, []
    for S in lengths:
        if timed and time.perf_counter() - t_start > cfg.time_budget_s:  # the first is timed
            print(f"  S={S} and longer skipped: past the {cfg.time_budget_s:g} s time budget")
            break
        if limit and input_bytes(cfg, S) > limit:
            print(f"  S={S} and longer skipped: their inputs alone need "
                  f"{gb(input_bytes(cfg, S))} > {gb(limit)}")
            break
        arg_sets = make_inputs(cfg, S, 2)
        iters = (10 if S <= 4096 else 5 if S <= 16384 else 3 if S <= 32768 else 2) if on_gpu else 3
        for name, attn in impls.items():
            for mode in ("fwd", "fwd+bwd"):
                cells[S, name, mode] = measure(attn, name, S, cfg, mode, limit, arg_sets, iters)
        if S == lengths[0]:  # every implementation against a float32 reference, once
            check_outputs(impls, *arg_sets[0][:3], cfg.causal, S)
        timed.append(S)
        del arg_sets
        print(f"  S={S} done, {time.perf_counter() - t_start:.0f} s elapsed")

    print_targets(cells, timed, impls)
    print_table(cells, timed, impls, cfg, peak)


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --max_len, --mem_max_len, --batch or --n_heads")
