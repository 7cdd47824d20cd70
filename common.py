"""What every lesson of the course shares: the model, its config, checkpoints, the CLI, timing,
hardware ceilings and data.

The model is a Llama-style decoder (Touvron et al. 2023; Llama 3, Grattafiori et al. 2024):
RMSNorm, rotary positions (Su et al. 2021) with Llama 3's frequency scaling, grouped-query
attention (Ainslie et al. 2023), a SwiGLU MLP (Shazeer 2020) and optionally tied embeddings.
Parameters are a plain pytree, described once in `param_specs` (shape, logical axes, init), so
that `init_params` and the shardings of lessons 03 and 09 come from the same source.

Nothing runs at import time. Read top to bottom:
  Config and presets -> the model -> sharding rules -> Hugging Face checkpoints -> CLI
  -> timing -> hardware -> data and tokenizers -> import_script.
"""
import concurrent.futures
import contextlib
import dataclasses
import glob
import importlib.util
import inspect
import itertools
import json
import math
import operator
import os
import re
import shutil
import socket
import struct
import sys
import sysconfig
import tempfile
import time
import types
import typing
import zipfile
import zlib

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P


class UserError(ValueError):
    """A mistake in what the user asked for: printed as one line, never as a traceback."""


def is_integer(x):
    """An int, numpy's included, and not a bool (which Python counts as one)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, bool)


def die(msg, code=2):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(code)


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Config:
    vocab_size: int = 256          # byte-level tokens by default
    d_model: int = 64              # width of the residual stream
    n_layers: int = 2              # transformer blocks
    n_heads: int = 4               # query heads
    n_kv_heads: int = 2            # key/value heads; n_heads % n_kv_heads == 0 (GQA)
    head_dim: int = 16             # D of each head (even: rope rotates pairs)
    d_ff: int = 192                # hidden width of the SwiGLU MLP
    max_seq_len: int = 128         # positions the model is used at (rope tables, checks)
    rope_theta: float = 10000.0    # rope's base: wavelengths from 2 pi to about 2 pi theta
    # Llama 3 rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_len), or None
    rope_scaling: typing.Optional[tuple] = None
    norm_eps: float = 1e-5         # added to the mean square inside RMSNorm's square root
    tie_embeddings: bool = False   # the output projection is the embedding table transposed
    param_dtype: str = "float32"   # storage dtype of the weights
    dtype: str = "float32"         # compute dtype of activations and matmuls (logits are float32)

    def __post_init__(self):
        for f in ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads", "head_dim", "d_ff",
                  "max_seq_len"):
            value = getattr(self, f)
            if not is_integer(value) or value < 1:
                raise UserError(f"{f} must be an integer >= 1, got {value!r}")
        if self.head_dim % 2:  # rope turns pairs of dimensions
            raise UserError(f"head_dim must be even (rope rotates pairs), got {self.head_dim}")
        for f in ("rope_theta", "norm_eps"):
            if not 0 < getattr(self, f) < math.inf:
                raise UserError(f"{f} must be a finite number > 0, got {getattr(self, f)}")
        if self.n_heads % self.n_kv_heads:
            raise UserError(f"n_kv_heads={self.n_kv_heads} must divide n_heads={self.n_heads}")
        for f in ("param_dtype", "dtype"):
            if getattr(self, f) not in ("float32", "bfloat16", "float16"):
                raise UserError(f"{f} must be float32, bfloat16 or float16, got {getattr(self, f)}")
        if self.rope_scaling is not None:
            try:
                values = tuple(float(x) for x in self.rope_scaling)
            except (TypeError, ValueError):
                values = ()
            if len(values) != 4:
                raise UserError(f"rope_scaling takes 4 numbers: factor,low_freq_factor,"
                                f"high_freq_factor,original_max_len; got {self.rope_scaling!r}")
            factor, low, high, old_len = values
            # rope_frequencies divides by each: a zero or an inverted band gives NaN angles
            if not (factor > 0 and 0 < low < high and old_len > 0):
                raise UserError(f"rope_scaling needs factor > 0, 0 < low_freq_factor < "
                                f"high_freq_factor and original_max_len > 0; got {values}")
            # a tuple, so that the config stays hashable (jit takes it as a static argument)
            object.__setattr__(self, "rope_scaling", values)

    @staticmethod
    def preset(name):
        if name not in PRESETS:
            raise UserError(f"unknown preset {name!r} (presets: {', '.join(PRESETS)})")
        return PRESETS[name]

    # Derived figures every lesson prints.
    def param_count(self, embedding=True):
        """All weights; embedding=False leaves out the input table (a lookup, not a matmul),
        unless it is tied: then it is the output head too, a matmul, and counts."""
        n = sum(math.prod(s.shape) for s in jax.tree.leaves(param_specs(self), is_leaf=_is_spec))
        if not embedding and not self.tie_embeddings:
            n -= self.vocab_size * self.d_model
        return n

    def kv_bytes_per_token(self, bytes_per_value=2):
        return 2 * self.n_layers * self.n_kv_heads * self.head_dim * bytes_per_value

    def train_flops_per_token(self, seq_len):
        """6N for the matmuls (forward 2N, backward 4N) plus causal attention: QK^T and PV cost
        2*2*T*H*D per token and layer forward, halved by the mask, times 3 for fwd+bwd. PaLM
        (Chowdhery et al. 2022, appendix B) and nanoGPT count 12*L*H*D*T, the attention not
        halved; the halved count is the FlashAttention papers'. So an MFU here reads below theirs
        for the same run, by the attention term: 1.04x (small, T 256), 1.05x (Llama-3.2-1B,
        T 2048), 1.13x (Llama-3-8B, T 8192)."""
        attn = 6 * self.n_layers * self.n_heads * self.head_dim * seq_len
        return 6 * self.param_count(embedding=False) + attn

    def prefill_flops(self, prompt_len):
        """A prompt's forward pass as inference runs it: 2 FLOPs a weight for every token's
        layers, the head for the last position only (the one whose next token is wanted), and
        causal attention, 2*T*H*D per token and layer as in train_flops_per_token's forward."""
        head = self.vocab_size * self.d_model  # param_count(embedding=False) holds it once
        layers = self.param_count(embedding=False) - head
        attn = 2 * self.n_layers * self.n_heads * self.head_dim * prompt_len
        return prompt_len * (2 * layers + attn) + 2 * head

    def decode_flops_per_token(self, context_len):
        """One new token: 2N for the matmuls plus QK^T and PV against `context_len` cached keys."""
        attn = 4 * self.n_layers * self.n_heads * self.head_dim * context_len
        return 2 * self.param_count(embedding=False) + attn


PRESETS = {
    "tiny": Config(),  # ~0.1M params: tests
    "small": Config(d_model=384, n_layers=6, n_heads=6, n_kv_heads=2, head_dim=64, d_ff=1536,
                    max_seq_len=512),  # ~13.2M params: the CPU training demo
    # Published shapes (Hugging Face config.json of meta-llama/Llama-3.2-1B and Meta-Llama-3-8B).
    "llama-3.2-1b": Config(vocab_size=128256, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8,
                           head_dim=64, d_ff=8192, max_seq_len=131072, rope_theta=500000.0,
                           rope_scaling=(32.0, 1.0, 4.0, 8192), tie_embeddings=True,
                           param_dtype="bfloat16", dtype="bfloat16"),
    "llama-3-8b": Config(vocab_size=128256, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8,
                         head_dim=128, d_ff=14336, max_seq_len=8192, rope_theta=500000.0,
                         param_dtype="bfloat16", dtype="bfloat16"),
}


# ----------------------------------------------------------------------------------------------
# Parameters: described once (shape, logical axes, init), as jax-llm-examples does
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamSpec:
    shape: tuple
    axes: tuple        # logical axis names, one per dim; mesh axes come from SHARDING_RULES
    init: str          # "normal" (std `scale`) or "ones"
    scale: float = 0.02


def _is_spec(x):
    return isinstance(x, ParamSpec)


def param_specs(cfg):
    D, H, KH, Dh, F, L, V = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                             cfg.n_layers, cfg.vocab_size)
    out_scale = 0.02 / math.sqrt(2 * L)  # residual projections, as GPT-2 scales them
    layers = {  # stacked on a leading layer axis, so forward is one lax.scan
        "attn_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "wq": ParamSpec((L, D, H, Dh), ("layers", "embed", "heads", "head_dim"), "normal"),
        "wk": ParamSpec((L, D, KH, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wv": ParamSpec((L, D, KH, Dh), ("layers", "embed", "kv_heads", "head_dim"), "normal"),
        "wo": ParamSpec((L, H, Dh, D), ("layers", "heads", "head_dim", "embed"), "normal",
                        out_scale),
        "mlp_norm": ParamSpec((L, D), ("layers", "norm"), "ones"),
        "w_gate": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_up": ParamSpec((L, D, F), ("layers", "embed", "mlp"), "normal"),
        "w_down": ParamSpec((L, F, D), ("layers", "mlp", "embed"), "normal", out_scale),
    }
    specs = {"embed": ParamSpec((V, D), ("vocab", "embed"), "normal"), "layers": layers,
             "final_norm": ParamSpec((D,), ("norm",), "ones")}
    if not cfg.tie_embeddings:
        specs["lm_head"] = ParamSpec((D, V), ("embed", "vocab"), "normal")
    return specs


def logical_axes(cfg):
    """The params pytree with each leaf replaced by its tuple of logical axis names."""
    return jax.tree.map(lambda s: s.axes, param_specs(cfg), is_leaf=_is_spec)


def init_params(cfg, key):
    specs = param_specs(cfg)
    leaves, treedef = jax.tree.flatten(specs, is_leaf=_is_spec)
    keys = jax.random.split(key, len(leaves))
    dtype = jnp.dtype(cfg.param_dtype)

    def init(s, k):
        if s.init == "ones":
            return jnp.ones(s.shape, dtype)
        return (s.scale * jax.random.normal(k, s.shape, jnp.float32)).astype(dtype)

    return jax.tree.unflatten(treedef, [init(s, k) for s, k in zip(leaves, keys)])


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

@jax.custom_vjp
def embed(table, tokens):
    """table[tokens]: the rows of an embedding table [V, D] for int tokens [B, T] -> [B, T, D].
    Its gradient adds each token's row gradient into the table, a scatter-add that sends many
    adds to the same rows (every space, every newline). In a 16-bit table each add is a
    read-round-write of its own and each one rounds: XLA's bf16 scatter took 1.8 ms of a 3.4 ms
    step of the `small` model on an H100, and 10-12 ms of a 270 ms step at llama-3.2-1b, 8 x 2048
    tokens.
    So the adds run in float32, and the sum is rounded once."""
    return jnp.take(table, tokens, axis=0)


def _embed_fwd(table, tokens):
    # The backward pass needs the table's shape and dtype, not its values: an empty [V, 0] array
    # carries them.
    return jnp.take(table, tokens, axis=0), (tokens, jnp.zeros((table.shape[0], 0), table.dtype))


def _embed_bwd(res, g):
    tokens, like = res
    rows = jnp.zeros((like.shape[0], g.shape[-1]), jnp.float32)
    return rows.at[tokens].add(g.astype(jnp.float32)).astype(like.dtype), None


embed.defvjp(_embed_fwd, _embed_bwd)


def rms_norm(x, w, eps):
    # Statistics in float32 even for bf16 activations: a mean of squares loses digits fast.
    xf = x.astype(jnp.float32)
    xf = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)
    return w.astype(x.dtype) * xf.astype(x.dtype)


def rope_frequencies(cfg):
    """Inverse frequencies theta^(-2i/D), i < D/2, with Llama 3's scaling when configured:
    long wavelengths (beyond the original context) are slowed by `factor`, short ones kept, and
    the band between interpolated smoothly (Llama 3.1's reference code, `apply_scaling`; HF
    `rope_type=llama3`)."""
    d = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    if cfg.rope_scaling is not None:
        factor, low, high, old_len = cfg.rope_scaling
        wavelen = 2 * np.pi / inv
        smooth = np.clip((old_len / wavelen - low) / (high - low), 0.0, 1.0)
        inv = (1 - smooth) * inv / factor + smooth * inv
    return inv.astype(np.float32)  # [D/2]


def rope_cos_sin(positions, cfg):
    angles = positions[..., None].astype(jnp.float32) * rope_frequencies(cfg)  # [B, T, D/2]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x, cos, sin):
    """Rotate pairs (x_i, x_{i+D/2}) by position-dependent angles: the "rotate half" layout that
    Hugging Face Llama checkpoints use. x: [B, T, H, D]; cos, sin: [B, T, D/2]."""
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def check_attention_inputs(q, k, v, segment_ids=None):
    """(q, k, v, segment_ids) as arrays (a list or a numpy array taken as the caller's user
    would pass one) in the shapes attention expects, or a one-line UserError that names them."""
    q, k, v = jnp.asarray(q), jnp.asarray(k), jnp.asarray(v)
    if segment_ids is not None:
        segment_ids = jnp.asarray(segment_ids)
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise UserError(f"q, k, v must be [B, T, H, D] / [B, S, KH, D], got shapes "
                        f"{q.shape}, {k.shape}, {v.shape}")
    B, T, H, D = q.shape
    if k.shape != v.shape:
        raise UserError(f"k and v shapes differ: {k.shape} vs {v.shape}")
    if k.shape[0] != B:
        raise UserError(f"batch of q ({B}) and k/v ({k.shape[0]}) differ")
    if k.shape[3] != D:
        raise UserError(f"head dims differ: q has D={D}, k/v have {k.shape[3]}")
    if 0 in q.shape or 0 in k.shape:
        raise UserError(f"q, k, v must not be empty, got shapes {q.shape}, {k.shape}")
    if H % k.shape[2]:
        raise UserError(f"k/v heads KH={k.shape[2]} must divide query heads H={H}")
    if segment_ids is not None:
        if segment_ids.shape != (B, T):
            raise UserError(f"segment_ids must be [B, T] = {(B, T)}, got "
                            f"{segment_ids.shape}")
        if k.shape[1] != T:
            raise UserError(f"segment_ids are for self-attention: S={k.shape[1]} must "
                            f"equal T={T}")
    return q, k, v, segment_ids


def attention_reference(q, k, v, causal=True, segment_ids=None):
    """Naive attention, the [T, S] score matrix materialized. q: [B, T, H, D]; k, v: [B, S, KH, D]
    with KH dividing H (each group of H/KH query heads shares one kv head); segment_ids: [B, T]
    (self-attention over packed sequences: a token sees only its own segment)."""
    q, k, v, segment_ids = check_attention_inputs(q, k, v, segment_ids)
    B, T, H, D = q.shape
    S, KH = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, KH, H // KH, D)
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32)
    scores = scores / math.sqrt(D)
    mask = jnp.ones((T, S), bool)
    if causal:  # query t sits at position t + S - T of the keys (S > T when decoding with a cache)
        mask = jnp.arange(T)[:, None] + (S - T) >= jnp.arange(S)[None, :]
    mask = jnp.broadcast_to(mask, (B, T, S))
    if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # float32: exp overflows in bf16 long before f32
    probs = jnp.where(mask[:, None, None], probs, 0.0)  # fully masked rows give 0, not NaN
    out = jnp.einsum("bkgts,bskd->btkgd", probs.astype(v.dtype), v)
    return out.reshape(B, T, H, D)


def save_dots_and_attention(prim, *args, **params):
    """The remat policy of remat="dots": keep what the matrix units made, the weight matmuls'
    outputs and a fused attention kernel's (cuDNN's, or a Pallas kernel's output with its
    softmax statistics), and recompute the cheap elementwise work in the backward pass. Without
    the attention clause the backward pass runs every attention forward a second time: 13 ms
    of cuDNN kernels in each step of llama-3.2-1b at 16 x 2048 on an H200. A Mosaic GPU kernel
    (08's Hopper ones) reaches the policy as the custom_vmap_call that wraps its pallas_call."""
    if (prim.name in ("pallas_call", "custom_vmap_call")
            or prim.name.startswith("dot_product_attention_fwd")):
        return True
    return jax.checkpoint_policies.dots_with_no_batch_dims_saveable(prim, *args, **params)


def check_params(params, cfg):
    """A one-line error where `params` were not built for `cfg` (another preset, another
    checkpoint's weights), instead of a shape error deep inside the model."""
    want = jax.tree_util.tree_flatten_with_path(
        param_specs(cfg), is_leaf=lambda x: isinstance(x, ParamSpec))[0]
    got = {jax.tree_util.keystr(k): np.shape(a)
           for k, a in jax.tree_util.tree_flatten_with_path(params)[0]}
    for path, spec in want:
        name = jax.tree_util.keystr(path)
        if name not in got:
            raise UserError(f"the params have no {name}: they were not built for this config")
        if tuple(got[name]) != tuple(spec.shape):
            raise UserError(f"the params do not match the config: {name} is {tuple(got[name])}, "
                            f"the config's is {tuple(spec.shape)}")


def forward(params, tokens, cfg, attention=None, segment_ids=None, positions=None, remat="none",
            constrain=None, scan_layers=True, logits_dtype=jnp.float32, dot=None,
            dot_state=None):
    """Logits [B, T, V] (float32 unless logits_dtype says otherwise) for int tokens [B, T].
    Tokens given as a list or a numpy array are checked against the vocabulary; a jax array's
    are not (it may be traced, and reading its values would wait for the device): there one past
    the table gives NaN logits and a negative one counts from the end, as jnp indexing does.

    attention: (q, k, v, causal, segment_ids) -> out, all [B, T, H, D] (k, v with KH heads);
    remat: "none", "full" (recompute each layer in the backward pass) or "dots" (save only the
    matmul outputs); constrain: (x, logical_axes) -> x, lets a caller pin activation shardings
    (the residual stream's axes are "residual_batch" and "residual_seq", which
    sequence_parallel_rules splits further than the batch).
    scan_layers: one compiled layer body looped over the stacked weights (compiles in the time of
    one layer), or False for the layers unrolled (compiles each; on a GPU XLA's loop copied every
    layer's weights out of the stack, 15 GB a call at 8B, where the unrolled program copied one
    matrix a layer). logits_dtype: pass the compute dtype to skip the widening when the loss widens
    inside its own reductions (cross_entropy does). dot: (spec, x, w) -> jnp.einsum(spec, x, w) for
    the layers' weight matmuls, such as lesson 07's fp8_einsum (the output head keeps jnp.einsum).
    dot_state: state that such a dot keeps per matmul, {weight name ("wq", ... "w_down"): pytree
    whose leaves have a leading [n_layers] axis}; given, each matmul calls dot(spec, x, w, its
    layer's slice) (lesson 07's delayed fp8 scaling keeps each matmul's recorded maxima so). It
    enters each layer as an argument, as the weights do: a remat'd layer is traced once for all of
    them."""
    attention = attention or attention_reference
    dot = dot or jnp.einsum
    constrain = constrain or (lambda x, axes: x)
    if isinstance(tokens, (list, tuple, np.ndarray)):
        host = np.asarray(tokens)
        if host.size == 0:
            raise UserError(f"tokens must be integer ids [B, T], got none (shape "
                            f"{list(host.shape)})")
        if not np.issubdtype(host.dtype, np.integer) or host.min() < 0 or \
                host.max() >= cfg.vocab_size:
            raise UserError(f"tokens must be integer ids in [0, {cfg.vocab_size}), got "
                            f"{host.dtype} values in [{host.min()}, {host.max()}]")
    tokens = jnp.asarray(tokens)
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise UserError(f"tokens must be integers [B, T], got {tokens.dtype} {list(tokens.shape)}")
    B, T = tokens.shape
    dt = jnp.dtype(cfg.dtype)
    positions, segment_ids = (a if a is None else jnp.asarray(a) for a in (positions, segment_ids))
    if positions is not None and jnp.shape(positions) not in ((B, T), (1, T)):
        raise UserError(f"positions must be [B, T] = {[B, T]} or [1, T], got "
                        f"{list(jnp.shape(positions))}")
    if segment_ids is not None and jnp.shape(segment_ids) != (B, T):
        raise UserError(f"segment_ids must be [B, T] = {[B, T]}, got "
                        f"{list(jnp.shape(segment_ids))}")
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(T), (B, T))
    cos, sin = rope_cos_sin(positions, cfg)

    def layer(x, p_state):  # x: [B, T, D]
        p, state = p_state
        p = jax.tree.map(lambda w: w.astype(dt), p)

        def mm(spec, a, name):  # a weight matmul, through dot, with the matmul's state if kept
            return dot(spec, a, p[name]) if state is None else dot(spec, a, p[name], state[name])
        with jax.named_scope("attention"):
            # The norm runs where x lives; its output is gathered whole once, for three matmuls.
            # Letters of the weights' einsums: d the model width, h a head, k the head's dim
            # (Dh), f the MLP's width.
            h = constrain(rms_norm(x, p["attn_norm"], cfg.norm_eps), ("batch", "seq", "embed"))
            q = mm("btd,dhk->bthk", h, "wq")
            k = mm("btd,dhk->bthk", h, "wk")
            v = mm("btd,dhk->bthk", h, "wv")
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            # Heads split over tp, every position whole: what attention needs, and where
            # sequence parallelism's gather happens (a kernel such as cuDNN's refuses a split
            # sequence).
            q = constrain(q, ("batch", "seq", "heads", "head_dim"))
            k, v = (constrain(a, ("batch", "seq", "kv_heads", "head_dim")) for a in (k, v))
            o = attention(q, k, v, True, segment_ids)  # [B, T, H, Dh]
            # Pinned to its heads too: under sequence parallelism XLA otherwise splits the
            # reference attention's backward pass over the batch rows of the residual stream,
            # moving the [T, S] probabilities between devices (all-to-alls, lesson 03).
            o = constrain(o, ("batch", "seq", "heads", "head_dim"))
            x = x + mm("bthk,hkd->btd", o, "wo")
            x = constrain(x, ("residual_batch", "residual_seq", "embed"))
        with jax.named_scope("mlp"):
            h = constrain(rms_norm(x, p["mlp_norm"], cfg.norm_eps), ("batch", "seq", "embed"))
            g = jax.nn.silu(mm("btd,df->btf", h, "w_gate"))
            u = mm("btd,df->btf", h, "w_up")
            x = x + mm("btf,fd->btd", constrain(g * u, ("batch", "seq", "mlp")), "w_down")
            x = constrain(x, ("residual_batch", "residual_seq", "embed"))
        return x, None

    if remat == "full":
        layer = jax.checkpoint(layer)
    elif remat == "dots":
        layer = jax.checkpoint(layer, policy=save_dots_and_attention)
    elif remat != "none":
        raise UserError(f"remat must be none, full or dots, got {remat!r}")

    # The table is gathered over FSDP before the lookup, as every weight is before its use; left
    # to itself, XLA's partitioner replicated the looked-up rows under a dp x fsdp x tp mesh.
    table = constrain(params["embed"].astype(dt), ("vocab", None))
    x = constrain(embed(table, tokens), ("residual_batch", "residual_seq", "embed"))
    per_layer = (params["layers"], dot_state)
    if scan_layers:
        x, _ = jax.lax.scan(layer, x, per_layer)
    else:
        for i in range(cfg.n_layers):
            x, _ = layer(x, jax.tree.map(lambda w: w[i], per_layer))
    x = rms_norm(x, params["final_norm"].astype(dt), cfg.norm_eps)
    w_out = params["embed"].T if cfg.tie_embeddings else params["lm_head"]
    # The head's output stays in the compute dtype and is widened after: the widening's
    # transpose narrows the logits' gradient again, so the backward's two [B*T, V] matmuls run
    # in bf16 too. Handing them a float32 gradient made them float32 matmuls, which took the
    # head + loss of llama-3.2-1b to 2.3x its bf16 matmul time on an H200.
    return jnp.einsum("btd,dv->btv", x, w_out.astype(dt)).astype(logits_dtype)


@jax.custom_vjp
def _token_nll(logits, targets):
    """-log softmax(logits)[target] per token, float32 [...]; logits [..., V] in any dtype."""
    return _token_nll_fwd(logits, targets)[0]


def _token_nll_fwd(logits, targets):
    # The widening to float32 happens inside the reductions: the [tokens, V] logits, the
    # largest tensor of a small model's step, are read as they are and never stored wider.
    # The max is exact in any dtype; taking it before widening leaves the widened logits one
    # consumer, so XLA fuses the widening into the sum instead of storing it.
    m = jnp.max(logits, axis=-1).astype(jnp.float32)
    lse = m + jnp.log(jnp.sum(jnp.exp(logits.astype(jnp.float32) - m[..., None]), axis=-1))
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return lse - picked.astype(jnp.float32), (logits, targets, lse)


def _token_nll_bwd(res, g):
    # d nll / d logits = softmax(logits) - onehot(target): one elementwise pass that reads the
    # logits and writes their gradient in the logits' dtype, the bytes the matmul before needs.
    logits, targets, lse = res
    p = jnp.exp(logits.astype(jnp.float32) - lse[..., None])
    onehot = jnp.arange(logits.shape[-1]) == targets[..., None]
    d = (p - onehot) * g[..., None]
    return d.astype(logits.dtype), None


_token_nll.defvjp(_token_nll_fwd, _token_nll_bwd)


def cross_entropy(logits, targets, mask=None):
    """Mean next-token loss in float32; logits [B, T, V] (any float dtype), int targets [B, T]
    in [0, V), unchecked as forward's tokens are: one >= V gives a NaN loss, a negative one
    counts from the end (and its gradient does not match).
    Its gradient is written in one pass, in the logits' dtype (see _token_nll)."""
    nll = _token_nll(logits, targets)
    if mask is None:
        return nll.mean()
    return (nll * mask).sum() / jnp.maximum(mask.sum(), 1)


# ----------------------------------------------------------------------------------------------
# Sharding: logical axis names -> mesh axes
# ----------------------------------------------------------------------------------------------

# Data parallel and FSDP split the batch; FSDP also splits each weight's "embed" dim (gathered
# before use); tensor parallelism splits heads and the MLP width (Megatron, Shoeybi et al. 2019).
SHARDING_RULES = {"batch": ("dp", "fsdp"), "residual_batch": ("dp", "fsdp"), "embed": "fsdp",
                  "heads": "tp", "kv_heads": "tp", "mlp": "tp", "vocab": "tp"}


def sequence_parallel_rules(rows, tp, fsdp=1):
    """Sequence parallelism (Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
    Transformer Models", section 4.2.2): between the tensor-parallel matmuls the residual
    stream's tokens are split over tp as well, so each all-reduce becomes a reduce-scatter into
    the norm and residual add, which then run on 1/tp of the tokens, and an all-gather before
    the next matmul: the same bytes in all, and 1/tp of the activations kept there. Norms and
    adds treat each token alone, so any split of the tokens will do. Megatron's activations are
    [T, B, D] and it splits T, the leading axis; ours are [B, T, D], and a split of a later axis
    makes every gather and scatter rearrange its data first (measured in BENCHMARKS.md: 0.94x
    plain TP against 0.97x). So the batch rows are split when each dp x fsdp group has a
    multiple of tp of them (`rows`) and FSDP is off, the positions otherwise. With FSDP on, XLA's
    partitioner could not bring rows split over (dp, fsdp, tp) to the layout of the weights'
    gradients and replicated the activations instead (an 8-device fsdp:4,tp:2 run of lesson 03:
    4.3x the predicted traffic), which a split of the positions avoids."""
    if rows % tp == 0 and fsdp == 1:
        return {**SHARDING_RULES, "residual_batch": ("dp", "fsdp", "tp")}
    return {**SHARDING_RULES, "residual_seq": "tp"}


def check_sequence_split(rows, seq_len, tp, fsdp=1):
    """sequence_parallel_rules splits each dp x fsdp group's rows over tp, else (or with FSDP)
    its positions: one of the two must divide."""
    if fsdp > 1 and seq_len % tp:
        raise UserError(f"sequence parallelism with FSDP splits the positions over tp={tp}, "
                        f"which does not divide seq_len={seq_len}")
    if rows % tp and seq_len % tp:
        raise UserError(f"sequence parallelism splits the tokens over tp={tp}, which divides "
                        f"neither the {rows} rows per dp x fsdp group nor seq_len={seq_len}")


def logical_to_spec(axes, mesh, rules=None):
    """PartitionSpec for a tuple of logical names; mesh axes absent from the mesh (or of size 1)
    are dropped, so one rule table serves every mesh."""
    rules = SHARDING_RULES if rules is None else rules
    spec, used = [], set()
    for name in axes:
        m = rules.get(name)
        m = m if isinstance(m, tuple) else (m,)
        m = tuple(a for a in m if a in mesh.shape and mesh.shape[a] > 1 and a not in used)
        used.update(m)
        spec.append(None if not m else m[0] if len(m) == 1 else m)
    return P(*spec)


def param_shardings(cfg, mesh, rules=None):
    """NamedShardings for the params pytree; a clear error when a mesh axis does not divide the
    dimension it splits."""
    def one(path, s):
        spec = logical_to_spec(s.axes, mesh, rules)
        for dim, name, m in zip(s.shape, s.axes, spec):
            size = math.prod(mesh.shape[a] for a in (m if isinstance(m, tuple) else (m,)) if a)
            if dim % size:
                raise UserError(f"mesh {dict(mesh.shape)} splits {name}={dim} of "
                                f"{jax.tree_util.keystr(path)} {size} ways, which does not divide")
        return NamedSharding(mesh, spec)
    return jax.tree_util.tree_map_with_path(one, param_specs(cfg), is_leaf=_is_spec)


MESH_AXES = ("dp", "fsdp", "tp")


def parse_mesh(text):
    """'dp:2,tp:4' -> {'dp': 2, 'fsdp': 1, 'tp': 4}: the --mesh flag of lessons 03 and 09."""
    sizes = {}
    for part in filter(None, text.split(",")):
        name, _, n = part.partition(":")
        if (name not in MESH_AXES or not (n.isascii() and n.isdigit()) or int(n) < 1
                or name in sizes):
            raise UserError(f"mesh {text!r}: expected axes from {', '.join(MESH_AXES)} "
                            f"written name:size, each once (e.g. dp:2,fsdp:2,tp:2)")
        sizes[name] = int(n)
    return {a: sizes.get(a, 1) for a in MESH_AXES}


def mesh_name(sizes):
    return ",".join(f"{a}:{sizes[a]}" for a in MESH_AXES if sizes[a] > 1) or "1 device"


def make_mesh(sizes, devices=None):
    """A (dp, fsdp, tp) mesh over the first dp*fsdp*tp devices. Axis types stay Auto: XLA's
    partitioner decides the shardings of intermediates (jax.make_mesh defaults to Explicit
    axes, where every intermediate's sharding is part of its type)."""
    devices = jax.devices() if devices is None else devices
    shape = tuple(sizes[a] for a in MESH_AXES)
    if math.prod(shape) > len(devices):
        raise UserError(f"mesh {mesh_name(sizes)} needs {math.prod(shape)} devices, but only "
                        f"{len(devices)} {'exists' if len(devices) == 1 else 'exist'}")
    return jax.sharding.Mesh(np.array(devices[:math.prod(shape)]).reshape(shape), MESH_AXES)


# ----------------------------------------------------------------------------------------------
# Hugging Face Llama checkpoints, read with a from-scratch safetensors parser
# ----------------------------------------------------------------------------------------------

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
              "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
              "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
              "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}


def read_json(path):
    """The JSON object in a file, or a one-line error naming the file."""
    try:
        with open(path) as f:
            value = json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None
    if not isinstance(value, dict):
        raise UserError(f"{path} is not a JSON object")
    return value


def read_safetensors(path):
    """{name: array} from one .safetensors file: an 8-byte little-endian header length, a JSON
    header {name: {dtype, shape, data_offsets}}, then the raw bytes (memory-mapped, not copied).
    A file cut short (an interrupted download) is an error naming the first tensor it lacks."""
    if not os.path.isfile(path):
        raise UserError(f"{path} is not a file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0] if size >= 8 else size + 1
        if n > size - 8:
            raise UserError(f"{path} is not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(n))
        except ValueError:
            header = None
    if not isinstance(header, dict):
        raise UserError(f"{path} is not a safetensors file (its header is not a JSON object)")
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n) if size > 8 + n else b""
    out = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if isinstance(info, dict) and isinstance(info.get("dtype"), str) \
                and info["dtype"] not in _ST_DTYPES:
            raise UserError(f"{path}: tensor {name} is of dtype {info['dtype']}, which this reader "
                            f"does not take ({', '.join(_ST_DTYPES)})")
        try:
            dtype, shape, (begin, end) = _ST_DTYPES[info["dtype"]], info["shape"], \
                info["data_offsets"]
            if not all(isinstance(x, int) and not isinstance(x, bool) and x >= 0
                       for x in list(shape) + [begin, end]) or end < begin:
                raise ValueError
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name} has an unreadable entry in the header "
                            f"({info!r:.80})") from None
        if end > len(data) or end - begin != math.prod(shape) * np.dtype(dtype).itemsize:
            raise UserError(f"{path} is cut short or damaged: tensor {name} needs bytes "
                            f"{begin}-{end} of {len(data)} (an interrupted download?)")
        out[name] = np.frombuffer(data[begin:end], dtype).reshape(shape)
    return out


def write_safetensors(path, arrays, threads=4, metadata=None):
    """Write {name: array} as one .safetensors file, the layout read_safetensors reads, with
    `metadata` ({str: str}) as the header's __metadata__, and flush it to disk. Threads write
    the arrays' bytes at their offsets (os.pwrite lets go of the GIL); a jax array is read in
    place in host memory, or copied from its device by the thread that writes it, while the
    others write. This goes at the disk's pace, where np.savez (a .npz,
    which checksums each array and copies it in 16 MiB pieces, on one thread) does not: 1B's
    weights and AdamW moments, 14.8 GB, took 8.6-10.5 s on an H100 machine with 1, 4 or 8
    threads alike, np.savez 17.7-22.8 s."""
    names = {np.dtype(v): k for k, v in _ST_DTYPES.items()}
    header, end = {}, 0
    arrays = {k: a.astype(a.dtype.newbyteorder("<")) if a.dtype.byteorder == ">" else a
              for k, a in arrays.items()}  # the format is little-endian
    for name, a in arrays.items():
        dtype = np.dtype(a.dtype)
        if dtype not in names:
            raise ValueError(f"{name}: safetensors has no {dtype}")
        size = math.prod(np.shape(a)) * dtype.itemsize
        header[name] = {"dtype": names[dtype], "shape": list(np.shape(a)),
                        "data_offsets": [end, end + size]}
        end += size
    head = json.dumps(({"__metadata__": dict(metadata)} if metadata else {}) | header).encode()
    head += b" " * (-len(head) % 8)  # spaces, as the format allows: the data start 8-aligned
    start = 8 + len(head)

    def write_at(data, at):
        data = memoryview(data)
        while data:  # one call may write less (at most 2 GiB on Linux)
            n = os.pwrite(fd, data, at)
            data, at = data[n:], at + n

    def write(name):
        write_at(np.ascontiguousarray(arrays[name]).reshape(-1).view(np.uint8),
                 start + header[name]["data_offsets"][0])

    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        write_at(struct.pack("<Q", len(head)) + head, 0)
        os.ftruncate(fd, start + end)
        largest_first = sorted(header, key=lambda k: operator.sub(*header[k]["data_offsets"]))
        with concurrent.futures.ThreadPoolExecutor(threads) as pool:
            list(pool.map(write, largest_first))  # list(): raises the first write's error
        os.fsync(fd)
    finally:
        os.close(fd)


def config_from_hf(hf, dtype=None):
    """Config from a Hugging Face LlamaConfig dict. Fields that change the math are honored or
    refused by name; both the Llama 3 spelling (rope_theta, rope_scaling) and the newer
    transformers one (rope_parameters) are read. dtype, if given, replaces the checkpoint's."""
    def refuse(field, why):
        raise UserError(f"config.json: {field}={hf.get(field)!r} is not supported ({why})")

    def number(field, default=None, kind=int):
        """A numeric field (kind int or float), or its default; missing or mistyped: an error."""
        value = hf.get(field)
        value = default if value is None else value
        if value is None:
            raise UserError(f"config.json: {field} is missing")
        ok = (int, float) if kind is float else int
        if isinstance(value, bool) or not isinstance(value, ok):
            raise UserError(f"config.json: {field}={value!r} is not "
                            f"{'a number' if kind is float else 'an integer'}")
        return kind(value)

    def flag(field):
        """A true/false field; JSON's booleans only (the string "false" is not False)."""
        value = hf.get(field, False)
        if not isinstance(value, bool):
            raise UserError(f"config.json: {field}={value!r} is not true or false")
        return value

    model_type = hf.get("model_type", "llama")
    if model_type not in ("llama", "mistral"):
        refuse("model_type", "this loader reads the Llama architecture, and Mistral's: Llama's "
                             "within a sliding window")
    if hf.get("hidden_act", "silu") != "silu":
        refuse("hidden_act", "Llama's MLP is SwiGLU with silu")
    for field in ("attention_bias", "mlp_bias"):
        if hf.get(field, False):
            refuse(field, "the model has no biases")
    if hf.get("quantization_config"):
        raise UserError("config.json: quantization_config is set; load an unquantized checkpoint")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise UserError(f"config.json: rope scaling {rope!r} is not an object of named values")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    theta = rope.get("rope_theta", hf.get("rope_theta", 10000.0))
    scaling = None
    if rope_type == "llama3":
        keys = ("factor", "low_freq_factor", "high_freq_factor",
                "original_max_position_embeddings")
        try:
            scaling = tuple(float(rope[k]) for k in keys[:3]) + (int(rope[keys[3]]),)
        except (KeyError, TypeError, ValueError):
            raise UserError(f"config.json: llama3 rope scaling needs numbers {', '.join(keys)}; "
                            f"got {rope}") from None
    elif rope_type != "default":
        raise UserError(f"config.json: rope type {rope_type!r} is not supported (default, llama3)")
    D, H = number("hidden_size"), number("num_attention_heads")
    # Keys a config.json leaves out take transformers' defaults: MistralConfig's or LlamaConfig's
    mistral = model_type == "mistral"
    max_len = number("max_position_embeddings", 131072 if mistral else 2048)
    n_kv_heads = number("num_key_value_heads", 8 if mistral else H)
    if mistral and hf.get("sliding_window", 4096) is not None:
        # Each token attends to the last sliding_window positions: up to that many, that is
        # causal attention, which is what forward computes; past it, forward would see more.
        max_len = min(max_len, number("sliding_window", 4096))
    stored = str(hf.get("dtype") or hf.get("torch_dtype") or "float32").replace("torch.", "")
    if dtype is None and stored not in ("float32", "bfloat16", "float16"):
        raise UserError(f"config.json: torch_dtype {stored!r} is not float32, bfloat16 or float16 "
                        f"(load_hf_llama's dtype= picks one)")
    dtype = dtype or stored
    if not isinstance(theta, (int, float)) or isinstance(theta, bool):
        raise UserError(f"config.json: rope_theta={theta!r} is not a number")
    try:
        return Config(vocab_size=number("vocab_size"), d_model=D,
                      n_layers=number("num_hidden_layers"), n_heads=H,
                      n_kv_heads=n_kv_heads,
                      head_dim=number("head_dim", D // max(H, 1)),
                      d_ff=number("intermediate_size"),
                      max_seq_len=max_len,
                      rope_theta=float(theta), rope_scaling=scaling,
                      norm_eps=number("rms_norm_eps", 1e-6, float),
                      tie_embeddings=flag("tie_word_embeddings"),
                      param_dtype=dtype, dtype=dtype)
    except UserError as e:
        raise UserError(e if str(e).startswith("config.json: ") else f"config.json: {e}") from None


def window_note(path, cfg):
    """A line saying that a Mistral checkpoint's sliding window capped cfg's context below its
    max_position_embeddings (config_from_hf does so), or "" when it did not."""
    hf = read_json(os.path.join(path, "config.json"))
    longest = hf.get("max_position_embeddings", 131072)  # MistralConfig's default
    if (hf.get("model_type") != "mistral" or not isinstance(longest, int)
            or longest <= cfg.max_seq_len):
        return ""
    return (f"note: the model attends over a sliding window of {cfg.max_seq_len} tokens; this "
            f"course's attention is the same model only within it, so the context is "
            f"{cfg.max_seq_len} tokens, not max_position_embeddings={longest}")


def read_hf_config(path, dtype=None):
    """The Config of a local Hugging Face Llama directory (its config.json), or a one-line error
    saying why the directory is not one."""
    if dtype is not None and dtype not in ("float32", "bfloat16", "float16"):
        raise UserError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"a checkpoint directory is a path, got {type(path).__name__}")
    if not os.path.isdir(path):
        what = "is not a directory" if os.path.exists(path) else "does not exist"
        raise UserError(f"checkpoint directory {path} {what}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise UserError(f"{path} has no config.json: not a Hugging Face checkpoint")
    return config_from_hf(read_json(os.path.join(path, "config.json")), dtype)


def _from_torch_layout(x, shape, dtype):
    """A torch Linear weight ([..., out, in]) in our layout (x @ w, reshaped to `shape`) and
    dtype; shape None keeps the layout."""
    return (x if shape is None else jnp.swapaxes(x, -1, -2).reshape(shape)).astype(dtype)


def load_hf_llama(path, dtype=None, shardings=None):
    """(cfg, params) from a local Hugging Face Llama directory: config.json plus one or several
    *.safetensors (sharded checkpoints list their files in model.safetensors.index.json).
    dtype overrides the checkpoint's dtype for both storage and compute. With `shardings`
    (param_shardings'), each device receives only its slices; else the params go to the default
    device. Each parameter is read in the files' layout and dtype (its slices copied out of the
    page cache by several threads) and sent on, then transposed and cast on the devices, one
    after another: on an H100 machine Llama-3-8B's shape loads in 3.7-4.3 s in bf16 or float32
    (8.0-9.0 s with one thread reading), holding at most 4.0 GB of host memory. Stacking every
    layer on the host first, then sending, took 16-21 s and 14 GB in bf16, 43-48 s and 38 GB in
    float32."""
    cfg = read_hf_config(path, dtype)
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):  # a sharded checkpoint names its files; others may lie beside them
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index} has no weight_map")
        files = sorted({os.path.join(path, str(v)) for v in weight_map.values()})
        for file in files:
            if not os.path.isfile(file):
                raise UserError(f"{index} names {os.path.basename(file)}, which is missing "
                                f"(an incomplete download?)")
    else:
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise UserError(f"{path} has no *.safetensors files (pytorch .bin files are not read)")
    tensors = {}
    for file in files:
        tensors.update(read_safetensors(file))  # memory-mapped: nothing is read yet

    def get(name, *shape):
        """A stored tensor, still mapped and in the file's dtype, checked against the shape that
        config.json implies."""
        if name not in tensors:
            raise UserError(f"{path}: tensor {name} is missing")
        if tensors[name].shape != shape:
            raise UserError(f"{path}: tensor {name} has shape {list(tensors[name].shape)}, but "
                            f"config.json implies {list(shape)}")
        if not jnp.issubdtype(tensors[name].dtype, jnp.floating):  # bf16 and fp8 count too
            raise UserError(f"{path}: tensor {name} is {tensors[name].dtype}, not a float: a "
                            f"quantized checkpoint needs its scales; load an unquantized one")
        return tensors[name]

    # Each parameter's torch name (a function of the layer, for a stacked one) and n_in. torch
    # Linear weights are [out, in]; ours are [in, out] with in or out split further (wq's out
    # is heads x head_dim), and n_in counts our dims that make up in. Norms and embed match.
    torch_names = {"embed": ("model.embed_tokens.weight", None),
                   "final_norm": ("model.norm.weight", None), "lm_head": ("lm_head.weight", 1)}
    for ours, theirs, n_in in (
            ("attn_norm", "input_layernorm", None), ("wq", "self_attn.q_proj", 1),
            ("wk", "self_attn.k_proj", 1), ("wv", "self_attn.v_proj", 1),
            ("wo", "self_attn.o_proj", 2), ("mlp_norm", "post_attention_layernorm", None),
            ("w_gate", "mlp.gate_proj", 1), ("w_up", "mlp.up_proj", 1),
            ("w_down", "mlp.down_proj", 1)):
        torch_names[ours] = (lambda i, t=theirs: f"model.layers.{i}.{t}.weight", n_in)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(param_specs(cfg), is_leaf=_is_spec)
    if shardings is None:
        shardings = [jax.sharding.SingleDeviceSharding(jax.devices()[0])] * len(leaves)
    else:
        shardings = treedef.flatten_up_to(shardings)
    pd = jnp.dtype(cfg.param_dtype)

    def plan(key_path, spec, sharding):
        """How one parameter is read: its stored tensors, their shape and split in the files'
        layout, and the compiled program's key that gives ours (None: theirs is ours)."""
        name, n_in = torch_names[key_path[-1].key]
        stacked = key_path[0].key == "layers"
        ours = spec.shape[1:] if stacked else spec.shape  # one layer's
        theirs = ours if n_in is None else (math.prod(ours[n_in:]), math.prod(ours[:n_in]))
        stored = ([get(name(i), *theirs) for i in range(cfg.n_layers)] if stacked
                  else [get(name, *theirs)])
        file_sharding = sharding
        if isinstance(sharding, NamedSharding) and n_in is not None:
            # The same split in torch's layout. A group of our dims merged into one of theirs
            # keeps its first dim's split if the others are whole; else that dim is read whole.
            split = tuple(sharding.spec) + (None,) * (len(spec.shape) - len(sharding.spec))
            lead, split = split[:int(stacked)], split[int(stacked):]
            group = lambda s: s[0] if all(x is None for x in s[1:]) else None
            file_sharding = NamedSharding(sharding.mesh, P(*lead, group(split[n_in:]),
                                                             group(split[:n_in])))
        raw = jax.ShapeDtypeStruct(((cfg.n_layers,) if stacked else ()) + theirs,
                                   stored[0].dtype, sharding=file_sharding)
        to_ours = None
        if n_in is not None or raw.dtype != pd:
            to_ours = (raw, spec.shape if n_in else None, sharding)
        return stored, stacked, raw, to_ours

    def compile_to_ours(key):
        raw, shape, sharding = key
        return jax.jit(_from_torch_layout, static_argnums=(1, 2), out_shardings=sharding).lower(
            raw, shape, pd).compile()

    def load(stored, stacked, raw, to_ours):
        """One parameter, read in the files' layout and dtype, each device its own slice (the
        host holds one parameter's slices at a time), then transposed and cast on the devices:
        numpy transposed bf16 at 0.3 GB/s on the H100 machine's host."""
        read = {}  # devices holding the same slice (replicas over dp) share one read of it

        def piece(idx):  # a device's slice of the parameter in the files' layout
            key = tuple((s.start, s.stop) for s in idx)
            if key not in read:
                if stacked:  # copied a layer per thread
                    parts = [stored[i][idx[1:]] for i in range(cfg.n_layers)[idx[0]]]
                    out = np.empty((len(parts),) + parts[0].shape, raw.dtype)
                    views = list(out)
                else:  # copied some rows per thread
                    whole = stored[0][idx]
                    out = np.empty(whole.shape, raw.dtype)
                    rows = np.linspace(0, len(whole), min(len(whole), 16) + 1).astype(int)
                    parts, views = ([a[i:j] for i, j in zip(rows, rows[1:])] for a in (whole, out))
                list(copies.map(np.copyto, views, parts))
                read[key] = out
            return read[key]

        x = jax.make_array_from_callback(raw.shape, raw.sharding, piece)
        return x if to_ours is None else compiled[to_ours](x)

    plans = [plan(k, s, sh) for (k, s), sh in zip(leaves, shardings)]
    # The few distinct transforms (one per shape) compile all at once, before the first read:
    # one after another they took most of a small model's load.
    keys = list(dict.fromkeys(p[3] for p in plans if p[3] is not None))
    with concurrent.futures.ThreadPoolExecutor(max(len(keys), 1)) as pool:
        compiled = dict(zip(keys, pool.map(compile_to_ours, keys)))
    # One parameter at a time, each finished before the next is read: the host holds one
    # parameter's slices at most, and the devices one extra copy, in the files' layout. Its
    # slices are copied out of the page cache in threads (numpy lets go of the GIL to copy).
    with concurrent.futures.ThreadPoolExecutor(min(16, os.cpu_count() or 1)) as copies:
        return cfg, treedef.unflatten([jax.block_until_ready(load(*p)) for p in plans])


def config_to_hf(cfg):
    """The Hugging Face LlamaConfig dict of `cfg`: config_from_hf's inverse. No end-of-sequence
    id: the course's byte-level models have none (transformers would otherwise assume 2)."""
    rope = {"rope_type": "default"}
    if cfg.rope_scaling:
        factor, low, high, original = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": factor, "low_freq_factor": low,
                "high_freq_factor": high, "original_max_position_embeddings": int(original)}
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_act": "silu",
            "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
            "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
            "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
            "intermediate_size": cfg.d_ff, "max_position_embeddings": cfg.max_seq_len,
            "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings,
            "rope_theta": cfg.rope_theta, "rope_scaling": rope if cfg.rope_scaling else None,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": cfg.param_dtype,
            "bos_token_id": None, "eos_token_id": None}


@dataclasses.dataclass(frozen=True)
class Deferred:
    """An array's shape and dtype now, its values when numpy asks for them (np.asarray)."""
    shape: tuple
    dtype: np.dtype
    make: typing.Callable

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize

    def __array__(self, dtype=None, copy=None):
        return np.asarray(self.make(), dtype)


def hf_tensors(cfg, params, dtype=None):
    """{Hugging Face name: Deferred array} of `params` in `dtype` (default: their own), in
    torch's [out, in] layout: the names and layouts load_hf_llama reads. Each tensor is cut
    from its stacked layer array, transposed and cast when it is asked for, on the device for
    jax arrays, so that write_safetensors's threads copy and write a few at a time: no second
    copy of the model, on the device or the host."""
    D = cfg.d_model

    def tensor(a, i=None, torch_layout=lambda x: x):
        xp = jnp if isinstance(a, jax.Array) else np
        out_dtype = jnp.dtype(dtype or a.dtype)
        like = jax.ShapeDtypeStruct(a.shape if i is None else a.shape[1:], out_dtype)
        return Deferred(jax.eval_shape(torch_layout, like).shape, out_dtype,
                        lambda: torch_layout(xp.asarray(a if i is None else a[i])).astype(
                            out_dtype))

    def heads_out(x):  # torch Linear weights are [out, in]; ours are [in, out...] (x @ w)
        return x.reshape(D, -1).T

    def heads_in(x):  # wo is [heads, head_dim, D]: its input dims come first
        return x.reshape(-1, D).T

    def matrix(x):
        return x.T

    layers, out = params["layers"], {"model.embed_tokens.weight": tensor(params["embed"])}
    for i in range(cfg.n_layers):
        pre = f"model.layers.{i}."
        out |= {pre + "input_layernorm.weight": tensor(layers["attn_norm"], i),
                pre + "self_attn.q_proj.weight": tensor(layers["wq"], i, heads_out),
                pre + "self_attn.k_proj.weight": tensor(layers["wk"], i, heads_out),
                pre + "self_attn.v_proj.weight": tensor(layers["wv"], i, heads_out),
                pre + "self_attn.o_proj.weight": tensor(layers["wo"], i, heads_in),
                pre + "post_attention_layernorm.weight": tensor(layers["mlp_norm"], i),
                pre + "mlp.gate_proj.weight": tensor(layers["w_gate"], i, matrix),
                pre + "mlp.up_proj.weight": tensor(layers["w_up"], i, matrix),
                pre + "mlp.down_proj.weight": tensor(layers["w_down"], i, matrix)}
    out["model.norm.weight"] = tensor(params["final_norm"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = tensor(params["lm_head"], None, matrix)
    return out


def check_new_dir(path, flag):
    """Refuse, in one line, a path that save_hf_llama would not write: one that exists and is
    not an empty directory (nothing a user saved is overwritten), or whose parent is missing."""
    named = f"{flag}={path}" if flag.startswith("--") else f"{flag} {path}"
    if os.path.exists(path) and not (os.path.isdir(path) and not os.listdir(path)):
        raise UserError(f"{named} already exists: name a new directory (nothing is overwritten)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK | os.X_OK):
        raise UserError(f"{named}: its parent directory does not exist or cannot be written")


def save_hf_llama(path, cfg, params, files=None, shard_bytes=5 * 10**9):
    """Write a model as a Hugging Face Llama directory, which load_hf_llama and transformers
    read: config.json, the tensors in cfg.param_dtype in safetensors files of at most
    shard_bytes each (several are listed in model.safetensors.index.json, as transformers'
    save_pretrained does), and `files` ({name: JSON object}, e.g. a tokenizer.json; a
    config.json there adds its fields, such as token ids, to the model's). It is
    written to a temporary directory, then renamed: a failure leaves nothing at `path`.
    Llama-3-8B's shape in bf16 (16.1 GB, four files) took 14.6-16.2 s on an H100 machine, where
    making the tensors and copying them to the host alone took 11.6 s, and writing the same
    bytes from host memory 11.0-14.3 s (one file after another: 18.4-20.5 s)."""
    check_new_dir(path, "the export directory")
    tensors = hf_tensors(cfg, params, cfg.param_dtype)
    shards, size = [{}], 0
    for name, a in tensors.items():  # in order, a new file where the next would pass the limit
        if shards[-1] and size + a.nbytes > shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name], size = a, size + a.nbytes
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    files = dict(files or {})
    files["config.json"] = config_to_hf(cfg) | files.get("config.json", {})
    if len(shards) > 1:
        files["model.safetensors.index.json"] = {
            "metadata": {"total_size": sum(a.nbytes for a in tensors.values())},
            "weight_map": {t: name for name, shard in zip(names, shards) for t in shard}}
    path = os.path.abspath(path)
    tmp = os.path.join(os.path.dirname(path), f".tmp_{os.path.basename(path)}_{os.getpid()}")
    try:
        os.makedirs(tmp)
        # Four files at a time: one's flush to disk overlaps the others' copies
        at_once = min(4, len(shards))
        with concurrent.futures.ThreadPoolExecutor(at_once) as pool:
            # ("format": "pt", as save_pretrained writes: older transformers, 4.41 for one, fail
            # to load a file without it)
            list(pool.map(lambda name, shard: write_safetensors(
                os.path.join(tmp, name), shard, threads=8 // at_once, metadata={"format": "pt"}),
                names, shards))
        for name, value in files.items():
            _write_json(os.path.join(tmp, name), value, indent=2)
        _fsync_dir(tmp)
        os.rename(tmp, path)  # onto an empty directory, or none
        _fsync_dir(os.path.dirname(path))
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UserError(f"could not write {path} ({e.strerror or e}); nothing was left "
                        f"there") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path


# ----------------------------------------------------------------------------------------------
# Training checkpoints (09 writes them, 06 serves them): a directory per step, written atomically
# ----------------------------------------------------------------------------------------------

def _write_json(path, value, indent=None):
    """A JSON file, flushed to disk before the rename that puts its directory in place."""
    with open(path, "w") as f:
        json.dump(value, f, indent=indent)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path):
    """Make a rename inside `path` durable: a power loss after it cannot undo it."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


STATE_FILE = "state.safetensors"  # checkpoints written before it held state.npz: still read


def save_checkpoint(out_dir, step, tree, meta, keep=2, files=None):
    """Write {tree: array leaves, meta: json} as out_dir/ckpt_<step>: STATE_FILE the leaves, named
    by their tree paths, meta.json the rest, and `files` ({name: JSON object}: a tokenizer.json)
    beside them. The files go to a temporary directory first, flushed to disk, then renamed into
    place: a crash or a power loss mid-save leaves the previous checkpoints as they were. Keeps
    the newest `keep` checkpoints up to this step. Any past it (a run resumed from before a
    damaged newest one) are neither counted nor removed: the run overwrites them as it gets there,
    so they cannot push out the checkpoint it resumed from."""
    os.makedirs(out_dir, exist_ok=True)
    for stale in glob.glob(os.path.join(out_dir, ".tmp_ckpt_*")):  # left by a crashed save
        if stale.endswith(".old"):  # a rerun's previous copy, set aside before its rename
            final = os.path.join(out_dir, os.path.basename(stale)[len(".tmp_"):-len(".old")])
            if not os.path.exists(final):  # the crash came between the two renames
                os.rename(stale, final)
                continue
        _remove(stale)
    final = os.path.join(out_dir, f"ckpt_{step:08d}")
    tmp = os.path.join(out_dir, f".tmp_ckpt_{step:08d}")
    os.makedirs(tmp)
    flat = {jax.tree_util.keystr(k): v if hasattr(v, "dtype") else np.asarray(v)  # a Python int
            for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
    write_safetensors(os.path.join(tmp, STATE_FILE), flat)
    meta = dict(meta, step=step, dtypes={k: str(v.dtype) for k, v in flat.items()})
    for name, value in dict(files or {}, **{"meta.json": meta}).items():
        _write_json(os.path.join(tmp, name), value)
    _fsync_dir(tmp)
    if os.path.exists(final):  # the same step saved again (a rerun): replace it
        os.rename(final, tmp + ".old")
    os.rename(tmp, final)
    _fsync_dir(out_dir)
    upto = [p for p in list_checkpoints(out_dir) if int(os.path.basename(p)[5:]) <= step]
    for old in glob.glob(os.path.join(out_dir, ".tmp_ckpt_*")) + upto[:-keep]:
        _remove(old)
    return final


def _remove(path):
    """An old checkpoint deleted, or where that fails (made read-only), left with a warning:
    the new one is already in place. A checkpoint is renamed out of the list first, so that a
    crash halfway through the deletion leaves a temporary directory (removed by the next save),
    not a checkpoint with half its files."""
    try:
        if os.path.basename(path).startswith("ckpt_"):
            gone = os.path.join(os.path.dirname(path), f".tmp_{os.path.basename(path)}.del")
            os.rename(path, gone)
            path = gone
        shutil.rmtree(path)
    except OSError as e:
        print(f"warning: could not remove the old checkpoint {path} ({e.strerror})",
              file=sys.stderr)


def list_checkpoints(out_dir):
    """out_dir's checkpoints, oldest first: ckpt_ and at least 8 digits, 9 past step 99,999,999."""
    found = [p for p in glob.glob(os.path.join(out_dir, "ckpt_" + "[0-9]" * 8 + "*"))
             if re.fullmatch(r"ckpt_\d{8,}", os.path.basename(p)) and os.path.isdir(p)]
    return sorted(found, key=lambda p: int(os.path.basename(p)[5:]))


def make_out_dir(path, flag="--out"):
    """Create an output directory before any long work, so that a path which cannot be one (an
    existing file, a path through a file, no permission) is refused at once, not after the run."""
    try:
        os.makedirs(path, exist_ok=True)
    except FileExistsError:
        raise UserError(f"{flag}={path} is a file, not a directory") from None
    except OSError as e:
        raise UserError(f"{flag}={path} cannot be made a directory ({e.strerror})") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UserError(f"{flag}={path} is a directory this user cannot write to")
    return path


@contextlib.contextmanager
def hold_dir(path, flag="--out_dir"):
    """Make `path` (make_out_dir) and hold it for this run: a second run writing the same
    directory is refused in one line, since each save clears the half-written checkpoints it
    finds, the other run's included. The lock (flock on path/.lock) ends with the run or its
    process; where the file system has no locks (some network mounts) the run goes unguarded."""
    make_out_dir(path, flag)
    fd = os.open(os.path.join(path, ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    with os.fdopen(fd, "r+") as f:
        try:
            import fcntl
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except (BlockingIOError, PermissionError):
            owner = f.read().strip() or "its owner unknown"
            raise UserError(f"{flag}={path} is in use by another run ({owner}): wait for it to "
                            f"end, or use another {flag}") from None
        except (ImportError, OSError):  # no fcntl (Windows), or no locks on this file system
            print(f"note: {flag}={path} cannot be locked here; make sure no other run uses it")
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        yield path


class DamagedCheckpoint(UserError):
    """A checkpoint directory whose files cannot be read (truncated, emptied, edited)."""


def load_checkpoint_meta(path):
    """The meta dict of a directory save_checkpoint wrote, or DamagedCheckpoint."""
    try:
        with open(os.path.join(path, "meta.json")) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: meta.json cannot be read "
                                f"({type(e).__name__}: {e})") from None
    if not isinstance(meta, dict):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: meta.json is not a JSON object")
    return meta


def load_newest_checkpoint(out_dir, load):
    """(path, load(path)) for the newest checkpoint in out_dir that `load` can read, or None if
    there is none. A damaged one (DamagedCheckpoint: files cut short by a power loss, or edited)
    is passed over with a line saying so, for the one before it."""
    found = list_checkpoints(out_dir)
    for path in reversed(found):
        try:
            return path, load(path)
        except DamagedCheckpoint as e:
            print(f"warning: {e}; passing over it", file=sys.stderr)
    if found:
        raise UserError(f"every checkpoint in {out_dir} is damaged; move them away to start "
                        f"afresh, or use another directory")
    return None


def load_checkpoint(path, like):
    """(tree shaped like `like`, meta) from a directory save_checkpoint wrote. Files that cannot
    be read raise DamagedCheckpoint; a tree of another model a plain UserError."""
    meta = load_checkpoint_meta(path)
    if not isinstance(meta.get("dtypes"), dict) or not isinstance(meta.get("step"), int):
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its meta.json lacks the step "
                                f"and dtypes save_checkpoint writes")
    named = re.fullmatch(r"ckpt_(\d+)", os.path.basename(os.path.normpath(path)))
    if named and int(named.group(1)) != meta["step"]:
        raise DamagedCheckpoint(f"checkpoint {path} is damaged: its meta.json says step "
                                f"{meta['step']}")
    paths, treedef = jax.tree_util.tree_flatten_with_path(like)
    names = [jax.tree_util.keystr(k) for k, _ in paths]
    file = STATE_FILE
    if not os.path.exists(os.path.join(path, file)) and \
            os.path.exists(os.path.join(path, "state.npz")):
        file = "state.npz"  # written before checkpoints were safetensors files
    if file == STATE_FILE:
        try:  # memory-mapped: a restore reads each device's slices, not the whole file first
            stored = read_safetensors(os.path.join(path, file))
        except (UserError, OSError, ValueError) as e:
            why = (str(e).replace(os.path.join(path, file), "it") if isinstance(e, UserError)
                   else f"{type(e).__name__}: {e}")
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {file} cannot be read "
                                    f"({why})") from None
    else:
        try:
            with np.load(os.path.join(path, file)) as data:
                stored = {name: data[name] for name in names if name in data}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
            # numpy takes bytes that are no .npz for a pickle and suggests loading it unsafely
            why = ("it is not an archive of arrays" if "pickle" in str(e)
                   else f"{type(e).__name__}: {e}")
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {file} cannot be read "
                                    f"({why})") from None
    leaves = []
    for name, (_, ref) in zip(names, paths):
        if name not in meta["dtypes"]:
            raise UserError(f"checkpoint {path} has no {name}: it was written for another model")
        if name not in stored:  # meta.json lists it: the archive lost it
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {file} lacks {name}, "
                                    f"which its meta.json lists")
        a = stored[name]
        if a.shape != np.shape(ref):  # the config in meta.json matched: the array was edited
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {name} has shape {a.shape}, "
                                    f"the model's is {np.shape(ref)}")
        if meta["dtypes"][name] == "bfloat16" and a.dtype == np.uint16:
            a = a.view(ml_dtypes.bfloat16)  # .npz: stored as its bits (numpy has no bfloat16)
        if a.dtype != np.dtype(ref.dtype) or str(a.dtype) != meta["dtypes"][name]:
            raise DamagedCheckpoint(f"checkpoint {path} is damaged: {name} is {a.dtype} (meta.json "
                                    f"says {meta['dtypes'][name]}), the model's is "
                                    f"{np.dtype(ref.dtype)}")
        leaves.append(a)
    return jax.tree.unflatten(treedef, leaves), meta


# ----------------------------------------------------------------------------------------------
# Command line: --field=value for any dataclass field
# ----------------------------------------------------------------------------------------------

def _convert(text, tp):
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):  # Optional[X], X | None
        if text.lower() == "none":
            return None
        return _convert(text, next(a for a in args if a is not type(None)))
    if tp is bool:
        if text.lower() in ("1", "true", "yes"):
            return True
        if text.lower() in ("0", "false", "no"):
            return False
        raise ValueError("expected true or false")
    if tp in (tuple, list) or origin in (tuple, list):
        return tuple(_convert(t, float) for t in text.split(",")) if text else ()
    value = tp(text)
    if tp is float and not math.isfinite(value):
        raise ValueError("not a finite number")
    return value


def flag_notes(cls):
    """{field: the comment beside it in the class's source, with the comment-only lines below
    it}: the config classes document their flags where they declare them."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):
        return {}
    notes, name = {}, None
    for line in lines:
        field = re.match(r"\s+(\w+)\s*:[^=]*=.*?(?:\s#\s?(.*))?$", line)
        more = re.match(r"\s+#\s?(.*)$", line)
        if more and name:
            notes[name] += " " + more.group(1).strip()
        elif field:
            name = field.group(1)
            notes[name] = (field.group(2) or "").strip()
        else:
            name = None
    return notes


def flag_help(default):
    """--help: each flag with its default and what it does."""
    notes = flag_notes(type(default))
    doc = (getattr(sys.modules.get("__main__"), "__doc__", None) or "").strip()
    rows = [f"  --{f.name}={getattr(default, f.name)!r}" for f in dataclasses.fields(default)]
    width = max(len(r) for r in rows) + 2
    title = " ".join(doc.split("\n\n")[0].split())  # the script's docstring, first paragraph
    return "\n".join(([title, ""] if doc else []) + ["flags (--name=value):"] + [
        f"{r:{width}s}{notes.get(f.name, '')}".rstrip()
        for r, f in zip(rows, dataclasses.fields(default))])


def unescape(text):
    """A prompt typed in a shell: the two characters \\n are a newline, \\t a tab and \\\\ one
    backslash, as echo -e and printf read them (a shell passes a typed \\n through as is)."""
    return re.sub(r"\\([nt\\])", lambda m: {"n": "\n", "t": "\t"}.get(m[1], "\\"), text)


def parse_flags(default, argv=None, show=True):
    """A copy of dataclass `default` with --field=value overrides from argv; a bad flag is a
    one-line error and exit code 2. Range checks live in the dataclass's __post_init__."""
    argv = sys.argv[1:] if argv is None else argv
    hints = typing.get_type_hints(type(default))
    names = [f.name for f in dataclasses.fields(default)]
    overrides = {}
    for arg in argv:
        if arg in ("-h", "--help"):
            print(flag_help(default))
            sys.exit(0)
        if not arg.startswith("--") or "=" not in arg:
            die(f"malformed flag {arg!r}: expected --name=value")
        name, text = arg[2:].split("=", 1)
        name = name.replace("-", "_")
        if name not in names:
            die(f"unknown flag --{name} (flags: {', '.join('--' + n for n in names)})")
        if name in overrides:  # rather than silently keeping the last of two values
            die(f"--{name} is given twice: give it once")
        try:
            overrides[name] = _convert(text, hints[name])
        except (ValueError, TypeError) as e:
            kind = getattr(hints[name], "__name__", hints[name])
            die(f"--{name}={text}: not a valid {kind} ({e})")
        seed = overrides[name] if name == "seed" else None   # an int32 on the device
        if seed is not None and not 0 <= seed < 2**31:
            die(f"--seed={text}: expected 0 <= seed < 2**31")
    try:
        cfg = dataclasses.replace(default, **overrides)
    except UserError as e:
        die(str(e))
    if show:
        print(" ".join(f"{n}={_shown(getattr(cfg, n))}" for n in names))
    return cfg


def _shown(value):
    """A flag's value as the config line prints it: a string with a newline or a space quoted."""
    quoted = isinstance(value, str) and (" " in value or not value.isprintable())
    return repr(value) if quoted else value


def run(main, smaller="try smaller sizes"):
    """Run a lesson's main(); a UserError raised anywhere inside becomes one line and exit 2, the
    device or the host (numpy) running out of memory one line and exit 1, Ctrl-C one line (with what
    the lesson says is kept) and exit 130, a closed output pipe nothing and exit 141, as a shell's
    tools, and a file system's error (a full disk) its one line and exit 1. `smaller` is the
    lesson's advice on memory: the flags that shrink it."""
    try:
        try:
            main()
        finally:
            sys.stdout.flush()  # a closed pipe shows here, where the handlers below see it
    except UserError as e:
        die(str(e))
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "Out of memory" not in str(e):
            raise  # (a CPU reports a failed allocation as INTERNAL: "Out of memory allocating")
        what = str(e).splitlines()[0].split(" [")[0]  # the allocator's dump went to stderr above
        what = re.sub(r"(Error dispatching computation: )+", "", what)  # one per device thread
        gpu = ("JAX takes 75% of a GPU's memory unless XLA_PYTHON_CLIENT_MEM_FRACTION=.95 says "
               "more; " if jax.devices()[0].platform == "gpu" else "")
        die(f"the device ran out of memory ({what}): {gpu}{smaller}", code=1)
    except MemoryError as e:  # numpy's, building inputs on the host
        die(f"the host ran out of memory ({e}): {smaller}", code=1)
    except KeyboardInterrupt as e:
        print(f"interrupted{f': {e}' if str(e) else ''}", file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:  # what read the output went away (`| head`): stop without a word
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(141)
    except OSError as e:  # the file system's answer (a full disk, a directory where a file goes)
        if e.strerror is None:
            raise
        die(f"{e.strerror}: {e.filename}" if e.filename else e.strerror, code=1)


# ----------------------------------------------------------------------------------------------
# Timing
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Timing:
    compile_s: float   # lowering + compilation, kept apart from the runs
    median_s: float
    min_s: float
    runs: int


def bench(fn, *args, iters=10, warmup=2, arg_sets=None, calls=None, min_sample_s=0.02):
    """Time fn(*args): compile first (reported apart), warm up, then the median of `iters` samples.
    A sample dispatches `calls` runs back to back and waits once (block_until_ready on the last: one
    device stream runs them in order), so the host's dispatch and wake-up after a wait, 0.1-0.2 ms a
    call on an H200 host (BENCHMARKS.md), is spread over many runs instead of added to each;
    calls=None picks enough runs to fill min_sample_s. arg_sets: a list of argument tuples to rotate
    through, so repeated runs do not just measure the cache."""
    if iters < 1 or calls is not None and calls < 1:
        raise UserError(f"bench needs iters >= 1 and calls >= 1, got {iters} and {calls}")
    arg_sets = arg_sets or [args]
    t0 = time.perf_counter()
    if hasattr(fn, "lower"):
        compiled = fn.lower(*arg_sets[0]).compile()
        # A compiled program takes no static arguments (jit's static_argnums): with them, time
        # the jitted fn, warmed up on every argument set so that none compiles inside a sample
        static = len(compiled.args_info[0]) != len(arg_sets[0])
        fn, warmup = (fn, max(warmup, len(arg_sets))) if static else (compiled, warmup)
    else:
        jax.block_until_ready(fn(*arg_sets[0]))
    compile_s = time.perf_counter() - t0
    for i in range(warmup):
        jax.block_until_ready(fn(*arg_sets[i % len(arg_sets)]))
    if calls is None:
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*arg_sets[0]))
        calls = int(np.clip(min_sample_s / (time.perf_counter() - t0), 1, 100))
    # Simulated CPU devices are threads of one pool, and a run of a multi-device program waits at
    # every collective for all of them: runs queued back to back can leave every thread waiting
    # for a device whose share of the same run is queued behind them, a deadlock XLA aborts after
    # 40 s. There each run is waited for; the host is the device, so the bursts buy nothing.
    serial = jax.devices()[0].platform == "cpu" and jax.device_count() > 1
    times, k = [], 0
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(calls):
            out = fn(*arg_sets[k % len(arg_sets)])
            k += 1
            if serial:
                jax.block_until_ready(out)
        jax.block_until_ready(out)
        times.append((time.perf_counter() - t0) / calls)
    return Timing(compile_s, float(np.median(times)), float(min(times)), iters * calls)


def kernel_kind(name):
    """A device kernel's name -> "collective", "matmul", "attention", "copy" or "other", by the
    names that NCCL, cuBLAS, cuDNN, XLA and this course's Pallas kernels give their kernels. A
    collective's time includes its wait for the other devices to arrive."""
    n = name.lower()
    if "nccl" in n:
        return "collective"
    if any(w in n for w in ("sdpa", "fmha", "flash", "attention", "decode_kernel")):
        return "attention"
    if any(w in n for w in ("gemm", "nvjet", "cublas", "xmma", "cutlass", "matmul", "gemv")):
        return "matmul"
    if "memcpy" in n or "memset" in n:
        return "copy"
    return "other"


def kernel_times(fn, calls=3, device=0):
    """Run fn() `calls` times under JAX's profiler and read back what accelerator `device` ran:
    {kernel name: (seconds per call, launches per call)}, from the accelerator's own timestamps.
    None where the profile holds no device streams (a CPU runs no kernels). Where a step's time
    goes, kernel by kernel, is the measurement that a roofline's prediction is checked
    against."""
    jax.block_until_ready(fn())          # compiled and warm before the trace starts
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        try:
            for _ in range(calls):
                out = fn()
            jax.block_until_ready(out)
        finally:
            jax.profiler.stop_trace()
        paths = glob.glob(os.path.join(d, "**", "*.xplane.pb"), recursive=True)
        data = jax.profiler.ProfileData.from_file(paths[0]) if paths else None
    if data is None:
        return None
    times = {}
    for plane in data.planes:
        if not (plane.name.startswith("/device:") and plane.name.endswith(f":{device}")):
            continue
        for line in plane.lines:
            if not line.name.startswith("Stream"):
                continue
            for e in line.events:
                t, n = times.get(e.name, (0.0, 0))
                times[e.name] = (t + e.duration_ns * 1e-9, n + 1)
    return {k: (t / calls, n / calls) for k, (t, n) in times.items()} or None


def device_seconds(fn, *args, arg_sets=None, calls=16):
    """Seconds per call of fn(*args) by the accelerator's own clock: the sum of the kernels one
    call ran (kernel_times), averaged over `calls` calls, the arguments rotating through
    arg_sets as in bench. A wall-clock time from Python also holds the host's work to dispatch
    each call, tens of microseconds on a GPU host; while a kernel is shorter than that, the
    device waits between calls and the wall clock measures the host, not the kernel. The
    average is over many calls because a GPU at its power limit moves its clock from moment to
    moment (an H100's 8192^3 bf16 matmul: 670-820 TFLOP/s from one group of 4 calls to the
    next). None on a CPU, where the host is the device."""
    if jax.devices()[0].platform == "cpu":
        return None
    sets = itertools.cycle(arg_sets or [args])
    times = kernel_times(lambda: fn(*next(sets)), calls=calls)
    return sum(t for t, _ in times.values()) if times else None


def kernel_summary(times, kind=kernel_kind):
    """kernel_times' result -> {kind: (seconds, launches)} per call, kinds by `kind(name)`."""
    out = {}
    for name, (t, n) in times.items():
        kt, kn = out.get(kind(name), (0.0, 0))
        out[kind(name)] = (kt + t, kn + n)
    return out


# ----------------------------------------------------------------------------------------------
# Hardware: datasheet ceilings, and measured ones
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Chip:
    name: str
    bf16_flops: float        # dense matrix FLOP/s
    fp8_flops: float         # 0 where the chip has no fp8 matrix unit
    int8_ops: float
    f32_flops: float         # non-matrix float32 (GPU) / matrix unit at f32 (TPU)
    hbm_bw: float            # bytes/s
    hbm_bytes: float
    link_bw: float           # bytes/s one way, per link (NVLink per GPU; one TPU ICI link)
    on_chip_bytes: float     # shared memory per SM (GPU) or VMEM (TPU); 0 when not published
    source: str
    # float32 matrix products at JAX's default precision: TF32 on NVIDIA's tensor cores; one
    # bf16 pass on a TPU's matrix unit, so 0 there stands for bf16_flops
    tf32_flops: float = 0


_NV = "NVIDIA datasheet (dense, without sparsity)"
_TPU = "Cloud TPU system architecture docs; link one-way bandwidth per the JAX scaling book"
CHIPS = {
    "H100": Chip("H100 SXM", 989e12, 1979e12, 1979e12, 67e12, 3.35e12, 80e9, 450e9, 228 * 1024,
                 _NV, tf32_flops=494.7e12),
    "H200": Chip("H200 SXM", 989e12, 1979e12, 1979e12, 67e12, 4.8e12, 141e9, 450e9, 228 * 1024,
                 _NV, tf32_flops=494.7e12),
    "A100": Chip("A100 SXM 80GB", 312e12, 0, 624e12, 19.5e12, 2.039e12, 80e9, 300e9, 164 * 1024,
                 _NV, tf32_flops=156e12),
    # Variants whose device_kind names them: the same chip with less bandwidth, or (H100 PCIe)
    # fewer SMs at a lower clock. The longest key that the kind contains wins.
    "A100-SXM4-40GB": Chip("A100 SXM 40GB", 312e12, 0, 624e12, 19.5e12, 1.555e12, 40e9, 300e9,
                           164 * 1024, _NV, tf32_flops=156e12),
    "A100-PCIE-40GB": Chip("A100 PCIe 40GB", 312e12, 0, 624e12, 19.5e12, 1.555e12, 40e9, 300e9,
                           164 * 1024, _NV, tf32_flops=156e12),
    "A100 80GB PCIe": Chip("A100 PCIe 80GB", 312e12, 0, 624e12, 19.5e12, 1.935e12, 80e9, 300e9,
                           164 * 1024, _NV, tf32_flops=156e12),
    "H100 PCIe": Chip("H100 PCIe", 756e12, 1513e12, 1513e12, 51e12, 2.0e12, 80e9, 300e9,
                      228 * 1024, _NV, tf32_flops=378e12),
    "H100 NVL": Chip("H100 NVL", 835e12, 1671e12, 1671e12, 60e12, 3.9e12, 94e9, 300e9, 228 * 1024,
                     _NV, tf32_flops=417.5e12),
    # the PCIe H200 (600 W, NVLink bridges): the SXM part's memory at the H100 NVL's clocks
    "H200 NVL": Chip("H200 NVL", 835e12, 1671e12, 1671e12, 60e12, 4.8e12, 141e9, 450e9, 228 * 1024,
                     _NV, tf32_flops=417.5e12),
    # GH200's GPU is an H100 (its name holds "H200"): the 96 GB HBM3 part; others are measured
    "GH200 480GB": Chip("GH200 96GB", 989e12, 1979e12, 1979e12, 67e12, 4.0e12, 96e9, 450e9,
                        228 * 1024, _NV, tf32_flops=494.7e12),
    "GH200": None,
    "TPU v4": Chip("TPU v4", 275e12, 0, 275e12, 0, 1.2e12, 32 * 2**30, 4.5e10, 0, _TPU),
    "TPU v5 lite": Chip("TPU v5e", 197e12, 0, 394e12, 0, 8.19e11, 16e9, 4.5e10, 128 * 2**20,
                        _TPU),
    # a v5p names itself "TPU v5"
    "TPU v5": Chip("TPU v5p", 459e12, 0, 918e12, 0, 2.765e12, 95e9, 9e10, 0, _TPU),
    "TPU v6 lite": Chip("TPU v6e", 918e12, 0, 1836e12, 0, 1.64e12, 32e9, 9e10, 128 * 2**20, _TPU),
}


def device_chip(device=None):
    """The table's entry for a device (the first by default), or None (a CPU, an unknown chip,
    a variant the table leaves to be measured)."""
    kind = (device or jax.devices()[0]).device_kind
    for key in sorted(CHIPS, key=len, reverse=True):  # "TPU v5 lite" before "TPU v5"
        if key.lower() in kind.lower():
            return CHIPS[key]
    return None


def memory_limit(device=None):
    """(bytes, what they are): on a GPU what the allocator lets this process take (75% of the
    memory unless XLA_PYTHON_CLIENT_MEM_FRACTION says otherwise), else the chip table's HBM or
    a CPU's physical memory; (None, "") where none of these is known."""
    device = device or jax.local_devices()[0]  # (another process's device has no stats here)
    limit, chip = (device.memory_stats() or {}).get("bytes_limit"), device_chip(device)
    if limit:
        return limit, "what this process may allocate"
    if chip:
        return chip.hbm_bytes, f"{chip.name}'s memory"
    if device.platform == "cpu" and hasattr(os, "sysconf"):
        try:
            return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"), "the host's memory"
        except (ValueError, OSError):
            pass
    return None, ""


def check_fits(flag, nbytes, what):
    """Refuse a size whose arrays cannot fit in the device's memory, before any is built: past
    2^63 elements XLA aborts the process rather than report an error."""
    limit, where = memory_limit()
    if limit and nbytes > limit:
        raise UserError(f"{flag} needs {nbytes / 1e9:,.3g} GB for {what}, more than the "
                        f"{limit / 1e9:,.3g} GB of {where}: use a smaller size")


def check_model_fits(flag, cfg, bytes_per_param, what, shards=1):
    """check_fits for a model: bytes_per_param for each of its parameters (4 for float32
    weights; 16 with their gradients and AdamW's two moments), split over `shards` devices on an
    accelerator. A CPU's simulated devices all live in the host's memory: no split there. A
    lower bound (no activations), enough to refuse a model that cannot load before the host's
    out-of-memory killer ends the process without a word."""
    on_cpu = jax.devices()[0].platform == "cpu"
    check_fits(flag, bytes_per_param * cfg.param_count() / (1 if on_cpu else shards), what)


_MEASURED = {}


def measure_peaks(n=None, dtype="bfloat16"):
    """Achieved matmul FLOP/s (n x n x n in `dtype`, random inputs; the best of 5 samples, as a
    ceiling is what the device can do, so a sample slowed by another program does not lower it)
    and copy bandwidth (bytes read + written, in place, 1 GiB on an accelerator) on the default
    device: the ceilings to print measurements against when no datasheet fits. Cached per
    process."""
    on_cpu = jax.devices()[0].platform == "cpu"
    n = n or (1024 if on_cpu else 8192)
    ka, kb = jax.random.split(jax.random.key(0))
    if ("matmul", n, dtype) not in _MEASURED:
        a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
        b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
        t = bench(jax.jit(jnp.matmul), a, b, iters=5, warmup=2).min_s
        _MEASURED["matmul", n, dtype] = 2 * n**3 / t
    if "copy" not in _MEASURED:
        words = 2**25 if on_cpu else 2**28  # 128 MiB / 1 GiB of float32: past any cache
        _MEASURED["copy"] = copy_bandwidth(words)
    return {"matmul_flops": _MEASURED["matmul", n, dtype], "copy_bw": _MEASURED["copy"]}


def copy_bandwidth(words, iters=5, in_place=True):
    """Bytes/s, read + written, of x * 1.0001 over `words` float32.

    In place (the input donated, so the output takes its buffer) by default. An output in fresh
    memory also measures the operating system on a CPU: the first write to each new 4 KiB page
    faults, and the kernel maps and zeroes the page (one fault per page per call, 16,384 for 64
    MiB), which made the fresh-buffer copy about 10x slower than the in-place one on a 2-core
    server. A GPU's allocator hands back memory it already holds, so there the two agree."""
    # The values do not matter to a copy, so the arrays are filled, not drawn: drawing 64 MiB of
    # random numbers takes seconds on a CPU.
    if not in_place:
        xs = [(jnp.full((words,), i + 1.0, jnp.float32),) for i in range(2)]
        return 2 * 4 * words / bench(jax.jit(lambda x: x * 1.0001), arg_sets=xs,
                                     iters=iters).median_s
    scale = jax.jit(lambda x: x * 1.0001, donate_argnums=0)
    x = jnp.full((words,), 1.0, jnp.float32)
    return 2 * 4 * words / bench_in_place(scale, x, iters=iters).median_s


def bench_in_place(fn, state, iters=5, warmup=2):
    """bench for state = fn(state) with the state donated (jit(..., donate_argnums=...)): each
    call consumes the last one's output, so the runs are chained instead of repeated."""
    box = [state]

    def step():
        box[0] = fn(box[0])
        return box[0]
    return bench(step, iters=iters, warmup=warmup)


def ceilings(dtype="bfloat16"):
    """(peak FLOP/s, memory bytes/s, where they come from) for the default device: the datasheet
    when the chip is in CHIPS, else measured here (float32 matmuls on a CPU, whose bf16 is
    emulated). float32's peak is the matrix unit's at the default precision (TF32 on a GPU),
    which is how XLA runs a float32 product unless told otherwise."""
    chip = device_chip()
    if chip is not None:
        flops = {"float32": chip.tf32_flops, "float8_e4m3fn": chip.fp8_flops,
                 "float8_e5m2": chip.fp8_flops, "int8": chip.int8_ops}.get(str(dtype))
        return flops or chip.bf16_flops, chip.hbm_bw, f"{chip.name} datasheet"
    on_cpu = jax.devices()[0].platform == "cpu"
    m = measure_peaks(dtype="float32" if on_cpu else dtype)
    what = "float32 matmul " if on_cpu else ""
    return m["matmul_flops"], m["copy_bw"], f"{what}measured on {jax.devices()[0].device_kind}"



def peak_units(devices):
    """How many times one device's ceiling (ceilings) `devices` reach together: one per device
    on an accelerator. Simulated CPU devices are threads of their process's host, sharing its
    cores, and the host's ceiling is what ceilings measured: it counts once per process."""
    if devices[0].platform == "cpu":
        return len({d.process_index for d in devices})
    return len(devices)

# ----------------------------------------------------------------------------------------------
# Data: a text corpus, as bytes or a Hugging Face tokenizer's tokens
# ----------------------------------------------------------------------------------------------

def corpus_files(path=None):
    """The files load_corpus reads, in its order: `path` itself, the files under it (sorted), or
    with no path the .py files of the installed Python standard library."""
    if path is None:
        path = sysconfig.get_paths()["stdlib"]
        installed = {"site-packages", "dist-packages"}
        return sorted(f for f in glob.glob(os.path.join(path, "**", "*.py"), recursive=True)
                      if not installed & set(os.path.relpath(f, path).split(os.sep)))
    if os.path.isdir(path):
        return sorted(f for f in glob.glob(os.path.join(path, "**", "*"), recursive=True)
                      if os.path.isfile(f))
    if os.path.isfile(path):
        return [path]
    if os.path.exists(path):
        raise UserError(f"data path {path} is neither a file nor a directory")
    raise UserError(f"data path {path} does not exist")


def load_corpus(path=None, max_bytes=64 * 2**20, edges=False):
    """(train, val) uint8 token arrays of the first max_bytes of corpus_files(path). Default
    corpus: the .py files of the installed Python standard library (real text on every machine,
    the same for one Python version); the packages installed beside it (site-packages) are left
    out, so installing one changes nothing. A file is used whole; a directory is read file by
    file (sorted). Every 20th file by a name hash goes to validation; a single file is split
    95/5 instead. With edges=True each split comes as (bytes, edges): the sorted offsets where a
    document (a file) begins or ends, for `tokenize` to mark; a file cut short by max_bytes, or
    by the 95/5 split, has no end there, and the part after the cut no beginning."""
    files = corpus_files(path)
    path = path or sysconfig.get_paths()["stdlib"]
    train, val, total = [], [], 0  # (a file's bytes, whether they are the whole file)
    for f in files:
        with open(f, "rb") as fh:  # (read(n) allocates n bytes first: no more than the file)
            data = fh.read(min(max_bytes - total, os.fstat(fh.fileno()).st_size))
            whole = not fh.read(1)
        total += len(data)
        (val if zlib.crc32(os.path.relpath(f, path).encode()) % 20 == 0 else train).append(
            (data, whole))
        if total >= max_bytes:
            break
    if total == 0:
        raise UserError(f"data path {path} holds no data")
    (train, train_edges), (val, val_edges) = _joined(train), _joined(val)
    if len(files) == 1 or not val or not train:
        joined, cut = train + val, int((len(train) + len(val)) * 0.95)
        both = train_edges | {e + len(train) for e in val_edges}
        train, val = joined[:cut], joined[cut:]
        train_edges = {e for e in both if e <= cut}
        val_edges = {e - cut for e in both if e >= cut}
    train, val = np.frombuffer(train, np.uint8), np.frombuffer(val, np.uint8)
    if edges:
        return (train, sorted(train_edges)), (val, sorted(val_edges))
    return train, val


def _joined(files):
    """One split's bytes, and the offsets where its files begin and (read whole) end."""
    ends = itertools.accumulate(len(data) for data, _ in files)
    edges = {0} | {end for end, (_, whole) in zip(ends, files) if whole}
    return b"".join(data for data, _ in files), edges


def corpus_id(train, val):
    """A short fingerprint of a corpus's two splits: a checkpoint records it, so that a run
    resumed on other data (another file, another Python's standard library) says so."""
    return f"{len(train)}+{len(val)} bytes, crc32 {zlib.crc32(val, zlib.crc32(train)):08x}"


def get_batch(tokens, step, batch_size, seq_len, seed=0, process_index=0, process_count=1,
              doc_starts=None):
    """(x, y) int32 [batch_size / process_count, seq_len]: random windows of `tokens`, y shifted
    by one. The windows are a pure function of (seed, step), so a resumed run sees exactly the
    data it would have seen, and each process draws only its own rows of the global batch.
    With doc_starts (sorted offsets where a document begins) also x's segment ids: positions
    of one document share an id, so attention can be kept within each document (lesson 04)."""
    if len(tokens) < seq_len + 1:
        raise UserError(f"the data holds {len(tokens)} tokens, fewer than seq_len+1={seq_len + 1}")
    if batch_size % process_count:
        raise UserError(f"batch_size={batch_size} does not split over {process_count} processes")
    # A window of seq_len + 1 tokens starts anywhere up to len - seq_len - 1, the last included.
    starts = np.random.default_rng([seed, step]).integers(0, len(tokens) - seq_len, batch_size)
    per = batch_size // process_count
    starts = starts[process_index * per:(process_index + 1) * per]
    idx = starts[:, None] + np.arange(seq_len + 1)
    win = tokens[idx].astype(np.int32)
    if doc_starts is None:
        return win[:, :-1], win[:, 1:]
    seg = np.searchsorted(doc_starts, idx[:, :-1], side="right").astype(np.int32)
    return win[:, :-1], win[:, 1:], seg


def byte_tokenizer_json():
    """The byte-level tokenization these models train on (token id = byte value) as a Hugging
    Face tokenizer.json, for models exported with save_hf_llama. The `tokenizers` package's
    ByteLevel step maps each byte to a printable character (GPT-2's table: the printable bytes
    stand for themselves, the rest take the characters from U+0100 on); a BPE vocabulary of
    those 256 characters with no merges then gives each byte its own id."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = (b for b in range(256) if b not in printable)
    char = {b: chr(b) for b in printable} | {b: chr(0x100 + i) for i, b in enumerate(others)}
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": False}  # the text as one piece: no splitting at spaces
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None, "pre_tokenizer": byte_level, "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": {char[b]: b for b in range(256)}, "merges": []}}


class Tokenizer(typing.NamedTuple):
    """Text to token ids and back: BYTES, or a tokenizer.json through load_tokenizer."""
    encode: typing.Callable   # text -> ids, with the tokenizer's special tokens (a BOS)
    decode: typing.Callable   # ids -> text
    stop: tuple = ()          # the ids that end an answer (the checkpoint's end of sequence)
    spec: typing.Any = None   # its tokenizer.json, as a dict: what checkpoints and exports carry
    encode_text: typing.Callable = None   # [text] -> [ids], no special tokens: training data
    size: int = 256           # its ids run from 0 to size - 1: the smallest vocabulary that fits


def _bytes_of(text):
    # surrogateescape: a prompt given as bytes that are not UTF-8 is read as those bytes
    return list(text.encode("utf-8", "surrogateescape"))


BYTES = Tokenizer(_bytes_of, lambda ids: bytes(int(i) for i in ids if i < 256).decode(
    "utf-8", "replace"), spec=byte_tokenizer_json(),
    encode_text=lambda texts: [_bytes_of(t) for t in texts])


def load_tokenizer(path):
    """The tokenizer.json of a directory (a Hugging Face checkpoint, or one of 09's) through the
    `tokenizers` package; the byte-level one (byte_tokenizer_json) needs no package."""
    file = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
        raise UserError(f"{path} has no tokenizer.json")
    spec = read_json(file)
    if spec == BYTES.spec:
        return BYTES
    try:
        import tokenizers
    except ImportError:
        raise UserError("reading a Hugging Face tokenizer needs the `tokenizers` package: "
                        "pip install tokenizers") from None
    try:
        tok = tokenizers.Tokenizer.from_str(json.dumps(spec))
    except Exception as e:  # the package raises its own errors, of no common base class
        raise UserError(f"{file} cannot be read by tokenizers ({e})") from None

    def encode(text):
        try:
            return tok.encode(text).ids
        except Exception as e:
            raise UserError(f"the tokenizer cannot encode {text[:40]!r} ({e})") from None

    def encode_text(texts):
        """In parallel, in the package's threads. Training data are text: a special token's name
        in them ("<|end_of_text|>" in a file about tokenizers) is encoded as the characters it
        is, as Meta's Llama 3 tokenizer encodes text, not as the token (a prompt's is)."""
        tok.encode_special_tokens = True
        try:
            return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]
        finally:
            tok.encode_special_tokens = False
    size = max(tok.get_vocab(with_added_tokens=True).values(), default=-1) + 1
    return Tokenizer(encode, lambda ids: tok.decode(list(ids)), eos_token_ids(path), spec,
                     encode_text, size)


def eos_token_ids(path):
    """A Hugging Face checkpoint's end-of-sequence ids: generation_config.json's eos_token_id
    (an id or a list; instruction-tuned Llamas end a turn with one and a text with another),
    else config.json's."""
    for name in ("generation_config.json", "config.json"):
        try:
            with open(os.path.join(path, name)) as f:
                eos = json.load(f).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue
        if eos is not None:
            ids = eos if isinstance(eos, list) else [eos]
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise UserError(f"{os.path.join(path, name)}: eos_token_id={eos!r} is "
                                f"not a token id or a list of them")
            return tuple(ids)
    return ()


def tokenize(tokenizer, data, edges=None, piece_chars=2**20):
    """int32 token ids of `data` (uint8 bytes, load_corpus's) through `tokenizer`. Bytes stay as
    they are. Through a checkpoint's tokenizer, each document that begins or ends at one of
    `edges` (byte offsets, load_corpus's) is marked as the model saw documents in pretraining:
    it begins with the ids the tokenizer puts before any text (Llama's BOS) and ends with the
    checkpoint's first end-of-sequence id; a model fine-tuned on files run together would learn
    to go on from one into the next instead of ending. Given edges, returns (ids, the edges as
    offsets into the ids).

    The text is encoded in pieces of about piece_chars characters, in parallel (one call on a
    whole text runs on one thread: 5-7x slower on 16 cores). The ids are the whole text's:
    pieces are cut where the tokenizer splits anyway, and each cut is checked (the text around
    it must encode as its two sides do). Byte-level BPEs (GPT-2's, Llama 3's) split before a
    line's text and before a space. Llama 2's tokenizer prepends a word start to all it encodes,
    so its pieces are cut at a space, which is left out to be put back. If no way of cutting
    holds, the document is encoded in one call."""
    if tokenizer is BYTES:
        ids = np.asarray(data, np.int32)
        return ids if edges is None else (ids, sorted(edges))
    data, marked = bytes(data), set(edges or ())
    begin, end = tokenizer.encode(""), list(tokenizer.stop[:1])
    bounds = sorted(marked | {0, len(data)})
    texts = [data[a:b].decode("utf-8", "replace") for a, b in zip(bounds, bounds[1:])]
    spans = [_pieces(tokenizer, text, piece_chars) for text in texts]
    ids = iter(tokenizer.encode_text([t[a:b] for t, s in zip(texts, spans) for a, b in s]))
    out, n, at = [], 0, {}  # at: each bound's offset into the ids (a document's at its BOS)
    for a, b, pieces in zip(bounds, bounds[1:], spans):
        at[a] = n
        part = [begin] * (a in marked) + [next(ids) for _ in pieces] + [end] * (b in marked)
        out += part
        n += sum(map(len, part))
    at[len(data)] = n
    ids = np.fromiter(itertools.chain.from_iterable(out), np.int32, n)
    return ids if edges is None else (ids, sorted(at[e] for e in marked))


def _pieces(tokenizer, text, piece_chars):
    """(start, end) of the pieces `text` is encoded in: cut by the first of _CUTS that holds."""
    for where in _CUTS if len(text) > piece_chars else ():
        cuts, at = [], 0  # (end of a piece, start of the next)
        while (cut := where.search(text, at + piece_chars)) is not None:
            cuts.append(cut.span())
            at = cut.end()
        if _cuts_hold(tokenizer, text, cuts):
            break
    else:
        cuts = []
    return list(zip([0] + [b for _, b in cuts], [a for a, _ in cuts] + [len(text)]))


_CUTS = (re.compile(r"(?<=\S\n)(?=\S)"),  # before a line's text, after a line's text
         re.compile(r"(?<=\S)(?= \S)"),    # before a space between words
         re.compile(r"(?<=\S) (?=\S)"))    # a space between words, left out


def _cuts_hold(tokenizer, text, cuts, w=256):
    """Whether the text w characters each side of every cut encodes as its two sides do."""
    ids = tokenizer.encode_text([text[max(a - w, 0):b + w] for a, b in cuts]
                                + [text[max(a - w, 0):a] for a, _ in cuts]
                                + [text[b:b + w] for _, b in cuts])
    n = len(cuts)
    return all(ids[i] == ids[n + i] + ids[2 * n + i] for i in range(n))


# ----------------------------------------------------------------------------------------------
# Lessons are digit-named files; this imports one as a module
# ----------------------------------------------------------------------------------------------

def import_script(name):
    """import_script("05_flash_attention") -> that lesson's module (loaded once)."""
    if name in sys.modules:
        return sys.modules[name]
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), name + ".py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
