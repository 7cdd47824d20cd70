"""Lesson 08: every Pallas kernel, interpreted on the CPU, against its reference.

Interpret mode runs the kernel body as ordinary JAX per grid point, so the shapes stay small and
the blocks smaller still: 16 rows, so that ragged lengths, several blocks, the causal diagonal
and GQA all occur. Everything is float32, so agreement is to rounding: 1e-5 relative."""
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common

k08 = common.import_script("08_pallas_kernels")
f05 = common.import_script("05_flash_attention")


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def normal(rng, *shape):
    return jnp.asarray(rng.standard_normal(shape), jnp.float32)


ACTIVATION_REFERENCES = {"none": lambda y: y, "relu": lambda y: np.maximum(y, 0),
                         "gelu": lambda y: 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi)
                                                                  * (y + 0.044715 * y ** 3))),
                         "silu": lambda y: y / (1 + np.exp(-y))}


@pytest.mark.parametrize("M,K,N,activation,with_bias", [
    (64, 48, 32, "none", False),      # block multiples in M and N, ragged K
    (37, 70, 50, "gelu", True),       # nothing a block multiple
    (16, 16, 16, "silu", True),
    (20, 30, 40, "relu", True),
])
def test_matmul(M, K, N, activation, with_bias):
    rng = np.random.default_rng(M)
    x, w, b = normal(rng, M, K), normal(rng, K, N), normal(rng, N)
    bias = b if with_bias else None
    out = k08.matmul(x, w, bias, activation, block_m=16, block_n=16, block_k=16, interpret=True)
    assert out.shape == (M, N)
    y = np.asarray(x, np.float64) @ np.asarray(w, np.float64) + (np.asarray(b) if with_bias else 0)
    assert rel(out, ACTIVATION_REFERENCES[activation](y)) < 1e-5


def test_matmul_rejects_mismatched_shapes():
    with pytest.raises(common.UserError, match="matmul needs"):
        k08.matmul(jnp.ones((4, 5)), jnp.ones((6, 7)), interpret=True)
    with pytest.raises(common.UserError, match="power of two"):
        k08.matmul(jnp.ones((4, 5)), jnp.ones((5, 7)), block_m=24, interpret=True)


def test_tile_intensity_matches_the_lecture():
    K = 4096
    assert k08.tile_intensity(1, 1, K, 2) == pytest.approx(2 * K / (2 * (2 * K + 1)))
    assert k08.tile_intensity(1, 2, K, 2) == pytest.approx(4 * K / (2 * (3 * K + 2)))
    assert k08.tile_intensity(2, 2, K, 2) == pytest.approx(8 * K / (2 * (4 * K + 4)))
    # Square tiles of n outputs a side read 2nK for 2n^2 K FLOPs: intensity grows like n / 2.
    assert k08.tile_intensity(128, 128, K, 2) > 60 * k08.tile_intensity(1, 1, K, 2)


SMALL = k08.FlashBlocks(block_q=32, block_k=16, block_q_bwd=16, block_k_bwd=32)
# The backward's dK/dV pass with query blocks taller than key blocks: its causal band of query
# blocks for a key block must still reach the diagonal block's last rows
TALL_Q = k08.FlashBlocks(block_q=32, block_k=16, block_q_bwd=32, block_k_bwd=16)


def segment_ids(kind, rng, B, T):
    """None, a few runs (packed sequences), many short runs (documents that skip blocks), or
    ids scattered with repeats (no runs: nothing may be skipped that a repeat needs)."""
    if kind is None:
        return None
    ids = {"runs": np.sort(rng.integers(0, 3, (B, T)), axis=1),
           "documents": np.cumsum(rng.random((B, T)) < 1 / 12, axis=1),
           "scattered": rng.integers(0, 3, (B, T))}[kind]
    return jnp.asarray(ids, jnp.int32)


@pytest.mark.parametrize("B,T,S,H,KH,D,causal,segments,blocks", [
    (1, 50, 70, 2, 1, 16, False, None, SMALL),  # T != S, ragged, GQA 2:1
    (2, 45, 45, 4, 2, 24, True, None, SMALL),  # causal across a ragged diagonal; D padded to 32
    (1, 40, 40, 4, 1, 16, True, "runs", SMALL),  # packed, MQA, ragged (backward pads to 64)
    (2, 150, 150, 4, 2, 16, True, "documents", SMALL),  # blocks before a document's start skipped
    (1, 100, 100, 2, 1, 16, False, "documents", SMALL),
    (1, 90, 90, 2, 2, 16, True, "scattered", SMALL),
    (1, 64, 64, 2, 1, 16, True, None, TALL_Q),
    (1, 70, 70, 2, 1, 16, True, "documents", TALL_Q),
])
def test_flash_attention_and_gradients(B, T, S, H, KH, D, causal, segments, blocks):
    rng = np.random.default_rng(T + S)
    q, k, v, w = (normal(rng, B, T, H, D), normal(rng, B, S, KH, D), normal(rng, B, S, KH, D),
                  normal(rng, B, T, H, D))
    seg = segment_ids(segments, rng, B, T)

    def kernel(q, k, v):
        return k08.flash_attention(q, k, v, causal, seg, interpret=True, blocks=blocks)

    def reference(q, k, v):  # lesson 05's pure-JAX flash attention
        return f05.flash_attention(q, k, v, causal, seg, block_q=16, block_k=16)

    @jax.jit
    def both(q, k, v, w):
        res = []
        for f in (kernel, reference):
            loss = lambda q, k, v: jnp.sum(f(q, k, v) * w)
            res.append((f(q, k, v), jax.grad(loss, argnums=(0, 1, 2))(q, k, v)))
        return res

    (out, grads), (out_ref, grads_ref) = both(q, k, v, w)
    assert rel(out, out_ref) < 1e-5
    for g, g_ref in zip(grads, grads_ref):
        assert rel(g, g_ref) < 1e-5


def test_segment_spans_are_each_ids_first_and_last_position():
    rng = np.random.default_rng(0)
    for kind in ("runs", "documents", "scattered"):
        seg = np.asarray(segment_ids(kind, rng, 3, 70))
        first, last = map(np.asarray, k08._segment_spans(jnp.asarray(seg)))
        same = seg[:, :, None] == seg[:, None, :]      # [B, t, position]
        pos = np.arange(70)
        np.testing.assert_array_equal(first, np.where(same, pos, 70).min(-1))
        np.testing.assert_array_equal(last, np.where(same, pos, -1).max(-1))


def test_flash_attention_matches_jax_dot_product_attention():
    rng = np.random.default_rng(1)
    q, k, v = normal(rng, 1, 33, 4, 16), normal(rng, 1, 33, 2, 16), normal(rng, 1, 33, 2, 16)
    out = k08.flash_attention(q, k, v, causal=True, interpret=True, blocks=SMALL)
    ref = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")
    assert rel(out, ref) < 1e-5


def test_flash_attention_rejects_causal_with_different_lengths():
    q, k = jnp.ones((1, 8, 2, 16)), jnp.ones((1, 12, 2, 16))
    with pytest.raises(common.UserError, match="T == S"):
        k08.flash_attention(q, k, k, causal=True, interpret=True)


def test_flash_attention_implementation_choice():
    q = jnp.ones((1, 128, 2, 64), jnp.bfloat16)
    assert not k08.hopper_available(q, q, None, True)   # a CPU: the portable kernel
    with pytest.raises(common.UserError, match="sm90"):
        k08.flash_attention(q, q, q, implementation="hopper")
    with pytest.raises(common.UserError, match="implementation"):
        k08.flash_attention(q, q, q, implementation="triton", interpret=True)


@pytest.mark.parametrize("D", [32, 40])  # 40: padded to 64, a power of 2, in the wrapper
def test_decode_attention(D, B=3, H=8, KH=2, S=100, n_chunks=3):
    """A ragged cache, GQA, and chunks that end past some rows' lengths."""
    rng = np.random.default_rng(S)
    q, k, v = normal(rng, B, H, D), normal(rng, B, KH, S, D), normal(rng, B, KH, S, D)
    lengths = jnp.asarray(rng.integers(1, S + 1, B), jnp.int32).at[0].set(1)  # one row of 1
    out = k08.decode_attention(q, k, v, lengths, n_chunks=n_chunks, block_k=16, interpret=True)
    assert rel(out, k08.decode_attention_reference(q, k, v, lengths)) < 1e-5


def test_decode_attention_int8_cache(B=2, H=4, KH=2, S=80):
    """An int8 cache with a float32 scale per position and head, widened in the kernel: equal
    to attention over the dequantized cache."""
    rng = np.random.default_rng(1)
    D = 32
    q = normal(rng, B, H, D)

    def quantized():
        x = normal(rng, B, KH, S, D) * (1 + jnp.arange(S))[:, None] / S   # scales that vary
        scale = jnp.max(jnp.abs(x), axis=-1) / 127
        return jnp.round(x / scale[..., None]).astype(jnp.int8), scale

    (k, ks), (v, vs) = quantized(), quantized()
    lengths = jnp.array([17, 80])
    out = k08.decode_attention(q, k, v, lengths, ks, vs, n_chunks=3, block_k=16, interpret=True)
    assert rel(out, k08.decode_attention_reference(q, k, v, lengths, ks, vs)) < 1e-5
    with pytest.raises(common.UserError, match="k_scale and v_scale"):
        k08.decode_attention(q, k, v, lengths, ks, interpret=True)


def test_decode_attention_ignores_the_stale_cache():
    """Whatever lies past a row's length (an earlier request's tokens) must not leak in."""
    rng = np.random.default_rng(0)
    q, k, v = normal(rng, 2, 4, 16), normal(rng, 2, 2, 48, 16), normal(rng, 2, 2, 48, 16)
    lengths = jnp.array([20, 33])
    run = lambda k, v: k08.decode_attention(q, k, v, lengths, n_chunks=2, block_k=16,
                                            interpret=True)
    junk = lambda x: x.at[:, :, 33:].set(1e4).at[0, :, 20:].set(-1e4)
    np.testing.assert_array_equal(run(k, v), run(junk(k), junk(v)))


def test_decode_attention_lengths_of_zero_and_past_the_cache():
    """A length past S counts as S (the positions beyond are the chunks' zero padding, which
    must not be attended to); a row of length 0 gives zeros, not NaN, and leaves the other
    rows as they were; one length serves every row."""
    rng = np.random.default_rng(3)
    S = 33                                   # 3 chunks of 16: 15 rows of padding past S
    q, k, v = normal(rng, 3, 4, 16), normal(rng, 3, 2, S, 16), normal(rng, 3, 2, S, 16)
    run = lambda lengths: k08.decode_attention(q, k, v, lengths, n_chunks=3, block_k=16,
                                               interpret=True)
    np.testing.assert_allclose(run(jnp.array([40, 1000, 17])), run(jnp.array([S, S, 17])),
                               rtol=1e-6, atol=1e-6)
    got, want = run(jnp.array([0, 5, 17])), run(jnp.array([3, 5, 17]))
    assert bool(jnp.all(got[0] == 0)) and bool(jnp.all(jnp.isfinite(got)))
    np.testing.assert_array_equal(got[1:], want[1:])
    ref = k08.decode_attention_reference(q, k, v, jnp.array([0, 5, 17]))
    assert bool(jnp.all(ref[0] == 0)) and rel(got, ref) < 1e-5
    np.testing.assert_allclose(run(9), run(jnp.array([9, 9, 9])), rtol=0, atol=0)


def test_kernels_name_the_shapes_a_user_got_wrong():
    q, k = jnp.ones((1, 4, 16)), jnp.ones((1, 2, 8, 16))
    cases = [(lambda: k08.decode_attention(q[0], k, k, jnp.array([8])), "q \\[B, H, D\\]"),
             (lambda: k08.decode_attention(q, k, k, jnp.array([8, 8])), "lengths must be"),
             (lambda: k08.decode_attention(q, k.astype(jnp.int8), k.astype(jnp.int8),
                                           jnp.array([8])), "int8 cache needs k_scale"),
             (lambda: k08.matmul(jnp.ones((4, 8)), jnp.ones((8, 16)), bias=jnp.ones(8)),
              "bias must be \\[N\\]"),
             (lambda: k08.matmul(jnp.ones((0, 8)), jnp.ones((8, 16))), "must be >= 1")]
    for call, match in cases:
        with pytest.raises(common.UserError, match=match):
            call()
    x, w = normal(np.random.default_rng(4), 2, 16), normal(np.random.default_rng(5), 16, 16)
    w_q, scale = k08.quantize_int8(w)   # a scale given as a list is taken as an array
    np.testing.assert_array_equal(k08.int8_matmul(x, w_q, list(np.asarray(scale))),
                                  k08.int8_matmul(x, w_q, scale))


@pytest.mark.parametrize("M,K,N,split_k,vector_rows", [
    (1, 64, 48, None, 4),  # one row on the vector-unit kernel, split chosen by the wrapper
    (3, 100, 70, 3, 4),    # ragged, split K, still vector
    (1, 100, 70, 3, 0),    # the matrix-unit kernel, M padded to 16
    (16, 32, 32, 2, 0),
])
def test_int8_matmul(M, K, N, split_k, vector_rows):
    rng = np.random.default_rng(M)
    x, w = normal(rng, M, K), normal(rng, N, K)
    w_q, scale = k08.quantize_int8(w)
    out = k08.int8_matmul(x, w_q, scale, block_n=16, block_k=16, split_k=split_k,
                          vector_rows=vector_rows, interpret=True)
    assert rel(out, k08.int8_matmul_reference(x, w_q, scale)) < 1e-5
    # and the quantization itself is close to the float weights: 1/254 of the range per value
    assert rel(out, x @ w.T) < 2e-2


def test_quantize_int8_rounds_to_the_nearest_step_and_fills_the_range():
    """Each row's largest magnitude lands on +-127 and every weight is within half a step of
    its int8 value times the row's scale (rounding, not truncation)."""
    w = np.random.default_rng(3).normal(size=(6, 40)).astype(np.float32)
    w[2] *= 1e-3  # a row of small weights gets its own, smaller scale
    w_q, scale = (np.asarray(a) for a in k08.quantize_int8(w))
    np.testing.assert_array_equal(np.abs(w_q.astype(np.int32)).max(axis=1), 127)
    np.testing.assert_allclose(scale, np.abs(w).max(axis=1) / 127, rtol=1e-6)
    assert (np.abs(w - w_q * scale[:, None]) <= scale[:, None] / 2 * (1 + 1e-5)).all()


def test_decode_benchmark_counts_the_keys_and_values_it_reads(monkeypatch):
    """On a scripted clock (every call 1 ms) the decode rows' bandwidth is the bytes each must
    read: K and V up to each row's length; the int8 cache's one byte a value plus a float32
    scale per position and head. The copy ceiling is set to the full cache's rate."""
    monkeypatch.setattr(k08, "_time", lambda fn, arg_sets, device=False: 1e-3)
    B, H, KH, S, D = 2, 4, 2, 32, 16
    full = B * S * KH * D * 2 * 4  # float32 K and V
    env = {"decode_shape": (B, H, KH, S), "dtype": jnp.float32, "interpret": True,
           "decode_variants": [(None, 16)], "copy_bw": full / 1e-3}
    rows = []
    k08.bench_decode(k08.KernelsConfig(head_dim=D), env, rows)
    got = {name: share for name, *_, share in rows}
    assert got["decode attn, full"] == "100% of copy BW"
    assert got["decode attn, int8 KV"] == f"{B * S * KH * (D + 4) * 2 / full:.0%} of copy BW"


def test_matmul_benchmark_rows_are_the_tiles_that_ran(monkeypatch, capsys):
    """matmul clamps its blocks to the matrix (a power of 2 at least n): at n = 20 both tiles
    run as 32x32x32, so the table has that one row, its FLOP/B the tile's that ran."""
    monkeypatch.setattr(k08, "_time", lambda fn, arg_sets, device=False: (1e-3, 1e-3))
    env = {"matmul_n": 20, "dtype": jnp.float32, "interpret": True, "peak": 1e12,
           "copy_bw": 1e11, "flop_unit": ("GFLOP/s", 1e9),
           "matmul_tiles": [(32, 32, 32, 4, 3), (64, 64, 64, 4, 3)]}
    rows = []
    k08.bench_matmul(k08.KernelsConfig(), env, rows)
    table = [line.split() for line in capsys.readouterr().out.splitlines() if "x  32" in line]
    want = [["32x", "32x", "32", f"{k08.tile_intensity(32, 32, 20, 4):.1f}"]]
    assert [t[:3] + t[5:6] for t in table] == want
    assert rows[0][1] == "20^3, tile 32x32x32"


def test_kernels_reject_bad_arguments():
    with pytest.raises(common.UserError, match="int8"):
        k08.int8_matmul(jnp.ones((1, 16)), jnp.ones((16, 16)), jnp.ones(16), interpret=True)
    w_q = jnp.ones((16, 16), jnp.int8)
    for x, split_k in ((jnp.ones((0, 16)), None), (jnp.ones((1, 16)), 0),
                       (jnp.ones((1, 16)), 2.5)):
        with pytest.raises(common.UserError, match="must be (an integer )?>= 1"):
            k08.int8_matmul(x, w_q, jnp.ones(16), split_k=split_k, interpret=True)
    q, kv = jnp.ones((1, 4, 16)), jnp.ones((1, 2, 8, 16))
    for n_chunks in (0, 2.5):
        with pytest.raises(common.UserError, match="n_chunks must be an integer >= 1"):
            k08.decode_attention(q, kv, kv, jnp.array([8]), n_chunks=n_chunks, interpret=True)
    with pytest.raises(common.UserError, match="no empty dimension"):  # an empty cache
        k08.decode_attention(q, kv[:, :, :0], kv[:, :, :0], jnp.array([0]), interpret=True)
    for w in (jnp.ones(16), jnp.ones((2, 4, 8)), jnp.ones((16, 16), jnp.int32)):
        with pytest.raises(common.UserError, match="quantize_int8 needs a float weight"):
            k08.quantize_int8(w)
    with pytest.raises(common.UserError, match="int8_rows takes positive integers"):
        k08.KernelsConfig(int8_rows="")


def test_decode_attention_with_more_query_heads_a_kv_head_than_a_tile():
    """24 query heads on one kv head: a tile of 24 rows, past the 16 that smaller groups pad
    to (on an H100 the kernel compiles and matches its reference with 24 rows too)."""
    rng = np.random.default_rng(24)
    q, k, v = normal(rng, 2, 24, 16), normal(rng, 2, 1, 40, 16), normal(rng, 2, 1, 40, 16)
    lengths = jnp.array([40, 7])
    out = k08.decode_attention(q, k, v, lengths, block_k=16, interpret=True)
    assert rel(out, k08.decode_attention_reference(q, k, v, lengths)) < 1e-5


@pytest.mark.parametrize("S,block_q,block_k", [(100, 32, 32), (100, 64, 16), (20, 128, 64),
                                              (256, 32, 64)])
def test_causal_blocks_visited_are_the_blocks_with_a_visible_score(S, block_q, block_k):
    """For packed documents (runs of ids), the key blocks the forward visits are exactly the
    (query block, key block) pairs holding at least one causal, same-document score, counted
    here from the dense mask; S need not be a block multiple, nor reach block_q."""
    rng = np.random.default_rng(S)
    for mean in (1, 8, S):
        seg = np.cumsum(rng.random((2, S)) < 1 / mean, axis=1)
        bq, bk = min(block_q, k08._pow2_at_least(S)), min(block_k, k08._pow2_at_least(S))
        pos = np.arange(S)
        mask = (seg[:, :, None] == seg[:, None, :]) & (pos[:, None] >= pos[None, :])
        nq, nk = -(-S // bq), -(-S // bk)
        padded = np.zeros((2, nq * bq, nk * bk), bool)
        padded[:, :S, :S] = mask
        any_visible = padded.reshape(2, nq, bq, nk, bk).any(axis=(2, 4))
        causal = np.minimum(-(-(np.arange(nq) + 1) * bq // bk), nk).sum() * 2
        assert k08.causal_blocks_visited(seg, block_q, block_k) == pytest.approx(
            any_visible.sum() / causal)


@pytest.mark.parametrize("rows,cols", [(8, 4), (4, 16), (32, 32)])
def test_hopper_segments_bound_every_shared_segment(rows, cols):
    """What the Hopper kernels take for segment ids: ids that split the positions as the given
    ids do (each segment's first position), and per tile of `rows` positions the range of
    `cols`-tiles holding every position that shares a segment with one of its rows, no wider
    (its first and last tiles hold such a position). Runs of ids, scattered repeated ones, and
    ids past 2^24, which float32 would merge."""
    rng = np.random.default_rng(rows * cols)
    T = 64
    for seg in (np.cumsum(rng.random((2, T)) < 1 / 6, axis=1), rng.integers(0, 3, (2, T)),
                np.full((2, T), 7), 2**24 + rng.integers(0, 2, (2, T))):
        ids, bounds = k08._hopper_segments(jnp.asarray(seg, jnp.int32), rows, cols)
        ids, bounds = np.asarray(ids), np.asarray(bounds)
        assert ids.dtype == np.float32 and bounds.shape == (2, T // rows, 2)
        same = seg[:, :, None] == seg[:, None, :]
        np.testing.assert_array_equal(ids[:, :, None] == ids[:, None, :], same)
        for b, r in np.ndindex(2, T // rows):
            shared = np.flatnonzero(same[b, r * rows:(r + 1) * rows].any(0))
            assert tuple(bounds[b, r]) == (shared.min() // cols, shared.max() // cols + 1)


def test_hopper_kernels_get_the_bounds_of_their_own_tiles(monkeypatch):
    """The forward's bounds are per CTA of 2 x HOPPER_BLOCK_Q query rows over key tiles of
    HOPPER_BLOCK_KV; the backward's per slab of 2 x HOPPER_BWD_BLOCK_KV keys over query blocks of
    HOPPER_BWD_BLOCK_Q (the kernels read them by those tile numbers). Spies stand in for the
    sm90 kernels."""
    got = {}

    def forward(q, k, v, seg, **kw):
        got["forward"] = seg
        return q, jnp.zeros(q.shape[:1] + q.shape[2:3] + q.shape[1:2], jnp.float32)

    def backward(q, k, v, out, lse, d_out, seg, **kw):
        got["backward"] = seg
        return q, k, v
    monkeypatch.setattr(k08, "_hopper_forward", forward)
    monkeypatch.setattr(k08, "_hopper_backward", backward)
    B, T = 2, 512
    q = jnp.zeros((B, T, 2, 64), jnp.bfloat16)
    seg = jnp.asarray(np.cumsum(np.random.default_rng(0).random((B, T)) < 1 / 50, axis=1))
    out, res = k08._flash_fwd(q, q, q, seg, True, 0.125, k08.FlashBlocks(), False, "hopper")
    k08._flash_bwd(True, 0.125, k08.FlashBlocks(), False, "hopper", res, out)
    first, last = k08._segment_spans(seg)
    for name, rows, cols in (("forward", 2 * k08.HOPPER_BLOCK_Q, k08.HOPPER_BLOCK_KV),
                             ("backward", 2 * k08.HOPPER_BWD_BLOCK_KV, k08.HOPPER_BWD_BLOCK_Q)):
        ids, bounds = got[name]
        np.testing.assert_array_equal(ids, first.astype(np.float32))
        np.testing.assert_array_equal(bounds, k08._span_tiles(first, last, rows, cols))
        assert bounds.shape == (B, T // rows, 2), name
    # the Hopper backward runs at D = 64, 128 and 256 (not 192), S a multiple of its slab
    for D, S, ok in ((64, 512, True), (128, 512, True), (256, 512, True), (192, 512, False),
                     (64, 448, False)):
        x = jax.ShapeDtypeStruct((1, S, 2, D), jnp.bfloat16)
        assert k08.hopper_backward_available(x, x, True) == ok, (D, S)


def test_packed_benchmark_times_the_hopper_kernels_first(monkeypatch, capsys):
    """On Hopper the packed-documents table runs both kernels, the Hopper ones first: its rows
    name them, their ratio is cuDNN's time over theirs, and the blocks are counted in their
    forward's tiles. Times are faked: 1 ms Hopper, 2 ms portable, 4 ms the peer."""
    monkeypatch.setattr(k08, "hopper_available", lambda *a: True)
    monkeypatch.setattr(k08, "_time", lambda fn, arg_sets, device=False: fn(*arg_sets[0]))

    def ours(q, k, v, causal, impl, segment_ids=None):
        return {"hopper": 1e-3, "portable": 2e-3}[impl]

    def fwd_bwd(attn, causal):
        def run(q, k, v, do):
            out = attn(q, k, v, causal)
            return out if isinstance(out, float) else 4e-3
        return run
    env = {"flash_lengths": [256], "dtype": jnp.float32, "interpret": True,
           "flash_blocks": k08.FlashBlocks()}
    cfg = k08.KernelsConfig(flash_tokens=256, n_heads=2, head_dim=16)
    rows = []
    k08.bench_packed(cfg, env, rows, ours, fwd_bwd, "xla", "XLA", True)
    assert "the key blocks the hopper forward visits" in capsys.readouterr().out
    rng = np.random.default_rng(cfg.seed)
    for row, mean in zip(rows, (16, 64, 256)):
        seg = np.cumsum(rng.random((1, 256)) < 1 / mean, axis=1)
        visited = k08.causal_blocks_visited(seg, 2 * k08.HOPPER_BLOCK_Q, k08.HOPPER_BLOCK_KV)
        assert row[2:] == ("1.00 ms", "XLA mask 4.00 ms", 4.0,
                           f"hopper, {visited:.0%} of causal blocks"), row


def test_the_implementation_follows_the_device_and_determinism(monkeypatch):
    """On an sm90 GPU (faked here) flash_attention takes the Hopper kernels where the shapes fit,
    segment ids or not, and with deterministic=True keeps their forward but not their backward
    (its reduce-add copies sum dQ in a varying order); elsewhere the portable kernels."""
    chosen = []
    monkeypatch.setattr(k08, "_flash", lambda *a: chosen.append(a[-1]))
    q = jnp.zeros((1, 256, 4, 64), jnp.bfloat16)
    seg = jnp.zeros((1, 256), jnp.int32)
    k08.flash_attention(q, q, q, True, interpret=False)
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(
        platform="gpu", compute_capability="9.0")])
    for kw in ({}, {"segment_ids": seg}, {"deterministic": True}, {"causal": False}):
        k08.flash_attention(q, q, q, **{"causal": True, "interpret": False, **kw})
    k08.flash_attention(q[:, :200], q[:, :200], q[:, :200], True, interpret=False)  # ragged T
    k08.flash_attention(q.astype(jnp.float32), q.astype(jnp.float32), q.astype(jnp.float32),
                        True, interpret=False)
    assert chosen == ["portable", "hopper", "hopper", "hopper forward", "hopper", "portable",
                      "portable"]


def test_size_lists_time_each_size_once():
    assert k08._ints("512,128,512") == [128, 512]


def test_sizes_past_the_memory_are_refused_before_any_array(monkeypatch):
    monkeypatch.setattr(common, "memory_limit", lambda: (16e9, "a test's memory"))
    k08.resolve(k08.KernelsConfig())
    with pytest.raises(common.UserError, match="^matmul_n=65536 needs 68.7 GB for the matmul's"):
        k08.resolve(k08.KernelsConfig(matmul_n=65536))
    # a sequence past flash_tokens runs at batch 1: the longest one sets the memory
    with pytest.raises(common.UserError, match="^flash_tokens=512 flash_lengths=16777216 n_heads"):
        k08.resolve(k08.KernelsConfig(flash_lengths="16777216"))


def test_kernels_take_nested_lists_as_jnp_does():
    x, w = [[1.0, 2.0], [3.0, 4.0]], [[1.0], [0.5]]
    np.testing.assert_allclose(k08.matmul(x, w, interpret=True), [[2.0], [5.0]])
    q, e = np.ones((1, 2, 1, 4)).tolist(), np.exp(1 / np.sqrt(2))
    np.testing.assert_allclose(k08.flash_attention(q, q, q, interpret=True), q, rtol=1e-6)
    np.testing.assert_allclose(k08.decode_attention([[[1.0, 0.0]]], [[[[1.0, 0.0], [0.0, 1.0]]]],
                                                    [[[[2.0, 0.0], [4.0, 0.0]]]], [2],
                                                    interpret=True)[0, 0, 0],
                               (2 * e + 4) / (e + 1), rtol=1e-5)  # scores 1/sqrt(2) and 0
    with pytest.raises(common.UserError, match="w_q must be int8"):  # a list of ints is int32
        k08.int8_matmul(x, [[1, 2]], [1.0], interpret=True)
    np.testing.assert_allclose(k08.int8_matmul(x, np.array([[1, 2]], np.int8), [0.5],
                                               interpret=True), [[2.5], [5.5]])


def test_kernels_config_refuses_shapes_the_benchmarks_cannot_run():
    for kw, match in ((dict(decode_heads=32, decode_kv_heads=5), "multiple of"),
                      (dict(head_dim=0), "head_dim must be positive"),
                      (dict(decode_len=0), "decode_len must be positive"),
                      (dict(matmul_n=-1), "matmul_n must be positive")):
        with pytest.raises(common.UserError, match=match):
            k08.KernelsConfig(**kw)
    k08.KernelsConfig(matmul_n=0)   # 0: the size is picked for the device


def test_hopper_shared_memory_count_matches_the_compilers_request():
    """The comments' numbers: a third K/V stage at D = 128 asked Mosaic GPU for 232,568 bytes,
    120 more than a CTA may have; two stages fit at D = 64 and 128, not at 192."""
    need = k08.hopper_smem_bytes(k08.HOPPER_BLOCK_Q, k08.HOPPER_BLOCK_KV, 3, 128)
    assert need == 230_008 and need + k08.MOSAIC_SCRATCH == 232_568 > k08.SM90_SMEM_PER_CTA
    for D, fits in ((64, True), (128, True), (192, False)):
        need = k08.hopper_smem_bytes(k08.HOPPER_BLOCK_Q, k08.HOPPER_BLOCK_KV, k08.HOPPER_STAGES,
                                     D)
        assert (need + k08.MOSAIC_SCRATCH <= k08.SM90_SMEM_PER_CTA) == fits, D


def test_kernels_refuse_a_scale_or_head_count_that_does_not_fit():
    w_q = jnp.ones((16, 16), jnp.int8)
    with pytest.raises(common.UserError, match="int8_matmul needs"):   # one scale per row of w_q
        k08.int8_matmul(jnp.ones((1, 16)), w_q, jnp.ones(32), interpret=True)
    with pytest.raises(common.UserError, match="do not fit"):          # 3 query heads on 2 kv
        k08.decode_attention(jnp.ones((1, 3, 16)), jnp.ones((1, 2, 8, 16)),
                             jnp.ones((1, 2, 8, 16)), jnp.array([8]), interpret=True)
