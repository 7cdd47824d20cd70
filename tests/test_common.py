"""common.py against independent references: a numpy Llama, RoPE's algebra, GQA as repeated MHA,
the checkpoint loader (our own writer, and transformers when installed), the CLI, data."""
import dataclasses
import functools
import glob
import itertools
import json
import math
import os
import re
import struct
import subprocess
import sys
import tracemalloc

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import common

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = common.Config.preset("tiny")
GQA_SCALED = dataclasses.replace(TINY, n_heads=4, n_kv_heads=1, rope_scaling=(8.0, 1.0, 4.0, 32),
                                 tie_embeddings=True, max_seq_len=256)


# ---------------------------------------------------------------- an independent numpy Llama

def np_inv_freq(cfg):
    """Written from the Llama 3 reference (three wavelength bands), not from common's clip."""
    d = cfg.head_dim
    inv = 1.0 / cfg.rope_theta ** (np.arange(0, d, 2) / d)
    if cfg.rope_scaling is None:
        return inv
    factor, low, high, old = cfg.rope_scaling
    out = []
    for f in inv:
        wavelen = 2 * math.pi / f
        if wavelen < old / high:
            out.append(f)
        elif wavelen > old / low:
            out.append(f / factor)
        else:
            s = (old / wavelen - low) / (high - low)
            out.append((1 - s) * f / factor + s * f)
    return np.array(out)


def np_forward(params, tokens, cfg):
    p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    B, T = tokens.shape
    H, KH, Dh = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    ang = np.arange(T)[:, None] * np_inv_freq(cfg)[None]          # [T, Dh/2]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(x):  # [T, Dh]
        x1, x2 = x[:, :Dh // 2], x[:, Dh // 2:]
        return np.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=1)

    def norm(x, w):
        return w * x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps)

    out = []
    for b in range(B):
        x = p["embed"][tokens[b]]                                    # [T, D]
        for i in range(cfg.n_layers):
            L = {k: v[i] for k, v in p["layers"].items()}
            h = norm(x, L["attn_norm"])
            heads = []
            for hd in range(H):
                kv = hd // (H // KH)
                q = rope(h @ L["wq"][:, hd])
                k = rope(h @ L["wk"][:, kv])
                v = h @ L["wv"][:, kv]
                s = q @ k.T / math.sqrt(Dh)
                s = np.where(np.tril(np.ones((T, T), bool)), s, -np.inf)
                w = np.exp(s - s.max(-1, keepdims=True))
                heads.append((w / w.sum(-1, keepdims=True)) @ v)
            x = x + np.einsum("thk,hkd->td", np.stack(heads, 1), L["wo"])
            h = norm(x, L["mlp_norm"])
            g = h @ L["w_gate"]
            x = x + (g / (1 + np.exp(-g)) * (h @ L["w_up"])) @ L["w_down"]
        x = norm(x, p["final_norm"])
        out.append(x @ (p["embed"].T if cfg.tie_embeddings else p["lm_head"]))
    return np.stack(out)


def test_embedding_gradient_sums_in_float32():
    """4096 tokens of one row: the table's gradient is their float32 sum, rounded to bf16 once
    (a bf16 scatter-add rounds after every add, and lands several units away)."""
    tokens = jnp.zeros((2, 2048), jnp.int32)
    g = jax.random.normal(jax.random.key(0), (2, 2048, 8)).astype(jnp.bfloat16)
    got = jax.grad(lambda t: jnp.sum(common.embed(t, tokens).astype(jnp.float32) * g))(
        jnp.zeros((4, 8), jnp.bfloat16))
    want = np.asarray(g, np.float32).sum(axis=(0, 1)).astype(jnp.bfloat16)
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want))
    assert not np.asarray(got[1:]).any()


@pytest.mark.parametrize("cfg", [TINY, GQA_SCALED], ids=["tiny", "mqa-llama3rope-tied"])
def test_forward_matches_numpy(cfg):
    params = common.init_params(cfg, jax.random.key(1))
    params = jax.tree.map(lambda a: a + 0.05 * jax.random.normal(jax.random.key(2), a.shape), params)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 40))
    got = common.forward(params, tokens, cfg)
    assert got.dtype == jnp.float32 and got.shape == (2, 40, cfg.vocab_size)
    np.testing.assert_allclose(got, np_forward(params, tokens, cfg), rtol=2e-4, atol=2e-4)


def test_forward_bf16_close_to_f32():
    params = common.init_params(TINY, jax.random.key(0))
    tokens = np.arange(64).reshape(2, 32) % 256
    ref = common.forward(params, tokens, TINY)
    got = common.forward(params, tokens, dataclasses.replace(TINY, dtype="bfloat16"))
    assert got.dtype == jnp.float32
    assert float(jnp.abs(got - ref).max()) < 0.05 * float(jnp.abs(ref).max())


def test_rms_norm_keeps_its_statistics_in_float32():
    """bf16 activations: the mean of squares and the rsqrt in float32, so the only error left is
    the output's rounding to bf16, at most half an ulp (2^-8 relative). Computed in bf16, the
    statistics double it (8.0e-3 measured)."""
    x = (jax.random.normal(jax.random.key(0), (4096, 2048)) * 3 + 1).astype(jnp.bfloat16)
    ones = jnp.ones(2048, jnp.bfloat16)
    ref = common.rms_norm(x.astype(jnp.float32), ones.astype(jnp.float32), 1e-5)
    got = common.rms_norm(x, ones, 1e-5)
    assert got.dtype == jnp.bfloat16
    assert float(jnp.max(jnp.abs(got.astype(jnp.float32) - ref) / jnp.abs(ref))) <= 2**-8


def test_remat_and_jnp_tokens_do_not_change_logits():
    params = common.init_params(TINY, jax.random.key(0))
    tokens = np.arange(32).reshape(1, 32)
    ref = common.forward(params, tokens, TINY)
    for remat in ("full", "dots"):
        np.testing.assert_allclose(common.forward(params, jnp.asarray(tokens), TINY, remat=remat),
                                   ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(common.UserError, match="remat"):
        common.forward(params, tokens, TINY, remat="some")
    np.testing.assert_allclose(common.forward(params, tokens, TINY, scan_layers=False), ref,
                               rtol=1e-5, atol=1e-5)


def test_remat_keeps_the_gradients_and_plans_less_memory():
    """remat recomputes instead of keeping: the same gradients, fewer bytes of temporaries in the
    compiled backward pass (full keeps only each layer's input, dots the matmuls' outputs too)."""
    params = common.init_params(TINY, jax.random.key(0))
    tokens = jnp.asarray(np.arange(2 * 64).reshape(2, 64) % TINY.vocab_size)
    grads, temp = {}, {}
    for remat in ("none", "dots", "full"):
        f = jax.jit(jax.grad(lambda p: common.cross_entropy(
            common.forward(p, tokens, TINY, remat=remat), tokens)))
        compiled = f.lower(params).compile()
        grads[remat] = compiled(params)
        temp[remat] = compiled.memory_analysis().temp_size_in_bytes
    for remat in ("dots", "full"):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
                     grads[remat], grads["none"])
    assert temp["full"] < temp["dots"] < temp["none"]


def test_remat_dots_keeps_an_attention_kernel_wrapped_in_custom_vmap():
    """08's Hopper kernels reach the remat policy as a custom_vmap_call (Mosaic GPU's batching
    wrapper) inside the attention's custom_vjp: remat="dots" must keep their output, or the
    backward pass runs each layer's attention forward a second time. A kernel of that shape
    here: under "dots" its call is traced once per layer, under "full" again for the
    backward."""
    @jax.custom_batching.custom_vmap
    def kernel(q, k, v):
        return common.attention_reference(q, k, v, causal=True)

    @kernel.def_vmap
    def _(axis_size, in_batched, q, k, v):
        return jax.vmap(kernel)(q, k, v), True

    @jax.custom_vjp
    def attention(q, k, v):
        return kernel(q, k, v)

    def forward_pass(q, k, v):
        return kernel(q, k, v), (q, k, v)

    def backward_pass(res, g):
        return jax.vjp(lambda *a: common.attention_reference(*a, causal=True), *res)[1](g)
    attention.defvjp(forward_pass, backward_pass)

    params = common.init_params(TINY, jax.random.key(0))
    tokens = jnp.asarray(np.arange(2 * 16).reshape(2, 16) % TINY.vocab_size)
    calls = {}
    for remat in ("dots", "full"):
        step = jax.grad(lambda p: common.cross_entropy(common.forward(
            p, tokens, TINY, attention=lambda q, k, v, causal, seg: attention(q, k, v),
            remat=remat, scan_layers=False), tokens))
        calls[remat] = str(jax.make_jaxpr(step)(params)).count("custom_vmap_call")
    assert calls["dots"] == TINY.n_layers < calls["full"]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_cross_entropy_and_its_gradient_match_log_softmax(dtype):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(3 * rng.standard_normal((2, 5, 50)), dtype)
    targets = jnp.asarray(rng.integers(0, 50, (2, 5)))
    mask = jnp.asarray(rng.random((2, 5)) < 0.7, jnp.float32)

    def reference(lg, m):
        logp = jax.nn.log_softmax(lg.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
        return (nll * m).sum() / m.sum()

    # a batch whose targets are all masked out (padding only) has no loss, not 0/0
    none = jax.value_and_grad(lambda lg: common.cross_entropy(lg, targets, 0 * mask))(logits)
    assert float(none[0]) == 0.0 and not np.asarray(none[1], np.float32).any()
    for m in (jnp.ones((2, 5)), mask):
        got, g = jax.value_and_grad(lambda lg: common.cross_entropy(lg, targets, m))(logits)
        ref, g_ref = jax.value_and_grad(reference)(logits, m)
        assert g.dtype == logits.dtype
        tol = 1e-6 if dtype == "float32" else 1e-2
        np.testing.assert_allclose(got, ref, rtol=1e-6)
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                                   atol=tol * float(jnp.abs(g_ref).max()))


# ---------------------------------------------------------------- RoPE

def test_rope_is_a_rotation_and_relative():
    cfg = dataclasses.replace(TINY, rope_scaling=(8.0, 1.0, 4.0, 32))
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(1, 1, 1, cfg.head_dim)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(1, 1, 1, cfg.head_dim)), jnp.float32)

    def at(x, pos):
        cos, sin = common.rope_cos_sin(jnp.array([[pos]]), cfg)
        return common.apply_rope(x, cos, sin)[0, 0, 0]

    np.testing.assert_allclose(jnp.linalg.norm(at(q, 37)), jnp.linalg.norm(q), rtol=1e-5)
    # <R(m) q, R(n) k> depends on m - n only.
    a = jnp.dot(at(q, 10), at(k, 3))
    b = jnp.dot(at(q, 107), at(k, 100))
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(at(q, 0), q[0, 0, 0], rtol=1e-6)


def test_llama3_scaling_bands():
    cfg = dataclasses.replace(TINY, head_dim=128, rope_theta=500000.0,
                              rope_scaling=(8.0, 1.0, 4.0, 8192))
    got = common.rope_frequencies(cfg)
    base = common.rope_frequencies(dataclasses.replace(cfg, rope_scaling=None))
    np.testing.assert_allclose(got, np_inv_freq(cfg), rtol=1e-6)
    assert got[0] == base[0]                                        # high frequency: kept
    np.testing.assert_allclose(got[-1], base[-1] / 8.0, rtol=1e-6)  # low frequency: / factor


# ---------------------------------------------------------------- GQA

def test_gqa_equals_mha_with_repeated_kv_heads():
    gqa = dataclasses.replace(TINY, n_heads=4, n_kv_heads=2)
    mha = dataclasses.replace(gqa, n_kv_heads=4)
    params = common.init_params(gqa, jax.random.key(3))
    rep = dict(params, layers=dict(params["layers"]))
    for w in ("wk", "wv"):
        rep["layers"][w] = jnp.repeat(params["layers"][w], 2, axis=2)  # head h uses kv h // 2
    tokens = np.arange(48).reshape(2, 24)
    np.testing.assert_allclose(common.forward(params, tokens, gqa), common.forward(rep, tokens, mha),
                               rtol=1e-5, atol=1e-5)


def test_attention_reference_segments_and_causal():
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(1, 6, 2, 8)), jnp.float32) for _ in range(3))
    seg = jnp.array([[0, 0, 0, 1, 1, 1]])
    packed = common.attention_reference(q, k, v, True, seg)
    first = common.attention_reference(q[:, :3], k[:, :3], v[:, :3], True)
    second = common.attention_reference(q[:, 3:], k[:, 3:], v[:, 3:], True)
    np.testing.assert_allclose(packed, jnp.concatenate([first, second], 1), rtol=1e-5, atol=1e-6)


def test_lists_are_taken_where_arrays_are():
    """A user's plain lists for segment ids and positions give what arrays give."""
    rng = np.random.default_rng(1)
    q, k, v = (rng.normal(size=(1, 6, 2, 8)).astype(np.float32) for _ in range(3))
    seg = [[0, 0, 0, 1, 1, 1]]
    np.testing.assert_array_equal(common.attention_reference(q.tolist(), k, v, True, seg),
                                  common.attention_reference(q, k, v, True, np.array(seg)))
    params = common.init_params(TINY, jax.random.key(0))
    tokens, pos = [[1, 2, 3, 4, 5, 6]], [[0, 1, 2, 0, 1, 2]]
    np.testing.assert_array_equal(
        common.forward(params, tokens, TINY, segment_ids=seg, positions=pos),
        common.forward(params, np.array(tokens), TINY, segment_ids=np.array(seg),
                       positions=np.array(pos)))


def test_param_count_matches_published_shapes():
    assert common.Config.preset("llama-3.2-1b").param_count() == 1_235_814_400
    assert common.Config.preset("llama-3-8b").param_count() == 8_030_261_248
    params = common.init_params(TINY, jax.random.key(0))
    assert sum(a.size for a in jax.tree.leaves(params)) == TINY.param_count()
    assert 10e6 <= common.Config.preset("small").param_count() <= 20e6
    assert TINY.param_count() < 1e6
    # Llama-3-8B: 32 layers x 8 kv heads x 128 x (K and V) x 2 bytes = 128 KiB per token.
    assert common.Config.preset("llama-3-8b").kv_bytes_per_token() == 131072


def test_flop_counts_per_token_by_hand():
    """`small` (d 384, 6 layers of 6 heads x 64 over 2 kv heads, d_ff 1536, vocab 256, untied):
    a layer's matrices 2 x 384^2 (q, o) + 2 x 384 x 128 (k, v) + 3 x 384 x 1536, plus two norms
    of 384; then the final norm and the 256 x 384 head. MFU's basis: 6N + 6 x L x H x D x T
    (causal attention, forward and backward); decode: 2N + 4 x L x H x D x context; prefill:
    the head once, not at every position."""
    small = common.Config.preset("small")
    layer = 2 * 384**2 + 2 * 384 * 128 + 3 * 384 * 1536 + 2 * 384
    N = 6 * layer + 384 + 256 * 384
    assert small.param_count(embedding=False) == N == 13_079_424
    assert small.train_flops_per_token(256) == 6 * N + 6 * 6 * 6 * 64 * 256 == 82_015_488
    assert small.decode_flops_per_token(100) == 2 * N + 4 * 6 * 6 * 64 * 100
    assert small.prefill_flops(32) == 32 * (2 * (N - 256 * 384) + 2 * 6 * 6 * 64 * 32) \
        + 2 * 256 * 384


# ---------------------------------------------------------------- checkpoints

def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, arr in tensors.items():
        arr = np.ascontiguousarray(arr)
        code = {np.float32: "F32", np.float64: "F64", ml_dtypes.bfloat16: "BF16",
                np.float16: "F16", np.int8: "I8"}[arr.dtype.type]
        header[name] = {"dtype": code, "shape": list(arr.shape),
                        "data_offsets": [offset, offset + arr.nbytes]}
        blobs.append(arr.tobytes())
        offset += arr.nbytes
    head = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(head)) + head + b"".join(blobs))


def hf_config(cfg, new_style=False):
    """common.config_to_hf, or with the newer transformers spelling of the rope fields."""
    c = common.config_to_hf(cfg)
    if new_style:
        rope = c.pop("rope_scaling") or {"rope_type": "default"}
        c["rope_parameters"] = dict(rope, rope_theta=c.pop("rope_theta"))
    return c


def save_checkpoint(path, params, cfg, shards=1, new_style=False, **overrides):
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(dict(hf_config(cfg, new_style), **overrides), f)
    names = list(common.hf_tensors(cfg, params).items())
    weight_map = {}
    for s in range(shards):
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = dict(names[s::shards])
        write_safetensors(os.path.join(path, fname), part)
        weight_map.update({n: fname for n in part})
    if shards > 1:
        with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


@pytest.mark.parametrize("cfg,shards,new_style", [(TINY, 1, False), (GQA_SCALED, 3, True)])
def test_loader_round_trip(tmp_path, cfg, shards, new_style):
    params = common.init_params(cfg, jax.random.key(5))
    save_checkpoint(tmp_path, params, cfg, shards=shards, new_style=new_style)
    if shards > 1:  # a stray file the index does not name is not read
        write_safetensors(tmp_path / "consolidated.safetensors", {"model.norm.weight": np.zeros(1)})
    got_cfg, got = common.load_hf_llama(str(tmp_path))
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)


def hf_llama_numpy(t, cfg, tokens):
    """Hugging Face's LlamaForCausalLM (modeling_llama), written out in float64 numpy from the
    checkpoint's tensors by name, as stored: rotate_half RoPE on q and k (the first and second
    halves of each head's dimensions paired), repeat_kv, SwiGLU, RMSNorm. Default RoPE only."""
    H, KH, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    w = lambda name: np.asarray(t[name], np.float64)
    rms = lambda x, g: x / np.sqrt(np.mean(x * x, -1, keepdims=True) + cfg.norm_eps) * g
    rotate_half = lambda x: np.concatenate([-x[..., hd // 2:], x[..., :hd // 2]], -1)
    T = len(tokens)
    angles = np.outer(np.arange(T), cfg.rope_theta ** -(np.arange(0, hd, 2) / hd))
    cos, sin = (f(np.concatenate([angles, angles], -1))[:, None] for f in (np.cos, np.sin))
    x = w("model.embed_tokens.weight")[tokens]
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        h = rms(x, w(p + "input_layernorm.weight"))
        q, k, v = (h @ w(p + f"self_attn.{n}_proj.weight").T for n in "qkv")
        q, k, v = q.reshape(T, H, hd), k.reshape(T, KH, hd), v.reshape(T, KH, hd)
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        k, v = np.repeat(k, H // KH, axis=1), np.repeat(v, H // KH, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(hd)
        scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        out = np.einsum("hts,shd->thd", probs, v).reshape(T, H * hd)
        x = x + out @ w(p + "self_attn.o_proj.weight").T
        h = rms(x, w(p + "post_attention_layernorm.weight"))
        gate, up = h @ w(p + "mlp.gate_proj.weight").T, h @ w(p + "mlp.up_proj.weight").T
        x = x + (gate / (1 + np.exp(-gate)) * up) @ w(p + "mlp.down_proj.weight").T
    return rms(x, w("model.norm.weight")) @ w("lm_head.weight").T


def test_loaded_checkpoint_computes_what_hugging_face_llama_does(tmp_path):
    """Tensors made by Hugging Face's names and shapes alone (not by common.hf_tensors), loaded
    and run by common.forward, against hf_llama_numpy on the same file: a layout mistake made
    alike in the writer and the reader passes the round trip tests, not this one (which needs
    no transformers). GQA, and head_dim != d_model / n_heads."""
    cfg = dataclasses.replace(TINY, head_dim=8, n_layers=2)
    D, F, V, hd = cfg.d_model, cfg.d_ff, cfg.vocab_size, cfg.head_dim
    rng = np.random.default_rng(3)
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,),
              "lm_head.weight": (V, D)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight":
                       (D,), p + "self_attn.q_proj.weight": (cfg.n_heads * hd, D),
                       p + "self_attn.k_proj.weight": (cfg.n_kv_heads * hd, D),
                       p + "self_attn.v_proj.weight": (cfg.n_kv_heads * hd, D),
                       p + "self_attn.o_proj.weight": (D, cfg.n_heads * hd),
                       p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D),
                       p + "mlp.down_proj.weight": (D, F)})
    tensors = {n: (1 + 0.1 * rng.standard_normal(sh) if "norm" in n
                   else 0.3 * rng.standard_normal(sh)).astype(np.float32)
               for n, sh in shapes.items()}
    write_safetensors(tmp_path / "model.safetensors", tensors)
    with open(tmp_path / "config.json", "w") as f:
        json.dump(common.config_to_hf(cfg), f)
    got_cfg, params = common.load_hf_llama(str(tmp_path))
    assert got_cfg == cfg
    tokens = rng.integers(0, V, 24)
    with jax.default_matmul_precision("float32"):
        ours = common.forward(params, jnp.asarray(tokens)[None], cfg)[0]
    ref = hf_llama_numpy(tensors, cfg, tokens)
    assert np.max(np.abs(np.asarray(ours) - ref)) < 1e-4 * np.max(np.abs(ref))


def test_loader_reads_mistral_as_llama_within_its_window(tmp_path):
    """Mistral's checkpoints are Llama's, names included, but attend over a sliding window: the
    model is read as Llama with its context capped at the window, where the two agree."""
    params = common.init_params(TINY, jax.random.key(6))
    for window, max_len in ((None, TINY.max_seq_len), (4096, TINY.max_seq_len), (64, 64)):
        save_checkpoint(tmp_path, params, TINY, model_type="mistral", sliding_window=window,
                        architectures=["MistralForCausalLM"])
        cfg, got = common.load_hf_llama(str(tmp_path))
        assert cfg == dataclasses.replace(TINY, max_seq_len=max_len)
        jax.tree.map(np.testing.assert_array_equal, got, params)
        note = common.window_note(str(tmp_path), cfg)  # what 06 and 09 print beside the model
        assert "sliding window of 64 tokens" in note if window == 64 else note == ""
    # keys left out take MistralConfig's defaults, not LlamaConfig's: a window of 4,096 (of
    # 131,072 positions) and 8 kv heads; a null window is none. Both norms' eps is 1e-6.
    bare = {k: v for k, v in common.config_to_hf(TINY).items() if k not in (
        "sliding_window", "num_key_value_heads", "max_position_embeddings", "rms_norm_eps")}
    bare["num_attention_heads"] = 16
    for model_type, want in (("mistral", (4096, 8, 1e-6)), ("llama", (2048, 16, 1e-6))):
        cfg = common.config_from_hf(dict(bare, model_type=model_type))
        assert (cfg.max_seq_len, cfg.n_kv_heads, cfg.norm_eps) == want
    assert common.config_from_hf(dict(bare, model_type="mistral",
                                      sliding_window=None)).max_seq_len == 131072


def test_loader_reads_bf16(tmp_path):
    params = jax.tree.map(lambda a: a.astype(jnp.bfloat16), common.init_params(TINY, jax.random.key(0)))
    save_checkpoint(tmp_path, params, TINY, torch_dtype="bfloat16")
    cfg, got = common.load_hf_llama(str(tmp_path))
    assert cfg.param_dtype == "bfloat16" and got["embed"].dtype == jnp.bfloat16
    jax.tree.map(np.testing.assert_array_equal, got, params)


@pytest.mark.parametrize("sizes,head_dim_split", [("dp:2,fsdp:2,tp:2", False),
                                                   ("fsdp:2,tp:4", False), ("tp:2", True)])
def test_loader_sends_each_device_its_slices_one_parameter_at_a_time(tmp_path, sizes,
                                                                     head_dim_split):
    """With shardings, every device gets its slices of the exact values, and the host never
    holds the whole model: the peak of Python's allocations during a load, less what the (CPU)
    devices keep of it at the end, stays under half the params' bytes (loading them stacked
    took all of it; with dp, replicas reading their slices apart took 0.6 of it)."""
    cfg = dataclasses.replace(TINY, d_model=256, d_ff=256, n_layers=16, n_heads=8, n_kv_heads=4,
                              head_dim=32)
    params = common.init_params(cfg, jax.random.key(4))  # many parameters of similar sizes
    save_checkpoint(tmp_path, params, cfg)
    shardings = common.param_shardings(cfg, common.make_mesh(common.parse_mesh(sizes)))
    if head_dim_split:  # a split of ours that torch's layout cannot keep: read whole, then cut
        wq = shardings["layers"]["wq"]
        shardings["layers"]["wq"] = jax.sharding.NamedSharding(
            wq.mesh, jax.sharding.PartitionSpec(None, None, None, "tp"))
    common.load_hf_llama(str(tmp_path), shardings=shardings)  # compiled, then measured
    tracemalloc.start()
    try:
        got = jax.block_until_ready(common.load_hf_llama(str(tmp_path), shardings=shardings)[1])
        kept, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak - kept < sum(a.nbytes for a in jax.tree.leaves(params)) / 2
    jax.tree.map(np.testing.assert_array_equal, got, params)
    for a, sh in zip(jax.tree.leaves(got), jax.tree.leaves(shardings)):
        assert a.sharding.is_equivalent_to(sh, a.ndim)


@pytest.mark.parametrize("override,match", [
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"attention_bias": True}, "attention_bias"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"model_type": "qwen2"}, "model_type"),
    ({"model_type": "mistral", "sliding_window": "4k"}, "sliding_window"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
    ({"quantization_config": {"quant_method": "gptq"}}, "quantization_config"),
])
def test_loader_refuses_unsupported_fields(tmp_path, override, match):
    save_checkpoint(tmp_path, common.init_params(TINY, jax.random.key(0)), TINY, **override)
    with pytest.raises(common.UserError, match=match):
        common.load_hf_llama(str(tmp_path))


def test_loader_errors(tmp_path):
    with pytest.raises(common.UserError, match="does not exist"):
        common.load_hf_llama(str(tmp_path / "nope"))
    with pytest.raises(common.UserError, match="config.json"):
        common.load_hf_llama(str(tmp_path))
    save_checkpoint(tmp_path, common.init_params(TINY, jax.random.key(0)), TINY)
    with open(tmp_path / "config.json") as f:
        c = json.load(f)
    c["num_hidden_layers"] = 3  # a tensor of layer 2 is then missing
    with open(tmp_path / "config.json", "w") as f:
        json.dump(c, f)
    with pytest.raises(common.UserError, match="missing"):
        common.load_hf_llama(str(tmp_path))
    (tmp_path / "junk.safetensors").write_bytes(b"\xff" * 16)
    with pytest.raises(common.UserError, match="not a safetensors"):
        common.load_hf_llama(str(tmp_path))


def damage_header(path, edit):
    """The safetensors header entry of model.norm.weight replaced by edit(header)."""
    file = path / "model-00001-of-00001.safetensors"
    blob = file.read_bytes()
    n = struct.unpack("<Q", blob[:8])[0]
    header = json.loads(blob[8:8 + n])
    header["model.norm.weight"] = edit(header)
    head = json.dumps(header).encode()
    file.write_bytes(struct.pack("<Q", len(head)) + head + blob[8 + n:])


def damage_config(path, edit):
    with open(path / "config.json") as f:
        c = json.load(f)
    (path / "config.json").write_text(json.dumps(edit(c)))


@pytest.mark.parametrize("damage,match", [
    (lambda p: (p / "config.json").write_text("{oops"), "config.json cannot be read as JSON"),
    (lambda p: (p / "config.json").write_text("[]"), "config.json is not a JSON object"),
    (lambda p: damage_config(p, lambda c: {k: v for k, v in c.items() if k != "hidden_size"}),
     "hidden_size is missing"),
    (lambda p: damage_config(p, lambda c: dict(c, num_hidden_layers="2")),
     "num_hidden_layers='2' is not an integer"),
    (lambda p: damage_config(p, lambda c: dict(c, rope_scaling={"rope_type": "llama3"})),
     "llama3 rope scaling needs"),
    (lambda p: damage_config(p, lambda c: dict(c, hidden_size=32, head_dim=16)),
     "has shape .* config.json implies"),
    (lambda p: (p / "model-00001-of-00001.safetensors").write_bytes(
        (p / "model-00001-of-00001.safetensors").read_bytes()[:-100]), "cut short"),
    (lambda p: (p / "model.safetensors.index.json").write_text("{}"), "has no weight_map"),
    (lambda p: (p / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"model.norm.weight": "gone.safetensors"}})),
     "names gone.safetensors, which is missing"),
    (lambda p: damage_config(p, lambda c: dict(c, tie_word_embeddings="false")),
     "tie_word_embeddings='false' is not true or false"),
    (lambda p: damage_config(p, lambda c: dict(c, rope_scaling="llama3")),
     "rope scaling 'llama3' is not an object"),
    (lambda p: damage_config(p, lambda c: dict(c, rope_scaling={  # a zero would give NaN angles
        "rope_type": "llama3", "factor": 0, "low_freq_factor": 1, "high_freq_factor": 4,
        "original_max_position_embeddings": 0})), "rope_scaling needs factor > 0"),
    (lambda p: damage_config(p, lambda c: dict(c, head_dim=3, hidden_size=12)),
     "^config.json: head_dim must be even"),
    (lambda p: damage_config(p, lambda c: {k: v for k, v in c.items() if k != "vocab_size"}),
     "^config.json: vocab_size is missing$"),   # named once, not "config.json: config.json:"
    (lambda p: write_safetensors(p / "model-00001-of-00001.safetensors", dict(
        common.hf_tensors(TINY, common.init_params(TINY, jax.random.key(0))),
        **{"model.norm.weight": np.ones(TINY.d_model, np.int8)})), "is int8, not a float"),
    (lambda p: damage_header(p, lambda h: dict(h["model.norm.weight"], shape=["64"])),
     "unreadable entry"),
    (lambda p: damage_header(p, lambda h: dict(h["model.norm.weight"], data_offsets=[-256, 0])),
     "unreadable entry"),
    (lambda p: damage_header(p, lambda h: dict(h["model.norm.weight"], dtype="C64")),
     "tensor model.norm.weight is of dtype C64, which this reader does not take"),
])
def test_loader_names_a_damaged_checkpoint(tmp_path, damage, match):
    """What an interrupted download or a hand edit leaves: one line naming it, no traceback."""
    save_checkpoint(tmp_path, common.init_params(TINY, jax.random.key(0)), TINY)
    damage(tmp_path)
    with pytest.raises(common.UserError, match=match):
        common.load_hf_llama(str(tmp_path))


def test_loader_dtype_override_applies_before_the_check(tmp_path):
    """A float64 checkpoint (torch_dtype float64, which the model does not compute in) loads when
    a dtype is asked for."""
    params = common.init_params(TINY, jax.random.key(0))
    save_checkpoint(tmp_path, params, TINY, torch_dtype="float64")
    with pytest.raises(common.UserError, match="torch_dtype 'float64' is not"):
        common.load_hf_llama(str(tmp_path))
    cfg, got = common.load_hf_llama(str(tmp_path), dtype="float32")
    assert cfg == TINY
    jax.tree.map(np.testing.assert_array_equal, got, params)
    # transformers' newer "dtype" key comes before the older "torch_dtype"
    hf = dict(hf_config(TINY), dtype="bfloat16", torch_dtype="float64")
    assert common.config_from_hf(hf).param_dtype == "bfloat16"


def test_a_cpu_peak_says_it_is_float32s(monkeypatch):
    monkeypatch.setattr(common, "device_chip", lambda: None)
    monkeypatch.setattr(common, "measure_peaks", lambda dtype: {"matmul_flops": float(
        dtype == "float32"), "copy_bw": 2.0})
    assert common.ceilings("bfloat16") == (1.0, 2.0, "float32 matmul measured on cpu")
    # on a GPU of the table, float32's peak is TF32's: XLA's default precision runs it so
    monkeypatch.setattr(common, "device_chip", lambda: common.CHIPS["H100"])
    assert common.ceilings("float32")[0] == common.CHIPS["H100"].tf32_flops


def test_config_and_forward_refuse_what_would_fail_deep_inside():
    for bad, match in ((dict(head_dim=3), "head_dim must be even"),
                       (dict(rope_theta=0.0), "rope_theta must be"),
                       (dict(norm_eps=-1.0), "norm_eps must be"),
                       (dict(vocab_size=2.5), "vocab_size must be an integer"),
                       (dict(rope_scaling="llama3"), "rope_scaling takes 4 numbers"),
                       # each bound on its own: a zero factor, an inverted band, no old length
                       (dict(rope_scaling=(0, 1, 4, 32)), "rope_scaling needs"),
                       (dict(rope_scaling=(8, 4, 4, 32)), "rope_scaling needs"),
                       (dict(rope_scaling=(8, 0, 4, 32)), "rope_scaling needs"),
                       (dict(rope_scaling=(8, 1, 4, 0)), "rope_scaling needs")):
        with pytest.raises(common.UserError, match=match):
            dataclasses.replace(TINY, **bad)
    listed = dataclasses.replace(TINY, rope_scaling=[8, 1, 4, 32])   # kept hashable, for jit
    assert listed.rope_scaling == (8.0, 1.0, 4.0, 32.0) and hash(listed)
    params, tok = common.init_params(TINY, jax.random.key(0)), jnp.zeros((2, 8), jnp.int32)
    for call, match in ((lambda: common.forward(params, tok[0], TINY), "tokens must be"),
                        (lambda: common.forward(params, tok * 1.0, TINY), "tokens must be"),
                        (lambda: common.forward(params, tok, TINY, positions=tok[0]),
                         "positions must be"),
                        (lambda: common.forward(params, tok, TINY, segment_ids=tok[:1]),
                         "segment_ids must be")):
        with pytest.raises(common.UserError, match=match):
            call()
    np.testing.assert_array_equal(common.forward(params, tok, TINY, positions=tok[:1] + 3),
                                  common.forward(params, tok, TINY, positions=tok + 3))


def test_an_edited_step_or_dtype_is_a_damaged_checkpoint(tmp_path):
    """Edits that keep the files readable but the contents wrong are damage too, so a resume
    passes over them for the checkpoint before (as 09 does with DamagedCheckpoint)."""
    tree = {"w": np.arange(3, dtype=np.float32), "n": np.int32(2)}
    like = {"w": jax.ShapeDtypeStruct((3,), jnp.float32), "n": jax.ShapeDtypeStruct((), jnp.int32)}
    path = common.save_checkpoint(str(tmp_path), 6, tree, {"model": {}})
    assert common.load_checkpoint(path, like)[1]["step"] == 6
    meta = json.load(open(os.path.join(path, "meta.json")))
    for edit, match in ((dict(step=-5), "says step -5"), (dict(step=10**30), "says step 1000"),
                        (dict(dtypes={"['w']": "bfloat16", "['n']": "int32"}),
                         r"\['w'\] is float32 \(meta.json says bfloat16\)")):
        json.dump(dict(meta, **edit), open(os.path.join(path, "meta.json"), "w"))
        with pytest.raises(common.DamagedCheckpoint, match=match):
            common.load_checkpoint(path, like)
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    state = os.path.join(path, common.STATE_FILE)
    common.write_safetensors(state, {"['w']": np.arange(3, dtype=np.int32), "['n']": np.int32(2)})
    with pytest.raises(common.DamagedCheckpoint, match=r"\['w'\] is int32"):
        common.load_checkpoint(path, like)
    # a dtype meta.json agrees with but the model does not compute in
    common.write_safetensors(state, {"['w']": np.arange(3, dtype=np.float64), "['n']": np.int32(2)})
    json.dump(dict(meta, dtypes={"['w']": "float64", "['n']": "int32"}),
              open(os.path.join(path, "meta.json"), "w"))
    with pytest.raises(common.DamagedCheckpoint, match=r"\['w'\] is float64 .* model's is float32"):
        common.load_checkpoint(path, like)
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    common.write_safetensors(state, {"['n']": np.int32(2)})  # an array lost
    with pytest.raises(common.DamagedCheckpoint, match=r"state.safetensors lacks \['w'\]"):
        common.load_checkpoint(path, like)
    with pytest.raises(common.UserError, match="written for another model"):  # not listed at all
        common.load_checkpoint(path, dict(like, extra=like["n"]))


def test_checkpoint_state_is_a_safetensors_file_any_reader_takes(tmp_path, monkeypatch):
    """Each array's bytes where the header says, the data 8-aligned and the file no longer than
    they need, whatever order the threads wrote in, and however little each write took."""
    arrays = {"['a']": np.arange(12, dtype=np.float32).reshape(3, 4),
              "['b']": np.float32(np.pi) * np.ones((2, 5), ml_dtypes.bfloat16),
              "['n']": np.int32(7), "['e']": np.zeros((0, 3), np.float16),
              "['m']": np.array([True, False]), "['s']": np.arange(5, dtype=np.int8)[::2],
              "['u']": np.arange(3, dtype=np.uint32)}
    write = os.pwrite
    monkeypatch.setattr(common.os, "pwrite", lambda fd, data, at: write(fd, data[:5], at))
    path = str(tmp_path / "state.safetensors")
    common.write_safetensors(path, arrays, threads=3)
    blob = open(path, "rb").read()
    n = struct.unpack("<Q", blob[:8])[0]
    header, data = json.loads(blob[8:8 + n]), blob[8 + n:]
    assert (8 + n) % 8 == 0 and sorted(header) == sorted(arrays)
    assert len(data) == max(h["data_offsets"][1] for h in header.values())
    for name, a in arrays.items():
        begin, end = header[name]["data_offsets"]
        assert header[name]["shape"] == list(np.shape(a)) and data[begin:end] == a.tobytes()
    for name, got in common.read_safetensors(path).items():
        assert got.dtype == arrays[name].dtype
        np.testing.assert_array_equal(got, arrays[name])
    common.write_safetensors(str(tmp_path / "big.safetensors"), {"x": np.arange(4.0, dtype=">f4")})
    got = common.read_safetensors(str(tmp_path / "big.safetensors"))["x"]  # written little-endian
    assert got.dtype == np.float32 and got.tolist() == [0.0, 1.0, 2.0, 3.0]
    try:
        import safetensors.numpy
    except ImportError:
        return
    assert sorted(safetensors.numpy.load_file(path)) == sorted(arrays)


def test_checkpoints_written_as_npz_still_load(tmp_path):
    """Checkpoints once held state.npz, bfloat16 stored as its bits: they still resume."""
    tree = {"w": np.arange(3, dtype=ml_dtypes.bfloat16), "n": np.int32(2)}
    path = tmp_path / "ckpt_00000004"
    path.mkdir()
    np.savez(path / "state.npz", **{"['w']": tree["w"].view(np.uint16), "['n']": tree["n"]})
    (path / "meta.json").write_text(json.dumps({"step": 4, "dtypes": {"['w']": "bfloat16",
                                                                      "['n']": "int32"}}))
    got, meta = common.load_checkpoint(str(path), tree)
    assert meta["step"] == 4 and got["w"].dtype == ml_dtypes.bfloat16
    np.testing.assert_array_equal(got["w"], tree["w"])
    assert got["n"] == 2
    (path / "state.npz").write_bytes(b"PK\x03\x04 cut")
    with pytest.raises(common.DamagedCheckpoint, match="state.npz cannot be read"):
        common.load_checkpoint(str(path), tree)


def test_checkpoint_cleanup_passes_over_what_it_cannot_remove(tmp_path, monkeypatch, capsys):
    """A plain file named like a checkpoint is not one; an old checkpoint that cannot be deleted
    is left with a warning, after the new one is in place."""
    tree = {"w": np.arange(3, dtype=np.float32)}
    (tmp_path / "ckpt_00000001").write_text("notes")
    for step in (2, 3):
        common.save_checkpoint(str(tmp_path), step, tree, {"model": {}})
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_00000002", "ckpt_00000003"]

    def refuse(path, *a, **k):
        raise PermissionError(13, "Permission denied", path)
    monkeypatch.setattr(common.shutil, "rmtree", refuse)
    common.save_checkpoint(str(tmp_path), 4, tree, {"model": {}})
    assert "could not remove the old checkpoint" in capsys.readouterr().err
    # renamed out of the list before its deletion began: never a checkpoint with half its files
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_00000003", "ckpt_00000004"]
    assert (tmp_path / ".tmp_ckpt_00000002.del" / common.STATE_FILE).exists()
    assert (tmp_path / "ckpt_00000001").read_text() == "notes"
    monkeypatch.undo()
    common.save_checkpoint(str(tmp_path), 5, tree, {"model": {}})  # the next save clears it
    assert not (tmp_path / ".tmp_ckpt_00000002.del").exists()
    assert not glob.glob(str(tmp_path / ".tmp_*")) and "could not" not in capsys.readouterr().err
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_00000004", "ckpt_00000005"]


def test_checkpoints_past_step_99999999_are_listed_in_step_order(tmp_path):
    """Names grow a ninth digit at step 10^8: those are still checkpoints, newest last, and the
    oldest is the one removed."""
    tree = {"w": np.arange(3, dtype=np.float32)}
    for step in (99_999_999, 100_000_000, 100_000_001):
        common.save_checkpoint(str(tmp_path), step, tree, {"model": {}}, keep=2)
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_100000000", "ckpt_100000001"]
    assert not (tmp_path / "ckpt_99999999").exists()


def test_checkpoints_past_the_saved_step_do_not_count_toward_keep(tmp_path):
    """A run resumed from step 2, past a damaged step 5, saves step 3: keeping the newest two by
    step would remove step 2, leaving one readable checkpoint; step 5 stays until overwritten."""
    tree = {"w": np.arange(3, dtype=np.float32)}
    for step in (1, 2, 5, 3):
        common.save_checkpoint(str(tmp_path), step, tree, {"model": {}}, keep=2)
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_00000002", "ckpt_00000003", "ckpt_00000005"]
    common.save_checkpoint(str(tmp_path), 5, tree, {"model": {}}, keep=2)
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_00000003", "ckpt_00000005"]


def test_peak_units_count_a_cpu_host_once():
    dev = lambda platform, process: type("Device", (), {"platform": platform,
                                                       "process_index": process})()
    assert common.peak_units([dev("gpu", 0)] * 4 + [dev("gpu", 1)] * 4) == 8
    assert common.peak_units([dev("cpu", 0)] * 8) == 1
    assert common.peak_units([dev("cpu", 0)] * 4 + [dev("cpu", 1)] * 4) == 2
    assert common.peak_units(jax.devices()) == 1  # this suite's 8 simulated devices


def test_bench_reports_the_median_sample(monkeypatch):
    """On a scripted clock: compile and warm-up take nothing, then nine runs of 1 ms and one of
    100 ms. The median is 1 ms (a mean would say 10.9)."""
    now, durations = [0.0], iter([0.0] * 3 + [1e-3] * 9 + [0.1])
    monkeypatch.setattr(common.time, "perf_counter", lambda: now[0])

    def run():
        now[0] += next(durations)
        return 0
    t = common.bench(run, iters=10, warmup=2, calls=1)
    assert t.median_s == pytest.approx(1e-3) and t.min_s == pytest.approx(1e-3)
    # several calls a sample: the figures are per call
    now[0], durations = 0.0, iter([0.0] * 3 + [1e-3] * 40)
    t = common.bench(run, iters=10, warmup=2, calls=4)
    assert t.median_s == pytest.approx(1e-3) and t.min_s == pytest.approx(1e-3)


def test_bench_times_a_jitted_function_with_static_arguments():
    """A compiled program takes only the traced arguments: bench must still time fn(*args), and
    compile each argument set's static values before it samples."""
    seen = []

    @functools.partial(jax.jit, static_argnums=1)
    def scale(x, n):
        seen.append(n)  # runs once per compilation
        return x * n
    x = jnp.ones(4)
    assert common.bench(scale, x, 2, iters=2, warmup=0, calls=1).runs == 2
    seen.clear()
    # One sample of one run uses only the first set: the warm-up alone traced the others
    common.bench(scale, arg_sets=[(x, 3), (x, 4), (x, 5)], iters=1, warmup=1, calls=1)
    assert sorted(seen) == [3, 4, 5]


def test_bench_refuses_no_runs():
    for kw in (dict(iters=0), dict(calls=0)):  # (an empty median, a sample of no runs)
        with pytest.raises(common.UserError, match="iters >= 1 and calls >= 1"):
            common.bench(lambda: None, **kw)


def test_training_checkpoints_damaged_or_cut_by_a_crash(tmp_path):
    tree = {"w": np.arange(6, dtype=np.float32)}
    path = common.save_checkpoint(str(tmp_path), 3, tree, {"model": {}})
    got, meta = common.load_checkpoint(path, tree)
    np.testing.assert_array_equal(got["w"], tree["w"])
    with pytest.raises(common.UserError, match="has no \\['b'\\]: it was written for another") as e:
        common.load_checkpoint(path, dict(tree, b=tree["w"]))
    assert not isinstance(e.value, common.DamagedCheckpoint)  # 09 would pass over a damaged one
    state = os.path.join(path, common.STATE_FILE)
    blob = open(state, "rb").read()
    for damage in (lambda: open(state, "wb").write(blob[:len(blob) // 2]),
                   lambda: open(state, "wb").close(), lambda: os.remove(state),
                   lambda: open(os.path.join(path, "meta.json"), "w").write("{"),
                   lambda: open(os.path.join(path, "meta.json"), "w").write("[]"),
                   lambda: common.write_safetensors(state, {"['w']": tree["w"][:4]})):  # edited
        damage()
        with pytest.raises(common.DamagedCheckpoint, match="ckpt_00000003 is damaged"):
            common.load_checkpoint(path, tree)
        path = common.save_checkpoint(str(tmp_path), 3, tree, {"model": {}})
    # A crash between a rerun's two renames leaves the old copy aside; the next save puts it back.
    os.rename(path, str(tmp_path / ".tmp_ckpt_00000003.old"))
    common.save_checkpoint(str(tmp_path), 4, tree, {"model": {}})
    assert [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path))] == \
        ["ckpt_00000003", "ckpt_00000004"]


@pytest.mark.parametrize("cfg,mistral", [(TINY, False), (GQA_SCALED, False), (TINY, True)],
                         ids=["tiny", "mqa-llama3rope-tied", "mistral-window-48"])
def test_logits_match_transformers(tmp_path, cfg, mistral):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf = hf_config(cfg)
    hf.pop("architectures"), hf.pop("model_type"), hf.pop("torch_dtype")
    torch.manual_seed(0)
    if mistral:  # 48 tokens, all within the window: the model's own attention, unmasked
        hf.pop("rope_scaling")
        model = transformers.MistralForCausalLM(transformers.MistralConfig(**hf,
                                                                           sliding_window=48))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
    model = model.float().eval()
    with torch.no_grad():  # HF initializes norms to 1: perturb them so they are tested too
        for name, w in model.named_parameters():
            if "norm" in name:
                w.add_(0.1 * torch.randn_like(w))
    model.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="200KB")
    got_cfg, params = common.load_hf_llama(str(tmp_path), dtype="float32")
    assert got_cfg.max_seq_len == (48 if mistral else cfg.max_seq_len)
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(common.forward(params, tokens, got_cfg))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4


# ---------------------------------------------------------------- exporting to Hugging Face

@pytest.mark.parametrize("cfg,dtype,shard_bytes", [(TINY, "float32", 5 * 10**9),
                                                   (GQA_SCALED, "bfloat16", 40_000)],
                         ids=["one-file", "sharded-bf16"])
def test_save_hf_llama_is_what_load_hf_llama_reads(tmp_path, cfg, dtype, shard_bytes):
    cfg = dataclasses.replace(cfg, param_dtype=dtype, dtype=dtype)
    params = jax.tree.map(lambda a: a.astype(dtype), common.init_params(cfg, jax.random.key(3)))
    path = common.save_hf_llama(str(tmp_path / "hf"), cfg, params, shard_bytes=shard_bytes)
    got_cfg, got = common.load_hf_llama(path)
    assert got_cfg == cfg
    jax.tree.map(np.testing.assert_array_equal, got, params)
    files = sorted(os.listdir(path))
    if shard_bytes > 10**6:
        assert files == ["config.json", "model.safetensors"]
    else:  # each file within the limit, and the index names every tensor's file
        shards = [f for f in files if f.startswith("model-")]
        assert len(shards) > 2 and all(os.path.getsize(os.path.join(path, f)) < shard_bytes + 4096
                                       for f in shards)
        index = json.load(open(os.path.join(path, "model.safetensors.index.json")))
        tensors = {n: f for f in shards for n in common.read_safetensors(os.path.join(path, f))}
        assert index["weight_map"] == tensors
        assert index["metadata"]["total_size"] == sum(
            a.nbytes for a in common.hf_tensors(cfg, params).values())
    for f in files:  # each header says "pt", as save_pretrained's do: older transformers need it
        if f.endswith(".safetensors"):
            with open(os.path.join(path, f), "rb") as fh:
                head = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
            assert head["__metadata__"] == {"format": "pt"}


def test_save_hf_llama_overwrites_nothing_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    params = common.init_params(TINY, jax.random.key(0))
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    for path in (tmp_path / "taken", tmp_path / "taken" / "notes.txt"):
        with pytest.raises(common.UserError, match="^the export directory .* already exists: "
                                                   "name a new directory"):
            common.save_hf_llama(str(path), TINY, params)
    assert (tmp_path / "taken" / "notes.txt").read_text() == "mine"
    with pytest.raises(common.UserError, match="parent directory does not exist"):
        common.save_hf_llama(str(tmp_path / "no" / "such"), TINY, params)
    (tmp_path / "empty").mkdir()  # an empty directory is taken, as made for it
    common.save_hf_llama(str(tmp_path / "empty"), TINY, params)
    assert common.load_hf_llama(str(tmp_path / "empty"))[0] == TINY

    def full_disk(path, arrays, threads=4, metadata=None):
        open(path, "wb").write(b"part")
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common, "write_safetensors", full_disk)
    with pytest.raises(common.UserError, match="No space left on device.*nothing was left"):
        common.save_hf_llama(str(tmp_path / "out"), TINY, params)
    assert sorted(os.listdir(tmp_path)) == ["empty", "taken"]


def test_byte_tokenizer_gives_each_byte_its_own_id():
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer.from_str(json.dumps(common.byte_tokenizer_json()))
    assert tok.get_vocab_size() == 256
    text = "def f(x):\n\treturn x  # caf\u00e9 \u2713 \u65e5\u672c\r\n\x00\x7f\xa0\xad "
    assert tok.encode(text).ids == list(text.encode())
    assert tok.decode(list(text.encode())) == text


def bpe_tokenizer(kind, text):
    """A small BPE of each family, trained on `text`: byte-level (GPT-2's, Llama 3's), the
    tokenizers package's SentencePiece, and Llama 2's (a normalizer that prepends the word start
    and turns spaces into it, no pre-tokenizer)."""
    tokenizers = pytest.importorskip("tokenizers")
    models, normalizers, pre = tokenizers.models, tokenizers.normalizers, tokenizers.pre_tokenizers
    if kind == "sentencepiece":
        tok = tokenizers.SentencePieceBPETokenizer()
        tok.train_from_iterator([text], vocab_size=400)
        return tok
    tok = tokenizers.Tokenizer(models.BPE(byte_fallback=kind == "llama-2"))
    tok.pre_tokenizer = (pre.ByteLevel(add_prefix_space=False) if kind == "byte-level"
                         else pre.Metaspace(prepend_scheme="first"))
    alphabet = pre.ByteLevel.alphabet() if kind == "byte-level" else []
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(vocab_size=400,
                                                                   initial_alphabet=alphabet))
    if kind == "llama-2":
        tok.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                               normalizers.Replace(" ", "\u2581")])
        tok.pre_tokenizer = None
    return tok


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece", "llama-2"])
def test_tokenize_in_pieces_gives_the_ids_of_the_whole_text(tmp_path, kind):
    """Each family's pieces are cut where its ids stay the whole text's (cutting at lines'
    starts, right for byte-level BPEs, changes the others' ids: tokenize checks its cuts)."""
    text = open(common.__file__, "rb").read()[:60_000]
    data = np.frombuffer(text, np.uint8)
    np.testing.assert_array_equal(common.tokenize(common.BYTES, data), data)
    tok = bpe_tokenizer(kind, text.decode())
    lines = sum((tok.encode(s).ids for s in ("x = 1\n", "y = 2\n")), [])
    assert (lines == tok.encode("x = 1\ny = 2\n").ids) == (kind == "byte-level")
    tok.save(str(tmp_path / "tokenizer.json"))
    loaded = common.load_tokenizer(str(tmp_path))
    calls = []
    spy = loaded._replace(encode_text=lambda texts: calls.append(len(texts)) or
                          loaded.encode_text(texts))
    ids = common.tokenize(spy, data, piece_chars=1000)
    assert ids.dtype == np.int32 and ids.tolist() == tok.encode(text.decode()).ids
    assert calls[-1] > 5  # encoded in pieces, not in one call


def test_tokenize_begins_and_ends_each_document_as_the_tokenizer_does(tmp_path):
    """Files run together would teach a fine-tuned model to go on from one into the next: each
    document gets the tokenizer's own start (a BOS here) and the checkpoint's end of sequence.
    A special token's name inside a document is text."""
    tokenizers = pytest.importorskip("tokenizers")
    text = open(common.__file__).read()[:20_000]
    tok = bpe_tokenizer("byte-level", text)
    tok.add_special_tokens(["<s>", "</s>"])
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos, 7]}))
    loaded = common.load_tokenizer(str(tmp_path))
    docs = [text[:9000], text[9000:9100] + " a literal </s> is text", text[9100:]]
    data = np.frombuffer("".join(docs).encode(), np.uint8)
    edges = [0, 9000, 9000 + len(docs[1]), len(data)]
    assert loaded.encode(docs[1]).count(eos) == 1  # a prompt's special tokens are tokens
    tok.encode_special_tokens = True  # the data's are text
    ids, at = common.tokenize(loaded, data, edges, piece_chars=1000)
    each = [tok.encode(d).ids + [eos] for d in docs]
    assert ids.tolist() == sum(each, [])
    assert ids.tolist().count(bos) == 3 and ids.tolist().count(eos) == 3
    assert at == [0, *itertools.accumulate(map(len, each))]  # each document's BOS, and the end
    middle, at = common.tokenize(loaded, data, edges[1:-1], piece_chars=1000)  # no first BOS...
    first = tok.encode(docs[0], add_special_tokens=False).ids + [eos]
    assert middle.tolist() == first + each[1] + tok.encode(docs[2]).ids  # ... no last EOS
    assert at == [len(first), len(first) + len(each[1])]
    assert loaded.encode(docs[1]).count(eos) == 1


def test_transformers_reads_an_exported_model(tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    cfg = GQA_SCALED
    rng = np.random.default_rng(0)  # norms away from 1, so that a norm put in the wrong place shows
    params = common.init_params(cfg, jax.random.key(1))
    params = jax.tree_util.tree_map_with_path(
        lambda k, a: a + 0.1 * rng.standard_normal(a.shape, np.float32)
        if "norm" in jax.tree_util.keystr(k) else a, params)
    files = {"tokenizer.json": common.byte_tokenizer_json(),
             "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast"}}
    path = common.save_hf_llama(str(tmp_path / "hf"), cfg, params, files, shard_bytes=40_000)
    model = transformers.AutoModelForCausalLM.from_pretrained(path).float().eval()
    tokens = rng.integers(0, cfg.vocab_size, (2, 48))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(common.forward(params, tokens, cfg))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 1e-4
    tok = transformers.AutoTokenizer.from_pretrained(path)
    assert tok("caf\u00e9 \u2713")["input_ids"] == list("caf\u00e9 \u2713".encode())


# ---------------------------------------------------------------- sharding rules

def test_param_shardings_and_errors():
    mesh = common.make_mesh(common.parse_mesh("fsdp:2"), jax.devices()[4:6])  # the devices given
    assert [d.id for d in mesh.devices.flat] == [d.id for d in jax.devices()[4:6]]
    devices = np.array(jax.devices()[:8]).reshape(2, 2, 2)
    mesh = jax.sharding.Mesh(devices, ("dp", "fsdp", "tp"))
    sh = common.param_shardings(TINY, mesh)
    assert sh["layers"]["wq"].spec == jax.sharding.PartitionSpec(None, "fsdp", "tp", None)
    assert sh["layers"]["attn_norm"].spec == jax.sharding.PartitionSpec(None, None)
    # the vocabulary split over tp in the table and the head, d_model over fsdp
    assert sh["embed"].spec == jax.sharding.PartitionSpec("tp", "fsdp")
    assert sh["lm_head"].spec == jax.sharding.PartitionSpec("fsdp", "tp")
    params = jax.jit(common.init_params, static_argnums=0, out_shardings=sh)(TINY, jax.random.key(0))
    ref = common.init_params(TINY, jax.random.key(0))
    tokens = np.arange(8 * 16).reshape(8, 16) % 256
    np.testing.assert_allclose(jax.jit(common.forward, static_argnums=2)(params, tokens, TINY),
                               common.forward(ref, tokens, TINY), rtol=1e-5, atol=1e-5)
    bad = jax.sharding.Mesh(np.array(jax.devices()[:3]), ("tp",))  # 3 does not divide 4 heads
    with pytest.raises(common.UserError, match="does not divide"):
        common.param_shardings(TINY, bad)
    for text in ("dp:\u00b2", "dp:0", "dp2", "dp:2,dp:2"):  # a superscript two is a digit too
        with pytest.raises(common.UserError, match="expected axes"):
            common.parse_mesh(text)


# ---------------------------------------------------------------- CLI

@dataclasses.dataclass(frozen=True)
class Flags:
    n: int = 3          # how many
    seed: int = 0
    rate: float = 0.5   # a rate of # signs,
                        # said on two lines
    name: str = "a"
    on: bool = False
    size: int | None = None

    def __post_init__(self):
        if self.n < 1:
            raise common.UserError(f"n must be >= 1, got {self.n}")


def test_parse_flags_types():
    f = common.parse_flags(Flags(), ["--n=7", "--rate=1e-3", "--name=x", "--on=true", "--size=none"],
                           show=False)
    assert f == Flags(n=7, rate=1e-3, name="x", on=True, size=None)
    assert common.parse_flags(Flags(), ["--size=4"], show=False).size == 4


def test_help_lists_each_flag_with_its_default_and_comment(capsys):
    with pytest.raises(SystemExit) as e:
        common.parse_flags(Flags(), ["--help"])
    assert e.value.code == 0
    lines = capsys.readouterr().out.splitlines()
    flags = lines[lines.index("flags (--name=value):") + 1:]
    assert [line.split()[0] for line in flags] == [
        "--n=3", "--seed=0", "--rate=0.5", "--name='a'", "--on=False", "--size=None"]
    assert flags[0].endswith("how many") and flags[1] == "  --seed=0"
    assert flags[2].endswith("a rate of # signs, said on two lines")


@pytest.mark.parametrize("argv,match", [(["--bogus=1"], "unknown flag --bogus"),
                                        (["n=3"], "malformed"), (["--n"], "malformed"),
                                        (["--n=three"], "--n=three"), (["--on=maybe"], "--on"),
                                        (["--n=0"], "n must be >= 1"),
                                        (["--rate=nan"], "not a finite number"),
                                        (["--rate=inf"], "not a finite number"),
                                        (["--seed=-1"], "0 <= seed < 2**31"),
                                        (["--seed=99999999999999999999"], "0 <= seed"),
                                        (["--n=2", "--n=3"], "--n is given twice")])
def test_parse_flags_errors(capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        common.parse_flags(Flags(), argv, show=False)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert match in err and err.count("\n") == 1


@pytest.mark.parametrize("raised,code,line", [(common.UserError("bad size"), 2, "error: bad size"),
                                               (KeyboardInterrupt("out keeps x"), 130,
                                                "interrupted: out keeps x"),
                                               (KeyboardInterrupt(), 130, "interrupted"),
                                               (jax.errors.JaxRuntimeError(
                                                   "RESOURCE_EXHAUSTED: Out of memory while trying"
                                                   " to allocate 41.66GiB [executable='step']"), 1,
                                                "error: the device ran out of memory "
                                                "(RESOURCE_EXHAUSTED: Out of memory while trying "
                                                "to allocate 41.66GiB): try a smaller --n"),
                                               (jax.errors.JaxRuntimeError(  # a CPU's words
                                                   "INTERNAL: Out of memory allocating 2000 "
                                                   "bytes."), 1,
                                                "error: the device ran out of memory (INTERNAL: "
                                                "Out of memory allocating 2000 bytes.): try a "
                                                "smaller --n"),
                                               (jax.errors.JaxRuntimeError(  # 8 CPU threads
                                                   "INTERNAL: Error dispatching computation: "
                                                   "Error dispatching computation: Out of memory "
                                                   "allocating 16 bytes."), 1,
                                                "error: the device ran out of memory (INTERNAL: "
                                                "Out of memory allocating 16 bytes.): try a "
                                                "smaller --n"),
                                               (MemoryError("Unable to allocate 4.69 TiB"), 1,
                                                "error: the host ran out of memory (Unable to "
                                                "allocate 4.69 TiB): try a smaller --n"),
                                               (OSError(28, "No space left on device", "out/m"),
                                                1, "error: No space left on device: out/m"),
                                               (IsADirectoryError(21, "Is a directory"), 1,
                                                "error: Is a directory")])
def test_run_turns_user_errors_and_ctrl_c_into_one_line(capsys, raised, code, line):
    def main():
        raise raised
    with pytest.raises(SystemExit) as e:
        common.run(main, smaller="try a smaller --n")
    assert e.value.code == code and capsys.readouterr().err == line + "\n"


def test_run_passes_on_what_is_not_a_users_mistake():
    """An OSError with no strerror (a library's own, not the file system's) and a runtime error
    other than memory are bugs: their traceback stays."""
    for raised in (OSError("boom"), jax.errors.JaxRuntimeError("INTERNAL: boom")):
        def main():
            raise raised
        with pytest.raises(type(raised), match="boom"):
            common.run(main)


def test_each_lesson_names_its_own_flags_when_memory_runs_out():
    """The advice on running out of memory names flags the lesson has, not another lesson's."""
    for path in sorted(glob.glob(os.path.join(ROOT, "[0-9][0-9]_*.py"))):
        source = open(path).read()
        call = source[source.rindex("common.run(main"):]
        advice = "".join(re.findall(r'"([^"]*)"', call))
        flags = re.findall(r"--([a-z_0-9]+)", advice)
        assert flags, f"{os.path.basename(path)} gives no flags to shrink its memory"
        for flag in flags:
            assert re.search(rf"^    {flag}: ", source, re.M), f"{path}: no --{flag}"


@pytest.mark.parametrize("flag,match", [("--nope=1", "unknown flag"), ("--steps=-1", "steps"),
                                        ("--preset=huge", "unknown preset"),
                                        ("--data=/does/not/exist", "does not exist")])
def test_train_script_bad_input_is_one_line(flag, match):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "09_train.py"), flag],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 2
    assert match in r.stderr and "Traceback" not in r.stderr


def test_a_closed_output_pipe_ends_the_script_quietly():
    """`python 09_train.py --help | head -1`: the reader leaves early; no traceback follows."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # the output waits
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "09_train.py"), "--help"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT, env=env)
    p.stdout.close()
    assert p.stderr.read() == b"" and p.wait(timeout=120) == 141


# ---------------------------------------------------------------- data

def test_corpus_split_and_batches(tmp_path):
    for i in range(40):
        (tmp_path / f"f{i}.txt").write_bytes(bytes([65 + i % 26]) * 100)
    train, val = common.load_corpus(str(tmp_path))
    assert len(train) + len(val) == 4000 and 0 < len(val) < 1000
    # every 20th file, by a hash of its name, validates: about 5% of many equal files
    for i in range(40, 400):
        (tmp_path / f"f{i}.txt").write_bytes(bytes([65 + i % 26]) * 100)
    assert 0.02 < len(common.load_corpus(str(tmp_path))[1]) / 40_000 < 0.08
    for i in range(40, 400):
        os.remove(tmp_path / f"f{i}.txt")
    t2, v2 = common.load_corpus(str(tmp_path))
    assert np.array_equal(train, t2) and np.array_equal(val, v2)
    x, y = common.get_batch(train, 5, 8, 16, seed=1)
    assert x.shape == (8, 16) and x.dtype == np.int32
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    # every window of seq_len + 1 can be drawn, the last token's included, from seq_len + 1 on
    ten = np.arange(10)
    seen = np.concatenate([common.get_batch(ten, s, 4, 4)[1] for s in range(200)])
    assert set(seen.ravel()) == set(range(1, 10))
    assert common.get_batch(ten, 0, 2, 9)[1].tolist() == [list(range(1, 10))] * 2
    with pytest.raises(common.UserError, match="fewer than seq_len\\+1=11"):
        common.get_batch(ten, 0, 2, 10)
    halves = [common.get_batch(train, 5, 8, 16, 1, process_index=i, process_count=2)[0]
              for i in range(2)]
    np.testing.assert_array_equal(np.concatenate(halves), x)
    assert not np.array_equal(common.get_batch(train, 6, 8, 16, 1)[0], x)
    positions = np.arange(4000)  # tokens that are their own offsets
    starts = [0, 90, 100, 1234, 3000]
    x, _, seg = common.get_batch(positions, 5, 64, 16, 1, doc_starts=starts)
    np.testing.assert_array_equal(x, common.get_batch(positions, 5, 64, 16, 1)[0])
    same = seg[:, 1:] == seg[:, :-1]  # the next token is of the same document ...
    np.testing.assert_array_equal(same, ~np.isin(x[:, 1:], starts))  # ... unless one begins
    assert not same.all()
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="no data"):
        common.load_corpus(str(tmp_path / "empty"))
    os.mkfifo(tmp_path / "pipe")
    with pytest.raises(common.UserError, match="neither a file nor a directory"):
        common.load_corpus(str(tmp_path / "pipe"))


def test_corpus_edges_mark_where_each_file_begins_and_ends(tmp_path):
    texts = [bytes([65 + i % 26]) * (50 + 7 * i) for i in range(40)]
    for i, text in enumerate(texts):
        (tmp_path / f"f{i:02d}.txt").write_bytes(text)
    plain = common.load_corpus(str(tmp_path))
    split = common.load_corpus(str(tmp_path), edges=True)
    for data, (same, edges) in zip(plain, split):
        np.testing.assert_array_equal(data, same)
        assert edges[0] == 0 and edges[-1] == len(data)
        files = [data[a:b].tobytes() for a, b in zip(edges, edges[1:])]
        assert files == [t for t in texts if t in files] and len(set(files)) == len(files)
    assert sum(len(e) - 1 for _, e in split) == len(texts)
    (short, edges), _ = common.load_corpus(str(tmp_path), max_bytes=200, edges=True)
    assert len(short) < 200 and edges == [0, 50, 107]  # the third file is cut short: no end
    one = tmp_path / "f00.txt"
    (train, train_edges), (val, val_edges) = common.load_corpus(str(one), edges=True)
    assert (train_edges, val_edges) == ([0], [len(val)])  # the 95/5 cut is not an edge
    (tmp_path / "two").mkdir()  # a file ending exactly at the 95/5 cut keeps its end
    (tmp_path / "two" / "a.txt").write_bytes(b"a" * 95)
    (tmp_path / "two" / "b.txt").write_bytes(b"b" * 5)
    (_, train_edges), (_, val_edges) = common.load_corpus(str(tmp_path / "two"), edges=True)
    assert (train_edges, val_edges) == ([0, 95], [0, 5])


def test_a_large_max_bytes_reads_no_more_than_the_files(tmp_path):
    """read(n) allocates n bytes before it reads: a limit far past the data must not."""
    (tmp_path / "a.txt").write_bytes(b"x" * 1000)
    tracemalloc.start()
    try:
        train, val = common.load_corpus(str(tmp_path / "a.txt"), max_bytes=2**29)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(train) + len(val) == 1000 and peak < 2**24


def test_default_corpus_is_python_source():
    train, val = common.load_corpus(max_bytes=2**20)
    assert len(train) > 500_000 and len(val) > 0
    assert b"def " in train.tobytes() and b"import" in train.tobytes()


def test_default_corpus_leaves_installed_packages_out(tmp_path, monkeypatch):
    """The standard library's folder often holds site-packages: installing a package must not
    change the data a run trains on (a resumed run would read other batches)."""
    for rel, text in (("os.py", "import sys\n"), ("json/decoder.py", "def decode(): pass\n"),
                      ("site-packages/numpy/core.py", "import numpy\n"),
                      ("dist-packages/six.py", "import six\n")):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    monkeypatch.setattr(common.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    train, val = common.load_corpus()
    text = train.tobytes() + val.tobytes()
    assert b"import sys" in text and b"def decode" in text
    assert b"numpy" not in text and b"six" not in text
    assert common.corpus_id(train, val) != common.corpus_id(train[:-1], val)
    flipped = val.copy()
    flipped[0] ^= 1  # the same lengths, one bit of other data
    assert common.corpus_id(train, val) != common.corpus_id(train, flipped)


def test_import_script_and_chip_table():
    mod = common.import_script("09_train")
    assert mod is common.import_script("09_train") and hasattr(mod, "TrainConfig")
    assert common.device_chip() is None  # the CPU has no datasheet entry
    for kind, name in (("NVIDIA H100 80GB HBM3", "H100 SXM"), ("NVIDIA H100 PCIe", "H100 PCIe"),
                       ("NVIDIA A100-SXM4-40GB", "A100 SXM 40GB"),
                       ("NVIDIA A100-SXM4-80GB", "A100 SXM 80GB"), ("TPU v5 lite", "TPU v5e"),
                       ("TPU v5", "TPU v5p"), ("TPU v6 lite", "TPU v6e"),
                       ("NVIDIA H100 NVL", "H100 NVL"), ("NVIDIA H200 NVL", "H200 NVL"),
                       ("NVIDIA A100 80GB PCIe", "A100 PCIe 80GB"),
                       ("NVIDIA GH200 480GB", "GH200 96GB"), ("NVIDIA H200", "H200 SXM")):
        assert common.device_chip(type("Device", (), {"device_kind": kind})()).name == name
    # a GH200 of other memory is not an H200, whose name its own contains: measured instead
    assert common.device_chip(type("Device", (), {"device_kind": "NVIDIA GH200 144G HBM3e"})()) \
        is None
    for chip in filter(None, common.CHIPS.values()):
        assert chip.bf16_flops > 0 and chip.hbm_bw > 0 and chip.source


def test_kernel_kinds_and_summary():
    names = {"nvjet_sm90_tst_128x160_64x5_2x1_v_bz_NNT": "matmul", "gemm_fusion_dot_12": "matmul",
             "int8_matmul_kernel__2": "matmul",
             "cudnn_generated_fort_native_sdpa_sm90_flash_bprop_wgmma_f16": "attention",
             "decode_kernel": "attention", "MemcpyD2D": "copy",
             "loop_add_multiply_fusion": "other", "input_reduce_fusion_17": "other",
             "ncclDevKernel_AllReduce_Sum_bf16_RING_LL": "collective"}
    assert {n: common.kernel_kind(n) for n in names} == names
    assert common.kernel_kind("Memset (Device)") == "copy"
    times = {n: (1e-3 * (i + 1), 2.0) for i, n in enumerate(names)}
    summary = common.kernel_summary(times)
    assert summary["matmul"] == pytest.approx((6e-3, 6.0))
    assert summary["other"] == pytest.approx((15e-3, 4.0))
    assert summary["collective"] == pytest.approx((9e-3, 2.0))
    assert sum(t for t, _ in summary.values()) == pytest.approx(sum(t for t, _ in times.values()))
    mine = common.kernel_summary(times, lambda n: "matmul" if "reduce" in n else "other")
    assert mine["matmul"] == pytest.approx((8e-3, 2.0))
    # A CPU runs no device kernels: the profile has nothing to report.
    assert common.kernel_times(lambda: jnp.ones(8) * 2, calls=1) is None
    # ... so device_seconds answers None there, without profiling (or calling) anything.
    ran = []
    assert common.device_seconds(lambda: ran.append(1)) is None and not ran


def test_a_model_that_cannot_fit_is_refused_before_it_is_built(monkeypatch):
    monkeypatch.setattr(common, "memory_limit", lambda device=None: (10e9, "the host's memory"))
    cfg = common.Config.preset("llama-3.2-1b")  # 1.24e9 parameters
    common.check_model_fits("preset=llama-3.2-1b", cfg, 4, "its float32 weights")  # 4.9 GB
    with pytest.raises(common.UserError, match=r"preset=llama-3.2-1b needs 19.\d GB for float32 "
                                               r"weights and the rest, more than the 10 GB"):
        common.check_model_fits("preset=llama-3.2-1b", cfg, 16, "float32 weights and the rest")
    with pytest.raises(common.UserError):  # a CPU's simulated devices share the host's memory
        common.check_model_fits("preset=llama-3.2-1b", cfg, 16, "...", shards=8)


def test_forward_checks_tokens_given_from_the_host():
    params = common.init_params(TINY, jax.random.key(0))
    for tokens in ([[TINY.vocab_size, 2]], np.array([[-3, 2]]), [[1.5, 2.0]]):
        with pytest.raises(common.UserError, match=r"tokens must be integer ids in \[0, "):
            common.forward(params, tokens, TINY)
    for tokens in ([], [[]]):
        with pytest.raises(common.UserError, match=r"tokens must be integer ids \[B, T\], got none"):
            common.forward(params, tokens, TINY)
    assert common.forward(params, np.array([[1, 2]]), TINY).shape == (1, 2, TINY.vocab_size)
    with pytest.raises(common.UserError, match="do not match the config"):
        common.check_params(params, dataclasses.replace(TINY, d_model=2 * TINY.d_model))
    with pytest.raises(common.UserError, match="the params have no .*'final_norm'"):
        common.check_params({k: v for k, v in params.items() if k != "final_norm"}, TINY)
    common.check_params(params, TINY)  # and the params it was built from pass
