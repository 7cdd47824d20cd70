"""Sharding a transformer: data parallel, FSDP, tensor and sequence parallel, and what each costs.

    python 03_sharding.py                          # GPUs: every scheme (TP on --tp of them)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python 03_sharding.py    # 8 CPU devices
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python 03_sharding.py --mesh=dp:2,fsdp:2,tp:2
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python 03_sharding.py --mesh=dp:4,tp:2 \
        --sequence_parallel=true

A mesh names the devices' axes (here dp, fsdp, tp); a PartitionSpec says which mesh axis splits
which dimension of an array; a NamedSharding is the pair. jit then compiles one program per
device, and XLA's SPMD partitioner inserts the collectives the shardings imply (Xu et al.,
"GSPMD", 2021). The params never name mesh axes: each leaf has logical axis names (common.py's
param_specs), and one rule table (common.SHARDING_RULES) maps them to mesh axes:
  - data parallel (DP): the batch is split, every device keeps all weights; the gradients are
    all-reduced, 2x their bytes each step on a ring;
  - FSDP (ZeRO-3, Rajbhandari et al. 2020): the batch is split and so is each weight's embed
    dimension; a weight is all-gathered just before its matmul (in the forward and again in
    the backward pass) and its gradient reduce-scattered, so each device stores 1/N of the
    weights, gradients and optimizer state for 1.5x DP's traffic;
  - tensor parallel (TP, Megatron-LM, Shoeybi et al. 2019, section 3): attention heads and the
    MLP width are split; wq/wk/wv and w_gate/w_up are column-parallel (output split), wo and
    w_down row-parallel (contraction split), so each sub-block ends in an all-reduce of the
    [B, T, D] activations in the forward pass, and in the backward pass the gradient of its
    input is all-reduced;
  - TP+SP, sequence parallelism (Korthikanti et al. 2022; 09_train.py's --sequence_parallel):
    TP that also splits the tokens between those matmuls, so each all-reduce becomes a
    reduce-scatter and an all-gather of the same bytes in all, and the norms, residual adds
    and what they keep for the backward pass shrink tp-fold;
  - FSDP+TP: both, on a 2-D mesh.
For each scheme the lesson prints per-device bytes of parameters, gradients, Adam's two float32
moments and activations; the collectives each layer needs, predicted from these rules, beside
those read back from the compiled program's HLO text; and checks that loss and gradients equal
the unsharded model's. Last, the tokens/s of a training step on one device, with FSDP over
every local device, and with TP (and TP+SP) in groups of --tp devices, each beside its compute
and communication bounds (on GPUs; on simulated CPU devices the figures mean nothing).

References: Xu et al., "GSPMD: general and scalable parallelization for ML computation graphs",
2021; Rajbhandari et al., "ZeRO: memory optimizations toward training trillion parameter
models", SC 2020, section 5; Shoeybi et al., "Megatron-LM", 2019, section 3 and figure 3; the
JAX scaling book (Austin et al. 2025), "How to parallelize a transformer for training".
"""
import collections
import dataclasses
import functools
import importlib.util
import math
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

import common



@dataclasses.dataclass(frozen=True)
class ShardingConfig:
    preset: str = ""           # model of the analysis (common.PRESETS); empty: small (GPU), tiny
                               # (CPU), or the smallest one every scheme's mesh can split
    batch_size: int = 0        # global batch of the analysis, sequences; 0: 16, rounded up to a
                               # multiple of the schemes' dp*fsdp
    seq_len: int = 128         # tokens per sequence
    mesh: str = ""             # one mesh to analyse, e.g. dp:2,fsdp:2,tp:2; empty: the 5 schemes
    sequence_parallel: bool = False  # with --mesh and tp: split the tokens between the matmuls
    tp: int = 2                # TP degree of the default TP, TP+SP and FSDP+TP schemes
    bench_preset: str = ""     # model of the tokens/s benchmark; empty: llama-3.2-1b (GPU), tiny
                               # (CPU), or the smallest one that splits over all the devices
    bench_batch: int = 0       # sequences per device in the benchmark; 0: 16 (GPU), 4 (CPU)
    bench_seq: int = 0         # tokens per sequence in the benchmark; 0: 1024 (GPU), 64 (CPU),
                               # at most the preset's max_seq_len
    bench_remat: str = "dots"  # none, full or dots (keep matmul outputs: fits a 1B model's step)
    bench_iters: int = 5       # timed steps, the median is reported

    def __post_init__(self):
        for f in ("seq_len", "tp", "bench_iters"):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        for f in ("batch_size", "bench_batch", "bench_seq"):
            if getattr(self, f) < 0:
                raise common.UserError(f"{f} must be >= 0 (0 picks a size for the device)")
        for f in ("preset", "bench_preset"):
            if getattr(self, f) and getattr(self, f) not in common.PRESETS:
                raise common.UserError(f"unknown {f} {getattr(self, f)!r} "
                                       f"(presets: {', '.join(common.PRESETS)})")
        if self.bench_remat not in ("none", "full", "dots"):
            raise common.UserError(f"bench_remat must be none, full or dots, "
                                   f"got {self.bench_remat}")
        sizes = common.parse_mesh(self.mesh)
        if self.sequence_parallel and (not self.mesh or sizes["tp"] == 1):
            raise common.UserError("sequence_parallel needs a --mesh with tp > 1 (without "
                                   "--mesh the TP+SP scheme is analysed anyway)")


# ----------------------------------------------------------------------------------------------
# Meshes and shardings
# ----------------------------------------------------------------------------------------------

def check_batch(batch_size, seq_len, mesh, sequence_parallel=False):
    split, tp = mesh.shape["dp"] * mesh.shape["fsdp"], mesh.shape["tp"]
    if batch_size % split:
        raise common.UserError(f"batch_size={batch_size} does not split over dp*fsdp={split} "
                               f"devices of mesh {common.mesh_name(dict(mesh.shape))}")
    if sequence_parallel:
        common.check_sequence_split(batch_size // split, seq_len, tp, mesh.shape["fsdp"])


def scheme_rules(mesh, batch_size, sequence_parallel):
    """The rule table of a scheme: common.SHARDING_RULES, or with sequence parallelism the
    residual stream's tokens split over tp as well (the batch rows where each dp x fsdp group
    has a multiple of tp of them and FSDP is off, else the positions)."""
    if not sequence_parallel or mesh.shape["tp"] == 1:
        return common.SHARDING_RULES
    rows = batch_size // (mesh.shape["dp"] * mesh.shape["fsdp"])
    return common.sequence_parallel_rules(rows, mesh.shape["tp"], mesh.shape["fsdp"])


def sharding_of(mesh, axes, rules=None):
    """The NamedSharding of an array with these logical axis names, by a rule table
    (common.SHARDING_RULES unless given)."""
    return NamedSharding(mesh, common.logical_to_spec(axes, mesh, rules))


def constrain_fn(mesh, rules=None):
    """For common.forward's `constrain` hook: pin activations to the rules' shardings, so that
    XLA follows the scheme (batch over dp and fsdp, the MLP width over tp) rather than guess."""
    return lambda x, axes: jax.lax.with_sharding_constraint(x, sharding_of(mesh, axes, rules))


def layer_shardings(cfg, mesh):
    """Shardings of one layer's params: those of params["layers"] less the stacked layer axis."""
    return jax.tree.map(lambda s: NamedSharding(mesh, P(*s.spec[1:])),
                        common.param_shardings(cfg, mesh)["layers"])


# ----------------------------------------------------------------------------------------------
# The block and the model, as losses to differentiate
# ----------------------------------------------------------------------------------------------

def block(p, x, cos, sin, cfg, constrain=None):
    """One layer of common.forward, written out so that one block can be compiled alone.
    p: one layer's params (no layer axis); x: [B, T, D]. Under TP the q/k/v and gate/up
    matmuls are column-parallel (their output dim, heads or mlp, is split) and wo, w_down
    row-parallel (their contraction is split), which is where the all-reduces come from. The
    residual stream x has axes of its own ("residual_batch", "residual_seq"): sequence
    parallelism splits its tokens over tp too, so the norms' outputs are gathered before the
    matmuls and the matmuls' sums reduce-scattered back into x."""
    constrain = constrain or (lambda a, axes: a)
    dt = jnp.dtype(cfg.dtype)
    p = jax.tree.map(lambda w: w.astype(dt), p)
    residual, act = ("residual_batch", "residual_seq", "embed"), ("batch", "seq", "embed")
    h = constrain(common.rms_norm(x, p["attn_norm"], cfg.norm_eps), act)
    q = jnp.einsum("btd,dhk->bthk", h, p["wq"])  # [B, T, H, Dh]
    k = jnp.einsum("btd,dhk->bthk", h, p["wk"])  # [B, T, KH, Dh]
    v = jnp.einsum("btd,dhk->bthk", h, p["wv"])
    q, k = common.apply_rope(q, cos, sin), common.apply_rope(k, cos, sin)
    q = constrain(q, ("batch", "seq", "heads", "head_dim"))
    k, v = (constrain(a, ("batch", "seq", "kv_heads", "head_dim")) for a in (k, v))
    o = constrain(common.attention_reference(q, k, v, True), ("batch", "seq", "heads", "head_dim"))
    x = constrain(x + jnp.einsum("bthk,hkd->btd", o, p["wo"]), residual)
    h = constrain(common.rms_norm(x, p["mlp_norm"], cfg.norm_eps), act)
    g = jax.nn.silu(jnp.einsum("btd,df->btf", h, p["w_gate"]))  # [B, T, F]
    u = jnp.einsum("btd,df->btf", h, p["w_up"])
    gu = constrain(g * u, ("batch", "seq", "mlp"))
    return constrain(x + jnp.einsum("btf,fd->btd", gu, p["w_down"]), residual)


def block_loss(p, x, cfg, constrain=None):
    """A scalar to differentiate one block by: the mean square of its output (float32)."""
    B, T, _ = x.shape
    cos, sin = common.rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (B, T)), cfg)
    y = block(p, x, cos, sin, cfg, constrain)
    return jnp.mean(jnp.square(y.astype(jnp.float32)))


def model_loss(params, tokens, targets, cfg, constrain=None, remat="none"):
    logits = common.forward(params, tokens, cfg, remat=remat, constrain=constrain)
    return common.cross_entropy(logits, targets)


def block_grad_fn(cfg, mesh, rules=None):
    """jit'd (layer params, x) -> (loss, grads) with the scheme's shardings; grads come back
    sharded like the params, as an optimizer would consume them."""
    f = functools.partial(block_loss, cfg=cfg, constrain=constrain_fn(mesh, rules))
    ls = layer_shardings(cfg, mesh)
    xs = sharding_of(mesh, ("residual_batch", "residual_seq", "embed"), rules)
    return jax.jit(jax.value_and_grad(f), in_shardings=(ls, xs),
                   out_shardings=(NamedSharding(mesh, P()), ls))


def model_grad_fn(cfg, mesh, remat="none", rules=None):
    f = functools.partial(model_loss, cfg=cfg, constrain=constrain_fn(mesh, rules), remat=remat)
    ps = common.param_shardings(cfg, mesh)
    tok = sharding_of(mesh, ("batch", "seq"), rules)
    return jax.jit(jax.value_and_grad(f), in_shardings=(ps, tok, tok),
                   out_shardings=(NamedSharding(mesh, P()), ps))


# ----------------------------------------------------------------------------------------------
# Memory per device
# ----------------------------------------------------------------------------------------------

def memory_per_device(cfg, mesh, batch_size, seq_len, sequence_parallel=False):
    """Bytes on each device: params and grads (param dtype), Adam's two float32 moments, and an
    estimate of the activations a training step keeps for its backward pass (no remat). With
    sequence parallelism what the norms and residual adds keep (each layer's input and middle,
    each norm's normalized float32 input) is on 1/tp of the tokens; the norms' outputs are
    kept as gathered, whole, for the weight gradients (Megatron gathers them again in the
    backward pass instead, and so saves those on 1/tp of the tokens too)."""
    shardings = jax.tree.leaves(common.param_shardings(cfg, mesh))
    specs = jax.tree.leaves(common.param_specs(cfg),
                            is_leaf=lambda s: isinstance(s, common.ParamSpec))
    elems = sum(math.prod(sh.shard_shape(s.shape)) for sh, s in zip(shardings, specs))
    pbytes, dbytes = jnp.dtype(cfg.param_dtype).itemsize, jnp.dtype(cfg.dtype).itemsize
    b = batch_size // (mesh.shape["dp"] * mesh.shape["fsdp"])
    t = mesh.shape["tp"]
    T, D, H, KH, Dh, F = (seq_len, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim,
                          cfg.d_ff)
    s = t if sequence_parallel else 1
    per_layer = (b * T * 2 * D * (dbytes + 4) // s           # input, middle, normalized x 2
                 + b * T * 2 * D * dbytes                    # the 2 norms' outputs
                 + b * T * (2 * H + 2 * KH) * Dh // t * dbytes  # q, k, v, attention output
                 + b * (H // t) * T * T * 4                  # softmax probabilities, float32
                 + b * T * 3 * F // t * dbytes)              # gate, up, gate*up
    logits = 2 * b * T * cfg.vocab_size // (t if cfg.vocab_size % t == 0 else 1) * 4
    return {"params": elems * pbytes, "grads": elems * pbytes, "adam": 2 * 4 * elems,
            "activations": cfg.n_layers * per_layer + logits}


# ----------------------------------------------------------------------------------------------
# Collectives: predicted from the rules, and read back from the compiled HLO
# ----------------------------------------------------------------------------------------------

Coll = collections.namedtuple("Coll", "op bytes group")  # bytes: the full array (see below)


def predict_layer_collectives(cfg, sizes, batch_size, seq_len, passes=1,
                              sequence_parallel=False):
    """The collectives one layer's forward + backward needs, as arrays of `bytes`: the gathered
    array for an all-gather, the array before it is reduced for a reduce-scatter or all-reduce.
    passes: how many times each weight is gathered: 1 in one program (XLA reuses the forward's
    gather in the backward pass), 2 across the scan over layers (one per pass, as ZeRO-3 does).
    sequence_parallel: with tp, the batch rows split over tp between the sub-blocks."""
    d, f, t = sizes["dp"], sizes["fsdp"], sizes["tp"]
    D, H, KH, Dh, F = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff
    # Everything moves in the compute dtype. A weight is cast before it is gathered, and its
    # gradient is reduced before the cast back to the params' dtype: the reduce-scatter is the
    # gather's transpose. (XLA on GPUs does this; XLA:CPU moves bf16 as float32, 2x the bytes.)
    db = jnp.dtype(cfg.dtype).itemsize
    mats = [D * H * Dh, D * KH * Dh, D * KH * Dh, H * Dh * D, D * F, D * F, F * D]  # wq..w_down
    out = []
    if f > 1:  # FSDP: gather each weight (its tp slice) before use, reduce-scatter its gradient
        out += [Coll("all-gather", m // t * db, f) for m in mats] * passes
        out += [Coll("reduce-scatter", m // t * db, f) for m in mats]
    if d > 1:  # DP: all-reduce every gradient (what FSDP left of it)
        out += [Coll("all-reduce", m // (t * f) * db, d) for m in mats]
    sp = sequence_parallel and t > 1
    norm_group = d * f * (t if sp else 1)
    if norm_group > 1:  # the norms' gains are replicated: their gradients are all-reduced
        out += [Coll("all-reduce", D * db, norm_group)] * 2
    act = batch_size // (d * f) * seq_len * D * db
    if t > 1 and not sp:  # TP: XLA reduces each matmul's partial sums alone: 2 forward, 5 back
        out += [Coll("all-reduce", act, t)] * 7
    if sp:  # each of those reductions a reduce-scatter into the split residual stream; the
        # norms' outputs gathered before the matmuls (forward), and the gradient of each
        # sub-block's output gathered before its row-parallel matmul (backward)
        out += [Coll("reduce-scatter", act, t)] * 7 + [Coll("all-gather", act, t)] * 4
    return out


_DTYPE_BYTES = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2, "s32": 4,
                "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "f8e4m3fn": 1, "f8e5m2": 1}
_OPS = ("all-gather", "reduce-scatter", "all-reduce", "all-to-all", "collective-permute")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) (" + "|".join(_OPS)
                    + r")(-start|-done)?\((.*)$")


def _arrays(shape_text):
    """[(dims, bytes)] of every array in an HLO shape, tuples flattened."""
    return [(dims, _DTYPE_BYTES.get(dt, 4) * math.prod(int(x) for x in dims.split(",") if x))
            for dt, dims in re.findall(r"\b([a-z]+[0-9a-z]*)\[([\d,]*)\]", shape_text)]


def _group_size(line, n_devices):
    """Devices in each replica group: {{0,1},{2,3}}, the iota form [G,S]<=[...], or the mesh
    form mesh['axis_0'=4,'axis_1'=2] {'axis_1'}, where XLA may name the devices between the
    two: mesh[...], device_ids=([2,4]T(1,0)) {'axis_0'}."""
    m = re.search(r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\S+)?\s*\{([^}]*)\}", line)
    if m:
        axes = dict(re.findall(r"'(\w+)'=(\d+)", m.group(1)))
        return math.prod(int(axes[a]) for a in re.findall(r"'(\w+)'", m.group(2)))
    m = re.search(r"replica_groups=\[([\d,]+)\]<=", line)
    if m:
        return int(m.group(1).split(",")[-1])
    m = re.search(r"replica_groups=\{\{([\d,]*)\}", line)
    if m:
        return len(m.group(1).split(","))
    return n_devices  # replica_groups={}: every device


def parse_collectives(hlo, n_devices):
    """(in_loops, outside): lists of Coll read from compiled HLO text, each repeated as many
    times as it runs (a computation reached through a while loop's body runs its known trip
    count times). in_loops: those of the scan over layers, found by the loop or, where XLA
    unrolled it, by the `while/body` in the op's name. Scalars (the loss) are left out."""
    comps, name, entry = {}, None, None
    for line in hlo.splitlines():
        head = re.match(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if head:
            name = head.group(2)
            comps[name] = []
            entry = name if head.group(1) else entry
        elif name is not None and line.startswith(" "):
            comps[name].append(line)
    found = {True: [], False: []}

    def visit(comp, times, in_loop, depth=0):
        starts = {m.group(1): line for line in comps.get(comp, [])
                  for m in [_INSTR.match(line)] if m and m.group(4) == "-start"}
        for line in comps.get(comp, []):
            m = _INSTR.match(line)
            if m and m.group(4) != "-start":
                # GPUs split a collective into start and done: the done's shape is the result
                # alone (the start's holds the operands too), the start has the groups.
                op, where = m.group(3), line
                if m.group(4) == "-done":
                    operand = re.match(r"\s*%?([\w.\-]+)\)", m.group(5))
                    where = starts.get(operand.group(1), line) if operand else line
                group = _group_size(where, n_devices)
                in_layers = in_loop or "/while/body/" in where
                for dims, b in _arrays(m.group(2)):
                    if dims:  # scalars (the loss) are left out
                        full = b * group if op == "reduce-scatter" else b
                        found[in_layers] += [Coll(op, full, group)] * times
            if re.search(r"\basync-(done|update)\(", line) or depth > 50:
                continue  # the async-start's call is followed once
            trip = re.search(r'"known_trip_count":\{"n":"(\d+)"\}', line)
            for key, callee in re.findall(r"\b(body|condition|calls|to_apply|branch_computations|"
                                          r"true_computation|false_computation)=\{?%?([\w.\-]+)",
                                          line):
                loop = key == "body"
                visit(callee, times * (int(trip.group(1)) if loop and trip else 1),
                      in_loop or loop, depth + 1)

    visit(entry, 1, False)
    return found[True], found[False]


def summarize(colls):
    """{op: (arrays, total bytes)}."""
    out = collections.defaultdict(lambda: [0, 0])
    for c in colls:
        out[c.op][0] += 1
        out[c.op][1] += c.bytes
    return {k: tuple(v) for k, v in sorted(out.items())}


def ring_traffic(colls):
    """Bytes each device sends for these collectives on a ring (lesson 02): (N-1)/N of the
    array for a gather or a reduce-scatter, twice that for an all-reduce; a permute sends it all."""
    factor = {"all-gather": 1, "reduce-scatter": 1, "all-reduce": 2, "all-to-all": 1}
    return sum(c.bytes if c.op == "collective-permute" else
               factor[c.op] * c.bytes * (c.group - 1) / c.group for c in colls)


def compile_to_read(lowered):
    """Compile a program to read (and run once), not to time: on a CPU, LLVM at -O0 halves the
    compile time; the HLO passes, and so the collectives, are the same."""
    cpu = jax.devices()[0].platform == "cpu"
    return lowered.compile(compiler_options={"xla_backend_optimization_level": 0} if cpu else None)


def compiled_block(cfg, mesh, batch_size, seq_len, rules=None):
    """The block's gradient program, compiled from shapes alone."""
    params = jax.eval_shape(lambda: common.init_params(cfg, jax.random.key(0)))
    layer = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape[1:], a.dtype), params["layers"])
    x = jax.ShapeDtypeStruct((batch_size, seq_len, cfg.d_model), jnp.dtype(cfg.dtype))
    return compile_to_read(block_grad_fn(cfg, mesh, rules).lower(layer, x))


def compiled_model(cfg, mesh, batch_size, seq_len, rules=None):
    params = jax.eval_shape(lambda: common.init_params(cfg, jax.random.key(0)))
    tok = jax.ShapeDtypeStruct((batch_size, seq_len), jnp.int32)
    return compile_to_read(model_grad_fn(cfg, mesh, rules=rules).lower(params, tok, tok))


# ----------------------------------------------------------------------------------------------
# A training step, to time: loss, gradients, Adam
# ----------------------------------------------------------------------------------------------

def fast_key(seed):
    """A key of XLA's own generator (RBG): its program compiles several times faster than
    threefry's, and these params need not be reproducible across backends."""
    return jax.random.key(seed, impl="rbg")


def random_tokens(seed, batch_size, seq_len, vocab_size):
    return np.random.default_rng(seed).integers(0, vocab_size, (batch_size, seq_len), np.int32)


def adam_update(params, grads, opt, lr=1e-4, b1=0.9, b2=0.95, eps=1e-8):
    """Adam (Kingma & Ba 2015, algorithm 1), moments in float32, sharded like the params."""
    count = opt["count"] + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g.astype(jnp.float32), opt["mu"], grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * jnp.square(g.astype(jnp.float32)),
                      opt["nu"], grads)
    c1, c2 = 1 - b1 ** count, 1 - b2 ** count
    new = jax.tree.map(lambda p, m, v: (p - lr * (m / c1) / (jnp.sqrt(v / c2) + eps))
                       .astype(p.dtype), params, mu, nu)
    return new, {"mu": mu, "nu": nu, "count": count}


def make_train_step(cfg, mesh, remat, rules=None):
    ps = common.param_shardings(cfg, mesh)
    opt_s = {"mu": ps, "nu": ps, "count": NamedSharding(mesh, P())}
    tok = sharding_of(mesh, ("batch", "seq"), rules)
    loss = functools.partial(model_loss, cfg=cfg, constrain=constrain_fn(mesh, rules),
                             remat=remat)

    def step(params, opt, x, y):
        value, grads = jax.value_and_grad(loss)(params, x, y)
        params, opt = adam_update(params, grads, opt)
        return params, opt, value

    init = jax.jit(lambda key: common.init_params(cfg, key), out_shardings=ps)
    init_opt = jax.jit(lambda p: {"mu": jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), p),
                                  "nu": jax.tree.map(lambda a: jnp.zeros(a.shape, jnp.float32), p),
                                  "count": jnp.zeros((), jnp.int32)}, out_shardings=opt_s)
    step = jax.jit(step, in_shardings=(ps, opt_s, tok, tok),
                   out_shardings=(ps, opt_s, NamedSharding(mesh, P())), donate_argnums=(0, 1))
    return init, init_opt, step, tok


def time_training(cfg, mesh, batch_size, seq_len, remat, iters, rules=None):
    """(compile s, median step s, last loss). The state is carried from step to step (donated),
    as in training; two batches of random tokens alternate."""
    init, init_opt, step, tok = make_train_step(cfg, mesh, remat, rules)
    params = init(fast_key(0))
    opt = init_opt(params)
    batches = []
    for seed in (1, 2):
        b = random_tokens(seed, batch_size, seq_len + 1, cfg.vocab_size)
        batches.append((jax.device_put(b[:, :-1], tok), jax.device_put(b[:, 1:], tok)))
    t0 = time.perf_counter()
    compiled = step.lower(params, opt, *batches[0]).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(2 + iters):
        t0 = time.perf_counter()
        params, opt, loss = compiled(params, opt, *batches[i % 2])
        loss.block_until_ready()
        times.append(time.perf_counter() - t0)
    return compile_s, float(np.median(times[2:])), float(loss)


def bench_plan(run, devices, on_gpu):
    """(preset name, model config, sequences per device, tokens per sequence, [(name, mesh sizes,
    sequence parallel, mesh)]) of the tokens/s benchmark: one device, FSDP over all of them,
    then (where --tp divides the devices and the model's heads) FSDP over n/tp groups of tp-way
    TP, without and with sequence parallelism. main() calls it before the analysis, so that a
    benchmark that cannot run is refused at once; the errors name the benchmark's own FSDP
    mesh, which no flag spells out, and the flags that change it."""
    n, tp = len(devices), run.tp
    preset = run.bench_preset or ("llama-3.2-1b" if on_gpu else "tiny")
    fits = [p for p, c in common.PRESETS.items() if c.d_model % n == 0]  # smallest first
    if not run.bench_preset and common.Config.preset(preset).d_model % n and fits:
        print(f"benchmark: {preset}'s d_model={common.Config.preset(preset).d_model} does not "
              f"split {n} ways; it takes preset {fits[0]}")
        preset = fits[0]
    cfg = common.Config.preset(preset)
    batch = run.bench_batch or (16 if on_gpu else 4)
    seq = run.bench_seq or min(1024 if on_gpu else 64, cfg.max_seq_len)
    if seq > cfg.max_seq_len:
        raise common.UserError(f"bench_seq={seq} exceeds max_seq_len={cfg.max_seq_len} of the "
                               f"benchmark's preset {preset}: set a shorter --bench_seq or "
                               f"another --bench_preset")
    plan = [("", False)] + ([(f"fsdp:{n}", False)] if n > 1 else [])
    if 1 < tp <= n and n % tp == 0 and not (cfg.n_kv_heads % tp or cfg.d_ff % tp
                                            or cfg.vocab_size % tp or cfg.d_model % (n // tp)):
        tp_mesh = f"fsdp:{n // tp},tp:{tp}" if n > tp else f"tp:{tp}"
        plan += [(tp_mesh, False)]
        try:  # each dp x fsdp group's rows or its positions must split over tp
            common.check_sequence_split(batch, seq, tp, n // tp)
            plan += [(tp_mesh, True)]
        except common.UserError as e:
            print(f"benchmark: no SP row: {e}")
    elif 1 < tp <= n and n % tp == 0:
        print(f"benchmark: no TP rows at tp={tp}: preset {preset} would have to split its "
              f"{cfg.n_kv_heads} kv heads, d_ff and vocabulary {tp} ways and d_model "
              f"{n // tp} ways (another --tp or --bench_preset)")
    meshes = []
    for text, sp in plan:
        sizes = common.parse_mesh(text)
        meshes.append((common.mesh_name(sizes) + (" SP" if sp else ""), sizes, sp,
                       common.make_mesh(sizes, devices)))
    if cfg.d_model % n:  # FSDP splits each weight's embed dim (d_model) over all n devices
        fix = f"--bench_preset={' or '.join(fits)}, or fewer devices" if fits else "fewer devices"
        raise common.UserError(f"the benchmark's FSDP mesh fsdp:{n} (all {n} devices) cannot "
                               f"split d_model={cfg.d_model} of preset {preset} {n} ways: use "
                               f"{fix}")
    for *_, mesh in meshes:
        common.param_shardings(cfg, mesh)  # any other dimension that does not divide
    return preset, cfg, batch, seq, meshes


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def show_sharded_array(mesh, cfg):
    """A weight under this mesh: its PartitionSpec, and which piece each device holds."""
    spec = common.param_specs(cfg)["layers"]["w_up"]
    pspec = common.logical_to_spec(spec.axes[1:], mesh)
    w = jax.device_put(jnp.zeros(spec.shape[1:], jnp.float32), NamedSharding(mesh, pspec))
    print(f"\nw_up {list(w.shape)} (logical axes {spec.axes[1:]}) on mesh "
          f"{dict(mesh.shape)} -> {pspec}")
    for s in sorted(w.addressable_shards, key=lambda s: s.device.id)[:8]:
        rows, cols = s.index
        print(f"  device {s.device.id}: rows {rows.start or 0}:{rows.stop or w.shape[0]}, "
              f"cols {cols.start or 0}:{cols.stop or w.shape[1]} -> shard {list(s.data.shape)}")
    if importlib.util.find_spec("rich"):
        jax.debug.visualize_array_sharding(w)


def analysis_model(run, meshes, on_gpu):
    """(preset, config, global batch, note) of the analysis. Flags left unset adapt to the
    meshes: the batch is 16 rounded up to a multiple of every mesh's dp*fsdp, and the model is
    the default preset, or where the meshes cannot split it (tiny's d_model=64 over 3 or 6
    devices) the other of tiny and small; the note says so. A preset the flag names, or none
    that splits, gives the first mesh's one-line error."""
    split = math.lcm(*(m.shape["dp"] * m.shape["fsdp"] for m in meshes)) if meshes else 1
    batch = run.batch_size or -(-16 // split) * split
    default = "small" if on_gpu else "tiny"
    names = [run.preset] if run.preset else [default] + [p for p in ("tiny", "small")
                                                          if p != default]
    errors, note = [], None
    for name in names:
        cfg = common.Config.preset(name)
        try:
            for mesh in meshes:
                common.param_shardings(cfg, mesh)  # every weight dimension a mesh axis splits
        except common.UserError as e:
            errors.append(f"{name}: {e}")
            note = note or f" ({name}'s weights do not split over {common.mesh_name(mesh.shape)})"
            continue
        return name, cfg, batch, note or ""
    if len(names) == 1:
        raise common.UserError(errors[0].split(": ", 1)[1])
    raise common.UserError(f"no preset splits over these meshes ({'; '.join(errors)}): use "
                           f"another --tp, --mesh or number of devices")


def check_tp(tp, n, schemes=True):
    """A --tp past the n devices is refused; one that does not divide them leaves no FSDP+TP
    scheme and no TP benchmark rows (TP alone still runs on tp of the devices), which the
    returned note says. One device runs the unsharded model alone, whatever tp is."""
    if tp > n > 1:
        raise common.UserError(f"tp={tp} exceeds the {n} devices")
    if n > 1 and tp > 1 and n % tp:
        return (f"no {'FSDP+TP scheme or ' if schemes else ''}TP benchmark rows: tp={tp} does "
                f"not divide the {n} devices")
    return ""


def default_schemes(n, tp):
    """[(name, mesh sizes, sequence parallel)]."""
    schemes = [("DP", {"dp": n}, False), ("FSDP", {"fsdp": n}, False)]
    if 1 < tp <= n:
        schemes += [("TP", {"tp": tp}, False), ("TP+SP", {"tp": tp}, True)]
    if n % tp == 0 and n // tp > 1 and tp > 1:
        schemes.append(("FSDP+TP", {"fsdp": n // tp, "tp": tp}, False))
    return [(name, {a: s.get(a, 1) for a in common.MESH_AXES}, sp) for name, s, sp in schemes]


def _size(b):
    return f"{b / 2**20:.2f}M" if b >= 2**20 else f"{b / 2**10:.1f}K" if b >= 2**10 else f"{b:.0f}B"


def _cell(summary, op, per=1):
    """'arrays / total bytes' of one op kind, per `per` (layers)."""
    if op not in summary:
        return "-"
    n, b = summary[op]
    return f"{n / per:.3g} / {_size(b / per)}"


def analyse(cfg, name, sizes, sp, mesh, B, T, params, batch):
    """Memory, collectives (predicted and compiled) and the sharded loss and grads of a scheme."""
    rules = scheme_rules(mesh, B, sp)
    c_model = compiled_model(cfg, mesh, B, T, rules)
    stats = c_model.memory_analysis()
    temp = getattr(stats, "temp_size_in_bytes", None) if stats is not None else None
    ps, tok = common.param_shardings(cfg, mesh), sharding_of(mesh, ("batch", "seq"), rules)
    loss, grads = c_model(jax.device_put(params, ps), *(jax.device_put(t, tok) for t in batch))
    blk = ([], []) if mesh.size == 1 else parse_collectives(
        compiled_block(cfg, mesh, B, T, rules).as_text(), mesh.size)
    loops, outside = parse_collectives(c_model.as_text(), mesh.size)
    return {"name": name, "sizes": sizes, "sp": sp, "temp": temp,
            "mem": memory_per_device(cfg, mesh, B, T, sp),
            "loss": float(loss), "grads": jax.tree.map(np.asarray, grads),
            "block_pred": predict_layer_collectives(cfg, sizes, B, T, 1, sp),
            "block": blk[0] + blk[1],
            "layer_pred": predict_layer_collectives(cfg, sizes, B, T, 2, sp),
            "loops": loops, "outside": outside}


def print_collectives(results, L, on_gpu):
    print(f"\ncollectives of one layer, forward + backward, as arrays / bytes (an all-gather's "
          f"gathered array, a reduction's input); ring: bytes each device sends on a ring. "
          f"Block: one layer compiled alone; layer: the model's scan over {L} layers, per layer; "
          f"outside: embedding, head and loss.")
    print(f"{'scheme':<21}{'op':<19}{'block pred':>14}{'block XLA':>14}{'layer pred':>14}"
          f"{'layer XLA':>14}{'outside XLA':>14}")
    keys = ("block_pred", "block", "layer_pred", "loops", "outside")
    for r in results:
        s = [summarize(r[k]) for k in keys]
        for op in sorted(set().union(*s)):
            print(f"{r['name']:<20} {op:<19}{_cell(s[0], op):>14}{_cell(s[1], op):>14}"
                  f"{_cell(s[2], op):>14}{_cell(s[3], op, L):>14}{_cell(s[4], op):>14}")
        t = [ring_traffic(r[k]) for k in keys]
        print(f"{r['name']:<20} {'ring':<19}{_size(t[0]):>14}{_size(t[1]):>14}{_size(t[2]):>14}"
              f"{_size(t[3] / L):>14}{_size(t[4]):>14}")
    if any(r["sizes"]["fsdp"] > 1 for r in results):
        print("- FSDP: a weight is gathered once in the block (XLA reuses the forward's gather in "
              "the backward pass) but twice per layer in the model, whose forward and backward "
              "are two loops.")
    if any(r["sizes"]["fsdp"] > 1 and r["sp"] for r in results):
        print("- FSDP with sequence parallelism: the prediction is not exact there. In the "
              "block XLA gathers wo and w_down again for the backward pass (2 arrays more), "
              "and sums each norm gain's gradient in two steps, not one.")
    if not on_gpu and any(r["sizes"]["fsdp"] > 1 or r["sp"] for r in results):
        print("- On a CPU XLA keeps a reduce-scatter as an all-reduce then a slice (the same "
              "array, twice the ring traffic); GPU compilers turn the pair into a "
              "reduce-scatter.")
    if any(r["sizes"]["tp"] > 1 for r in results):
        print("- TP: Megatron needs 2 all-reduces forward and 2 backward. XLA's partitioner "
              "reduces each matmul's partial sums on its own, so the prediction counts one "
              "backward all-reduce per column-parallel matmul (wq, wk, wv, w_gate, w_up): 5. "
              "Summing the partials before reducing (Megatron's f operator; XLA's "
              "AllReduceReassociate pass can do it) saves 3 [B, T, D] arrays per layer: where XLA "
              "shows fewer than predicted, it did.")
    if any(r["sp"] for r in results):
        print("- TP+SP: each of TP's all-reduces becomes a reduce-scatter (into the residual "
              "stream, split over tp) and the norms' outputs are all-gathered before the next "
              "matmuls; in the backward pass the gradient of each sub-block's output is gathered "
              "too, where TP's was already whole. A reduce-scatter and an all-gather send what "
              "one all-reduce does, so the forward pass moves the same bytes, and the backward "
              "pass less while XLA reduces per matmul: 5 reduce-scatters and 2 gathers against 5 "
              "all-reduces. The norms' gains now see 1/tp of the tokens each: their gradients are "
              "all-reduced over tp too.")


def pick_schemes(run, n):
    """(name, mesh sizes, sequence parallel) per scheme: the --mesh given, else the default
    schemes over n devices (none on one device)."""
    sizes = common.parse_mesh(run.mesh)
    if math.prod(sizes.values()) > 1:  # a mesh of one device is the "1 device" row already
        sp = run.sequence_parallel and sizes["tp"] > 1
        return [(common.mesh_name(sizes) + (" SP" if sp else ""), sizes, sp)]
    return default_schemes(n, run.tp) if n > 1 and not run.mesh else []


def print_memory(results):
    """Per-device memory of each scheme: params, grads and Adam's moments by count, activations
    by estimate, XLA's scratch as the compiled step plans it."""
    print("\nper-device memory, MiB; activations: an estimate of what the backward pass keeps "
          "(no remat); XLA temp: all scratch of the compiled step, from memory_analysis")
    print(f"{'scheme':<21}{'params':>10}{'grads':>10}{'adam':>10}{'activations':>13}"
          f"{'XLA temp':>10}")
    for r in results:
        mem, mib = r["mem"], lambda b: f"{b / 2**20:.2f}"
        print(f"{r['name']:<21}{mib(mem['params']):>10}{mib(mem['grads']):>10}"
              f"{mib(mem['adam']):>10}{mib(mem['activations']):>13}"
              f"{mib(r['temp']) if r['temp'] is not None else 'n/a':>10}")
    by_name = {r["name"]: r for r in results}
    if "TP" in by_name and "TP+SP" in by_name and by_name["TP"]["temp"] is not None:
        tp, sp = by_name["TP"], by_name["TP+SP"]
        saved = (tp["mem"]["activations"] - sp["mem"]["activations"]) / 2**20
        print(f"TP+SP against TP: {saved:.2f} MiB less activations by the estimate, "
              f"{(tp['temp'] - sp['temp']) / 2**20:.2f} MiB less XLA temp")


def print_agreement(results, ref):
    """Each sharded scheme's loss and gradients against the unsharded run's."""
    print("\nsharded vs unsharded, float32: |loss diff| and max relative gradient diff")
    for r in results:
        dg = max(float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
                 for a, b in zip(jax.tree.leaves(r["grads"]), jax.tree.leaves(ref["grads"])))
        print(f"  {r['name']:<21}{abs(r['loss'] - ref['loss']):>10.2e}{dg:>10.2e}")


def bench_training(run, plan, n, on_gpu):
    """Tokens/s of a training step on bench_plan's meshes, beside its bounds: the FLOPs at peak
    and the traffic at the link's datasheet bandwidth."""
    bench_preset, bcfg, bb, bt, bench_meshes = plan
    # Tokens/s of a training step: FSDP on every local device against one device, with the same
    # batch per device (weak scaling: the work per device is constant); then TP in groups of tp
    # devices, which share their sequences (the batch is split over the groups only).
    # bench_plan chose the model, the sizes and the two meshes before the analysis.
    peak, _, peak_src = common.ceilings(bcfg.dtype)
    flops_tok = bcfg.train_flops_per_token(bt)
    rows = []
    for name, sizes, sp, mesh in bench_meshes:
        batch_size = bb * sizes["dp"] * sizes["fsdp"]
        compile_s, step_s, loss = time_training(bcfg, mesh, batch_size, bt, run.bench_remat,
                                                run.bench_iters, scheme_rules(mesh, batch_size, sp))
        rows.append((name, sizes, sp, batch_size, compile_s, step_s, loss))
    # Bounds per step: the FLOPs at peak, and the traffic at the link's datasheet bandwidth.
    # FSDP: every weight gathered twice (forward, backward) and every gradient reduce-scattered,
    # all in the compute dtype, (N-1)/N of each on a ring (lesson 02). TP: the layers'
    # activation reductions as predicted above (7 a layer, before any reassociation).
    chip = common.device_chip()
    n_params = bcfg.param_count()
    db = jnp.dtype(bcfg.dtype).itemsize

    def comm_bytes(sizes, sp, batch_size):
        f, t = sizes["fsdp"], sizes["tp"]
        tp_only = {"dp": 1, "fsdp": 1, "tp": t}
        acts = predict_layer_collectives(bcfg, tp_only, batch_size // f, bt, 2, sp)
        return (3 * db * n_params / t * (f - 1) / f
                + (bcfg.n_layers * ring_traffic(acts) if t > 1 else 0))
    print(f"\ntraining step (loss, grads, Adam) of {bench_preset} ({n_params / 1e6:.1f}M params), "
          f"{bb} x {bt} tokens per device (per group of tp devices in the TP rows), "
          f"remat={run.bench_remat}; MFU = "
          f"{flops_tok / 1e9:.3g} GFLOP/token (6N + attention) x tok/s over {peak / 1e12:.3g} "
          f"TFLOP/s per device ({peak_src}"
          + ("" if on_gpu else "; simulated devices share the host, whose peak counts once")
          + "); comm = FSDP's gathers and reduce-scatters and TP's activation reductions "
          + (f"at {chip.link_bw / 1e9:.0f} GB/s ({chip.name} datasheet)" if chip else
             f"(not predicted: no link figure for {jax.devices()[0].device_kind})"))
    print(f"{'mesh':<16}{'devices':>8}{'batch':>7}{'compile s':>11}{'step ms':>10}"
          f"{'peak ms':>9}{'comm ms':>9}{'tok/s':>12}{'MFU':>7}{'vs 1 device':>13}{'loss':>9}")
    base = None
    for name, sizes, sp, batch_size, compile_s, step_s, loss in rows:
        nd = math.prod(sizes.values())
        tps = batch_size * bt / step_s
        base = base or tps
        units = common.peak_units(jax.devices()[:nd])  # (a CPU's host counts once)
        t_peak = flops_tok * batch_size * bt / (units * peak)
        mfu = tps * flops_tok / (units * peak)
        comm = comm_bytes(sizes, sp, batch_size)
        t_comm = f"{comm / chip.link_bw * 1e3:.1f}" if chip else "n/a"
        print(f"{name:<16}{nd:>8}{batch_size:>7}{compile_s:>11.1f}{step_s * 1e3:>10.1f}"
              f"{t_peak * 1e3:>9.1f}{t_comm:>9}{tps:>12,.0f}{mfu:>7.1%}"
              f"{f'{tps / base:.2f}x of {nd}':>13}{loss:>9.4f}")
    if any(sizes["tp"] > 1 for _, sizes, *_ in rows):
        print("- TP's reductions sit between each layer's matmuls, on the critical path, where "
              "FSDP's weight traffic can run beside the compute (09_train.py --breakdown=true "
              "measures how much of each is exposed)")
    if not on_gpu and n > 1:
        print("(simulated CPU devices share the same cores: this speedup means nothing)")


def main():
    run = common.parse_flags(ShardingConfig())
    devices = jax.devices()
    on_gpu = devices[0].platform == "gpu"
    n = len(devices)
    note = check_tp(run.tp, n, schemes=not run.mesh)  # (--mesh replaces the schemes)
    schemes = pick_schemes(run, n)
    # (make_mesh refuses a mesh of more devices than exist in one line)
    meshes = [(name, sizes, sp, common.make_mesh(sizes, devices)) for name, sizes, sp in schemes]
    preset, cfg, B, passed_over = analysis_model(run, [m for *_, m in meshes], on_gpu)
    T = run.seq_len
    if T > cfg.max_seq_len:
        longer = [p for p in ("tiny", "small") if common.PRESETS[p].max_seq_len >= T]
        raise common.UserError(f"seq_len={T} exceeds max_seq_len={cfg.max_seq_len} of preset "
                               f"{preset}: use a shorter --seq_len"
                               + (f" or --preset={longer[0]}" if longer else ""))
    print(f"{n} x {devices[0].device_kind}, jax {jax.__version__}; model {preset} "
          f"({cfg.param_count() / 1e6:.1f}M params, {cfg.param_dtype}), batch {B} x {T} tokens"
          f"{passed_over}")
    if note:
        print(note)
    if len(schemes) > 1:  # TP's group is smaller than the others' mesh: say so before the tables
        print("schemes: " + ", ".join(
            f"{name} = {common.mesh_name(sizes)} ({math.prod(sizes.values())} devices)"
            for name, sizes, _ in schemes))
    if n == 1:
        print("one device: every scheme is the unsharded model; on a CPU set "
              "XLA_FLAGS=--xla_force_host_platform_device_count=8 to simulate 8 devices")
    for _, _, sp, mesh in meshes:
        check_batch(B, T, mesh, sp)
    plan = bench_plan(run, devices, on_gpu)
    bench_preset, bcfg = plan[:2]
    size = jnp.dtype(cfg.param_dtype).itemsize
    common.check_model_fits(f"preset={preset}", cfg, size, f"its {cfg.param_dtype} weights on "
                            f"one device")
    size = jnp.dtype(bcfg.param_dtype).itemsize  # adam_update's state: weights, grads, 2 moments
    common.check_model_fits(f"bench_preset={bench_preset}", bcfg, 2 * size + 8,
                            f"{bcfg.param_dtype} weights and gradients and Adam's two float32 "
                            f"moments on one device (the 1-device row)")
    show_sharded_array(meshes[-1][3] if meshes else common.make_mesh(common.parse_mesh("")), cfg)

    params = jax.jit(common.init_params, static_argnums=0)(cfg, fast_key(0))
    tokens = random_tokens(0, B, T + 1, cfg.vocab_size)
    batch = (tokens[:, :-1], tokens[:, 1:])
    one = ("1 device", common.parse_mesh(""), False,
           common.make_mesh(common.parse_mesh(""), devices))
    with jax.default_matmul_precision("float32"):  # no TF32 on GPUs: compare to float32 tolerance
        results = [analyse(cfg, *m, B, T, params, batch) for m in [one] + meshes]
    ref = results[0]

    print_memory(results)

    if len(results) > 1:
        print_collectives(results[1:], cfg.n_layers, on_gpu)
        print_agreement(results[1:], ref)

    bench_training(run, plan, n, on_gpu)


if __name__ == "__main__":
    common.run(main, smaller="try a smaller --batch_size, --bench_preset, --bench_batch or "
                             "--bench_seq, --bench_remat=dots or full, or more devices")
