"""Attention from scratch, and why the materialized version is bound by memory traffic.

    python 04_attention.py                                  # T=1024 on a CPU, 8192 elsewhere
    python 04_attention.py --seq_len=4096 --n_kv_heads=4    # grouped-query attention

Attention is the only place where tokens talk to each other: every query scores every key, a
softmax turns the scores of one query into weights, and the output is the weighted sum of the
values (Vaswani et al. 2017, "Attention is all you need", section 3.2.1, equation 1):

    out = softmax(Q K^T / sqrt(D) + mask) V

`attention` below writes the four steps out (scores, mask, softmax in float32, weighted sum) and
supports what a Llama-style model needs: causal masking, several prompts packed into one row
(segment ids), and grouped-query attention (Ainslie et al. 2023) where groups of query heads
share one key/value head. main() first shows four properties: the output matches
common.attention_reference; attention without positions is blind to word order (so RoPE, Su et
al. 2021, is needed); without a mask a token sees the future; packed prompts do not see each
other. Then the lesson's arithmetic: the two matmuls move the [T, S] score matrix through memory, so
their intensity is of the order of the head dim D (D/2 for QK^T, whose scores are float32, and D for
PV in bf16; the softmax's about 1), far below the ridge point of a modern chip; a fused kernel that
never writes the matrix moves only Q, K, V and the output, for an intensity of about S/2 in bf16,
S/4 with the causal mask's half of the work (FlashAttention, Dao et al. 2022, section 3; lesson 05).
Last, the measured time of this attention, of XLA's `jax.nn.dot_product_attention` and of cuDNN's
fused kernel where present, each against its roofline.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp

import common


@dataclasses.dataclass(frozen=True)
class AttnConfig:
    batch: int = 1              # sequences B
    seq_len: int = 0           # T = S tokens; 0: 1024 on a CPU, 8192 on an accelerator
    n_heads: int = 16          # query heads H
    n_kv_heads: int = 16       # key/value heads KH; fewer than H is GQA, 1 is MQA
    head_dim: int = 128        # D
    dtype: str = "bfloat16"    # of q, k, v and the output; scores and softmax stay float32
    causal: bool = True         # each token sees only those before it
    iters: int = 10            # timed runs per implementation (the median is reported)
    seed: int = 0               # of the random q, k, v

    def __post_init__(self):
        for f in ("batch", "n_heads", "n_kv_heads", "head_dim", "iters"):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.seq_len < 0:
            raise common.UserError(f"seq_len must be >= 1 (or 0 for the default), "
                                   f"got {self.seq_len}")
        if self.n_heads % self.n_kv_heads:
            raise common.UserError(f"n_kv_heads={self.n_kv_heads} must divide "
                                   f"n_heads={self.n_heads}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise common.UserError(f"dtype must be float32, bfloat16 or float16, got {self.dtype}")


# ----------------------------------------------------------------------------------------------
# Attention, step by step
# ----------------------------------------------------------------------------------------------

def visible(q_pos, k_pos, causal, q_seg=None, k_seg=None):
    """The mask, True where a query may see a key: [B or 1, Tq, Sk].

    q_pos [Tq] and k_pos [Sk] are positions on the key axis. Causal: a query sees keys at or
    before its own position. With segment ids ([B, Tq], [B, Sk]) a query sees only keys of its own
    segment, so several prompts packed into one row stay independent."""
    mask = jnp.ones((1, q_pos.shape[0], k_pos.shape[0]), bool)
    if causal:
        mask = mask & (q_pos[:, None] >= k_pos[None, :])[None]
    if q_seg is not None:
        mask = mask & (q_seg[:, :, None] == k_seg[:, None, :])
    return mask


def attention(q, k, v, causal=False, segment_ids=None):
    """softmax(Q K^T / sqrt(D) + mask) V with the [T, S] score matrix materialized.

    q: [B, T, H, D]; k, v: [B, S, KH, D], KH dividing H (query heads h = kh * H/KH + g share kv
    head kh); segment_ids: [B, T] (self-attention, S == T). Causal with S > T (decoding after
    a cache of S - T tokens): query t sits at key position t + S - T, as in
    common.attention_reference. Rows that see no key at all give 0."""
    q, k, v, segment_ids = common.check_attention_inputs(q, k, v, segment_ids)
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, KH, H // KH, D)  # [B, T, KH, G, D]: each group shares one kv head

    # 1. Scores: one dot product per (query, key) pair. The matmul accumulates in float32 and
    #    hands back float32, so no precision is lost before the softmax. The 1/sqrt(D) keeps
    #    the scores' variance near 1 whatever D (Vaswani et al. 2017, section 3.2.1).
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(D)  # [B, KH, G, T, S]

    # 2. Mask: -inf where a query may not look, so exp() turns it into an exact 0.
    q_pos = jnp.arange(T) + (S - T)
    mask = visible(q_pos, jnp.arange(S), causal, segment_ids, segment_ids)  # [B or 1, T, S]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)

    # 3. Softmax over keys, in float32: bf16 has float32's range but 8 bits of mantissa, so a
    #    sum of thousands of weights would keep 2-3 significant digits. Subtracting the row max
    #    m keeps every exp() <= 1 (exp overflows float32 past 88.7); m cancels in the ratio, so
    #    no gradient needs to flow through it.
    m = jax.lax.stop_gradient(scores.max(axis=-1, keepdims=True))  # [B, KH, G, T, 1]
    m = jnp.where(jnp.isfinite(m), m, 0.0)  # a row that sees nothing: all -inf, m would be too
    p = jnp.exp(scores - m)                 # [B, KH, G, T, S], exactly 0 where masked
    l = p.sum(axis=-1, keepdims=True)       # [B, KH, G, T, 1]
    probs = p / jnp.where(l == 0, 1.0, l)   # a row that sees nothing gives 0, not 0/0

    # 4. Weighted sum of the values: the probabilities go in in the input dtype, as the matmul
    #    unit takes them, and the sum accumulates in float32, rounded once at the end.
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)  # [B, T, KH, G, D]
    return out.reshape(B, T, H, D).astype(v.dtype)


# ----------------------------------------------------------------------------------------------
# The lecture's arithmetic
# ----------------------------------------------------------------------------------------------

def attention_costs(B, T, S, H, KH, D, bytes_per_value, causal):
    """[(stage, FLOPs, bytes moved)]: the three steps of the materialized version, their total,
    and one fused kernel that never writes the score matrix.

    Materialized: the scores go to memory as float32 (4 bytes per entry) and come back for the
    softmax, whose probabilities go out in the input dtype and come back for the second matmul.
    XLA computes the whole [T, S] matrix even when causal, so its work is full; the fused
    kernel's FLOPs are halved by the causal mask (it skips the masked half), as the
    FlashAttention papers count them."""
    b = bytes_per_value
    q_bytes, kv_bytes = b * B * T * H * D, b * B * S * KH * D  # one of q (or out), one of k (or v)
    entries = B * H * T * S
    qk = ("QK^T -> scores f32", 2 * entries * D, q_bytes + kv_bytes + 4 * entries)
    sm = ("mask + softmax", 5 * entries, 4 * entries + b * entries)
    pv = ("probs @ V", 2 * entries * D, b * entries + kv_bytes + q_bytes)
    total = ("materialized total", qk[1] + sm[1] + pv[1], qk[2] + sm[2] + pv[2])
    fused = ("fused (never writes [T,S])", 4 * entries * D // (2 if causal else 1),
             2 * q_bytes + 2 * kv_bytes)
    return [qk, sm, pv, total, fused]


def roofline_s(costs, i, peak, bw):
    """The roofline time of attention_costs' row i: max(FLOPs / peak, bytes / bandwidth) for one
    kernel; for the materialized total, the sum of its three stages' (the scores must be in
    memory before the softmax reads them, and the probabilities before PV does, so one stage's
    compute cannot hide another's memory traffic)."""
    if i == 3:
        return sum(roofline_s(costs, j, peak, bw) for j in range(3))
    return max(costs[i][1] / peak, costs[i][2] / bw)


def attention_flops(B, T, S, H, D, causal):
    """Useful FLOPs of QK^T and PV, halved when causal: the basis of every TFLOP/s printed."""
    return 4 * B * T * S * H * D // (2 if causal else 1)


# ----------------------------------------------------------------------------------------------
# Properties, shown on tiny inputs
# ----------------------------------------------------------------------------------------------

def show_properties(seed=0):
    """Four facts about attention, each as an error that is ~0 or clearly not."""
    B, T, H, D = 1, 8, 2, 16
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, H, D), jnp.float32)
    k = jax.random.normal(kk, (B, T, H, D), jnp.float32)
    v = jax.random.normal(kv, (B, T, H, D), jnp.float32)
    diff = lambda a, b: float(jnp.max(jnp.abs(a - b)))

    ref = diff(attention(q, k, v, True), common.attention_reference(q, k, v, True))
    print(f"  matches common.attention_reference (causal):        max |diff| {ref:.1e}")

    # Shuffle the tokens: without positions each output just moves along with its token.
    perm = jnp.array([3, 0, 6, 1, 7, 2, 5, 4])
    shuffled = attention(q[:, perm], k[:, perm], v[:, perm])
    plain = diff(shuffled, attention(q, k, v)[:, perm])
    cos, sin = common.rope_cos_sin(jnp.arange(T)[None], common.Config(head_dim=D))
    rope = lambda x: common.apply_rope(x, cos, sin)
    with_rope = diff(attention(rope(q[:, perm]), rope(k[:, perm]), v[:, perm]),
                     attention(rope(q), rope(k), v)[:, perm])
    print(f"  shuffled tokens, no positions: output just permuted: max |diff| {plain:.1e}")
    print(f"  shuffled tokens, with RoPE: order now matters:       max |diff| {with_rope:.1e}")

    # Change the last token: the first token's output moves unless the mask is causal.
    k2, v2 = k.at[:, -1].add(1.0), v.at[:, -1].add(1.0)
    leak = diff(attention(q, k2, v2)[:, 0], attention(q, k, v)[:, 0])
    sealed = diff(attention(q, k2, v2, True)[:, 0], attention(q, k, v, True)[:, 0])
    print(f"  change token {T - 1}, output of token 0 without a mask: max |diff| {leak:.1e}")
    print(f"  change token {T - 1}, output of token 0 causal:          max |diff| {sealed:.1e}")

    # Two prompts of 5 and 3 tokens packed into one row equal each prompt run alone.
    seg = jnp.array([[0, 0, 0, 0, 0, 1, 1, 1]])
    packed = attention(q, k, v, True, seg)
    alone = jnp.concatenate([attention(q[:, :5], k[:, :5], v[:, :5], True),
                             attention(q[:, 5:], k[:, 5:], v[:, 5:], True)], axis=1)
    packing = diff(packed, alone)
    print(f"  two prompts packed with segment ids vs run alone:    max |diff| {packing:.1e}")


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def fmt_bytes(n):
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:.0f} B"


def print_arithmetic(cfg, T, dtype, peak, bw):
    """Each stage's FLOPs and bytes against the roofline, then where the ridge point falls for
    the [T, S] matmuls and for the fused kernel, and the lecture's per-head count. Returns the
    stages (attention_costs)."""
    B, H, KH, D = cfg.batch, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    print(f"\narithmetic for B={B} T=S={T} H={H} KH={KH} D={D} {cfg.dtype}"
          f"{' causal' if cfg.causal else ''}:")
    print(f"  {'stage':<28} {'GFLOP':>9} {'bytes':>9} {'FLOP/byte':>9} {'roofline':>10}  bound")
    costs = attention_costs(B, T, T, H, KH, D, dtype.itemsize, cfg.causal)
    for i, (name, flops, nbytes) in enumerate(costs):
        t_flops, t_bytes = flops / peak, nbytes / bw
        bound = "compute" if t_flops > t_bytes else "memory"
        if i == 3:  # three kernels, each waiting on the last one's output: their bounds add
            bound = "sum of the three"
        print(f"  {name:<28} {flops / 1e9:9.1f} {fmt_bytes(nbytes):>9} {flops / nbytes:9.1f} "
              f"{roofline_s(costs, i, peak, bw) * 1e3:8.3f}ms  {bound}")
    n = dtype.itemsize  # the fused kernel moves q, k, v and o once: a query row's 4 S D
    # FLOPs per 4 n D bytes
    fused = (f"S/{2 * n} = {T / (2 * n):g} (causal: half the work)" if cfg.causal
             else f"S/{n} = {T / n:g}")
    pv = {1: "2D", 2: "D"}.get(n, f"D/{n // 2}")  # 2 D FLOPs per probability of n bytes
    print(f"  ridge point {peak / bw:.0f} FLOP/byte: the matmuls that write/read the [T, S] "
          f"matrix sit near D/2 (QK^T) and {pv} (PV), the fused kernel near {fused}, more with "
          f"fewer kv heads")
    # The lecture's per-head count (Llama-2-7B: 62 FLOP/byte at N=4096, d=128) stores the scores
    # and probabilities in 2 bytes each and gives the softmax 3 FLOPs per entry:
    # (4d + 3) N^2 FLOPs over 8 N^2 + 8 N d bytes. Here the scores are float32, as XLA keeps them.
    lecture = (4 * D + 3) * T * T / (8 * T * T + 8 * T * D)
    print(f"  the lecture's count (2-byte scores and probabilities, full mask, one head): "
          f"(4D + 3) S^2 / (8 S^2 + 8 S D) = {lecture:.1f} FLOP/byte; float32 scores move "
          f"{8 + 2 * n} bytes per entry, not 8")
    return costs


def time_implementations(impls, arg_sets, ref, iters):
    """(name, Timing, max |out - ref|) of each implementation that runs here; one that cannot
    (no cuDNN, too large) is said and passed over."""
    rows = []
    for name, fn in impls.items():
        try:
            fn = jax.jit(fn)
            t = common.bench(fn, arg_sets=arg_sets, iters=iters)  # compiles first
            err = float(jnp.max(jnp.abs(fn(*arg_sets[0]).astype(jnp.float32) -
                                        ref.astype(jnp.float32))))
        except common.UserError:
            raise
        except (RuntimeError, ValueError, NotImplementedError) as e:  # e.g. no cuDNN here
            print(f"  {name}: did not run ({str(e).splitlines()[0][:120]})")
            continue
        rows.append((name, t, err))
    return rows


def main():
    cfg = common.parse_flags(AttnConfig())
    platform = jax.devices()[0].platform
    T = cfg.seq_len or (1024 if platform == "cpu" else 8192)
    B, H, KH, D = cfg.batch, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    dtype = jnp.dtype(cfg.dtype)
    # The materialized [B, H, T, S] float32 scores and probabilities beside two sets of inputs:
    # refused now if they cannot fit (past 2^63 elements XLA would abort the process).
    common.check_fits(f"batch={B} seq_len={T} n_heads={H} head_dim={D}",
                      2 * B * H * T * T * 4 + 2 * B * T * (H + 2 * KH) * D * dtype.itemsize,
                      "the float32 [B, H, T, S] scores and probabilities, and q, k, v twice")
    # XLA:CPU runs bf16 matmuls at no more than its float32 rate: that is the CPU's ceiling.
    peak, bw, basis = common.ceilings(cfg.dtype if platform != "cpu" else "float32")
    print(f"device: {jax.devices()[0].device_kind}; ceilings {peak / 1e12:.4g} TFLOP/s, "
          f"{bw / 1e9:.0f} GB/s ({basis}); ridge point {peak / bw:.0f} FLOP/byte")

    print("\nproperties (float32, T=8):")
    show_properties(cfg.seed)

    costs = print_arithmetic(cfg, T, dtype, peak, bw)

    ks = jax.random.split(jax.random.key(cfg.seed), 6)
    def inputs(a, b, c):
        return (jax.random.normal(a, (B, T, H, D), dtype),
                jax.random.normal(b, (B, T, KH, D), dtype),
                jax.random.normal(c, (B, T, KH, D), dtype))
    arg_sets = [inputs(*ks[:3]), inputs(*ks[3:])]  # rotated, so no run reuses a warm cache

    impls = {"attention (this file, XLA)": lambda q, k, v: attention(q, k, v, cfg.causal)}
    impls["jax.nn.dot_product_attention xla"] = lambda q, k, v: jax.nn.dot_product_attention(
        q, k, v, is_causal=cfg.causal, implementation="xla")
    if platform == "gpu":
        impls["jax.nn.dot_product_attention cudnn"] = lambda q, k, v: (
            jax.nn.dot_product_attention(q, k, v, is_causal=cfg.causal, implementation="cudnn"))

    # The error is against float32 attention: a reference in the inputs' dtype rounds as ours do
    ref = jax.jit(lambda q, k, v: common.attention_reference(
        *(a.astype(jnp.float32) for a in (q, k, v)), cfg.causal))(*arg_sets[0])
    flops = attention_flops(B, T, T, H, D, cfg.causal)
    materialized = costs[3]
    t_mat, t_fused = roofline_s(costs, 3, peak, bw), roofline_s(costs, 4, peak, bw)
    rows = time_implementations(impls, arg_sets, ref, cfg.iters)
    if not rows:  # each said why above
        raise common.UserError("no implementation ran at this size: try a smaller --batch, "
                               "--seq_len or --n_heads")

    half = " (causal half)" if cfg.causal else ""
    print(f"\nmeasured, B={B} T=S={T} H={H} KH={KH} D={D} {cfg.dtype}"
          f"{' causal' if cfg.causal else ''}; FLOPs {flops / 1e9:.1f} G{half}; roofline "
          f"{t_mat * 1e3:.3f} ms materialized, {t_fused * 1e3:.3f} ms fused")
    print(f"  'GB/s if mat.': the materialized version's bytes over the time; above the "
          f"{bw / 1e9:.0f} GB/s ceiling a kernel cannot be writing the [T, S] matrix")
    print(f"{'implementation':<36} {'compile':>8} {'median':>10} {'TFLOP/s':>8} {'% peak':>7} "
          f"{'GB/s if mat.':>12} {'x fused roofl.':>14} {'max err':>8}")
    for name, t, err in rows:
        print(f"{name:<36} {t.compile_s:7.2f}s {t.median_s * 1e3:8.3f}ms "
              f"{flops / t.median_s / 1e12:8.2f} {100 * flops / t.median_s / peak:6.1f}% "
              f"{materialized[2] / t.median_s / 1e9:12.1f} {t.median_s / t_fused:14.1f} {err:8.1e}")


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --batch, --seq_len or --n_heads")
