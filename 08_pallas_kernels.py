"""Pallas kernels: when XLA cannot fuse what the roofline says is possible, write the kernel.

    python 08_pallas_kernels.py                      # GPU: every kernel beside its peer
    python 08_pallas_kernels.py --only=matmul,int8   # some of them (matmul, flash, decode, int8)
    python 08_pallas_kernels.py --interpret=true     # CPU: the same kernels, interpreted, small

A Pallas kernel is a Python function over *blocks*: `pallas_call` runs it once per point of a
grid, and each `BlockSpec` says which block of an array one grid point sees (its shape, and an
index map from the grid point to the block's position). What happens inside the body stays on
chip: registers and shared memory on a GPU, VMEM on a TPU. That is the whole lesson of 01
(count the bytes that cross HBM) and 05 (flash attention needs its blocks kept on chip), turned
into code. Four kernels, each with its reference beside it:

  1. `matmul`: a tiled matmul with a fused epilogue (bias + activation). A grid point owns one
     [block_m, block_n] tile of the output and walks K; the tile's shape sets the arithmetic
     intensity (lecture: one output per thread reads 2K values for 2K FLOPs; a 2-D tile of
     m x n outputs reads (m + n)K for 2mnK), and the epilogue is free because the tile is still
     on chip when it runs.
  2. `flash_attention`: FlashAttention-2 (Dao 2023, Algorithms 1 and 2) forward and backward,
     the layout and semantics of lesson 05 ([B, T, H, D], GQA, causal, segment ids, any T and S;
     T == S when causal).
     The scores of a block live only in registers; causal blocks above the diagonal are skipped,
     and under segment ids so are the blocks that no query of a block shares a segment with
     (packed short documents: 2.5x cuDNN's masked attention at 128 tokens a document).
  3. `decode_attention`: one new token per sequence against a KV cache with per-sequence lengths
     (lesson 06's decode step). A single query row gives too little work per sequence, so the
     cache is split in chunks processed in parallel and the partial results combined by their
     logsumexp (flash-decoding, Dao et al. 2023). It is memory-bound: the target is the copy
     bandwidth over the cache bytes actually read (each row stops at its length). An int8
     cache (one scale per position and head) is read as int8 and widened on chip.
  4. `int8_matmul`: weight-only int8 for decode (1..64 rows): the weights cross HBM as 1 byte and
     are widened to bf16 on chip, scaled per output channel in the epilogue. Against XLA's
     own product with int8 weights the layout decides: with the weights input-major ([K, N])
     lesson 06's decode step ran at 1.14x its bf16 speed through XLA and 1.48x through this
     kernel (Llama-3-8B shape, H200); with them output-major ([N, K]) XLA's product ran at
     0.91-0.92x this kernel's time per step, and at 60-98% of the copy bandwidth per weight shape
     where this kernel reached 46-95%. Lesson 06 now uses XLA's and keeps this one as its peer.

The portable kernels use only a grid, BlockSpecs and `jnp` inside the body, so they run
interpreted on a CPU (by default there; `interpret=True` anywhere), compiled on an NVIDIA GPU,
and by their structure on a TPU. On a GPU they are compiled through the Triton lowering of Pallas
(`num_warps`, `num_stages` below), which handles these block shapes and in-kernel loops; JAX
marks that lowering deprecated in favour of Mosaic GPU.

Where the portable version cannot reach the hardware, a second version sits beside it, written
for Hopper (H100, H200) with Pallas' Mosaic GPU dialect: flash attention's forward (2b) and
backward (2c), with TMA copies, wgmma and warp specialisation as in FlashAttention-3 (Shah et
al. 2024). `flash_attention` picks them by itself on an sm90 GPU when the shapes fit. The
matmul and decode kernels reach their targets portably; the int8 kernel reads its weights at
about 75% of the copy bandwidth (BENCHMARKS.md records what limits it).
"""
import dataclasses
import functools
import inspect
import itertools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

import common


@dataclasses.dataclass(frozen=True)
class KernelsConfig:
    only: str = "matmul,flash,decode,int8"  # which kernels to measure, comma-separated
    interpret: bool = False    # run the kernels interpreted (automatic on a CPU)
    matmul_n: int = 0          # M = N = K of the matmul; 0: 8192 on GPU, 256 interpreted
    flash_lengths: str = ""    # S values, comma-separated; "": 1k..32k on GPU, 128,256 interpreted
    flash_tokens: int = 32768  # batch = flash_tokens // S (at least 1): similar work a length
    n_heads: int = 16          # attention benchmark: H = KH
    head_dim: int = 128        # attention and decode benchmarks: D
    decode_batch: int = 32     # decode benchmark: rows, each with decode_len cached tokens
    decode_heads: int = 32     # query heads (Llama-3-8B: 32 query, 8 kv heads)
    decode_kv_heads: int = 8   # decode benchmark: KH (query heads: decode_heads)
    decode_len: int = 8192     # decode benchmark: cached tokens per row
    int8_n: int = 8192         # int8 benchmark: weight [int8_n, int8_n]
    int8_rows: str = "1,2,4,8,16,32,64"  # M values
    seed: int = 0              # of the random inputs

    def __post_init__(self):
        kernels = set(self.only.split(","))
        if not kernels or kernels - {"matmul", "flash", "decode", "int8"}:
            raise common.UserError(f"--only takes matmul, flash, decode, int8; got {self.only!r}")
        for name in ("matmul_n", "flash_tokens", "n_heads", "head_dim", "decode_batch",
                     "decode_heads", "decode_kv_heads", "decode_len", "int8_n"):
            if getattr(self, name) < (0 if name == "matmul_n" else 1):
                raise common.UserError(f"--{name} must be positive, got {getattr(self, name)}")
        if self.decode_heads % self.decode_kv_heads:
            raise common.UserError(f"decode_heads={self.decode_heads} must be a multiple of "
                                   f"decode_kv_heads={self.decode_kv_heads}")
        for name in ("flash_lengths", "int8_rows"):
            text = getattr(self, name)
            if (text or name == "int8_rows") and not all(p.isascii() and p.isdigit() and int(p) > 0
                                for p in text.split(",")):
                raise common.UserError(f"--{name} takes positive integers, comma-separated; "
                                       f"got {text!r}")


# A finite "minus infinity": exp(MASK - m) underflows to 0, and MASK - MASK stays 0 (not NaN)
# for a row whose first visited block is fully masked; a later visible score rescales it away.
MASK = -0.7 * float(np.finfo(np.float32).max)


def compiler_params(num_warps=4, num_stages=3):
    """How a GPU compiles a portable kernel: `num_warps` threads-of-32 per grid point, and
    `num_stages` copies of each loop's loads in flight (software pipelining). Ignored when
    interpreted; a TPU compiles the same kernel through Mosaic TPU with its own defaults."""
    if jax.devices()[0].platform != "gpu":
        return None
    from jax.experimental.pallas import triton as plt
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _pad_to(x, axis, multiple, value=0):
    pad = -x.shape[axis] % multiple
    if pad == 0:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, pad)
    return jnp.pad(x, widths, constant_values=value)


def _check_block(name, b, minimum=16):
    if not isinstance(b, (int, np.integer)) or b < minimum or b & (b - 1):
        raise common.UserError(f"{name} must be a power of two >= {minimum}, got {b!r}")


def _check_count(where, name, n):
    """n (an int, or None for the default) as a grid's count of pieces: a whole number >= 1."""
    if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1):
        raise common.UserError(f"{where}: {name} must be an integer >= 1, got {n!r}")


# ----------------------------------------------------------------------------------------------
# 1. Tiled matmul with a fused epilogue
# ----------------------------------------------------------------------------------------------

ACTIVATIONS = {
    "none": lambda y: y,
    "relu": lambda y: jnp.maximum(y, 0),
    "gelu": lambda y: jax.nn.gelu(y, approximate=True),
    "silu": lambda y: y * jax.nn.sigmoid(y),
}


def matmul_kernel(x_ref, w_ref, b_ref, o_ref, *, block_k, activation):
    # x_ref [block_m, K], w_ref [K, block_n]: this grid point's row panel and column panel.
    # Only a [block_m, block_k] and a [block_k, block_n] slice are loaded per step; the float32
    # accumulator [block_m, block_n] never leaves the chip until the epilogue has run.
    def step(k, acc):
        x = x_ref[:, pl.ds(k * block_k, block_k)]
        w = w_ref[pl.ds(k * block_k, block_k), :]
        return acc + jnp.dot(x, w, preferred_element_type=jnp.float32)

    acc = lax.fori_loop(0, x_ref.shape[1] // block_k, step,
                        jnp.zeros(o_ref.shape, jnp.float32))
    if b_ref is not None:
        acc = acc + b_ref[...].astype(jnp.float32)[None, :]
    o_ref[...] = ACTIVATIONS[activation](acc).astype(o_ref.dtype)


def _interpreted(interpret):
    """interpret=None, every kernel's default: interpreted where Pallas cannot compile (a CPU),
    compiled elsewhere."""
    return jax.devices()[0].platform == "cpu" if interpret is None else bool(interpret)


def matmul(x, w, bias=None, activation="none", block_m=128, block_n=128, block_k=64,
           num_warps=4, num_stages=3, interpret=None):
    """act(x @ w + bias): x [M, K], w [K, N], bias [N] or None; any M, N, K (padded to blocks).
    Accumulates in float32, returns x.dtype."""
    x, w = jnp.asarray(x), jnp.asarray(w)   # (nested lists of numbers too, as jnp takes them)
    interpret = _interpreted(interpret)
    if x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[0]:
        raise common.UserError(f"matmul needs x [M, K] and w [K, N], got {x.shape} and {w.shape}")
    if min(x.shape + w.shape) < 1:
        raise common.UserError(f"matmul: M, K and N must be >= 1, got x {x.shape}, w {w.shape}")
    if bias is not None and jnp.shape(bias) != (w.shape[1],):
        raise common.UserError(f"matmul: bias must be [N] = ({w.shape[1]},), got "
                               f"{jnp.shape(bias)}")
    if activation not in ACTIVATIONS:
        raise common.UserError(f"activation must be one of {sorted(ACTIVATIONS)}, "
                               f"got {activation!r}")
    for name, b in (("block_m", block_m), ("block_n", block_n), ("block_k", block_k)):
        _check_block(name, b)
    (M, K), N = x.shape, w.shape[1]
    block_m, block_n = min(block_m, _pow2_at_least(M)), min(block_n, _pow2_at_least(N))
    block_k = min(block_k, _pow2_at_least(K))
    xp = _pad_to(_pad_to(x, 0, block_m), 1, block_k)   # zero padding adds nothing to the sums
    wp = _pad_to(_pad_to(w, 0, block_k), 1, block_n)
    Mp, Kp, Np = xp.shape[0], xp.shape[1], wp.shape[1]
    in_specs = [pl.BlockSpec((block_m, Kp), lambda i, j: (i, 0)),
                pl.BlockSpec((Kp, block_n), lambda i, j: (0, j))]
    args = [xp, wp]
    if bias is not None:
        in_specs.append(pl.BlockSpec((block_n,), lambda i, j: (j,)))
        args.append(_pad_to(jnp.asarray(bias), 0, block_n))
    kernel = functools.partial(matmul_kernel, block_k=block_k, activation=activation)
    if bias is None:
        kernel = functools.partial(_no_bias, kernel)
    out = pl.pallas_call(
        kernel,
        grid=(Mp // block_m, Np // block_n),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((block_m, block_n), lambda i, j: (i, j)),
        out_shape=jax.ShapeDtypeStruct((Mp, Np), x.dtype),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
    )(*args)
    return out[:M, :N]


def _no_bias(kernel, x_ref, w_ref, o_ref):
    kernel(x_ref, w_ref, None, o_ref)


def _pow2_at_least(n):
    return max(16, 1 << max(0, int(n) - 1).bit_length())


def matmul_reference(x, w, bias=None, activation="none"):
    y = jnp.dot(x, w, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias.astype(jnp.float32)
    return ACTIVATIONS[activation](y).astype(x.dtype)


def tile_intensity(tile_m, tile_n, K, bytes_per_value):
    """FLOPs per byte of HBM traffic when one worker computes a tile_m x tile_n block of outputs:
    2*m*n*K FLOPs over reading m rows and n columns of length K, and writing m*n outputs. The
    lecture's one output per thread is (1, 1): 2K / (2(2K + 1)) at 2 bytes, about 1/2."""
    return 2 * tile_m * tile_n * K / (bytes_per_value * (K * (tile_m + tile_n) + tile_m * tile_n))


# ----------------------------------------------------------------------------------------------
# 2. Flash attention, forward and backward (FlashAttention-2, Algorithms 1 and 2)
# ----------------------------------------------------------------------------------------------

def _dot_nt(a, b):
    """a @ b.T with a float32 result: scores from rows of Q and rows of K."""
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):
    """a.T @ b with a float32 result: gradients summed over the query rows."""
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _visible(q_pos, k_pos, causal, seq_len, seg_q, seg_k):
    """[block_q, block_k] bool: which scores exist. Padding keys (position >= S) never do."""
    ok = k_pos[None, :] < seq_len
    if causal:
        ok &= q_pos[:, None] >= k_pos[None, :]
    if seg_q is not None:
        ok &= seg_q[:, None] == seg_k[None, :]
    return ok


def _kv_ranges(i, block_q, block_k, n_kv, kv_len, causal, has_segments):
    """The key blocks query block i visits, as (unmasked range, masked range): blocks entirely
    visible need no mask arithmetic; the causal diagonal, the padded tail and any block under
    segment ids do. Blocks past the diagonal are not visited at all (half the work); under
    segment ids the kernels also start past the blocks before the first key of their queries'
    segments (`_segment_spans`)."""
    if causal:
        end = lax.div((i + 1) * block_q + block_k - 1, block_k)   # first block wholly above
        end = jnp.minimum(end, n_kv)
        first_masked = jnp.minimum(lax.div(i * block_q, block_k), end)
    else:
        end = n_kv
        first_masked = kv_len // block_k                          # the ragged last block
    if has_segments:
        first_masked = 0
    return first_masked, end


def _first_kv_block(first_ref, block_k):
    """The first key block that a query block can see: 0, or under segment ids the block of the
    earliest first position of its queries' segments (no key before it shares one)."""
    return 0 if first_ref is None else lax.div(jnp.min(first_ref[...]), block_k)


def flash_fwd_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, first_ref, o_ref, lse_ref, *,
                     sm_scale, causal, block_k, kv_len):
    # q_ref [block_q, D] of one (batch, head); k_ref, v_ref [S_padded, D] of its kv head.
    block_q = q_ref.shape[0]
    i = pl.program_id(2)
    q = q_ref[...]
    seg_q = segq_ref[...] if segq_ref is not None else None
    q_pos = i * block_q + jnp.arange(block_q)

    def step(j, carry, masked):
        acc, m_i, l_i = carry
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _dot_nt(q, k) * sm_scale                  # [block_q, block_k] f32
        if masked:
            seg_k = segk_ref[pl.ds(j * block_k, block_k)] if segk_ref is not None else None
            k_pos = j * block_k + jnp.arange(block_k)
            s = jnp.where(_visible(q_pos, k_pos, causal, kv_len, seg_q, seg_k), s, MASK)
        # Online softmax (Algorithm 1, lines 9-10): rescale what is accumulated by
        # exp(m_old - m_new); statistics in float32 whatever the input dtype.
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.exp(s - m_new[:, None])
        l_i = l_i * alpha + p.sum(axis=1)
        acc = acc * alpha[:, None] + jnp.dot(p.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l_i

    n_kv = k_ref.shape[0] // block_k
    first_masked, end = _kv_ranges(i, block_q, block_k, n_kv, kv_len, causal,
                                   segq_ref is not None)
    start = _first_kv_block(first_ref, block_k)
    carry = (jnp.zeros(o_ref.shape, jnp.float32),
             jnp.full((block_q,), MASK, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    carry = lax.fori_loop(start, first_masked, functools.partial(step, masked=False), carry)
    acc, m_i, l_i = lax.fori_loop(jnp.maximum(start, first_masked), end,
                                  functools.partial(step, masked=True), carry)
    l_i = jnp.maximum(l_i, 1e-30)            # only padding rows (discarded) can have l_i == 0
    o_ref[...] = (acc / l_i[:, None]).astype(o_ref.dtype)   # divide once, at the end (FA-2)
    lse_ref[...] = m_i + jnp.log(l_i)        # L_i, all the backward pass needs per row


def flash_dkv_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, last_ref, do_ref, lse_ref,
                     delta_ref, dk_ref, dv_ref, *, sm_scale, causal, block_q, q_len, kv_len):
    # One key block [block_k, D] of one query head walks the query blocks that see it
    # (Algorithm 2's outer loop): dV_j += P^T dO, dK_j += dS^T Q, with P rebuilt from L_i.
    block_k = k_ref.shape[0]
    j = pl.program_id(2)
    k, v = k_ref[...], v_ref[...]
    seg_k = segk_ref[...] if segk_ref is not None else None
    k_pos = j * block_k + jnp.arange(block_k)
    n_q = q_ref.shape[0] // block_q

    def step(i, carry, masked):
        dk, dv = carry
        q = q_ref[pl.ds(i * block_q, block_q), :]
        do = do_ref[pl.ds(i * block_q, block_q), :]
        lse = lse_ref[pl.ds(i * block_q, block_q)]
        delta = delta_ref[pl.ds(i * block_q, block_q)]
        s = _dot_nt(q, k) * sm_scale                  # [block_q, block_k]
        p = jnp.exp(s - lse[:, None])
        if masked:
            seg_q = segq_ref[pl.ds(i * block_q, block_q)] if segq_ref is not None else None
            q_pos = i * block_q + jnp.arange(block_q)
            ok = _visible(q_pos, k_pos, causal, kv_len, seg_q, seg_k) & (q_pos < q_len)[:, None]
            p = jnp.where(ok, p, 0.0)
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        dp = _dot_nt(do, v)                           # [block_q, block_k]
        ds = p * (dp - delta[:, None]) * sm_scale                  # dS = P o (dP - D_i)
        dk = dk + _dot_tn(ds.astype(q.dtype), q)
        return dk, dv

    # Query blocks before the diagonal cannot see this key block (causal): start at it.
    start = lax.div(j * block_k, block_q) if causal else 0
    # Masked blocks: the diagonal band (causal), the ragged last query/key block, segment ids.
    # Under segment ids no query past the last position of this block's segments sees it.
    if segq_ref is not None:
        band_end = jnp.minimum(lax.div(jnp.max(last_ref[...]), block_q) + 1, n_q)
    elif causal:
        band_end = jnp.minimum(lax.div((j + 1) * block_k + block_q - 1, block_q), n_q)
    else:
        band_end = start
    zeros = jnp.zeros(dk_ref.shape, jnp.float32)
    carry = lax.fori_loop(start, band_end, functools.partial(step, masked=True), (zeros, zeros))
    # Past the band, a padded query tail or key tail still needs the mask: keep it on the last.
    ragged = (q_len % block_q != 0) or (kv_len % block_k != 0)
    full_end = n_q - 1 if ragged else n_q
    if segq_ref is None:  # (under segment ids the band holds every query that sees the block)
        carry = lax.fori_loop(band_end, jnp.maximum(band_end, full_end),
                              functools.partial(step, masked=False), carry)
        if ragged:
            carry = lax.fori_loop(jnp.maximum(band_end, full_end), n_q,
                                  functools.partial(step, masked=True), carry)
    dk, dv = carry
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def flash_dq_kernel(q_ref, k_ref, v_ref, segq_ref, segk_ref, first_ref, do_ref, lse_ref,
                    delta_ref, dq_ref, *, sm_scale, causal, block_k, kv_len):
    # One query block walks the key blocks it sees: dQ_i += dS K (a separate pass, so no two
    # grid points ever add into the same dQ rows).
    block_q = q_ref.shape[0]
    i = pl.program_id(2)
    q, do = q_ref[...], do_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]
    seg_q = segq_ref[...] if segq_ref is not None else None
    q_pos = i * block_q + jnp.arange(block_q)

    def step(j, dq, masked):
        k = k_ref[pl.ds(j * block_k, block_k), :]
        v = v_ref[pl.ds(j * block_k, block_k), :]
        s = _dot_nt(q, k) * sm_scale
        p = jnp.exp(s - lse[:, None])
        if masked:
            seg_k = segk_ref[pl.ds(j * block_k, block_k)] if segk_ref is not None else None
            k_pos = j * block_k + jnp.arange(block_k)
            p = jnp.where(_visible(q_pos, k_pos, causal, kv_len, seg_q, seg_k), p, 0.0)
        dp = _dot_nt(do, v)
        ds = p * (dp - delta[:, None]) * sm_scale
        return dq + jnp.dot(ds.astype(k.dtype), k, preferred_element_type=jnp.float32)

    n_kv = k_ref.shape[0] // block_k
    first_masked, end = _kv_ranges(i, block_q, block_k, n_kv, kv_len, causal,
                                   segq_ref is not None)
    start = _first_kv_block(first_ref, block_k)
    dq = lax.fori_loop(start, first_masked, functools.partial(step, masked=False),
                       jnp.zeros(dq_ref.shape, jnp.float32))
    dq = lax.fori_loop(jnp.maximum(start, first_masked), end,
                       functools.partial(step, masked=True), dq)
    dq_ref[...] = dq.astype(dq_ref.dtype)


@dataclasses.dataclass(frozen=True)
class FlashBlocks:
    block_q: int = 128          # forward: query rows per grid point
    block_k: int = 64           # forward: key rows per loop step
    block_q_bwd: int = 64       # backward: query rows per step (dK/dV) and per grid point (dQ)
    block_k_bwd: int = 64       # backward: key rows per grid point (dK/dV) and per step (dQ)
    num_warps: int = 4          # forward
    num_stages: int = 2
    num_warps_bwd: int = 4      # both backward kernels
    num_stages_bwd: int = 2


def _attention_specs(B, H, G, Tp, Sp, D, blk, along_q, has_segments):
    """BlockSpecs over [B, T, H, D] for a grid (B, H, blocks): the axis `along_q` ("q" or "k")
    is split into blocks of `blk` rows, the other is seen whole and walked inside the kernel.
    Query head h reads kv head h // G (GQA)."""
    def rows(n_rows, tiled, kv):
        head = (lambda h: h // G) if kv else (lambda h: h)
        if tiled:
            return pl.BlockSpec((None, blk, None, D), lambda b, h, i: (b, i, head(h), 0))
        return pl.BlockSpec((None, n_rows, None, D), lambda b, h, i: (b, 0, head(h), 0))

    q_tiled = along_q == "q"
    specs = [rows(Tp, q_tiled, False), rows(Sp, not q_tiled, True), rows(Sp, not q_tiled, True)]
    if has_segments:  # segment ids of the queries and of the keys, then the tiled rows' span
        tile = pl.BlockSpec((None, blk), lambda b, h, i: (b, i))
        specs += [tile if q_tiled else pl.BlockSpec((None, Tp), lambda b, h, i: (b, 0)),
                  pl.BlockSpec((None, Sp), lambda b, h, i: (b, 0)) if q_tiled else tile, tile]
    return specs


def _with_segments(kernel, has_segments, n_before):
    """Adapt a kernel whose signature has (segq_ref, segk_ref, span_ref) after `n_before` refs:
    without segment ids they are not passed, and the kernel sees None."""
    if has_segments:
        return kernel

    def wrapped(*refs):
        return kernel(*refs[:n_before], None, None, None, *refs[n_before:])
    return wrapped


def _segment_spans(seg):
    """(first, last) [B, T] int32: the first and the last position in its row of each position's
    segment id. Ids may repeat anywhere in a row; packed documents give runs."""
    B, T = seg.shape
    order = jnp.argsort(seg, axis=1, stable=True)      # by id, then by position
    ids = jnp.take_along_axis(seg, order, 1)
    pos = jnp.broadcast_to(jnp.arange(T), (B, T))
    starts = jnp.concatenate([jnp.ones((B, 1), bool), ids[:, 1:] != ids[:, :-1]], 1)
    ends = jnp.concatenate([starts[:, 1:], jnp.ones((B, 1), bool)], 1)
    run_start = lax.cummax(jnp.where(starts, pos, 0), axis=1)
    run_end = lax.cummin(jnp.where(ends, pos, T - 1), axis=1, reverse=True)
    rows = jnp.arange(B)[:, None]
    first = jnp.zeros_like(seg).at[rows, order].set(jnp.take_along_axis(order, run_start, 1))
    last = jnp.zeros_like(seg).at[rows, order].set(jnp.take_along_axis(order, run_end, 1))
    return first.astype(jnp.int32), last.astype(jnp.int32)


def causal_blocks_visited(seg, block_q, block_k):
    """The share of the causal key blocks that the forward kernel visits under segment ids
    seg [B, T] (T == S), with the blocks it runs at (flash_attention shrinks them to short
    lengths): per query block, from the block of its segments' earliest first position up to
    the diagonal, as _kv_ranges and _first_kv_block bound its loop."""
    B, T = seg.shape
    block_q, block_k = min(block_q, _pow2_at_least(T)), min(block_k, _pow2_at_least(T))
    n_kv = -(-T // block_k)
    first = _pad_to(_segment_spans(jnp.asarray(seg))[0], 1, block_q, n_kv * block_k)
    start = np.asarray(first).reshape(B, -1, block_q).min(-1) // block_k    # [B, query blocks]
    end = np.minimum(-(-(np.arange(start.shape[1]) + 1) * block_q // block_k), n_kv)
    return float(np.maximum(end - start, 0).sum() / (B * end.sum()))


def _flash_forward(q, k, v, seg, causal, sm_scale, blocks, interpret):
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    bq, bk = blocks.block_q, blocks.block_k
    qp, kp, vp = _pad_to(q, 1, bq), _pad_to(k, 1, bk), _pad_to(v, 1, bk)
    Tp, Sp = qp.shape[1], kp.shape[1]
    has_seg = seg is not None
    args = [qp, kp, vp]
    if has_seg:  # padded queries' first positions lie past every key: they start no earlier
        first = _pad_to(_segment_spans(seg)[0], 1, bq, Sp)
        args += [_pad_to(seg, 1, bq), _pad_to(seg, 1, bk), first]
    kernel = functools.partial(flash_fwd_kernel, sm_scale=sm_scale, causal=causal, block_k=bk,
                               kv_len=S)
    out, lse = pl.pallas_call(
        _with_segments(kernel, has_seg, 3),
        grid=(B, H, Tp // bq),
        in_specs=_attention_specs(B, H, H // KH, Tp, Sp, D, bq, "q", has_seg),
        out_specs=[pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
                   pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))],
        out_shape=[jax.ShapeDtypeStruct(qp.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, H, Tp), jnp.float32)],
        compiler_params=compiler_params(blocks.num_warps, blocks.num_stages),
        interpret=interpret,
    )(*args)
    return out[:, :T], lse   # lse stays padded [B, H, Tp]: the backward pass reuses it


def _flash_backward(q, k, v, seg, out, lse, d_out, causal, sm_scale, blocks, interpret):
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    G = H // KH
    bq, bk = blocks.block_q_bwd, blocks.block_k_bwd
    step = math.lcm(bq, bk, blocks.block_q)        # one padding that suits every block size
    qp, dop = _pad_to(q, 1, step), _pad_to(d_out, 1, step)
    kp, vp = _pad_to(k, 1, bk), _pad_to(v, 1, bk)
    Tp, Sp = qp.shape[1], kp.shape[1]
    lse = _pad_to(lse, 2, step)[:, :, :Tp]
    # D_i = rowsum(dO o O) (Algorithm 2, line 4): one fused elementwise pass, left to XLA.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    delta = _pad_to(delta, 2, step)
    has_seg = seg is not None
    segs, first, last = [], [], []
    if has_seg:  # padded rows' spans are ones that leave the real rows' bounds as they are
        segs = [_pad_to(seg, 1, step), _pad_to(seg, 1, bk)]
        first, last = _segment_spans(seg)
        first, last = [_pad_to(first, 1, step, Sp)], [_pad_to(last, 1, bk, -1)]
    params = compiler_params(blocks.num_warps_bwd, blocks.num_stages_bwd)
    row_stats_whole = pl.BlockSpec((None, None, Tp), lambda b, h, i: (b, h, 0))
    row_stats_tile = pl.BlockSpec((None, None, bq), lambda b, h, i: (b, h, i))

    # dK, dV per *query* head, [B, S, H, D]; the G heads sharing a kv head are summed after.
    dkv_specs = _attention_specs(B, H, G, Tp, Sp, D, bk, "k", has_seg)
    dkv_specs += [pl.BlockSpec((None, Tp, None, D), lambda b, h, j: (b, 0, h, 0)),
                  row_stats_whole, row_stats_whole]
    kernel = functools.partial(flash_dkv_kernel, sm_scale=sm_scale, causal=causal, block_q=bq,
                               q_len=T, kv_len=S)
    dk, dv = pl.pallas_call(
        _with_segments(kernel, has_seg, 3),
        grid=(B, H, Sp // bk),
        in_specs=dkv_specs,
        out_specs=[pl.BlockSpec((None, bk, None, D), lambda b, h, j: (b, j, h, 0))] * 2,
        out_shape=[jax.ShapeDtypeStruct((B, Sp, H, D), jnp.float32)] * 2,
        compiler_params=params, interpret=interpret,
    )(qp, kp, vp, *segs, *last, dop, lse, delta)
    dk = dk[:, :S].reshape(B, S, KH, G, D).sum(3).astype(k.dtype)
    dv = dv[:, :S].reshape(B, S, KH, G, D).sum(3).astype(v.dtype)

    dq_specs = _attention_specs(B, H, G, Tp, Sp, D, bq, "q", has_seg)
    dq_specs += [pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
                 row_stats_tile, row_stats_tile]
    kernel = functools.partial(flash_dq_kernel, sm_scale=sm_scale, causal=causal, block_k=bk,
                               kv_len=S)
    dq = pl.pallas_call(
        _with_segments(kernel, has_seg, 3),
        grid=(B, H, Tp // bq),
        in_specs=dq_specs,
        out_specs=pl.BlockSpec((None, bq, None, D), lambda b, h, i: (b, i, h, 0)),
        out_shape=jax.ShapeDtypeStruct(qp.shape, q.dtype),
        compiler_params=params, interpret=interpret,
    )(qp, kp, vp, *segs, *first, dop, lse, delta)
    return dq[:, :T], dk, dv


# ----------------------------------------------------------------------------------------------
# 2b. The forward pass written for Hopper (sm90): TMA, wgmma, warp specialisation
# ----------------------------------------------------------------------------------------------
#
# The portable forward above leaves the schedule to the compiler: each grid point loads a K/V
# block, waits, multiplies, exponentiates, multiplies again. On an H100/H200 that reaches about
# half of cuDNN (measured in main). FlashAttention-3 (Shah et al. 2024) closes the gap with what
# Hopper adds, written here with Pallas' Mosaic GPU dialect (`plgpu.kernel`):
#
#   * TMA: one thread asks the copy engine for a whole [block_kv, D] tile of K or V; it lands in
#     shared memory and signals an mbarrier, so no thread spends registers or time on loads.
#   * wgmma: a warpgroup (4 warps) issues one asynchronous matmul on the tensor cores, operands
#     in shared memory (or P in registers), the accumulator in registers.
#   * Warp specialisation: one CTA = three warpgroups. Warpgroup 2 only streams K and V into a
#     ring of `stages` shared-memory slots (and gives its registers away with setmaxnreg);
#     warpgroups 0 and 1 each own block_q query rows and do S = Q K^T, the online softmax in
#     float32 registers, and O += P V.
#   * Ping-pong: a two-party barrier (`turn`) makes the two math warpgroups alternate, so one's
#     softmax (exp2 on the slow special-function unit) overlaps the other's matmuls.
#
# Scores are scaled by sm_scale * log2(e) once, so the softmax runs in base 2 (exp2 is a single
# instruction); the logsumexp is converted back to natural log for the backward pass.
# Causal: tiles wholly right of the diagonal are never loaded, tiles wholly left are not
# masked. Segment ids: each position's id is replaced by its segment's first position (the same
# partition, and exact in float32), the queries' ids are loaded once and the keys' ride with
# each K tile; every tile is masked, and a CTA streams only the key tiles its queries' segments
# reach (`_span_tiles`, read from global memory at the start). T, S must be multiples of the
# tiles: `flash_attention` falls back to the portable kernel otherwise.

_LN2 = math.log(2.0)
_LOG2E = math.log2(math.e)
# Measured best on an H200. A third K/V stage does not fit: Mosaic GPU asked for 232,568 bytes
# of shared memory, 120 more than the 232,448 a CTA may have (hopper_smem_bytes counts the tiles
# and barriers, 230,008; the compiler adds a little scratch of its own).
HOPPER_BLOCK_Q, HOPPER_BLOCK_KV, HOPPER_STAGES = 64, 128, 2
# What a CTA may take on sm90, and the scratch Mosaic GPU adds to hopper_smem_bytes' count (the
# same 2,560 bytes at D = 128 and 256, on an H200 and an H100).
SM90_SMEM_PER_CTA, MOSAIC_SCRATCH = 232_448, 2_560


def hopper_smem_bytes(block_q, block_kv, stages, D, itemsize=2, segments=False):
    """Shared memory the Hopper forward's buffers take per CTA: Q (and then O) tiles of both
    math warpgroups, the K and V rings of `stages` slots, the logsumexp rows, and one 8-byte
    mbarrier per signal (with segment ids, the queries' ids and a ring of the keys' too).
    Registers hold the scores and the accumulator. The compiler's own count is a little higher
    (its scratch)."""
    tiles = itemsize * D * (2 * block_q + 2 * stages * block_kv) + 4 * 2 * block_q
    barriers = 8 * (2 + 4 * stages + 1)
    if segments:
        tiles += 4 * (2 * block_q + stages * block_kv)
        barriers += 8 * (2 + stages)
    return tiles + barriers


def hopper_available(q, k, segment_ids, causal):
    """Whether the Hopper forward applies: an sm90 GPU, 16-bit inputs, D a multiple of 64 whose
    tiles fit in shared memory (64 and 128: at 192 its tiles take 240 of 227 KiB), T a multiple
    of 2 * block_q and S of block_kv (T == S if causal; segment ids ask for T == S themselves,
    checked before this, and T below 2^24 here, so that positions are exact in float32)."""
    dev = jax.devices()[0]
    T, S, D = q.shape[1], k.shape[1], q.shape[3]
    segments = segment_ids is not None
    return (dev.platform == "gpu" and getattr(dev, "compute_capability", "") == "9.0"
            and q.dtype in (jnp.bfloat16, jnp.float16) and k.dtype == q.dtype
            and D % 64 == 0 and (not segments or T < 2**24)
            and hopper_smem_bytes(HOPPER_BLOCK_Q, HOPPER_BLOCK_KV, HOPPER_STAGES, D,
                                  segments=segments)
            + MOSAIC_SCRATCH <= SM90_SMEM_PER_CTA
            and T % (2 * HOPPER_BLOCK_Q) == 0 and S % HOPPER_BLOCK_KV == 0
            and (T == S or not causal))


def _span_tiles(first, last, rows, cols):
    """[B, T // rows, 2] int32: for each tile of `rows` positions, the first tile of `cols`
    positions that its positions' segments reach, and one past the last (first and last are
    `_segment_spans`). The Hopper kernels read them to bound their loops."""
    B = first.shape[0]
    lo = first.reshape(B, -1, rows).min(-1) // cols
    hi = last.reshape(B, -1, rows).max(-1) // cols + 1
    return jnp.stack([lo, hi], -1).astype(jnp.int32)


def _hopper_forward(q, k, v, seg=None, *, causal, sm_scale, block_q, block_kv, stages,
                    heavy_first):
    """seg: None, or (ids, bounds): each position's segment as its first position, float32
    [B, T], and `_span_tiles` of the CTAs' rows over the key tiles."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # imported only where it runs

    batch, t_len, n_heads, head_dim = q.shape
    s_len, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    dtype = q.dtype
    n_q_tiles = t_len // (2 * block_q)
    n_kv_total = s_len // block_kv
    # Never allocate more ring slots than there are tiles to stream.
    stages = min(stages, n_kv_total)
    score_scale = sm_scale * _LOG2E   # one multiply: temperature + change of base

    has_seg = seg is not None

    def body(q_gmem, k_gmem, v_gmem, *refs):
        if has_seg:
            (ids_gmem, bounds_gmem, out_gmem, lse_gmem, q_smem, k_smem, v_smem,
             lse_smem, q_landed, k_landed, v_landed, k_free, v_free, turn,
             segq_smem, segk_smem, segq_landed, segk_landed) = refs
        else:
            (out_gmem, lse_gmem, q_smem, k_smem, v_smem, lse_smem,
             q_landed, k_landed, v_landed, k_free, v_free, turn) = refs
        wg = lax.axis_index("wg")
        head = lax.axis_index("head")
        b = lax.axis_index("batch")
        tile = lax.axis_index("q_tile")
        if causal and heavy_first:
            tile = n_q_tiles - 1 - tile     # the bottom rows see the most keys
        cta_row0 = tile * (2 * block_q)
        # The key tiles this CTA streams: [kv_start, kv_end), all of them without segment ids;
        # with them, those that its queries' segments reach.
        kv_start, kv_end = 0, n_kv_total
        if has_seg:
            kv_start, kv_end = bounds_gmem[b, tile, 0], bounds_gmem[b, tile, 1]

        def kv_steps_for(row_end):
            # One past the last K/V tile a block of query rows ending at row_end must see.
            # Under causal the diagonal (kv_end lies no earlier: the last row sees itself).
            if not causal:
                return kv_end            # without segments a Python int: static loops
            return lax.div(row_end + (block_kv - 1), jnp.int32(block_kv))

        def slot_of(step):
            return lax.rem(step - kv_start, jnp.int32(stages))

        # The loader streams as many tiles as the *later* warpgroup needs.
        cta_steps = kv_steps_for(cta_row0 + 2 * block_q)

        def take_turn():
            # Two-party rendezvous between the math warpgroups (the ping-pong of 2b).
            plgpu.barrier_arrive(turn)
            plgpu.barrier_wait(turn)

        @pl.when(wg < 2)
        def _math_warpgroup():
            plgpu.set_max_registers(232, action="increase")
            my_q = q_smem.at[wg]
            row0 = cta_row0 + wg * block_q
            my_steps = kv_steps_for(row0 + block_q)

            plgpu.copy_gmem_to_smem(q_gmem.at[b, pl.ds(row0, block_q), head], my_q,
                                                            q_landed.at[wg])
            if has_seg:
                plgpu.copy_gmem_to_smem(ids_gmem.at[b, pl.ds(row0, block_q)],
                                        segq_smem.at[wg], segq_landed.at[wg])

            row_vec = plgpu.Layout.WGMMA.reduce(1)
            m = plgpu.layout_cast(jnp.full((block_q,), -jnp.inf, jnp.float32), row_vec)
            l = plgpu.layout_cast(jnp.full((block_q,), 0.0, jnp.float32), row_vec)
            acc = plgpu.layout_cast(jnp.zeros((block_q, head_dim), jnp.float32),
                                                            plgpu.Layout.WGMMA)

            if has_seg:
                plgpu.barrier_wait(segq_landed.at[wg])
                seg_rows = lax.broadcast_in_dim(_load(plgpu, segq_smem.at[wg], layout=row_vec),
                                                (block_q, block_kv), [0])
            plgpu.barrier_wait(q_landed.at[wg])
            plgpu.barrier_wait(k_landed.at[0])   # every CTA streams a tile: queries see themselves
            # Warpgroup 1 starts half a step behind warpgroup 0.
            pl.when(wg == 1)(take_turn)

            def one_step(step, carry, *, masked):
                acc, m, l = carry
                slot = slot_of(step)
                if has_seg:   # the keys' ids, read before the K slot is given back
                    plgpu.barrier_wait(segk_landed.at[slot])
                    seg_cols = _load(plgpu, segk_smem.at[slot],
                                     layout=plgpu.Layout.WGMMA.reduce(0))

                # ---- S = Q @ K^T on the tensor cores --------------------------------
                def scores(s_acc):
                    plgpu.wgmma(s_acc, my_q, k_smem.at[slot].T)
                    take_turn()            # let the other warpgroup have the tensor cores
                    return s_acc[...]      # reading the accumulator waits for the wgmma
                s = pl.run_scoped(scores, plgpu.ACC((block_q, block_kv), jnp.float32))
                plgpu.barrier_arrive(k_free.at[slot])   # K slot may be refilled

                if masked:
                    # Only tiles crossing the diagonal get here.  Keep key <= query.
                    qi = plgpu.broadcasted_iota(jnp.int32, s.shape, 0, layout=plgpu.Layout.WGMMA)
                    kj = plgpu.broadcasted_iota(jnp.int32, s.shape, 1, layout=plgpu.Layout.WGMMA)
                    s = jnp.where(qi + row0 >= kj + step * block_kv, s, -jnp.inf)
                if has_seg:   # keep keys of the query's own segment
                    same = seg_rows == lax.broadcast_in_dim(seg_cols, s.shape, [1])
                    s = jnp.where(same, s, -jnp.inf)

                # ---- online softmax (float32, base 2) ------------------------------
                m_new = jnp.maximum(m, s.max(axis=1) * score_scale)
                # Under segment ids a row may have seen no key yet: subtract 0, not -inf.
                m_sub = jnp.where(m_new == -jnp.inf, 0.0, m_new) if has_seg else m_new
                rescale = jnp.exp2(m - m_sub)
                p = jnp.exp2(s * score_scale - lax.broadcast_in_dim(m_sub, s.shape, [0]))
                acc = acc * lax.broadcast_in_dim(rescale, acc.shape, [0])
                l = l * rescale + p.sum(axis=1)
                p_lo = p.astype(dtype)
                # Pin the softmax results before the hand-over so the compiler does not
                # sink parts of the softmax past the barrier below.
                acc, l, m_new, p_lo = lax.optimization_barrier((acc, l, m_new, p_lo))

                plgpu.barrier_arrive(turn)            # softmax done
                plgpu.barrier_wait(v_landed.at[slot])
                plgpu.barrier_wait(turn)              # tensor cores are ours again

                # ---- O += P @ V --------------------------------------------------
                def accumulate(o_acc):
                    plgpu.wgmma(o_acc, p_lo, v_smem.at[slot])
                    # While the matmul runs, wait for the next K tile to land.
                    nxt = step + 1
                    @pl.when(nxt < my_steps)
                    def _():
                        plgpu.barrier_wait(k_landed.at[slot_of(nxt)])
                acc = pl.run_state(accumulate)(plgpu.ACC.init(acc))
                plgpu.barrier_arrive(v_free.at[slot])   # V slot may be refilled
                return acc, m_new, l

            carry = (acc, m, l)
            if not causal:
                carry = lax.fori_loop(kv_start, my_steps,
                                      functools.partial(one_step, masked=False), carry)
            else:
                # Tiles that end at or before our first row need no causal mask. (Under
                # segment ids kv_start is at or before row0's tile: row0 sees itself.)
                n_unmasked = lax.div(row0, jnp.int32(block_kv))
                carry = lax.fori_loop(kv_start, n_unmasked,
                                      functools.partial(one_step, masked=False), carry)
                carry = lax.fori_loop(n_unmasked, my_steps,
                                      functools.partial(one_step, masked=True), carry)

                # Warpgroup 0 may need fewer tiles than warpgroup 1.  It still has to
                # release the slots the loader filled for the CTA and keep the
                # ping-pong barrier in step (two rendezvous per tile).
                @pl.loop(my_steps, cta_steps)
                def _drain(step):
                    slot = slot_of(step)
                    plgpu.barrier_arrive(k_free.at[slot])
                    plgpu.barrier_arrive(v_free.at[slot])
                    take_turn()
                    take_turn()
            acc, m, l = carry
            # Warpgroup 0 pays back the rendezvous warpgroup 1 made at the start.
            pl.when(wg == 0)(take_turn)

            # ---- epilogue: normalise, write O and the logsumexp -------------------
            inv_l = 1.0 / l
            out = acc * lax.broadcast_in_dim(inv_l, acc.shape, [0])
            my_q[...] = out.astype(dtype)       # Q is no longer needed: reuse its slot
            # lse = ln(sum_j exp(scale * s_j)) = ln2 * (m + log2(l)), m in base-2 units.
            lse_smem.at[wg][...] = (m + jnp.log2(l)) * _LN2
            plgpu.commit_smem()
            plgpu.copy_smem_to_gmem(my_q, out_gmem.at[b, pl.ds(row0, block_q), head])
            plgpu.copy_smem_to_gmem(lse_smem.at[wg], lse_gmem.at[b, head, pl.ds(row0, block_q)])
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _loader_warpgroup():
            plgpu.set_max_registers(40, action="decrease")
            kv_head = lax.div(head, jnp.int32(group))

            def issue(step, slot, what):
                rows = pl.ds(step * block_kv, block_kv)
                if what == "k":
                    plgpu.copy_gmem_to_smem(k_gmem.at[b, rows, kv_head], k_smem.at[slot],
                                            k_landed.at[slot])
                    if has_seg:
                        plgpu.copy_gmem_to_smem(ids_gmem.at[b, rows], segk_smem.at[slot],
                                                segk_landed.at[slot])
                else:
                    plgpu.copy_gmem_to_smem(v_gmem.at[b, rows, kv_head], v_smem.at[slot],
                                            v_landed.at[slot])

            # Fill the ring.
            for i in range(stages):
                @pl.when(i < cta_steps - kv_start)
                def _():
                    issue(kv_start + i, i, "k")
                    issue(kv_start + i, i, "v")

            # Steady state: refill a slot as soon as both math warpgroups freed it.
            @pl.loop(0, cta_steps - kv_start - stages)
            def _(step):
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(k_free.at[slot])
                issue(kv_start + step + stages, slot, "k")
                plgpu.barrier_wait(v_free.at[slot])
                issue(kv_start + step + stages, slot, "v")

    # 128-byte swizzled, (8, 64)-tiled shared-memory layout: what wgmma and TMA
    # both want for 16-bit operands with 64-element (128-byte) rows.
    mma_layout = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
            plgpu.SMEM((2, block_q, head_dim), dtype, transforms=mma_layout),       # Q / O
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=mma_layout),  # K ring
            plgpu.SMEM((stages, block_kv, head_dim), dtype, transforms=mma_layout),  # V ring
            plgpu.SMEM((2, block_q), jnp.float32),                                   # lse
            plgpu.Barrier(num_barriers=2),                                           # Q landed
            plgpu.Barrier(num_barriers=stages),                                      # K landed
            plgpu.Barrier(num_barriers=stages),                                      # V landed
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),                      # K free
            plgpu.Barrier(num_arrivals=2, num_barriers=stages),                      # V free
            plgpu.Barrier(num_arrivals=2),                                           # turn
    )
    if has_seg:
        scratch += (
            plgpu.SMEM((2, block_q), jnp.float32),                                   # q ids
            plgpu.SMEM((stages, block_kv), jnp.float32),                             # k ids
            plgpu.Barrier(num_barriers=2),                                           # landed
            plgpu.Barrier(num_barriers=stages),                                      # landed
        )
    out_type = (
            jax.ShapeDtypeStruct(q.shape, dtype),
            jax.ShapeDtypeStruct((batch, n_heads, t_len), jnp.float32),
    )
    out, lse = plgpu.kernel(
            body,
            out_type=out_type,
            scratch_types=scratch,
            # Heads vary fastest: CTAs running at the same time mostly share the
            # same K/V rows (and, with GQA, the same kv head), which helps L2.
            grid=(n_heads, n_q_tiles, batch),
            grid_names=("head", "q_tile", "batch"),
            num_threads=3,
            thread_name="wg",
            compiler_params=plgpu.CompilerParams(approx_math=True),
        )(q, k, v, *(seg if has_seg else ()))
    return out, lse


# ----------------------------------------------------------------------------------------------
# 2c. The backward pass written for Hopper: five matmuls per block pair instead of seven
# ----------------------------------------------------------------------------------------------
#
# The portable backward runs two kernels: dK, dV walking the query blocks, then dQ walking the
# key blocks, which rebuilds P and dP a second time (seven matmuls per block pair where the
# algorithm needs five). This one does all five in one kernel, as FlashAttention-3 does:
#
#   * A CTA owns 2 * block_kv keys of one head; math warpgroups 0 and 1 each keep block_kv of
#     them (K, V in shared memory, dK, dV accumulating in registers) and walk the query blocks.
#     Warpgroup 2 streams Q, dO and the per-row statistics (L in base 2, and D_i) with TMA into
#     a ring of `stages` slots that both math warpgroups read.
#   * They work in the transposed frame, S^T = K Q^T [keys, queries], so that P^T and dS^T come
#     out of the tensor cores in the shape dV += P^T dO and dK += dS^T Q take as their left
#     operand, straight from registers.
#   * dQ sums over all key blocks, which live in different CTAs. Each step both warpgroups put
#     dS^T in shared memory, meet, and each computes half of dQ's columns over the CTA's keys;
#     the float32 part is added into a zeroed dQ buffer in global memory by a TMA reduce-add
#     copy (the addition happens in L2, and no thread waits for it). At D = 64 half the columns
#     would cut a 128-byte swizzled row in two, so there each warpgroup computes all of dQ's
#     columns over its own keys, and both add theirs: the same FLOPs and twice the bytes added
#     (as many as at D = 128), and no meeting. Segment ids: each warpgroup loads its keys' ids
#     once; the queries' ids come as a third row of the statistics ring, beside L and D.
# Needs D = 64, 128 or 256; T a multiple of block_q, S of 2 * block_kv. The lesson uses it after
# the Hopper forward, whose logsumexp it reads.

HOPPER_BWD_BLOCK_Q, HOPPER_BWD_BLOCK_KV, HOPPER_BWD_STAGES = 64, 64, 2   # measured on an H200


def hopper_backward_available(q, k, causal):
    """After the Hopper forward (hopper_available): whether the Hopper backward applies too."""
    T, S = q.shape[1], k.shape[1]
    return (q.shape[3] in (64, 128, 256) and T % HOPPER_BWD_BLOCK_Q == 0
            and S % (2 * HOPPER_BWD_BLOCK_KV) == 0 and (T == S or not causal))


def _load(plgpu, ref, *, layout):
    """Read a whole shared-memory ref into registers with the given layout. (Newer JAX takes
    the ref alone; older versions also want an explicit, here empty, index.)"""
    if "idx" in inspect.signature(plgpu.load).parameters and inspect.signature(
            plgpu.load).parameters["idx"].default is inspect.Parameter.empty:
        return plgpu.load(ref, (), layout=layout)
    return plgpu.load(ref, layout=layout)


def _hopper_backward(q, k, v, out, lse, d_out, seg=None, *, causal, sm_scale, block_q, block_kv,
                     stages):
    """seg: None, or (ids, bounds) as for `_hopper_forward`, the bounds taken over the CTAs'
    keys and the query blocks."""
    from jax.experimental.pallas import mosaic_gpu as plgpu  # imported only where it runs

    batch, t_len, n_heads, head_dim = q.shape
    s_len, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    dtype = q.dtype
    n_q_blocks = t_len // block_q
    n_slabs = s_len // (2 * block_kv)
    own_keys = head_dim == 64          # dQ over my keys, all columns (else half, all keys)
    dq_cols = head_dim if own_keys else head_dim // 2
    score_scale = sm_scale * _LOG2E

    # Per query row: L in base-2 units and D = rowsum(dO o O), side by side so that one TMA copy
    # brings both for a block of rows: stats[b, h, 0, t] = log2(e) L, stats[b, h, 1, t] = D,
    # and under segment ids stats[b, h, 2, t] = the query's segment id.
    delta = jnp.einsum("bthd,bthd->bht", d_out.astype(jnp.float32), out.astype(jnp.float32))
    stat_rows = [lse.astype(jnp.float32) * _LOG2E, delta]
    has_seg = seg is not None
    if has_seg:
        ids, bounds = seg
        stat_rows.append(jnp.broadcast_to(ids[:, None, :], delta.shape))
    stats = jnp.stack(stat_rows, axis=2)
    n_stats = len(stat_rows)

    def body(q_gmem, k_gmem, v_gmem, do_gmem, st_gmem, *refs):
        if has_seg:
            (ids_gmem, bounds_gmem, dq_gmem, dk_gmem, dv_gmem, q_smem, do_smem, st_smem, k_smem,
             v_smem, ds_smem, dq_smem, q_landed, do_landed, st_landed, kv_landed, slot_free,
             meet, ids_smem, ids_landed) = refs
        else:
            (dq_gmem, dk_gmem, dv_gmem, q_smem, do_smem, st_smem, k_smem, v_smem, ds_smem,
             dq_smem, q_landed, do_landed, st_landed, kv_landed, slot_free, meet) = refs
        wg = lax.axis_index("wg")
        head = lax.axis_index("head")
        b = lax.axis_index("batch")
        slab = lax.axis_index("slab")
        slab_k0 = slab * (2 * block_kv)
        # Causal: queries before the slab's first key see none of it. Segment ids: nor do
        # queries outside the query blocks that the slab's keys' segments reach.
        first = lax.div(slab_k0, jnp.int32(block_q)) if causal else 0
        last = n_q_blocks
        if has_seg:   # (each key sees itself: under causal `last` passes the diagonal blocks)
            first = jnp.maximum(first, bounds_gmem[b, slab, 0])
            last = bounds_gmem[b, slab, 1]
        n_steps = last - first
        # Query blocks that overlap the slab's diagonal need the element mask.
        n_masked = (2 * block_kv) // block_q if causal else 0

        def rendezvous():
            # Both math warpgroups arrive; neither goes on before the other has.
            plgpu.barrier_arrive(meet)
            plgpu.barrier_wait(meet)

        @pl.when(wg < 2)
        def _math_warpgroup():
            plgpu.set_max_registers(232, action="increase")
            my_k, my_v = k_smem.at[wg], v_smem.at[wg]
            k0 = slab_k0 + wg * block_kv            # my first key
            kv_head = lax.div(head, jnp.int32(group))
            rows = (b, pl.ds(k0, block_kv), kv_head)
            plgpu.copy_gmem_to_smem(k_gmem.at[rows], my_k, kv_landed.at[wg])
            plgpu.copy_gmem_to_smem(v_gmem.at[rows], my_v, kv_landed.at[2 + wg])
            if has_seg:
                plgpu.copy_gmem_to_smem(ids_gmem.at[b, pl.ds(k0, block_kv)], ids_smem.at[wg],
                                        ids_landed.at[wg])

            per_query = plgpu.Layout.WGMMA.reduce(0)   # a vector along the columns of S^T
            zeros = plgpu.layout_cast(jnp.zeros((block_kv, head_dim), jnp.float32),
                                      plgpu.Layout.WGMMA)
            if has_seg:   # my keys' segment ids, one per row of S^T
                plgpu.barrier_wait(ids_landed.at[wg])
                key_ids = lax.broadcast_in_dim(
                    _load(plgpu, ids_smem.at[wg], layout=plgpu.Layout.WGMMA.reduce(1)),
                    (block_kv, block_q), [0])
            plgpu.barrier_wait(kv_landed.at[wg])
            plgpu.barrier_wait(kv_landed.at[2 + wg])

            def one_step(step, carry, *, masked):
                dk, dv = carry
                slot = lax.rem(step, jnp.int32(stages))
                q0 = (first + step) * block_q
                q_tile, do_tile = q_smem.at[slot], do_smem.at[slot]

                # ---- S^T = K Q^T and dP^T = V dO^T, both [block_kv, block_q] ----------
                plgpu.barrier_wait(q_landed.at[slot])

                def two_products(s_acc, dp_acc):
                    plgpu.wgmma(s_acc, my_k, q_tile.T)
                    plgpu.barrier_wait(do_landed.at[slot])   # while the first one runs
                    plgpu.wgmma(dp_acc, my_v, do_tile.T)
                    return s_acc[...], dp_acc[...]
                s_t, dp_t = pl.run_scoped(
                    two_products, plgpu.ACC((block_kv, block_q), jnp.float32),
                    plgpu.ACC((block_kv, block_q), jnp.float32))

                plgpu.barrier_wait(st_landed.at[slot])
                lse2 = _load(plgpu, st_smem.at[slot, 0], layout=per_query)
                dlt = _load(plgpu, st_smem.at[slot, 1], layout=per_query)

                # ---- P^T = exp2(c log2e s - log2e L): the forward's probabilities -------
                logits = s_t * score_scale - lax.broadcast_in_dim(lse2, s_t.shape, [1])
                if masked:
                    key = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 0,
                                                 layout=plgpu.Layout.WGMMA) + k0
                    qry = plgpu.broadcasted_iota(jnp.int32, s_t.shape, 1,
                                                 layout=plgpu.Layout.WGMMA) + q0
                    logits = jnp.where(qry >= key, logits, -jnp.inf)
                if has_seg:   # keep queries of the key's own segment
                    qry_ids = _load(plgpu, st_smem.at[slot, 2], layout=per_query)
                    same = key_ids == lax.broadcast_in_dim(qry_ids, s_t.shape, [1])
                    logits = jnp.where(same, logits, -jnp.inf)
                p_t = jnp.exp2(logits)
                # ---- dS^T = P^T o (dP^T - D) (the factor c is applied at the end) -------
                ds_t = p_t * (dp_t - lax.broadcast_in_dim(dlt, dp_t.shape, [1]))
                p_lo, ds_lo = p_t.astype(dtype), ds_t.astype(dtype)

                # ---- dV += P^T dO and dK += dS^T Q, left operands from registers --------
                par = lax.rem(step, jnp.int32(2))

                def grads(refs):
                    dv_acc, dk_acc = refs
                    plgpu.wgmma(dv_acc, p_lo, do_tile)
                    plgpu.wgmma(dk_acc, ds_lo, q_tile)
                    # While they run, leave dS^T where the dQ product can read it.
                    ds_smem.at[par, wg][...] = ds_lo
                    plgpu.commit_smem()
                dv, dk = pl.run_state(grads)((plgpu.ACC.init(dv), plgpu.ACC.init(dk)))
                plgpu.barrier_arrive(slot_free.at[slot])     # Q, dO, L, D of this slot: done

                # ---- dQ[:, my half of D] += dS @ K over the whole slab ------------------
                # (at D = 64: dQ += dS @ K over my keys)
                cols = pl.ds(0 if own_keys else wg * dq_cols, dq_cols)
                if not own_keys:
                    rendezvous()                 # the other warpgroup's dS^T is in place

                def dq_product(acc):
                    if own_keys:
                        plgpu.wgmma(acc, ds_smem.at[par, wg].T, my_k)
                    else:
                        plgpu.wgmma(acc, ds_smem.at[par, 0].T, k_smem.at[0, :, cols])
                        plgpu.wgmma(acc, ds_smem.at[par, 1].T, k_smem.at[1, :, cols])
                    return acc[...]
                dq_part = pl.run_scoped(dq_product, plgpu.ACC((block_q, dq_cols), jnp.float32))
                # The previous step's reduce-add must have finished reading dq_smem.
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                dq_smem.at[wg][...] = dq_part
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(dq_smem.at[wg],
                                        dq_gmem.at[b, pl.ds(q0, block_q), head, cols],
                                        reduction_op="add")
                return dk, dv

            carry = (zeros, zeros)
            if causal:
                carry = lax.fori_loop(0, n_masked, functools.partial(one_step, masked=True),
                                      carry)
            carry = lax.fori_loop(n_masked, n_steps, functools.partial(one_step, masked=False),
                                  carry)
            dk, dv = carry

            # ---- epilogue: K and V slots become the staging area for dK and dV ----------
            rendezvous()                         # the other warpgroup is done reading my K
            my_k[...] = (dk * sm_scale).astype(dtype)
            my_v[...] = dv.astype(dtype)
            plgpu.commit_smem()
            out_rows = (b, pl.ds(k0, block_kv), head)
            plgpu.copy_smem_to_gmem(my_k, dk_gmem.at[out_rows], commit_group=False)
            plgpu.copy_smem_to_gmem(my_v, dv_gmem.at[out_rows], commit_group=False)
            plgpu.commit_smem_to_gmem_group()
            plgpu.wait_smem_to_gmem(0)

        @pl.when(wg == 2)
        def _loader_warpgroup():
            plgpu.set_max_registers(40, action="decrease")

            def issue(step, slot):
                qrows = pl.ds((first + step) * block_q, block_q)
                plgpu.copy_gmem_to_smem(q_gmem.at[b, qrows, head], q_smem.at[slot],
                                        q_landed.at[slot])
                plgpu.copy_gmem_to_smem(do_gmem.at[b, qrows, head], do_smem.at[slot],
                                        do_landed.at[slot])
                plgpu.copy_gmem_to_smem(st_gmem.at[b, head, :, qrows], st_smem.at[slot],
                                        st_landed.at[slot])

            for i in range(stages):
                pl.when(i < n_steps)(functools.partial(issue, i, i))

            @pl.loop(0, n_steps - stages)
            def _refill(step):
                slot = lax.rem(step, jnp.int32(stages))
                plgpu.barrier_wait(slot_free.at[slot])
                issue(step + stages, slot)

    mma_layout = (plgpu.TilingTransform((8, 64)), plgpu.SwizzleTransform(128))
    scratch = (
        plgpu.SMEM((stages, block_q, head_dim), dtype, transforms=mma_layout),     # Q ring
        plgpu.SMEM((stages, block_q, head_dim), dtype, transforms=mma_layout),     # dO ring
        plgpu.SMEM((stages, n_stats, block_q), jnp.float32),                       # L, D, ids
        plgpu.SMEM((2, block_kv, head_dim), dtype, transforms=mma_layout),         # K / dK
        plgpu.SMEM((2, block_kv, head_dim), dtype, transforms=mma_layout),         # V / dV
        plgpu.SMEM((2, 2, block_kv, block_q), dtype, transforms=mma_layout),       # dS^T x2
        plgpu.SMEM((2, block_q, dq_cols), jnp.float32),                            # dQ parts
        plgpu.Barrier(num_barriers=stages),                                        # Q landed
        plgpu.Barrier(num_barriers=stages),                                        # dO landed
        plgpu.Barrier(num_barriers=stages),                                        # L, D landed
        plgpu.Barrier(num_barriers=4),                                             # K, V landed
        plgpu.Barrier(num_arrivals=2, num_barriers=stages),                        # slot free
        plgpu.Barrier(num_arrivals=2),                                             # meet
    )
    if has_seg:
        scratch += (plgpu.SMEM((2, block_kv), jnp.float32),                         # key ids
                    plgpu.Barrier(num_barriers=2))                                 # landed
    # dQ is summed over the slabs by reduce-add copies, so it starts as zeros. It is passed as
    # a mutable array (jax.new_ref): the kernel adds into it in place. `plgpu.kernel` does not
    # accept one (its batching wrapper), so the mesh goes to `pl.kernel` directly, with the
    # scratch buffers allocated once for all warpgroups of a CTA (collective_axes).
    dq_acc = jax.new_ref(jnp.zeros((batch, t_len, n_heads, head_dim), jnp.float32))
    per_head = jax.ShapeDtypeStruct((batch, s_len, n_heads, head_dim), dtype)
    mesh = plgpu.Mesh(
        # Heads vary fastest: CTAs running together share a head's Q / dO rows in L2.
        grid=(n_heads, n_slabs, batch),
        grid_names=("head", "slab", "batch"),
        num_threads=3,
        thread_name="wg",
    )

    def with_scratch(*refs):
        pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg")

    dk, dv = pl.kernel(
        with_scratch,
        out_type=(per_head, per_head),
        mesh=mesh,
        compiler_params=plgpu.CompilerParams(approx_math=True),
        name="hopper_flash_backward",
    )(q, k, v, d_out, stats, *(seg if has_seg else ()), dq_acc)
    dq = (jax.freeze(dq_acc) * sm_scale).astype(q.dtype)
    if group > 1:   # the query heads sharing a kv head add their contributions
        dk = dk.reshape(batch, s_len, n_kv_heads, group, head_dim).astype(jnp.float32).sum(3)
        dv = dv.reshape(batch, s_len, n_kv_heads, group, head_dim).astype(jnp.float32).sum(3)
    return dq, dk.astype(k.dtype), dv.astype(v.dtype)


def _hopper_segments(seg, rows, cols):
    """What the Hopper kernels take for segment ids: each position's id as the first position
    of its segment (float32), and `_span_tiles` over tiles of `rows` and `cols` positions."""
    if seg is None:
        return None
    first, last = _segment_spans(seg)
    return first.astype(jnp.float32), _span_tiles(first, last, rows, cols)


def _forward_pass(q, k, v, seg, causal, sm_scale, blocks, interpret, impl):
    if impl in ("hopper", "hopper forward"):
        return _hopper_forward(q, k, v, _hopper_segments(seg, 2 * HOPPER_BLOCK_Q,
                                                         HOPPER_BLOCK_KV),
                               causal=causal, sm_scale=sm_scale, block_q=HOPPER_BLOCK_Q,
                               block_kv=HOPPER_BLOCK_KV, stages=HOPPER_STAGES, heavy_first=True)
    return _flash_forward(q, k, v, seg, causal, sm_scale, blocks, interpret)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _flash(q, k, v, seg, causal, sm_scale, blocks, interpret, impl):
    return _forward_pass(q, k, v, seg, causal, sm_scale, blocks, interpret, impl)[0]


def _flash_fwd(q, k, v, seg, causal, sm_scale, blocks, interpret, impl):
    out, lse = _forward_pass(q, k, v, seg, causal, sm_scale, blocks, interpret, impl)
    return out, (q, k, v, seg, out, lse)


def _flash_bwd(causal, sm_scale, blocks, interpret, impl, res, d_out):
    q, k, v, seg, out, lse = res
    if impl == "hopper" and hopper_backward_available(q, k, causal):
        dq, dk, dv = _hopper_backward(q, k, v, out, lse, d_out,
                                      _hopper_segments(seg, 2 * HOPPER_BWD_BLOCK_KV,
                                                       HOPPER_BWD_BLOCK_Q),
                                      causal=causal, sm_scale=sm_scale,
                                      block_q=HOPPER_BWD_BLOCK_Q,
                                      block_kv=HOPPER_BWD_BLOCK_KV, stages=HOPPER_BWD_STAGES)
    else:
        dq, dk, dv = _flash_backward(q, k, v, seg, out, lse, d_out, causal, sm_scale, blocks,
                                     interpret)
    return dq, dk, dv, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def flash_attention(q, k, v, causal=False, segment_ids=None, interpret=None,
                    blocks=FlashBlocks(), sm_scale=None, implementation=None,
                    deterministic=False):
    """Exact attention as one kernel per pass: q [B, T, H, D]; k, v [B, S, KH, D] with KH
    dividing H; segment_ids [B, T] (T == S) or None. Causal aligns query i with key i.
    Differentiable (FlashAttention-2 backward); lengths need not be block multiples.

    implementation: "portable" (grid + BlockSpecs, any backend), "hopper" (the sm90 kernels
    above: forward, and backward where `hopper_backward_available`, else the portable one), or
    None: "hopper" where `hopper_available`, else "portable". deterministic: gradients that
    repeat bit for bit from run to run. The Hopper backward adds the parts of dQ by reduce-add
    copies in the order its CTAs reach them, which varies; with deterministic=True the Hopper
    forward is followed by the portable backward, whose sums run in a fixed order."""
    q, k, v, segment_ids = common.check_attention_inputs(q, k, v, segment_ids)
    interpret = _interpreted(interpret)
    if causal and q.shape[1] != k.shape[1]:
        raise common.UserError(f"causal attention here needs T == S, got T={q.shape[1]}, "
                               f"S={k.shape[1]}")
    for f in dataclasses.fields(blocks):
        if f.name.startswith("block"):
            _check_block(f.name, getattr(blocks, f.name))
    # Small inputs: shrink the blocks to the (padded) lengths so a tiny test is not 128 rows.
    T, S = q.shape[1], k.shape[1]
    blocks = dataclasses.replace(
        blocks, block_q=min(blocks.block_q, _pow2_at_least(T)),
        block_k=min(blocks.block_k, _pow2_at_least(S)),
        block_q_bwd=min(blocks.block_q_bwd, _pow2_at_least(T)),
        block_k_bwd=min(blocks.block_k_bwd, _pow2_at_least(S)))
    sm_scale = 1.0 / math.sqrt(q.shape[-1]) if sm_scale is None else float(sm_scale)
    hopper = not interpret and hopper_available(q, k, segment_ids, causal)
    if implementation is None:
        implementation = "hopper" if hopper else "portable"
    elif implementation not in ("portable", "hopper"):
        raise common.UserError(f"implementation must be 'portable' or 'hopper', got "
                               f"{implementation!r}")
    elif implementation == "hopper" and not hopper:
        raise common.UserError("the Hopper kernel needs an sm90 GPU, bf16/fp16, D of 64 or "
                               f"128, T a multiple of {2 * HOPPER_BLOCK_Q} and S of "
                               f"{HOPPER_BLOCK_KV}; got q {q.shape} {q.dtype}")
    D = q.shape[-1]
    if D != _pow2_at_least(D):  # Triton's lowering takes power-of-2 tiles: pad with zeros,
        pad = lambda x: _pad_to(x, 3, _pow2_at_least(D))   # which add nothing to q . k
        return _flash(pad(q), pad(k), pad(v), segment_ids, bool(causal), sm_scale, blocks,
                      bool(interpret), implementation)[..., :D]
    if implementation == "hopper" and deterministic:
        implementation = "hopper forward"
    return _flash(q, k, v, segment_ids, bool(causal), sm_scale, blocks, bool(interpret),
                  implementation)


# ----------------------------------------------------------------------------------------------
# 3. Decode attention (flash-decoding): one query token against a KV cache
# ----------------------------------------------------------------------------------------------

def decode_kernel(len_ref, q_ref, k_ref, v_ref, *refs, block_k, chunk):
    # q_ref [Gp, D]: the G query heads sharing this kv head (padded to >= 16 rows, the matrix
    # unit's smallest tile); k_ref, v_ref [S, D]. This grid point owns cache rows
    # [c*chunk, (c+1)*chunk) and stops at the sequence's length: a short row reads little.
    # An int8 cache comes with float32 scales per position, ks_ref and vs_ref [S]: the int8
    # blocks are widened on chip, the key scales multiply the scores and the value scales the
    # probabilities, so the cache crosses memory at 1 byte per value.
    ks_ref, vs_ref, o_ref, lse_ref = refs if len(refs) == 4 else (None, None) + refs
    c = pl.program_id(2)
    length = len_ref[0]
    q = q_ref[...]
    start = c * chunk
    n_blocks = jnp.clip(lax.div(length - start + block_k - 1, block_k), 0, chunk // block_k)

    def step(j, carry):
        acc, m_i, l_i = carry
        rows = pl.ds(start + j * block_k, block_k)
        k = k_ref[rows, :].astype(q.dtype)
        v = v_ref[rows, :].astype(q.dtype)
        s = _dot_nt(q, k)                     # [Gp, block_k], q pre-scaled
        if ks_ref is not None:
            s = s * ks_ref[rows][None, :]
        pos = start + j * block_k + jnp.arange(block_k)
        s = jnp.where((pos < length)[None, :], s, MASK)
        m_new = jnp.maximum(m_i, s.max(axis=1))
        alpha = jnp.exp(m_i - m_new)
        p = jnp.exp(s - m_new[:, None])
        pv = p if vs_ref is None else p * vs_ref[rows][None, :]
        acc = acc * alpha[:, None] + jnp.dot(pv.astype(v.dtype), v,
                                             preferred_element_type=jnp.float32)
        return acc, m_new, l_i * alpha + p.sum(axis=1)

    Gp = q_ref.shape[0]
    acc, m_i, l_i = lax.fori_loop(
        0, n_blocks, step, (jnp.zeros(o_ref.shape, jnp.float32),
                            jnp.full((Gp,), MASK, jnp.float32), jnp.zeros((Gp,), jnp.float32)))
    empty = l_i == 0                          # the chunk lies past this row's length
    o_ref[...] = acc / jnp.where(empty, 1.0, l_i)[:, None]
    lse_ref[...] = jnp.where(empty, -jnp.inf, m_i + jnp.log(jnp.where(empty, 1.0, l_i)))


def decode_attention(q, k, v, lengths, k_scale=None, v_scale=None, n_chunks=None, block_k=None,
                     num_warps=4, num_stages=3, interpret=None):
    """q [B, H, D] (this step's token); k, v [B, KH, S, D] (lesson 06's cache layout); lengths
    [B] int (or one for every row): row b attends to cache positions < lengths[b], a length
    past S counting as S and a row of length 0 giving zeros. Returns [B, H, D].
    An int8 cache (lesson 06's kv_int8) comes with float32 scales k_scale, v_scale [B, KH, S],
    one per position and head: the values are k * k_scale[..., None].

    The cache is cut into n_chunks pieces per (row, kv head), each a grid point; the partial
    outputs are merged with their logsumexp: out = sum_c exp(lse_c - lse) * out_c.
    block_k None: 64 cache rows per step, or for an int8 cache 8 KB of them (128 rows at
    D = 64), which an H200 sweep found 1.1x faster than 64 there (64 stays best at D = 128)."""
    q, k, v, lengths = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(lengths)
    k_scale, v_scale = (None if s is None else jnp.asarray(s) for s in (k_scale, v_scale))
    interpret = _interpreted(interpret)
    if (q.ndim != 3 or k.ndim != 4 or k.shape != v.shape or k.shape[0] != q.shape[0]
            or k.shape[3] != q.shape[2] or q.shape[1] % k.shape[1]):
        raise common.UserError(f"decode_attention: q [B, H, D] {q.shape} and k, v [B, KH, S, D] "
                               f"{k.shape}, {v.shape} do not fit")
    B, H, D = q.shape
    if min(*q.shape, *k.shape) < 1:
        raise common.UserError(f"decode_attention: q {q.shape} and k, v {k.shape} must have "
                               f"no empty dimension")
    _check_count("decode_attention", "n_chunks", n_chunks)
    if jnp.ndim(lengths) not in (0, 1) or jnp.ndim(lengths) == 1 and len(lengths) != B:
        raise common.UserError(f"decode_attention: lengths must be [B] = ({B},) or one number, "
                               f"got shape {jnp.shape(lengths)}")
    scaled = k_scale is not None
    if scaled != (v_scale is not None) or scaled and (
            k_scale.shape != k.shape[:3] or v_scale.shape != k.shape[:3]) or (
            not scaled and jnp.issubdtype(k.dtype, jnp.integer)):
        raise common.UserError(f"decode_attention: an int8 cache needs k_scale and v_scale "
                               f"[B, KH, S] {k.shape[:3]}")
    scale, Dp = 1.0 / math.sqrt(D), _pow2_at_least(D)
    if block_k is None:
        block_k = max(64, 8192 // Dp) if scaled else 64
    _check_block("block_k", block_k)
    KH, S = k.shape[1], k.shape[2]
    G = H // KH
    block_k = min(block_k, _pow2_at_least(S))
    if n_chunks is None:  # enough grid points to fill a GPU's ~132 SMs a few times over
        n_chunks = max(1, min(S // block_k, -(-512 // (B * KH))))
    chunk = -(-S // n_chunks // block_k) * block_k
    if Dp != D:  # Triton's lowering takes power-of-2 tiles: zero columns add nothing to q . k
        # (a copy of the cache at every call: a model of such a D should keep its cache padded)
        q, k, v = (_pad_to(x, x.ndim - 1, Dp) for x in (q, k, v))
    kp, vp = _pad_to(k, 2, chunk), _pad_to(v, 2, chunk)
    Sp = kp.shape[2]
    n_chunks = Sp // chunk
    Gp = max(16, G)
    qg = q.reshape(B, KH, G, Dp) * scale
    qg = _pad_to(qg, 2, Gp)[:, :, :Gp].astype(q.dtype if scaled else k.dtype)
    # Positions past S hold the padding above (or nothing): a longer length counts as S.
    lengths = jnp.clip(jnp.broadcast_to(jnp.asarray(lengths, jnp.int32), (B,)), 0, S)
    kernel = functools.partial(decode_kernel, block_k=block_k, chunk=chunk)
    cache_spec = pl.BlockSpec((None, None, Sp, Dp), lambda b, h, c: (b, h, 0, 0))
    scale_spec = pl.BlockSpec((None, None, Sp), lambda b, h, c: (b, h, 0))
    scales = [_pad_to(x.astype(jnp.float32), 2, chunk) for x in (k_scale, v_scale)] if scaled \
        else []
    out, lse = pl.pallas_call(
        kernel,
        grid=(B, KH, n_chunks),
        in_specs=[pl.BlockSpec((1,), lambda b, h, c: (b,)),
                  pl.BlockSpec((None, None, Gp, Dp), lambda b, h, c: (b, h, 0, 0)),
                  cache_spec, cache_spec] + [scale_spec] * len(scales),
        out_specs=[pl.BlockSpec((None, None, None, Gp, Dp), lambda b, h, c: (b, h, c, 0, 0)),
                   pl.BlockSpec((None, None, None, Gp), lambda b, h, c: (b, h, c, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, KH, n_chunks, Gp, Dp), jnp.float32),
                   jax.ShapeDtypeStruct((B, KH, n_chunks, Gp), jnp.float32)],
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
    )(lengths, qg, kp, vp, *scales)
    # Combine the chunks: weights exp(lse_c - max) renormalised (the same online-softmax
    # identity as across blocks, done once across chunks). A row of length 0 has no chunk to
    # weigh (every lse is -inf): its weights are 0, not the softmax's 0/0.
    w = jnp.where((lengths > 0)[:, None, None, None], jax.nn.softmax(lse, axis=2), 0.0)
    out = jnp.einsum("bkcg,bkcgd->bkgd", w, out)[:, :, :G, :D]
    return out.reshape(B, H, D).astype(q.dtype)


def decode_attention_reference(q, k, v, lengths, k_scale=None, v_scale=None):
    """Materialised softmax over the whole cache, masked past each row's length (zeros for a row
    of length 0)."""
    B, H, D = q.shape
    lengths = jnp.broadcast_to(jnp.asarray(lengths), (B,))
    KH, S = k.shape[1], k.shape[2]
    if k_scale is not None:  # an int8 cache: its values are k * k_scale
        k = k.astype(jnp.float32) * k_scale[..., None]
        v = v.astype(jnp.float32) * v_scale[..., None]
    qg = q.reshape(B, KH, H // KH, D).astype(jnp.float32)
    s = jnp.einsum("bkgd,bksd->bkgs", qg, k.astype(jnp.float32)) / math.sqrt(D)
    s = jnp.where(jnp.arange(S)[None, None, None] < lengths[:, None, None, None], s, -jnp.inf)
    p = jnp.where((lengths > 0)[:, None, None, None], jax.nn.softmax(s, axis=-1), 0.0)
    out = jnp.einsum("bkgs,bksd->bkgd", p, v.astype(jnp.float32))
    return out.reshape(B, H, D).astype(q.dtype)


# ----------------------------------------------------------------------------------------------
# 4. int8 weight-only matmul for decode
# ----------------------------------------------------------------------------------------------

def int8_matmul_kernel(x_ref, w_ref, scale_ref, o_ref, *, block_k):
    # x_ref [Mp, K / split] (all rows: decode has few); w_ref [block_n, K / split] int8, one
    # output channel per row as a linear layer stores it, so each row's bytes are contiguous.
    # The widening to the activation dtype happens on chip, after the 1-byte load: HBM sees
    # int8 only.
    def step(k, acc):
        x = x_ref[:, pl.ds(k * block_k, block_k)]
        w = w_ref[:, pl.ds(k * block_k, block_k)].astype(x.dtype)
        return acc + _dot_nt(x, w)                                # [Mp, block_n]

    acc = lax.fori_loop(0, x_ref.shape[1] // block_k, step, jnp.zeros(o_ref.shape, jnp.float32))
    # The per-output-channel scale commutes with the sum over K: apply it once, at the end.
    o_ref[...] = acc * scale_ref[...][None, :]


def int8_gemv_kernel(x_ref, w_ref, scale_ref, o_ref, *, block_k):
    # The same product for a handful of rows without the matrix unit: each weight tile is
    # widened once and multiplied into every row on the vector units. The matrix unit's
    # smallest tile is 16 rows (or 64 for wgmma), so for M = 1 it would do 16x the work and
    # route the weight through its operand layout; here the work is M multiply-adds per byte.
    M = x_ref.shape[0]

    def step(k, accs):
        w = w_ref[:, pl.ds(k * block_k, block_k)].astype(jnp.float32)    # [block_n, block_k]
        return tuple(acc + jnp.sum(w * x_ref[m, pl.ds(k * block_k, block_k)]
                                   .astype(jnp.float32)[None, :], axis=1)
                     for m, acc in enumerate(accs))

    zeros = jnp.zeros((w_ref.shape[0],), jnp.float32)
    accs = lax.fori_loop(0, x_ref.shape[1] // block_k, step, (zeros,) * M)
    scale = scale_ref[...]
    for m, acc in enumerate(accs):
        o_ref[m, :] = acc * scale


def int8_matmul(x, w_q, scale, block_n=64, block_k=256, split_k=None, num_warps=4, num_stages=3,
                vector_rows=0, interpret=None):
    """x [M, K] (bf16/f32) @ (w_q [N, K] int8 * scale [N]).T -> [M, N] in x.dtype: a linear
    layer whose weight rows (output channels) are int8 with one float32 scale each. Made for
    small M (decode): M is padded to 16 rows, the matrix unit's smallest tile.

    split_k > 1 cuts K in pieces that run as separate grid points (their float32 partial
    products summed after): with N / block_n grid points alone, a GPU's 132 SMs have too few
    bytes in flight to reach the memory bandwidth. None: the largest split that divides K's
    blocks evenly and brings the grid to about 384 points (each then loops over several K
    blocks, so its loads pipeline). M <= vector_rows takes the vector-unit kernel
    (int8_gemv_kernel), larger M the matrix unit. The defaults won a sweep over the four weight
    shapes of a Llama-3-8B layer at M = 1 on an H200 (the vector kernel was slower even at
    M = 1); 256-wide K blocks with 4 warps beat 512 with 8 on three shapes and tied on the fourth.
    Keep N a multiple of block_n and K of block_k: otherwise every call pads (copies) the
    weight."""
    x, w_q, scale = jnp.asarray(x), jnp.asarray(w_q), jnp.asarray(scale)
    if (x.ndim != 2 or w_q.ndim != 2 or x.shape[1] != w_q.shape[1]
            or scale.shape != (w_q.shape[0],)):
        raise common.UserError(f"int8_matmul needs x [M, K], w_q [N, K], scale [N]; got "
                               f"{x.shape}, {w_q.shape}, {scale.shape}")
    if w_q.dtype != jnp.int8:
        raise common.UserError(f"int8_matmul: w_q must be int8, got {w_q.dtype}")
    _check_block("block_n", block_n)
    _check_block("block_k", block_k)
    interpret = _interpreted(interpret)
    (M, K), N = x.shape, w_q.shape[0]
    if min(M, K, N) < 1:
        raise common.UserError(f"int8_matmul: M, K and N must be >= 1, got {M}, {K}, {N}")
    _check_count("int8_matmul", "split_k", split_k)
    block_n, block_k = min(block_n, _pow2_at_least(N)), min(block_k, _pow2_at_least(K))
    vector = M <= vector_rows
    Mp = M if vector else _pow2_at_least(M)
    k_blocks, n_blocks = -(-K // block_k), -(-N // block_n)
    if split_k is None:
        want = -(-384 // n_blocks)
        split_k = max(d for d in range(1, k_blocks + 1) if k_blocks % d == 0 and d <= want)
    piece = -(-k_blocks // split_k) * block_k                # K per split, a block multiple
    xp = _pad_to(_pad_to(x, 0, Mp)[:Mp], 1, piece)
    wp = _pad_to(_pad_to(w_q, 0, block_n), 1, piece)
    sp = _pad_to(scale.astype(jnp.float32), 0, block_n)
    Np, Kp = wp.shape
    partial = pl.pallas_call(
        functools.partial(int8_gemv_kernel if vector else int8_matmul_kernel, block_k=block_k),
        grid=(Np // block_n, Kp // piece),
        in_specs=[pl.BlockSpec((Mp, piece), lambda j, s: (0, s)),
                  pl.BlockSpec((block_n, piece), lambda j, s: (j, s)),
                  pl.BlockSpec((block_n,), lambda j, s: (j,))],
        out_specs=pl.BlockSpec((None, Mp, block_n), lambda j, s: (s, 0, j)),
        out_shape=jax.ShapeDtypeStruct((Kp // piece, Mp, Np), jnp.float32),
        compiler_params=compiler_params(num_warps, num_stages),
        interpret=interpret,
    )(xp, wp, sp)
    return partial.sum(0)[:M, :N].astype(x.dtype)


def quantize_int8(w):
    """w [N, K] -> (int8 [N, K], float32 scale [N]): symmetric, one scale per output row."""
    w = jnp.asarray(w)
    if w.ndim != 2 or 0 in w.shape or not jnp.issubdtype(w.dtype, jnp.floating):
        raise common.UserError(f"quantize_int8 needs a float weight [N, K], got {w.dtype} "
                               f"{w.shape}")
    wf = w.astype(jnp.float32)
    scale = jnp.maximum(jnp.abs(wf).max(axis=1), 1e-8) / 127.0
    return jnp.clip(jnp.round(wf / scale[:, None]), -127, 127).astype(jnp.int8), scale


def int8_matmul_reference(x, w_q, scale):
    y = jnp.dot(x.astype(jnp.float32), w_q.astype(jnp.float32).T) * scale
    return y.astype(x.dtype)


# ----------------------------------------------------------------------------------------------
# The benchmark: each kernel beside its peer and its bound, measured in the same run
# ----------------------------------------------------------------------------------------------

def _ints(text):
    """"512,128,512" -> [128, 512]: each size once, in order (a repeat would time it twice)."""
    return sorted({int(p) for p in text.split(",")})


def _random(key, shape, dtype):
    return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _rel_error(out, ref):
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _rate(x, unit):
    """A rate with the prefix that keeps it readable: 812 TFLOP/s on a GPU, 3.1 GFLOP/s
    interpreted on a CPU."""
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6)):
        if x >= scale:
            return f"{x / scale:.0f} {prefix}{unit}" if x >= 10 * scale else \
                f"{x / scale:.1f} {prefix}{unit}"
    return f"{x:.0f} {unit}"


def _time(fn, arg_sets, device=False):
    """Seconds per call of fn by the wall clock's median (common.bench). With device=True,
    (seconds by the device's own clock where there is one, else the wall's; the wall's): a call
    from Python costs the host tens of microseconds to dispatch on a GPU, so a shorter kernel is
    timed by the device's clock (common.device_seconds) or not at all."""
    f = jax.jit(fn)
    wall = common.bench(f, arg_sets=arg_sets, iters=7, warmup=2).median_s
    if not device:
        return wall
    kernels = common.device_seconds(f, arg_sets=arg_sets)
    return (wall if kernels is None else kernels), wall


def bench_matmul(cfg, env, rows):
    n, dtype, interp = env["matmul_n"], env["dtype"], env["interpret"]
    ka, kb, kc = jax.random.split(jax.random.key(cfg.seed), 3)
    x, w, bias = _random(ka, (n, n), dtype), _random(kb, (n, n), dtype), _random(kc, (n,), dtype)
    x2 = _random(kc, (n, n), dtype)
    sets = [(x, w), (x2, w)]
    flops = 2 * n**3
    print(f"\n== 1. tiled matmul, {n}^3 {jnp.dtype(dtype).name}")
    size = jnp.dtype(dtype).itemsize
    print(f"arithmetic intensity of one worker's tile, {size}-byte values, K = n (lecture: one "
          f"output, a 1x2 strip, a 2x2 tile):")
    for tm, tn in ((1, 1), (1, 2), (2, 2)):
        print(f"  {tm}x{tn} outputs: {tile_intensity(tm, tn, n, size):6.2f} FLOP/B")
    t_xla, wall_xla = _time(jnp.dot, sets, device=True)
    clock = ("the wall clock" if jax.devices()[0].platform == "cpu" else
             "the device's clock: each call's kernels, from a profile")
    print(f"  XLA's matmul: {_rate(flops / t_xla, 'FLOP/s')} (wall clock: "
          f"{_rate(flops / wall_xla, 'FLOP/s')}); this section times by {clock}")
    # The roofline of a tiling: if every tile read its row and column panels from HBM, a tile
    # of intensity I could go no faster than I x bandwidth (nor than the peak). Measured above
    # it means the panels were re-read from the on-chip L2 cache instead.
    unit, scale = env["flop_unit"]
    # The grid has one program per output tile; a GPU runs them on its SMs in waves, so too few
    # tiles leave SMs idle and a last, partial wave idles some too (wave quantization).
    sms = getattr(jax.devices()[0], "core_count", None)
    print(f"  (tiles/SM: the grid's output tiles over the {sms} SMs, at least 1 to fill them; "
          f"the last wave is partial unless it divides)" if sms else
          "  (tiles/SM: no SM count on this device)")
    print(f"  {'tile m x n x k':>16s} {'warps':>5s} {'stages':>6s} {'FLOP/B':>7s} "
          f"{'tiles/SM':>8s} {'HBM roof':>9s} {unit:>8s} {'vs XLA':>7s}")
    best, tried = None, set()
    for tile in env["matmul_tiles"]:
        bm, bn, bk = (min(b, _pow2_at_least(n)) for b in tile[:3])  # the tile matmul runs
        warps, stages = tile[3:]
        if (bm, bn, bk, warps, stages) in tried:  # (a smaller n clamps two tiles to one)
            continue
        tried.add((bm, bn, bk, warps, stages))
        f = functools.partial(matmul, block_m=bm, block_n=bn, block_k=bk, num_warps=warps,
                              num_stages=stages, interpret=interp)
        try:
            t, _ = _time(f, sets, device=True)
        except Exception as e:  # a tile the GPU cannot hold (shared memory, registers)
            print(f"  {bm:>4d}x{bn:>4d}x{bk:>4d} {warps:5d} {stages:6d}  failed: "
                  f"{str(e).splitlines()[0][:60]}")
            continue
        intensity = tile_intensity(bm, bn, n, size)
        roof = min(env["peak"], intensity * env["copy_bw"])
        tiles = math.ceil(n / bm) * math.ceil(n / bn)
        per_sm = f"{tiles / sms:8.2f}" if sms else f"{'-':>8s}"
        print(f"  {bm:>4d}x{bn:>4d}x{bk:>4d} {warps:5d} {stages:6d} {intensity:7.1f} "
              f"{per_sm} {roof / scale:9.1f} {flops / t / scale:8.1f} {t_xla / t:7.2f}")
        if best is None or t < best[0]:
            best = (t, (bm, bn, bk, warps, stages))
    t, (bm, bn, bk, warps, stages) = best
    rows.append(("matmul", f"{n}^3, tile {bm}x{bn}x{bk}", _rate(flops / t, "FLOP/s"),
                 "XLA " + _rate(flops / t_xla, "FLOP/s"), t_xla / t,
                 f"{flops / t / env['peak']:.0%} of {_rate(env['peak'], 'FLOP/s')}"))
    # The fused epilogue: bias + GELU applied to the tile in registers, against XLA's matmul
    # followed by its own fusion of bias and GELU (one more round trip of the [n, n] output).
    f = functools.partial(matmul, activation="gelu", block_m=bm, block_n=bn, block_k=bk,
                          num_warps=warps, num_stages=stages, interpret=interp)
    ref = functools.partial(matmul_reference, activation="gelu")
    err = _rel_error(jax.jit(f)(x[:256], w[:, :256], bias[:256]),
                     ref(x[:256].astype(jnp.float32), w[:, :256].astype(jnp.float32), bias[:256]))
    t_f, _ = _time(f, [(x, w, bias), (x2, w, bias)], device=True)
    t_r, _ = _time(ref, [(x, w, bias), (x2, w, bias)], device=True)
    print(f"  matmul + bias + GELU: fused epilogue {t_f * 1e3:.3f} ms, XLA {t_r * 1e3:.3f} ms "
          f"({t_r / t_f:.2f}x); error vs float32 {err:.1e}")
    rows.append(("matmul+bias+gelu", f"{n}^3", _rate(flops / t_f, "FLOP/s"),
                 "XLA " + _rate(flops / t_r, "FLOP/s"), t_r / t_f,
                 f"{flops / t_f / env['peak']:.0%} of {_rate(env['peak'], 'FLOP/s')}"))


def bench_flash(cfg, env, rows):
    H, D, dtype, interp = cfg.n_heads, cfg.head_dim, env["dtype"], env["interpret"]
    print(f"\n== 2. flash attention, H={H} D={D} {jnp.dtype(dtype).name}; FLOPs 4*B*S^2*H*D "
          f"(halved when causal), backward 2.5x forward")
    peer_name = "cuDNN" if env["gpu"] else "XLA"
    peer_impl = "cudnn" if env["gpu"] else "xla"

    def peer(q, k, v, causal):
        return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=peer_impl)

    def ours(q, k, v, causal, impl, segment_ids=None):
        return flash_attention(q, k, v, causal, segment_ids, interpret=interp,
                               blocks=env["flash_blocks"], implementation=impl)

    def fwd_bwd(attn, causal):
        def loss(q, k, v, do):
            return jnp.sum(attn(q, k, v, causal).astype(jnp.float32) * do)
        return jax.grad(loss, argnums=(0, 1, 2))

    key = jax.random.key(cfg.seed)
    # Correct first: a small ragged GQA case (H query heads over gcd(H, 4) kv heads) against
    # float32 XLA attention.
    shapes = [(2, 300, H, D)] + [(2, 300, math.gcd(H, 4), D)] * 2
    q, k, v = (_random(kk, sh, dtype) for kk, sh in zip(jax.random.split(key, 3), shapes))
    f32 = [a.astype(jnp.float32) for a in (q, k, v)]
    err = _rel_error(jax.jit(ours, static_argnums=(3, 4))(q, k, v, True, "portable"),
                     common.attention_reference(*f32, causal=True))
    print(f"  error vs float32 reference (S=300, causal, GQA {H}/{k.shape[2]}, portable): "
          f"{err:.1e}")
    probe = jax.ShapeDtypeStruct((1, 256, H, D), dtype)   # a shape the Hopper kernels take
    hopper_on = not interp and hopper_available(probe, probe, None, True)
    if hopper_on:
        q, k, v = (a[:, :256] for a in (q, k, v))
        f32 = [a.astype(jnp.float32) for a in (q, k, v)]
        do = _random(jax.random.key(7), q.shape, jnp.float32)
        # Segment ids: documents of about 40 tokens, so that tiles hold several of them.
        docs = np.cumsum(np.random.default_rng(cfg.seed).random(q.shape[:2]) < 1 / 40, axis=1)
        for causal, seg in itertools.product((True, False), (None, jnp.asarray(docs))):
            def ref(q, k, v):
                return common.attention_reference(q, k, v, causal=causal, segment_ids=seg)
            hop = functools.partial(ours, causal=causal, impl="hopper", segment_ids=seg)
            err = _rel_error(jax.jit(hop)(q, k, v), ref(*f32))
            grads = jax.jit(fwd_bwd(lambda q, k, v, c: hop(q, k, v), causal))(q, k, v, do)
            grads_ref = fwd_bwd(lambda q, k, v, c: ref(q, k, v), causal)(*f32, do)
            g_err = max(_rel_error(g, r) for g, r in zip(grads, grads_ref))
            print(f"  error vs float32 reference (S=256, causal={causal}"
                  f"{', segment ids' if seg is not None else ''}, hopper): output {err:.1e}, "
                  f"gradients {g_err:.1e}")
    impls = {"portable": functools.partial(ours, impl="portable")}
    if hopper_on:
        impls["hopper"] = functools.partial(ours, impl="hopper")
        limit = common.device_chip().on_chip_bytes if common.device_chip() else 0
        for stages in (HOPPER_STAGES, HOPPER_STAGES + 1):
            need = hopper_smem_bytes(HOPPER_BLOCK_Q, HOPPER_BLOCK_KV, stages, D)
            print(f"  Hopper forward, blocks {HOPPER_BLOCK_Q} x {HOPPER_BLOCK_KV}, {stages} K/V "
                  f"stages: {need / 1024:.1f} KiB of shared-memory buffers per CTA"
                  + (f" (an SM has {limit / 1024:.0f} KiB)" if limit else ""))
    impls["peer"] = peer
    head = " ".join(f"{n + ' fwd':>12s}" for n in impls)
    used = "Hopper" if "hopper" in impls else "portable"
    print(f"  {env['flop_unit'][0]}; f+b: forward + backward, the {used} kernels")
    print(f"  {'S':>6s} {'B':>3s} {'causal':>6s} {head.replace('peer', peer_name)} {'ratio':>6s} "
          f"{'f+b':>7s} {peer_name + ' f+b':>10s} {'ratio':>6s}")
    best = list(impls)[-2]   # the fastest of ours: Hopper where it runs
    for S in env["flash_lengths"]:
        B = max(1, cfg.flash_tokens // S)
        ks = jax.random.split(jax.random.key(S), 4)
        q, k, v, do = (_random(kk, (B, S, H, D), dtype) for kk in ks)
        for causal in (True, False):
            flops = 4 * B * S * S * H * D / (2 if causal else 1)
            tf = {}
            for name, attn in impls.items():
                t = _time(lambda q, k, v: attn(q, k, v, causal), [(q, k, v)])
                tf[name, "fwd"] = flops / t / env["flop_unit"][1]
            for name in (best, "peer"):
                t = _time(fwd_bwd(impls[name], causal), [(q, k, v, do)])
                tf[name, "f+b"] = 3.5 * flops / t / env["flop_unit"][1]
            cells = " ".join(f"{tf[n, 'fwd']:12.1f}" for n in impls)
            print(f"  {S:6d} {B:3d} {str(causal):>6s} {cells} "
                  f"{tf[best, 'fwd'] / tf['peer', 'fwd']:6.2f} {tf[best, 'f+b']:7.1f} "
                  f"{tf['peer', 'f+b']:10.1f} {tf[best, 'f+b'] / tf['peer', 'f+b']:6.2f}",
                  flush=True)
            for mode in ("fwd", "f+b"):
                rows.append((f"flash {mode}{' causal' if causal else ''}", f"B{B} S{S}",
                             _rate(tf[best, mode] * env["flop_unit"][1], "FLOP/s"),
                             f"{peer_name} " + _rate(tf['peer', mode] * env["flop_unit"][1],
                                                     "FLOP/s"),
                             tf[best, mode] / tf['peer', mode],
                             f"{tf[best, mode] * env['flop_unit'][1] / env['peak']:.0%} of peak"))
    bench_packed(cfg, env, rows, ours, fwd_bwd, peer_impl, peer_name, hopper_on)


def bench_packed(cfg, env, rows, ours, fwd_bwd, peer_impl, peer_name, hopper_on):
    """Causal attention over packed documents (segment ids): the key blocks the forward kernel
    visits, a fraction of the causal ones that shrinks with the documents, against the peer
    given the documents as a dense mask. On Hopper both kernels run, the Hopper ones first."""
    S = min(max(env["flash_lengths"]), 2048)
    B, H, D = max(1, cfg.flash_tokens // S), cfg.n_heads, cfg.head_dim
    q, k, v, do = (_random(kk, (B, S, H, D), env["dtype"])
                   for kk in jax.random.split(jax.random.key(S + 1), 4))
    # Segment ids are arguments, not constants: XLA would sort them while compiling.
    hopper_on = hopper_on and hopper_available(q, k, jnp.zeros((B, S), jnp.int32), True)
    impls = ["hopper", "portable"] if hopper_on else ["portable"]
    bq, bk = ((2 * HOPPER_BLOCK_Q, HOPPER_BLOCK_KV) if hopper_on
              else (env["flash_blocks"].block_q, env["flash_blocks"].block_k))

    def peer(q, k, v, causal, seg):
        mask = seg[:, None, :, None] == seg[:, None, None, :]
        return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                            implementation=peer_impl)
    print(f"\n  packed documents, causal, B={B} S={S}, geometric lengths; forward + backward; "
          f"blocks: the key blocks the {impls[0]} forward visits, of the causal ones")
    print(f"  {'mean doc':>8s} {'blocks':>7s} "
          + " ".join(f"{n + ' f+b':>13s}" for n in impls)
          + f" {peer_name + ' mask f+b':>14s} {'ratio':>6s}")
    rng = np.random.default_rng(cfg.seed)
    for mean in sorted({max(1, S // 16), max(1, S // 4), S}):
        seg = jnp.asarray(np.cumsum(rng.random((B, S)) < 1 / mean, axis=1), jnp.int32)
        visited = causal_blocks_visited(seg, bq, bk)
        fns = [functools.partial(ours, impl=impl) for impl in impls] + [
            lambda q, k, v, c, segment_ids: peer(q, k, v, c, segment_ids)]
        t = [_time(lambda q, k, v, do, s, f=f: fwd_bwd(
                 lambda q, k, v, c: f(q, k, v, c, segment_ids=s), True)(q, k, v, do),
                   [(q, k, v, do, seg)]) for f in fns]
        print(f"  {mean:8d} {visited:7.0%} " + " ".join(f"{x * 1e3:11.2f}ms" for x in t[:-1])
              + f" {t[-1] * 1e3:12.2f}ms {t[-1] / t[0]:6.2f}", flush=True)
        rows.append(("flash f+b, packed", f"B{B} S{S} documents ~{mean}",
                     f"{t[0] * 1e3:.2f} ms", f"{peer_name} mask {t[-1] * 1e3:.2f} ms",
                     t[-1] / t[0], f"{impls[0]}, {visited:.0%} of causal blocks"))


def bench_decode(cfg, env, rows):
    B, H, KH, S = env["decode_shape"]
    D, dtype, interp = cfg.head_dim, env["dtype"], env["interpret"]
    ks = jax.random.split(jax.random.key(cfg.seed), 4)
    q = _random(ks[0], (B, H, D), dtype)
    k, v = _random(ks[1], (B, KH, S, D), dtype), _random(ks[2], (B, KH, S, D), dtype)
    itemsize = jnp.dtype(dtype).itemsize
    print(f"\n== 3. decode attention: B={B}, {H} query / {KH} kv heads, D={D}, cache {S} tokens, "
          f"{jnp.dtype(dtype).name}; bound: the cache bytes read at copy bandwidth")
    ragged = jax.random.randint(ks[3], (B,), 1, S + 1)
    err = _rel_error(decode_attention(q, k, v, ragged, interpret=interp),
                     decode_attention_reference(q.astype(jnp.float32), k.astype(jnp.float32),
                                                v.astype(jnp.float32), ragged))
    print(f"  error vs float32 reference (ragged lengths): {err:.1e}")
    for name, lengths in (("full", jnp.full((B,), S, jnp.int32)), ("ragged", ragged)):
        read = int(lengths.sum()) * KH * D * 2 * itemsize     # K and V up to each row's length
        t_ref = _time(decode_attention_reference, [(q, k, v, lengths)])
        best = None
        for n_chunks, block_k in env["decode_variants"]:
            f = functools.partial(decode_attention, n_chunks=n_chunks, block_k=block_k,
                                  interpret=interp)
            t = _time(f, [(q, k, v, lengths)])
            if best is None or t < best[0]:
                best = (t, n_chunks, block_k)
            print(f"  {name:6s} lengths, chunks {str(n_chunks or 'auto'):>4s}, block_k "
                  f"{block_k:3d}: {t * 1e6:8.1f} us = {_rate(read / t, 'B/s'):>10s} "
                  f"({read / t / env['copy_bw']:.0%} of copy)")
        t, n_chunks, block_k = best
        # XLA's materialised softmax reads the whole cache whatever the lengths.
        print(f"  {name:6s} lengths, XLA (materialised, reads all {S} positions): "
              f"{t_ref * 1e6:8.1f} us; kernel {t_ref / t:.2f}x")
        rows.append((f"decode attn, {name}", f"B{B} KH{KH} S{S}", _rate(read / t, "B/s"),
                     f"XLA {t_ref * 1e6:.0f} us", t_ref / t,
                     f"{read / t / env['copy_bw']:.0%} of copy BW"))
        if name == "full":
            t_full = t
    # The same cache in int8 with a float32 scale per position and head (lesson 06's kv_int8):
    # (D + 4) / (2 D) of the bytes, so at the bandwidth bound 0.52x the time for D = 128.
    def quantize(x):
        scale = jnp.max(jnp.abs(x.astype(jnp.float32)), axis=-1) / 127
        return jnp.round(x / scale[..., None]).astype(jnp.int8), scale

    (k8, ks8), (v8, vs8) = quantize(k), quantize(v)
    full = jnp.full((B,), S, jnp.int32)
    read = B * S * KH * (D + 4) * 2
    f = functools.partial(decode_attention, interpret=interp)   # the int8 defaults
    t = _time(f, [(q, k8, v8, full, ks8, vs8)])
    t_ref = _time(decode_attention_reference, [(q, k8, v8, full, ks8, vs8)])
    dname = jnp.dtype(dtype).name
    print(f"  int8 cache, full lengths: {t * 1e6:8.1f} us = {_rate(read / t, 'B/s'):>10s} "
          f"({read / t / env['copy_bw']:.0%} of copy); {t_full / t:.2f}x the {dname} cache "
          f"(bytes say {2 * D * itemsize / (2 * (D + 4)):.2f}x); XLA dequantizing "
          f"{t_ref * 1e6:.1f} us")
    rows.append(("decode attn, int8 KV", f"B{B} KH{KH} S{S}", _rate(read / t, "B/s"),
                 f"{dname} cache {t_full * 1e6:.0f} us", t_full / t,
                 f"{read / t / env['copy_bw']:.0%} of copy BW"))


def bench_int8(cfg, env, rows):
    N = K = env["int8_n"]
    L = env["int8_layers"]
    dtype, interp = env["dtype"], env["interpret"]
    ks = jax.random.split(jax.random.key(cfg.seed), L + 1)
    # L different weights, as a decode step's layers: one program applies them in turn, so the
    # host launches one program per L matmuls (a 20-40 us matmul is shorter than the host's
    # dispatch of a call) and no weight is read twice in a row from L2.
    ws = [_random(kk, (K, N), dtype) for kk in ks[:L]]          # [K, N]: XLA's layout
    qs = [quantize_int8(w.T) for w in ws]                        # int8 [N, K] + scale [N]
    short = {"bfloat16": "bf16", "float32": "f32", "float16": "f16"}[jnp.dtype(dtype).name]
    print(f"\n== 4. int8 weight-only matmul, {L} weights [{N}, {K}] applied in one program; "
          f"bound: int8 bytes at copy bandwidth; peers: the {jnp.dtype(dtype).name} matmul it "
          f"replaces, and the int8 weight widened by XLA (lesson 06)")
    x = _random(ks[L], (3, K), dtype)
    for vector_rows in (4, 0):
        err = _rel_error(int8_matmul(x, *qs[0], vector_rows=vector_rows, interpret=interp),
                         int8_matmul_reference(x.astype(jnp.float32), *qs[0]))
        print(f"  error vs float32 reference ({'vector' if vector_rows else 'matrix'} unit): "
              f"{err:.1e}")

    def over_layers(matmul_one):
        def program(x, weights):
            return sum(matmul_one(x, *w).astype(jnp.float32) for w in weights)
        return program

    def xla_int8(x, w_q, scale):  # lesson 06's formulation: widen inside the matmul, then scale
        y = jnp.dot(x, w_q.astype(x.dtype).T, preferred_element_type=jnp.float32)
        return (y * scale).astype(x.dtype)

    bf16 = over_layers(lambda x, w: jnp.dot(x, w))
    print(f"  {'M':>3s} {'int8 us':>8s} {'GB/s':>6s} {'% copy':>7s} {short + ' us':>8s} "
          f"{'speedup':>8s} {'XLA int8':>9s} {'vector':>7s}   per weight, in us; best (block_n, "
          f"block_k, split_k, warps, stages, vector_rows)")
    for M in env["int8_rows"]:
        x = _random(jax.random.key(M), (M, K), dtype)
        t_bf16 = _time(bf16, [(x, [(w,) for w in ws])]) / L
        t_xla = _time(over_layers(xla_int8), [(x, qs)]) / L
        best = {}   # the fastest variant on each unit: "vector" (M <= vector_rows), "matrix"
        for variant in env["int8_variants"]:
            bn, bk, split, warps, stages, vector_rows = variant
            if vector_rows and M > vector_rows:
                continue
            f = functools.partial(int8_matmul, block_n=bn, block_k=bk, split_k=split,
                                  num_warps=warps, num_stages=stages, vector_rows=vector_rows,
                                  interpret=interp)
            try:
                t = _time(over_layers(f), [(x, qs)]) / L
            except Exception as e:  # JaxRuntimeError: the tiles exceed shared memory
                print(f"  {M:3d} {variant}: failed: {str(e).splitlines()[0][:70]}")
                continue
            unit = "vector" if vector_rows else "matrix"
            if unit not in best or t < best[unit][0]:
                best[unit] = (t, variant)
        t, variant = min(best.values())
        vec = f"{best['vector'][0] * 1e6:7.1f}" if "vector" in best else f"{'-':>7s}"
        print(f"  {M:3d} {t * 1e6:8.1f} {N * K / t / 1e9:6.3g} {N * K / t / env['copy_bw']:7.0%} "
              f"{t_bf16 * 1e6:8.1f} {t_bf16 / t:8.2f} {t_xla * 1e6:9.1f} {vec}   {variant}",
              flush=True)
        rows.append((f"int8 matmul M={M}", f"{N}x{K}", _rate(N * K / t, "B/s"),
                     f"{short} {t_bf16 * 1e6:.1f} us", t_bf16 / t,
                     f"{N * K / t / env['copy_bw']:.0%} of copy BW; XLA int8 {t_xla / t:.2f}x"))


def resolve(cfg):
    """Sizes and kernel variants for the device at hand: the lesson's sizes on a GPU, small ones
    when interpreted (a CPU runs the kernel body per grid point in Python)."""
    gpu = jax.devices()[0].platform == "gpu"
    interp = cfg.interpret or not gpu
    big = gpu and not interp
    env = {
        "gpu": gpu, "interpret": interp,
        "flop_unit": ("TFLOP/s", 1e12) if big else ("GFLOP/s", 1e9),   # for the tables
        "dtype": jnp.bfloat16 if gpu else jnp.float32,
        "matmul_n": cfg.matmul_n or (8192 if big else 256),
        "matmul_tiles": ([(32, 32, 32, 4, 3), (64, 64, 64, 4, 3), (128, 128, 64, 4, 3),
                          (128, 256, 64, 8, 3), (256, 128, 64, 8, 3)] if big
                         else [(32, 32, 32, 4, 3), (64, 64, 64, 4, 3)]),
        "flash_lengths": _ints(cfg.flash_lengths) if cfg.flash_lengths else (
            [1024, 2048, 4096, 8192, 16384, 32768] if big else [128, 256]),
        "flash_blocks": FlashBlocks() if big else FlashBlocks(32, 32, 32, 32),
        "decode_shape": ((cfg.decode_batch, cfg.decode_heads, cfg.decode_kv_heads, cfg.decode_len)
                         if big else (4, 8, 2, 512)),
        "decode_variants": ([(None, 64), (None, 128), (4, 64), (8, 64), (16, 64)] if big
                            else [(None, 64)]),
        "int8_n": cfg.int8_n if big else 512,
        "int8_rows": _ints(cfg.int8_rows) if big else [1, 16],
        "int8_layers": 8 if big else 2,
        "int8_variants": ([(64, 256, None, 4, 3, 0), (64, 256, 2, 4, 3, 0),
                           (64, 512, None, 4, 3, 4), (32, 512, 4, 4, 3, 4),
                           (64, 512, None, 4, 3, 0), (64, 256, 1, 4, 4, 0), (64, 1024, 2, 4, 3, 0),
                           (128, 512, 2, 4, 3, 0), (64, 512, 4, 4, 3, 0), (64, 512, 2, 8, 3, 0),
                           (32, 512, 2, 4, 4, 0), (64, 512, 1, 4, 3, 0)] if big
                          else [(64, 128, None, 4, 4, 4), (64, 128, None, 4, 4, 0)]),
    }
    if not big:
        cfg = dataclasses.replace(cfg, n_heads=2, head_dim=32, flash_tokens=512)
    # Sizes that cannot fit are refused before the first array (XLA aborts the process on a
    # shape past 2^63 elements); each bound counts the inputs, outputs and references, 4 bytes
    # an element where the kernel's are 2 (the references run in float32).
    n, (B, _, KH, L), n8 = env["matmul_n"], env["decode_shape"], env["int8_n"]
    common.check_fits(f"matmul_n={n}", 4 * 4 * n * n, "the matmul's operands, product and "
                      "reference")
    tokens = max([cfg.flash_tokens] + list(env["flash_lengths"]))  # batch 1 past flash_tokens
    common.check_fits(f"flash_tokens={cfg.flash_tokens} flash_lengths={max(env['flash_lengths'])}"
                      f" n_heads={cfg.n_heads} head_dim={cfg.head_dim}",
                      8 * 4 * tokens * cfg.n_heads * cfg.head_dim,
                      "flash attention's q, k, v, output and their gradients")
    common.check_fits(f"decode_batch={B} decode_kv_heads={KH} decode_len={L} head_dim="
                      f"{cfg.head_dim}", 3 * 2 * 2 * B * KH * L * cfg.head_dim,
                      "the decode benchmark's K and V caches and their copies")
    common.check_fits(f"int8_n={n8}", env["int8_layers"] * 3 * n8 * n8, f"the int8 benchmark's "
                      f"{env['int8_layers']} weights, int8 and bf16")
    return cfg, env


def main():
    given = common.parse_flags(KernelsConfig())
    cfg, env = resolve(given)
    dev = jax.devices()[0]
    peak, _, basis = common.ceilings("bfloat16" if env["gpu"] else "float32")
    measured = common.measure_peaks(dtype="bfloat16" if env["gpu"] else "float32")
    env["peak"], env["copy_bw"] = peak, measured["copy_bw"]
    print(f"device: {dev.device_kind}; jax {jax.__version__}; kernels "
          f"{'interpreted' if env['interpret'] else 'compiled'}; peak {_rate(peak, 'FLOP/s')} "
          f"({basis}); copy bandwidth {_rate(env['copy_bw'], 'B/s')} (measured)")
    B, H, KH, L = env["decode_shape"]
    print(f"resolved: matmul_n={env['matmul_n']}; flash lengths "
          f"{','.join(map(str, env['flash_lengths']))} (batch {cfg.flash_tokens} tokens // "
          f"length, at least 1), n_heads={cfg.n_heads} head_dim={cfg.head_dim}; decode B={B} "
          f"heads={H} kv_heads={KH} len={L}; int8 [{env['int8_n']}, {env['int8_n']}] weights at M="
          f"{','.join(map(str, env['int8_rows']))}; dtype {jnp.dtype(env['dtype']).name}")
    if env["interpret"]:
        print("interpreted: each grid point's body runs as ordinary XLA ops on this device, so the "
              "errors below are the kernels' own,\nbut the speeds measure the interpreter; the "
              "lesson's speeds come from a GPU (BENCHMARKS.md)")
        fixed = [f"--{f}" for f in ("n_heads", "head_dim", "flash_tokens", "decode_batch",
                                    "decode_heads", "decode_kv_heads", "decode_len", "int8_n",
                                    "int8_rows")
                 if getattr(given, f) != getattr(KernelsConfig(), f)]
        if fixed:
            print(f"(interpreted, the kernels run at small fixed sizes: {', '.join(fixed)} "
                  f"appl{'y' if len(fixed) > 1 else 'ies'} to a compiled run on a GPU)")
    rows = []
    t0 = time.perf_counter()
    for name, fn in (("matmul", bench_matmul), ("flash", bench_flash), ("decode", bench_decode),
                     ("int8", bench_int8)):
        if name in cfg.only.split(","):
            fn(cfg, env, rows)
    print(f"\nsummary ({time.perf_counter() - t0:.0f} s; ratio > 1: the kernel is faster than "
          f"its peer in this run)")
    print(f"{'kernel':20s} {'shape':22s} {'kernel':>14s} {'peer':>20s} {'ratio':>6s}  bound")
    for name, shape, ours, peer, ratio, bound in rows:
        print(f"{name:20s} {shape:22s} {ours:>14s} {peer:>20s} {ratio:6.2f}  {bound}")


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --matmul_n, --flash_tokens, --flash_lengths, "
                             "--decode_batch, --decode_len, --int8_n or --int8_rows, or --only "
                             "one kernel")
