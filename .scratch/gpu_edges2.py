import traceback, jax, jax.numpy as jnp, numpy as np, common
k08 = common.import_script("08_pallas_kernels")
att = common.attention_reference
key = iter(jax.random.split(jax.random.key(0), 200))
def r(*s, dt=jnp.bfloat16): return jax.random.normal(next(key), s, jnp.float32).astype(dt)
def rel(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.max(np.abs(a - b)) / (np.max(np.abs(b)) + 1e-30))
def case(name, fn):
    try: print(f"{name:55s} rel err {fn():.2e}")
    except Exception as e: print(f"{name:55s} FAILED {type(e).__name__}: {str(e).splitlines()[0][:150]}")
def fl(B, T, S, H, KH, D, causal, dt, seg=False, grad=True):
    q, k, v = r(B, T, H, D, dt=dt), r(B, S, KH, D, dt=dt), r(B, S, KH, D, dt=dt)
    sg = jnp.asarray(np.repeat(np.arange(B * T) // max(T // 3, 1), 1).reshape(B, T) % 3, jnp.int32) if seg else None
    f = lambda q, k, v: k08.flash_attention(q, k, v, causal=causal, segment_ids=sg)
    g = lambda q, k, v: att(q, k, v, causal, sg)
    e = rel(f(q, k, v), g(q, k, v))
    if grad:
        do = r(B, T, H, D, dt=dt)
        _, vf = jax.vjp(f, q, k, v); _, vg = jax.vjp(g, q, k, v)
        e = max([e] + [rel(a, b) for a, b in zip(vf(do), vg(do))])
    return e
for args in ((1, 300, 300, 4, 2, 80, True, jnp.float32), (1, 2048, 2048, 4, 4, 256, True, jnp.bfloat16),
             (1, 1024, 1024, 4, 4, 192, True, jnp.bfloat16), (1, 512, 512, 4, 2, 80, False, jnp.bfloat16),
             (1, 1024, 1024, 8, 2, 128, True, jnp.bfloat16)):
    q = jnp.zeros((1, args[1], args[3], args[5]), args[7])
    print("hopper" if k08.hopper_available(q, q, None, args[6]) else "portable", end=" ")
    case(f"flash {args}", lambda: fl(*args))
for B, KH, G, S, D in ((3, 2, 4, 1000, 80), (2, 1, 8, 300, 96)):
    q, kc, vc = r(B, KH * G, D), r(B, KH, S, D), r(B, KH, S, D)
    L = jnp.asarray(np.linspace(1, S, B).astype(np.int32))
    case(f"decode B{B} KH{KH} G{G} S{S} D{D}", lambda: rel(k08.decode_attention(q, kc, vc, L), k08.decode_attention_reference(q, kc, vc, L)))
    kq, vq = jnp.round(r(B, KH, S, D, dt=jnp.float32) * 40).astype(jnp.int8), jnp.round(r(B, KH, S, D, dt=jnp.float32) * 40).astype(jnp.int8)
    ks, vs = jnp.abs(r(B, KH, S, dt=jnp.float32)) / 40, jnp.abs(r(B, KH, S, dt=jnp.float32)) / 40
    case(f"decode int8 B{B} KH{KH} G{G} S{S} D{D}", lambda: rel(k08.decode_attention(q, kq, vq, L, ks, vs), k08.decode_attention_reference(q, kq, vq, L, ks, vs)))
