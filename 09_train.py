"""Train the course's Llama-style model on bytes of text, and see how fast it learns and runs.

    python 09_train.py                          # `small` on the Python standard library's source
    python 09_train.py --preset=tiny --steps=50 --data=input.txt

Each step logs the loss, learning rate, gradient norm, time, tokens/s and MFU: model FLOPs
(6N plus causal attention, common.Config.train_flops_per_token) over the step time, divided by
the device's peak (the datasheet when common.CHIPS knows the chip, else the matmul rate measured
here). The optimizer is AdamW (Loshchilov & Hutter 2019) written out, with linear warmup, cosine
decay and global-norm clipping; weights and optimizer state stay float32 while the model
computes in the preset's dtype. At the end a sample is generated from a prompt.

This is the single-device version; sharding over many devices and hosts, checkpoints and resume
build on it.
"""
import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

import common


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    preset: str = "small"        # a common.PRESETS name
    steps: int = 200
    batch_size: int = 8          # sequences per step
    seq_len: int = 256           # tokens per sequence
    lr: float = 3e-3             # peak learning rate
    min_lr: float = 3e-4         # end of the cosine
    warmup: int = 20             # steps of linear warmup
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip: float = 1.0       # global-norm clipping threshold; 0 disables
    seed: int = 0
    data: str = ""               # file or directory of text; empty: the Python stdlib's source
    log_every: int = 10
    eval_every: int = 50         # validation loss every N steps (and at the end)
    eval_batches: int = 4
    sample_len: int = 200        # bytes generated at the end
    dtype: str = "float32"       # compute dtype (float32 or bfloat16); weights stay float32

    def __post_init__(self):
        for f in ("steps", "batch_size", "seq_len", "log_every", "eval_every", "eval_batches"):
            if getattr(self, f) < 1:
                raise common.UserError(f"{f} must be >= 1, got {getattr(self, f)}")
        if self.lr <= 0 or self.min_lr < 0 or self.warmup < 0 or self.sample_len < 0:
            raise common.UserError("lr must be > 0; min_lr, warmup and sample_len >= 0")
        if self.preset not in common.PRESETS:
            raise common.UserError(f"unknown preset {self.preset!r} "
                                   f"(presets: {', '.join(common.PRESETS)})")


def lr_schedule(step, tc):
    """Linear warmup to tc.lr, then cosine decay to tc.min_lr at tc.steps."""
    warm = tc.lr * (step + 1) / max(tc.warmup, 1)
    frac = jnp.clip((step - tc.warmup) / max(tc.steps - tc.warmup, 1), 0.0, 1.0)
    cos = tc.min_lr + 0.5 * (tc.lr - tc.min_lr) * (1 + jnp.cos(math.pi * frac))
    return jnp.where(step < tc.warmup, warm, cos)


def adamw_init(params):
    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
    return {"mu": zeros, "nu": zeros, "count": jnp.zeros((), jnp.int32)}


def adamw_update(grads, state, params, lr, tc, decay_mask):
    """One AdamW step: Adam's bias-corrected moments, plus weight decay decoupled from the
    gradient, applied where decay_mask is True (matrices; norm gains are left undecayed)."""
    count = state["count"] + 1
    mu = jax.tree.map(lambda m, g: tc.b1 * m + (1 - tc.b1) * g, state["mu"], grads)
    nu = jax.tree.map(lambda v, g: tc.b2 * v + (1 - tc.b2) * g * g, state["nu"], grads)
    c1, c2 = 1 - tc.b1 ** count, 1 - tc.b2 ** count

    def step(p, m, v, decay):
        return p - lr * ((m / c1) / (jnp.sqrt(v / c2) + 1e-8) + tc.weight_decay * decay * p)

    return jax.tree.map(step, params, mu, nu, decay_mask), {"mu": mu, "nu": nu, "count": count}


def make_train_step(cfg, tc):
    decay_mask = jax.tree.map(lambda axes: "norm" not in axes, common.logical_axes(cfg),
                              is_leaf=lambda x: isinstance(x, tuple))
    def loss_fn(params, x, y):
        return common.cross_entropy(common.forward(params, x, cfg), y)

    @jax.jit
    def train_step(params, opt, x, y):
        loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
        gnorm = jnp.sqrt(sum(jnp.sum(g * g) for g in jax.tree.leaves(grads)))
        if tc.grad_clip > 0:
            grads = jax.tree.map(lambda g: g * jnp.minimum(1.0, tc.grad_clip / (gnorm + 1e-6)), grads)
        lr = lr_schedule(opt["count"], tc)
        params, opt = adamw_update(grads, opt, params, lr, tc, decay_mask)
        return params, opt, {"loss": loss, "grad_norm": gnorm, "lr": lr}

    return train_step


def sample(params, cfg, prompt, n, seed=0, temperature=0.8):
    """Generate n bytes after `prompt` by full recompute over a fixed window (the KV-cached way
    is lesson 06)."""
    window = min(cfg.max_seq_len, 256)

    @jax.jit
    def next_token(tokens, length, key):
        logits = common.forward(params, tokens[None], cfg)[0, length - 1]
        return jax.random.categorical(key, logits / temperature)

    toks = list(prompt)
    key = jax.random.key(seed)
    for _ in range(n):
        ctx = toks[-window:]
        buf = np.zeros(window, np.int32)
        buf[:len(ctx)] = ctx
        key, sub = jax.random.split(key)
        toks.append(int(next_token(buf, len(ctx), sub)))
    return bytes(toks).decode("utf-8", errors="replace")


def main():
    tc = common.parse_flags(TrainConfig())
    cfg = dataclasses.replace(common.Config.preset(tc.preset), param_dtype="float32", dtype=tc.dtype)
    if tc.seq_len > cfg.max_seq_len:
        raise common.UserError(f"seq_len={tc.seq_len} exceeds the preset's max_seq_len "
                               f"{cfg.max_seq_len}")
    if cfg.vocab_size < 256:
        raise common.UserError("byte-level data needs vocab_size >= 256")
    train, val = common.load_corpus(tc.data or None)
    print(f"data: {tc.data or 'Python standard library source'}: {len(train):,} train bytes, "
          f"{len(val):,} val bytes")
    params = jax.jit(common.init_params, static_argnums=0)(cfg, jax.random.key(tc.seed))
    opt = adamw_init(params)
    n_params = cfg.param_count()
    flops_per_step = cfg.train_flops_per_token(tc.seq_len) * tc.batch_size * tc.seq_len
    peak, _, basis = common.ceilings(tc.dtype)
    print(f"model: {tc.preset}, {n_params / 1e6:.2f}M params; {flops_per_step / 1e9:.1f} GFLOP "
          f"per step (6N + causal attention); MFU against {peak / 1e12:.1f} TFLOP/s ({basis})")

    train_step = make_train_step(cfg, tc)
    eval_loss = jax.jit(lambda p, x, y: common.cross_entropy(common.forward(p, x, cfg), y))
    t0 = time.perf_counter()
    x, y = common.get_batch(train, 0, tc.batch_size, tc.seq_len, tc.seed)
    train_step = train_step.lower(params, opt, x, y).compile()
    print(f"compiled the train step in {time.perf_counter() - t0:.1f} s")

    t_last = time.perf_counter()
    for step in range(tc.steps):
        x, y = common.get_batch(train, step, tc.batch_size, tc.seq_len, tc.seed)
        params, opt, m = train_step(params, opt, x, y)
        if (step + 1) % tc.log_every == 0 or step == 0:
            m = jax.device_get(m)  # waits for the step
            if not np.isfinite(m["loss"]):
                raise common.UserError(f"loss is {m['loss']} at step {step + 1}: stopping")
            dt = (time.perf_counter() - t_last) / (tc.log_every if step else 1)
            t_last = time.perf_counter()
            tok_s = tc.batch_size * tc.seq_len / dt
            print(f"step {step + 1:5d} | loss {m['loss']:.4f} | lr {m['lr']:.1e} | "
                  f"gnorm {m['grad_norm']:.2f} | {dt * 1e3:7.1f} ms | {tok_s:9,.0f} tok/s | "
                  f"mfu {100 * flops_per_step / dt / peak:5.1f}%")
        if (step + 1) % tc.eval_every == 0 or step + 1 == tc.steps:
            losses = [eval_loss(params, *common.get_batch(val, i, tc.batch_size, tc.seq_len, 1))
                      for i in range(tc.eval_batches)]
            print(f"step {step + 1:5d} | val loss {float(np.mean(losses)):.4f}")
            t_last = time.perf_counter()
    if tc.sample_len:
        print("sample:\n" + sample(params, cfg, b"def ", tc.sample_len, tc.seed))


if __name__ == "__main__":
    common.run(main)
