"""01_roofline: the predicted FLOPs and bytes against exact formulas and XLA's own count, the
roofline arithmetic, and the kernels against their references."""
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common

rl = common.import_script("01_roofline")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def randn(shape, seed):
    """Inputs drawn by numpy: nothing for jax to compile."""
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


@pytest.mark.parametrize("dtype, intensity", [("float64", 1 / 12), ("float32", 1 / 6),
                                              ("bfloat16", 1 / 3)])
def test_axpy_intensity(dtype, intensity):
    n = 1000
    c = rl.axpy_cost(n, jnp.dtype(dtype).itemsize)
    assert c.flops == 2 * n
    assert c.bytes == 3 * n * jnp.dtype(dtype).itemsize
    assert c.intensity == pytest.approx(intensity, rel=1e-12)


def test_measured_time_is_the_device_clock_where_there_is_one():
    assert rl.Measured(wall_s=40e-6, device_s=3e-6).s == 3e-6   # a GPU: the kernel, not the host
    assert rl.Measured(wall_s=40e-6).s == 40e-6                  # a CPU: the wall clock
    t = rl.time_per_call(jax.jit(lambda x: x * 2), [(jnp.ones(4),)], iters=2, calls=3)
    assert t.device_s is None and t.wall_s > 0


def test_time_per_call_is_per_call_and_rotates_every_input(monkeypatch):
    clock, seen = [0.0], []
    monkeypatch.setattr(common.time, "perf_counter", lambda: clock[0])

    def fn(i):  # one second of the fake clock a call
        clock[0] += 1.0
        seen.append(i)
        return i
    t = rl.time_per_call(fn, [(0,), (1,), (2,)], iters=3, calls=2)
    assert t.wall_s == 1.0
    assert sorted(set(seen)) == [0, 1, 2]


@pytest.mark.parametrize("n", [128, 1024, 8192])
def test_square_matmul_intensity_is_n_over_3_in_bf16(n):
    c = rl.matmul_cost(n, n, n, 2)
    assert c.flops == 2 * n**3
    assert c.bytes == 3 * n * n * 2
    assert c.intensity == pytest.approx(n / 3, rel=1e-12)


def test_matmul_cost_counts_a_wider_output():
    c = rl.matmul_cost(4, 8, 16, 1, out_itemsize=4)  # int8 in, int32 out
    assert c.bytes == 4 * 8 + 8 * 16 + 4 * 4 * 16


def test_sum_bytes_fused_and_eager():
    n = 1 << 20
    assert rl.sum_cost(n, 3, 4, fused=True).bytes == 16 * n     # read A, B, C; write the sum
    assert rl.sum_cost(n, 3, 4, fused=False).bytes == 24 * n    # two adds, 3 words each
    assert rl.sum_cost(n, 3, 4, fused=True).flops == 2 * n


def test_xla_counts_the_bytes_we_predict():
    """XLA's cost model for the fused A+B+C and for one add agrees with the hand count."""
    n = 4096
    a = jnp.ones(n, jnp.float32)
    assert rl.xla_bytes(rl.add3, a, a, a) == rl.sum_cost(n, 3, 4, fused=True).bytes
    assert 2 * rl.xla_bytes(jnp.add, a, a) == rl.sum_cost(n, 3, 4, fused=False).bytes


def test_relu_matmul_cost_unfused_adds_two_passes_over_the_output():
    M, K, N = 64, 32, 48
    fused = rl.relu_matmul_cost(M, K, N, 2, fused=True)
    unfused = rl.relu_matmul_cost(M, K, N, 2, fused=False)
    assert fused.bytes == (M * K + K * N + M * N) * 2
    assert unfused.bytes - fused.bytes == 2 * M * N * 2
    assert fused.flops == unfused.flops == 2 * M * K * N + M * N


def test_attention_cost():
    B, T, S, H, D = 2, 256, 384, 4, 64
    fused = rl.attention_cost(B, T, S, H, D, 2, materialized=False)
    full = rl.attention_cost(B, T, S, H, D, 2, materialized=True)
    assert fused.flops == full.flops == 4 * B * T * S * H * D
    assert fused.bytes == 2 * (2 * B * T * H * D + 2 * B * S * H * D)
    assert full.bytes - fused.bytes == B * H * T * S * (4 + 4 + 2 + 2)


def test_roofline_time_picks_the_binding_ceiling():
    peak, bw = 100.0, 10.0                                   # ridge at 10 FLOP/B
    assert rl.ridge_point(peak, bw) == 10.0
    assert rl.roofline_time(rl.Cost(100.0, 100.0), peak, bw) == 10.0    # intensity 1: memory
    assert rl.roofline_time(rl.Cost(10000.0, 100.0), peak, bw) == 100.0  # intensity 100: compute


@pytest.mark.parametrize("K, N, itemsize, ridge", [(8192, 8192, 2, 295.0), (4096, 14336, 2, 250.0),
                                                   (1024, 1024, 4, 30.0)])
def test_compute_bound_batch_is_where_intensity_crosses_the_ridge(K, N, itemsize, ridge):
    M = rl.compute_bound_batch(K, N, itemsize, ridge)
    assert rl.matmul_cost(M, K, N, itemsize).intensity >= ridge
    assert rl.matmul_cost(M - 1, K, N, itemsize).intensity < ridge
    assert M >= ridge * itemsize / 2  # intensity is below 2M/itemsize, so M cannot be smaller


def test_compute_bound_batch_none_when_the_weight_is_too_small():
    # a [M, 64] @ [64, 64] bf16 matmul saturates at intensity 2*64*64 / (2 * 128) = 32 FLOP/B
    assert rl.compute_bound_batch(64, 64, 2, 40.0) is None
    assert rl.compute_bound_batch(64, 64, 2, 20.0) is not None


def test_skinny_summary_names_what_holds_the_time():
    us = 1e-6
    flat, why = rl.skinny_summary([100 * us, 105 * us, 110 * us, 200 * us], 90 * us, 1 * us,
                                  None, 4096)
    assert flat == 4 and "reading the 4096x4096 weight" in why
    flat, why = rl.skinny_summary([100 * us, 130 * us], 90 * us, 1 * us, 1, 64)
    assert flat == 1 and "compute-bound from M = 1" in why
    # A call 5x longer than its bytes need: the bytes do not explain it, whatever M* says.
    flat, why = rl.skinny_summary([178 * us, 281 * us], 33 * us, 1 * us, 4, 1024)
    assert flat == 1 and "fixed cost" in why and "33.0 us" in why
    # ...nor, on the same clock, does an empty call: then nothing printed explains it, and the
    # lesson says so instead of blaming a fixed cost it measured to be small.
    flat, why = rl.skinny_summary([269 * us, 281 * us], 33 * us, 8 * us, 4, 1024, t_call=4 * us)
    assert "no bound explains" in why and "fixed cost" not in why and "4.0 us" in why
    flat, why = rl.skinny_summary([178 * us, 281 * us], 33 * us, 1 * us, 4, 1024, t_call=120 * us)
    assert "fixed cost" in why
    # FLOPs that explain the time are not called a fixed cost, even with few bytes.
    flat, why = rl.skinny_summary([100 * us, 200 * us], 10 * us, 90 * us, 1, 64, t_call=4 * us)
    assert "compute-bound" in why
    assert rl.skinny_summary([100 * us, 101 * us, 102 * us], 90 * us, 1 * us, None, 64)[0] == 4
    # Below the ridge the bytes do not grow with M: a time that does is said, not blamed on them.
    flat, why = rl.skinny_summary([140 * us, 200 * us], 100 * us, 1 * us, None, 1024)
    assert flat == 1 and "1.43x as long" in why and "is the cost" not in why
    # ...but where the ridge is at M = 2, M = 2's longer time is its FLOPs, as the roofline says.
    flat, why = rl.skinny_summary([140 * us, 200 * us], 100 * us, 1 * us, 2, 1024)
    assert flat == 1 and "as long" not in why and "reading the 1024x1024 weight is the" in why


def test_ceilings_hold_16_bit_kernels_to_float32_on_a_cpu_and_fill_a_tpus_tf32():
    flops = {"float32 default": 2.0, "bfloat16": 1.0, "float16": 3.0}
    cpu, gpu = rl.Ceilings(flops, 1.0, {}, None, True), rl.Ceilings(flops, 1.0, {}, None, False)
    assert cpu.peak("bfloat16") == 2.0 and cpu.peak("float16") == 3.0
    assert rl.Ceilings({**flops, "float16": 0.5}, 1.0, {}, None, True).peak("float16") == 2.0
    assert gpu.peak("bfloat16") == 1.0
    # float32 is held to the default precision's rate (TF32 on a GPU), not HIGHEST's
    two = rl.Ceilings({**flops, "float32 highest": 0.25}, 1.0, {}, None, False)
    assert two.peak("float32") == 2.0
    with_ds = rl.Ceilings(flops, 1.0, {"bfloat16": 9.0}, 5.0, True)
    assert with_ds.peak("bfloat16", datasheet=True) == 9.0     # a datasheet figure comes first
    tpu, h100 = (rl.datasheet_flops(common.CHIPS[k]) for k in ("TPU v5", "H100"))
    assert tpu["float32 default"] == common.CHIPS["TPU v5"].bf16_flops
    assert h100["float32 default"] == common.CHIPS["H100"].tf32_flops


def test_fused_and_unfused_kernels_agree():
    a, b, c = (randn((1000,), seed) for seed in range(3))
    np.testing.assert_array_equal(jax.jit(rl.add3)(a, b, c), rl.add3_eager(a, b, c))
    A, B = randn((33, 17), 3), randn((17, 40), 4)
    np.testing.assert_allclose(jax.jit(rl.relu_matmul)(A, B), rl.relu_matmul_unfused(A, B),
                               rtol=1e-6, atol=1e-6)
    ref = np.maximum(np.asarray(A, np.float64) @ np.asarray(B, np.float64), 0)
    np.testing.assert_allclose(rl.relu_matmul_unfused(A, B), ref, rtol=1e-4, atol=1e-4)


def test_axpy_float64_keeps_float64():
    with jax.enable_x64(True):
        x = jnp.arange(4, dtype=jnp.float64) / 3
        y = jax.jit(rl.axpy)(2.0, x, x)
        assert y.dtype == jnp.float64
        np.testing.assert_allclose(np.asarray(y), 3 * np.arange(4) / 3, rtol=1e-15)


@pytest.mark.parametrize("dtype, out", [("int8", jnp.int32), ("float8_e4m3fn", jnp.bfloat16),
                                        ("bfloat16", jnp.bfloat16)])
def test_matmul_for_low_precision_matches_exact_products(dtype, out):
    scale = 20.0 if dtype == "int8" else 1.0  # int8: integers up to about +-60
    a = (scale * randn((16, 32), 5)).round(0 if dtype == "int8" else 8).astype(dtype)
    b = (scale * randn((32, 8), 6)).round(0 if dtype == "int8" else 8).astype(dtype)
    got = rl.matmul_for(dtype)(a, b if dtype == "bfloat16" else b.T)  # 8-bit: b as [N, K]
    assert got.dtype == out
    ref = (np.asarray(a.astype(jnp.float32), np.float64)
           @ np.asarray(b.astype(jnp.float32), np.float64))
    tol = 0 if dtype == "int8" else 2.0**-7 * np.abs(ref).max()  # one bf16 rounding of the output
    np.testing.assert_allclose(np.asarray(got.astype(jnp.float32), np.float64), ref, atol=tol)


def test_attention_materialized_matches_numpy():
    B, T, H, D = 1, 16, 2, 8
    q, k, v = (randn((B, T, H, D), seed) for seed in range(3))
    s = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), np.asarray(k, np.float64))
    p = np.exp(s / math.sqrt(D) - (s / math.sqrt(D)).max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    ref = np.einsum("bhts,bshd->bthd", p, np.asarray(v, np.float64))
    np.testing.assert_allclose(rl.attention_materialized(q, k, v), ref, rtol=1e-5, atol=1e-5)


def test_config_rejects_bad_sizes():
    with pytest.raises(common.UserError):
        rl.RooflineConfig(max_square=1000)
    for max_batch in (3, 1):  # 1: no M to compare M = 1 with
        with pytest.raises(common.UserError, match="max_batch must be a power of 2 >= 2"):
            rl.RooflineConfig(max_batch=max_batch)
    with pytest.raises(common.UserError):
        rl.RooflineConfig(dtype="int4")
    assert rl.resolve(rl.RooflineConfig(), on_cpu=True).max_square == 1024


def test_out_must_be_a_directory_or_creatable_as_one(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    with pytest.raises(common.UserError, match=f"^--out={a_file} is a file, not a directory$"):
        common.make_out_dir(str(a_file))
    with pytest.raises(common.UserError, match="cannot be made a directory .Not a directory."):
        common.make_out_dir(str(a_file / "plots"))
    nested = tmp_path / "new" / "plots"
    assert common.make_out_dir(str(nested)) == str(nested) and nested.is_dir()
    assert common.make_out_dir(str(nested)) == str(nested)  # an existing directory is fine


def test_cli_refuses_a_file_as_out_before_measuring(tmp_path):
    a_file = tmp_path / "a_file"
    a_file.write_text("")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "01_roofline.py"), f"--out={a_file}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip() == f"error: --out={a_file} is a file, not a directory"
    assert "ceilings" not in r.stdout  # refused before the first measurement


def test_sizes_past_the_memory_are_refused_before_any_array(monkeypatch):
    """XLA aborts the process on a shape of more than 2^63 elements (a 10^10-wide weight), so
    the sizes are checked against the memory first."""
    monkeypatch.setattr(common, "memory_limit", lambda: (16e9, "a test's memory"))
    ok = rl.resolve(rl.RooflineConfig(), on_cpu=False)
    rl.check_sizes(ok, on_gpu=True)  # the GPU defaults fit in 16 GB
    for field, value, what in [("weight", 10**10, r"4e\+11 GB for a \[10000000000, 1"),
                               ("weight", 65536, "17.2 GB for a"),  # 2 x 65536^2 x 2 bytes
                               ("attn_seq", 2**17, "4.4e\\+03 GB for attention's"),  # B2 H16
                               ("max_square", 2**15, "25.8 GB for the float64"),
                               ("vector_mib", 4096, "21.5 GB for A \\+ B \\+ C")]:
        cfg = rl.resolve(rl.RooflineConfig(**{field: value}), on_cpu=False)
        with pytest.raises(common.UserError, match=f"^{field}={value} needs {what}.*more than "
                           f"the 16 GB of a test's memory: use a smaller size$"):
            rl.check_sizes(cfg, on_gpu=True)
    cfg = rl.resolve(rl.RooflineConfig(max_batch=2**20), on_cpu=False)
    with pytest.raises(common.UserError, match=rf"^max_batch=1048576 weight={cfg.weight} needs "
                       r".* GB for the skinny sweep's largest inputs, \[1048576, "):
        rl.check_sizes(cfg, on_gpu=True)


def test_memory_limit_knows_this_host():
    limit, where = common.memory_limit()  # a CPU: its physical memory
    assert limit > 2**30 and where == "the host's memory"


def test_compute_bound_batch_none_where_the_intensity_only_approaches_the_ridge():
    # [M, 64] @ [64, 64] in bf16 tends to 2*64*64 / (2 * 128) = 32 FLOP/B and never reaches it
    assert rl.compute_bound_batch(64, 64, 2, 32.0) is None


def test_config_rejects_sizes_the_sweeps_cannot_take():
    for kw in (dict(max_square=64), dict(attn_seq=100), dict(iters=-1), dict(weight=-1)):
        with pytest.raises(common.UserError):
            rl.RooflineConfig(**kw)
    rl.RooflineConfig(max_square=128, attn_seq=256)


def test_a_datasheet_peak_needs_the_datasheet_bandwidth_too():
    """Without the datasheet's bandwidth there is no datasheet roofline: the measured peak."""
    flops = {"float32 default": 2.0, "bfloat16": 1.0}
    no_bw = rl.Ceilings(flops, 1.0, {"bfloat16": 9.0}, None, False)
    assert not no_bw.has_datasheet("bfloat16")
    assert no_bw.peak("bfloat16", datasheet=True) == 1.0
    h100 = rl.datasheet_flops(common.CHIPS["H100"])
    assert h100["float16"] == h100["bfloat16"] == common.CHIPS["H100"].bf16_flops


def test_skinny_sweep_memory_counts_eight_copies_of_its_largest_input(monkeypatch):
    """[max_batch, W] inputs rotate through up to 8 sets (arg_rotation's most): at 16 GB,
    max_batch 2^17 of a bf16 8192-wide weight needs 8 x 2^17 x 8192 x 2 B = 17.2 GB."""
    monkeypatch.setattr(common, "memory_limit", lambda: (16e9, "a test's memory"))
    cfg = rl.resolve(rl.RooflineConfig(max_batch=2**17), on_cpu=False)
    with pytest.raises(common.UserError, match=r"^max_batch=131072 weight=8192 needs 17.2 GB "):
        rl.check_sizes(cfg, on_gpu=True)


def test_skinny_summary_counts_a_time_of_exactly_1_2x_as_within_20_percent():
    flat, _ = rl.skinny_summary([1.0, 1.2, 2.0], 0.9, 0.01, None, 64)
    assert flat == 2


def test_ridge_and_table_print_the_roofline_of_the_ceilings(capsys, monkeypatch):
    """print_ridge: peak / bandwidth, measured and datasheet, and the compute-bound M of each;
    print_table: each row's bound, roofline time and fraction of it, against both ceilings."""
    monkeypatch.setattr(rl, "dispatch_floor", lambda iters: 1e-6)
    ceil = rl.Ceilings({"float32 default": 2e12, "bfloat16": 4e12}, 1e10, {"bfloat16": 1e13},
                       2e10, False)
    cfg = rl.resolve(rl.RooflineConfig(), on_cpu=True)          # bfloat16, weight 1024
    m_star = rl.print_ridge(cfg, ceil)
    out = capsys.readouterr().out
    assert "400 FLOP/B measured, 500 FLOP/B datasheet" in out
    assert m_star == rl.compute_bound_batch(1024, 1024, 2, 400.0) == 1829
    assert f"compute-bound at M = 1829 (measured" in out
    assert f"compute-bound at M = {rl.compute_bound_batch(1024, 1024, 2, 500.0)} (datasheet" in out
    rows = [("slow", "bfloat16", rl.Cost(1e9, 1e8), rl.Measured(wall_s=2e-2)),
            ("dense", "bfloat16", rl.Cost(1e12, 1e8), rl.Measured(wall_s=0.5))]
    rl.print_table(rows, ceil, 3.7e-6)
    out = capsys.readouterr().out
    assert "a call that does nothing takes 3.7 us" in out   # the floor given, not measured again
    lines = {ln.split()[0]: ln.split() for ln in out.splitlines()
             if ln.split() and ln.split()[0] in ("slow", "dense")}
    #        bound      roof us    roof%  ds%
    assert [lines["slow"][i] for i in (5, 6, 8, 11)] == ["memory", "10000.0", "50%", "25%"]
    assert [lines["dense"][i] for i in (5, 6, 8, 11)] == ["compute", "250000.0", "50%", "20%"]
    # TFLOP/s and GB/s: FLOPs and bytes over the measured time, not the roofline's (which would
    # give 0.10 and 10 for slow, 4.00 for dense): 1e9 / 2e-2 s, 1e8 / 2e-2 s; 1e12 / 0.5 s
    assert [lines["slow"][i] for i in (9, 10)] == ["0.05", "5"]
    assert [lines["dense"][i] for i in (9, 10)] == ["2.00", "0"]


def test_measure_matmul_counts_two_flops_per_multiply_add(monkeypatch):
    """An n x n x n matmul is n^3 multiply-adds, 2 n^3 FLOPs, over the time of a call."""
    monkeypatch.setattr(rl, "time_per_call", lambda *a, **k: rl.Measured(wall_s=0.5))
    assert rl.measure_matmul("float32", 8, 1) == 2 * 8**3 / 0.5
    monkeypatch.setattr(rl, "time_per_call", lambda *a, **k: rl.Measured(1.0, device_s=0.25))
    assert rl.measure_matmul("float32", 16, 1) == 2 * 16**3 / 0.25   # the device's clock first


def test_fusion_table_counts_both_eager_adds_in_xlas_bytes(monkeypatch, capsys):
    """A+B+C eager is two programs, each one add of two vectors: XLA's count for the row is
    twice its count for one add (each reads 2 vectors and writes 1: 12 bytes an element)."""
    monkeypatch.setattr(rl, "time_per_call", lambda *a, **k: rl.Measured(wall_s=1e-3))
    cfg = rl.RooflineConfig(vector_mib=1, weight=128, iters=1)
    ceil = rl.Ceilings({"float32 default": 1e12, "bfloat16": 1e12}, 1e10, {}, None, True)
    rl.run_fusion(cfg, ceil)
    out = capsys.readouterr().out
    n = 2**20 // 4
    one_add = rl.xla_bytes(jnp.add, jnp.ones(n), jnp.ones(n))
    cells = {" ".join(ln.split()[:2]): ln.split()[2:] for ln in out.splitlines()
             if ln.strip().startswith("A+B+C")}
    #                          predicted MB, XLA MB
    assert float(cells["A+B+C eager"][0]) == pytest.approx(2 * 3 * n * 4 / 1e6, abs=0.051)
    assert float(cells["A+B+C eager"][1]) == pytest.approx(2 * one_add / 1e6, abs=0.051)
    assert float(cells["A+B+C jit"][0]) == pytest.approx(4 * n * 4 / 1e6, abs=0.051)
