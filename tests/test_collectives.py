"""Ring collectives against XLA's built-ins and numpy, on 8 simulated CPU devices."""
import collections
import functools
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import common

coll = common.import_script("02_collectives")


def ring_mesh(n):
    return Mesh(np.array(jax.devices()[:n]), ("x",))


def sharded_input(n, S, tail, dtype, seed=0):
    shape = (n * S,) + tail
    if jnp.issubdtype(dtype, jnp.integer):
        x = jax.random.randint(jax.random.key(seed), shape, -100, 100, dtype)
    else:
        x = jax.random.normal(jax.random.key(seed), shape, dtype)
    return jax.device_put(x, NamedSharding(ring_mesh(n), P("x")))


def assert_close(got, want, dtype):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    # Exact for integers; for floats the ring rounds at each of its N - 1 adds (in bf16 that
    # reaches 8e-3 of the sum at N = 8, where psum rounds its float32 sum once).
    tol = {jnp.int32: 0, jnp.float32: 1e-5, jnp.bfloat16: 5e-2}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol)


# (devices, rows per block S, trailing dims, dtype, pieces, bidirectional)
@pytest.mark.parametrize("n,S,tail,dtype,pieces,bidi", [
    (8, 8, (), jnp.float32, 1, False),
    (8, 6, (3,), jnp.bfloat16, 1, True),
    (8, 3, (2,), jnp.float32, 2, False),  # a block of 3 rows in 2 pieces
    (4, 5, (2, 3), jnp.int32, 2, True),  # 4 lanes of 1 or 2 rows
    (2, 4, (), jnp.float32, 8, False),  # more pieces than rows: one row each
])
def test_all_gather_matches_builtin(n, S, tail, dtype, pieces, bidi):
    x, mesh = sharded_input(n, S, tail, dtype), ring_mesh(n)
    got = coll.ring_all_gather(x, mesh, "x", pieces=pieces, bidirectional=bidi)
    want = coll.builtin_all_gather(x, mesh, "x")
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # no arithmetic: exact
    np.testing.assert_array_equal(np.asarray(got), np.asarray(x))
    assert all(s.data.shape == x.shape for s in got.addressable_shards)  # replicated


@pytest.mark.parametrize("n,S,tail,dtype,pieces,bidi", [
    (8, 8, (), jnp.float32, 1, False),
    (8, 24, (3,), jnp.bfloat16, 1, True),
    (4, 12, (2, 3), jnp.int32, 2, False),  # chunks of 3 rows in pieces of 1 and 2
])
def test_reduce_scatter_matches_builtin(n, S, tail, dtype, pieces, bidi):
    x, mesh = sharded_input(n, S, tail, dtype), ring_mesh(n)
    got = coll.ring_reduce_scatter(x, mesh, "x", pieces=pieces, bidirectional=bidi)
    assert got.shape == (S,) + tail
    assert all(s.data.shape == (S // n,) + tail for s in got.addressable_shards)  # sharded
    assert_close(got, coll.builtin_reduce_scatter(x, mesh, "x"), dtype)
    blocks = np.asarray(x, np.float64).reshape((n, S) + tail)
    assert_close(got, blocks.sum(0), dtype)


@pytest.mark.parametrize("n,S,tail,dtype,pieces,bidi", [
    (8, 8, (), jnp.float32, 1, False),
    (8, 32, (3,), jnp.bfloat16, 2, True),
    (4, 7, (), jnp.int32, 1, False),     # 7 rows over 4 devices: padded to 8
    (8, 3, (2,), jnp.float32, 1, True),  # 3 rows over 8 devices: padded to 8
])
def test_all_reduce_matches_builtin(n, S, tail, dtype, pieces, bidi):
    x, mesh = sharded_input(n, S, tail, dtype), ring_mesh(n)
    got = coll.ring_all_reduce(x, mesh, "x", pieces=pieces, bidirectional=bidi)
    assert got.shape == (S,) + tail
    assert all(s.data.shape == (S,) + tail for s in got.addressable_shards)  # replicated
    assert_close(got, coll.builtin_all_reduce(x, mesh, "x"), dtype)
    blocks = np.asarray(x, np.float64).reshape((n, S) + tail)
    assert_close(got, blocks.sum(0), dtype)


def test_reduce_scatter_refuses_uneven_split():
    x, mesh = sharded_input(8, 3, (2,), jnp.float32), ring_mesh(8)
    with pytest.raises(common.UserError, match="not a multiple of 8"):
        coll.ring_reduce_scatter(x, mesh, "x")


def test_global_array_must_split_into_blocks():
    mesh = ring_mesh(8)
    x = jnp.ones((12, 4))
    for fn in (coll.ring_all_gather, coll.ring_reduce_scatter, coll.ring_all_reduce):
        with pytest.raises(common.UserError, match="does not split into 8 equal blocks"):
            fn(x, mesh, "x")
    with pytest.raises(common.UserError, match="no axis 'y'"):
        coll.ring_all_gather(jnp.ones((8, 4)), mesh, "y")
    for fn in (coll.ring_all_gather, coll.ring_reduce_scatter, coll.ring_all_reduce):
        with pytest.raises(common.UserError, match="pieces must be an integer"):
            fn(jnp.ones((64, 4)), mesh, "x", pieces=1.5)
    with pytest.raises(common.UserError, match="w must be \\[K, F\\]"):
        coll.collective_matmul(jnp.ones((8, 4)), jnp.ones(4), mesh, "x")


def permute_bytes(fn, x):
    """Bytes each device receives through collective-permutes, and the other collectives used."""
    hlo = jax.jit(fn).lower(x).compile().as_text()
    sizes = [int(np.prod([int(d) for d in dims.split(",") if d])) * 4
             for dims in re.findall(r"= f32\[([\d,]*)\][^ ]* collective-permute\(", hlo)]
    others = re.findall(r"\b(all-reduce|all-gather|reduce-scatter|all-to-all)(?:-start)?\(", hlo)
    return sum(sizes), others


@pytest.mark.parametrize("kind,pieces", [("all-gather", 1), ("reduce-scatter", 1),
                                         ("all-reduce", 2)])
def test_ring_uses_only_neighbour_sends_of_the_predicted_bytes(kind, pieces):
    n, S, width = 8, 16, 4
    x, mesh = sharded_input(n, S, (width,), jnp.float32), ring_mesh(n)
    fn = {"all-gather": coll.ring_all_gather, "reduce-scatter": coll.ring_reduce_scatter,
          "all-reduce": coll.ring_all_reduce}[kind]
    sent, others = permute_bytes(functools.partial(fn, mesh=mesh, axis_name="x", pieces=pieces),
                                 x)
    assert others == []
    assert sent == coll.ring_bytes_sent(kind, S * width * 4, n)


@pytest.mark.parametrize("kind", ["all-gather", "reduce-scatter"])
def test_bidirectional_ring_sends_half_each_way(kind):
    """bidirectional=True: as many sends go to the next device as to the previous one (the
    values alone cannot tell, as every lane reaching the same sum is right)."""
    n = 8
    x, mesh = sharded_input(n, 16, (4,), jnp.float32), ring_mesh(n)
    fn = {"all-gather": coll.ring_all_gather, "reduce-scatter": coll.ring_reduce_scatter}[kind]
    hlo = jax.jit(functools.partial(fn, mesh=mesh, axis_name="x", bidirectional=True)).lower(
        x).compile().as_text()
    ways = collections.Counter()
    for pairs in re.findall(r"collective-permute[^\n]*source_target_pairs=\{(.*?)\}\}", hlo):
        (s, t), = {((int(a) + 1) % n == int(b), (int(a) - 1) % n == int(b))
                   for a, b in re.findall(r"\{?(\d+),(\d+)", pairs)}
        ways["next" if s else "previous"] += 1
    assert ways["next"] == ways["previous"] == n - 1


def test_collective_matmul_matches_plain_and_numpy():
    n = 8
    mesh = ring_mesh(n)
    kx, kw = jax.random.split(jax.random.key(3))
    x = jax.random.normal(kx, (4 * n, 24), jnp.float32)
    w = jax.random.normal(kw, (24, 2 * n), jnp.float32)
    x = jax.device_put(x, NamedSharding(mesh, P("x", None)))
    w = jax.device_put(w, NamedSharding(mesh, P(None, "x")))
    want = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    got = coll.collective_matmul(x, w, mesh, "x")
    assert all(s.data.shape == (4 * n, 2) for s in got.addressable_shards)  # sharded by columns
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(coll.matmul_all_gather(x, w, mesh, "x")), want,
                               rtol=1e-5, atol=1e-5)


def test_timing_many_runs_of_a_collective_on_simulated_devices():
    """common.bench queues runs back to back; on simulated CPU devices (threads of one pool)
    independent runs of a collective could then deadlock, and XLA aborts the process."""
    x = sharded_input(8, 64, (256,), jnp.float32)
    f = functools.partial(coll.ring_all_gather, mesh=ring_mesh(8), axis_name="x")
    assert common.bench(f, x, iters=2, warmup=0, calls=100).runs == 200


def test_lesson_predicts_from_a_measured_link_where_no_datasheet_has_one(monkeypatch, capsys):
    """A CPU has no link figure: the lesson still prints a prediction for every collective, from
    the bandwidth of one ppermute it measured, and says so."""
    monkeypatch.setattr("sys.argv", ["02_collectives.py", "--sizes_mib=0.0625", "--iters=1",
                                     "--mm_m=64", "--mm_k=32", "--mm_f=64"])
    coll.main()
    out = capsys.readouterr().out
    assert "predicted = sent / the bandwidth of one ppermute of the same block, measured" in out
    for kind in ("all-gather", "reduce-scatter", "all-reduce"):
        row = next(line for line in out.splitlines() if line.startswith(kind))
        pred = float(row.split()[3])  # collective, MiB/dev, sent MiB, pred ms
        assert pred > 0
    assert re.search(r"collective matmul \(ring\)\s+\d+\.\d+", out)  # predicted, not n/a


def test_sizes_past_the_memory_are_refused_before_any_block(monkeypatch):
    """A CPU's 8 simulated devices share the host's memory: 1 MiB blocks need 8 x 19 MiB there
    (each device's block, two gathered outputs of 8 blocks and the ring's copies)."""
    monkeypatch.setattr(common, "memory_limit", lambda *a: (1e8, "a test's memory"))
    monkeypatch.setattr("sys.argv", ["02_collectives.py", "--sizes_mib=1", "--iters=1"])
    with pytest.raises(common.UserError, match=r"^sizes_mib=1 width=1024 needs 0.159 GB for a "
                       r"block, the gathered outputs and the ring's copies on 8 devices"):
        coll.main()


def test_rings_take_nested_lists_as_jnp_does():
    x = np.arange(16.0).reshape(8, 2)
    got = coll.ring_all_reduce(x.tolist(), ring_mesh(8), "x")
    np.testing.assert_allclose(got, x.reshape(8, 1, 2).sum(0))
    np.testing.assert_allclose(coll.ring_all_gather(x=x.tolist(), mesh=ring_mesh(8),
                                                    axis_name="x"), x)


def test_lesson_predictions_follow_the_ring_formulas(monkeypatch, capsys):
    """Every timing at 1 ms and a matmul peak of 1e8 FLOP/s: the link measured by one ppermute
    is a block per ms (a block is rounded down to a multiple of N rows), so a ring collective
    is predicted at sent / block ms (all-gather N - 1, reduce-scatter (N - 1) / N, all-reduce
    twice that), and the collective matmul at the formulas of measure_collective_matmul's
    comments."""
    t, peak = 1e-3, 1e8
    monkeypatch.setattr(common, "bench", lambda *a, **k: types.SimpleNamespace(median_s=t))
    monkeypatch.setattr(common, "ceilings", lambda *a, **k: (peak, 1e9, "a test's peak"))
    monkeypatch.setattr("sys.argv", ["02_collectives.py", "--sizes_mib=0.07", "--iters=1",
                                     "--mm_m=64", "--mm_k=32", "--mm_f=64"])
    coll.main()
    out = capsys.readouterr().out
    n = 8
    rows = {line.split()[0]: line.split() for line in out.splitlines()
            if line.split() and line.split()[0] in ("all-gather", "reduce-scatter", "all-reduce")}
    for kind, blocks in (("all-gather", n - 1), ("reduce-scatter", (n - 1) / n),
                         ("all-reduce", 2 * (n - 1) / n)):
        assert float(rows[kind][3]) == pytest.approx(blocks * t * 1e3, abs=6e-4), kind
    block = 32 * 1024 * 2     # 0.07 MiB of bf16 rows of 1024: 35 rows, 32 to split into 8
    link = block / t
    M, K, F = 64, 32, 64
    t_mm = 2 * M * K * (F // n) / peak
    t_comm = (n - 1) * (M // n) * K * 2 / link
    preds = {"all-gather, then matmul (jit)": t_comm + t_mm,
             "collective matmul (ring)": max(t_comm, t_mm * (n - 1) / n) + t_mm / n}
    for name, pred in preds.items():
        row = next(line for line in out.splitlines() if line.startswith(name))
        cells = row[len(name):].split()
        assert float(cells[0]) == pytest.approx(pred * 1e3, abs=6e-4), name
        assert float(cells[2]) == pytest.approx(2 * M * K * F / n / t / 1e12, rel=1e-3)


def test_collective_matmul_refuses_shapes_that_do_not_multiply():
    with pytest.raises(common.UserError, match="do not multiply"):
        coll.collective_matmul(jnp.ones((8, 4)), jnp.ones((5, 8)), ring_mesh(8), "x")


def test_collectives_table_rates_the_fastest_variant_as_best(capsys):
    """best GB/s is the bytes sent over the fastest ring variant's time, and best/built the
    built-in's time over it: the variants at 4, 1 and 2 ms against a built-in at 2 ms."""
    sent = 7 * 2**20
    times = {"ring": 4e-3, "ring x2": 1e-3, "bidir x2": 2e-3}
    coll.print_collectives_table([("all-gather", 1.0, sent, None, times, 2e-3, 0.0)],
                                 list(times), "float32", 8, 2, None, False)
    row = next(ln.split() for ln in capsys.readouterr().out.splitlines()
               if ln.startswith("all-gather"))
    # collective, MiB/dev, sent MiB, pred ms, 3 variants' ms, built-in ms, best GB/s, built GB/s,
    # best/built, err
    assert row[4:8] == ["4.000", "1.000", "2.000", "2.000"]
    assert row[8:11] == ["7.3", "3.7", "2.00x"]   # 7 MiB = 7.34 MB in 1 ms; in 2 ms


def test_collective_matmul_sizes_past_the_memory_are_refused_with_their_bytes(monkeypatch):
    """The collective matmul holds x [M, K] and its gathered copy, w [K, F] and two [M, F]
    products: 2 (2MK + KF + 2MF) bytes in bf16, 0.201 GB at M=4096, K=2048, F=8192."""
    monkeypatch.setattr(common, "memory_limit", lambda *a: (1e8, "a test's memory"))
    monkeypatch.setattr("sys.argv", ["02_collectives.py", "--sizes_mib=0.0625", "--iters=1",
                                     "--mm_m=4096", "--mm_k=2048", "--mm_f=8192"])
    M, K, F = 4096, 2048, 8192
    assert f"{2 * (2 * M * K + K * F + 2 * M * F) / 1e9:.3g}" == "0.201"
    with pytest.raises(common.UserError, match=r"^mm_m=4096 mm_k=2048 mm_f=8192 needs 0.201 GB "
                       r"for the collective matmul's x \(and its gathered copy\), w and two "
                       r"products, more than the 0.1 GB of a test's memory"):
        coll.main()
