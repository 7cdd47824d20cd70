"""Inference: a KV cache, batching, continuous batching, int8 and speculative decoding, each
measured against the memory-bandwidth bound that rules decode.

    python 06_kv_cache_inference.py                     # on a GPU: the benchmark, Llama-3-8B
                                                        # then Llama-3.2-1B shapes (speeds only),
                                                        # random bf16 weights
    python 06_kv_cache_inference.py                     # on a CPU: the newest checkpoint of
                                                        # 09_train.py in out/ or out/*/, else
                                                        # `small`
    python 06_kv_cache_inference.py --checkpoint=DIR    # a Hugging Face Llama directory (with
                                                        # its tokenizer.json), or 09's out_dir
                                                        # (bytes, or the tokenizer it carries)
    python 06_kv_cache_inference.py --prompt="def " --temperature=0.8 --top_p=0.95
    python 06_kv_cache_inference.py --checkpoint=DIR --sample_only=true --prompt="Once upon"
    python 06_kv_cache_inference.py --checkpoint=DIR --draft=SMALLER_DIR   # speculative
                                                        # decoding with a smaller model as draft

What the lesson shows, in the order main() prints it:
  1. The arithmetic. A decode step makes one token per sequence, so it multiplies each weight once
     per sequence: 2 FLOPs per 2 bytes read at batch 1. On a GPU that does ~300 FLOPs in the time it
     reads one byte, decode is bound by memory bandwidth, and the shortest step is (weight bytes +
     batch x KV bytes) / bandwidth. Decode turns compute-bound only near the batch where 2N x B
     FLOPs take as long as reading the weights; prefill, which multiplies each weight by P prompt
     tokens, is compute-bound. For P + G tokens, time ~ P x 2N / FLOPS + (G - 1) x W / BW
     (W = 2N bytes in bf16; the prefill makes the first of the G tokens). The third
     limit is capacity: the weights and every sequence's KV cache must fit in memory, and at long
     contexts that caps the batch below the compute-bound one. Per layer, the lecture's [prefill,
     decode] x [attention, FFN]: batching lifts decode's FFN toward the ridge point, never its
     attention, whose KV bytes grow with the batch as its FLOPs do.
  2. The KV cache (Pope et al. 2022, "Efficiently Scaling Transformer Inference", section 2):
     the keys and values of past tokens are kept, so a step computes one token's projections
     instead of the whole prefix's. It costs 2 x layers x kv_heads x head_dim x bytes per token
     (grouped-query attention, Ainslie et al. 2023, divides it by n_heads / n_kv_heads). Writes
     are dynamic_update_slice; the decode step is compiled once and donates the cache, so XLA
     updates it in place. Prompts of different lengths share one batch: each row keeps its own
     length and rows attend only to their own past.
  3. Batching: at batch B the same weight bytes serve B tokens, so throughput grows ~B-fold
     until the KV reads (or the FLOPs) catch up.
  4. Continuous batching (Orca, Yu et al. 2022, "iteration-level scheduling"): a fixed number of
     cache slots; a finished request frees its slot at once and the next request's prefill is
     inserted between decode steps. Static batching keeps every slot busy until the longest
     request of its batch ends. Time to first token (TTFT) and time per output token (TPOT)
     are printed per request and in aggregate for both, on the same request stream. Two things
     make the scheduler fast, and both policies share them: the requests admitted at one moment
     are prefilled in one call, scattered into whichever slots are free; and the host does not
     read each step's tokens before launching the next (that round trip idles the GPU every
     step): the steps up to the next finish run in one call, a loop on the device that ends
     when a request reaches its length or makes a stop token (a tokenizer's end of sequence),
     and their tokens are fetched once.
  5. int8: weight-only int8 with one scale per output channel (as gpt-fast's quantize.py; LLM.int8,
     Dettmers et al. 2022, scales weights the same way but quantizes the activations too) halves the
     bytes a step reads; an int8 KV cache with one scale per token and head, the simplest scheme
     (KIVI, Liu et al. 2024, and KVQuant, Hooper et al. 2024, find keys quantize better per
     channel), halves the cache, which pays where the cache outweighs the weights: long contexts at
     large batches (lesson 08's kernel reads it as int8). Their cost is measured as logit error and
     greedy agreement with the unquantized model, teacher-forced on the same tokens. Halving the
     weight bytes does not halve a batch-1 step: its small kernels (norms, rope, cache writes,
     residual adds) take as long as before, and a matrix of a few tens of MB loses a few
     microseconds per product to kernel ramp-up, which matters more once its bytes stream twice as
     fast (section 7 and BENCHMARKS.md: about 1.5x on an H200 and 1.6x on an H100, where the bytes
     say 2x).
  6. Speculative decoding (Leviathan et al. 2023; Chen et al. 2023): a cheap draft proposes
     gamma tokens, the target checks them all in one step (as memory-bound as a one-token step),
     and keeps the longest agreeing prefix plus its own next token: greedy output is exactly the
     target's (sampling keeps each draft token with chance min(1, p/q) and so draws exactly the
     target's distribution). How many tokens a round keeps decides where the next round starts, so
     the rounds loop on the device (lax.while_loop): a loop on the host would wait for every round's
     answer. The draft here is the target's own weights in int8 (optionally its first N layers, an
     early exit as in LayerSkip, Elhoushi et al. 2024): with random weights no smaller trained model
     exists that could agree with the target. With real checkpoints, --draft=DIR takes a smaller
     model with the same tokenizer (Llama-3.2-1B for Llama-3.1-8B). The speedup is tokens per round
     over a round's cost in target steps: gamma + 1 draft steps, each far dearer than its share of
     the bytes, plus a verification that costs more than one step.
  7. Where a batch-1 step's time goes, from the device's own kernel timings: the weight
     products against the bytes they read and against the same bytes streamed by one product
     (each product kernel pays a few microseconds to ramp up and drain, which costs an int8
     step more than a bf16 one), and the eight or so small kernels per layer around
     them (norms, rope, cache writes, residual adds), each costing a microsecond or more
     whatever it reads. An int8 step has two more per layer: XLA splits the int8 products of
     wo and w_down over K, and their partial sums meet the residual in a kernel of their own.
     At batch 1 the small kernels, not the products, keep a step from the bandwidth bound,
     and the step is built to have few of them: the norms' weights folded into the next
     matrices (fold_norm), and independent kernels run side by side (DECODE_COMPILER_OPTIONS).
     The products themselves are written for one row: a one-row product is a matrix-vector
     product, and an elementwise multiply and a sum along the rows of an output-major matrix
     streams it faster than a matrix multiply kernel does (ROW_SUM_MAX; XLA's GPU compiler
     makes the same rewrite for small matrices; down the columns of an input-major matrix the
     same sum is up to 4x slower).
     The host pays for every call: dispatching a step's few hundred arrays took 0.4-1.1 ms (H200
     host), as long as a small model's step on a GPU. decode_steps runs several steps in one call,
     and the lesson times it beside one step per call; generate and the serving loops run every step
     up to the next change of their batch in one call (decode_loop, a lax.while_loop that decides on
     the device when to stop).

Lesson 08's Pallas kernels plug in at two seams: its flash-decoding kernel as the
`decode_attention` argument of forward_cached / generate / the serving loops
(`pallas_decode_attention`), and its int8 matmul inside `linear` for int8 weights routed to it
(`with_int8_kernel`). On a GPU the lesson measures the decode step with both, and generate,
the serving loops and speculative_generate take the flash-decoding kernel by default
(default_decode_attention); the lesson's own timings name the attention they use.
"""
import collections
import dataclasses
import functools
import json
import math
import os
import re
import time
import typing

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import common


@dataclasses.dataclass(frozen=True)
class InferConfig:
    checkpoint: str = ""        # a Hugging Face Llama dir, or 09_train.py's ckpt_<step> or out_dir
    ckpt_dir: str = ""          # 09_train.py's --out_dir or one ckpt_<step>, read without
                                # --checkpoint (on a GPU: if named, or with --sample_only); one
                                # named that holds none is an error; empty: out, or the run
                                # in out/*/ saved last
    models: str = "auto"        # comma-separated presets with random weights; auto: on a GPU
                                # llama-3-8b,llama-3.2-1b (the benchmark), else the newest 09
                                # checkpoint or `small` (--sample_only: the checkpoint only)
    prompt: str = "def fibonacci(n):\n"   # the sample's prompt (models with a tokenizer or bytes);
                                # on the command line \n, \t and \\ are a newline, tab, backslash
    max_new_tokens: int = 64    # the sample's length, at most (a checkpoint's EOS ends it)
    temperature: float = 0.0    # the sample's; > 0 also times speculative sampling; 0: greedy
    top_k: int = 0              # sample among the k most likely tokens; 0: all
    top_p: float = 1.0          # nucleus sampling mass; 1: all
    seed: int = 0               # of random weights, prompts and sampling
    prompt_len: int = 0         # end-to-end prompt tokens; 0: 256 on a GPU, 64 on a CPU
    gen_len: int = 0            # end-to-end generated tokens; 0: 128 on a GPU, 32 on a CPU
    cache_len: int = 0          # positions per cache row; 0: the least power of 2 >= 128 that
                                # holds prompt_len + gen_len - 1 + gamma (a speculative round),
                                # the request stream's longest, prompt_len / 2 + 2 x gen_len - 1
                                # (both of the first model only), and the timed steps,
                                # prompt_len + max(12, steps) + 3 x max(steps, 8)
    batch: int = 0              # the large decode batch, against batch 1; 0: 64 on a GPU,
                                # 16 on a CPU
    slots: int = 0              # continuous batching slots; 0: 16 on a GPU, 4 on a CPU
    requests: int = 0           # requests in the stream; 0: 3 x slots
    gamma: int = 4              # speculative decoding: draft tokens proposed per round
    draft_layers: int = 0       # the draft: the target's first N layers in int8; 0: all layers
    draft: str = ""             # instead, a smaller model as the draft: a directory as
                                # --checkpoint takes, with the target's tokenizer
    steps: int = 0              # decode steps per timed run; 0: 32 on a GPU, 8 on a CPU
    sample_only: bool = False   # only continue --prompt (the sampling flags and --draft apply),
                                # no lesson

    def __post_init__(self):
        for f in ("max_new_tokens", "top_k", "prompt_len", "gen_len", "cache_len", "batch",
                  "slots", "requests", "draft_layers", "steps", "seed"):
            if getattr(self, f) < 0:
                raise common.UserError(f"{f} must be >= 0, got {getattr(self, f)}")
        if self.gamma < 1:
            raise common.UserError(f"gamma must be >= 1, got {self.gamma}")
        if not 0 <= self.temperature < math.inf:
            raise common.UserError(f"temperature must be a finite number >= 0, got "
                                   f"{self.temperature}")
        if not 0 < self.top_p <= 1:
            raise common.UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.draft and self.draft_layers:
            raise common.UserError("give --draft (a draft model) or --draft_layers (the target's "
                                   "own layers as the draft), not both")
        if self.sample_only and self.draft_layers:
            raise common.UserError("--sample_only drafts with --draft (a smaller model); "
                                   "draft_layers is the lesson's own draft")
        if self.models != "auto" and self.checkpoint:
            raise common.UserError("give --checkpoint (its weights) or --models (random weights of "
                                   "these shapes), not both")
        if self.ckpt_dir and (self.models != "auto" or self.checkpoint):
            raise common.UserError("--ckpt_dir picks 09_train.py's newest checkpoint: give it "
                                   "alone, not with --models or --checkpoint")
        if self.models != "auto":
            names = [m for m in self.models.split(",") if m]
            if not names or set(names) - set(common.PRESETS):
                raise common.UserError(f"models={self.models!r}: expected auto or presets from "
                                       f"{', '.join(common.PRESETS)}, comma-separated")


# ----------------------------------------------------------------------------------------------
# Parameters for inference: per-layer buffers, the output head as [V, D], optionally int8
# ----------------------------------------------------------------------------------------------

# The contracted (input) axes of each matrix; a scale is kept per remaining (output) channel.
CONTRACTED = {"wqkv": (0,), "wo": (0, 1), "w_gate_up": (0,), "w_down": (0,)}

# A product with one row is a matrix-vector product: each output is the dot of the row with one
# row of an output-major [N, K] matrix, contiguous bytes, and the fastest way to stream such a
# bf16 weight is to write the product so, as an elementwise multiply and a sum along those rows.
# On an H200 at the four Llama-3-8B layer shapes the sum reads the weight at 95-110% of copy
# bandwidth, against 81-103% for XLA's matrix multiply kernel fed the row and a zero second
# row (and a one-row matmul is slower still). XLA's GPU compiler itself rewrites a one-row
# product with a matrix of fewer values than ROW_SUM_MAX into such a multiply and sum
# (ShouldStrengthReduceDotToReduce). For int8 weights the sum is the faster form only that
# small: on the large matrices widening each byte costs more than streaming it (62-78% of copy
# bandwidth against 76-87% for the matmul), so there a row of int8 products travels with a
# zero second row (forward_cached), which keeps them matrix multiplies.
ROW_SUM_MAX = 10_000_000


def fold_norm(g, w):
    """rms_norm(x, g) @ w = (x @ (g[:, None] * w)) / rms(x): the norm's weight scales the rows of
    the matrix after it (contracted axis first), and 1/rms(x), one number per token, scales the
    product's output instead of its input. A decode step then needs no kernel that writes the
    normalised activation before each matrix: the sum of squares runs beside the matmul and the
    scaling joins whatever elementwise kernel reads the product (rope, the cache write, SiLU)."""
    scale = g.astype(jnp.float32).reshape((-1,) + (1,) * (w.ndim - 1))
    return (scale * w.astype(jnp.float32)).astype(w.dtype)


def output_major(w, axes):
    """A matrix whose contracted axes `axes` lead (as common's params store them) -> [output
    dims..., K]: one output channel per row, as a linear layer of PyTorch or a Hugging Face
    checkpoint stores it."""
    n_in = len(axes)
    K = math.prod(w.shape[:n_in])
    return w.reshape(K, -1).T.reshape(w.shape[n_in:] + (K,))


def inference_params(params, cfg):
    """common's params -> the layout the decode step reads. `layers` is a list of per-layer
    dicts, so that each weight is its own buffer, read once per step (slicing a stacked [L, ...]
    array inside the step would copy it). The q, k and v projections are one matrix wqkv
    [D, H + 2 KH, Dh] and the gate and up projections one w_gate_up [D, 2, F], as gpt-fast's
    wqkv and vLLM's merged linears: at batch 1 a matmul is a stream of its weight, and fewer,
    longer streams lose less to kernel launches and ramp-up. The RMSNorm weight before each of
    the two is folded into its rows (fold_norm). Every matrix is stored output-major, as
    {"t": [output dims..., K]}, the layout in which a one-row product reads it fastest
    (ROW_SUM_MAX); `head` is {"t": [V, D]} (the embedding table itself when tied). Params
    already in this layout pass through."""
    if "head" in params:
        if (len(params["layers"]) != cfg.n_layers
                or np.shape(params["embed"]) != (cfg.vocab_size, cfg.d_model)):
            raise common.UserError(f"the params do not match the config: {len(params['layers'])} "
                                   f"layers and an embedding of {np.shape(params['embed'])}, "
                                   f"the config's are {cfg.n_layers} and "
                                   f"{(cfg.vocab_size, cfg.d_model)}")
        return params
    common.check_params(params, cfg)

    def layer(i):
        p = jax.tree.map(lambda w: w[i], params["layers"])
        wqkv = jnp.concatenate([p["wq"], p["wk"], p["wv"]], axis=1)
        w_gate_up = jnp.stack([p["w_gate"], p["w_up"]], axis=1)
        ws = {"wqkv": fold_norm(p["attn_norm"], wqkv), "wo": p["wo"],
              "w_gate_up": fold_norm(p["mlp_norm"], w_gate_up), "w_down": p["w_down"]}
        return {k: {"t": output_major(w, CONTRACTED[k])} for k, w in ws.items()}

    return {"embed": params["embed"], "final_norm": params["final_norm"],
            "layers": [layer(i) for i in range(cfg.n_layers)],
            "head": {"t": params["embed"] if cfg.tie_embeddings else params["lm_head"].T}}


@functools.partial(jax.jit, static_argnums=1)
def quantize_int8(w, axes):
    """Symmetric int8 with one float32 scale per output channel: the largest |w| over the
    contracted axes maps to 127. w ~ q * scale, |w - q * scale| <= scale / 2."""
    wf = w.astype(jnp.float32)
    scale = jnp.max(jnp.abs(wf), axis=axes) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    q = jnp.clip(jnp.round(wf / jnp.expand_dims(scale, axes)), -127, 127).astype(jnp.int8)
    return {"q": q, "scale": scale}


def quantize_params(params, cfg):
    """int8 weight-only copy of inference params: every matrix a step streams (the layers and the
    head) becomes {"qt": int8 [N, K], "scale": float32 [output dims]}, output-major (one output
    channel per row, its bytes contiguous), the layout in which XLA's products with int8 weights
    ran fastest at every Llama shape measured, and the one lesson 08's int8 kernel reads. Norms
    and the embedding table (one row read per token) stay as they are. Params quantized already
    pass through."""
    params = inference_params(params, cfg)
    if "t" not in params["head"]:   # quantized already
        return params

    def q(w):
        t = w["t"]
        qw = quantize_int8(t.reshape(-1, t.shape[-1]), (1,))
        return {"qt": qw["q"], "scale": qw["scale"].reshape(t.shape[:-1])}
    layers = [{k: q(w) if k in CONTRACTED else w for k, w in p.items()}
              for p in params["layers"]]
    return {**params, "layers": layers, "head": q(params["head"])}  # [V, D]


def draft_params(params, cfg, n_layers):
    """The speculative draft: the first n_layers of the target (all when 0), int8, sharing its
    embedding, final norm and vocabulary."""
    n = n_layers or cfg.n_layers
    if n > cfg.n_layers:
        raise common.UserError(f"draft_layers={n} exceeds the model's {cfg.n_layers} layers")
    ip = inference_params(params, cfg)
    small = {**ip, "layers": ip["layers"][:n]}
    dcfg = dataclasses.replace(cfg, n_layers=n)
    return quantize_params(small, dcfg), dcfg


def weight_bytes(params):
    """Bytes of weights one decode step reads: every layer, the final norm and the output head
    (of the embedding table only one row per token, left out)."""
    leaves = jax.tree.leaves((params["layers"], params["final_norm"], params["head"]))
    return sum(x.size * x.dtype.itemsize for x in leaves)


def with_int8_kernel(qparams):
    """int8 params (quantize_params) routed to lesson 08's int8 matmul kernel for decode's few
    rows: the same [N, K] bytes under the key "qt_pallas"."""
    def route(w):
        return {"qt_pallas": w["qt"], "scale": w["scale"]}
    layers = [{k: route(w) if k in CONTRACTED else w for k, w in p.items()}
              for p in qparams["layers"]]
    return {**qparams, "layers": layers, "head": route(qparams["head"])}


def _kernels():
    return common.import_script("08_pallas_kernels")


def _interpret():
    return jax.devices()[0].platform == "cpu"  # a CPU runs Pallas kernels interpreted


def linear(eq, x, w, out_dtype=None, pad_rows=0):
    """x times an output-major weight, contracted as `eq` says: {"t": [output dims..., K]} in
    x's dtype, or int8 {"qt": [N, K], "scale": [output dims]} (widened to x's dtype inside the
    product, the per-channel scale applied to the result, so the weight crosses memory as 1
    byte per value), or int8 {"qt_pallas", "scale"}, whose few rows of a decode step (up to 32)
    go through lesson 08's int8 matmul kernel instead. One row is a multiply and a sum
    (ROW_SUM_MAX), more rows a matrix multiply.
    pad_rows: the last pad_rows entries of x's leading axis are zeros that keep a one-row int8
    product a matrix multiply (forward_cached at batch 1); the result keeps them."""
    with jax.named_scope("linear"):  # how weight_kernels finds these products in a profile
        return _linear(eq, x, w, out_dtype, pad_rows)


def _linear(eq, x, w, out_dtype, pad_rows):
    out_dtype = out_dtype or x.dtype
    lead = _lead(eq, x)
    wt = w.get("t", w.get("qt", w.get("qt_pallas")))
    out_dims = w["scale"].shape if "scale" in w else wt.shape[:-1]
    K = wt.shape[-1]
    x2, wt = x.reshape(-1, K), wt.reshape(-1, K)                          # [M, K], [N, K]
    M = x2.shape[0]
    # Decode's few rows take 08's kernel; from 64 rows XLA's widening matmul is faster (08's
    # sweep on an H200: 46 us against 38 per 8192 x 8192 weight at M = 64; the kernel beats
    # bf16 up to 32 rows, and XLA's int8 product at 1, 8 and 16).
    if "qt_pallas" in w and M <= 32:
        y = _kernels().int8_matmul(x2, wt, w["scale"].reshape(-1), interpret=_interpret())
        return y.reshape(lead + out_dims).astype(out_dtype)
    if M - pad_rows * (M // lead[0]) == 1 and ("t" in w or wt.size < ROW_SUM_MAX):
        # float32 products of the bf16 values summed in float32, as a matmul accumulates them
        y = jnp.sum(x2[:1].astype(jnp.float32) * wt.astype(jnp.float32), axis=1)[None]
    else:
        # Several rows; or an int8 row with its zero second row (pad_rows, or added here).
        xp = jnp.concatenate([x2, jnp.zeros_like(x2)]) if M == 1 else x2
        y = jnp.dot(xp, wt.astype(x.dtype).T, preferred_element_type=jnp.float32)[:M]
    if "scale" in w:
        y = y * w["scale"].reshape(-1)
    y = jnp.pad(y, ((0, M - y.shape[0]), (0, 0)))              # the padding rows, back as zeros
    return y.reshape(lead + out_dims).astype(out_dtype)


def weight_kernels(compiled_text):
    """The device kernels of a compiled step (its HLO text) that compute `linear`'s products,
    named as a profile names them: the fusions traced inside the "linear" scope that are not
    elementwise (XLA's kLoop: the scale, the padding) but a reduction or a matmul. A one-row
    product's sum is a kernel named like a norm's sum of squares; only its scope tells them
    apart."""
    names = set()
    for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = [^\n]*? fusion\([^\n]*?"
                         r"kind=k(?!Loop)\w+[^\n]*?op_name=\"[^\"]*/linear/[^\n]*", compiled_text,
                         re.M):
        dedup = re.search(r'deduplicated_name="([^"]*)"', m.group(0))
        names |= {n.replace(".", "_") for n in (m.group(1), dedup and dedup.group(1)) if n}
    return names


def _lead(eq, x):
    """x's dims that the product in `eq` keeps (each eq here contracts x's trailing dims): their
    product is the number of rows the matrix multiply sees."""
    ins, out = eq.split("->")
    return x.shape[:sum(c in out for c in ins.split(",")[0])]


# ----------------------------------------------------------------------------------------------
# The KV cache
# ----------------------------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("cfg", "batch", "max_len", "kv_int8"))
def init_cache(cfg, batch, max_len, kv_int8=False):
    """Per layer, keys and values [batch, KH, max_len, Dh] (one buffer each, donated and updated
    in place), and the number of valid positions of each row, `lengths` [batch]. Heads before
    positions: attention is then a matmul batched over (batch, kv head) whose operands are
    contiguous [max_len, Dh] blocks, read as they lie, with no transposed copy of the cache.
    With kv_int8 the values are int8 with a float32 scale per token and head, [batch, KH,
    max_len]. Compiled, so that its 2 x layers buffers cost one call: made one jnp.zeros at a
    time they took 18 ms on a GPU host, more than twice a Llama-3-8B prefill of 256 tokens."""
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)
    L = cfg.n_layers
    if kv_int8:
        zeros = lambda: [jnp.zeros(shape, jnp.int8) for _ in range(L)]
        ones = lambda: [jnp.ones(shape[:3], jnp.float32) for _ in range(L)]  # [B, KH, S]
        cache = {"k": zeros(), "v": zeros(), "k_scale": ones(), "v_scale": ones()}
    else:
        cache = {n: [jnp.zeros(shape, cfg.dtype) for _ in range(L)] for n in ("k", "v")}
    cache["lengths"] = jnp.zeros((batch,), jnp.int32)
    return cache


def kv_bytes_per_token(cfg, kv_int8=False):
    if kv_int8:  # 1 byte per value plus a float32 scale per head
        return 2 * cfg.n_layers * cfg.n_kv_heads * (cfg.head_dim + 4)
    return cfg.kv_bytes_per_token(jnp.dtype(cfg.dtype).itemsize)


def quantize_kv(x):
    """x [..., Dh] -> int8 values and float32 scales [...]: one scale per token and head, so a
    new token is quantized alone and cached values never need rescaling."""
    xf = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(xf), axis=-1) / 127.0
    scale = jnp.where(scale == 0, 1.0, scale)
    return jnp.clip(jnp.round(xf / scale[..., None]), -127, 127).astype(jnp.int8), scale


def _copy(cache):
    return {n: list(c) if isinstance(c, list) else c for n, c in cache.items()}


def _write(cache, i, k, v, write):
    """Store layer i's new keys and values [B, T, KH, Dh] with write(buffer, values [B, KH, T,
    Dh]), quantized when the cache is int8."""
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    if "k_scale" in cache:
        (k, ks), (v, vs) = quantize_kv(k), quantize_kv(v)
        cache["k_scale"][i] = write(cache["k_scale"][i], ks)
        cache["v_scale"][i] = write(cache["v_scale"][i], vs)
    cache["k"][i] = write(cache["k"][i], k)
    cache["v"][i] = write(cache["v"][i], v)
    return cache


def write_at_lengths(buf, new, start):
    """buf [B, KH, S, ...] <- new [B, KH, T, ...] at positions start[b] .. start[b]+T-1 of each
    row: one dynamic_update_slice per row (vmap makes them a single scatter, in place on a
    donated cache). A single row is written by a plain dynamic_update_slice: the vmapped form
    adds a kernel that checks the bounds. Past the end (start[b] + T > S) dynamic_update_slice
    moves the write back to fit, over the row's last cached positions: callers keep room."""
    if buf.shape[0] == 1:
        return lax.dynamic_update_slice_in_dim(buf, new.astype(buf.dtype), start[0], axis=2)
    def row(b, x, s):
        return lax.dynamic_update_slice_in_dim(b, x.astype(b.dtype), s, axis=1)
    return jax.vmap(row)(buf, new, start)


def write_at_slots(buf, new, slots):
    """buf [B, KH, S, ...] <- new [b, KH, T, ...] at positions 0..T-1 of rows slots[0..b-1] (a
    prefill): one scatter, in place on a donated cache. The rows may be in any order and apart
    (the free slots of a serving cache seldom sit side by side); a slot >= B writes nothing
    (mode="drop"), which is how a batch padded with dummy rows leaves the cache alone. Not -1:
    indexing wraps negative indices to the last row before it checks the bounds."""
    return buf.at[slots, :, :new.shape[2]].set(new.astype(buf.dtype), mode="drop")


def pallas_decode_attention(q, k, v, lengths, k_scale=None, v_scale=None):
    """Lesson 08's flash-decoding kernel, for one new token per row: it reads each row's cache
    only up to its length, an int8 cache as int8 (widened on chip). Speculative verification
    (T > 1) takes the reference."""
    if q.shape[1] != 1:
        return decode_attention_reference(q, k, v, lengths, k_scale, v_scale)
    return _kernels().decode_attention(q[:, 0], k, v, lengths, k_scale, v_scale,
                                       interpret=_interpret())[:, None]


def default_decode_attention(cfg):
    """What generate, the serving loops and speculative_generate use when given no decode_attention:
    on a GPU, lesson 08's flash-decoding kernel for a bf16 model whose head size it tiles (a power
    of two, 16..256), which reads each row's cache only up to its length where the reference reads
    all of it: a decode step 1.03-1.06x faster at batch 1 (Llama-3 8B and 3.2 1B shapes, H100 and
    H200; 1.45x in one 1B run) and 1.06x at batch 64 (8B, H200), 256-token contexts, more as the
    cache grows. Otherwise the reference (on a CPU the kernel would run interpreted)."""
    D = cfg.head_dim
    if _interpret() or jnp.dtype(cfg.dtype) != jnp.bfloat16 or D & (D - 1) or not 16 <= D <= 256:
        return decode_attention_reference
    return pallas_decode_attention


def decode_attention_reference(q, k, v, lengths, k_scale=None, v_scale=None):
    """Attention of each row's T newest tokens to its cache. q [B, T, H, Dh] sits at positions
    lengths-T .. lengths-1; k, v [B, KH, S, Dh] hold each row's first `lengths` positions (the
    rest is stale and masked). int8 caches come with scales [B, KH, S]: the key scale multiplies
    the scores, the value scale the probabilities, so neither int8 array is rescaled.
    Every position of the cache is read; a kernel stops at each row's length."""
    B, T, H, Dh = q.shape
    KH, S = k.shape[1], k.shape[2]
    qg = q.reshape(B, T, KH, H // KH, Dh)  # [B, T, KH, G, Dh]: G query heads share a kv head
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k.astype(q.dtype),
                        preferred_element_type=jnp.float32)
    if k_scale is not None:
        scores = scores * k_scale[:, :, None, None, :]                  # [B, KH, 1, 1, S]
    scores = scores / math.sqrt(Dh)
    q_pos = lengths[:, None] - T + jnp.arange(T)                         # [B, T]
    mask = jnp.arange(S)[None, None, :] <= q_pos[:, :, None]             # [B, T, S]
    scores = jnp.where(mask[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)  # float32; each row sees at least itself
    if v_scale is not None:
        probs = probs * v_scale[:, :, None, None, :]
    out = jnp.einsum("bkgts,bksd->btkgd", probs.astype(q.dtype), v.astype(q.dtype))
    return out.reshape(B, T, H, Dh)


# ----------------------------------------------------------------------------------------------
# The model, with a cache: prefill and decode
# ----------------------------------------------------------------------------------------------

def _inv_rms(x, eps):
    """1 / rms(x) over the last axis, in float32, [..., 1]: RMSNorm's per-token factor, which
    multiplies a product's output (fold_norm)."""
    xf = x.astype(jnp.float32)
    return lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + eps)


def _qkv(x, p, cos, sin, cfg, pad_rows=0):
    # rms_norm(x) @ wqkv, the norm's weight folded into wqkv; x's padding rows are dropped here.
    B = x.shape[0] - pad_rows
    qkv = linear("btd,dhk->bthk", x, p["wqkv"], jnp.float32, pad_rows)[:B]
    qkv = (qkv * _inv_rms(x[:B], cfg.norm_eps)[..., None]).astype(x.dtype)  # [B, T, H+2KH, Dh]
    q, k, v = jnp.split(qkv, [cfg.n_heads, cfg.n_heads + cfg.n_kv_heads], axis=2)
    return common.apply_rope(q, cos, sin), common.apply_rope(k, cos, sin), v


def _out_and_mlp(x, o, p, cfg, pad_rows=0):
    # o has only the real rows: the product sums its one row or pads it itself (linear), and
    # its output's zero rows are added here, where the residual add absorbs them.
    y = linear("bthk,hkd->btd", o, p["wo"])
    x = x + jnp.pad(y, ((0, pad_rows),) + ((0, 0),) * (y.ndim - 1))
    with jax.named_scope("mlp"):  # rms_norm(x) @ w_gate_up, the norm's weight folded in
        gu = linear("btd,dgf->btgf", x, p["w_gate_up"], jnp.float32, pad_rows)  # [B, T, 2, F]
        gu = (gu * _inv_rms(x, cfg.norm_eps)[..., None]).astype(x.dtype)
        return x + linear("btf,fd->btd", jax.nn.silu(gu[:, :, 0]) * gu[:, :, 1], p["w_down"],
                          pad_rows=pad_rows)


def _logits(params, x, cfg, pad_rows=0):  # x [B, T, D] -> [B, T, V] float32
    x = common.rms_norm(x, params["final_norm"], cfg.norm_eps)
    return linear("btd,vd->btv", x, params["head"], jnp.float32, pad_rows)


def prefill(params, cache, tokens, lengths, slots, cfg, attention=None):
    """Prompts tokens [b, T] (right-padded; true lengths [b]) at positions 0..T-1: prompt i's keys
    and values go to cache row slots[i] (int32 [b]), its length to cache["lengths"][slots[i]];
    a slot past the cache's last row writes nothing (a padding row). Returns each prompt's
    last-token logits [b, V] (the head runs on those tokens only) and the cache.
    Causal attention over the prompt itself: a real token never sees the padding after it."""
    attention = attention or common.attention_reference
    params, cache = inference_params(params, cfg), _copy(cache)
    b, T = tokens.shape
    dt = jnp.dtype(cfg.dtype)
    cos, sin = common.rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (b, T)), cfg)
    x = params["embed"][tokens].astype(dt)  # [b, T, D]
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            q, k, v = _qkv(x, p, cos, sin, cfg)
            cache = _write(cache, i, k, v, lambda buf, new: write_at_slots(buf, new, slots))
            x = _out_and_mlp(x, attention(q, k, v, True, None), p, cfg)
    cache["lengths"] = cache["lengths"].at[slots].set(lengths.astype(jnp.int32), mode="drop")
    last = x[jnp.arange(b), lengths - 1]  # [b, D]
    return _logits(params, last[:, None], cfg)[:, 0], cache


def forward_cached(params, cache, tokens, cfg, decode_attention=None):
    """Continue every row of the cache by tokens [B, T] (T = 1 for decode; gamma + 1 when a
    speculative round verifies its draft): row b's tokens take positions lengths[b] ..
    lengths[b]+T-1. Returns logits [B, T, V] and the cache with lengths advanced by T.
    decode_attention(q, k, v, lengths, k_scale, v_scale) is the seam for lesson 08's kernel."""
    decode_attention = decode_attention or decode_attention_reference
    params, cache = inference_params(params, cfg), _copy(cache)
    B, T = tokens.shape
    dt = jnp.dtype(cfg.dtype)
    start = cache["lengths"]                                              # [B]
    cos, sin = common.rope_cos_sin(start[:, None] + jnp.arange(T), cfg)   # [B, T, Dh/2]
    x = params["embed"][tokens].astype(dt)                                # [B, T, D]
    # At batch 1 with int8 weights the token's row travels with a zero second row through every
    # layer: each large product sees two rows and stays a matrix multiply (linear), with no
    # kernel to pad the row before each one. The zero row stays zero (the norms scale it by a
    # finite 1/sqrt(eps)).
    pad = 1 if B * T == 1 and "scale" in params["layers"][0]["w_down"] else 0
    if pad:
        x = jnp.concatenate([x, jnp.zeros_like(x)])
    int8 = "k_scale" in cache
    for i, p in enumerate(params["layers"]):
        with jax.named_scope(f"layer_{i}"):
            q, k, v = _qkv(x, p, cos, sin, cfg, pad)
            cache = _write(cache, i, k, v, lambda buf, new: write_at_lengths(buf, new, start))
            with jax.named_scope("decode_attention"):
                o = decode_attention(q, cache["k"][i], cache["v"][i], start + T,
                                     cache["k_scale"][i] if int8 else None,
                                     cache["v_scale"][i] if int8 else None)
            x = _out_and_mlp(x, o, p, cfg, pad)
    cache["lengths"] = start + T
    return _logits(params, x, cfg, pad)[:B], cache


# ----------------------------------------------------------------------------------------------
# Sampling, and the compiled steps
# ----------------------------------------------------------------------------------------------

class Sampling(typing.NamedTuple):
    temperature: float = 0.0   # 0: greedy
    top_k: int = 0             # 0: off
    top_p: float = 1.0         # 1: off


GREEDY = Sampling()


def make_sampling(temperature=0.0, top_k=None, top_p=None):
    if not 0 <= temperature < math.inf:  # (a NaN fails this too)
        raise common.UserError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and (not common.is_integer(top_k) or top_k < 0):
        raise common.UserError(f"top_k must be an integer >= 0, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise common.UserError(f"top_p must be in (0, 1], got {top_p}")
    # Below float32's smallest normal number the division by it would overflow: sampling at such
    # a temperature is greedy in all but name.
    temperature = 0.0 if temperature < np.finfo(np.float32).tiny else float(temperature)
    return Sampling(temperature, int(top_k or 0), float(1.0 if top_p is None else top_p))


def check_sampling(sampling):
    """A Sampling built by hand (the serving loops take one) passes make_sampling's checks."""
    if not isinstance(sampling, Sampling):
        raise common.UserError(f"sampling must be a Sampling (make_sampling builds one), got "
                               f"{sampling!r}")
    return make_sampling(*sampling)


def check_seed(seed):
    """The seed travels to the device as an int32."""
    if not common.is_integer(seed) or not 0 <= seed < 2**31:
        raise common.UserError(f"seed must be an integer in [0, 2**31), got {seed!r}")
    return int(seed)


def sample(logits, seed, row_ids, counters, sampling):
    """Next tokens [B] from logits [B, V]: the argmax at temperature 0, else a draw from
    softmax(logits / temperature) over the top_k tokens and over the smallest set whose mass
    reaches top_p (nucleus sampling, Holtzman et al. 2020). Row b's random key depends only on
    (seed, row_ids[b], counters[b]), the request and the token's index in its answer, so a
    request draws the same numbers in whatever batch or slot it runs."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.vmap(jax.random.categorical)(row_keys(seed, row_ids, counters),
                                            filter_logits(logits, sampling)).astype(jnp.int32)


def filter_logits(logits, sampling):
    """The logits [..., V] that sampling draws from, as float32: divided by the temperature (> 0),
    -inf outside the top_k and outside the top_p nucleus. Tokens tied with the last one kept are
    kept too (as Hugging Face's filters do), so a tie can keep more than top_k tokens, or more
    than the smallest set whose mass reaches top_p."""
    logits = logits.astype(jnp.float32)
    # The best logit first brought to 0: at a small temperature the others go to -inf, not the
    # best to +inf (softmax does not change).
    logits = (logits - jnp.max(logits, axis=-1, keepdims=True)) / sampling.temperature
    if sampling.top_k:
        kth = lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        desc = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(desc, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs          # mass of the better tokens
        keep = before < sampling.top_p                       # the best token always stays
        cut = jnp.min(jnp.where(keep, desc, jnp.inf), axis=-1, keepdims=True)
        logits = jnp.where(logits < cut, -jnp.inf, logits)
    return logits


def row_keys(seed, row_ids, counters):
    """One random key per row [B], from (seed, row_ids[b], counters[b]) alone."""
    base = jax.random.key(seed)
    return jax.vmap(lambda r, c: jax.random.fold_in(jax.random.fold_in(base, r), c))(
        row_ids, counters)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "attention"),
                   donate_argnames=("cache",))
def _prefill_jit(params, cache, tokens, lengths, slots, row_ids, seed, *, cfg, sampling,
                 attention):
    logits, cache = prefill(params, cache, tokens, lengths, slots, cfg, attention)
    return sample(logits, seed, row_ids, jnp.zeros_like(row_ids), sampling), logits, cache


# A GPU runs a compiled step's kernels from one CUDA graph, by default one at a time in the
# order XLA scheduled them. A batch-1 step is a chain of small kernels, each bound by latency
# rather than bytes, and some of them do not depend on each other: a norm's sum of squares and
# the matmul whose output it scales, the two cache writes and the query's rope. CONCURRENT
# lets the graph run those side by side (Llama-3-8B shape, H200: 4.19 -> 4.09 ms per step).
# In a loop of steps (decode_steps, decode_loop, the speculative rounds) the weights do not
# change, so XLA's CPU compiler moves each int8 weight's widening out of the loop: the loop
# then reads 4-byte copies every step instead of the 1-byte weights, and on a CPU the int8
# steps ran about 3x slower in a loop than one per call (the `small` model, 2 cores: 9.5
# against 2.9 ms per step). The pass is turned off for these calls; XLA's GPU compiler widens inside
# the product either way (1B and 8B shapes on an H100: the same step time to 0.2%).
DECODE_COMPILER_OPTIONS = {"xla_gpu_command_buffer_scheduling_mode": "CONCURRENT",
                           "xla_disable_hlo_passes": "while-loop-invariant-code-motion"}
# A lax.while_loop whose condition the device computes: by default XLA's GPU runtime copies each
# iteration's condition to the host and waits for it, so the call holds the host until the loop
# ends (generate's 128-step loop at the 1B shape: the call returned after 114 ms, when the loop
# was done). With WHILE and CONDITIONAL in the CUDA graph the loop runs in the graph (CUDA's
# conditional nodes) and the call returns at once (0.9 ms), which lets a server read a prefill's
# first tokens while the steps after it run.
LOOP_COMPILER_OPTIONS = {**DECODE_COMPILER_OPTIONS, "xla_gpu_enable_command_buffer":
                         "FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL"}


def _decode_one(params, cache, tokens, row_ids, counters, seed, cfg, sampling,
                decode_attention):
    """The body of every decode loop: one token per row in, (next tokens [B], logits [B, V],
    cache) out."""
    logits, cache = forward_cached(params, cache, tokens[:, None], cfg, decode_attention)
    logits = logits[:, 0]
    return sample(logits, seed, row_ids, counters, sampling), logits, cache


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "decode_attention"),
                   donate_argnames=("cache",), compiler_options=DECODE_COMPILER_OPTIONS)
def _decode_jit(params, cache, tokens, row_ids, counters, seed, *, cfg, sampling,
                decode_attention):
    return _decode_one(params, cache, tokens, row_ids, counters, seed, cfg, sampling,
                       decode_attention)


# The static arguments are always passed by keyword, defaults included: jit keys its cache on the
# arguments as given, so an omitted default and an explicit one would compile twice.
def prefill_step(params, cache, tokens, lengths, slots, row_ids, seed, cfg, sampling=GREEDY,
                 attention=None):
    """Compiled prefill of prompts tokens [b, T] into cache rows slots [b]: (first tokens [b],
    last-token logits [b, V], cache). It compiles once per (b, T): callers pad both."""
    T, S = jnp.shape(tokens)[-1], cache["k"][0].shape[2]
    if T > S:
        raise common.UserError(f"prompts padded to {T} tokens do not fit a cache of {S} "
                               f"positions: make the cache longer")
    return _prefill_jit(params, cache, tokens, lengths, slots, row_ids, seed, cfg=cfg,
                        sampling=sampling, attention=attention)


def decode_step(params, cache, tokens, row_ids, counters, seed, cfg, sampling=GREEDY,
                decode_attention=None):
    """Compiled decode step, one token per row: (next tokens [B], logits [B, V], cache). The
    cache is donated: XLA writes the new keys and values into the same buffers. Each row must
    have a free position (lengths < S): the lengths live on the device, where no check can stop
    the step, and a write past the end lands on the last position (write_at_lengths).
    generate and the serving loops size their caches so that it never comes to that."""
    return _decode_jit(params, cache, tokens, row_ids, counters, seed, cfg=cfg,
                       sampling=sampling, decode_attention=decode_attention)


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "decode_attention", "n",
                                             "with_logits"),
                   donate_argnames=("cache",), compiler_options=DECODE_COMPILER_OPTIONS)
def _decode_steps_jit(params, cache, tokens, row_ids, counters, seed, *, cfg, sampling,
                      decode_attention, n, with_logits):
    def step(carry, _):
        cache, tok, counters = carry
        tok, logits, cache = _decode_one(params, cache, tok, row_ids, counters, seed, cfg,
                                         sampling, decode_attention)
        return (cache, tok, counters + 1), (tok, logits if with_logits else None)

    (cache, _, _), (toks, logits) = lax.scan(step, (cache, tokens, counters), None, length=n)
    return toks, logits, cache


def decode_steps(params, cache, tokens, row_ids, counters, seed, cfg, n, sampling=GREEDY,
                 decode_attention=None, with_logits=False):
    """n decode steps in one compiled call (a lax.scan over decode_step's body, the cache in its
    carry): (tokens [n, B], logits [n, B, V] or None, cache); row b's step i draws with counter
    counters[b] + i, so the tokens are decode_step's, n times over. Each call costs the host
    one dispatch of a few hundred arrays, 0.4-1 ms on the GPU hosts measured, which a small
    model's step can take less than (Llama-3.2-1B shape: 0.85 ms on an H200): there n steps
    per call keep the device busy; where the step is longer than the dispatch, the loop costs
    a little (BENCHMARKS.md)."""
    return _decode_steps_jit(params, cache, tokens, row_ids, counters, seed, cfg=cfg,
                             sampling=sampling, decode_attention=decode_attention, n=n,
                             with_logits=with_logits)


# ----------------------------------------------------------------------------------------------
# generate: ragged prompts, one batch
# ----------------------------------------------------------------------------------------------

def bucket(n, lo=16):
    """Pad lengths to powers of two, so that a few compiled shapes serve every prompt."""
    return max(lo, 1 << max(int(n) - 1, 0).bit_length())


def check_count(name, n):
    """A count of tokens given by a user: an integer (numpy's too), as a Python int."""
    if not common.is_integer(n):
        raise common.UserError(f"{name} must be an integer, got {n!r}")
    return int(n)


def check_prompts(prompts, cfg, max_new_tokens, cache_len=None, extra=0,
                  extra_for="a speculative round's draft tokens", asked=None):
    """Lengths [B] of a list of token lists; the cache length to use, with `extra` positions
    `extra_for` past generate's. One-line errors for what a user can get wrong; `asked` names
    the tokens after the prompt in them (default: the new tokens and the extra)."""
    if check_count("max_new_tokens", max_new_tokens) < 0:
        raise common.UserError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if cache_len is not None and check_count("cache_len", cache_len) < 1:
        raise common.UserError(f"cache_len must be >= 1, got {cache_len}")
    if isinstance(prompts, (np.ndarray, jax.Array)) and prompts.ndim == 2:
        prompts = list(np.asarray(prompts))  # [B, T] of equal lengths: B prompts
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise common.UserError("prompts must be a non-empty list of token lists")
    lengths = []
    for i, p in enumerate(prompts):
        p = np.asarray(p)
        if p.ndim != 1 or p.size == 0:
            raise common.UserError(f"prompt {i} must be a non-empty list of token ids")
        if not np.issubdtype(p.dtype, np.integer):
            raise common.UserError(f"prompt {i} holds {p.dtype} values, not integer token ids")
        if p.min() < 0 or p.max() >= cfg.vocab_size:
            raise common.UserError(f"prompt {i} has token ids outside [0, {cfg.vocab_size})")
        lengths.append(len(p))
    # The last new token is returned, never fed back: its key and value are never cached.
    need = max(lengths) + max(max_new_tokens - 1, 0) + extra
    asked = asked or f"max_new_tokens={max_new_tokens} (the last not cached)" + (
        f" plus {extra} for {extra_for}" if extra else "")
    if cache_len is None:
        cache_len = need
        if cache_len > cfg.max_seq_len:
            raise common.UserError(f"a prompt of {max(lengths)} tokens with {asked} needs {need} "
                                   f"cache positions, past the model's "
                                   f"max_seq_len={cfg.max_seq_len}")
    elif cache_len > cfg.max_seq_len:
        raise common.UserError(f"cache_len={cache_len} exceeds max_seq_len={cfg.max_seq_len}")
    if need > cache_len:
        i = int(np.argmax(lengths))
        raise common.UserError(f"prompt {i} has {lengths[i]} tokens: with {asked} it needs "
                               f"{need} cache positions, the cache holds {cache_len}")
    return np.asarray(lengths, np.int32), cache_len


def pad_prompts(prompts, T):
    out = np.zeros((len(prompts), T), np.int32)
    for i, p in enumerate(prompts):
        out[i, :len(p)] = p
    return out


def _check_stops(stop_tokens, cfg):
    if stop_tokens is None:
        stop_tokens = ()
    if np.ndim(stop_tokens) == 0 and not isinstance(stop_tokens, (set, frozenset)):
        stop_tokens = [stop_tokens]   # one id; else any collection of them
    stop_tokens = np.asarray(list(stop_tokens))
    if stop_tokens.size and (stop_tokens.ndim != 1 or
                             not np.issubdtype(stop_tokens.dtype, np.integer)):
        raise common.UserError(f"stop_tokens must be token ids, got {stop_tokens.tolist()}")
    stops = sorted({int(t) for t in stop_tokens})
    if stops and not 0 <= stops[0] <= stops[-1] < cfg.vocab_size:
        raise common.UserError(f"stop_tokens must be ids in [0, {cfg.vocab_size}), got {stops}")
    return stops


def _until_stop(tokens, stops):
    """The length of an answer that ends at its first stop token, kept."""
    return next((j + 1 for j, t in enumerate(tokens) if t in stops), len(tokens))


@functools.partial(jax.jit, static_argnames=("cfg", "sampling", "decode_attention", "width",
                                             "with_logits", "end_on_first_stop"),
                   donate_argnames=("cache",), compiler_options=LOOP_COMPILER_OPTIONS)
def decode_loop(params, cache, tok, row_ids, counters, seed, k, stops, busy=None, *, cfg,
                sampling, decode_attention, width, with_logits=False, end_on_first_stop=False):
    """Up to k decode steps (k <= width) in one compiled call, a lax.while_loop on the device:
    the host dispatches them once, instead of a few hundred arrays per step (0.4-1 ms on the
    GPU hosts measured, longer than a small model's step), and on a GPU the call returns before
    the loop ends (LOOP_COMPILER_OPTIONS).
    Row b's step j draws with counter counters[b] + j, so the tokens are decode_step's.
    The loop ends after step k, or once every `busy` row has made one of `stops` [n] (generate:
    every answer has ended), or with end_on_first_stop once any busy row has (the serving
    loops, which then give its slot to the next request). A row whose last token `tok` [B] is
    a stop token is never busy; busy [B] (default: every row) can leave out others.
    Returns (tokens [width, B], the first n rows made, their logits [width, B, V] float32 if
    with_logits else None, n, the last tokens [B], cache)."""
    B = tok.shape[0]
    busy = ~jnp.isin(tok, stops) & (True if busy is None else busy)
    out = jnp.zeros((width, B), jnp.int32)
    kept = jnp.zeros((width, B, cfg.vocab_size), jnp.float32) if with_logits else None

    def going(state):
        i, stopped = state[0], state[3] & busy
        return (i < k) & ~(jnp.any(stopped) if end_on_first_stop else jnp.all(stopped | ~busy))

    def step(state):
        i, cache, tok, stopped, out, kept = state    # i: steps made; [B], [B], [width, B], kept
        tok, logits, cache = _decode_one(params, cache, tok, row_ids, counters + i, seed, cfg,
                                         sampling, decode_attention)
        out = lax.dynamic_update_slice(out, tok[None], (i, 0))
        if kept is not None:
            kept = lax.dynamic_update_slice(kept, logits[None].astype(jnp.float32), (i, 0, 0))
        return i + 1, cache, tok, stopped | jnp.isin(tok, stops), out, kept

    state = (jnp.int32(0), cache, tok, jnp.zeros((B,), bool), out, kept)
    n, cache, tok, _, out, kept = lax.while_loop(going, step, state)
    return out, kept, n, tok, cache


def generate(params, cfg, prompts, max_new_tokens, temperature=0.0, top_k=None, top_p=None,
             seed=0, cache_len=None, kv_int8=False, decode_attention=None, return_logits=False,
             stop_tokens=None):
    """Generate max_new_tokens after each prompt (a list of token lists of any lengths, run as one
    batch) and return, per prompt, the list of new tokens: one prefill, then one decode step per
    token, all of them in one call (decode_loop). Greedy (temperature 0) output is what argmax
    decoding by full recompute gives: exactly in float32; in bf16 the two paths sum in different
    orders, so where two tokens' logits tie or nearly tie the argmax can differ.
    stop_tokens: token ids (a tokenizer's end of sequence) that end a prompt's answer; the
    answer keeps its stop token, and the steps end once every prompt has stopped.
    return_logits: also return, per prompt, the logits [tokens, V] each token came from."""
    params = inference_params(params, cfg)
    sampling, seed = make_sampling(temperature, top_k, top_p), check_seed(seed)
    decode_attention = decode_attention or default_decode_attention(cfg)
    lengths, S = check_prompts(prompts, cfg, max_new_tokens, cache_len)
    max_new_tokens = int(max_new_tokens)
    stops = _check_stops(stop_tokens, cfg)
    B = len(prompts)
    if max_new_tokens == 0:
        if return_logits:
            return [[] for _ in prompts], [np.zeros((0, cfg.vocab_size), np.float32)] * B
        return [[] for _ in prompts]
    cache = init_cache(cfg, B, S, kv_int8)
    row_ids = jnp.arange(B, dtype=jnp.int32)   # prompt b: cache row b, and sampling stream b
    tokens = pad_prompts(prompts, min(bucket(int(lengths.max())), S))
    tok, logits, cache = prefill_step(params, cache, tokens, lengths, row_ids, row_ids, seed,
                                      cfg=cfg, sampling=sampling)
    # The steps' buffer is max_new_tokens - 1 rounded up to a power of two, so that one compile
    # serves many lengths; with the logits ([width, B, V] float32: 66 MB per row for 128 steps
    # of a 128k vocabulary) it is exact, so as not to hold up to twice that.
    width = max_new_tokens - 1 if return_logits else bucket(max_new_tokens - 1)
    steps, kept, n, _, _ = decode_loop(
        params, cache, tok, row_ids, np.ones(B, np.int32), seed, np.int32(max_new_tokens - 1),
        np.asarray(stops, np.int32), cfg=cfg, sampling=sampling,
        decode_attention=decode_attention, width=max(width, 1), with_logits=return_logits)
    tok, steps, n = jax.device_get((tok, steps, n))
    toks = [[int(t) for t in row] for row in np.concatenate([tok[None], steps[:n]]).T]
    ends = [_until_stop(row, stops) for row in toks]
    toks = [row[:e] for row, e in zip(toks, ends)]
    if return_logits:
        logits = np.concatenate([np.asarray(logits)[None], np.asarray(kept)[:n]])  # [1 + n, B, V]
        return toks, [logits[:e, b] for b, e in enumerate(ends)]
    return toks


def teacher_forced_logits(params, cfg, prompt, continuation, cache_len=None, kv_int8=False):
    """Logits [len(continuation) + 1, V] after the prompt and after each continuation token, fed
    through the same prefill and decode steps as generation (so int8 weights and int8 caches are
    compared on the same tokens, not on diverging outputs). cache_len None: as generate sizes it."""
    # Every continuation token is fed back, its last too: generate's room for one token more.
    _, cache_len = check_prompts([prompt], cfg, len(continuation) + 1, cache_len,
                                 asked=f"a continuation of {len(continuation)} tokens, each fed "
                                       f"back,")
    c = np.asarray(continuation)
    if c.size and (c.ndim != 1 or not np.issubdtype(c.dtype, np.integer) or c.min() < 0
                   or c.max() >= cfg.vocab_size):
        raise common.UserError(f"the continuation must be token ids in [0, {cfg.vocab_size})")
    cache = init_cache(cfg, 1, cache_len, kv_int8)
    zero = jnp.zeros((1,), jnp.int32)
    T = min(bucket(len(prompt)), cache_len)
    _, logits, cache = prefill_step(params, cache, pad_prompts([prompt], T),
                                    np.array([len(prompt)], np.int32), zero, zero, 0, cfg=cfg)
    out = [logits[0]]
    for t in continuation:
        _, logits, cache = decode_step(params, cache, jnp.array([t], jnp.int32), zero, zero, 0,
                                       cfg=cfg)
        out.append(logits[0])
    return np.stack([np.asarray(x, np.float32) for x in out])


# ----------------------------------------------------------------------------------------------
# Serving a stream of requests: static and continuous batching
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Request:
    prompt: list
    max_new_tokens: int


@dataclasses.dataclass
class Served:
    """A request's answer and when the host had it: the times are those of the fetches from the
    device. A prefill's first tokens are read once that prefill is done; later tokens come in one
    fetch each time some request finishes (at its length or at a stop token), so a request's
    last token is timed as it is made."""
    tokens: list
    ttft_s: float   # from the stream's start (all requests arrive at once) to the first token
    tpot_s: float   # mean time between its later tokens (nan with fewer than 2 tokens)


def _check_stream(requests, cfg, n_slots, cache_len, prompt_pad):
    if check_count("n_slots", n_slots) < 1:
        raise common.UserError(f"n_slots must be >= 1, got {n_slots}")
    if not requests:
        raise common.UserError("the request stream is empty")
    if check_count("cache_len", cache_len) < 1:
        raise common.UserError(f"cache_len must be >= 1, got {cache_len}")
    for i, r in enumerate(requests):
        if not isinstance(r, Request):
            raise common.UserError(f"request {i} must be a Request(prompt, max_new_tokens), got "
                                   f"{type(r).__name__}")
        try:
            check_prompts([r.prompt], cfg, r.max_new_tokens, cache_len)
        except common.UserError as e:   # checked alone, the prompt is "prompt 0"
            msg = str(e)
            msg = "its prompt " + msg[len("prompt 0 "):] if msg.startswith("prompt 0 ") else msg
            raise common.UserError(f"request {i}: {msg}") from None
    if prompt_pad is not None:
        check_count("prompt_pad", prompt_pad)
    pad = prompt_pad or min(bucket(max(len(r.prompt) for r in requests)), cache_len)
    if pad > cache_len or pad < max(len(r.prompt) for r in requests):
        raise common.UserError(f"prompt_pad={pad} must hold every prompt and fit the cache "
                               f"({cache_len})")
    return pad


def _served(out, t_first, t_last):
    return [Served(o, f, (l - f) / (len(o) - 1) if len(o) > 1 else math.nan)
            for o, f, l in zip(out, t_first, t_last)]


def serve_static(params, cfg, requests, n_slots, cache_len, prompt_pad=None, sampling=GREEDY,
                 seed=0, kv_int8=False, decode_attention=None, stop_tokens=None):
    """Static batching: requests in arrival order (those wanting no tokens skipped), n_slots at a
    time; a batch is prefilled together and decoded until its longest request is done, then the
    next batch starts. A request is done at its max_new_tokens or at a stop token (kept, as
    generate keeps it). Returns ([Served] per request, seconds for the whole stream)."""
    return _serve(params, cfg, requests, n_slots, cache_len, prompt_pad, sampling, seed, kv_int8,
                  decode_attention, stop_tokens, continuous=False)


def serve_continuous(params, cfg, requests, n_slots, cache_len, prompt_pad=None, sampling=GREEDY,
                     seed=0, kv_int8=False, decode_attention=None, stop_tokens=None):
    """Continuous batching: n_slots cache rows; whenever rows are free, the next requests'
    prompts are prefilled into them, all in one call, between two decode steps, and each decode
    step advances every busy row by one token. A request is done at its max_new_tokens or at a
    stop token. Returns ([Served] per request, seconds for the whole stream)."""
    return _serve(params, cfg, requests, n_slots, cache_len, prompt_pad, sampling, seed, kv_int8,
                  decode_attention, stop_tokens, continuous=True)


@jax.jit
def _place_tokens(tok, slots, new):
    """tok [n_slots] with new [b] written at rows slots [b] (rows past the end dropped): one
    compiled scatter, where the same line run eagerly would dispatch several small ops."""
    return tok.at[slots].set(new, mode="drop")


def _serve(params, cfg, requests, n_slots, cache_len, prompt_pad, sampling, seed, kv_int8,
           decode_attention, stop_tokens, continuous):
    """The serving loop of both policies; they differ in one line, when requests are admitted.
    After an admission the host knows that at most k steps pass before the next slot frees (the
    fewest tokens a busy row still owes; sooner if a row makes a stop token). It runs them in
    one call (decode_loop, which ends at the first stop token of a busy row) and fetches their
    tokens in one transfer: the device waits for the host once per finishing request, not once
    per step (reading a step's tokens before launching the next leaves the accelerator idle for
    a round trip every step, and dispatching a step costs 0.4-1 ms of host time)."""
    params = inference_params(params, cfg)
    decode_attention = decode_attention or default_decode_attention(cfg)
    pad = _check_stream(requests, cfg, n_slots, cache_len, prompt_pad)
    seed, sampling = check_seed(seed), check_sampling(sampling)
    n_slots, cache_len = int(n_slots), int(cache_len)
    stop_ids = np.asarray(_check_stops(stop_tokens, cfg), np.int32)
    n, want = len(requests), [r.max_new_tokens for r in requests]
    cache = init_cache(cfg, n_slots, cache_len, kv_int8)
    tok = jnp.zeros((n_slots,), jnp.int32)    # each slot's newest token, kept on the device
    cache, tok = placed_like(params, (cache, tok))  # else the warm-up compiles other programs
    loop = functools.partial(decode_loop, cfg=cfg, sampling=sampling,
                             decode_attention=decode_attention, width=cache_len,
                             end_on_first_stop=True)   # one compile for every stream of a cache

    def admit(cache, tok, reqs, slots, b):
        """Prefill requests `reqs` into cache rows `slots` in one call of batch b >= len(reqs),
        padded by rows aimed at slot n_slots, past the cache, which write nothing. Returns their
        first tokens [b] (on the device), the cache, and tok with the first tokens in place."""
        fill = b - len(reqs)
        prompts = [requests[r].prompt for r in reqs] + [[0]] * fill
        slots = np.array(list(slots) + [n_slots] * fill, np.int32)
        first, _, cache = prefill_step(params, cache, pad_prompts(prompts, pad),
                                       np.array([len(p) for p in prompts], np.int32), slots,
                                       np.array(list(reqs) + [0] * fill, np.int32), seed,
                                       cfg=cfg, sampling=sampling)
        return first, cache, _place_tokens(tok, slots, first)

    # Admissions come in any number up to n_slots; padded to a power of two (at most n_slots),
    # they need a handful of prefill shapes. Each is compiled before the clock starts, on rows
    # that all write nothing, and so is the decode loop, whose writes into the free rows are
    # overwritten when the rows are admitted.
    for b in sorted({min(bucket(m, 1), n_slots) for m in range(1, n_slots + 1)}):
        _, cache, tok = admit(cache, tok, [], [], b)
    zeros = np.zeros(n_slots, np.int32)
    _, _, _, tok, cache = loop(params, cache, tok, zeros, zeros, seed, np.int32(1), stop_ids,
                               np.zeros(n_slots, bool))
    tok.block_until_ready()

    out, t_first, t_last = [[] for _ in range(n)], [math.nan] * n, [math.nan] * n
    queue = collections.deque(r for r in range(n) if want[r] > 0)
    slot_req = np.full(n_slots, -1)           # the request in each slot, -1 when free
    made = np.zeros(n_slots, np.int32)        # the tokens it has got so far
    t0 = time.perf_counter()
    while queue or (slot_req >= 0).any():
        firsts = []  # (requests, their first tokens [b] on the device), one entry per prefill
        # continuous: any free slot takes a request; static: only an empty cache takes a batch
        while queue and ((slot_req < 0).any() if continuous else (slot_req < 0).all()):
            free = np.flatnonzero(slot_req < 0)[:len(queue)]
            reqs = [queue.popleft() for _ in free]
            first, cache, tok = admit(cache, tok, reqs, free, min(bucket(len(reqs), 1), n_slots))
            firsts.append((reqs, first))
            for s, r in zip(free, reqs):
                if want[r] > 1:   # else the prefill's token was all it wanted: the slot stays free
                    slot_req[s], made[s] = r, 1
        busy = np.flatnonzero(slot_req >= 0)
        k = min((want[slot_req[s]] - made[s] for s in busy), default=0)
        if k:
            # row s draws its step j with counter made[s] + j, the index of the token in its
            # answer (free rows: anything); a copy, as `made` changes before the call may read it
            steps, _, n_steps, tok, cache = loop(
                params, cache, tok, np.maximum(slot_req, 0).astype(np.int32), made.copy(), seed,
                np.int32(k), stop_ids, slot_req >= 0)
        # The steps are queued behind the prefills, so the host can wait for each prefill's
        # first tokens (TTFT) while the device goes on decoding.
        for reqs, first in firsts:
            first = np.asarray(first)
            now = time.perf_counter() - t0
            for r, t in zip(reqs, first):
                out[r].append(int(t))
                t_first[r] = t_last[r] = now
                if int(t) in stop_ids:             # answered by its first token: free the slot
                    slot_req[slot_req == r] = -1
        if not k:
            continue
        steps, n_steps = jax.device_get((steps, n_steps))
        now = time.perf_counter() - t0
        for s in busy:
            r = slot_req[s]
            if r < 0:
                continue
            new = [int(t) for t in steps[:n_steps, s]]
            hit = next((j for j, t in enumerate(new) if t in stop_ids), None)  # a stop's step
            out[r] += new if hit is None else new[:hit + 1]
            t_last[r] = now
            made[s] += n_steps
            if made[s] == want[r] or hit is not None:
                slot_req[s] = -1
    return _served(out, t_first, t_last), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Speculative decoding (greedy)
# ----------------------------------------------------------------------------------------------

def speculative_round(params, draft, cache, draft_cache, last, active, cfg, draft_cfg, gamma,
                      decode_attention=None, sampling=GREEDY, keys=None):
    """One round (Leviathan et al. 2023, Algorithm 1). Both caches hold each row's first n
    positions; `last` [B] is the newest token, in neither cache yet.
    1. The draft decodes gamma + 1 steps from `last`: d_1 .. d_gamma (the last step only stores
       d_gamma's keys, so the draft cache is complete whatever is accepted).
    2. The target runs [last, d_1 .. d_gamma] in one forward: its next-token distributions
       p_0 .. p_gamma, one pass for all of them.
    3. Greedy (temperature 0): a = the number of leading i with d_{i+1} = argmax p_i; the row
       gains d_1 .. d_a and argmax p_a, the target's own next token, so the output is the
       target's. Sampling: d_{i+1} was drawn from the draft's q_i and is kept with chance
       min(1, p_i(d) / q_i(d)); at the first refusal, a, the row draws from max(0, p_a - q_a)
       renormalized (p_gamma if all were kept). Each token is then distributed as the target
       alone would draw it (with the same temperature, top_k and top_p), whatever the draft.
    keys [B]: the round's random keys (sampling only). Returns (g [B, gamma + 1], the tokens
    gained in g[:, :a + 1]; a [B]; new `last`; cache; draft_cache); rows not `active` are left
    as they were."""
    B, greedy = last.shape[0], sampling.temperature == 0
    start = cache["lengths"]

    def draft_one(i, carry):
        dcache, tok, drafts, qs = carry
        logits, dcache = forward_cached(draft, dcache, tok[:, None], draft_cfg, decode_attention)
        if greedy:
            tok = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
        else:
            ql = filter_logits(logits[:, 0], sampling)
            step_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, i)
            tok = jax.vmap(jax.random.categorical)(step_keys, ql).astype(jnp.int32)
            qs = qs.at[:, i].set(jax.nn.softmax(ql, axis=-1))
        return dcache, tok, drafts.at[:, i].set(tok), qs

    # A draft with a smaller vocabulary (the same tokenizer, its table padded less) reads a
    # token it does not have as its last one; its guesses after it are then only rejected.
    qs = jnp.zeros((B, 0 if greedy else gamma + 1, draft_cfg.vocab_size), jnp.float32)
    draft_cache, _, drafts, qs = lax.fori_loop(
        0, gamma + 1, draft_one, (draft_cache, jnp.minimum(last, draft_cfg.vocab_size - 1),
                                  jnp.zeros((B, gamma + 1), jnp.int32), qs))
    drafts = drafts[:, :gamma]                                       # [B, gamma]
    chunk = jnp.concatenate([last[:, None], drafts], axis=1)         # [B, gamma + 1]
    logits, cache = forward_cached(params, cache, chunk, cfg, decode_attention)
    rows = jnp.arange(B)
    if greedy:
        g = jnp.argmax(logits, axis=-1).astype(jnp.int32)            # [B, gamma + 1]
        a = jnp.sum(jnp.cumprod(drafts == g[:, :gamma], axis=1), axis=1).astype(jnp.int32)
    else:
        p = jax.nn.softmax(filter_logits(logits, sampling), axis=-1)       # [B, gamma + 1, V]
        q = jnp.pad(qs, ((0, 0), (0, 0), (0, cfg.vocab_size - draft_cfg.vocab_size)))
        p_d = jnp.take_along_axis(p[:, :gamma], drafts[..., None], axis=-1)[..., 0]
        q_d = jnp.take_along_axis(q[:, :gamma], drafts[..., None], axis=-1)[..., 0]
        u = jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, gamma + 1),
                                                  (gamma,)))(keys)
        kept = u * q_d < p_d                                         # u < p / q, q_d > 0
        a = jnp.sum(jnp.cumprod(kept, axis=1), axis=1).astype(jnp.int32)
        p_a, q_a = p[rows, a], jnp.where((a < gamma)[:, None], q[rows, a], 0.0)
        rest = jnp.maximum(p_a - q_a, 0.0)
        rest = jnp.where(jnp.sum(rest, axis=-1, keepdims=True) > 0, rest, p_a)
        end_keys = jax.vmap(jax.random.fold_in, (0, None))(keys, gamma + 2)
        t = jax.vmap(jax.random.categorical)(end_keys, jnp.log(rest)).astype(jnp.int32)
        g = jnp.concatenate([drafts, t[:, None]], axis=1).at[rows, a].set(t)
    new_len = jnp.where(active, start + a + 1, start)
    cache["lengths"], draft_cache["lengths"] = new_len, new_len
    last = jnp.where(active, g[rows, a], last)
    return g, a, last, cache, draft_cache


@functools.partial(jax.jit, static_argnames=("cfg", "draft_cfg", "gamma", "width",
                                             "decode_attention", "sampling"),
                   donate_argnames=("cache", "draft_cache"),
                   compiler_options=LOOP_COMPILER_OPTIONS)
def speculative_loop(params, draft, cache, draft_cache, last, want, stops, seed, cfg, draft_cfg,
                     gamma, width, decode_attention=None, sampling=GREEDY):
    """Rounds until every row has `want` [B] tokens or has made one of `stops` [n], all on the
    device: how many tokens a round accepts decides where the next one starts, so a loop on the
    host would wait for each round's answer, and pay its dispatch and wake-up (about a target
    step at 1B on an H200) between rounds. `last` is the prefill's token, the answer's first.
    A round's random keys come from (seed, row, the index in the answer of its first token).
    Returns (tokens [B, width], made [B] (a row may make up to gamma more than it wants),
    row-rounds [B], accepted [B], rejected [B] (rounds that refused a draft token), cache,
    draft_cache)."""
    B = last.shape[0]
    rows, j = jnp.arange(B)[:, None], jnp.arange(gamma + 1)[None, :]
    out = jnp.zeros((B, width), jnp.int32).at[:, 0].set(last)
    zeros = jnp.zeros((B,), jnp.int32)

    def running(state):
        made, stopped = state[4], state[5]
        return (made < want) & ~stopped

    def one_round(state):
        cache, draft_cache, last, out, made, stopped, row_rounds, accepted, rejected = state
        active = running(state)
        g, a, last, cache, draft_cache = speculative_round(
            params, draft, cache, draft_cache, last, active, cfg, draft_cfg, gamma,
            decode_attention, sampling, row_keys(seed, rows[:, 0], made))
        new = active[:, None] & (j <= a[:, None])                    # the row's g_0 .. g_a
        out = out.at[rows, jnp.where(new, made[:, None] + j, width)].set(g, mode="drop")
        stopped = stopped | jnp.any(new & jnp.isin(g, stops), axis=1)
        made = made + jnp.where(active, a + 1, 0)
        return (cache, draft_cache, last, out, made, stopped, row_rounds + active,
                accepted + jnp.where(active, a, 0), rejected + (active & (a < gamma)))

    state = (cache, draft_cache, last, out, zeros + 1, jnp.isin(last, stops), zeros, zeros,
             zeros)
    state = lax.while_loop(lambda s: jnp.any(running(s)), one_round, state)
    return state[3], state[4], state[6], state[7], state[8], state[0], state[1]


def speculative_generate(params, cfg, draft, draft_cfg, prompts, max_new_tokens, gamma=4,
                         cache_len=None, decode_attention=None, stop_tokens=None,
                         temperature=0.0, top_k=None, top_p=None, seed=0):
    """Generation by the target `params`, sped up by the `draft` model: returns (tokens per
    prompt, and statistics: rounds (the most any row took), acceptance rate = accepted /
    proposed draft tokens, alpha, tokens per round (per row), decode_s (the rounds' time, after
    both prefills)).
    alpha estimates the chance that a draft token is accepted once it is judged: accepted /
    (accepted + refusals), a round judging tokens until its first refusal (Leviathan et al.
    2023's alpha, the a of eq. 1). The acceptance rate is lower, because the tokens after a
    refusal count as proposed but are never judged.
    Greedy (temperature 0): the tokens are generate(..., temperature=0)'s with the same
    stop_tokens. Identical in float32; in bf16 the target scores gamma + 1 tokens in one pass,
    whose sums round differently from one token's, so where two tokens' logits nearly tie the
    argmax can differ from generate's (as it can between batch sizes).
    Sampling: each token is distributed as generate's with the same temperature, top_k and
    top_p (speculative sampling, speculative_round), though not the same draws for a seed."""
    sampling, seed = make_sampling(temperature, top_k, top_p), check_seed(seed)
    if not isinstance(draft_cfg, common.Config):
        raise common.UserError(f"draft_cfg must be the draft's common.Config, got "
                               f"{type(draft_cfg).__name__}")
    if draft_cfg.vocab_size > cfg.vocab_size:
        raise common.UserError(f"the draft's vocabulary ({draft_cfg.vocab_size}) is larger than "
                               f"the target's ({cfg.vocab_size}): they must share a tokenizer")
    if check_count("gamma", gamma) < 1:
        raise common.UserError(f"gamma must be >= 1, got {gamma}")
    if not isinstance(draft, dict):
        raise common.UserError(f"the draft must be a model's params (a dict), got "
                               f"{type(draft).__name__}")
    params, draft = inference_params(params, cfg), inference_params(draft, draft_cfg)
    decode_attention = decode_attention or default_decode_attention(cfg)
    # A round writes gamma + 1 positions from a row's length on: the last round of a row that
    # wants n tokens starts with n - 1 made, so it writes gamma positions past generate's room.
    # With at most one token wanted there is no round (the prefill makes the first).
    rounds = check_count("max_new_tokens", max_new_tokens) > 1
    lengths, S = check_prompts(prompts, cfg, max_new_tokens, cache_len, extra=gamma * rounds)
    if S > draft_cfg.max_seq_len:  # the draft runs at the target's positions
        raise common.UserError(f"these prompts and max_new_tokens need {S} cache positions, past "
                               f"the draft's max_seq_len={draft_cfg.max_seq_len}: use a draft "
                               f"trained as long, or fewer tokens")
    max_new_tokens, gamma = int(max_new_tokens), int(gamma)
    stops = _check_stops(stop_tokens, cfg)
    B = len(prompts)
    no_rounds = {"rounds": 0, "proposed": 0, "accepted": 0, "decode_s": 0.0,
                 "acceptance": math.nan, "alpha": math.nan, "tokens_per_round": math.nan}
    if max_new_tokens == 0:
        return [[] for _ in prompts], no_rounds
    tokens = pad_prompts(prompts, min(bucket(int(lengths.max())), S))
    ids = jnp.arange(B, dtype=jnp.int32)
    last, _, cache = prefill_step(params, init_cache(cfg, B, S), tokens, lengths, ids, ids, seed,
                                  cfg=cfg, sampling=sampling)
    if max_new_tokens == 1:  # the prefill's token (the cache has no room for a round)
        return [[int(t)] for t in jax.device_get(last)], no_rounds
    _, _, dcache = prefill_step(draft, init_cache(draft_cfg, B, S),
                                jnp.minimum(tokens, draft_cfg.vocab_size - 1), lengths, ids, ids,
                                0, cfg=draft_cfg)
    jax.block_until_ready((last, dcache))
    t0 = time.perf_counter()
    out, made, row_rounds, accepted, rejected = jax.device_get(speculative_loop(
        params, draft, cache, dcache, last, jnp.full((B,), max_new_tokens, jnp.int32),
        jnp.array(stops, jnp.int32), seed, cfg=cfg, draft_cfg=draft_cfg, gamma=gamma,
        width=bucket(max_new_tokens + gamma + 1, 64), decode_attention=decode_attention,
        sampling=sampling)[:5])
    n_rounds = int(row_rounds.sum())
    stats = {"rounds": int(row_rounds.max()), "proposed": gamma * n_rounds,
             "accepted": int(accepted.sum()), "decode_s": time.perf_counter() - t0}
    stats["acceptance"] = stats["accepted"] / max(stats["proposed"], 1)
    judged = stats["accepted"] + int(rejected.sum())
    stats["alpha"] = stats["accepted"] / judged if judged else math.nan
    stats["tokens_per_round"] = (stats["accepted"] + n_rounds) / max(n_rounds, 1)
    out = [[int(t) for t in row[:min(n, max_new_tokens)]] for row, n in zip(out, made)]
    return [o[:_until_stop(o, stops)] for o in out], stats


# ----------------------------------------------------------------------------------------------
# Checkpoints and tokenizers
# ----------------------------------------------------------------------------------------------

def default_run_dir(root="out"):
    """Where 06 looks when no directory is named: `root` (09's default --out_dir) or the one of
    its subdirectories (09's docstring trains into out/tiny) whose newest checkpoint was written
    last; `root` when none holds one."""
    runs = [root] + sorted(d for d in (os.path.join(root, n) for n in
                                       (os.listdir(root) if os.path.isdir(root) else []))
                           if os.path.isdir(d))
    newest = [(os.path.getmtime(kept[-1]), run) for run in runs
              if (kept := common.list_checkpoints(run))]
    return max(newest)[1] if newest else root


def newest_train_checkpoint(ckpt_dir):
    """(path, cfg, params) of the newest readable checkpoint 09_train.py wrote under ckpt_dir
    (ckpt_<step>/), or None. A damaged one is passed over with a line saying so, as 09 does."""
    found = common.load_newest_checkpoint(ckpt_dir, load_train_checkpoint)
    return None if found is None else (found[0], *found[1])


def load_train_checkpoint(path):
    """(cfg, params) from a checkpoint of 09_train.py (common.save_checkpoint): meta.json holds the
    model's Config under "model", state.safetensors the params (the optimizer state not read).
    09 keeps float32 master weights and computes in bf16 on a GPU; inference reads the weights
    in the compute dtype, as a released checkpoint stores them (half the bytes per step)."""
    fields = common.load_checkpoint_meta(path).get("model")
    known = {f.name for f in dataclasses.fields(common.Config)}
    if not isinstance(fields, dict) or set(fields) - known:
        raise common.UserError(f"{path}/meta.json holds no model config of this course")
    try:
        if fields.get("rope_scaling") is not None:
            fields["rope_scaling"] = tuple(fields["rope_scaling"])
        cfg = common.Config(**fields)
    except (common.UserError, TypeError) as e:
        raise common.DamagedCheckpoint(f"checkpoint {path} is damaged: its meta.json model "
                                       f"config is not valid ({e})") from None
    like = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, cfg.param_dtype),
                        common.param_specs(cfg), is_leaf=lambda x: isinstance(x, common.ParamSpec))
    state, _ = common.load_checkpoint(path, {"params": like})
    if not all(jax.tree.leaves(jax.tree.map(lambda a, s: a.shape == s.shape, state["params"],
                                            like))):
        raise common.UserError(f"{path}: the stored params do not have the shapes meta.json says")
    cfg = dataclasses.replace(cfg, param_dtype=cfg.dtype)
    return cfg, jax.tree.map(lambda a: jnp.asarray(a, cfg.param_dtype), state["params"])


def train_tokenizer(path):
    """The tokenizer of a 09_train.py checkpoint: the tokenizer.json it carries (a model
    fine-tuned from a Hugging Face one, 09's --init_from), else bytes."""
    if os.path.isfile(os.path.join(path, "tokenizer.json")):
        return common.load_tokenizer(path)
    return common.BYTES


def load_checkpoint_dir(path, tokenizer=True):
    """(name, cfg, params, tokenizer, a line saying which) from a Hugging Face Llama directory,
    a checkpoint of 09_train.py, or 09's out_dir (its newest checkpoint)."""
    if any(os.path.isfile(os.path.join(path, f))
           for f in ("meta.json", common.STATE_FILE, "state.npz")):
        cfg, params = load_train_checkpoint(path)   # one checkpoint of 09_train.py
        name = os.path.basename(path.rstrip("/"))
        return name, cfg, params, train_tokenizer(path), f"09_train.py checkpoint {path}"
    if os.path.isdir(path) and common.list_checkpoints(path):  # 09's out_dir: its newest
        found, cfg, params = newest_train_checkpoint(path)
        return (os.path.basename(found), cfg, params, train_tokenizer(found),
                f"09_train.py checkpoint {found}")
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise common.UserError(f"{path} holds no checkpoint: neither a Hugging Face one "
                               f"(config.json) nor 09_train.py's (meta.json, or ckpt_<step>/)")
    name = os.path.basename(path.rstrip("/"))
    cfg, params = common.load_hf_llama(path)
    note = common.window_note(path, cfg)
    return (name, cfg, params, common.load_tokenizer(path) if tokenizer else None,
            f"Hugging Face checkpoint {path}" + (f"\n{note}" if note else ""))


def load_draft(path, cfg, tokenizer=None):
    """A draft model for speculative decoding (--draft): (name, cfg, params in the inference
    layout), checked against the target's config `cfg` and, when the target has one, its
    `tokenizer`. It must use the target's tokenizer; its vocabulary may be smaller (a table
    padded less), not larger. A draft that reads text otherwise would still give the target's
    output (the target judges every token), but its guesses would be other words, and hardly
    one would be accepted."""
    try:
        name, dcfg, params, dtok, which = load_checkpoint_dir(path, tokenizer=False)
    except common.UserError as e:
        raise common.UserError(f"the draft (--draft): {e}") from None
    if dcfg.vocab_size > cfg.vocab_size:
        raise common.UserError(f"the draft {path} has a vocabulary of {dcfg.vocab_size} tokens, "
                               f"more than the target's {cfg.vocab_size}: they must share a "
                               f"tokenizer (a draft's table may only be padded less)")
    spec = dtok.spec if dtok is not None else None  # a Hugging Face draft's: read, not loaded
    if spec is None and os.path.isfile(os.path.join(path, "tokenizer.json")):
        spec = common.read_json(os.path.join(path, "tokenizer.json"))
    # The vocabularies (token -> id), not the whole files: two releases of one tokenizer may
    # name their reserved special tokens differently (Llama 3 and 3.2) and write merges anew.
    # A file that holds none is not the draft's to judge: its tokenizer is not used.
    def vocab(spec):
        model = (spec or {}).get("model")
        return model.get("vocab") if isinstance(model, dict) else None
    if tokenizer is not None and None not in (vocab(spec), vocab(tokenizer.spec)) \
            and vocab(spec) != vocab(tokenizer.spec):
        reads = "bytes" if spec == common.BYTES.spec else \
            "text with another tokenizer (their tokenizer.json vocabularies differ)"
        raise common.UserError(f"the draft {path} reads {reads}, unlike the target: its token "
                               f"ids would mean other text to the target")
    print(f"draft: {which}")
    return name, dcfg, inference_params(params, dcfg)


def load_model(ic, on_gpu):
    """[(name, cfg, params in common's layout, tokenizer or None)] and a line saying which."""
    if ic.checkpoint:
        *model, which = load_checkpoint_dir(ic.checkpoint)
        return [tuple(model)], f"model: {which}"
    chosen, ckpt_dir = bool(ic.ckpt_dir), ic.ckpt_dir or default_run_dir()
    # A GPU's lesson measures the Llama shapes, unless asked for a checkpoint.
    benchmark = on_gpu and not ic.sample_only and not chosen
    if ic.models == "auto" and not benchmark:
        if os.path.isfile(os.path.join(ckpt_dir, "meta.json")):  # one checkpoint itself
            cfg, params = load_train_checkpoint(ckpt_dir)
            return [(os.path.basename(ckpt_dir.rstrip("/")), cfg, params,
                     train_tokenizer(ckpt_dir))], \
                f"model: the 09_train.py checkpoint {ckpt_dir}"
        found = newest_train_checkpoint(ckpt_dir)
        if found:
            path, cfg, params = found
            return [(os.path.basename(path), cfg, params, train_tokenizer(path))], \
                f"model: the newest 09_train.py checkpoint, {path}"
        if chosen:  # a mistyped directory is said, not replaced by random weights
            what = "does not exist" if not os.path.exists(ckpt_dir) else \
                "holds no 09_train.py checkpoint (ckpt_<step>/)"
            raise common.UserError(f"--ckpt_dir={ckpt_dir} {what}")
    names = (["llama-3-8b", "llama-3.2-1b"] if benchmark else ["small"]) if ic.models == "auto" \
        else [m for m in ic.models.split(",") if m]
    models = []
    for name in names:
        cfg = common.Config.preset(name)
        models.append((name, cfg, None, common.BYTES if cfg.vocab_size == 256 else None))
    why = "" if ic.models != "auto" or benchmark else " (no checkpoint in out/ or out/*/)"
    return models, f"model: random weights, {', '.join(names)}{why}"


# ----------------------------------------------------------------------------------------------
# Measurement
# ----------------------------------------------------------------------------------------------

def random_params(cfg, seed, on_gpu):
    """Random weights with common.init_params' distributions: on a GPU drawn on the device, in
    their final dtype, by one jit (8 B parameters in seconds); on a CPU by numpy, which takes
    less time than XLA takes to compile the random number generator."""
    if on_gpu:
        return jax.jit(common.init_params, static_argnums=0)(cfg, jax.random.key(seed))
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: jnp.asarray(np.ones(s.shape, np.float32) if s.init == "ones" else
                              s.scale * rng.standard_normal(s.shape, np.float32), cfg.param_dtype),
        common.param_specs(cfg), is_leaf=lambda x: isinstance(x, common.ParamSpec))


def placed_like(params, tree):
    """tree's arrays committed to the device of params'. jit compiles one program per placement
    of its arguments, committed to a device or not, and a call's outputs are committed where any
    of its inputs was (weights read from a checkpoint are): a loop that feeds its outputs back
    would compile its call twice, the second time while its clock runs, unless its first inputs
    are placed as its outputs will be."""
    return jax.device_put(tree, jax.tree.leaves(params)[0].sharding)


def filled_cache(cfg, batch, max_len, length, kv_int8):
    """A cache whose rows are `length` positions long, filled with non-constant values (a cheap
    sine, not a random generator, which compiles slowly on a CPU): decode reads the same bytes
    whatever they hold, and this is faster than prefilling `batch` prompts."""
    cache = init_cache(cfg, batch, max_len, kv_int8)
    shape = (batch, cfg.n_kv_heads, max_len, cfg.head_dim)

    @jax.jit
    def fill(i):
        x = jnp.sin(lax.iota(jnp.float32, math.prod(shape)) * 0.7548776 + i).reshape(shape)
        return quantize_kv(x) if kv_int8 else (x.astype(cfg.dtype), None)

    for layer in range(cfg.n_layers):
        for j, name in enumerate(("k", "v")):
            cache[name][layer], scale = fill(2 * layer + j)
            if kv_int8:
                cache[name + "_scale"][layer] = scale
    cache["lengths"] = jnp.full((batch,), length, jnp.int32)
    return cache


# Steps per call where the lesson times decode_steps against one step per call.
PER_CALL = 8
LONG_CONTEXT = (4096, 3072)   # (cache, context) of the long-context rows at batch 64


def timed_context(P, steps):
    """The mean context of time_decode's timed steps from a cache filled to P: one step to
    compile, then three runs of `steps` (the bounds beside its times read this many positions)."""
    return P + 1 + 3 * steps // 2


def time_decode(params, cfg, cache, steps, repeats=3, decode_attention=None, per_call=1):
    """Seconds per decode step: the median over `repeats` runs of `steps` steps (the cache and the
    tokens fed from step to step, never synced in between), and the first call's time (compile
    included). per_call > 1: that many steps per call (decode_steps), steps rounded down to a
    multiple of it. The cache must have room for per_call + steps x repeats more tokens."""
    B = cache["lengths"].shape[0]
    tok, zeros = jnp.zeros((B,), jnp.int32), jnp.zeros((B,), jnp.int32)
    cache, tok = placed_like(params, (cache, tok))  # as the calls will return them
    if per_call == 1:
        step = functools.partial(decode_step, cfg=cfg, decode_attention=decode_attention)
    else:
        def step(params, cache, tok, row_ids, counters, seed):
            toks, _, cache = decode_steps(params, cache, tok, row_ids, counters, seed, cfg=cfg,
                                          n=per_call, decode_attention=decode_attention)
            return toks[per_call - 1], None, cache
    calls = max(steps // per_call, 1)
    t0 = time.perf_counter()
    tok, _, cache = step(params, cache, tok, zeros, zeros, 0)
    tok.block_until_ready()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            tok, _, cache = step(params, cache, tok, zeros, zeros, 0)
        tok.block_until_ready()
        times.append((time.perf_counter() - t0) / (calls * per_call))
    return float(np.median(times)), first


def compute_bound_batch(cfg, w_bytes, kv_tok, context, flops, bw):
    """Smallest batch B where B x FLOPs per token / FLOPS reaches (W + B x context x KV bytes) / BW:
    the KV term grows with B as the FLOPs do, so it may never come (returns inf)."""
    per_seq_flop_s = cfg.decode_flops_per_token(context) / flops
    per_seq_byte_s = context * kv_tok / bw
    if per_seq_flop_s <= per_seq_byte_s:
        return math.inf
    return (w_bytes / bw) / (per_seq_flop_s - per_seq_byte_s)


def _si(x, unit, digits=2):
    """3.01e12, "B/s" -> "3.01 TB/s": CPU and GPU figures differ by a thousand."""
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= scale:
            return f"{x / scale:.{digits}f} {prefix}{unit}"
    return f"{x:.{digits}f} {unit}"


def _stats(served, makespan):
    toks = sum(len(s.tokens) for s in served)
    ttft = np.array([s.ttft_s for s in served if s.tokens])
    tpot = np.array([s.tpot_s for s in served if len(s.tokens) > 1])
    mean = lambda a: a.mean() if a.size else math.nan  # (no answer of one token, or of two)
    return {"tok_s": toks / makespan, "ttft_mean": mean(ttft),
            "ttft_p90": np.percentile(ttft, 90) if ttft.size else math.nan,
            "tpot_mean": mean(tpot), "tokens": toks, "seconds": makespan}


@dataclasses.dataclass
class Run:
    """What the sections of one model's lesson share."""
    name: str
    cfg: common.Config
    params: dict              # inference layout
    tokenizer: typing.Any     # Tokenizer, or None for random token ids
    ic: InferConfig
    flops: float              # matmul FLOP/s measured here
    bw: float                 # copy bandwidth measured here, bytes read + written per second
    P: int                    # end-to-end prompt tokens
    G: int                    # tokens generated after it
    S: int                    # cache positions per row
    steps: int                # decode steps per timed run
    batch: int                # the large decode batch
    slots: int                # continuous batching slots
    requests: int             # requests in the stream
    rng: np.random.Generator
    corpus: typing.Optional[bytes]
    trained: bool             # weights from a checkpoint, not random
    rows: list = dataclasses.field(default_factory=list)
    t0: float = dataclasses.field(default_factory=time.perf_counter)
    prompt: list = None       # set by measure_batch_1, used by the later sections
    ref_tokens: list = None   # the greedy answer to `prompt`
    t_step: float = 0.0       # seconds per decode step at batch 1
    t_steps: float = 0.0      # the same, PER_CALL steps per call
    t_prefill: float = 0.0
    t_no_cache: float = 0.0   # seconds per token by full recompute over no_cache_len positions
    no_cache_len: int = 0

    def section(self, title):
        print(f"\n-- {title}  [{time.perf_counter() - self.t0:.0f} s]")

    def row(self, what, measured, bound, ratio):
        self.rows.append((self.name, what, measured, bound, ratio))

    def prompts(self, lengths):
        """Prompts of the given lengths: corpus text for models with a tokenizer, else random
        token ids (all a model with random weights can tell apart)."""
        out = []
        for n in lengths:
            n = int(n)
            if self.tokenizer is not None and self.corpus is not None:
                start = int(self.rng.integers(0, len(self.corpus) - 16 * n))
                text = self.corpus[start:start + 16 * n].decode("utf-8", "replace")
                ids = [t for t in self.tokenizer.encode(text) if t < self.cfg.vocab_size][:n]
                if len(ids) == n:
                    out.append(ids)
                    continue
            out.append([int(t) for t in self.rng.integers(0, self.cfg.vocab_size, n)])
        return out


def show_arithmetic(run):
    cfg, W, P, B = run.cfg, weight_bytes(run.params), run.P, run.batch
    kv, isz = kv_bytes_per_token(cfg), jnp.dtype(cfg.dtype).itemsize
    run.section(f"the lecture's arithmetic, with FLOPS = {_si(run.flops, 'FLOP/s')} and BW = "
                f"{_si(run.bw, 'B/s')} measured here")
    print(f"weights one decode step reads: {_si(W, 'B')} ({_si(W / isz, '')} params x {isz} B, "
          f"each layer's norm gains folded into its matrices); the embedding table, of which a "
          f"step reads one row per token, is apart")
    print(f"KV cache: 2 x {cfg.n_layers} layers x {cfg.n_kv_heads} kv heads x {cfg.head_dim} x "
          f"{isz} B = {kv:,} B per token; {_si(kv * run.S, 'B')} per {run.S}-token sequence, "
          f"{_si(kv * run.S * B, 'B')} for {B} of them (int8: {kv_bytes_per_token(cfg, True):,} "
          f"B per token)")
    for b in (1, B):
        t_min = (W + b * P * kv) / run.bw
        print(f"minimum decode step, batch {b:3d}, context {P}: (W + {b} x {P} x KV) / BW = "
              f"{t_min * 1e3:.3f} ms, at most {b / t_min:,.0f} tok/s")
    weights_only = compute_bound_batch(cfg, W, 0, 0, run.flops, run.bw)  # 2N FLOPs a token
    with_kv = compute_bound_batch(cfg, W, kv, P, run.flops, run.bw)
    if jax.devices()[0].platform == "cpu":
        print(f"(on a CPU the bounds are loose: part of the {_si(W, 'B')} of weights stays in its "
              f"caches from step to step)")
    print(f"decode turns compute-bound at batch ~{weights_only:,.0f} counting the weights only "
          f"(B x 2N / FLOPS = W / BW: B = FLOPS / BW x bytes per weight / 2), at batch "
          f"{with_kv:,.0f} counting each sequence's {P}-token KV reads too")
    arrays = {id(x): x for x in jax.tree.leaves(run.params)}  # a tied head is the embedding
    held = sum(x.size * x.dtype.itemsize for x in arrays.values())  # with the embedding
    show_capacity(cfg, held, run.S, weights_only)
    show_cross_product(cfg, P, B, run.flops / run.bw)


def layer_intensity(cfg, block, tokens, context, batch=1):
    """FLOPs per byte of one layer's attention core (QK^T, softmax, PV) or FFN (three matmuls)
    for `batch` sequences of `tokens` new tokens each, attending to `context` positions, counted
    as the lecture counts them: every matmul's operands and result through memory once, the
    scores and probabilities (when materialized) in 2 bytes, 3 FLOPs of softmax per score.
    Prefill is tokens = context = S; decode is tokens = 1."""
    b = jnp.dtype(cfg.dtype).itemsize
    d, f, h, kvh, hd = cfg.d_model, cfg.d_ff, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
    n = batch * tokens
    if block == "ffn":  # gate and up: [n, d] @ [d, f]; down: [n, f] @ [f, d]
        flops = 3 * 2 * n * d * f
        nbytes = b * (3 * d * f + 2 * n * d + 6 * n * f)  # weights; x in, y out; g, u, h out and in
    elif block == "attention":  # per sequence its own K, V: batching shares nothing here
        scores = batch * h * tokens * context
        flops = (4 * hd + 3) * scores
        nbytes = 8 * scores + b * batch * (2 * tokens * h * hd + 2 * context * kvh * hd)
    else:
        raise ValueError(f"block must be attention or ffn, got {block!r}")
    return flops / nbytes


def show_cross_product(cfg, S, B, ridge):
    """The lecture's [prefill, decode] x [attention, FFN]: which of the four is memory-bound."""
    print(f"one layer's arithmetic intensity, FLOP/byte against the ridge point {ridge:.0f} "
          f"(the lecture's count: operands through memory once, 2-byte scores):")
    print(f"  {'':28s} {'attention (QK^T, softmax, PV)':>30s} {'FFN (3 matmuls)':>20s}")
    for name, tokens, batch in ((f"prefill, {S} tokens", S, 1),
                                (f"decode, batch 1, context {S}", 1, 1),
                                (f"decode, batch {B}, context {S}", 1, B)):
        cells = []
        for block in ("attention", "ffn"):
            x = layer_intensity(cfg, block, tokens, S, batch)
            cells.append(f"{x:,.1f} {'compute' if x > ridge else 'memory'}")
        print(f"  {name:28s} {cells[0]:>30s} {cells[1]:>20s}")
    print("  Batching decode multiplies the FFN's intensity (its weights serve every sequence) but "
          "not attention's: each\n  sequence reads its own KV cache, so decode attention has the "
          "same intensity at any batch.")


def max_resident_batch(limit, w_bytes, kv_per_seq):
    """How many sequences' KV caches fit beside the weights: (memory - W) / KV per sequence
    (activations and the compiled step's scratch are left out, so this is an upper bound)."""
    return max(int((limit - w_bytes) // kv_per_seq), 0)


def show_capacity(cfg, w_bytes, cache_len, compute_bound):
    """The lecture's third limit: memory capacity caps the batch, often before it turns
    compute-bound (Llama-2-7B on a 24 GB A10: 14 GB of weights, 2 GB per 4k-token sequence,
    about 5 sequences). w_bytes: every parameter the device holds, the embedding included."""
    limit, what = common.memory_limit()
    if limit is None:
        print("memory capacity: unknown on this device, so the batch that fits is not computed")
        return
    lengths = sorted(n for n in {cache_len, 4096, cfg.max_seq_len} if n <= cfg.max_seq_len)
    counts = {int8: [max_resident_batch(limit, w_bytes, kv_bytes_per_token(cfg, int8) * n)
                     for n in lengths] for int8 in (False, True)}
    print(f"memory capacity: {_si(limit, 'B')}, {what}; beside {_si(w_bytes, 'B')} of "
          f"parameters the KV caches of at most " + ", ".join(
              f"{b:,} ({b8:,} int8) at {n:,} tokens"
              for n, b, b8 in zip(lengths, counts[False], counts[True])) + " fit")
    short = [n for n, b in zip(lengths, counts[False]) if b < compute_bound]
    print(f"  against the batch of ~{compute_bound:,.0f} where the weights' reads turn "
          f"compute-bound: " + (f"from {short[0]:,} tokens of context memory runs out first"
                               if short else "memory holds it at every length above"))


def check_full_recompute(run, params):
    """Cached greedy decoding of a ragged batch against the argmax of common.forward over each
    whole sequence: equal at every position means full-recompute greedy decoding gives the same
    tokens. The batch has the request stream's shapes, so its compiled steps serve both. Also
    times a step without a cache: a forward over the whole sequence for each new token."""
    cfg, n = run.cfg, min(16, run.G)
    lo, hi = max(run.P // 16, 1), max(run.P // 2, 1)
    lengths = [hi, lo] + [int(x) for x in run.rng.integers(lo, hi + 1, max(run.slots - 2, 0))]
    prompts = run.prompts(lengths)
    got, got_logits = generate(run.params, cfg, prompts, n, cache_len=run.S, return_logits=True,
                               decode_attention=decode_attention_reference)
    # The faster program where it runs. On a GPU the layers unrolled, as the prefill's are:
    # scanned over the stacked weights, XLA copied each layer's weights out of the stack first,
    # which doubled the step's time at 8B. On a CPU the scanned program ran 1.5-1.8x faster.
    scan = jax.default_backend() == "cpu"
    full = jax.jit(lambda p, t: common.forward(p, t, cfg, scan_layers=scan))
    L = bucket(hi + n)
    agree, err = 0, 0.0
    for p, toks, lg in list(zip(prompts, got, got_logits))[:2]:  # the longest and the shortest
        seq = p + toks[:-1]
        ref = np.asarray(full(params, pad_prompts([seq], L)))[0, len(p) - 1:len(seq)]
        agree += int(np.sum(ref.argmax(-1) == np.array(toks)))
        err = max(err, float(np.max(np.abs(ref - lg)) / np.std(ref)))
    tokens = jnp.asarray(pad_prompts([seq], L))
    run.t_no_cache = queued_seconds(lambda: full(params, tokens))
    run.no_cache_len = L
    run.section(f"cached greedy vs full recompute (common.forward): a batch of {len(prompts)} "
                f"prompts of {lo}..{hi} tokens")
    print(f"the longest and the shortest: {agree}/{2 * n} tokens agree; max |logit difference| "
          f"{err:.1e} x std(logits) ({cfg.dtype} rounding: the same math in another order)")


def queued_seconds(call, calls=4, repeats=3):
    """Seconds per call of call() (which returns arrays): the median over `repeats` timings of
    `calls` calls queued without waiting, as the decode steps are, so the host's dispatch of one
    call (a few hundred arrays) hides under the device's work on the one before."""
    def once():
        t0 = time.perf_counter()
        for _ in range(calls):
            out = call()
        jax.block_until_ready(out)
        return (time.perf_counter() - t0) / calls
    return float(np.median([once() for _ in range(repeats)]))


def time_prefill(run):
    """Prefill of run.prompt (P tokens) at batch 1. Returns (median seconds per call, compile
    seconds, its kernels' summed device time or None where no profile is had, the cache)."""
    cfg, P, S = run.cfg, run.P, run.S
    tokens, lengths, zero = (jnp.asarray(a) for a in (
        pad_prompts([run.prompt], min(bucket(P), S)), np.array([P], np.int32),
        np.zeros(1, np.int32)))
    state = {"cache": placed_like(run.params, init_cache(cfg, 1, S))}  # as the calls return it

    def prefill(calls=1):  # each call writes the same rows again, the cache passed along
        for _ in range(calls):
            tok, _, state["cache"] = prefill_step(run.params, state["cache"], tokens, lengths,
                                                  zero, zero, 0, cfg)
        return tok

    t_compile = queued_seconds(prefill, calls=1, repeats=1)
    t_prefill = queued_seconds(prefill)
    kernels = common.kernel_times(prefill, calls=2)
    t_device = sum(t for t, _ in kernels.values()) if kernels else None
    return t_prefill, t_compile, t_device, state.pop("cache")


def print_no_cache(run, W, N):
    """The step without a cache (run.t_no_cache, a forward over L tokens) against the cached one.
    Recomputing L tokens reads the weights once too, so it costs max(L x 2N / FLOPS, W / BW):
    about one cached step until L reaches the ridge point, then it grows with L."""
    L = run.no_cache_len
    pred = max(L * 2 * N / run.flops, W / run.bw)
    ridge = W / run.bw * run.flops / (2 * N)
    print(f"without a cache, a token costs a forward over the whole sequence: "
          f"{run.t_no_cache * 1e3:.2f} ms at {L} tokens = "
          f"{run.t_no_cache / run.t_step:.1f}x the cached step; predicted max(L x 2N / "
          f"FLOPS, W / BW) = {pred * 1e3:.2f} ms ({pred / run.t_no_cache:.0%} of the measured "
          f"time): no dearer than a cached step up to L = {ridge:,.0f} tokens, then "
          f"growing with L")
    if L == min(bucket(run.P), run.S):   # the prefill above ran a forward of the same shape
        print(f"  the cached path's prefill, a forward over the same {L} positions: "
              f"{run.t_prefill * 1e3:.2f} ms; the step without a cache takes "
              f"{run.t_no_cache / run.t_prefill:.2f}x it (common.forward makes logits at every "
              f"position and reads training's weights, stacked and unfused; the prefill makes the "
              f"last position's and reads this lesson's fused per-layer matrices)")
    run.row(f"no-cache step, {L} tok", f"{run.t_no_cache * 1e3:.2f} ms",
            f"{run.t_step * 1e3:.2f} cached",
            f"{run.t_no_cache / run.t_step:.1f}x " + ("slower; " if run.t_no_cache >= run.t_step
                                                       else "the time; ") +
            f"predicted {pred * 1e3:.2f} ms")


def time_generate(run):
    """generate() on run.prompt, end to end (median of 3, compiled first): seconds. Its tokens
    become run.ref_tokens, the answer later sections must reproduce. The reference attention,
    as in the steps timed before it (generate's default on a GPU is 08's kernel: section
    "lesson 08's Pallas kernels")."""
    ref = functools.partial(generate, decode_attention=decode_attention_reference)
    ref(run.params, run.cfg, [run.prompt], run.G, cache_len=run.S)  # what the steps did not
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        run.ref_tokens = ref(run.params, run.cfg, [run.prompt], run.G, cache_len=run.S)[0]
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def measure_batch_1(run):
    """Prefill and batch-1 decode against their bounds, and the end-to-end model."""
    cfg, ip, P, G, S = run.cfg, run.params, run.P, run.G, run.S
    run.prompt = run.prompts([P])[0]
    run.t_prefill, t_compile, t_device, cache = time_prefill(run)
    run.t_step, c_step = time_decode(ip, cfg, cache, run.steps)
    # The same steps, PER_CALL to a call: the host's dispatch of a call divided among them.
    t_steps = run.t_steps = time_decode(ip, cfg, filled_cache(cfg, 1, S, P, False), run.steps,
                                        per_call=PER_CALL)[0]
    W, kv, N = weight_bytes(ip), kv_bytes_per_token(cfg), cfg.param_count(embedding=False)
    step_bytes = W + timed_context(P, run.steps) * kv
    # The lecture's P x 2N, and the FLOPs the prefill does: its head runs on the last position
    # only (1B: 2N x P counts 1.26x those, 8B 1.07x), plus the causal attention.
    lecture_prefill, pred_prefill = P * 2 * N / run.flops, cfg.prefill_flops(P) / run.flops
    achieved = step_bytes / run.t_step
    run.section("prefill and decode at batch 1")
    print(f"prefill, {P} tokens: {run.t_prefill * 1e3:.2f} ms (compile {t_compile:.1f} s); "
          f"its FLOPs / FLOPS = {pred_prefill * 1e3:.2f} ms (P x 2N / FLOPS = "
          f"{lecture_prefill * 1e3:.2f} ms); reading the weights takes "
          f"{W / run.bw * 1e3:.2f} ms" + (f"; its kernels, summed: {t_device * 1e3:.2f} ms"
                                          if t_device else ""))
    print(f"decode: {run.t_step * 1e3:.3f} ms/step = {1 / run.t_step:.1f} tok/s (compile "
          f"{c_step:.1f} s), reading {_si(step_bytes, 'B')} per step = {_si(achieved, 'B/s')} = "
          f"{100 * achieved / run.bw:.0f}% of the copy bandwidth; bound {run.bw / step_bytes:.1f} "
          f"tok/s")
    print(f"decode, {PER_CALL} steps per call (decode_steps): {t_steps * 1e3:.3f} ms/step = "
          f"{1 / t_steps:.1f} tok/s = {run.t_step / t_steps:.2f}x one step per call" +
          ("; the host's dispatch of a call was setting the pace" if t_steps < 0.95 * run.t_step
           else ""))
    if run.t_no_cache:
        print_no_cache(run, W, N)
    t_e2e = time_generate(run)
    # The prefill makes the first token: G tokens take G - 1 decode steps.
    pred = lecture_prefill + (G - 1) * W / run.bw
    parts = run.t_prefill + (G - 1) * min(run.t_step, t_steps)
    print(f"end to end, {P} + {G} tokens (generate: a prefill call, then every step in one "
          f"decode_loop call): {t_e2e * 1e3:.1f} ms; P x 2N / FLOPS + (G - 1) x W / BW = "
          f"{pred * 1e3:.1f} ms ({100 * pred / t_e2e:.0f}%); measured prefill + {G - 1} x the "
          f"faster step above = {parts * 1e3:.1f} ms ({100 * parts / t_e2e:.0f}%)")
    run.row(f"decode B=1 {cfg.dtype}", f"{1 / run.t_step:,.1f} tok/s",
            f"{run.bw / step_bytes:,.1f} tok/s", f"{100 * achieved / run.bw:.0f}% of BW")
    run.row(f"decode B=1 {PER_CALL} steps/call", f"{1 / t_steps:,.1f} tok/s",
            f"{run.bw / step_bytes:,.1f} tok/s",
            f"{100 * step_bytes / t_steps / run.bw:.0f}% of BW, {run.t_step / t_steps:.2f}x")
    run.row(f"prefill {P} tokens", f"{run.t_prefill * 1e3:.2f} ms", f"{pred_prefill * 1e3:.2f} ms",
            f"{100 * pred_prefill / run.t_prefill:.0f}% of FLOPS")
    if t_device:
        run.row(f"prefill {P} tokens: kernels", f"{t_device * 1e3:.2f} ms",
                f"{pred_prefill * 1e3:.2f} ms", f"{100 * pred_prefill / t_device:.0f}% of FLOPS")
    run.row(f"end to end {P}+{G}", f"{t_e2e * 1e3:.1f} ms", f"{pred * 1e3:.1f} ms",
            f"{100 * pred / t_e2e:.0f}% of model, {100 * parts / t_e2e:.0f}% of parts")


def measure_int8(run, quality=True):
    """int8 weights and int8 KV: logit error and greedy agreement, teacher-forced on the
    unquantized model's greedy answer (when `quality`); then int8 weights' decode speed."""
    cfg, ip, P, S = run.cfg, run.params, run.P, run.S
    qp = quantize_params(ip, cfg)
    run.section("int8 weights, one scale per output channel" + (
        f"; quality teacher-forced on the {cfg.dtype} model's {run.G} greedy tokens" +
        ("" if run.trained else " (random weights: a trained checkpoint says more)")
        if quality else ""))
    errors = []
    ref = teacher_forced_logits(ip, cfg, run.prompt, run.ref_tokens[:-1], S) if quality else None
    for what, p, kv8 in (("int8 weights", qp, False), ("int8 KV cache", ip, True))[:2 * quality]:
        lg = teacher_forced_logits(p, cfg, run.prompt, run.ref_tokens[:-1], S, kv_int8=kv8)
        errors.append((float(np.sqrt(np.mean((lg - ref) ** 2)) / np.std(ref)),
                       float(np.mean(lg.argmax(-1) == ref.argmax(-1)))))
        print(f"{what:13s}: rms logit error {errors[-1][0]:.4f} x std(logits); greedy token "
              f"agrees at {100 * errors[-1][1]:.1f}% of positions")
    t_q, c_q = time_decode(qp, cfg, filled_cache(cfg, 1, S, P, False), run.steps)
    ctx_bytes = timed_context(P, run.steps) * kv_bytes_per_token(cfg)
    q_bytes, f_bytes = weight_bytes(qp) + ctx_bytes, weight_bytes(ip) + ctx_bytes
    print(f"decode, batch 1, int8 weights: {t_q * 1e3:.3f} ms/step = {1 / t_q:.1f} tok/s (compile "
          f"{c_q:.1f} s) = {run.t_step / t_q:.2f}x {cfg.dtype} (the bytes predict "
          f"{f_bytes / q_bytes:.2f}x); {_si(q_bytes / t_q, 'B/s')} = "
          f"{100 * q_bytes / t_q / run.bw:.0f}% of the copy bandwidth")
    run.row("decode B=1 int8 weights", f"{1 / t_q:,.1f} tok/s", f"{run.bw / q_bytes:,.1f} tok/s",
            f"{run.t_step / t_q:.2f}x {cfg.dtype}")
    t_q8, _ = time_decode(qp, cfg, filled_cache(cfg, 1, S, P, False), run.steps,
                          per_call=PER_CALL)
    print(f"the same, {PER_CALL} steps per call: {t_q8 * 1e3:.3f} ms/step = {1 / t_q8:.1f} tok/s = "
          f"{run.t_steps / t_q8:.2f}x {cfg.dtype} at {PER_CALL} steps per call")
    run.row(f"decode B=1 int8, {PER_CALL} steps/call", f"{1 / t_q8:,.1f} tok/s",
            f"{1 / run.t_steps:,.1f} {cfg.dtype}", f"{run.t_steps / t_q8:.2f}x {cfg.dtype}")
    if errors:
        run.row("int8 weights / KV quality", f"{errors[0][0]:.4f}/{errors[1][0]:.4f}",
                "rms err/std", f"agree {100 * errors[0][1]:.0f}/{100 * errors[1][1]:.0f}%")
    del qp


def measure_kernels(run):
    """The decode step with lesson 08's Pallas kernels: flash-decoding in place of the reference
    attention (which reads every cache position), and the int8 matmul kernel in place of XLA's
    widening of int8 weights."""
    cfg, P, S, B = run.cfg, run.P, run.S, run.batch
    run.section("lesson 08's Pallas kernels in the decode step, batch 1")
    ctx = timed_context(P, run.steps)
    W = weight_bytes(run.params)
    t_ref, _ = time_decode(run.params, cfg, filled_cache(cfg, 1, S, P, False), run.steps)
    t_k, c_k = time_decode(run.params, cfg, filled_cache(cfg, 1, S, P, False), run.steps,
                           decode_attention=pallas_decode_attention)
    step_bytes = W + ctx * kv_bytes_per_token(cfg)
    print(f"batch 1, {cfg.dtype}: flash-decoding {t_k * 1e3:.3f} ms/step = {1 / t_k:,.1f} tok/s "
          f"(compile {c_k:.1f} s); reference attention {t_ref * 1e3:.3f} ms ({t_ref / t_k:.2f}x); "
          f"{100 * step_bytes / t_k / run.bw:.0f}% of the copy bandwidth (batch {B}: the "
          f"section above)")
    run.row("decode B=1 Pallas attn", f"{1 / t_k:,.1f} tok/s", f"{1 / t_ref:,.1f} ref",
            f"{t_ref / t_k:.2f}x, {100 * step_bytes / t_k / run.bw:.0f}% BW")
    qp = quantize_params(run.params, cfg)
    t_x, _ = time_decode(qp, cfg, filled_cache(cfg, 1, S, P, False), run.steps,
                         decode_attention=pallas_decode_attention)
    qp = jax.block_until_ready(with_int8_kernel(qp))
    t_q, c_q = time_decode(qp, cfg, filled_cache(cfg, 1, S, P, False), run.steps,
                           decode_attention=pallas_decode_attention)
    q_bytes = weight_bytes(qp) + ctx * kv_bytes_per_token(cfg)
    print(f"batch   1, int8 weights through XLA, with flash-decoding: {t_x * 1e3:.3f} ms/step = "
          f"{1 / t_x:.1f} tok/s = {t_k / t_x:.2f}x {cfg.dtype} with flash-decoding")
    run.row("decode B=1 int8, Pallas attn", f"{1 / t_x:,.1f} tok/s", f"{1 / t_k:,.1f} {cfg.dtype}",
            f"{t_k / t_x:.2f}x {cfg.dtype}")
    print(f"batch   1, int8 weights through the Pallas int8 matmul: {t_q * 1e3:.3f} ms/step = "
          f"{1 / t_q:.1f} tok/s (compile {c_q:.1f} s) = {t_k / t_q:.2f}x {cfg.dtype} (both with "
          f"flash-decoding), {t_x / t_q:.2f}x XLA's int8; {100 * q_bytes / t_q / run.bw:.0f}% of "
          f"the copy bandwidth")
    run.row("decode B=1 int8 Pallas", f"{1 / t_q:,.1f} tok/s", f"{1 / t_k:,.1f} {cfg.dtype}",
            f"{t_k / t_q:.2f}x, {100 * q_bytes / t_q / run.bw:.0f}% BW")
    del qp


def one_stream_time(w_bytes, cfg, int8):
    """Device seconds of one product whose weight [N, D] holds a step's w_bytes, in the step's
    own form (linear, one row with its zero second row): what the step's products would take if
    they were a single kernel, with no boundary between one matrix and the next. None without
    a device profile."""
    D = cfg.d_model
    if int8:
        N = int(w_bytes // (D + 4))  # a byte per weight, a float32 scale per row
        w = {"qt": jnp.ones((N, D), jnp.int8), "scale": jnp.ones((N,), jnp.float32)}
    else:
        N = int(w_bytes // (D * jnp.dtype(cfg.dtype).itemsize))
        w = {"t": jnp.ones((N, D), cfg.dtype)}
    x = jnp.zeros((2, 1, D), cfg.dtype).at[0].set(1)   # [B, T, D]: the row and its zero row
    product = jax.jit(lambda x, w: linear("btd,nd->btn", x, w, jnp.float32, pad_rows=1))
    times = common.kernel_times(lambda: product(x, w), calls=3)
    return None if times is None else sum(t for t, _ in times.values())


def measure_step_kernels(run):
    """Where a batch-1 decode step's time goes, read from the device's profile: the weight
    matmuls against the bytes they read, and the many small kernels around them (norms, rope,
    cache writes, residual adds), each costing a launch's worth of time
    whatever its size."""
    cfg, P, S = run.cfg, run.P, run.S
    run.section("where a batch-1 decode step's time goes (kernels as the device timed them)")
    print(f"{'weights':>22s} {'step':>8s} {'kernels':>8s} {'matmul':>17s} {'attention':>9s} "
          f"{'the rest':>24s}")
    streams = {}   # weights -> (the step's products, the same bytes as one product [s], the
                   # number of its other kernels)
    for what in (f"{cfg.dtype}", "int8"):
        params = run.params if what == cfg.dtype else \
            jax.block_until_ready(quantize_params(run.params, cfg))
        state = {"cache": filled_cache(cfg, 1, S, P, False), "tok": jnp.zeros((1,), jnp.int32)}
        zero = jnp.zeros((1,), jnp.int32)

        def step():
            state["tok"], _, state["cache"] = decode_step(
                params, state["cache"], state["tok"], zero, zero, 0, cfg=cfg,
                decode_attention=pallas_decode_attention)
            return state["tok"]
        times = common.kernel_times(step, calls=4)
        if times is None:
            print("(no device kernels in the profile: this needs a GPU or TPU)")
            return
        compiled = _decode_jit.lower(params, state["cache"], state["tok"], zero, zero, 0, cfg=cfg,
                                     sampling=GREEDY, decode_attention=pallas_decode_attention)
        mine = weight_kernels(compiled.compile().as_text())
        t_step, _ = time_decode(params, cfg, state.pop("cache"), run.steps,
                                decode_attention=pallas_decode_attention)
        kinds = common.kernel_summary(
            times, lambda n: "matmul" if n in mine else common.kernel_kind(n))
        mm_t, at_t = kinds.get("matmul", (0.0, 0))[0], kinds.get("attention", (0.0, 0))[0]
        if not mm_t:
            print("(no kernel in the profile was found to run a weight product: XLA's kernel "
                  "names have changed?)")
            return
        rest_t = sum(t for k, (t, n) in kinds.items() if k not in ("matmul", "attention"))
        rest_n = sum(n for k, (t, n) in kinds.items() if k not in ("matmul", "attention"))
        W = weight_bytes(params)
        print(f"{what:>22s} {t_step * 1e3:6.2f}ms {sum(n for _, n in kinds.values()):8.0f} "
              f"{mm_t * 1e3:5.2f} ms = {100 * W / mm_t / run.bw:3.0f}% BW {at_t * 1e3:6.2f} ms "
              f"{rest_t * 1e3:5.2f} ms in {rest_n:4.0f} kernels")
        run.row(f"B=1 {what.split()[0]} step: matmuls", f"{mm_t * 1e3:.2f} ms",
                f"{W / run.bw * 1e3:.2f} ms (W / BW)", f"{100 * W / mm_t / run.bw:.0f}% of BW")
        run.row(f"B=1 {what.split()[0]} step: the rest", f"{rest_t * 1e3:.2f} ms",
                f"{rest_n:.0f} kernels", f"{100 * rest_t / t_step:.0f}% of the step")
        busy = mm_t + at_t + rest_t
        if t_step > 1.1 * busy:
            print(f"{'':>22s} the timed step is {(t_step - busy) * 1e3:.2f} ms longer than its "
                  f"kernels: likely the host, dispatching one call per step (the row "
                  f"'{PER_CALL} steps/call' is the check)")
        mm_n = kinds["matmul"][1]
        one = one_stream_time(W, cfg, int8=what == "int8")
        streams[what] = (mm_t, one, rest_n)
        print(f"{'':>22s} the same bytes as one product: {one * 1e3:.2f} ms = "
              f"{100 * W / one / run.bw:.0f}% BW; in {mm_n:.0f} products they take "
              f"{(mm_t - one) * 1e3:.2f} ms more, {(mm_t - one) / mm_n * 1e6:.1f} us a kernel")
        run.row(f"B=1 {what.split()[0]} weights as one stream", f"{one * 1e3:.2f} ms",
                f"{W / run.bw * 1e3:.2f} ms (W / BW)",
                f"{100 * W / one / run.bw:.0f}% of BW; products {mm_t / one:.2f}x it")
    (mm_b, one_b, rest_b), (mm_q, one_q, rest_q) = streams[f"{cfg.dtype}"], streams["int8"]
    print(f"A step at 90% of the bandwidth bound leaves 10% of it for everything that is not "
          f"a weight matmul; each small kernel costs a microsecond or more however little it "
          f"reads, and the {cfg.dtype} step has {rest_b / cfg.n_layers:.1f} of them per layer "
          f"here (int8's {rest_q / cfg.n_layers:.1f}). (Independent kernels overlap in the "
          f"step's graph, DECODE_COMPILER_OPTIONS, so the columns can add up to more than the "
          f"step.) A product kernel pays a fixed cost too, to ramp up and drain: "
          f"int8 products take {mm_b / mm_q:.2f}x less time than {cfg.dtype}'s, where as one "
          f"stream each they would take {one_b / one_q:.2f}x less. A kernel per matrix costs "
          f"int8 more, its bytes streaming half as long.")


def measure_batch(run):
    """Decode throughput at a large batch, with the KV cache in the model's dtype and in int8,
    through the reference attention (which reads and widens every cache position) and through
    lesson 08's flash-decoding kernel (which reads an int8 cache as int8, up to each length)."""
    cfg, B, P = run.cfg, run.batch, run.P
    W = weight_bytes(run.params)
    run.section(f"decode at batch {B}, every row from context {P} (the bounds at the timed "
                f"steps' mean context, {timed_context(P, run.steps)})")
    t = {}
    for kv8 in (False, True):
        b_bytes = W + B * timed_context(P, run.steps) * kv_bytes_per_token(cfg, kv8)
        kv_name = "int8 KV" if kv8 else f"{cfg.dtype} KV"
        for kernel in (False,) if _interpret() else (False, True):  # a CPU: interpreted, slow
            cache = filled_cache(cfg, B, run.S, P, kv8)
            t[kv8, kernel], c_b = time_decode(
                run.params, cfg, cache, run.steps,
                decode_attention=pallas_decode_attention if kernel else None)
            del cache
            tt = t[kv8, kernel]
            what = f"{kv_name}, 08's flash-decoding" if kernel else kv_name
            peer = (f"{t[False, kernel] / tt:.2f}x {cfg.dtype} KV" if kv8 else
                    f"{run.t_step / tt * B:.1f}x B=1" if not kernel else
                    f"{t[kv8, False] / tt:.2f}x reference attention")
            print(f"{what}: {tt * 1e3:.3f} ms/step = {B / tt:,.0f} tok/s (compile {c_b:.1f} s), "
                  f"{peer}; {_si(b_bytes / tt, 'B/s')} = {100 * b_bytes / tt / run.bw:.0f}% of "
                  f"the copy bandwidth")
            run.row(f"decode B={B} {what}", f"{B / tt:,.0f} tok/s",
                    f"{B * run.bw / b_bytes:,.0f} tok/s", peer)
    if _interpret():
        return
    # At a long context the cache outweighs the weights, and an int8 cache pays: the bytes per
    # step fall by nearly half the cache's share.
    S_long, P_long = LONG_CONTEXT
    print(f"at context {P_long} (flash-decoding):")
    t_long, b_long = {}, {}
    for kv8 in (False, True):
        cache = filled_cache(cfg, B, S_long, P_long, kv8)
        t_long[kv8], _ = time_decode(run.params, cfg, cache, run.steps,
                                     decode_attention=pallas_decode_attention)
        del cache
        b_long[kv8] = W + B * timed_context(P_long, run.steps) * kv_bytes_per_token(cfg, kv8)
        print(f"  {'int8' if kv8 else cfg.dtype} KV: {t_long[kv8] * 1e3:.3f} ms/step = "
              f"{B / t_long[kv8]:,.0f} tok/s, {_si(b_long[kv8], 'B')} per step = "
              f"{100 * b_long[kv8] / t_long[kv8] / run.bw:.0f}% of the copy bandwidth")
    gain, bytes_gain = t_long[False] / t_long[True], b_long[False] / b_long[True]
    print(f"  int8 KV: {gain:.2f}x {cfg.dtype} KV; the bytes say {bytes_gain:.2f}x")
    run.row(f"decode B={B} ctx {P_long} int8 KV", f"{B / t_long[True]:,.0f} tok/s",
            f"{B / t_long[False]:,.0f} {cfg.dtype} KV", f"{gain:.2f}x (bytes {bytes_gain:.2f}x)")


def measure_stream(run):
    """Static against continuous batching on one burst of requests with a long tail of answer
    lengths, as chat traffic has: TTFT and TPOT per request and in aggregate."""
    cfg, P, G, S = run.cfg, run.P, run.G, run.S
    slots, n = run.slots, run.requests
    p_lo, p_hi = max(P // 16, 1), max(P // 2, 1)
    longs = run.rng.random(n) < 0.25
    news = np.where(longs, run.rng.integers(3 * G // 2, 2 * G + 1, n),
                    run.rng.integers(max(G // 16, 1), max(G // 2, 1) + 1, n))
    reqs = [Request(p, int(m)) for p, m in zip(run.prompts(run.rng.integers(p_lo, p_hi + 1, n)),
                                               news)]
    run.section(f"{n} requests at once into {slots} slots: prompts of {p_lo}..{p_hi} tokens, "
                f"answers of {int(news.min())}..{int(news.max())} ({int(longs.sum())} of them "
                f"long)")
    pad = bucket(p_hi)
    results = {}
    for policy, serve in (("static", serve_static), ("continuous", serve_continuous)):
        t0 = time.perf_counter()
        serve = functools.partial(serve, decode_attention=decode_attention_reference)
        serve(run.params, cfg, [Request(reqs[0].prompt, 2)] * 2, slots, S, prompt_pad=pad)
        compile_s = time.perf_counter() - t0           # the warm-up compiles this policy's shapes
        served, seconds = serve(run.params, cfg, reqs, slots, S, prompt_pad=pad)
        results[policy] = (served, _stats(served, seconds), compile_s)
    print(f"{'req':>4} {'prompt':>6} {'new':>4} | {'static TTFT':>12} {'TPOT':>9} | "
          f"{'continuous TTFT':>15} {'TPOT':>9}")
    for i, r in enumerate(reqs):
        s, c = results["static"][0][i], results["continuous"][0][i]
        print(f"{i:4d} {len(r.prompt):6d} {r.max_new_tokens:4d} | {s.ttft_s * 1e3:9.1f} ms "
              f"{s.tpot_s * 1e3:6.2f} ms | {c.ttft_s * 1e3:12.1f} ms {c.tpot_s * 1e3:6.2f} ms")
    print("(times by the host's clock, when it received each token: TPOT = (last - first) / "
          "(tokens - 1)" + ("; on a CPU the host shares its cores with the computation and can "
                            "take a first token late, so a short answer's TPOT may read below "
                            "one decode step)" if jax.devices()[0].platform == "cpu" else ")"))
    for policy, (_, st, compile_s) in results.items():
        tpot = ("no TPOT (every answer one token)" if math.isnan(st["tpot_mean"]) else
                f"TPOT mean {st['tpot_mean'] * 1e3:.2f} ms")
        print(f"{policy:10s}: {st['tokens']:,} tokens in {st['seconds']:.3f} s = "
              f"{st['tok_s']:,.0f} tok/s; TTFT mean {st['ttft_mean'] * 1e3:.0f} ms, p90 "
              f"{st['ttft_p90'] * 1e3:.0f} ms; {tpot} (compile {compile_s:.1f} s)")
    same = sum(s.tokens == c.tokens for s, c in zip(results["static"][0],
                                                     results["continuous"][0]))
    ratio = results["continuous"][1]["tok_s"] / results["static"][1]["tok_s"]
    print(f"continuous / static: {ratio:.2f}x the throughput; {same}/{n} requests got the same "
          f"tokens from both")
    run.row(f"stream {n} req, {slots} slots", f"{results['continuous'][1]['tok_s']:,.0f} tok/s",
            f"{results['static'][1]['tok_s']:,.0f} static", f"{ratio:.2f}x static")


def expected_tokens_per_round(alpha, gamma):
    """Tokens a round of `gamma` draft tokens yields when each is accepted independently with
    chance alpha (Leviathan et al. 2023, eq. 1): (1 - alpha^(gamma+1)) / (1 - alpha), the
    accepted drafts and the target's own token; gamma + 1 at alpha = 1, where it is 0 / 0."""
    return (1 - alpha ** (gamma + 1)) / (1 - alpha) if alpha < 1 else gamma + 1


def speedup_from_bytes(tokens, rounds, gamma, c):
    """Speculative decoding's speed-up over the target alone if every step takes its weights'
    bytes: `tokens` in `rounds` rounds, each gamma + 1 draft steps of c target steps (c: the
    draft's bytes over the target's) and one verification of ~1 (the weights read once for all
    gamma + 1 tokens)."""
    return tokens / rounds / ((gamma + 1) * c + 1)


def measure_speculative(run, draft=None):
    """Speculative decoding against the measured batch-1 decode; the draft: `draft` (name, cfg,
    params) if given, else the target's own first draft_layers layers in int8."""
    cfg, ip, g, G = run.cfg, run.params, run.ic.gamma, run.G
    if draft is None:
        dp, dcfg = draft_params(ip, cfg, run.ic.draft_layers)
        what = f"the target's first {dcfg.n_layers} layers in int8"
    else:
        dname, dcfg, dp = draft
        what = f"{dname}, {dcfg.n_layers} layers of d_model {dcfg.d_model}"
    c = weight_bytes(dp) / weight_bytes(ip)
    runs = []
    for _ in range(4):  # the first run compiles; the median of the other three is kept
        tokens, st = speculative_generate(ip, cfg, dp, dcfg, [run.prompt], G, gamma=g,
                                          cache_len=run.S,
                                          decode_attention=decode_attention_reference)
        runs.append(st)
    st = sorted(runs[1:], key=lambda r: r["decode_s"])[1]
    if run.ic.temperature > 0:
        sampled = measure_speculative_sampling(run, dp, dcfg)
    # The parts of a round, each timed inside one compiled loop as the round runs them (no
    # dispatch between them): the draft's step, and the target's verification of gamma + 1
    # tokens.
    t_draft, _ = time_decode(dp, dcfg, filled_cache(dcfg, 1, run.S, run.P, False), run.steps,
                             decode_attention=decode_attention_reference, per_call=run.steps)
    del dp
    n = run.steps

    @jax.jit
    def verify(p, cache, chunk):  # n verifications, each fed the last one's argmax
        def one(_, chunk):
            logits, _ = forward_cached(p, cache, chunk, cfg, decode_attention_reference)
            return jnp.argmax(logits, axis=-1).astype(jnp.int32)
        return lax.fori_loop(0, n, one, chunk)
    t_verify = common.bench(verify, ip, filled_cache(cfg, 1, run.S, run.P, False),
                            jnp.zeros((1, g + 1), jnp.int32), iters=3).median_s / n
    a, per_round, tok_s = st["acceptance"], st["tokens_per_round"], (G - 1) / st["decode_s"]
    # Against the target decoding alone at generate's pace: its steps in one call, which the
    # faster of the two step timings stands for (one per call can be held back by the host).
    t_step = min(run.t_step, run.t_steps)
    # A round yields per_round tokens (Leviathan et al. 2023, eq. 1: (1 - alpha^(gamma+1)) /
    # (1 - alpha) if every judged draft token were accepted with the same chance alpha; printed
    # beside the count, the gap says how far acceptances are from independent) and costs
    # gamma + 1 draft steps plus one verification. In target steps: by the bytes, a draft step
    # is c and verifying ~1 (the weights are read once for all gamma + 1 tokens); measured,
    # they are what they take, over the rounds that ran (the last can make up to gamma tokens
    # past the G - 1 asked for: at G = 32 and 5 tokens a round, 7 rounds for 31 tokens).
    pred = speedup_from_bytes(G - 1, st["rounds"], g, c)  # the tokens delivered, as measured
    pred_t = (G - 1) * t_step / (st["rounds"] * ((g + 1) * t_draft + t_verify))
    same = next((i for i, (x, y) in enumerate(zip(tokens[0], run.ref_tokens)) if x != y), G)
    run.section(f"speculative decoding, gamma {g}; draft: {what}, {100 * c:.0f}% of the "
                f"target's bytes")
    alpha = st["alpha"]
    eq1 = expected_tokens_per_round(alpha, g)
    print(f"acceptance {100 * a:.1f}% of the proposed tokens, alpha {100 * alpha:.1f}% of the "
          f"judged ones; {st['tokens_per_round']:.2f} tokens per round (eq. 1 at alpha: "
          f"{eq1:.2f}), {st['rounds']} rounds; "
          f"{tok_s:.1f} tok/s against {1 / t_step:.1f} alone = {tok_s * t_step:.2f}x; "
          f"the model predicts {pred:.2f}x from the bytes, {pred_t:.2f}x from the measured steps "
          f"(draft {t_draft * 1e3:.3f} ms x {g + 1}, verification {t_verify * 1e3:.3f} ms, target "
          f"{t_step * 1e3:.3f} ms); output equal to the target's alone for {same}/{G} tokens")
    run.row(f"speculative gamma={g}", f"{tok_s:,.1f} tok/s", f"{1 / t_step:,.1f} plain",
            f"{tok_s * t_step:.2f}x (predicted {pred_t:.2f}x), acc {100 * a:.0f}%")
    if run.ic.temperature > 0:
        st, tok_s, plain = sampled
        print(f"sampling (temperature {run.ic.temperature}, top_k {run.ic.top_k}, top_p "
              f"{run.ic.top_p}): acceptance {100 * st['acceptance']:.1f}%, alpha "
              f"{100 * st['alpha']:.1f}%, "
              f"{st['tokens_per_round']:.2f} tokens per round; {tok_s:.1f} tok/s against "
              f"generate's {plain:.1f} = {tok_s / plain:.2f}x")
        run.row(f"speculative sampling gamma={g}", f"{tok_s:,.1f} tok/s",
                f"{plain:,.1f} generate", f"{tok_s / plain:.2f}x, acc "
                f"{100 * st['acceptance']:.0f}%")


def measure_speculative_sampling(run, dp, dcfg):
    """(statistics, tok/s) of speculative sampling at the sample's temperature, top_k and top_p,
    and the tok/s of generate's decode with the same settings (its time for G tokens less its
    time for 1, the prefill)."""
    ic = run.ic
    kw = dict(temperature=ic.temperature, top_k=ic.top_k, top_p=ic.top_p, seed=ic.seed,
              cache_len=run.S, decode_attention=decode_attention_reference)

    def seconds(n):   # after a first call that compiles, the median of three
        generate(run.params, run.cfg, [run.prompt], n, **kw)
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            generate(run.params, run.cfg, [run.prompt], n, **kw)
            times.append(time.perf_counter() - t0)
        return float(np.median(times))
    for _ in range(2):  # the first run compiles
        _, st = speculative_generate(run.params, run.cfg, dp, dcfg, [run.prompt], run.G,
                                     gamma=ic.gamma, **kw)
    return st, (run.G - 1) / st["decode_s"], (run.G - 1) / (seconds(run.G) - seconds(1))


def continue_prompt(ip, cfg, tok, ic, cache_len=None):
    """--prompt's continuation under the sampling flags, as token ids."""
    ids = tok.encode(ic.prompt)
    if cache_len and len(ids) + ic.max_new_tokens > cache_len:
        cache_len = None  # else the compiled decode step of that cache length is reused
    return generate(ip, cfg, [ids], ic.max_new_tokens, ic.temperature, ic.top_k, ic.top_p,
                    ic.seed, cache_len=cache_len,
                    stop_tokens=[t for t in tok.stop if t < cfg.vocab_size])[0]


def continue_prompt_speculative(ip, cfg, tok, ic, draft):
    """The same, drafted by `draft` (load_draft's triple): (token ids, the rounds' statistics)."""
    _, dcfg, dp = draft
    out, stats = speculative_generate(
        ip, cfg, dp, dcfg, [tok.encode(ic.prompt)], ic.max_new_tokens, gamma=ic.gamma,
        stop_tokens=[t for t in tok.stop if t < cfg.vocab_size], temperature=ic.temperature,
        top_k=ic.top_k or None, top_p=ic.top_p, seed=ic.seed)
    return out[0], stats


def readable(text):
    """A prompt as it can be printed: bytes that were not UTF-8 shown as replacement marks."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def show_sample(run):
    ic, tok = run.ic, run.tokenizer
    if tok is None or not ic.max_new_tokens:
        return
    out = continue_prompt(run.params, run.cfg, tok, ic, run.S)
    note = "" if run.trained else " (random weights: expect noise; 09_train.py makes a model)"
    run.section(f"sample: temperature {ic.temperature}, top_k {ic.top_k}, top_p {ic.top_p}{note}")
    print(readable(ic.prompt) + tok.decode(out))
    blank_answer_hint(tok.decode(out), ic)


def blank_answer_hint(text, ic):
    """A briefly trained byte model's likeliest next byte is often a space or a newline, again
    and again: greedy decoding then prints nothing to read. Said, with the way out."""
    if ic.temperature == 0 and text and not text.strip():
        print(f"(the greedy answer is {len(text)} characters of whitespace: this model's likeliest "
              f"next character is a space or a newline each time; --temperature=0.8 --top_p=0.9 "
              f"samples instead)")


def sample_only(models, ic, draft=None):
    """--sample_only: the text tool. Each model continues --prompt, drafted by `draft` (--draft)
    if given; no measurements."""
    for name, cfg, params, tok in models:
        if tok is None or params is None:
            raise common.UserError(f"--sample_only needs a trained model: {name} would have "
                                   f"random weights (give --checkpoint=DIR, or run 09_train.py)")
        t0 = time.perf_counter()
        ip = jax.block_until_ready(inference_params(params, cfg))
        t1 = time.perf_counter()
        if draft is None or ic.max_new_tokens == 0:
            out, note = continue_prompt(ip, cfg, tok, ic), ""
        else:
            out, stats = continue_prompt_speculative(ip, cfg, tok, ic, draft)
            note = (f"; drafted by {draft[0]}, gamma {ic.gamma}: {stats['acceptance']:.0%} of "
                    f"the draft's tokens accepted" if stats["proposed"] else
                    f"; no speculative round ran (the prefill makes the one token)")
        t2 = time.perf_counter()
        print(readable(ic.prompt) + tok.decode(out))
        blank_answer_hint(tok.decode(out), ic)
        print(f"({name}: {len(out)} tokens in {t2 - t1:.1f} s, compilation included; weights "
              f"ready in {t1 - t0:.1f} s{note})")


def lesson_lengths(cfg, ic, on_gpu, full=True):
    """The lesson's prompt, generated and cache lengths (P, G, S) for this model; `full`: it also
    serves the request stream and decodes speculatively (the first model of --models)."""
    P = ic.prompt_len or (256 if on_gpu else 64)
    G = ic.gen_len or (128 if on_gpu else 32)
    if G < 2:  # the first token comes from the prefill: decoding starts at the second
        raise common.UserError(f"gen_len={G}: the lesson times the decode steps after the "
                               f"first token, so it needs gen_len >= 2")
    # The last token is not cached; a speculative round writes gamma past it.
    gamma = ic.gamma if full else 0
    need = P + G - 1 + gamma
    if need > cfg.max_seq_len:
        terms = ("prompt_len + gen_len - 1 + gamma", f" + {gamma}") if full else \
            ("prompt_len + gen_len - 1", "")
        raise common.UserError(f"{terms[0]} = {P} + {G} - 1{terms[1]} = {need} exceeds the "
                               f"model's max_seq_len={cfg.max_seq_len}: use shorter lengths"
                               + (" or a smaller gamma" if full else ""))
    stream = max(P // 2, 1) + 2 * G - 1 if full else 0  # the stream's longest (measure_stream)
    if stream > cfg.max_seq_len:
        raise common.UserError(f"the request stream's longest request, prompt_len / 2 + 2 x "
                               f"gen_len - 1 = {stream}, exceeds the model's max_seq_len="
                               f"{cfg.max_seq_len}: use a shorter --gen_len (or --prompt_len)")
    # The timed decode steps (time_decode) run on a cache filled to P and write every step into
    # it: a first call of PER_CALL steps (4 more before a profile), or of `steps` for the draft,
    # then 3 runs of `steps`, each at least one call of PER_CALL steps when timed that way.
    steps = ic.steps or (32 if on_gpu else 8)
    first = PER_CALL + 4
    timed = P + max(first, steps) + 3 * max(steps, PER_CALL)
    written = f"max({first}, steps) + 3 x max(steps, {PER_CALL})"
    room = min(cfg.max_seq_len - P,  # and on a GPU the rows at a long context, from theirs
               LONG_CONTEXT[0] - LONG_CONTEXT[1] if on_gpu else math.inf)
    if timed - P > room:
        if room < first + 3 * PER_CALL:
            raise common.UserError(f"prompt_len={P} leaves no room in the model's max_seq_len="
                                   f"{cfg.max_seq_len} for the timed decode steps: use a "
                                   f"shorter --prompt_len")
        most = room // 4 if room >= 4 * first else (room - first) // 3
        where = f" or the context-{LONG_CONTEXT[1]} rows' cache" if on_gpu else ""
        raise common.UserError(f"steps={steps}: the timed decode steps write prompt_len + "
                               f"{written} positions, past what the model{where} holds: use "
                               f"--steps={most} or fewer")
    need = max(need, stream, timed)
    S = ic.cache_len or bucket(need, 128)
    if need > S or S > cfg.max_seq_len:
        given = "" if ic.cache_len else f" (cache_len=0 picks {S})"
        holds = (f"prompt_len + gen_len - 1 + gamma, prompt_len / 2 + 2 x gen_len - 1 and "
                 if full else "prompt_len + gen_len - 1 and ")
        raise common.UserError(f"cache_len={S}{given} must hold {holds}prompt_len + {written}, "
                               f"{need}, and fit the model's max_seq_len={cfg.max_seq_len}")
    return P, G, S


def check_before_the_run(models, ic, on_gpu, draft):
    """What would fail late in the lesson or the sample, refused before either starts."""
    try:
        ic.prompt.encode("utf-8")
    except UnicodeEncodeError:
        if any(tok is not common.BYTES for *_, tok in models):
            raise common.UserError("--prompt is not valid UTF-8 text") from None
    for i, (name, cfg, _, tok) in enumerate(models):
        if tok is not None and ic.max_new_tokens:
            ids = tok.encode(ic.prompt)
            if not ids:
                raise common.UserError("--prompt encodes to no tokens: give the sample some text")
            room = ic.gamma if draft is not None and ic.sample_only and ic.max_new_tokens > 1 else 0
            check_prompts([ids], cfg, ic.max_new_tokens, extra=room)
        if not ic.sample_only:
            try:  # only the first model serves the stream and decodes speculatively
                _, _, S = lesson_lengths(cfg, ic, on_gpu, full=i == 0)
            except common.UserError as e:
                raise (common.UserError(f"models={name}: {e}") if len(models) > 1 else e) \
                    from None
            if i == 0 and draft is not None and S > draft[1].max_seq_len:
                raise common.UserError(f"the lesson's cache of {S} positions is past the draft's "
                                       f"max_seq_len={draft[1].max_seq_len}: use shorter "
                                       f"--prompt_len and --gen_len, or another --draft")
            slots, batch = ic.slots or (16 if on_gpu else 4), ic.batch or (64 if on_gpu else 16)
            common.check_fits(f"models={name} batch={batch} slots={slots}",
                              2 * cfg.param_count() * jnp.dtype(cfg.dtype).itemsize
                              + (batch + slots) * S * kv_bytes_per_token(cfg),
                              "two copies of its weights (as built, and in the inference "
                              "layout) and the KV caches of the batch and of the slots")
    if not ic.sample_only and ic.draft_layers > models[0][1].n_layers:
        raise common.UserError(f"draft_layers={ic.draft_layers} exceeds the model's "
                               f"{models[0][1].n_layers} layers")


def lesson(name, cfg, params, tokenizer, ic, on_gpu, peaks, corpus, full=True, draft=None):
    """Every measurement on one model (only the speeds unless `full`, to keep a run of several
    models short); returns the rows of the final table. draft: speculative decoding's draft
    model (load_draft), else the target's own int8 copy."""
    t0 = time.perf_counter()
    print(f"\n=== {name}: {_si(cfg.param_count(), '')} params, {cfg.n_layers} layers, "
          f"d_model {cfg.d_model}, {cfg.n_heads} heads / {cfg.n_kv_heads} kv heads of "
          f"{cfg.head_dim}, d_ff {cfg.d_ff}, vocab {cfg.vocab_size}, {cfg.dtype} ===")
    P, G, S = lesson_lengths(cfg, ic, on_gpu, full)
    trained = params is not None
    if not trained:
        params = random_params(cfg, ic.seed, on_gpu)
    ip = jax.block_until_ready(inference_params(params, cfg))
    print(f"weights ready in {time.perf_counter() - t0:.1f} s")
    slots = ic.slots or (16 if on_gpu else 4)
    run = Run(name, cfg, ip, tokenizer, ic, peaks["matmul_flops"], peaks["copy_bw"], P, G, S,
              steps=ic.steps or (32 if on_gpu else 8), batch=ic.batch or (64 if on_gpu else 16),
              slots=slots, requests=ic.requests or 3 * slots, rng=np.random.default_rng(ic.seed),
              corpus=corpus, trained=trained, t0=t0)
    show_arithmetic(run)
    if full:
        check_full_recompute(run, params)
    del params  # from here on only the inference layout is kept
    measure_batch_1(run)
    measure_int8(run, quality=full)
    measure_batch(run)
    if on_gpu:
        measure_kernels(run)
        measure_step_kernels(run)
    if full:
        measure_stream(run)
        measure_speculative(run, draft)
    show_sample(run)
    print(f"\n({name}: {time.perf_counter() - t0:.0f} s)")
    return run.rows


# gpt-fast's decode (pytorch-labs/gpt-fast at 32971d3: generate.py's loop, decode_one_token
# compiled with mode="reduce-overhead", its default sampling, 200 tokens after a 6-token prompt,
# random bf16 weights; int8: its WeightOnlyInt8QuantHandler), tok/s as it counts them; the
# command and the run are in BENCHMARKS.md.
GPT_FAST = {"H100 SXM": (159.3, 185.9, "torch 2.11, 2026-11-23"),
            "H200 SXM": (193.5, 197.2, "an earlier run")}


def main():
    ic = common.parse_flags(InferConfig())
    ic = dataclasses.replace(ic, prompt=common.unescape(ic.prompt))
    t0 = time.perf_counter()
    on_gpu = jax.devices()[0].platform == "gpu"
    models, which = load_model(ic, on_gpu)
    print(which)
    dtype = models[0][1].dtype
    draft = load_draft(ic.draft, models[0][1], models[0][3]) if ic.draft else None
    check_before_the_run(models, ic, on_gpu, draft)
    if ic.sample_only:
        return sample_only(models, ic, draft)
    peaks = common.measure_peaks(dtype=dtype)
    line = (f"measured on {jax.devices()[0].device_kind}: {dtype} matmul "
            f"{_si(peaks['matmul_flops'], 'FLOP/s')}, copy {_si(peaks['copy_bw'], 'B/s')}")
    if common.device_chip() is not None:  # else ceilings() would repeat the measurement
        flops_ds, bw_ds, basis = common.ceilings(dtype)
        line += f"; {basis}: {_si(flops_ds, 'FLOP/s')}, {_si(bw_ds, 'B/s')}"
    print(line)
    corpus = None
    if any(tok is not None for *_, tok in models):
        corpus = common.load_corpus(max_bytes=2 * 2**20)[0].tobytes()
    rows, first = [], True
    while models:  # popped, so that a model's weights are freed before the next one's
        rows += lesson(*models.pop(0), ic, on_gpu, peaks, corpus, full=first, draft=draft)
        first, draft = False, None
    w = max([28] + [len(r[1]) for r in rows])
    print(f"\n{'model':14s} {'measurement':{w}s} {'measured':>15s} {'bound / peer':>15s}  ratio")
    for r in rows:
        print(f"{r[0]:14s} {r[1]:{w}s} {r[2]:>15s} {r[3]:>15s}  {r[4]}")
    chip = common.device_chip()
    for name, (bf16, int8, how) in GPT_FAST.items():
        if on_gpu and (chip is None or chip.name == name):
            print(f"peer, from another run on an {name}: gpt-fast (its generate.py, "
                  f"torch.compile), Llama-3-8B shape, batch 1: bf16 {bf16} tok/s, int8 weights "
                  f"{int8} tok/s ({how})")
    print(f"total {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    common.run(main, smaller="try smaller --models, or a smaller --batch, --slots, --requests or "
                             "--cache_len")
