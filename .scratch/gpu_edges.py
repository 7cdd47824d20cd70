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
for dt in (jnp.bfloat16, jnp.float32):
    for M, K, N in ((1000, 300, 70), (1, 4096, 4096), (17, 33, 65)):
        x, w, b = r(M, K, dt=dt), r(K, N, dt=dt), r(N, dt=dt)
        case(f"matmul {M}x{K}x{N} {jnp.dtype(dt).name} gelu", lambda: rel(k08.matmul(x, w, b, "gelu"), k08.matmul_reference(x, w, b, "gelu")))
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
for args in ((2, 1000, 1000, 8, 2, 128, True, jnp.bfloat16), (1, 1024, 1024, 8, 8, 64, True, jnp.bfloat16),
             (1, 1024, 1024, 8, 2, 128, False, jnp.bfloat16), (1, 256, 700, 4, 1, 64, False, jnp.bfloat16),
             (1, 300, 300, 4, 2, 80, True, jnp.float32), (2, 512, 512, 4, 2, 128, True, jnp.bfloat16, True),
             (1, 2048, 2048, 4, 4, 256, True, jnp.bfloat16)):
    case(f"flash {args}", lambda: fl(*args))
for B, KH, G, S, D in ((3, 2, 4, 1000, 128), (1, 8, 4, 4097, 128), (2, 1, 32, 300, 64)):
    q, kc, vc = r(B, KH * G, D), r(B, KH, S, D), r(B, KH, S, D)
    L = jnp.asarray(np.linspace(1, S, B).astype(np.int32))
    case(f"decode B{B} KH{KH} G{G} S{S} D{D}", lambda: rel(k08.decode_attention(q, kc, vc, L), k08.decode_attention_reference(q, kc, vc, L)))
    kq, vq = jnp.round(r(B, KH, S, D, dt=jnp.float32) * 40).astype(jnp.int8), jnp.round(r(B, KH, S, D, dt=jnp.float32) * 40).astype(jnp.int8)
    ks, vs = jnp.abs(r(B, KH, S, dt=jnp.float32)) / 40, jnp.abs(r(B, KH, S, dt=jnp.float32)) / 40
    case(f"decode int8 B{B} KH{KH} G{G} S{S} D{D}", lambda: rel(k08.decode_attention(q, kq, vq, L, ks, vs), k08.decode_attention_reference(q, kq, vq, L, ks, vs)))
for M, K, N in ((1, 4096, 4096), (3, 1000, 300), (40, 14336, 4096), (1, 64, 16)):
    x = r(M, K); wq, sc = k08.quantize_int8(r(N, K, dt=jnp.float32))
    case(f"int8_matmul {M}x{K}x{N}", lambda: rel(k08.int8_matmul(x, wq, sc), k08.int8_matmul_reference(x, wq, sc)))
