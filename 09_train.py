"""Train the course's Llama-style model end to end: one device, many devices, many hosts.

    python 09_train.py                                    # `small` on the Python stdlib's source
    python 09_train.py --preset=tiny --seq_len=128 --steps=50 --data=input.txt --out_dir=out/tiny
    python 09_train.py --mesh=dp:2,fsdp:2,tp:2 --remat=dots --attention=flash
    python 09_train.py --coordinator=10.0.0.1:1234 --num_processes=2 --process_id=0   # per host
    python 09_train.py --init_from=Llama-3.2-1B --data=my_texts/ --lr=3e-5 --export_hf=tuned
    python 09_train.py --preset=llama-3.2-1b --tokenizer=Llama-3.2-1B --data=my_texts/

What it puts together, lesson by lesson:
- the model of common.py, its parameters born sharded: init_params is jit'd with out_shardings
  derived from each parameter's logical axes (lesson 03), and activations are pinned to the same
  rules inside forward (`constrain`); the batch is split over dp x fsdp;
- with tp, optional sequence parallelism (--sequence_parallel=true; Korthikanti et al. 2022):
  between the tensor-parallel matmuls the residual stream's tokens are split over tp too, so
  each all-reduce becomes a reduce-scatter and an all-gather and the activations kept for the
  backward pass shrink. XLA's partitioner does it from the sharding rules alone
  (common.sequence_parallel_rules); BENCHMARKS.md measures what it saves and what it costs;
- AdamW (Loshchilov & Hutter 2019) written out below, linear warmup then cosine decay (the
  peak, unless --lr says otherwise, inversely proportional to the model's width: default_lr),
  global-norm clipping, gradient accumulation over micro-batches, float32 master weights and
  optimizer state with the forward pass in bf16 (Micikevicius et al. 2018), optional
  rematerialization (remat=full recomputes each layer; dots keeps only matmul outputs);
- 8-bit training (--fp8=true): every layer's matmul, forward and backward, on fp8 inputs with a
  scale per tensor (lesson 07's fp8_einsum; the output head stays bf16), the master weights
  still float32; validation and samples run the plain bf16 model. Each scale comes from the
  tensor's own maximum, or with --fp8_scaling=delayed from the maximum recorded at the step
  before (lesson 07's fp8_einsum_delayed), so the conversion need not wait for it; the
  recorded maxima live with the optimizer state, and a fresh run records its first ones in one
  unquantized pass before step 1;
- attention chosen by flag: naive (common), flash (lesson 05), pallas (lesson 08), cudnn;
- the layers unrolled into one program (--scan_layers=true loops one compiled layer instead:
  faster to compile, slower to run, because XLA's loop copies buffers from one iteration to the
  next), a loss that widens the logits to float32 only inside its reductions and writes
  their gradient in one pass, in bf16 (common.cross_entropy), and an embedding lookup whose
  gradient sums the tokens' rows in float32 (common.embed: a bf16 scatter-add rounds at every
  add, and ran slowly);
- each step's batch cut and copied to the devices on a thread, two steps ahead of the step
  (prefetched): made in the loop, they held a small model's step to the host's pace;
- checkpoints written atomically to --out_dir (params, optimizer state, step; the data position
  is the step, since batches are a pure function of (seed, step)), on a thread while the next
  steps train; rerunning with the same --out_dir resumes and reaches exactly the loss an
  uninterrupted run reaches; a second run started on an --out_dir that a run still holds is
  refused; Ctrl-C or SIGTERM lets the step in flight end and saves it before stopping (a second
  stops at once), and with several processes a SIGTERM or Ctrl-C to any one of them stops all
  at one step, saved;
- fine-tuning (--init_from=DIR, a Hugging Face Llama directory): the model's shape from its
  config.json, the first step from its weights, and the data read as its tokenizer.json's tokens
  (through the `tokenizers` package) rather than bytes; the checkpoints carry that tokenizer.json;
  --tokenizer=DIR reads the data so for a model trained from scratch, its vocabulary sized to
  the tokenizer's ids;
- --export_hf=DIR: at the end, the trained model as a Hugging Face Llama directory
  (common.save_hf_llama): config.json, the weights in the compute dtype as safetensors, and the
  tokenizer.json of the tokens it trained on (bytes, or --init_from's or --tokenizer's); 06,
  transformers and other tools that read Llama checkpoints load it;
- many hosts through JAX's multi-controller runtime: every process runs this same program on its
  own devices and reads only its own rows of each batch. Process 0 writes the checkpoints and
  every process resumes from --out_dir, so it must be a directory all hosts see (shared storage).

Each logged step prints loss, learning rate, gradient norm, ms/step, tokens/s and MFU: model
FLOPs (6N plus causal attention, common.Config.train_flops_per_token) per second over the peak of
all devices (the datasheet when common.CHIPS knows the chip, else the matmul rate measured here;
simulated CPU devices share their host, whose measured rate counts once a process).
Logged steps also go to <out_dir>/metrics.jsonl, and the loss curve to <out_dir>/loss.png.
"""
import collections
import concurrent.futures
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import os
import re
import signal
import socket
import sys
import threading
import time
import zlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding

import common

@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "small"        # a common.PRESETS name
    init_from: str = ""          # a Hugging Face Llama directory to fine-tune: its config.json
                                 # replaces --preset, its weights the random init, and the data
                                 # are read as its tokenizer.json's tokens (not bytes)
    tokenizer: str = ""          # a directory with a tokenizer.json (a Hugging Face checkpoint's),
                                 # or that file: train --preset from scratch on its tokens, the
                                 # vocabulary sized to its ids; empty: bytes (vocabulary 256)
    steps: int = 150             # total optimizer steps (also the length of the cosine)
    batch_size: int = 8          # global sequences per step, over all devices and micro-batches
    seq_len: int = 256           # tokens per sequence
    grad_accum: int = 1          # micro-batches per step (gradients averaged before the update)
    lr: float | None = None      # peak learning rate; none: 1e-3 x 384 / d_model (default_lr),
                                 # or 2e-5 when fine-tuning (--init_from)
    min_lr: float | None = None  # end of the cosine; none: a tenth of the peak
    warmup: int = 20             # steps of linear warmup
    weight_decay: float = 0.1    # decoupled, on matrices only
    b1: float = 0.9              # AdamW's decay of the gradient's running mean
    b2: float = 0.95             # ... and of its running square
    grad_clip: float = 1.0       # global-norm threshold; 0 disables
    dtype: str = "auto"          # compute dtype: float32, bfloat16, or auto (bf16 on GPU/TPU)
    mesh: str = ""               # e.g. dp:2,fsdp:2,tp:2; empty: FSDP over all devices
    sequence_parallel: bool = False  # with tp: norms and residual adds on 1/tp of the tokens
    remat: str = "none"          # none | full | dots
    fp8: bool = False            # layers' matmuls in fp8 (lesson 07); MFU still over bf16 peak
    fp8_scaling: str = "current"  # with fp8: current (each tensor's own max) or delayed (the max
                                 # the step before saw, kept with the optimizer state)
    scan_layers: bool = False    # loop one compiled layer (fast compile) or unroll (fast step)
    attention: str = "auto"      # naive | flash | pallas | cudnn | auto (cudnn on GPU in bf16;
                                 # pallas with --xla_gpu_deterministic_ops, or with --doc_mask
                                 # on an H100/H200 or over documents shorter than a window)
    doc_mask: bool = False       # a token attends only within its document (file), as Llama 3
                                 # trained; windows still span documents
    seed: int = 0                # of the init and of the batches' order
    data: str = ""               # file or directory of text; empty: the Python stdlib's source
    max_data_mb: int = 64        # read at most this many MiB of it (held in host memory)
    out_dir: str = "out"         # checkpoints and metrics.jsonl; rerun to resume
    ckpt_every: int = 100        # steps between checkpoints (and one at the end); 0: none
    ckpt_keep: int = 2           # the newest checkpoints kept; older ones are deleted
    log_every: int = 10          # steps between log lines (each waits for its step)
    eval_every: int = 50         # validation loss every N steps (and at the end)
    eval_batches: int = 4        # validation batches per evaluation
    sample_len: int = 200        # tokens generated at the end (bytes, or the tokenizer's)
    sample_prompt: str = "def "  # what they continue (06_kv_cache_inference.py samples faster);
                                 # on the command line \n, \t and \\ are a newline, tab, backslash
    export_hf: str = ""          # at the end, also write the model here as a Hugging Face Llama
                                 # directory (a new one), in the compute dtype with its data's
                                 # tokenizer.json; rerun a finished run with it to export it alone
                                 # (from its last checkpoint: --ckpt_every=0 keeps none)
    breakdown: bool = False      # time forward, backward and optimizer apart, then stop
    coordinator: str = ""        # HOST:PORT of process 0, for multi-host runs
    num_processes: int = 1       # hosts (processes) in a multi-host run
    process_id: int = 0          # this process's rank, 0 .. num_processes - 1
    join_timeout: int = 300      # seconds for every process to join (and for process 0 to answer)

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len", "grad_accum", "log_every", "eval_every",
                  "eval_batches", "num_processes", "join_timeout", "ckpt_keep", "max_data_mb"):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("warmup", "ckpt_every", "sample_len", "process_id", "min_lr", "weight_decay",
                  "grad_clip", "seed"):
            if getattr(self, f) is not None and not 0 <= getattr(self, f) < math.inf:  # (NaN too)
                raise common.UserError(f"{f} must be >= 0, got {getattr(self, f)}")
        if self.seed >= 2**31:  # a jax.random key's seed and numpy's, as the CLI checks
            raise common.UserError(f"seed must be below 2**31, got {self.seed}")
        for f in ("steps", "warmup"):  # the schedule and AdamW's count are int32 on the device
            if getattr(self, f) >= 2**31:
                raise common.UserError(f"{f} must be below 2**31, got {getattr(self, f)}")
        # (the schedule runs in float32, where XLA flushes subnormal numbers to 0)
        if self.lr is not None and not np.finfo(np.float32).tiny <= self.lr < math.inf:
            raise common.UserError(f"lr must be > 0 (and above 0 in float32), got {self.lr}")
        if self.preset not in common.PRESETS:
            raise common.UserError(f"unknown preset {self.preset!r} "
                                   f"(presets: {', '.join(common.PRESETS)})")
        if self.final_lr() > self.peak_lr():
            default = "" if self.lr is not None else " (the default here)"
            raise common.UserError(f"min_lr={self.final_lr():.3g} is above lr={self.peak_lr():.3g}"
                                   f"{default}: the cosine decays from lr down to min_lr")
        for f in ("b1", "b2"):
            if not 0 <= getattr(self, f) < 1:
                raise common.UserError(f"{f} must be in [0, 1), got {getattr(self, f)}")
        if not self.out_dir:
            raise common.UserError("out_dir must not be empty")
        if self.sample_len and not self.sample_prompt:
            raise common.UserError("sample_prompt must not be empty (or set sample_len=0)")
        if self.tokenizer and self.init_from:
            raise common.UserError("--tokenizer is for a model trained from scratch: --init_from "
                                   "reads the data with DIR's own tokenizer.json; drop one")
        choices = {"dtype": ("auto", "float32", "bfloat16"), "remat": ("none", "full", "dots"),
                   "attention": ("auto", "naive", "flash", "pallas", "cudnn"),
                   "fp8_scaling": ("current", "delayed")}
        for f, ok in choices.items():
            if getattr(self, f) not in ok:
                raise common.UserError(f"{f} must be one of {', '.join(ok)}; got "
                                       f"{getattr(self, f)!r}")
        if self.fp8_scaling != "current" and not self.fp8:
            raise common.UserError(f"fp8_scaling={self.fp8_scaling} applies to fp8 matmuls: add "
                                   f"--fp8=true")
        if self.batch_size % self.grad_accum:
            raise common.UserError(f"grad_accum={self.grad_accum} must divide "
                                   f"batch_size={self.batch_size}")
        if self.process_id >= self.num_processes:
            raise common.UserError(f"process_id={self.process_id} must be < "
                                   f"num_processes={self.num_processes}")
        if self.num_processes > 1 and not self.coordinator:
            raise common.UserError("num_processes > 1 needs --coordinator=HOST:PORT of process 0")
        host, _, port = self.coordinator.rpartition(":")
        if self.coordinator and not (host and port.isascii() and port.isdigit()
                                     and 0 < int(port) < 65536):
            raise common.UserError(f"coordinator={self.coordinator!r}: expected HOST:PORT, the "
                                   f"port a number from 1 to 65535")
        if self.breakdown and self.export_hf:
            raise common.UserError("--breakdown times a step and trains none: there is no model "
                                   "for --export_hf to write")
        sizes = common.parse_mesh(self.mesh)
        if self.sequence_parallel and sizes["tp"] == 1:
            raise common.UserError("sequence_parallel needs a --mesh with tp > 1")
        if self.sequence_parallel:
            common.check_sequence_split(self.sequence_parallel_rows(), self.seq_len, sizes["tp"],
                                        sizes["fsdp"])

    def peak_lr(self):
        """--lr, else the default: 2e-5 to fine-tune (Llama 2's supervised fine-tuning rate,
        Touvron et al. 2023), else default_lr of the preset's width."""
        if self.lr is not None:
            return self.lr
        return 2e-5 if self.init_from else default_lr(common.PRESETS[self.preset].d_model)

    def final_lr(self):
        """--min_lr, else a tenth of the peak."""
        return self.peak_lr() / 10 if self.min_lr is None else self.min_lr

    def sequence_parallel_rows(self):
        """Rows of a micro-batch on each dp x fsdp group: what sequence parallelism splits. (With
        no --mesh there is no tp axis, and nothing for it to split.)"""
        sizes = common.parse_mesh(self.mesh) if self.mesh else {"dp": 1, "fsdp": 1}
        return self.batch_size // self.grad_accum // (sizes["dp"] * sizes["fsdp"])


def make_mesh(text, devices):
    """The --mesh flag over exactly these devices; empty: FSDP over all of them."""
    sizes = common.parse_mesh(text) if text else common.parse_mesh(f"fsdp:{len(devices)}")
    n = math.prod(sizes.values())
    if n != len(devices):
        raise common.UserError(f"mesh {text or 'fsdp'} uses {n} devices, but there are "
                               f"{len(devices)}")
    return common.make_mesh(sizes, devices)


# ----------------------------------------------------------------------------------------------
# The optimizer
# ----------------------------------------------------------------------------------------------

def default_lr(d_model):
    """The peak learning rate of a run from scratch without --lr: 1e-3 at the `small` preset's
    width, 384, and inversely proportional to the width, as muP scales Adam's rate for the hidden
    matrices (Yang et al. 2022). A sweep of 150-step runs found the best rate at 1e-3 for `small`,
    between 1e-4 and 2e-4 for the 1B shape (width 2,048), where this gives 1.9e-4, and about 1e-4
    at the 8B shape's width of 4,096 (on 4 of its layers), where this gives 9.4e-5 (the sweep is
    in BENCHMARKS.md). A wider model takes a smaller step because each step moves every one
    of its outputs by the sum of more weights' changes."""
    return 1e-3 * 384 / d_model


def lr_schedule(step, tc):
    """The rate of update step + 1 (step counts the updates done): linear warmup to the peak at
    step tc.warmup, then cosine decay that reaches the final rate at the last step, tc.steps
    (TrainConfig.peak_lr and final_lr: --lr and --min_lr, or their defaults)."""
    peak, final = tc.peak_lr(), tc.final_lr()
    warm = peak * (step + 1) / max(tc.warmup, 1)
    frac = jnp.clip((step + 1 - tc.warmup) / max(tc.steps - tc.warmup, 1), 0.0, 1.0)
    cos = final + 0.5 * (peak - final) * (1 + jnp.cos(math.pi * frac))
    return jnp.where(step < tc.warmup, warm, cos)


def adamw_init(params):
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return {"mu": zeros(), "nu": zeros(), "count": jnp.zeros((), jnp.int32)}  # two buffers


def adamw_update(grads, state, params, lr, tc, decay_mask, eps=1e-8):
    """One AdamW step: bias-corrected first and second moments (Adam, Kingma & Ba 2015,
    Algorithm 1), plus weight decay decoupled from the gradient, where decay_mask is True."""
    count = state["count"] + 1
    mu = jax.tree.map(lambda m, g: tc.b1 * m + (1 - tc.b1) * g, state["mu"], grads)
    nu = jax.tree.map(lambda v, g: tc.b2 * v + (1 - tc.b2) * g * g, state["nu"], grads)
    c1, c2 = 1 - tc.b1 ** count, 1 - tc.b2 ** count

    def step(p, m, v, decay):
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps) + tc.weight_decay * decay * p)

    return jax.tree.map(step, params, mu, nu, decay_mask), {"mu": mu, "nu": nu, "count": count}


def clip_by_global_norm(grads, max_norm):
    """(grads scaled down so that their global L2 norm is at most max_norm, that norm before);
    max_norm 0 leaves them as they are."""
    gnorm = jnp.sqrt(sum(jnp.sum(jnp.square(g)) for g in jax.tree.leaves(grads)))
    if max_norm > 0:
        scale = jnp.minimum(1.0, max_norm / (gnorm + 1e-6))
        grads = jax.tree.map(lambda g: g * scale, grads)
    return grads, gnorm


def decay_mask(cfg):
    """Decay every weight but the norm gains."""
    return jax.tree.map(lambda axes: "norm" not in axes, common.logical_axes(cfg),
                        is_leaf=lambda x: isinstance(x, tuple))


# ----------------------------------------------------------------------------------------------
# The step
# ----------------------------------------------------------------------------------------------

def attention_fn(name, mesh=None, deterministic=False):
    """(q, k, v, causal, segment_ids) -> out for --attention=name (resolved by pick_attention).
    deterministic: XLA_FLAGS asks for kernels that repeat bit for bit; 08's kernels then leave
    out their Hopper backward, whose atomic adds run in a varying order."""
    if name == "naive":
        return common.attention_reference
    if name == "flash":
        fn = common.import_script("05_flash_attention").flash_attention
        return lambda q, k, v, causal, seg: fn(q, k, v, causal=causal, segment_ids=seg)
    if name == "pallas":
        fn = common.import_script("08_pallas_kernels").flash_attention
        interpret = jax.devices()[0].platform == "cpu"   # a CPU interprets the kernel

        def pallas(q, k, v, causal, seg):
            return fn(q, k, v, causal=causal, segment_ids=seg, interpret=interpret,
                      deterministic=deterministic)
        if mesh is None or mesh.size == 1:
            return pallas
        # A kernel is one program on one device, which XLA cannot split: each device runs it on
        # its own rows and heads (batch over dp x fsdp, heads over tp), as the layout already is.
        spec = common.logical_to_spec(("batch", "seq", "heads", "head_dim"), mesh)
        kv_spec = common.logical_to_spec(("batch", "seq", "kv_heads", "head_dim"), mesh)

        def sharded(q, k, v, causal, seg):
            return jax.shard_map(lambda q, k, v, seg: pallas(q, k, v, causal, seg), mesh=mesh,
                                 in_specs=(spec, kv_spec, kv_spec, common.P(*spec[:2])),
                                 out_specs=spec, check_vma=False)(q, k, v, seg)
        return sharded
    if name == "cudnn":
        if jax.devices()[0].platform != "gpu":
            raise common.UserError("attention=cudnn needs an NVIDIA GPU")

        def cudnn(q, k, v, causal, seg):  # documents as a dense mask [B, 1, T, T]
            mask = None if seg is None else seg[:, None, :, None] == seg[:, None, None, :]
            return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal,
                                                implementation="cudnn")
        return cudnn
    raise common.UserError(f"unknown attention {name!r}")


def sp_text(tc, mesh):
    if not tc.sequence_parallel or mesh.shape["tp"] == 1:
        return ""
    rules = common.sequence_parallel_rules(tc.sequence_parallel_rows(), mesh.shape["tp"],
                                           mesh.shape["fsdp"])
    split = "positions" if "residual_seq" in rules else "rows"
    return f" with sequence parallelism (the {split} split over tp)"


def make_loss_fn(cfg, tc, mesh, attention, record=False):
    rules = (common.sequence_parallel_rules(tc.sequence_parallel_rows(), mesh.shape["tp"],
                                            mesh.shape["fsdp"])
             if tc.sequence_parallel else common.SHARDING_RULES)

    def constrain(x, axes):
        return jax.lax.with_sharding_constraint(
            x, NamedSharding(mesh, common.logical_to_spec(axes, mesh, rules)))

    numerics = common.import_script("07_numerics")

    def loss_fn(params, x, y, seg=None, amax=None):
        """seg: x's segment ids with --doc_mask (documents), else None. amax: with
        fp8_scaling=delayed, every layer matmul's recorded maxima. record: the matmuls
        unquantized, handing their maxima back as amax's gradient (calibrate_fp8)."""
        dot = None if not tc.fp8 else (
            numerics.record_amax_einsum if record else
            numerics.fp8_einsum if amax is None else numerics.fp8_einsum_delayed)
        # Logits in the compute dtype: the loss widens them inside its reductions.
        logits = common.forward(params, x, cfg, attention=attention, segment_ids=seg,
                                remat=tc.remat, constrain=constrain, scan_layers=tc.scan_layers,
                                logits_dtype=cfg.dtype, dot=dot, dot_state=amax)
        return common.cross_entropy(logits, y)
    return loss_fn


def make_train_step(cfg, tc, mesh, attention):
    """A jit'd (params, opt, x, y, seg) -> (params, opt, metrics), sharded by `mesh`; seg:
    segment ids with --doc_mask, else None."""
    loss_fn = make_loss_fn(cfg, tc, mesh, attention)
    mask = decay_mask(cfg)

    def train_step(params, opt, x, y, seg=None):
        # Gradient accumulation: a scan over micro-batches [A, B/A, T] summing the gradients.
        # Micro-batch i takes rows i, i+A, ...: every device holds a share of each one.
        micro_batches = jax.tree.map(
            lambda a: a.reshape(-1, tc.grad_accum, a.shape[-1]).swapaxes(0, 1), (x, y, seg))

        amax = opt.get("fp8")  # fp8_scaling=delayed: the maxima recorded at the step before

        def micro(acc, xy):
            if amax is None:
                loss, g = jax.value_and_grad(loss_fn)(params, *xy)
                return jax.tree.map(jnp.add, acc, (loss, g)), None
            # The maxima's "gradient" is the maxima this micro-batch saw (lesson 07).
            loss, (g, seen) = jax.value_and_grad(loss_fn, argnums=(0, 4))(params, *xy, amax)
            return (acc[0] + loss, jax.tree.map(jnp.add, acc[1], g),
                    jax.tree.map(jnp.maximum, acc[2], seen)), None

        zero = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        if amax is not None:
            zero += (jax.tree.map(jnp.zeros_like, amax),)
        (loss, grads, *seen), _ = jax.lax.scan(micro, zero, micro_batches)
        loss, grads = jax.tree.map(lambda a: a / tc.grad_accum, (loss, grads))
        grads, gnorm = clip_by_global_norm(grads, tc.grad_clip)
        lr = lr_schedule(opt["count"], tc)
        params, opt = adamw_update(grads, opt, params, lr, tc, mask)
        if amax is not None:
            opt["fp8"] = seen[0]  # kept for the next step's scales, not stepped along
        finite = jnp.isfinite(loss) & jnp.all(jnp.array(
            [jnp.isfinite(p).all() for p in jax.tree.leaves(params)]))
        return params, opt, {"loss": loss, "grad_norm": gnorm, "lr": lr, "finite": finite}

    return jax.jit(train_step, donate_argnums=(0, 1))


def calibrate_fp8(cfg, tc, mesh, attention, params, amax, x, y, seg):
    """Delayed scaling's first maxima, before its first step: one forward and backward pass of
    the first micro-batch with the matmuls unquantized, recording the maxima of their inputs
    and incoming gradients; nothing is updated. Without it the first step's scales are 1
    (lesson 07 measures how far off its gradient is)."""
    loss_fn = make_loss_fn(cfg, tc, mesh, attention, record=True)
    first = lambda a: a[::tc.grad_accum]  # micro-batch 0: rows 0, A, 2A, ... as train_step's
    return jax.jit(lambda p, m, batch: jax.grad(loss_fn, argnums=4)(
        p, *jax.tree.map(first, batch), m))(params, amax, (x, y, seg))


def global_batch(local, mesh):
    """This process's rows -> one global array sharded over dp x fsdp."""
    sharding = NamedSharding(mesh, common.logical_to_spec(("batch", "seq"), mesh))
    return jax.make_array_from_process_local_data(sharding, local)


BATCHES_AHEAD = 2  # training batches built ahead of their step, on a thread; 0: in the loop


@contextlib.contextmanager
def prefetched(make, steps, ahead):
    """An iterator of make(step) for each of `steps`, each built on a thread `ahead` steps early:
    the host cuts the windows and copies them to the devices while the devices run the steps
    before. Built in the loop instead, they held the `small` model's step on an H100 to the
    host's pace: 2.4 ms against 1.75 ms with the batches ready (BENCHMARKS.md). Batches are a
    pure function of the step, so building them early changes nothing else."""
    if ahead == 0:
        yield map(make, steps)
        return
    pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="batches")
    steps = iter(steps)
    queue = collections.deque(pool.submit(make, s) for s in itertools.islice(steps, ahead))

    def batches():
        while queue:
            batch = queue.popleft().result()  # (a UserError raised on the thread arrives here)
            queue.extend(pool.submit(make, s) for s in itertools.islice(steps, 1))
            yield batch
    try:
        yield batches()
    finally:  # a stop mid-run: what is queued is dropped
        pool.shutdown(wait=True, cancel_futures=True)


# ----------------------------------------------------------------------------------------------
# Checkpoints
# ----------------------------------------------------------------------------------------------

class Writer:
    """One job at a time on a thread of its own: a checkpoint is written while the next steps
    train (at 1B, 15 GB take 9-10 s to write on an H100 machine, the time of 20 steps). start()
    and wait() first wait for the job in flight and raise its error; poll() raises it once the
    job has ended, without waiting."""

    def __init__(self):
        self.thread, self.error = None, None

    def start(self, fn, *args):
        self.wait()

        def run():
            try:
                fn(*args)
            except BaseException as e:  # raised in the training loop, at its next poll or wait
                self.error = e
        self.thread = threading.Thread(target=run, name="checkpoint writer")
        self.thread.start()

    def poll(self):
        if self.thread is not None and not self.thread.is_alive():
            self.wait()

    def join(self):
        """The job in flight ended, its error left: on the way out of an error already raised."""
        if self.thread is not None:
            self.thread.join()
            self.thread = None

    def wait(self):
        self.join()
        if self.error is not None:
            error, self.error = self.error, None
            raise error


def save(tc, step, params, opt, cfg, data_id, writer, files, last=False):
    """Every process takes part in the gather; process 0 copies the state to the host, before the
    next step reuses its buffers, and `writer` writes it to disk while training goes on. After
    the `last` step no step follows: the writer's threads copy each array from the device as
    they write the one before, rather than pinning host memory first (the first pinning takes
    about 11 s at 1B, the time a scheduler's SIGTERM leaves runs short of). data_id:
    common.corpus_id of the data the steps read; files: written beside (a tokenizer.json)."""
    state = {"params": params, "opt": opt}
    if jax.process_index() == 0:
        writer.wait()  # one checkpoint at a time, so one copy of the state on the host
    if jax.process_count() > 1:
        state = gather_to_process_0(state, pinned=not last)
    elif not last:
        state = to_host(state)
    if jax.process_index() == 0:
        meta = {"model": dataclasses.asdict(cfg), "preset": tc.preset, "seed": tc.seed,
                "init_from": tc.init_from,
                "data_position": step, "fp8_maxima": "fp8" in opt,
                "batch_size": tc.batch_size, "seq_len": tc.seq_len, "doc_mask": tc.doc_mask,
                "data": data_id, **schedule_flags(tc)}
        writer.start(write_checkpoint, tc.out_dir, step, tc.ckpt_keep, state, meta, files)


def model_name(init_from):
    """The model a run fine-tunes, by its directory's name ("" from scratch): a resume that
    names another is refused, while the same model moved to another directory is not."""
    return os.path.basename(os.path.abspath(init_from)) if init_from else ""


def schedule_flags(tc):
    """What shapes every update besides the model and the data, recorded with each checkpoint:
    a resume that changes one is said (restore)."""
    return {"lr": tc.peak_lr(), "min_lr": tc.final_lr(), "warmup": tc.warmup,
            "weight_decay": tc.weight_decay, "b1": tc.b1, "b2": tc.b2, "grad_clip": tc.grad_clip,
            "fp8": tc.fp8 and tc.fp8_scaling}


def _same(x):
    return x


def gather_to_process_0(tree, pinned=False):
    """The whole of each array in process 0's host memory (pinned: to_host's), and None
    elsewhere. Every process takes part in each array's gather, one array at a time, so a
    device holds one whole array at most; only process 0 copies it to the host
    (multihost_utils.process_allgather copies it on every process: at 8B, 96 GB of weights and
    AdamW moments on each host, for nothing)."""
    def one(x):
        whole = jax.jit(_same, out_shardings=x.sharding.update(spec=common.P()))(x)
        if jax.process_index() != 0:
            return None
        local = whole.addressable_data(0)
        return to_host(local) if pinned else np.asarray(local)
    return jax.tree.map(one, tree)


def to_host(state):
    """The state in host memory: pinned, from the pool JAX keeps where the device has one. On an
    H100, 1B's weights and AdamW moments (15 GB) took 0.27 s this way once the pool held that
    much (the first save pays about 10 s to pin it), against 9.8-11.4 s through jax.device_get
    into pageable memory. Sharded arrays stay in their shards; the writer's thread joins them."""
    try:
        return jax.block_until_ready(jax.device_put(state, jax.tree.map(
            lambda x: x.sharding.with_memory_kind("pinned_host"), state)))
    except (ValueError, jax.errors.JaxRuntimeError):  # no such memory, or too little of it
        return jax.device_get(state)


def write_checkpoint(out_dir, step, keep, state, meta, files):
    try:
        common.save_checkpoint(out_dir, step, state, meta, keep, files)
    except OSError as e:  # a full disk: the checkpoints already written stay as they were
        kept = common.list_checkpoints(out_dir)
        raise common.UserError(
            f"could not write the checkpoint of step {step} to {out_dir} ({e.strerror}); "
            + (f"it keeps {os.path.basename(kept[-1])}, which the same command resumes from"
               if kept else "it holds no checkpoint yet")) from None


def restore(tc, cfg, params, opt, data_id, tokenizer=common.BYTES):
    """(params, opt, step) from the newest readable checkpoint in out_dir, or the inputs and 0.
    A damaged one (its files cut short by a power loss, or edited) is passed over with a line
    saying so, and the one before it read instead. Resuming with another batch shape or on other
    data is allowed (a smaller batch after running out of memory, more data), but said; with
    another tokenizer, whose ids mean other text, it is refused."""
    like = {"params": params, "opt": opt}
    model = json.loads(json.dumps(dataclasses.asdict(cfg)))

    def load(path):
        meta = common.load_checkpoint_meta(path)
        if not isinstance(meta.get("model"), dict):
            raise common.DamagedCheckpoint(f"checkpoint {path} is damaged: its meta.json holds "
                                           f"no model config")
        ran_from = meta.get("init_from", tc.init_from) or ""  # (not recorded before: as now)
        if model_name(ran_from) != model_name(tc.init_from):
            if not ran_from:
                what = f"a model trained from scratch, not a fine-tune of {tc.init_from}"
            else:
                what = f"a fine-tune of {ran_from}" + (f", not of {tc.init_from}"
                                                       if tc.init_from else "")
            resume = f"with --init_from={ran_from}" if ran_from else "without --init_from"
            raise common.UserError(f"{tc.out_dir} holds {what}: resume {resume}, or use another "
                                   f"--out_dir")
        held = os.path.join(path, "tokenizer.json")  # (none: bytes)
        try:
            spec = common.read_json(held) if os.path.isfile(held) else common.BYTES.spec
        except common.UserError as e:
            raise common.DamagedCheckpoint(f"checkpoint {path} is damaged: {e}") from None
        if spec != tokenizer.spec:
            here = f"{tokenizer_dir(tc)}/tokenizer.json" if tokenizer_dir(tc) else "bytes"
            raise common.UserError(f"{tc.out_dir} holds a checkpoint trained on other tokens "
                                   f"than {here}: resume with the --tokenizer (or --init_from) "
                                   f"it was written with, or use another --out_dir")
        if meta["model"] != model or meta.get("seed") != tc.seed:
            stored = dict(meta["model"], seed=meta.get("seed"))
            differ = [f"{k} {stored.get(k)!r} there, {v!r} here"
                      for k, v in dict(model, seed=tc.seed).items() if stored.get(k) != v]
            whose = f"--init_from={ran_from}" if ran_from else f"preset {meta.get('preset')}"
            raise common.UserError(f"{tc.out_dir} holds a checkpoint of another config "
                                   f"({whose}: {'; '.join(differ)}); "
                                   f"resume with the flags it was written with (--preset, "
                                   f"--dtype, --seed), or use another --out_dir")
        if "fp8" in opt and not meta.get("fp8_maxima"):
            raise common.UserError(f"{tc.out_dir} holds a checkpoint without fp8 maxima (written "
                                   f"without --fp8_scaling=delayed): resume it as it was run, "
                                   f"or use another --out_dir")
        return common.load_checkpoint(path, like)

    found = common.load_newest_checkpoint(tc.out_dir, load)
    if found is None:
        return params, opt, 0
    path, (state, meta) = found
    state = jax.tree.map(lambda a, ref: jax.make_array_from_callback(
        a.shape, ref.sharding, lambda idx: a[idx]), state, like)
    print(f"resumed from {path} at step {meta['step']}")
    ran = dict(meta, doc_mask=meta.get("doc_mask", False))  # (written before the flag: off)
    here = {"batch_size": tc.batch_size, "seq_len": tc.seq_len, "doc_mask": tc.doc_mask,
            **schedule_flags(tc)}

    def show(v):
        return f"{v:.3g}" if isinstance(v, float) else v

    changed = [f"{k}={show(v)} (the checkpoint's steps ran at {show(ran[k])})"
               for k, v in here.items() if ran.get(k, v) != v]
    if meta.get("data", data_id) != data_id:
        changed.append(f"data of {data_id} (the checkpoint's steps read {meta['data']})")
    if changed:
        print(f"note: resuming with {', '.join(changed)}: the steps from here differ from an "
              f"uninterrupted run's")
    return state["params"], state["opt"], meta["step"]


# ----------------------------------------------------------------------------------------------
# Sampling and plotting
# ----------------------------------------------------------------------------------------------

def sample(params, cfg, prompt, n, seed=0, temperature=0.8, tokenizer=common.BYTES):
    """The text of `prompt` (token ids) and n tokens after it, by full recompute over a fixed
    window (the KV-cached way is lesson 06)."""
    window = min(cfg.max_seq_len, 256)
    # Byte-level data: a larger vocabulary (a Llama preset's) samples among its first 256.
    vocab = 256 if tokenizer is common.BYTES else cfg.vocab_size

    @jax.jit
    def next_token(tokens, length, key):
        logits = common.forward(params, tokens[None], cfg)[0, length - 1, :vocab]
        return jax.random.categorical(key, logits / temperature)

    toks, key = list(prompt), jax.random.key(seed)
    for _ in range(n):
        ctx = toks[-window:]
        buf = np.zeros(window, np.int32)
        buf[:len(ctx)] = ctx
        key, sub = jax.random.split(key)
        toks.append(int(next_token(buf, len(ctx), sub)))
    return tokenizer.decode(toks)


def read_metrics(path):
    """The rows of metrics.jsonl, each a dict with its step; a line cut short by a kill
    mid-write (or its bytes damaged) is passed over."""
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int):
                rows.append(row)
    return rows


def drop_metrics_after(path, step):
    """Resuming at `step` trains the steps after it again (those logged after the checkpoint,
    before a crash or kill): their old rows go, so each step appears once in the file and in the
    plot. Rewritten to a temporary file and renamed over the old one."""
    if not os.path.exists(path):
        return
    kept = [row for row in read_metrics(path) if row["step"] <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in kept)
    os.replace(tmp, path)


def plot_metrics(out_dir, unit="byte"):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    rows = read_metrics(os.path.join(out_dir, "metrics.jsonl"))
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("loss", "val_loss"):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        if pts:
            ax.plot(*zip(*pts), marker="." if key == "val_loss" else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel(f"loss (nats per {unit})")
    ax.legend()
    path = os.path.join(out_dir, "loss.png")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def check_same_start(starts, out_dir):
    """Every process reads out_dir itself, and only process 0 writes it: on storage that the
    hosts do not share, they would resume at different steps."""
    if len(set(int(s) for s in starts)) > 1:
        raise common.UserError(f"the processes found different checkpoints in {out_dir} (steps "
                               f"{', '.join(str(int(s)) for s in starts)} by process): out_dir "
                               f"must be one directory every host sees")


def flag_digests(tc):
    """One number per flag (crc32 of its value), --process_id left out: what every process of a
    run must agree on, compared before any of them trains."""
    return np.array([zlib.crc32(repr(getattr(tc, f.name)).encode()) if f.name != "process_id"
                     else 0 for f in dataclasses.fields(tc)], np.uint32)


def check_same_flags(digests, tc):
    """digests: [processes, flags], every process's flag_digests. Processes started with other
    flags would each train on their own reading of the batch, or wait forever in a collective
    that the others never reach: refused, naming the flags."""
    names = [f.name for f in dataclasses.fields(tc)]
    differ = [n for n, col in zip(names, np.asarray(digests).T) if len(set(col.tolist())) > 1]
    if differ:
        raise common.UserError(f"the processes were started with different "
                               f"{', '.join('--' + n for n in differ)}: give every process the "
                               f"same flags but --process_id")


def check_processes_agree(tc):
    """A multi-process run's processes: the same number of devices each, the same flags."""
    n, local = jax.process_count(), jax.local_device_count()
    if jax.device_count() != n * local:
        raise common.UserError(f"process {jax.process_index()} has {local} of the "
                               f"{jax.device_count()} devices of {n} processes: every process "
                               f"needs the same number of devices")
    check_same_flags(multihost_utils.process_allgather(flag_digests(tc)), tc)


def check_tp_within_processes(mesh):
    """Each process feeds its own rows of the batch, to the devices it holds: a tensor-parallel
    group (the mesh's last axis, one batch slice) spread over processes would be fed by each
    of them, and the step would see one process's rows as the whole batch."""
    groups = mesh.devices.reshape(-1, mesh.shape["tp"])
    if any(len({d.process_index for d in g}) > 1 for g in groups):
        per = len(mesh.devices.flat) // len({d.process_index for d in mesh.devices.flat})
        raise common.UserError(f"--mesh tp:{mesh.shape['tp']} spreads a tensor-parallel group "
                               f"over processes of {per} devices: tp must divide each "
                               f"process's devices (split the rest over dp or fsdp)")


def on_process_0(fn, what):
    """fn() on process 0 alone (a check of the directories it writes), its outcome shared: a
    UserError there stops process 0 with it and every other process with a line naming it,
    where they would wait in the next collective until a timeout's traceback."""
    failed = None
    if jax.process_index() == 0:
        try:
            fn()
        except common.UserError as e:
            failed = e
    if jax.process_count() > 1:
        stopped = int(multihost_utils.broadcast_one_to_all(np.int32(failed is not None)))
        if stopped and failed is None:
            raise common.UserError(f"process 0 stopped at its check of {what}: its output says "
                                   f"why")
    if failed is not None:
        raise failed


# ----------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------

def breakdown(step_fn, loss_fn, params, opt, batch, flops_per_step, peak, units, log, cfg,
              tokens, n_dev):
    """Where a step's time goes: forward alone, forward + backward, and the whole step (the
    difference is the optimizer), each against the datasheet peak and against the matmul rate
    this device measures (common.measure_peaks), the ceiling a step made of matmuls could reach.
    peak: one device's; units: how many of it the devices reach together (common.peak_units)."""
    matmul = common.measure_peaks(dtype=cfg.dtype)["matmul_flops"] * units
    state = [params, opt]

    def full(*batch):  # the step donates its inputs: feed each result to the next call
        state[0], state[1], m = step_fn(state[0], state[1], *batch)
        return m
    rows = [("forward", jax.jit(loss_fn), flops_per_step / 3, (params, *batch)),
            ("forward + backward", jax.jit(jax.value_and_grad(loss_fn)), flops_per_step,
             (params, *batch)),
            ("whole step (+ AdamW)", full, flops_per_step, batch)]
    log(f"{'phase':22s} {'ms':>9s} {'TFLOP/s':>9s} {'MFU':>7s} {'of matmul peak':>15s}")
    ts = []
    for name, fn, flops, args in rows:
        ts.append(common.bench(fn, *args, iters=5, warmup=1).median_s)
        t = ts[-1]
        rate = flops / t
        log(f"{name:22s} {t * 1e3:9.1f} {rate / 1e12:9.3g} {100 * rate / (peak * units):6.1f}% "
            f"{100 * rate / matmul:14.1f}%")
    if ts[2] < ts[1]:  # the difference would be the optimizer's time, were it positive
        log(f"the whole step took {(ts[1] - ts[2]) * 1e3:.2g} ms ({1 - ts[2] / ts[1]:.1%}) less "
            f"than forward + backward "
            f"alone, which returns every gradient as an output (the whole step, one program, "
            f"may keep them on chip or schedule it otherwise): the difference does not isolate "
            f"AdamW's time here")
    chip = common.device_chip()
    over = (f"{units} host(s)" + (", whose cores the simulated devices share"
                                  if n_dev > units else "")
            if jax.devices()[0].platform == "cpu" else f"{units} device(s)")
    log(f"measured {cfg.dtype} matmul peak: {matmul / 1e12:.4g} TFLOP/s over {over}; "
        + (f"datasheet {peak * units / 1e12:.4g}" if chip else
                          "no datasheet entry for this device (MFU is over a measured rate)"))
    # Memory as XLA's buffer assignment plans it for one device's share of the step.
    mem = step_fn.memory_analysis()
    if mem is not None:
        gib = lambda n: f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.2f} MiB"
        log(f"the step's memory per device: {gib(mem.argument_size_in_bytes)} of arguments "
            f"(weights, optimizer state, batch), {gib(mem.temp_size_in_bytes)} of temporaries "
            f"(activations kept for the backward pass, gradients, workspace)")
    times = common.kernel_times(lambda: full(*batch), calls=2)
    if times is None:
        log("no kernel list: this device's profile holds no kernel timings (a CPU's does not)")
        return
    # The step's kernels by kind, as the device timed them; the weight matmuls do the 6N FLOPs.
    kinds = common.kernel_summary(times)
    busy = sum(t for t, _ in kinds.values())
    log("one whole step's kernels (device 0): " + ", ".join(
        f"{k} {t * 1e3:.1f} ms ({n:.0f} launches)"
        for k, (t, n) in sorted(kinds.items(), key=lambda kv: -kv[1][0])) +
        f"; busy {busy * 1e3:.1f} ms")
    if "matmul" in kinds:
        mm = 6 * cfg.param_count(embedding=False) * tokens / units / kinds["matmul"][0]
        log(f"the matmul kernels run the 6N FLOPs at {mm / 1e12:.4g} TFLOP/s = "
            f"{100 * mm / (matmul / units):.0f}% of the measured matmul peak; the rest of the "
            f"step is attention, elementwise work and reductions")


def model_config(tc):
    platform = jax.devices()[0].platform
    dtype = tc.dtype if tc.dtype != "auto" else ("float32" if platform == "cpu" else "bfloat16")
    try:
        cfg = common.read_hf_config(tc.init_from, "float32") if tc.init_from else \
            common.Config.preset(tc.preset)
    except common.UserError as e:
        raise common.UserError(f"--init_from: {e}") from None
    cfg = dataclasses.replace(cfg, param_dtype="float32", dtype=dtype)
    if tc.seq_len > cfg.max_seq_len:
        raise common.UserError(f"seq_len={tc.seq_len} exceeds the model's max_seq_len "
                               f"{cfg.max_seq_len}: pass --seq_len={cfg.max_seq_len} or less")
    return cfg


def tokenizer_dir(tc):
    """Where the data's tokenizer.json comes from: --init_from, --tokenizer (a directory, or the
    tokenizer.json in one), or nowhere (bytes)."""
    if tc.tokenizer and os.path.basename(tc.tokenizer) == "tokenizer.json":
        return os.path.dirname(tc.tokenizer) or "."
    return tc.init_from or tc.tokenizer


def data_tokenizer(tc):
    """What the data are read as: bytes, or the tokens of --init_from's or --tokenizer's
    tokenizer.json."""
    if not tokenizer_dir(tc):
        return common.BYTES
    flag = "--init_from" if tc.init_from else "--tokenizer"
    if not os.path.isdir(tokenizer_dir(tc)):
        raise common.UserError(f"{flag}={tc.init_from or tc.tokenizer}: expected a directory "
                               f"holding a tokenizer.json" + ("" if tc.init_from else
                                                              " (or that tokenizer.json)"))
    try:
        return common.load_tokenizer(tokenizer_dir(tc))
    except common.UserError as e:
        raise common.UserError(f"{flag}: {e}") from None


def deterministic(xla_flags):
    """Whether XLA_FLAGS asks for GPU kernels that repeat bit for bit (no atomic adds, whose
    order varies from run to run; BENCHMARKS.md, "Repeatable runs")."""
    return re.search(r"--xla_gpu_deterministic_ops(=(true|1))?(\s|$)", xla_flags) is not None


def pick_attention(attention, dtype, platform, xla_flags="", scan_layers=False,
                   short_documents=False, hopper_segments=False):
    """--attention resolved: auto is cuDNN's fused kernel on a GPU in bf16 (it takes 16-bit
    inputs only), else the naive one; with deterministic kernels asked for, 08's Pallas kernels,
    and under --doc_mask too where the documents are short (shorter than a window on average)
    or 08's Hopper kernels take the run's segment ids (hopper_segments: an sm90 GPU, a window
    of a multiple of 128). 08's kernel skips the blocks the mask empties, where cuDNN computes
    them all: on an H100 at the 1B's heads, forward and backward, the Hopper kernels ran at 2.45x
    cuDNN's masked attention at 128-token documents, 1.51x at 2,048 and 1.39x at 20,000, in
    windows of 2,048, and a whole 1B step at 1.04x on files of 19 KB. With the portable
    backward instead (as before the Hopper backward ran at D=64, and as under deterministic
    kernels now) they ran at 2.65x, 1.07x and 0.94x. Without the mask the two are even (a 1B
    step at 0.995x), so auto keeps cuDNN. Under --xla_gpu_deterministic_ops a program holding two
    or more of cuDNN's attention backward passes fails when it runs (an XLA IndexError, jax
    0.11.2), so the unrolled layers cannot use it there; one compiled layer in a loop
    (--scan_layers=true) can, and repeats bit for bit (BENCHMARKS.md)."""
    det = platform == "gpu" and deterministic(xla_flags)
    if attention == "auto" and (platform != "gpu" or dtype != "bfloat16"):
        attention = "naive"
    elif attention == "auto":
        attention = "pallas" if det or short_documents or hopper_segments else "cudnn"
    if attention == "cudnn" and platform != "gpu":
        raise common.UserError("attention=cudnn needs an NVIDIA GPU")
    if attention == "cudnn" and dtype != "bfloat16":
        raise common.UserError(f"attention=cudnn takes 16-bit inputs, not {dtype}: use "
                               f"--dtype=bfloat16 or --attention=naive or flash")
    if attention == "cudnn" and det and not scan_layers:
        raise common.UserError("attention=cudnn fails under --xla_gpu_deterministic_ops=true with "
                               "the layers unrolled: add --scan_layers=true, or use "
                               "--attention=pallas (repeatable, 1.2x cuDNN's step at 1B) or flash")
    return attention


def hopper_segments(tc, cfg):
    """Whether --doc_mask is on and 08's Hopper kernels take its segment ids for this model (in
    its compute dtype) and window: an sm90 GPU, 16-bit, a window of a multiple of 128."""
    if not tc.doc_mask:
        return False
    q = jax.ShapeDtypeStruct((1, tc.seq_len, cfg.n_heads, cfg.head_dim), cfg.dtype)
    k = jax.ShapeDtypeStruct((1, tc.seq_len, cfg.n_kv_heads, cfg.head_dim), cfg.dtype)
    k08 = common.import_script("08_pallas_kernels")
    return k08.hopper_available(q, k, jax.ShapeDtypeStruct((1, tc.seq_len), jnp.int32), True)


@contextlib.contextmanager
def stop_after_the_step(saving=True, peers=False):
    """A flag that the first Ctrl-C, or SIGTERM (what a scheduler or a cloud sends before it
    takes the machine away), sets instead of interrupting: the loop then ends its step, saves it
    (when `saving`: --ckpt_every is not 0) and stops, so a run interrupted before its first
    checkpoint keeps its steps. A second signal interrupts at once. A signal the run was started
    ignoring (a script's background job ignores Ctrl-C) stays ignored.
    With `peers` (several processes) a process that stopped at a step the others do not would
    leave them waiting in a collective: they agree on the step through JAX's preemption
    service, which takes SIGTERM itself (in the training loop). So there the flag stays unset,
    a first Ctrl-C sends this process SIGTERM, and a second ends it at once (its peers are then
    stopped by the runtime; the checkpoints written so far are whole)."""
    asked = [False]

    def handler(signum, frame):
        if asked[0]:
            if peers:  # unwinding would wait for the peers, which wait in a collective
                print("\nCtrl-C again: this process ends now", file=sys.stderr, flush=True)
                os._exit(130)
            raise KeyboardInterrupt
        asked[0] = True
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        then = ", and saving it" if saving else " (--ckpt_every=0: nothing is saved)"
        if peers:
            what = ("saves the step they agree on and stops" if saving else "stops after the "
                    "step they agree on (--ckpt_every=0: nothing is saved)")
            print(f"\nCtrl-C, taken as SIGTERM: every process {what} (Ctrl-C again ends this "
                  f"process at once)", file=sys.stderr, flush=True)
            os.kill(os.getpid(), signal.SIGTERM)
            return
        print(f"\n{name}: stopping after the current step{then} (Ctrl-C again stops at once)",
              file=sys.stderr, flush=True)
    previous = {}
    try:
        for sig in (signal.SIGINT,) if peers else (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(sig) is not signal.SIG_IGN:
                previous[sig] = signal.signal(sig, handler)
    except ValueError:  # not the main thread: signals interrupt as usual
        pass
    try:
        yield [False] if peers else asked
    finally:
        for sig, was in previous.items():
            signal.signal(sig, was)


def train(tc, stop_after=None, log=print, devices=None):
    """Train per `tc` on `devices` (default: all); stop_after ends the run early at that step (as
    a kill would), after its checkpoint. Returns (logged metrics, params, model config)."""
    with contextlib.ExitStack() as held:  # out_dir, held by process 0 until the run ends
        return _train(tc, stop_after, log, devices, held)


def not_utf8(data):
    """How many bytes of `data` are not UTF-8, leaving out a character cut in two at either end:
    load_corpus cuts a file at a byte count (95/5, --max_data_mb), which may fall inside one."""
    data = bytes(data)
    start = next((i for i in range(min(3, len(data))) if data[i] & 0xC0 != 0x80),
                 min(3, len(data)))  # continuation bytes, 10xxxxxx, of a character begun before
    end = len(data)
    for k in range(1, min(4, end - start) + 1):  # the last character's first byte, k from the end
        first = data[end - k]
        if first & 0xC0 != 0x80:
            size = (1 if first < 0xC0 or first >= 0xF8 else  # (0xF8 and up begin nothing)
                    2 if first < 0xE0 else 3 if first < 0xF0 else 4)
            end -= k if size > k else 0  # begun, and cut before its last byte
            break
    whole = data[start:end]
    return len(whole) - len(whole.decode("utf-8", "ignore").encode())


def load_data(tc, cfg, tokenizer, log=print, stats=None):
    """(train, validation) tokens of --data (default: the standard library's source) through
    `tokenizer`, each with the offsets where its documents (files) begin or end, with one-line
    errors for what would fail later: a split shorter than a window, an out_dir inside the data
    (a resume would read the checkpoints as text), a token the model's vocabulary lacks. A dict
    `stats` gets "val_bytes_per_token": what turns a loss per token into one per byte."""
    data, out = (os.path.realpath(p) for p in (tc.data or "", tc.out_dir))
    if tc.data and os.path.isdir(data) and os.path.commonpath([data, out]) == data:
        raise common.UserError(f"--out_dir={tc.out_dir} lies inside --data={tc.data}: a resumed "
                               f"run would read the checkpoints as text; put it elsewhere")
    limit = tc.max_data_mb * 2**20
    splits = common.load_corpus(tc.data or None, limit, edges=True)
    size = sum(os.path.getsize(f) for f in common.corpus_files(tc.data or None))
    if size > limit:
        log(f"note: reading the first {tc.max_data_mb} MiB of the data's {size / 2**20:,.0f} "
            f"MiB (--max_data_mb reads more)")
    if tokenizer is not common.BYTES:  # each file a document, begun and ended as in pretraining
        t0, sizes = time.perf_counter(), [len(data) for data, _ in splits]
        bad = sum(not_utf8(data) for data, _ in splits)
        if bad:  # (bytes are lost to a tokenizer as text; byte-level training keeps them)
            log(f"note: {bad:,} bytes of the data are not UTF-8: the tokenizer reads them as "
                f"U+FFFD, the replacement character (convert the files to UTF-8 to keep them)")
        splits = [common.tokenize(tokenizer, data, edges) for data, edges in splits]
        per_token = [size / len(tokens) for size, (tokens, _) in zip(sizes, splits)]
        if stats is not None:
            stats["val_bytes_per_token"] = per_token[1]
        log(f"tokenized the data with {tokenizer_dir(tc)}/tokenizer.json in "
            f"{time.perf_counter() - t0:.1f} s: training {per_token[0]:.2f} bytes a token, "
            f"validation {per_token[1]:.2f} bytes a token")
    unit = "bytes" if tokenizer is common.BYTES else "tokens"
    for name, (tokens, _) in zip(("training", "validation"), splits):
        if len(tokens) < tc.seq_len + 1:  # found now, not at the first eval after some steps
            raise common.UserError(f"the {name} split of the data holds {len(tokens)} {unit}, "
                                   f"fewer than seq_len+1={tc.seq_len + 1}: use more data (a "
                                   f"single file gives 5% to validation) or a smaller seq_len")
        if tokens.max() >= cfg.vocab_size:
            raise common.UserError(f"the data hold token {tokens.max()}, past the model's "
                                   f"vocabulary of {cfg.vocab_size}" + (
                                       ": byte-level data need vocab_size >= 256"
                                       if unit == "bytes" else ""))
    return splits


def _train(tc, stop_after, log, devices, held):
    cfg = model_config(tc)
    tokenizer = data_tokenizer(tc)
    if tc.tokenizer:  # a model from scratch holds exactly the tokenizer's ids
        cfg = dataclasses.replace(cfg, vocab_size=tokenizer.size)
    devices = devices or jax.devices()
    mesh = make_mesh(tc.mesh, devices)
    check_tp_within_processes(mesh)
    data_ways = mesh.shape["dp"] * mesh.shape["fsdp"]
    if tc.batch_size % (data_ways * tc.grad_accum):
        raise common.UserError(f"batch_size={tc.batch_size} must split over dp x fsdp = "
                               f"{data_ways} devices and grad_accum={tc.grad_accum} micro-batches")
    shardings = common.param_shardings(cfg, mesh)
    model_flag = f"--init_from={tc.init_from}" if tc.init_from else f"--preset={tc.preset}"
    common.check_model_fits(model_flag, cfg, 16, "float32 weights, their gradients and AdamW's "
                            "two moments", mesh.shape["fsdp"] * mesh.shape["tp"])
    stats = {"val_bytes_per_token": 1.0}
    (train_tokens, train_docs), (val_tokens, val_docs) = load_data(tc, cfg, tokenizer, log, stats)
    n_docs = len({0, len(train_tokens), *train_docs}) - 1
    platform = jax.devices()[0].platform
    attn = pick_attention(tc.attention, cfg.dtype, platform, os.environ.get("XLA_FLAGS", ""),
                          tc.scan_layers, tc.doc_mask and len(train_tokens) / n_docs < tc.seq_len,
                          platform == "gpu" and hopper_segments(tc, cfg))
    # A checkpoint carries the tokenizer its data were read with, and its end-of-sequence ids,
    # for 06 and --export_hf
    files = {} if tokenizer is common.BYTES else {"tokenizer.json": tokenizer.spec}
    if tokenizer.stop:
        files["generation_config.json"] = {"eos_token_id": list(tokenizer.stop)}
    on_process_0(lambda: held.enter_context(common.hold_dir(tc.out_dir, "--out_dir")),
                 "--out_dir")  # process 0 writes it
    writer = Writer()
    held.callback(writer.join)

    params = jax.jit(common.init_params, static_argnums=0, out_shardings=shardings)(
        cfg, jax.random.key(tc.seed))
    opt = jax.jit(adamw_init, out_shardings={"mu": shardings, "nu": shardings,
                                             "count": NamedSharding(mesh, common.P())})(params)
    if tc.fp8_scaling == "delayed":  # no maximum recorded yet: calibrate_fp8 records them
        opt["fp8"] = jax.device_put(common.import_script("07_numerics").delayed_amax(
            cfg.n_layers), NamedSharding(mesh, common.P()))
    data_id = common.corpus_id(train_tokens, val_tokens)
    params, opt, start = restore(tc, cfg, params, opt, data_id, tokenizer)
    if tc.init_from and start == 0:
        t0 = time.perf_counter()
        params = common.load_hf_llama(tc.init_from, "float32", shardings)[1]
        log(f"initialized from {tc.init_from} in {time.perf_counter() - t0:.1f} s")
        note = common.window_note(tc.init_from, cfg)
        if note:
            log(note)
    if jax.process_count() > 1:  # each process read its own out_dir
        check_same_start(multihost_utils.process_allgather(np.int32(start)), tc.out_dir)
    if start >= tc.steps:
        log(f"{tc.out_dir} is at step {start}, at or past steps={tc.steps}: nothing to train "
            f"(a larger --steps goes on, with the cosine stretched to its length)")
        if not tc.breakdown:
            return [], params, cfg  # no step to compile; main still plots and samples

    n_dev, units = len(devices), common.peak_units(devices)
    flops_per_step = cfg.train_flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len
    peak, _, basis = common.ceilings(cfg.dtype)
    if jax.process_count() > 1 and common.device_chip() is None:
        # Each process measured its own chip: process 0's peak for all, so they print one MFU
        peak = float(multihost_utils.broadcast_one_to_all(np.float32(peak)))
        basis += ", process 0's measurement"
    unit = "bytes" if tokenizer is common.BYTES else "tokens"
    log(f"data: {tc.data or 'Python standard library source'}: {len(train_tokens):,} train "
        f"{unit}, {len(val_tokens):,} val {unit}" + (
            f"; attention kept within each of the {n_docs:,} train documents (on average "
            f"{len(train_tokens) / n_docs:,.0f} {unit})"
            if tc.doc_mask else ""))
    vocab = f" with a vocabulary of {cfg.vocab_size:,} ({tc.tokenizer})" if tc.tokenizer else ""
    log(f"model: {tc.init_from or tc.preset}{vocab}, {cfg.param_count() / 1e6:.2f}M params, "
        f"{cfg.dtype} compute, attention {attn}, remat {tc.remat}; mesh {dict(mesh.shape)}"
        f"{sp_text(tc, mesh)} over {n_dev} devices in {jax.process_count()} processes")
    shared = "" if units == n_dev else (f": the {n_dev} simulated devices share their host's "
                                        f"cores, whose peak counts once")
    log(f"MFU basis: {flops_per_step / 1e9:.1f} GFLOP per step (6N + causal attention) over "
        f"{units} x {peak / 1e12:.4g} TFLOP/s ({basis}){shared}")
    why = ("--lr" if tc.lr is not None else "the fine-tuning default" if tc.init_from else
           f"the default for width {cfg.d_model}: 1e-3 x 384 / {cfg.d_model}")
    log(f"learning rate: {tc.peak_lr():.3g} at the peak ({why}), " + (
        f"cosine to {tc.final_lr():.3g} at step {tc.steps}" if tc.warmup < tc.steps else
        f"warming up for the whole run (--warmup={tc.warmup}, --steps={tc.steps}) to end at "
        f"{tc.peak_lr() * tc.steps / tc.warmup:.3g}, with no cosine"))

    attention = attention_fn(attn, mesh,
                             platform == "gpu" and deterministic(os.environ.get("XLA_FLAGS", "")))
    step_fn = make_train_step(cfg, tc, mesh, attention)
    # Validation runs the model as the step does, its attention and shardings included: the
    # naive attention writes float32 scores, 32 GiB a layer for 4 x 8192 tokens of the 1B model,
    # which the step's kernel never holds. Unquantized, so that runs in any precision are compared
    # alike; one compiled layer in a loop, which compiles fast and is the faster forward on a CPU.
    plain = dataclasses.replace(tc, fp8=False, fp8_scaling="current", scan_layers=True)
    eval_fn = jax.jit(make_loss_fn(cfg, plain, mesh, attention))

    def batch(split, step, seed):
        """(x, y, segment ids or None) of one step, as global arrays."""
        tokens, docs = split
        local = common.get_batch(tokens, step, tc.batch_size, tc.seq_len, seed,
                                 jax.process_index(), jax.process_count(),
                                 docs if tc.doc_mask else None)
        x, y, *seg = [global_batch(a, mesh) for a in local]
        return x, y, (seg[0] if seg else None)

    train_split, val_split = (train_tokens, train_docs), (val_tokens, val_docs)

    if "fp8" in opt and start == 0:
        t0 = time.perf_counter()
        opt["fp8"] = calibrate_fp8(cfg, tc, mesh, attention, params, opt["fp8"],
                                   *batch(train_split, start, tc.seed))
        log(f"fp8: recorded the first maxima in one unquantized pass over step 1's first "
            f"micro-batch, {time.perf_counter() - t0:.1f} s")
    t0 = time.perf_counter()
    step_fn = step_fn.lower(params, opt, *batch(train_split, start, tc.seed)).compile()
    log(f"compiled the train step in {time.perf_counter() - t0:.1f} s")
    if tc.breakdown:
        loss_fn = make_loss_fn(cfg, tc, mesh, attention)
        if "fp8" in opt:  # forward and backward timed apart with the step's recorded maxima
            loss_fn = functools.partial(loss_fn, amax=opt["fp8"])
        breakdown(step_fn, loss_fn, params, opt, batch(train_split, start, tc.seed),
                  flops_per_step, peak, units, log, cfg, tc.batch_size * tc.seq_len, n_dev)
        return [], params, cfg

    history = []
    metrics_path = os.path.join(tc.out_dir, "metrics.jsonl")
    baseline = tc.init_from and start == 0  # the loaded model's validation loss, before a step
    if jax.process_index() == 0:
        if start == 0 and os.path.exists(metrics_path) and read_metrics(metrics_path):
            os.replace(metrics_path, metrics_path + ".old")  # a run that left no checkpoint
            log(f"note: {tc.out_dir} holds no checkpoint but the log of an earlier run: kept as "
                f"metrics.jsonl.old, and this run starts a new one")
        drop_metrics_after(metrics_path, start - 1 if baseline else start)
    interrupted = held.enter_context(stop_after_the_step(saving=tc.ckpt_every > 0,
                                                         peers=jax.process_count() > 1))

    def validate(params):
        """The mean loss over --eval_batches validation batches, or None where a stop is asked
        for before they are done: the step's checkpoint is not held back by them."""
        total = 0.0
        for i in range(tc.eval_batches):
            if interrupted[0]:
                return None
            total = total + eval_fn(params, *batch(val_split, i, tc.seed + 1))
        return float(total) / tc.eval_batches

    def record(row):
        history.append(row)
        if jax.process_index() == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    def val_row(val):
        """The validation loss a token, and a byte where tokens are not bytes: a figure that
        compares runs with different tokenizers (over the split's mean bytes a token)."""
        if val is None:
            return "validation left off: a stop was asked for", {}
        if tokenizer is common.BYTES:
            return f"val loss {val:.4f}", {"val_loss": val}
        per_byte = val / stats["val_bytes_per_token"]
        return (f"val loss {val:.4f} ({per_byte:.4f} a byte)",
                {"val_loss": val, "val_loss_per_byte": per_byte})

    if baseline:
        text, fields = val_row(validate(params))
        log(f"step     0 | {text} (the model as loaded from {tc.init_from})")
        if fields:
            record({"step": 0, **fields})
    t_last, steps_since = time.perf_counter(), 0
    batches = held.enter_context(prefetched(lambda step: batch(train_split, step, tc.seed),
                                            range(start, tc.steps), BATCHES_AHEAD))
    for step, xy in zip(range(start, tc.steps), batches):
        params, opt, m = step_fn(params, opt, *xy)
        done = step + 1
        if jax.process_count() > 1 and multihost_utils.reached_preemption_sync_point(done):
            # A SIGTERM to any process (JAX's preemption service takes it) tells all of them;
            # they agree on a step past the one each is at, and all save it and stop there.
            log(f"step {done:5d} | a process was sent SIGTERM: every process saves this step "
                f"and stops")
            interrupted[0] = True
        stopping = interrupted[0]  # read once: a Ctrl-C from here on stops after the next step
        steps_since += 1
        row = None
        saving = tc.ckpt_every and (done % tc.ckpt_every == 0 or done in (tc.steps, stop_after)
                                    or stopping)
        if saving or done % tc.log_every == 0 or done == tc.steps or done == start + 1:
            m = {k: float(v) for k, v in jax.device_get(m).items()}  # waits for the step
            if not m["finite"]:  # never checkpoint what would not resume
                kept = common.list_checkpoints(tc.out_dir)
                raise common.UserError(
                    f"loss {m['loss']} or weights not finite at step {done}: stopping; "
                    + (f"{tc.out_dir} keeps {os.path.basename(kept[-1])}, the last good "
                       f"checkpoint" if kept else f"no checkpoint in {tc.out_dir} yet"))
            dt = (time.perf_counter() - t_last) / steps_since
            tok_s = tc.batch_size * tc.seq_len / dt
            mfu = flops_per_step / dt / (peak * units)
            row = dict(step=done, loss=m["loss"], lr=m["lr"], grad_norm=m["grad_norm"],
                       ms_per_step=dt * 1e3, tokens_per_s=tok_s, mfu=mfu)
            log(f"step {done:5d} | loss {m['loss']:.4f} | lr {m['lr']:.1e} | "
                f"gnorm {m['grad_norm']:6.2f} | {dt * 1e3:8.1f} ms | {tok_s:10,.0f} tok/s | "
                f"mfu {100 * mfu:5.1f}%")
        if done % tc.eval_every == 0 or done == tc.steps:
            text, fields = val_row(validate(params))
            log(f"step {done:5d} | {text}")
            row = dict(row or {"step": done}, **fields) if fields else row
        if row is not None:
            record(row)
        if saving:
            save(tc, done, params, opt, cfg, data_id, writer, files,
                 last=stopping or done in (tc.steps, stop_after))
        writer.poll()
        if row is not None or saving:  # eval and saving stay out of the next ms/step
            t_last, steps_since = time.perf_counter(), 0
        if done == stop_after or stopping:
            break
    writer.wait()
    if interrupted[0]:
        if jax.process_count() > 1:  # process 0's checkpoint is written before any names it
            multihost_utils.sync_global_devices("checkpoint written")
        raise KeyboardInterrupt
    return history, params, cfg


def duration(seconds):
    whole_minutes = seconds >= 120 and seconds % 60 == 0
    return f"{seconds // 60:g} minutes" if whole_minutes else f"{seconds:g} s"


def wait_for_coordinator(coordinator, connect, wait_s=300, sleep=time.sleep):
    """Return once the coordinator's host name resolves and, with `connect`, its port answers;
    else, after wait_s, a one-line error. JAX would wait in silence on a name that never
    resolves (a typo) or on a process 0 that never starts (or a closed port), then end the
    process from C++ with no Python error. A cluster may publish process 0's name, and start
    it, after the others: a miss is retried."""
    host, _, port = coordinator.rpartition(":")
    address, deadline, said = (host.strip("[]"), int(port)), time.monotonic() + wait_s, set()
    while True:
        try:
            socket.getaddrinfo(*address, type=socket.SOCK_STREAM)
            if connect:
                socket.create_connection(address, timeout=5).close()
            return
        except OSError as e:
            resolved = not isinstance(e, socket.gaierror)
            why = (f"nothing answers at {coordinator}" if resolved else
                   f"the host {host!r} does not resolve") + f" ({e.strerror or e})"
            if time.monotonic() >= deadline:
                raise common.UserError(
                    f"coordinator={coordinator}: {why} after {duration(wait_s)}"
                    + (": start process 0 there, with the port open between the hosts"
                       if resolved else "")) from None
            if resolved not in said:
                print(f"{why}: trying again for up to {duration(wait_s)} (Ctrl-C stops)",
                      file=sys.stderr, flush=True)
                said.add(resolved)
            sleep(min(1.0, max(0.0, deadline - time.monotonic())))


def join(tc):
    """jax.distributed.initialize, with one-line errors where a user's setup is at fault."""
    # Said first: until every process has joined, JAX waits in silence.
    wait = duration(tc.join_timeout)
    print(f"process {tc.process_id} of {tc.num_processes}: joining the coordinator at "
          f"{tc.coordinator or '(found by the cluster)'}; every process must start within "
          f"{wait}", flush=True)
    if tc.coordinator:  # process 0 hosts the port; the others wait until it answers
        wait_for_coordinator(tc.coordinator, connect=tc.process_id != 0,
                             wait_s=tc.join_timeout)
    port = tc.coordinator.rpartition(":")[2]
    taken = (f"process 0 could not host the coordinator on port {port} ({{}}): another program, "
             f"or a run still going, holds the port; stop it or pick another port")
    if tc.coordinator and tc.process_id == 0:  # process 0 serves on every address, as JAX does
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as a server binds
            try:
                probe.bind(("", int(port)))
            except OSError as e:
                raise common.UserError(taken.format(e.strerror)) from None

    def give_up():  # JAX ends the process from C++ at its timeout, with a stack dump: say why
        print(f"error: not all {tc.num_processes} processes joined within {wait}: start each "
              f"with the same --coordinator and --num_processes and its own --process_id",
              file=sys.stderr, flush=True)
        os._exit(1)
    watchdog = threading.Timer(tc.join_timeout - min(3, tc.join_timeout / 4), give_up)
    watchdog.daemon = True
    watchdog.start()
    try:
        jax.distributed.initialize(tc.coordinator or None, tc.num_processes, tc.process_id,
                                   initialization_timeout=tc.join_timeout)
    except jax.errors.JaxRuntimeError as e:  # taken between the probe and here
        if tc.process_id != 0 or "RPC server" not in str(e):
            raise
        raise common.UserError(taken.format(str(e).splitlines()[0])) from None
    finally:
        watchdog.cancel()


def main():
    tc = common.parse_flags(TrainConfig())
    if tc.init_from and any(a.startswith("--preset=") for a in sys.argv[1:]):
        raise common.UserError("--preset and --init_from both name the model: --init_from takes "
                               "its shape from DIR/config.json; drop --preset")
    tc = dataclasses.replace(tc, sample_prompt=common.unescape(tc.sample_prompt))
    if not (tc.num_processes > 1 or tc.coordinator):
        return train_and_sample(tc)
    join(tc)
    check_processes_agree(tc)
    train_and_sample(tc)
    # Every process leaves together: process 0 hosts the coordinator, and a process that outlives
    # it finds the coordinator gone. (JAX still logs one harmless CANCELLED watch on the way out.)
    jax.distributed.shutdown()


def check_export_dir(tc):
    """--export_hf: a new directory, not --out_dir. Said before the training, not after it."""
    export, out = (os.path.realpath(p) for p in (tc.export_hf, tc.out_dir))
    if export == out:
        raise common.UserError(f"--export_hf={tc.export_hf} is --out_dir, where the "
                               f"checkpoints go: name another directory")
    if os.path.dirname(export) != out or os.path.isdir(out):  # else out_dir makes its parent
        common.check_new_dir(tc.export_hf, "--export_hf")


def train_and_sample(tc):
    if tc.export_hf:  # process 0 writes it
        on_process_0(lambda: check_export_dir(tc), "--export_hf")
    try:
        history, params, cfg = train(tc)
    except KeyboardInterrupt:  # Ctrl-C: say what is kept; common.run prints it without a traceback
        kept = [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)]
        if kept and int(kept[-1][5:]) == tc.steps:  # the signal came after the last step
            raise KeyboardInterrupt(
                f"every step trained: {tc.out_dir} keeps {kept[-1]}, the last; the same command "
                f"does what came after training (the plot, the sample, --export_hf)") from None
        raise KeyboardInterrupt(f"{tc.out_dir} keeps {kept[-1]}: the same command resumes from "
                                f"it" if kept else f"no checkpoint in {tc.out_dir} yet") from None
    if tc.breakdown:
        return
    if jax.process_index() == 0 and os.path.exists(os.path.join(tc.out_dir, "metrics.jsonl")):
        path = plot_metrics(tc.out_dir, "token" if tokenizer_dir(tc) else "byte")
        if path:
            print(f"loss curve: {path}")
    if (tc.sample_len or tc.export_hf) and jax.process_count() > 1:  # every process gathers
        params = gather_to_process_0(params)
    if jax.process_index() != 0:
        return
    tokenizer = data_tokenizer(tc)
    if tc.export_hf:
        export_hf(tc, cfg, params, tokenizer)
    if tc.sample_len:
        print("sample:\n" + sample(params, cfg, tokenizer.encode(tc.sample_prompt),
                                    tc.sample_len, tc.seed, tokenizer=tokenizer))


def export_hf(tc, cfg, params, tokenizer):
    """The trained model as a Hugging Face Llama directory: its weights in the compute dtype
    (what inference reads; the float32 master weights stay in the checkpoints) and the tokenizer
    its data were read with (bytes, or --init_from's or --tokenizer's, with that model's token
    ids and tokenizer settings). 06_kv_cache_inference.py, transformers and other tools that
    read Llama checkpoints load it."""
    t0 = time.perf_counter()
    path, cfg = tc.export_hf, dataclasses.replace(cfg, param_dtype=cfg.dtype)
    files = {"tokenizer.json": tokenizer.spec,
             "tokenizer_config.json": {"tokenizer_class": "PreTrainedTokenizerFast",
                                       "model_max_length": cfg.max_seq_len}}
    source = tokenizer_dir(tc)  # the settings of the tokenizer's own model, where it has them
    if source and os.path.isfile(os.path.join(source, "config.json")):
        settings = common.read_json(os.path.join(source, "config.json"))
        files["config.json"] = {k: settings[k] for k in ("bos_token_id", "eos_token_id",
                                                         "pad_token_id") if k in settings}
    for name in ("tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if source and os.path.isfile(os.path.join(source, name)):
            files[name] = common.read_json(os.path.join(source, name))
    common.save_hf_llama(path, cfg, params, files)
    print(f"exported the model to {path} as a Hugging Face Llama directory in {cfg.dtype}, "
          f"{time.perf_counter() - t0:.1f} s (python 06_kv_cache_inference.py --checkpoint={path})")


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --batch_size or --seq_len, the same batch in "
                             "--grad_accum pieces, --remat=dots or full, or more devices")
