"""06_kv_cache_inference: cached generation against full recompute with common.forward, decode
attention against common.attention_reference, and serving, speculative decoding and int8 against
plain generation, with tolerances measured on the tiny model."""
import dataclasses
import functools
import json
import math
import os
import re
import subprocess
import sys
import types
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common

inf = common.import_script("06_kv_cache_inference")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = common.Config.preset("tiny")   # float32, vocab 256, 2 layers, 4 heads / 2 kv heads of 16
TIED = dataclasses.replace(TINY, tie_embeddings=True, n_kv_heads=1,
                           rope_scaling=(8.0, 1.0, 4.0, 32))
CACHE = 64                            # one cache length, so that compiled steps are shared
PROMPTS = [[3, 1, 4, 1, 5], list(range(40, 57)), [9], [2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4]]


def numpy_params(cfg, seed):
    """common.init_params' distributions drawn by numpy: no compile, the same model."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(
        lambda s: np.ones(s.shape, np.float32) if s.init == "ones" else
        (s.scale * rng.standard_normal(s.shape)).astype(np.float32),
        common.param_specs(cfg), is_leaf=lambda x: isinstance(x, common.ParamSpec))


@functools.lru_cache(maxsize=None)
def params_for(cfg, seed=0):
    return jax.tree.map(jnp.asarray, numpy_params(cfg, seed))


@functools.lru_cache(maxsize=None)
def inference_params_for(cfg, seed=0):
    return inf.inference_params(params_for(cfg, seed), cfg)


@functools.lru_cache(maxsize=None)
def full_forward(cfg):
    return jax.jit(lambda p, t: common.forward(p, t, cfg))


def greedy_full_recompute(params, cfg, prompt, n):
    """Argmax decoding the slow way: the whole sequence through common.forward for every token
    (in a fixed-length buffer, one compile; causal, so the padding after the end is never seen)."""
    fwd = full_forward(cfg)
    toks = list(prompt)
    for _ in range(n):
        buf = np.zeros((1, CACHE), np.int32)
        buf[0, :len(toks)] = toks
        toks.append(int(np.argmax(fwd(params, buf)[0, len(toks) - 1])))
    return toks[len(prompt):]


@pytest.mark.parametrize("cfg", [TINY, TIED], ids=["gqa", "mqa-tied-rope-scaled"])
def test_cached_greedy_equals_full_recompute_on_ragged_batch(cfg):
    params = params_for(cfg)
    got = inf.generate(params, cfg, PROMPTS, 9, cache_len=CACHE)
    for prompt, toks in zip(PROMPTS, got):
        assert toks == greedy_full_recompute(params, cfg, prompt, 9)


def test_cached_greedy_equals_full_recompute_at_batch_1():
    """One prompt: every product sees one row, a multiply and a sum along the weight's rows."""
    params = params_for(TINY)
    ip = inf.inference_params(params, TINY)
    for prompt in PROMPTS[:2]:
        assert (inf.generate(ip, TINY, [prompt], 9, cache_len=CACHE)[0] ==
                greedy_full_recompute(params, TINY, prompt, 9))


@pytest.mark.parametrize("row_sum_max", [inf.ROW_SUM_MAX, 0], ids=["small", "large"])
def test_int8_batch_1_carries_a_zero_row_and_matches_batch_2(row_sum_max, monkeypatch):
    """int8 weights at batch 1: the decode step carries a zero second row through the layers
    (forward_cached) so that each product stays a matrix multiply, for the matrices above
    ROW_SUM_MAX (all of them with 0; none of this tiny model's otherwise, whose one row is then
    summed). The tokens are those the same prompt gets beside another. ROW_SUM_MAX is read
    while tracing: the compiled programs are dropped before and after, or the second case would
    run the first one's."""
    monkeypatch.setattr(inf, "ROW_SUM_MAX", row_sum_max)
    jax.clear_caches()
    try:
        qp = inf.quantize_params(inference_params_for(TINY), TINY)
        for prompt in PROMPTS[:2]:
            assert (inf.generate(qp, TINY, [prompt], 9, cache_len=CACHE)[0] ==
                    inf.generate(qp, TINY, [prompt, PROMPTS[2]], 9, cache_len=CACHE)[0])
    finally:
        jax.clear_caches()


def np_attention(q, k, v):
    """float64 softmax attention of q [T, H, D] to k, v [S, KH, D], query t at position
    S - T + t, each group of H / KH query heads sharing a kv head."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    T, H, D = q.shape
    S, KH = k.shape[:2]
    k, v = np.repeat(k, H // KH, axis=1), np.repeat(v, H // KH, axis=1)
    s = np.einsum("thd,shd->hts", q, k) / np.sqrt(D)
    s = np.where(np.arange(S)[None, None] <= (S - T + np.arange(T))[None, :, None], s, -np.inf)
    w = np.exp(s - s.max(-1, keepdims=True))
    return np.einsum("hts,shd->thd", w / w.sum(-1, keepdims=True), v)


@pytest.mark.parametrize("T", [1, 3])
def test_decode_attention_matches_reference(T):
    """Each row against float64 attention over its own valid prefix; the int8 cache against the
    same on the dequantized keys and values."""
    B, S, H, KH, Dh = 3, 21, 4, 2, 16
    rng = np.random.default_rng(T)
    q = rng.standard_normal((B, T, H, Dh), np.float32)
    k = rng.standard_normal((B, KH, S, Dh), np.float32)  # the cache's layout: heads, positions
    v = rng.standard_normal((B, KH, S, Dh), np.float32)
    lengths = np.array([5, S, T], np.int32)

    @jax.jit
    def both(q, k, v):
        (k8, ks), (v8, vs) = inf.quantize_kv(k), inf.quantize_kv(v)
        return (inf.decode_attention_reference(q, k, v, lengths),
                inf.decode_attention_reference(q, k8, v8, lengths, ks, vs),
                k8 * ks[..., None], v8 * vs[..., None])

    got, got8, kd, vd = both(q, k, v)
    for b, n in enumerate(lengths.tolist()):
        kb, vb, kdb, vdb = (np.swapaxes(a[b, :, :n], 0, 1) for a in (k, v, kd, vd))
        np.testing.assert_allclose(got[b], np_attention(q[b], kb, vb), atol=1e-5)
        np.testing.assert_allclose(got8[b], np_attention(q[b], kdb, vdb), atol=1e-5)


def input_major(name, layer=1):
    """A tiny layer's matrix in common's input-major layout, merged as inference_params merges
    it (which then stores them output-major)."""
    w = params_for(TINY)["layers"]
    return {"wqkv": jnp.concatenate([w["wq"], w["wk"], w["wv"]], axis=2), "wo": w["wo"],
            "w_gate_up": jnp.stack([w["w_gate"], w["w_up"]], axis=2),
            "w_down": w["w_down"]}[name][layer]


@pytest.mark.parametrize("name", ["wqkv", "wo", "w_gate_up", "w_down"])
def test_int8_weight_roundtrip_within_half_a_step(name):
    w = input_major(name)
    axes = inf.CONTRACTED[name]
    qw = jax.tree.map(np.asarray, inf.quantize_int8(w, axes))
    assert qw["q"].dtype == np.int8
    assert qw["scale"].shape == tuple(d for i, d in enumerate(w.shape) if i not in axes)
    scale = np.expand_dims(qw["scale"], axes)
    assert np.all(np.abs(qw["q"] * scale - np.asarray(w)) <= scale / 2 + 1e-7)
    # the largest weight of every output channel uses the whole range
    assert np.all(np.max(np.abs(qw["q"]), axis=axes) == 127)


def test_int8_kv_roundtrip_per_token_and_head():
    x = np.random.default_rng(2).standard_normal((2, 7, 3, 16), np.float32)
    x *= np.arange(1, 4, dtype=np.float32)[:, None]
    q, scale = (np.asarray(a) for a in jax.jit(inf.quantize_kv)(x))
    assert q.dtype == np.int8 and scale.shape == (2, 7, 3)
    assert np.all(np.abs(q * scale[..., None] - x) <= scale[..., None] / 2 + 1e-6)


def test_capacity_reproduces_the_lectures_a10_example(capsys, monkeypatch):
    """Llama-2-7B (32 layers of 32 kv heads x 128, bf16) on a 24 GB A10: ~2 GB of KV per
    4k-token sequence and ~14 GB of weights leave room for about 5 sequences."""
    llama2 = dataclasses.replace(common.Config.preset("llama-3-8b"), n_kv_heads=32,
                                 dtype="bfloat16", max_seq_len=4096)
    per_seq = inf.kv_bytes_per_token(llama2) * 4096
    assert 2.0e9 < per_seq < 2.2e9
    assert inf.max_resident_batch(24e9, 14e9, per_seq) in (4, 5)
    assert inf.max_resident_batch(10e9, 14e9, per_seq) == 0       # the weights alone overflow
    monkeypatch.setattr(common, "memory_limit", lambda: (24e9, "an A10's memory"))
    inf.show_capacity(llama2, 14e9, 512, 208)
    out = capsys.readouterr().out
    assert "at most 37 (72 int8) at 512 tokens, 4 (9 int8) at 4,096 tokens fit" in out
    assert "from 512 tokens of context memory runs out first" in out


def test_layer_intensity_reproduces_the_lectures_counts():
    """Llama-2-7B (32 heads of 128, bf16) at N = 4096: the lecture's 62 FLOP/byte for attention,
    (4d + 3) N^2 / (8 N^2 + 8 N d) per head. Decode attention reads each sequence's own cache,
    so batching leaves its intensity alone, while the FFN's grows with the batch."""
    llama2 = dataclasses.replace(common.Config.preset("llama-3-8b"), n_kv_heads=32, d_ff=11008,
                                 dtype="bfloat16")
    assert inf.layer_intensity(llama2, "attention", 4096, 4096) == pytest.approx(
        (4 * 128 + 3) * 4096**2 / (8 * 4096**2 + 8 * 4096 * 128))
    assert round(inf.layer_intensity(llama2, "attention", 4096, 4096)) == 62
    one, many = (inf.layer_intensity(llama2, "attention", 1, 4096, b) for b in (1, 64))
    assert one == pytest.approx(many) and one < 5
    ffn1, ffn64 = (inf.layer_intensity(llama2, "ffn", 1, 4096, b) for b in (1, 64))
    assert ffn1 == pytest.approx(1.0, rel=0.01) and 50 < ffn64 < 64


def test_int8_paths_within_measured_tolerance(cfg=TINY):
    """Measured on the tiny model (3 seeds, both configs): int8 weights give a logit rms error of
    0.0065 x std(logits), at most 0.032 on one logit; the int8 KV cache 0.0020 and 0.0070; the
    greedy token agreed everywhere. The tolerances are ~3x those."""
    ip = inference_params_for(cfg)
    prompt = PROMPTS[3]
    toks = inf.generate(ip, cfg, [prompt], 20, cache_len=CACHE)[0]
    ref = inf.teacher_forced_logits(ip, cfg, prompt, toks[:-1], CACHE)
    for p, kv8, rms_tol, max_tol in ((inf.quantize_params(ip, cfg), False, 0.02, 0.1),
                                     (ip, True, 0.006, 0.02)):
        lg = inf.teacher_forced_logits(p, cfg, prompt, toks[:-1], CACHE, kv_int8=kv8)
        assert np.sqrt(np.mean((lg - ref) ** 2)) / np.std(ref) < rms_tol
        assert np.max(np.abs(lg - ref)) / np.std(ref) < max_tol
        assert np.mean(lg.argmax(-1) == ref.argmax(-1)) >= 0.9


EQS = {"wqkv": "btd,dhk->bthk", "wo": "bthk,hkd->btd", "w_gate_up": "btd,dgf->btgf",
       "w_down": "btf,fd->btd"}


@pytest.mark.parametrize("name", list(EQS))
def test_linear_through_the_int8_kernel_matches_xla(name):
    """Lesson 08's int8 matmul (interpreted here) in its [N, K] layout against XLA's widening of
    the same int8 weight: the same product up to float32 rounding."""
    qp = inf.quantize_params(inference_params_for(TINY), TINY)
    kp = inf.with_int8_kernel(qp)
    w, wk = qp["layers"][0][name], kp["layers"][0][name]
    x_shape = {"wo": (2, 1, TINY.n_heads, TINY.head_dim), "w_down": (2, 1, TINY.d_ff)}.get(
        name, (2, 1, TINY.d_model))
    x = jnp.asarray(np.random.default_rng(0).standard_normal(x_shape), jnp.float32)
    np.testing.assert_allclose(inf.linear(EQS[name], x, wk), inf.linear(EQS[name], x, w),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows,row_sum_max,int8", [(1, inf.ROW_SUM_MAX, False), (3, 0, False),
                                                    (1, inf.ROW_SUM_MAX, True), (1, 0, True),
                                                    (3, 0, True)])
@pytest.mark.parametrize("name", list(EQS))
def test_output_major_weight_gives_the_same_product(name, rows, row_sum_max, int8, monkeypatch):
    """linear with a matrix stored output-major ({"t": [output dims..., K]}, or int8 {"qt",
    "scale"}) against einsum with the same matrix input-major, as common's params hold it: one
    row as a multiply-and-sum, one int8 row padded to two (row_sum_max 0: as if the matrix were
    large), several rows as a matrix multiply."""
    monkeypatch.setattr(inf, "ROW_SUM_MAX", row_sum_max)
    w = input_major(name)
    t = inf.output_major(w, inf.CONTRACTED[name])
    if int8:
        q = inf.quantize_int8(t.reshape(-1, t.shape[-1]), (1,))
        wd = {"qt": q["q"], "scale": q["scale"].reshape(t.shape[:-1])}
        t = (q["q"] * q["scale"][:, None]).reshape(t.shape)
        w = t.reshape(-1, t.shape[-1]).T.reshape(w.shape)       # the dequantized matrix
    else:
        wd = {"t": t}
    x_shape = {"wo": (TINY.n_heads, TINY.head_dim), "w_down": (TINY.d_ff,)}.get(
        name, (TINY.d_model,))
    x = jnp.asarray(np.random.default_rng(1).standard_normal((rows, 1) + x_shape), jnp.float32)
    np.testing.assert_allclose(inf.linear(EQS[name], x, wd), jnp.einsum(EQS[name], x, w),
                               rtol=1e-5, atol=1e-5)


def test_pallas_kernels_in_the_decode_step_give_the_same_tokens():
    ip = inference_params_for(TINY)
    ref = inf.generate(ip, TINY, PROMPTS[:2], 3, cache_len=CACHE)
    assert inf.generate(ip, TINY, PROMPTS[:2], 3, cache_len=CACHE,
                        decode_attention=inf.pallas_decode_attention) == ref
    assert (inf.generate(ip, TINY, PROMPTS[:2], 3, cache_len=CACHE, kv_int8=True,
                         decode_attention=inf.pallas_decode_attention) ==
            inf.generate(ip, TINY, PROMPTS[:2], 3, cache_len=CACHE, kv_int8=True))
    qp = inf.quantize_params(ip, TINY)
    assert (inf.generate(inf.with_int8_kernel(qp), TINY, PROMPTS[:2], 3, cache_len=CACHE) ==
            inf.generate(qp, TINY, PROMPTS[:2], 3, cache_len=CACHE))


def test_serving_returns_what_each_request_gets_alone():
    params = params_for(TINY)
    reqs = [inf.Request(p, n) for p, n in zip(PROMPTS + PROMPTS[:3], [7, 2, 12, 1, 5, 0, 9])]
    alone = [inf.generate(params, TINY, [r.prompt], r.max_new_tokens, cache_len=CACHE)[0]
             for r in reqs]
    cont, _ = inf.serve_continuous(params, TINY, reqs, 3, CACHE, prompt_pad=32)
    static, _ = inf.serve_static(params, TINY, reqs, 3, CACHE, prompt_pad=32)
    assert [s.tokens for s in cont] == alone
    assert [s.tokens for s in static] == alone
    for served in (cont, static):
        for s in served:
            assert (len(s.tokens) > 1) == (s.tpot_s >= 0)   # nan for answers of 0 or 1 tokens
    # Static batching: a batch's first tokens come only after the previous batch is all done.
    last_of_first_batch = max(s.ttft_s + s.tpot_s * (len(s.tokens) - 1) for s in static[:3])
    assert all(s.ttft_s >= last_of_first_batch - 1e-9 for s in static[3:6] if s.tokens)


def compiles_on_the_clock(monkeypatch, caplog, fn, untimed_reads=0):
    """The programs jit compiles while fn runs, after its first `untimed_reads` + 1 readings of
    the clock (the timed part's start)."""
    events = []

    class Clock:
        @staticmethod
        def perf_counter():
            events.append(None)
            return 0.0
    monkeypatch.setattr(inf, "time", Clock)
    caplog.set_level("WARNING")
    monkeypatch.setattr(caplog.handler, "emit", lambda record: events.append(record.getMessage()))
    with jax.log_compiles():
        fn()
    start = [i for i, e in enumerate(events) if e is None][untimed_reads]
    return [e for e in events[start:] if e and e.startswith("Compiling")]


def test_timed_loops_compile_nothing_while_their_clock_runs(monkeypatch, caplog):
    """Weights committed to a device (as a checkpoint's are) make every cache a call returns
    committed, and jit compiles a committed argument apart from an uncommitted one: the warm-up
    must compile what the timed loop calls, serving's one-request admission mid-stream
    included. The sizes are this test's own, so that no other test compiled them first."""
    params = jax.device_put(params_for(TINY), jax.devices()[0])
    reqs = [inf.Request([5, 6], 2), inf.Request([7], 6), inf.Request([8, 9, 1], 3)]
    serve = lambda: inf.serve_continuous(params, TINY, reqs, 2, 56, prompt_pad=8)
    assert compiles_on_the_clock(monkeypatch, caplog, serve) == []
    ip = jax.device_put(inference_params_for(TINY), jax.devices()[0])
    for per_call in (1, 2):  # the clock read before the first call and after it, then timed
        decode = lambda: inf.time_decode(ip, TINY, inf.filled_cache(TINY, 3, 40, 5, False), 4,
                                         per_call=per_call)
        assert compiles_on_the_clock(monkeypatch, caplog, decode, untimed_reads=1) == []


def test_a_cache_holds_the_prompt_and_every_new_token_but_the_last():
    """The last new token is returned, never fed back, so L + N - 1 positions suffice. The
    serving loops pad prompts to the cache there, not to a power of two past it."""
    params, prompt = params_for(TINY), list(range(100, 141))    # 41 tokens, 8 more: 48
    want = greedy_full_recompute(params, TINY, prompt, 8)
    assert inf.generate(params, TINY, [prompt], 8, cache_len=48)[0] == want
    served, _ = inf.serve_continuous(params, TINY, [inf.Request(prompt, 8)], 1, 48)
    assert served[0].tokens == want


def test_serving_with_stop_tokens_returns_what_each_request_gets_alone(monkeypatch):
    params = params_for(TINY)
    reqs = [inf.Request(p, n) for p, n in zip(PROMPTS + PROMPTS[:3], [30, 2, 25, 1, 20, 0, 9])]
    # Greedy answers are prefixes of longer ones, and a ragged batch gives each prompt what it
    # gets alone (tests above): one batch of 30 tokens gives every request's answer.
    longest = inf.generate(params, TINY, PROMPTS, 30, cache_len=CACHE)
    full = [longest[i % len(PROMPTS)][:r.max_new_tokens] for i, r in enumerate(reqs)]
    stops = [full[0][17], full[2][0], full[1][1]]   # late in an answer; a first token; a last
    alone = [row[:next((j + 1 for j, t in enumerate(row) if t in stops), len(row))]
             for row in full]
    lengths = [len(a) for a in alone]
    assert 1 < lengths[0] < 30 and lengths[2] == 1, lengths
    # each call of the decode loop ends after its k steps, or at the first step where a busy row
    # (one whose last token is not a stop) makes a stop token
    calls, real_loop = [], inf.decode_loop

    def recording_loop(params, cache, tok, row_ids, counters, seed, k, stops_, busy, **kw):
        busy = np.asarray(busy) & ~np.isin(np.asarray(tok), stops)
        out = real_loop(params, cache, tok, row_ids, counters, seed, k, stops_, busy, **kw)
        calls.append((int(k), busy, np.asarray(out[0]), int(out[2])))
        return out
    monkeypatch.setattr(inf, "decode_loop", recording_loop)
    for serve in (inf.serve_continuous, inf.serve_static):
        served, _ = serve(params, TINY, reqs, 3, CACHE, prompt_pad=32, stop_tokens=stops)
        assert [s.tokens for s in served] == alone
    ended_early = 0
    for k, busy, steps, n in calls:
        hit = np.flatnonzero((np.isin(steps[:k], stops) & busy).any(axis=1))
        assert n == (hit[0] + 1 if hit.size else k), (k, n, hit)
        ended_early += n < k
    assert ended_early >= 2


def test_prefill_into_scattered_slots_drops_padding_rows():
    """Two prompts into rows [2, 0] of a 3-row cache whose row 1 holds another sequence, in a
    batch padded by a row aimed past the cache (slot 3): each prompt gets the first token,
    logits and cache row it gets alone, and row 1 keeps its keys, values and length."""
    ip = inference_params_for(TINY)
    a, b, other = PROMPTS[1], PROMPTS[0], PROMPTS[3]

    def prefill(cache, prompts, slots):
        return inf.prefill_step(ip, cache, inf.pad_prompts(prompts, 32),
                                np.array([len(p) for p in prompts], np.int32),
                                np.array(slots, np.int32), np.zeros(len(prompts), np.int32), 0,
                                cfg=TINY)

    _, _, cache = prefill(inf.init_cache(TINY, 3, CACHE), [other], [1])
    row_1 = jax.tree.map(lambda x: np.array(x)[1], cache)   # a copy: the cache is donated
    tok, logits, cache = prefill(cache, [a, b, [7, 7, 7]], [2, 0, 3])
    cache = jax.tree.map(np.asarray, cache)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(lambda x: x[1], cache), row_1)
    assert cache["lengths"].tolist() == [len(b), len(other), len(a)]
    for j, (p, row) in enumerate(((a, 2), (b, 0))):
        tok1, logits1, alone = prefill(inf.init_cache(TINY, 1, CACHE), [p], [0])
        assert int(tok[j]) == int(tok1[0])
        np.testing.assert_allclose(logits[j], logits1[0], rtol=1e-5, atol=1e-5)
        for name in ("k", "v"):
            for layer in range(TINY.n_layers):
                np.testing.assert_allclose(cache[name][layer][row, :, :len(p)],
                                           np.asarray(alone[name][layer])[0, :, :len(p)],
                                           rtol=1e-5, atol=1e-5)


def test_serving_with_sampling_draws_what_each_request_draws_alone():
    """At temperature 1 a request's draws depend only on (seed, its row id = its index in the
    stream, the token's index in its answer), not on its slot, its batch or the steps run
    between two fetches: both policies give what row i of one batch of all the prompts gives.
    With 2 slots, continuous batching puts request 2 in slot 1 and request 3 in slot 0, and both
    policies run several steps between two fetches. The batch has the shapes of
    test_sampling_with_a_seed_is_reproducible, so that it compiles once."""
    params = params_for(TINY)
    news = [4, 2, 5, 3]
    want = inf.generate(params, TINY, PROMPTS, max(news), temperature=1.0, seed=3,
                        cache_len=CACHE)
    reqs = [inf.Request(p, n) for p, n in zip(PROMPTS, news)]
    for serve in (inf.serve_continuous, inf.serve_static):
        served, _ = serve(params, TINY, reqs, 2, CACHE, prompt_pad=32,
                          sampling=inf.make_sampling(1.0), seed=3)
        assert [s.tokens for s in served] == [w[:n] for w, n in zip(want, news)]


def test_speculative_greedy_equals_target():
    params = params_for(TINY)
    want = inf.generate(params, TINY, PROMPTS, 13, cache_len=CACHE)
    self_draft, dcfg = inf.draft_params(params, TINY, 0)                # int8 copy: agrees often
    other = dataclasses.replace(TINY, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    fewer = dataclasses.replace(other, vocab_size=48)   # ids past 48 in the prompts and answers
    acceptance = []
    for draft, cfg_d in ((self_draft, dcfg), (params_for(other, seed=5), other),
                         (params_for(fewer, seed=5), fewer)):
        got, st = inf.speculative_generate(params, TINY, draft, cfg_d, PROMPTS, 13, gamma=3,
                                           cache_len=CACHE)
        assert got == want
        assert 0 <= st["acceptance"] <= st["alpha"] <= 1 and 1 <= st["tokens_per_round"] <= 4
        acceptance.append(st["acceptance"])
    assert acceptance[0] > 0.5
    stops = [want[0][4], want[2][0]]
    got, _ = inf.speculative_generate(params, TINY, self_draft, dcfg, PROMPTS, 13, gamma=3,
                                      cache_len=CACHE, stop_tokens=stops)
    assert got == inf.generate(params, TINY, PROMPTS, 13, cache_len=CACHE, stop_tokens=stops)
    # one token is the prefill's: no round runs, so none is reserved past a 126-token prompt
    got, _ = inf.speculative_generate(params, TINY, self_draft, dcfg, [[1] * 126], 1, gamma=4)
    assert got == inf.generate(params, TINY, [[1] * 126], 1)


def test_the_no_cache_row_says_slower_only_when_it_is(capsys):
    """The no-cache step against the cached one: 2 ms against 1 is 2.0x slower; 0.5 ms against 1
    (a tiny model on a CPU can do it) is 0.5x the time."""
    for t_no_cache, said in ((2e-3, "2.0x slower; "), (0.5e-3, "0.5x the time; ")):
        rows = []
        run = types.SimpleNamespace(no_cache_len=64, flops=1e12, bw=1e11, t_no_cache=t_no_cache,
                                    t_step=1e-3, P=64, S=128, t_prefill=1e-3,
                                    row=lambda *r: rows.append(r))
        inf.print_no_cache(run, W=1e6, N=5e5)
        (_, _, _, ratio), = rows
        assert ratio.startswith(said), ratio
    capsys.readouterr()


def test_lesson_sizes_a_later_models_cache_without_the_stream(monkeypatch):
    """The second model of --models runs neither the stream nor speculation: lesson() asks
    lesson_lengths for its sizes so, as check_before_the_run did."""
    seen = []

    def spy(cfg, ic, on_gpu, full=True):
        seen.append(full)
        raise StopIteration
    monkeypatch.setattr(inf, "lesson_lengths", spy)
    for full in (True, False):
        with pytest.raises(StopIteration):
            inf.lesson("tiny", TINY, None, None, inf.InferConfig(models="tiny"), False, {}, None,
                       full=full)
    assert seen == [True, False]


def test_speculative_alpha_counts_the_judged_draft_tokens():
    """alpha = accepted / judged, a round judging its drafts up to the first refusal. The target
    as its own draft (float32: it agrees every time) gives 1 however the rounds end; with one
    draft token a round, every proposed token is judged, so alpha is the acceptance rate."""
    params = params_for(TINY)
    _, st = inf.speculative_generate(params, TINY, params, TINY, PROMPTS, 13, gamma=3,
                                     cache_len=CACHE)
    assert st["alpha"] == st["acceptance"] == 1.0 and st["tokens_per_round"] == 4
    first_layer, dcfg = inf.draft_params(params, TINY, 1)       # int8, one of two layers
    whole = inf.quantize_params(inf.inference_params(params, TINY), TINY)
    assert dcfg.n_layers == 1   # the first of them, not the last
    jax.tree.map(np.testing.assert_array_equal, first_layer["layers"][0], whole["layers"][0])
    _, st = inf.speculative_generate(params, TINY, first_layer, dcfg, PROMPTS, 13, gamma=1,
                                     cache_len=CACHE)
    assert 0 < st["accepted"] < st["proposed"]
    assert st["alpha"] == st["acceptance"]
    # gamma 3: some rounds refuse early, leaving proposed tokens unjudged
    run = lambda prompts, stops=None: inf.speculative_generate(
        params, TINY, first_layer, dcfg, prompts, 13, gamma=3, cache_len=CACHE,
        stop_tokens=stops)
    got, st = run(PROMPTS)
    assert st["acceptance"] < st["alpha"] < 1
    # A row that has stopped judges nothing more: the batch's alpha pools each prompt's own.
    stops = [got[0][1]]
    batch, alone = run(PROMPTS[:2], stops)[1], [run([p], stops)[1] for p in PROMPTS[:2]]
    judged = sum(s["accepted"] / s["alpha"] for s in alone)
    assert batch["accepted"] == sum(s["accepted"] for s in alone)
    assert batch["alpha"] == pytest.approx(batch["accepted"] / judged, rel=1e-9)


def test_speculative_rounds_write_within_the_cache_they_reserve(monkeypatch):
    """The tightest fit: a row's last round writes gamma positions past generate's room, no
    more. One short, dynamic_update_slice would move that write back over the cached tokens,
    which seldom changes a greedy token: so every write's end is recorded. The target as its own
    draft accepts every token, so the rounds start at 1, 5 and 9 of the 10 wanted."""
    cfg = dataclasses.replace(TINY, max_seq_len=40)  # (its own compiled steps: the spy traced)
    p, ends = params_for(cfg), []
    write = inf.write_at_lengths

    def spy(buf, new, start):
        past = jnp.max(start) + new.shape[2] - buf.shape[2]
        jax.debug.callback(lambda n: ends.append(int(n)), past)
        return write(buf, new, start)
    monkeypatch.setattr(inf, "write_at_lengths", spy)
    tight = [[1] * (cfg.max_seq_len - (10 - 1) - 3)]
    got, st = inf.speculative_generate(p, cfg, p, cfg, tight, 10, gamma=3)
    assert st["rounds"] == 3 and max(ends) == 0  # the last round's write ends at the cache's end
    assert got == inf.generate(p, cfg, tight, 10)


def test_speculative_rounds_roll_the_draft_back_with_the_target(monkeypatch):
    """After each round both caches end at the accepted length: a draft left where its own
    steps ran would go on from tokens the target refused (still lossless, but it agrees less)."""
    params = params_for(TINY)
    draft, dcfg = inf.draft_params(params, TINY, 1)
    loop, ends = inf.speculative_loop, []

    def spy(*args, **kw):
        out = loop(*args, **kw)
        ends.append((out[5]["lengths"], out[6]["lengths"]))
        return out
    monkeypatch.setattr(inf, "speculative_loop", spy)
    _, st = inf.speculative_generate(params, TINY, draft, dcfg, PROMPTS, 13, gamma=3,
                                     cache_len=CACHE)
    assert 0 < st["accepted"] < st["proposed"]  # some drafts refused: the two would part there
    (target, draft_lengths), = ends
    np.testing.assert_array_equal(draft_lengths, target)


def test_speculative_sampling_draws_from_the_target():
    """At temperature > 0 each token must be distributed as the target alone would draw it
    (p), whatever the draft (q). 256 answers to one prompt, with a draft that agrees about half
    the time; at each position j, for f = p_j and f = q_j, the answers' sum of f(token) must
    match its expectation under p_j, given each answer's own prefix, within 4 standard
    deviations. Drawn from the draft instead, the sums would sit 9 to 55 away."""
    params, n, new = params_for(TINY), 256, 4
    draft, dcfg = inf.draft_params(params, TINY, 1)        # the first layer of two, int8
    sampling = dict(temperature=0.8, top_k=6)
    prompt = [3, 1, 4, 1, 5]
    got, st = inf.speculative_generate(params, TINY, draft, dcfg, [prompt] * n, new, gamma=3,
                                       cache_len=CACHE, seed=1, **sampling)
    assert 0.2 < st["acceptance"] < 0.9 and all(len(g) == new for g in got)
    toks = jnp.array([prompt + g for g in got])

    def next_token_probs(p, cfg):   # [n, new, V]: what each answer's token j was drawn from
        logits, _ = jax.jit(inf.forward_cached, static_argnums=3)(
            p, inf.init_cache(cfg, n, CACHE), toks, cfg)
        probs = jax.nn.softmax(inf.filter_logits(logits, inf.make_sampling(**sampling)), -1)
        return np.asarray(probs[:, len(prompt) - 1:-1], np.float64)
    p, q = next_token_probs(params, TINY), next_token_probs(draft, dcfg)
    for j in range(1, new):                            # token 0 is the prefill's
        pj, qj, x = p[:, j], q[:, j], np.array([g[j] for g in got])
        for f in (pj, qj):
            mean, mean_sq = (pj * f).sum(1), (pj * f**2).sum(1)    # E_p[f], E_p[f^2] per row
            sd = np.sqrt((mean_sq - mean**2).sum())
            z = (f[np.arange(n), x].sum() - mean.sum()) / sd
            z_draft = ((qj * f).sum() - mean.sum()) / sd
            assert abs(z) < 4 and abs(z_draft) > 6, (j, z, z_draft)


def test_stop_tokens_end_each_answer_and_then_the_loop(monkeypatch):
    params, n = params_for(TINY), 40
    full = inf.generate(params, TINY, PROMPTS, n, cache_len=CACHE)
    stops = [full[1][2], full[3][5]]
    got, logits = inf.generate(params, TINY, PROMPTS, n, cache_len=CACHE, stop_tokens=stops,
                               return_logits=True)
    for row, g, lg in zip(full, got, logits):
        end = next((j + 1 for j, t in enumerate(row) if t in stops), len(row))
        assert g == row[:end] and lg.shape == (end, TINY.vocab_size)
    # the steps end with the last answer to stop (an answer's first token is the prefill's)
    steps, real_loop = [], inf.decode_loop

    def recording_loop(*args, **kwargs):
        out = real_loop(*args, **kwargs)
        steps.append(int(out[2]))
        return out
    monkeypatch.setattr(inf, "decode_loop", recording_loop)
    stops = [row[j] for row, j in zip(full, (9, 2, 17, 5))]
    inf.generate(params, TINY, PROMPTS, n, cache_len=CACHE, stop_tokens=stops)
    ends = [next((j + 1 for j, t in enumerate(row) if t in stops), n) for row in full]
    assert steps == [max(ends) - 1] and max(ends) < n, (steps, ends)
    got = inf.generate(params, TINY, PROMPTS, n, cache_len=CACHE,
                       stop_tokens=[row[0] for row in full])
    assert got == [row[:1] for row in full] and steps[-1] == 0
    with pytest.raises(common.UserError, match="stop_tokens"):
        inf.generate(params, TINY, PROMPTS, n, cache_len=CACHE, stop_tokens=[TINY.vocab_size])


def test_decode_loop_and_decode_steps_give_one_steps_tokens_and_logits():
    """generate's one-call loop, and decode_steps' n steps per call, against decode_step called
    once per token."""
    ip, B = inference_params_for(TINY), len(PROMPTS)
    lengths = np.array([len(p) for p in PROMPTS], np.int32)
    ids = jnp.arange(B, dtype=jnp.int32)
    for kw in (dict(), dict(temperature=1.0, top_k=20, seed=3)):
        sampling, seed = inf.make_sampling(kw.get("temperature", 0.0), kw.get("top_k")), 3
        kw["seed"] = seed
        tok, lg, cache = inf.prefill_step(ip, inf.init_cache(TINY, B, CACHE),
                                          inf.pad_prompts(PROMPTS, 32), lengths, ids, ids, seed,
                                          cfg=TINY, sampling=sampling)
        one, one_lg, c1, c4 = [tok], [lg], jax.tree.map(jnp.copy, cache), cache
        for i in range(1, 13):
            tok, lg, c1 = inf.decode_step(ip, c1, tok, ids, jnp.full((B,), i, jnp.int32), seed,
                                          cfg=TINY, sampling=sampling)
            one.append(tok), one_lg.append(lg)
        one, one_lg = np.stack(one, 1), np.stack(one_lg, 1)        # [B, 13], [B, 13, V]
        many, many_lg = [one[:, 0]], [one_lg[:, 0]]
        for i in range(1, 13, 4):
            toks, lg, c4 = inf.decode_steps(ip, c4, jnp.asarray(many[-1]), ids,
                                            jnp.full((B,), i, jnp.int32), seed, cfg=TINY, n=4,
                                            sampling=sampling, with_logits=True)
            many += list(np.asarray(toks))
            many_lg += list(np.asarray(lg))
        np.testing.assert_array_equal(np.stack(many, 1), one)
        np.testing.assert_allclose(np.stack(many_lg, 1), one_lg, rtol=1e-5, atol=1e-5)
        got, got_lg = inf.generate(ip, TINY, PROMPTS, 13, cache_len=CACHE, return_logits=True,
                                   **kw)
        assert got == one.tolist()
        np.testing.assert_allclose(np.stack(got_lg), one_lg, rtol=1e-5, atol=1e-5)
        for n in (1, 2):   # the logits' buffer is exact in length, down to no decode step at all
            got, got_lg = inf.generate(ip, TINY, PROMPTS, n, cache_len=CACHE,
                                       return_logits=True, **kw)
            assert got == one[:, :n].tolist()
            np.testing.assert_allclose(np.stack(got_lg), one_lg[:, :n], rtol=1e-5, atol=1e-5)


def test_eos_ids_come_from_the_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    assert common.eos_token_ids(str(tmp_path)) == (2,)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert common.eos_token_ids(str(tmp_path)) == (7, 9)
    assert common.eos_token_ids(str(tmp_path / "missing")) == ()


def test_sampling_with_a_seed_is_reproducible():
    run = functools.partial(inf.generate, params_for(TINY), TINY, PROMPTS, 12,
                            temperature=1.0, cache_len=CACHE)
    a = run(seed=3)
    assert a == run(seed=3)
    assert a != run(seed=4)


def test_the_api_takes_numpy_counts_a_single_stop_token_and_tiny_temperatures():
    """What a caller passes as a matter of course: numpy integers for counts, one stop id
    rather than a list, and a temperature so small that dividing by it in float32 overflows,
    which samples the argmax."""
    p, prompts = params_for(TINY), PROMPTS[:2]
    # logits of +-30 at a temperature of 2e-38 (a normal float32): divided as they are, +-inf;
    # brought to a maximum of 0 first, the best stays 0 and the draw is the argmax
    logits = np.random.default_rng(0).uniform(-30, 30, (64, 256)).astype(np.float32)
    rows = np.arange(64, dtype=np.int32)
    got = inf.sample(logits, 0, rows, rows * 0, inf.make_sampling(2e-38))
    np.testing.assert_array_equal(got, logits.argmax(-1))
    greedy = inf.generate(p, TINY, prompts, 6, cache_len=CACHE)
    assert inf.generate(p, TINY, prompts, np.int64(6), cache_len=CACHE) == greedy
    for t in (1e-39, 1e-46):
        assert inf.generate(p, TINY, prompts, 6, temperature=t, cache_len=CACHE) == greedy
    stop = greedy[0][2]
    assert inf.generate(p, TINY, prompts, 6, cache_len=CACHE, stop_tokens=stop) == \
        inf.generate(p, TINY, prompts, 6, cache_len=CACHE, stop_tokens=[stop]) == \
        inf.generate(p, TINY, prompts, 6, cache_len=CACHE, stop_tokens={stop})
    assert inf.speculative_generate(p, TINY, p, TINY, prompts, np.int64(6), gamma=np.int64(2),
                                    cache_len=CACHE)[0] == greedy
    # no round runs for no tokens: a prompt that fills the model gets its empty answer
    got, st = inf.speculative_generate(p, TINY, p, TINY, [[1] * TINY.max_seq_len], 0)
    assert got == [[]] and st["decode_s"] == 0.0 and math.isnan(st["alpha"])
    # nor for one, which the prefill makes: a prompt one short of the model gets it, as generate's
    full = [[1] * (TINY.max_seq_len - 1)]
    assert inf.speculative_generate(p, TINY, p, TINY, full, 1, gamma=2)[0] == \
        inf.generate(p, TINY, full, 1)
    assert inf.speculative_generate(p, TINY, p, TINY, [[5]], 1)[0] == \
        inf.generate(p, TINY, [[5]], 1)  # (a cache of one position: a round would not fit)
    toks, logits = inf.generate(p, TINY, prompts, 0, return_logits=True)
    assert toks == [[], []] and [x.shape for x in logits] == [(0, TINY.vocab_size)] * 2
    one = inf.generate(p, TINY, prompts, 1, return_logits=True)[1]
    assert [x.dtype for x in logits] == [np.asarray(x).dtype for x in one]
    # teacher forcing sizes its cache as generate does; int8 params quantize once
    np.testing.assert_allclose(inf.teacher_forced_logits(p, TINY, [1, 2], [3, 4]),  # other S:
                               inf.teacher_forced_logits(p, TINY, [1, 2], [3, 4], CACHE),
                               rtol=1e-5, atol=1e-6)                   # summed in another order
    q = inf.quantize_params(p, TINY)
    assert inf.quantize_params(q, TINY) is q


def test_sampling_restrictions():
    logits = np.random.default_rng(0).standard_normal((64, 256)).astype(np.float32) * 3
    rows, zeros = np.arange(64, dtype=np.int32), np.zeros(64, np.int32)
    draw = jax.jit(inf.sample, static_argnums=4)
    got = np.asarray(draw(logits, 1, rows, zeros, inf.Sampling(1.0, 1, 1.0)))
    np.testing.assert_array_equal(got, logits.argmax(-1))            # top_k=1 is greedy
    # one row's successive tokens (its counter) draw fresh numbers: flat logits over 256 tokens
    # give about 57 different ones in 64 draws; a key that ignored the counter, one
    flat = np.zeros((64, 256), np.float32)
    got = np.asarray(draw(flat, 0, zeros, rows, inf.Sampling(1.0, 0, 1.0)))
    assert len(set(got.tolist())) > 32
    got = np.asarray(draw(logits, 1, rows, zeros, inf.Sampling(5.0, 3, 1.0)))
    top3 = np.argsort(logits, axis=-1)[:, -3:]
    assert all(t in row for t, row in zip(got, top3))                # only the 3 most likely
    assert np.mean(got != logits.argmax(-1)) > 0.2                    # and not just the best
    # top_p: where the best token holds 60% and the next 30%, top_p=0.8 keeps exactly those two
    p = np.log(np.array([[0.6, 0.3, 0.05, 0.05]] * 64, np.float32))
    got = np.asarray(draw(p, 2, rows, zeros, inf.Sampling(1.0, 0, 0.8)))
    assert set(got.tolist()) == {0, 1}
    # a row's draw depends on (seed, row id, counter), not on its place in the batch
    perm = np.random.default_rng(1).permutation(64)
    again = np.asarray(draw(p, 2, rows[perm], zeros, inf.Sampling(1.0, 0, 0.8)))
    np.testing.assert_array_equal(again, got[perm])


@pytest.mark.parametrize("call, match", [
    (lambda p: inf.generate(p, TINY, [list(range(60))], 10, cache_len=CACHE), "cache"),
    (lambda p: inf.generate(p, TINY, [list(range(100))], 40), "max_seq_len"),
    (lambda p: inf.generate(p, TINY, [[1, 2]], -1), "max_new_tokens"),
    (lambda p: inf.generate(p, TINY, [], 4), "non-empty"),
    (lambda p: inf.generate(p, TINY, [[1], []], 4), "prompt 1"),
    (lambda p: inf.generate(p, TINY, [[1, 256]], 4), "outside"),
    (lambda p: inf.generate(p, TINY, [[1]], 4, temperature=-1.0), "temperature"),
    (lambda p: inf.generate(p, TINY, [[1]], 4, top_p=0.0), "top_p"),
    (lambda p: inf.generate(p, TINY, [[1]], 4, temperature=1.0, seed=2**31), "seed"),
    (lambda p: inf.generate(p, TINY, [[1] * 41], 8, cache_len=47), "needs 48 cache positions"),
    (lambda p: inf.serve_continuous(p, TINY, [inf.Request([1] * 60, 10)], 2, CACHE), "cache"),
    (lambda p: inf.prefill_step(inf.inference_params(p, TINY), inf.init_cache(TINY, 1, 4),
                                np.ones((1, 6), np.int32), np.array([6]), np.zeros(1, np.int32),
                                np.zeros(1, np.int32), 0, TINY),
     "^prompts padded to 6 tokens do not fit a cache of 4 positions"),
    (lambda p: inf.speculative_generate(p, TINY, p, TINY, [[1] * 53], 10, gamma=3,
                                        cache_len=CACHE), "needs 65 cache positions"),
    (lambda p: inf.speculative_generate(p, TINY, p, TINY, [[1] * 100], 26, gamma=4),
     "^a prompt of 100 tokens with max_new_tokens=26 .the last not cached. plus 4 for a "
     "speculative round's draft tokens needs 129 cache positions, past the model's "
     "max_seq_len=128$"),
    (lambda p: inf.draft_params(p, TINY, 3), "draft_layers"),
    (lambda p: inf.teacher_forced_logits(p, TINY, [1] * 120, [1] * 9),
     "^a prompt of 120 tokens with a continuation of 9 tokens, each fed back, needs 129 "
     "cache positions, past"),
    (lambda p: inf.teacher_forced_logits(p, TINY, [1] * 120, [1] * 9, cache_len=128),
     "^prompt 0 has 120 tokens: with a continuation of 9 tokens, each fed back, it needs 129 "
     "cache positions, the cache holds 128$"),
    (lambda p: inf.speculative_generate(p, TINY, p, None, [[1]], 4), "draft_cfg must be"),
    (lambda p: inf.serve_continuous(p, TINY, [inf.Request([1], 4)], 2, CACHE, prompt_pad=16.0),
     "prompt_pad must be an integer"),
    # the draft runs at the target's positions, and would past its own window without a word
    (lambda p: inf.speculative_generate(p, TINY, p, dataclasses.replace(TINY, max_seq_len=16),
                                        [[1] * 12], 4, gamma=2),
     "need 17 cache positions, past the draft's max_seq_len=16"),
    (lambda p: inf.generate(p, TINY, [[1]], 4.0), "max_new_tokens must be an integer"),
    (lambda p: inf.generate(p, TINY, [[1]], 4, temperature=float("nan")), "finite number"),
    (lambda p: inf.generate(p, TINY, [[1]], 4, top_k=2.5), "top_k must be an integer"),
    (lambda p: inf.generate(p, TINY, [[1]], 4, stop_tokens=[1.5]), "stop_tokens must be"),
    (lambda p: inf.serve_static(p, TINY, [inf.Request([1], 4)], 2, CACHE,
                                sampling=inf.Sampling(0.8, 0, 0.0)), "top_p"),
    (lambda p: inf.serve_static(p, TINY, [inf.Request([1], 4)], 2, CACHE,
                                sampling=(1.0, 0, 1.0)), "sampling must be a Sampling"),
    (lambda p: inf.serve_continuous(p, TINY, [([1], 4)], 2, CACHE), "request 0 must be"),
    (lambda p: inf.serve_static(p, TINY, [inf.Request([1], 4), inf.Request([1, 999], 4)], 2,
                                CACHE), "request 1: its prompt has token ids outside"),
    (lambda p: inf.serve_continuous(p, TINY, [inf.Request([1], 4)], 2, None), "cache_len"),
    (lambda p: inf.teacher_forced_logits(p, TINY, [1, 2], [3] * 8, 8), "needs 10 cache"),
    (lambda p: inf.teacher_forced_logits(p, TINY, [], [3], 8), "non-empty"),
    (lambda p: inf.teacher_forced_logits(p, TINY, [1], [256], 8), "continuation must be"),
])
def test_bad_inputs_raise_user_error(call, match):
    with pytest.raises(common.UserError, match=match):
        call(params_for(TINY))


def test_bad_config_and_checkpoint_dirs(tmp_path):
    with pytest.raises(common.UserError, match="top_p"):
        inf.InferConfig(top_p=1.5)
    with pytest.raises(common.UserError, match="does not exist"):
        inf.load_model(inf.InferConfig(checkpoint=str(tmp_path / "nope")), False)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(common.UserError, match="model_type"):
        inf.load_model(inf.InferConfig(checkpoint=str(tmp_path)), False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UserError, match="holds no checkpoint: neither a Hugging Face"):
        inf.load_model(inf.InferConfig(checkpoint=str(tmp_path / "empty")), False)
    with pytest.raises(common.UserError, match="draft_layers is the lesson's own draft"):
        inf.InferConfig(sample_only=True, draft_layers=1)
    for models in ("", ",", "small,huge"):
        with pytest.raises(common.UserError, match="expected auto or presets"):
            inf.InferConfig(models=models)
    # checked before the lesson's long run: the sample's length, the draft's layers, the cache
    models = inf.load_model(inf.InferConfig(models="tiny"), False)[0]
    for ic, match in ((inf.InferConfig(models="tiny", max_new_tokens=200), "max_seq_len=128"),
                      (inf.InferConfig(models="tiny", draft_layers=3), "draft_layers=3"),
                      (inf.InferConfig(models="tiny", prompt_len=100),
                       r"^prompt_len \+ gen_len - 1 \+ gamma = 100 \+ 32 - 1 \+ 4 = 135 "
                       r"exceeds the model's max_seq_len=128"),
                      (inf.InferConfig(models="tiny", cache_len=64),
                       r"^cache_len=64 must hold prompt_len \+ gen_len - 1 \+ gamma, prompt_len "
                       r"/ 2 \+ 2 x gen_len - 1 and prompt_len \+ max\(12, steps\) \+ 3 x "
                       r"max\(steps, 8\), 100,"),
                      # the request stream's long answers, up to 2 x gen_len, fit the cache
                      (inf.InferConfig(models="tiny", prompt_len=16, gen_len=100),
                       r"^the request stream's longest request, prompt_len / 2 \+ 2 x gen_len - "
                       r"1 = 207, exceeds the model's max_seq_len=128"),
                      # the timed steps wrote past the cache's end without a word: 4 x 16 fit
                      # the 128 - 64 positions left (the draft's first call is `steps` long)
                      (inf.InferConfig(models="tiny", steps=100), "use --steps=16 or fewer$"),
                      (inf.InferConfig(models="tiny", steps=17, cache_len=128),
                       "use --steps=16 or fewer$"),
                      (inf.InferConfig(models="tiny", prompt_len=116, gen_len=2, gamma=1),
                       "prompt_len=116 leaves no room"),
                      # fewer steps than a call of PER_CALL still write PER_CALL a run: 100 +
                      # 12 + 3 x 8 is past 128 (counted as 3 x 1, it was let through)
                      (inf.InferConfig(models="tiny", prompt_len=100, gen_len=2, gamma=1,
                                       steps=1), "prompt_len=100 leaves no room")):
        with pytest.raises(common.UserError, match=match):
            inf.check_before_the_run(models, ic, False, None)
    inf.lesson_lengths(models[0][1], inf.InferConfig(steps=16), False)
    # a prompt too long alone is said as one, not as the request stream's answers too long
    with pytest.raises(common.UserError, match=r"^prompt_len \+ gen_len - 1 \+ gamma = 200 "):
        inf.check_before_the_run(models, inf.InferConfig(models="tiny", prompt_len=200), False,
                                 None)
    # a longer timing grows the cache the lesson picks: 64 + 40 + 3 x 40 = 224 of 256
    roomy = dataclasses.replace(TINY, max_seq_len=512)
    # only the first model serves the stream (4 + 2 x 121 - 1 = 245) and speculates (+ 1): the
    # second needs 8 + 121 - 1 = 128 positions and the timed steps, 8 + 12 + 3 x 8 = 44
    ic = inf.InferConfig(models="tiny", prompt_len=8, gen_len=121, gamma=1)
    inf.check_before_the_run([("roomy", roomy, None, None), ("tiny", TINY, None, None)], ic,
                             False, None)
    assert inf.lesson_lengths(TINY, ic, False, full=False)[2] == 128
    with pytest.raises(common.UserError, match=r"^models=tiny: prompt_len \+ gen_len - 1 \+ "
                                               r"gamma = 8 \+ 121 - 1 \+ 1 = 129 exceeds"):
        inf.check_before_the_run([("tiny", TINY, None, None), ("roomy", roomy, None, None)], ic,
                                 False, None)
    assert inf.lesson_lengths(roomy, inf.InferConfig(), False)[2] == 128
    assert inf.lesson_lengths(roomy, inf.InferConfig(steps=40), False)[2] == 256
    # the request stream's longest, 4 + 2 x 100 - 1 = 203, sizes the cache, and only the first
    # model's: the others need 8 + 100 - 1 = 107 and the timed steps, 8 + 12 + 3 x 8 = 44
    stream = inf.InferConfig(prompt_len=8, gen_len=100)
    assert inf.lesson_lengths(roomy, stream, False)[2] == 256
    assert inf.lesson_lengths(roomy, stream, False, full=False)[2] == 128


def test_damaged_train_checkpoints_are_named_or_passed_over(tmp_path, capsys):
    for step, seed in ((1, 1), (2, 2)):
        common.save_checkpoint(str(tmp_path), step, {"params": numpy_params(TIED, seed)},
                               {"model": dataclasses.asdict(TIED)})
    old, new = common.list_checkpoints(str(tmp_path))
    open(os.path.join(new, common.STATE_FILE), "wb").write(b"\x10\0\0\0\0\0\0\0{cut")
    with pytest.raises(common.UserError, match="ckpt_00000002 is damaged: state.safetensors"):
        inf.load_model(inf.InferConfig(checkpoint=new), False)
    (name, cfg, params, _), = inf.load_model(inf.InferConfig(checkpoint=str(tmp_path)), False)[0]
    assert name == "ckpt_00000001" and "passing over it" in capsys.readouterr().err
    jax.tree.map(np.testing.assert_array_equal, params, numpy_params(TIED, 1))
    os.remove(os.path.join(old, "meta.json"))
    with pytest.raises(common.UserError, match="ckpt_00000001 is damaged: meta.json"):
        inf.load_model(inf.InferConfig(checkpoint=old), False)
    with pytest.raises(common.UserError, match="every checkpoint in .* is damaged"):
        inf.load_model(inf.InferConfig(ckpt_dir=str(tmp_path)), False)


def test_command_line_errors_are_one_line(tmp_path):
    common.save_checkpoint(str(tmp_path), 1, {"params": numpy_params(TIED, 1)},
                           {"model": dataclasses.asdict(TIED)})
    for flags, message in ((["--checkpoint=/no/such/dir"], "does not exist"),
                           ([f"--ckpt_dir={tmp_path}", "--prompt="], "no tokens")):
        out = subprocess.run([sys.executable, "06_kv_cache_inference.py", *flags], cwd=ROOT,
                             capture_output=True, text=True,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 2
        assert out.stderr.strip().count("\n") == 0 and message in out.stderr


def test_sample_only_prints_the_prompt_and_its_continuation(tmp_path, capsys, monkeypatch):
    common.save_checkpoint(str(tmp_path), 1, {"params": numpy_params(TIED, 1)},
                           {"model": dataclasses.asdict(TIED)})
    ic = inf.InferConfig(ckpt_dir=str(tmp_path), sample_only=True, prompt="ab", max_new_tokens=5)
    models = inf.load_model(ic, True)[0]  # a GPU's lesson would measure random Llama shapes
    assert [m[0] for m in models] == ["ckpt_00000001"]
    hinted = []   # each answer is looked at for the whitespace hint
    monkeypatch.setattr(inf, "blank_answer_hint", lambda text, ic: hinted.append(text))
    inf.sample_only(models, ic)
    monkeypatch.undo()
    (_, cfg, params, tok), = models
    want = inf.generate(inf.inference_params(params, cfg), cfg, [tok.encode("ab")], 5,
                        stop_tokens=tok.stop)[0]
    assert capsys.readouterr().out.startswith("ab" + tok.decode(want) + "\n")
    assert hinted == [tok.decode(want)]
    # drafted by a model (here the same one, in float32): greedy gives the same tokens
    inf.sample_only(models, ic, inf.load_draft(str(tmp_path), cfg))
    out = capsys.readouterr().out
    assert "\nab" + tok.decode(want) + "\n" in out and "100% of the draft's" in out
    inf.sample_only(models, dataclasses.replace(ic, max_new_tokens=1),
                    inf.load_draft(str(tmp_path), cfg))  # one token: the prefill's, no round
    assert "no speculative round ran" in capsys.readouterr().out
    # a one-token sample runs no round: a prompt of 127 bytes fits TIED's 128 positions, and
    # two tokens with a draft need 127 + 1 + gamma
    draft = inf.load_draft(str(tmp_path), cfg)
    long_prompt = dataclasses.replace(ic, prompt="a" * 127, max_new_tokens=1)
    inf.check_before_the_run(models, long_prompt, True, draft)
    with pytest.raises(common.UserError, match="plus 4 for a speculative round"):
        inf.check_before_the_run(models, dataclasses.replace(long_prompt, max_new_tokens=2),
                                 True, draft)
    random = dataclasses.replace(ic, models="tiny", ckpt_dir="")  # no checkpoint: random weights
    with pytest.raises(common.UserError, match="random weights"):
        inf.sample_only(inf.load_model(random, False)[0], random)


def test_the_default_run_is_out_or_the_run_below_it_saved_last(tmp_path):
    """09's default --out_dir is out; its docstring trains into out/tiny: 06 finds either, the
    one whose newest checkpoint was written last, and out itself when none holds one."""
    root = tmp_path / "out"
    assert inf.default_run_dir(str(root)) == str(root)            # no out/ at all
    for run, when in (("a", 100), ("b", 300), (".", 200)):
        common.save_checkpoint(str(root / run), 1, {"params": numpy_params(TIED, 1)},
                               {"model": dataclasses.asdict(TIED)})
        os.utime(root / run / "ckpt_00000001", (when, when))
    (root / "notes.txt").write_text("not a run")
    assert inf.default_run_dir(str(root)) == str(root / "b")
    os.utime(root / "ckpt_00000001", (400, 400))
    assert inf.default_run_dir(str(root)) == str(root)


def test_a_prompt_typed_in_a_shell_reads_its_escapes(tmp_path, capsys, monkeypatch):
    assert common.unescape(r"def f():\n\treturn 1") == "def f():\n\treturn 1"
    assert common.unescape(r"a\\nb \x") == r"a\nb \x"  # an escaped backslash; others stay
    common.save_checkpoint(str(tmp_path), 1, {"params": numpy_params(TIED, 1)},
                           {"model": dataclasses.asdict(TIED)})
    monkeypatch.setattr("sys.argv", ["06", f"--ckpt_dir={tmp_path}", "--sample_only=true",
                                     r"--prompt=a\nb", "--max_new_tokens=2"])
    inf.main()
    lines = capsys.readouterr().out.splitlines()   # the flags, the model, then the sample
    assert lines[2] == "a" and lines[3].startswith("b")


def test_a_whitespace_greedy_answer_says_how_to_sample(capsys):
    greedy, sampled = inf.InferConfig(), inf.InferConfig(temperature=0.8)
    inf.blank_answer_hint(" \n   ", greedy)
    assert "5 characters of whitespace" in capsys.readouterr().out
    for text, ic in (("  x ", greedy), ("", greedy), ("   ", sampled)):
        inf.blank_answer_hint(text, ic)
        assert capsys.readouterr().out == ""


def test_train_checkpoint_newest_is_found_and_loaded(tmp_path):
    """Checkpoints as 09_train.py writes them, through common.save_checkpoint."""
    old, new = numpy_params(TIED, 1), numpy_params(TIED, 2)
    meta = {"model": dataclasses.asdict(TIED)}
    for step, p in ((9, old), (12, new)):
        common.save_checkpoint(str(tmp_path), step, {"params": p, "opt": {"count": 3}}, meta)
    path = inf.newest_train_checkpoint(str(tmp_path))[0]
    assert path.endswith("ckpt_00000012")
    for ic in (inf.InferConfig(ckpt_dir=str(tmp_path)), inf.InferConfig(checkpoint=str(tmp_path)),
               inf.InferConfig(checkpoint=path), inf.InferConfig(ckpt_dir=path)):
        (name, cfg, params, tok), = inf.load_model(ic, False)[0]
        assert cfg == TIED and name == "ckpt_00000012" and tok is common.BYTES
        jax.tree.map(np.testing.assert_array_equal, params, new)
    assert inf.newest_train_checkpoint(str(tmp_path / "empty")) is None
    # on a GPU the lesson measures the Llama shapes, unless a --ckpt_dir is named
    assert inf.load_model(inf.InferConfig(ckpt_dir=str(tmp_path)), True)[0][0][0] == \
        "ckpt_00000012"
    assert [m[0] for m in inf.load_model(inf.InferConfig(), True)[0]] == ["llama-3-8b",
                                                                          "llama-3.2-1b"]
    # a --ckpt_dir the user names but that holds nothing is said, not run on random weights
    (tmp_path / "empty").mkdir()
    for where, match in ((tmp_path / "typo", "does not exist"),
                         (tmp_path / "empty", "holds no 09_train.py checkpoint")):
        with pytest.raises(common.UserError, match=match):
            inf.load_model(inf.InferConfig(ckpt_dir=str(where)), False)
    with pytest.raises(common.UserError, match="not both"):
        inf.InferConfig(checkpoint=path, models="tiny")
    for other in (dict(models="tiny"), dict(checkpoint=path)):  # else --ckpt_dir goes unread
        with pytest.raises(common.UserError, match="--ckpt_dir .* give it alone"):
            inf.InferConfig(ckpt_dir=str(tmp_path / "typo"), **other)
    # 09 on a GPU: float32 master weights, bf16 compute; inference reads them in bf16
    mixed = dataclasses.replace(TIED, dtype="bfloat16")
    common.save_checkpoint(str(tmp_path / "gpu"), 3, {"params": new},
                           {"model": dataclasses.asdict(mixed)})
    cfg, params = inf.load_train_checkpoint(str(tmp_path / "gpu" / "ckpt_00000003"))
    assert cfg == dataclasses.replace(mixed, param_dtype="bfloat16")
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}
    with open(os.path.join(path, "meta.json"), "w") as f:
        json.dump({"model": {"d_model": 8, "n_experts": 4}}, f)
    with pytest.raises(common.UserError, match="no model config"):
        inf.load_train_checkpoint(path)
    for rope, match in ((5, "not iterable"), ([8, 1, 4, 0], "rope_scaling needs")):
        with open(os.path.join(path, "meta.json"), "w") as f:  # a model config edited by hand
            json.dump(dict(meta, model=dict(meta["model"], rope_scaling=rope)), f)
        with pytest.raises(common.DamagedCheckpoint, match=f"model config is not valid .*{match}"):
            inf.load_train_checkpoint(path)


def test_draft_checkpoint_loads_and_must_share_the_vocabulary(tmp_path):
    """--draft: a smaller model from a checkpoint directory, checked against the target."""
    small = dataclasses.replace(TINY, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    other_vocab = dataclasses.replace(small, vocab_size=512)
    for name, cfg in (("draft", small), ("wrong", other_vocab)):
        common.save_checkpoint(str(tmp_path / name), 1, {"params": numpy_params(cfg, 5)},
                               {"model": dataclasses.asdict(cfg)})
    name, dcfg, dp = inf.load_draft(str(tmp_path / "draft"), TINY)
    assert dcfg == small and name == "ckpt_00000001"
    jax.tree.map(np.testing.assert_array_equal, dp,
                 inf.inference_params(jax.tree.map(jnp.asarray, numpy_params(small, 5)), small))
    with pytest.raises(common.UserError, match="vocabulary of 512 tokens"):
        inf.load_draft(str(tmp_path / "wrong"), TINY)
    with pytest.raises(common.UserError, match="not both"):
        inf.InferConfig(draft=str(tmp_path / "draft"), draft_layers=1)
    short = (name, dataclasses.replace(small, max_seq_len=64), dp)  # the lesson's cache is 128
    with pytest.raises(common.UserError, match="128 positions is past the draft's max_seq_len"):
        inf.check_before_the_run([("tiny", TINY, None, None)], inf.InferConfig(models="tiny"),
                                 False, short)


def test_draft_must_read_text_with_the_targets_tokenizer(tmp_path):
    """A draft's tokenizer.json must hold the target's vocabulary; its special tokens' names may
    differ, as between two releases of one tokenizer. The byte-level draft of 09 is refused for
    a target with a tokenizer of words."""
    small = dataclasses.replace(TINY, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    words = {"model": {"type": "BPE", "vocab": {f"w{i}": i for i in range(256)}, "merges": []},
             "added_tokens": [{"id": 255, "content": "<|reserved_0|>"}]}
    renamed = dict(words, added_tokens=[{"id": 255, "content": "<|eom_id|>"}])
    other = {**words, "model": {**words["model"], "vocab": {f"v{i}": i for i in range(256)}}}
    target = common.Tokenizer(None, None, spec=words)
    params = jax.tree.map(jnp.asarray, numpy_params(small, 5))
    for name, spec in (("same", renamed), ("other", other)):
        common.save_hf_llama(str(tmp_path / name), small, params, files={"tokenizer.json": spec})
    common.save_checkpoint(str(tmp_path / "bytes"), 1, {"params": numpy_params(small, 5)},
                           {"model": dataclasses.asdict(small)})
    for i, model in enumerate((None, "BPE")):  # a tokenizer.json with no vocabulary: not used
        common.save_hf_llama(str(tmp_path / f"broken{i}"), small, params,
                             files={"tokenizer.json": {"model": model}})
        assert inf.load_draft(str(tmp_path / f"broken{i}"), TINY, target)[1] == small
    assert inf.load_draft(str(tmp_path / "same"), TINY, target)[1] == small
    for name, reads in (("other", "text with another tokenizer"), ("bytes", "bytes, unlike")):
        with pytest.raises(common.UserError, match=f"reads {reads}"):
            inf.load_draft(str(tmp_path / name), TINY, target)
    # a target of random weights has no tokenizer to hold a draft to
    assert inf.load_draft(str(tmp_path / "bytes"), TINY, None)[1] == small
    assert inf.load_draft(str(tmp_path / "bytes"), TINY, common.BYTES)[1] == small


def test_tokenizer_loads_or_says_how_to_install(tmp_path, monkeypatch):
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"[UNK]": 0, "hello": 1, "world": 2}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 2}))
    loaded = common.load_tokenizer(str(tmp_path))
    assert loaded.encode("hello world") == [1, 2]
    assert loaded.decode([1, 2]) == "hello world"
    assert loaded.stop == (2,)                        # the sample's answer ends there
    monkeypatch.setitem(sys.modules, "tokenizers", None)   # as if not installed
    with pytest.raises(common.UserError, match="pip install tokenizers"):
        common.load_tokenizer(str(tmp_path))


def test_weight_kernels_finds_the_products_in_a_compiled_step():
    """The step-kernel table counts as weight products the fusions weight_kernels names: each
    one's root was traced inside linear, and a decode step has some."""
    ip = inference_params_for(TINY)
    cache, z = inf.filled_cache(TINY, 1, CACHE, 8, False), jnp.zeros((1,), jnp.int32)
    text = inf._decode_jit.lower(ip, cache, z, z, z, 0, cfg=TINY, sampling=inf.GREEDY,
                                 decode_attention=None).compile().as_text()
    names = inf.weight_kernels(text)
    assert names
    lines = {ln.split(" = ")[0].strip().removeprefix("ROOT ").lstrip("%").replace(".", "_"): ln
             for ln in text.splitlines() if " = " in ln}
    for n in names:
        assert "/linear/" in lines[n] and " fusion(" in lines[n]


def test_decode_loops_read_the_int8_weights_as_int8():
    """A loop of steps must widen each int8 weight inside its product: widened once before the
    loop (XLA's loop-invariant code motion), every step would read 4-byte copies. Nothing in
    the compiled call, outside the loop body, makes a float array of an int8 weight's shape.
    (The tiny model's matrices are small enough to take the row-sum path of `linear`.)"""
    qp = inf.quantize_params(inference_params_for(TINY), TINY)
    cache, z = inf.init_cache(TINY, 1, CACHE), jnp.zeros((1,), jnp.int32)
    text = inf._decode_steps_jit.lower(qp, cache, z, z, z, 0, cfg=TINY, sampling=inf.GREEDY,
                                       decode_attention=None, n=4,
                                       with_logits=False).compile().as_text()
    entry = text[text.index("\nENTRY"):]
    entry = entry[:entry.index("\n}")]
    shapes = {f"[{','.join(map(str, w.shape))}]" for w in jax.tree.leaves(qp)
              if w.dtype == jnp.int8}
    assert shapes and " while(" in entry
    widened = [ln for ln in entry.splitlines() for s in shapes
               if (f"= f32{s}" in ln or f"= bf16{s}" in ln) and " parameter(" not in ln]
    assert not widened, widened[0]


def test_default_decode_attention_takes_the_kernel_only_where_it_applies(monkeypatch):
    """The reference on a CPU; on a GPU 08's kernel for bf16 models with a power-of-two head
    size, the reference for any other."""
    bf16 = dataclasses.replace(TINY, dtype="bfloat16")
    assert inf.default_decode_attention(bf16) is inf.decode_attention_reference  # a CPU
    monkeypatch.setattr(inf, "_interpret", lambda: False)                        # as on a GPU
    assert inf.default_decode_attention(bf16) is inf.pallas_decode_attention
    assert inf.default_decode_attention(TINY) is inf.decode_attention_reference  # float32
    odd = dataclasses.replace(bf16, head_dim=24)
    assert inf.default_decode_attention(odd) is inf.decode_attention_reference


def test_params_of_another_config_or_no_draft_are_one_line_errors():
    cfg = common.Config.preset("tiny")
    params = common.init_params(cfg, jax.random.key(0))
    other = common.Config.preset("small")
    with pytest.raises(common.UserError, match=r"\['embed'\] is \(256, 64\), the config's is "
                                               r"\(256, 384\)"):
        inf.generate(params, other, [[100]], 2)
    with pytest.raises(common.UserError, match="2 layers and an embedding of"):
        inf.generate(inf.inference_params(params, cfg), other, [[100]], 2)
    deeper = dataclasses.replace(cfg, n_layers=cfg.n_layers + 1)  # the same embedding
    with pytest.raises(common.UserError, match="2 layers and an embedding of"):
        inf.generate(inf.inference_params(params, cfg), deeper, [[100]], 2)
    with pytest.raises(common.UserError, match="the draft must be a model's params"):
        inf.speculative_generate(params, cfg, None, cfg, [[1]], 2)
    # a [B, T] array of equal-length prompts is B prompts
    for batch in (np.array([[1, 2], [3, 4]]), jnp.array([[1, 2], [3, 4]])):
        assert inf.generate(params, cfg, batch, 2) == inf.generate(params, cfg, [[1, 2], [3, 4]], 2)
    with pytest.raises(common.UserError, match="prompt 0 holds float64 values"):
        inf.generate(params, cfg, [[1.5, 2.0]], 2)


def test_top_p_keeps_the_smallest_set_that_reaches_the_mass():
    """Probabilities that are powers of two (exact in float32): the best token alone holds 0.5,
    which reaches top_p=0.5, so it is the whole nucleus; 0.75 takes the best two."""
    logits = np.log(np.array([[0.125, 0.5, 0.125, 0.25]], np.float32))
    for top_p, kept in ((0.5, [1]), (0.75, [1, 3]), (0.8, [0, 1, 2, 3])):
        got = np.asarray(inf.filter_logits(logits, inf.Sampling(1.0, 0, top_p)))[0]
        assert np.flatnonzero(np.isfinite(got)).tolist() == sorted(kept), (top_p, got)


def test_top_k_past_the_vocabulary_keeps_every_token():
    logits = np.random.default_rng(0).standard_normal((4, TINY.vocab_size)).astype(np.float32)
    got = np.asarray(inf.filter_logits(logits, inf.Sampling(1.0, TINY.vocab_size + 10, 1.0)))
    np.testing.assert_allclose(got, logits - logits.max(-1, keepdims=True), rtol=1e-6)


def test_negative_stop_tokens_are_refused():
    with pytest.raises(common.UserError, match="stop_tokens must be ids in"):
        inf.generate(params_for(TINY), TINY, [[1]], 4, stop_tokens=[-1])


def test_decode_attention_intensity_grows_with_kv_sharing():
    """Decode attention reads K and V of the kv heads only: grouped-query attention (fewer kv
    heads for the same query heads) reads fewer bytes for the same FLOPs, so its intensity is
    higher, and by the lecture's count exactly so."""
    mha = dataclasses.replace(common.Config.preset("llama-3-8b"), n_kv_heads=32,
                              dtype="bfloat16")
    gqa = dataclasses.replace(mha, n_kv_heads=8)
    ctx, h, hd = 4096, 32, 128
    for cfg in (mha, gqa):
        scores = h * ctx
        want = (4 * hd + 3) * scores / (8 * scores + 2 * (2 * h * hd
                                                          + 2 * ctx * cfg.n_kv_heads * hd))
        assert inf.layer_intensity(cfg, "attention", 1, ctx) == pytest.approx(want)
    assert (inf.layer_intensity(gqa, "attention", 1, ctx)
            > 1.5 * inf.layer_intensity(mha, "attention", 1, ctx))


def test_compute_bound_batch_balances_flops_against_bytes():
    """At the batch returned, B x decode FLOPs at peak take exactly as long as reading the weights
    and B sequences' KV caches at the bandwidth; where the KV reads outgrow the FLOPs, never."""
    cfg, flops, bw, W, kv = TINY, 4e9, 1e9, 4e5, inf.kv_bytes_per_token(TINY)
    for ctx in (0, 16, 64):
        B = inf.compute_bound_batch(cfg, W, kv, ctx, flops, bw)
        assert 1 < B < math.inf
        assert B * cfg.decode_flops_per_token(ctx) / flops == pytest.approx(
            (W + B * ctx * kv) / bw, rel=1e-9)
    assert inf.compute_bound_batch(cfg, W, kv, 64, 1e15, bw) == math.inf
    assert inf.compute_bound_batch(cfg, W, 0, 0, flops, bw) == pytest.approx(
        W / bw * flops / (2 * cfg.param_count(embedding=False)))


def test_prefill_flops_count_what_the_compiled_prefill_does():
    """XLA's count of the prefill's FLOPs (its matmuls, plus the elementwise work the formula
    leaves out) within 5% of cfg.prefill_flops; the lecture's 2N x P, which runs the head at every
    position, is 1.5x too many at this shape (a 4,096-row head on a 256-wide model)."""
    cfg = dataclasses.replace(TINY, vocab_size=4096, d_model=256, n_heads=4, n_kv_heads=2,
                              head_dim=64, d_ff=1024, n_layers=2)
    P, ip = 64, inference_params_for(cfg)
    one = jnp.array([0], jnp.int32)
    run = jax.jit(lambda p, cache, t: inf.prefill(p, cache, t, one + P, one, cfg)[0])
    cost = run.lower(ip, inf.init_cache(cfg, 1, 128), jnp.ones((1, P), jnp.int32)).compile()
    cost = cost.cost_analysis()
    xla = (cost[0] if isinstance(cost, list) else cost)["flops"]
    assert xla == pytest.approx(cfg.prefill_flops(P), rel=0.05)
    assert 2 * cfg.param_count(embedding=False) * P > 1.4 * xla


def test_weight_bytes_counts_every_matrix_a_step_reads():
    """Every layer's matrices, the final norm and the output head; not the embedding table (one
    row a token), nor the norms folded into the matrices after them (fold_norm)."""
    for cfg in (TINY, dataclasses.replace(TINY, tie_embeddings=True)):
        ip = inference_params_for(cfg)
        folded = 2 * cfg.n_layers * cfg.d_model
        assert inf.weight_bytes(ip) == 4 * (cfg.param_count(embedding=False) - folded)


def test_served_time_per_output_token_is_the_gaps_between_tokens():
    """Four tokens, the first at 1 s and the last at 4 s: three gaps of a second each."""
    s, = inf._served([[5, 6, 7, 8]], [1.0], [4.0])
    assert s.ttft_s == 1.0 and s.tpot_s == pytest.approx(1.0)
    assert math.isnan(inf._served([[5]], [1.0], [1.0])[0].tpot_s)
    # a stream's figures: time per output token over the answers that have a second token
    served = inf._served([[5, 6, 7], [8], []], [1.0, 2.0, math.nan], [3.0, 2.0, math.nan])
    st = inf._stats(served, 4.0)
    assert (st["tokens"], st["tok_s"], st["ttft_mean"], st["tpot_mean"]) == (4, 1.0, 1.5, 1.0)
    st = inf._stats(inf._served([[5]] * 10, list(range(1, 11)), list(range(1, 11))), 10.0)
    assert st["ttft_p90"] == pytest.approx(9.1)  # numpy's linear interpolation over 1..10 s
    # every answer one token: no TPOT to average, and no numpy warning about it
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = inf._stats(inf._served([[5], [6]], [1.0, 2.0], [1.0, 2.0]), 2.0)
    assert st["ttft_mean"] == 1.5 and math.isnan(st["tpot_mean"])


def test_the_lessons_arithmetic_prints_the_bounds_of_its_formulas(capsys, monkeypatch):
    """show_arithmetic's minimum step (W + B x P x KV) / BW at batch 1 and B, and the batches
    where decode turns compute-bound, against the same formulas written out here."""
    monkeypatch.setattr(common, "memory_limit", lambda *a: (None, "unknown"))
    ip = inference_params_for(TINY)
    P, B, flops, bw = 64, 16, 4e9, 1e9   # a ridge of 4 FLOP/B: the KV reads leave a finite batch
    run = inf.Run("tiny", TINY, ip, None, inf.InferConfig(), flops, bw, P, 32, 128, steps=8,
                  batch=B, slots=4, requests=12, rng=np.random.default_rng(0), corpus=None,
                  trained=False)
    inf.show_arithmetic(run)
    out = capsys.readouterr().out
    W, kv = inf.weight_bytes(ip), inf.kv_bytes_per_token(TINY)
    for b in (1, B):
        t = (W + b * P * kv) / bw
        assert f"minimum decode step, batch {b:3d}, context {P}: (W + {b} x {P} x KV) / BW = " \
               f"{t * 1e3:.3f} ms, at most {b / t:,.0f} tok/s" in out
    n2 = 2 * TINY.param_count(embedding=False)
    weights_only = W / bw / (n2 / flops)
    with_kv = (W / bw) / (TINY.decode_flops_per_token(P) / flops - P * kv / bw)
    assert f"compute-bound at batch ~{weights_only:,.0f} counting the weights only" in out
    assert f"at batch {with_kv:,.0f} counting each sequence's {P}-token KV reads too" in out
    assert f"= {kv:,} B per token" in out


def test_speculative_sampling_after_a_fully_accepted_round_draws_from_the_target():
    """gamma 1: a round that keeps its draft token draws the next one from the target's p_1
    alone (no draft proposed it, so nothing is subtracted). 256 answers; token 2 comes from that
    draw in the rounds that kept token 1. As test_speculative_sampling_draws_from_the_target,
    the answers' sum of f(token) for f = p_j, q_j must match its expectation under p_j."""
    params, n, new = params_for(TINY), 256, 3
    draft, dcfg = inf.draft_params(params, TINY, 1)
    sampling = dict(temperature=0.8, top_k=6)
    prompt = [3, 1, 4, 1, 5]
    got, st = inf.speculative_generate(params, TINY, draft, dcfg, [prompt] * n, new, gamma=1,
                                       cache_len=CACHE, seed=2, **sampling)
    assert 0.2 < st["acceptance"] < 0.9
    toks = jnp.array([prompt + g for g in got])

    def next_token_probs(p, cfg):
        logits, _ = jax.jit(inf.forward_cached, static_argnums=3)(
            p, inf.init_cache(cfg, n, CACHE), toks, cfg)
        probs = jax.nn.softmax(inf.filter_logits(logits, inf.make_sampling(**sampling)), -1)
        return np.asarray(probs[:, len(prompt) - 1:-1], np.float64)
    p, q = next_token_probs(params, TINY), next_token_probs(draft, dcfg)
    for j in (1, 2):
        pj, qj, x = p[:, j], q[:, j], np.array([g[j] for g in got])
        for f in (pj, qj):
            mean, mean_sq = (pj * f).sum(1), (pj * f**2).sum(1)
            sd = np.sqrt((mean_sq - mean**2).sum())
            z = (f[np.arange(n), x].sum() - mean.sum()) / sd
            assert abs(z) < 4, (j, z)


def test_speculative_stops_only_at_a_stop_token_it_keeps():
    """Every token the answers never make is a stop token. A round's target predictions past
    its first refused draft token are thrown away, so one of them being a stop token must not
    end the row: the answers are the target's whole."""
    params = params_for(TINY)
    want = inf.generate(params, TINY, PROMPTS, 13, cache_len=CACHE)
    stops = sorted(set(range(TINY.vocab_size)) - {t for row in want for t in row})
    other = dataclasses.replace(TINY, n_layers=1, d_model=32, n_heads=2, n_kv_heads=1, d_ff=64)
    got, st = inf.speculative_generate(params, TINY, params_for(other, seed=5), other, PROMPTS,
                                       13, gamma=3, cache_len=CACHE, stop_tokens=stops)
    assert st["acceptance"] < 0.5     # refusals, whose discarded predictions are mostly stops
    assert got == want


def test_speculative_greedy_keeps_only_the_leading_agreement():
    """A draft that is often refused mid-round (the target's first layer of two, int8): a draft
    token that agrees after a refused one follows a token the target did not choose, so a round
    keeps only the agreeing prefix, and the answers are the target's."""
    params = params_for(TINY)
    first_layer, dcfg = inf.draft_params(params, TINY, 1)
    got, st = inf.speculative_generate(params, TINY, first_layer, dcfg, PROMPTS, 13, gamma=3,
                                       cache_len=CACHE)
    assert 0 < st["acceptance"] < st["alpha"] < 1
    assert got == inf.generate(params, TINY, PROMPTS, 13, cache_len=CACHE)


def test_lesson_lengths_refuse_a_cache_past_the_model_and_take_every_layer_as_draft():
    """--cache_len past max_seq_len is refused (positions the model was not built for); a draft
    of all the target's layers (draft_layers = n_layers) is allowed."""
    with pytest.raises(common.UserError, match="fit the model's max_seq_len=128"):
        inf.lesson_lengths(TINY, inf.InferConfig(cache_len=256), False)
    models = inf.load_model(inf.InferConfig(models="tiny"), False)[0]
    inf.check_before_the_run(models, inf.InferConfig(models="tiny", draft_layers=2), False, None)


def test_timed_context_is_the_mean_context_time_decode_times(monkeypatch):
    """timed_context(P, steps) against the cache lengths time_decode's steps actually find (a
    stand-in step that records them): the first call's step is not timed, then three runs of
    `steps`; an integer, so within half a position of their mean."""
    seen = []

    def step(params, cache, tok, row_ids, counters, seed, cfg, decode_attention):
        seen.append(int(cache["lengths"][0]))
        return tok, None, {"lengths": cache["lengths"] + 1}
    monkeypatch.setattr(inf, "decode_step", step)
    params = {"w": jnp.zeros((1,), jnp.float32)}
    for P, steps in ((0, 1), (64, 8), (100, 7)):
        seen.clear()
        inf.time_decode(params, TINY, {"lengths": jnp.full((1,), P, jnp.int32)}, steps)
        assert seen[0] == P and len(seen) == 1 + 3 * steps   # the first call, then the timed
        mean = sum(seen[1:]) / (3 * steps)                     # P + 1/2 + 3 steps / 2
        assert abs(inf.timed_context(P, steps) - mean) <= 0.5


def test_ffn_intensity_counts_each_matrix_and_activation_once():
    """The FFN's FLOPs per byte by the lecture's count, term by term: gate, up and down matmuls
    of 2 n d f FLOPs each; the three [d, f] weights read; x [n, d] read and y [n, d] written; g
    and u [n, f] written then read by the product, and h [n, f] written then read by down."""
    b, d, f = 4, TINY.d_model, TINY.d_ff   # float32
    for batch, tokens in ((1, 1), (3, 5), (2, 64)):
        n = batch * tokens
        flops = 3 * 2 * n * d * f
        weights = 3 * d * f
        x_in, y_out = n * d, n * d
        g_u_out, g_u_in, h_out, h_in = 2 * n * f, 2 * n * f, n * f, n * f
        nbytes = b * (weights + x_in + y_out + g_u_out + g_u_in + h_out + h_in)
        assert inf.layer_intensity(TINY, "ffn", tokens, 4096, batch) == pytest.approx(
            flops / nbytes, rel=1e-12)


def test_speculative_expected_tokens_per_round_is_eq_1():
    """Leviathan et al. 2023, eq. 1: a round of gamma drafts, each accepted with chance alpha,
    yields 1 + alpha + ... + alpha^gamma tokens; gamma + 1 when every draft is accepted."""
    assert inf.expected_tokens_per_round(0.5, 4) == pytest.approx(1.9375, rel=1e-12)  # 31 / 16
    assert inf.expected_tokens_per_round(0.0, 4) == 1       # only the target's own token
    assert inf.expected_tokens_per_round(0.8, 1) == pytest.approx(1.8, rel=1e-12)
    assert inf.expected_tokens_per_round(1.0, 4) == 5       # the limit, not 0 / 0
    assert inf.expected_tokens_per_round(1 - 1e-9, 4) == pytest.approx(5, rel=1e-6)


def test_speculative_speedup_from_bytes_charges_gamma_plus_1_draft_steps_a_round():
    """By the bytes a round costs gamma + 1 draft steps of c target steps each and one
    verification of 1: 30 tokens in 6 rounds at gamma 4 are 5 a round for 5 c + 1 steps."""
    assert inf.speedup_from_bytes(30, 6, 4, 0.2) == pytest.approx(2.5, rel=1e-12)   # 5 / 2
    assert inf.speedup_from_bytes(30, 6, 4, 1.0) == pytest.approx(5 / 6, rel=1e-12)
    assert inf.speedup_from_bytes(30, 6, 4, 0.0) == pytest.approx(5.0, rel=1e-12)   # free draft
    assert inf.speedup_from_bytes(31, 7, 4, 0.25) == pytest.approx(31 / 7 / 2.25, rel=1e-12)


def test_the_stream_heading_counts_the_long_answers_it_serves(capsys, monkeypatch):
    """measure_stream's heading gives the answers' range and how many are long (a quarter of the
    requests on average, 1.5 G to 2 G tokens), as the per-request table then lists them. The
    serving is faked: each request gets max_new_tokens tokens."""
    def serve(params, cfg, reqs, slots, S, prompt_pad, decode_attention):
        return [inf.Served([0] * r.max_new_tokens, 1e-3, 1e-4) for r in reqs], 1.0
    monkeypatch.setattr(inf, "serve_static", serve)
    monkeypatch.setattr(inf, "serve_continuous", serve)
    G = 32
    for seed in range(3):
        run = inf.Run("tiny", TINY, None, None, inf.InferConfig(), 1e9, 1e9, 64, G, 128, steps=8,
                      batch=16, slots=4, requests=24, rng=np.random.default_rng(seed),
                      corpus=None, trained=False)
        inf.measure_stream(run)
        out = capsys.readouterr().out
        news = [int(line.split()[2]) for line in out.splitlines()
                if re.fullmatch(r"\s*\d+\s+\d+\s+\d+ \|.*", line)]
        assert len(news) == 24
        heading = re.search(r"answers of (\d+)\.\.(\d+) \((\d+) of them long\)", out)
        assert heading.groups() == (str(min(news)), str(max(news)),
                                    str(sum(n >= 3 * G // 2 for n in news))), out
