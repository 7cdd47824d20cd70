"""DP, FSDP, TP, TP with sequence parallelism and FSDP+TP on 8 simulated CPU devices: same
numbers as one device, and the collectives XLA emits against the predicted ones."""
import dataclasses
import functools
import math
import os
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import common

sh = common.import_script("03_sharding")

CFG = dataclasses.replace(common.Config.preset("tiny"), n_layers=2, max_seq_len=16)
B, T = 8, 16
SCHEMES = {"DP": "dp:8", "FSDP": "fsdp:8", "TP": "tp:2", "FSDP+TP": "fsdp:4,tp:2",
           "TP+SP": "tp:2", "DP+TP+SP": "dp:4,tp:2",
           "FSDP+TP+SP": "fsdp:4,tp:2"}  # +SP: sequence parallel


def numpy_params(cfg, seed):
    """Random params from common.param_specs, drawn by numpy: no random-number program to
    compile."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda s: (s.scale * rng.standard_normal(s.shape) + (s.init == "ones"))
                        .astype(np.float32), common.param_specs(cfg),
                        is_leaf=lambda s: isinstance(s, common.ParamSpec))


@functools.lru_cache(maxsize=None)
def reference():
    params = numpy_params(CFG, 0)
    tokens = jax.random.randint(jax.random.key(1), (B, T + 1), 0, CFG.vocab_size, jnp.int32)
    x, y = tokens[:, :-1], tokens[:, 1:]
    loss, grads = sh.compiled_model(CFG, common.make_mesh(common.parse_mesh("")), B, T)(params, x, y)
    return params, x, y, float(loss), grads


@functools.lru_cache(maxsize=None)
def sharded_run(scheme):
    """(loss, grads, per-layer collectives, outside collectives) of the compiled sharded model."""
    sizes = common.parse_mesh(SCHEMES[scheme])
    mesh = common.make_mesh(sizes)
    rules = sh.scheme_rules(mesh, B, scheme.endswith("+SP"))
    params, x, y = reference()[:3]
    compiled = sh.compiled_model(CFG, mesh, B, T, rules)
    tok = sh.sharding_of(mesh, ("batch", "seq"), rules)
    loss, grads = compiled(jax.device_put(params, common.param_shardings(CFG, mesh)),
                           jax.device_put(x, tok), jax.device_put(y, tok))
    loops, outside = sh.parse_collectives(compiled.as_text(), mesh.size)
    return float(loss), grads, loops, outside


def test_block_is_a_layer_of_common_forward():
    cfg = dataclasses.replace(CFG, n_layers=1)
    params = numpy_params(cfg, 3)
    tokens = jax.random.randint(jax.random.key(4), (2, T), 0, cfg.vocab_size, jnp.int32)

    @jax.jit
    def by_block(params, tokens):
        cos, sin = common.rope_cos_sin(jnp.broadcast_to(jnp.arange(T), (2, T)), cfg)
        x = params["embed"][tokens]
        x = sh.block(jax.tree.map(lambda a: a[0], params["layers"]), x, cos, sin, cfg)
        return common.rms_norm(x, params["final_norm"], cfg.norm_eps) @ params["lm_head"]

    want = jax.jit(common.forward, static_argnums=2)(params, tokens, cfg)
    np.testing.assert_allclose(np.asarray(by_block(params, tokens)), np.asarray(want),
                               rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_sharded_loss_and_grads_equal_unsharded(scheme):
    ref_loss, ref_grads = reference()[3:]
    loss, grads = sharded_run(scheme)[:2]
    assert abs(loss - ref_loss) <= 1e-5 * abs(ref_loss)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6,
                                   err_msg=jax.tree_util.keystr(path))


def reductions(summary):
    """CPU XLA writes a gradient reduce-scatter as an all-reduce and a slice: compare the
    reduced arrays whichever op carries them."""
    n = sum(summary.get(op, (0, 0))[0] for op in ("all-reduce", "reduce-scatter"))
    b = sum(summary.get(op, (0, 0))[1] for op in ("all-reduce", "reduce-scatter"))
    return n, b


@pytest.mark.parametrize("scheme", ["FSDP", "TP+SP"])
def test_block_collectives_match_prediction(scheme):
    sizes = common.parse_mesh(SCHEMES[scheme])
    mesh = common.make_mesh(sizes)
    sp = scheme.endswith("+SP")
    compiled = sh.compiled_block(CFG, mesh, B, T, sh.scheme_rules(mesh, B, sp))
    loops, outside = sh.parse_collectives(compiled.as_text(), mesh.size)
    assert loops == []
    got = sh.summarize(outside)
    want = sh.summarize(sh.predict_layer_collectives(CFG, sizes, B, T, 1, sp))
    assert got["all-gather"] == want["all-gather"]  # FSDP: once, the backward reuses the gather
    assert reductions(got) == reductions(want)
    assert set(got) <= {"all-gather", "all-reduce", "reduce-scatter"}


def test_sequence_parallel_with_fsdp_gathers_no_whole_activations():
    """With FSDP, a split of the rows over (fsdp, tp) made XLA replicate the activations for the
    weights' gradients: here 2.4x the predicted all-gather bytes (4.3x at lesson 03's sizes).
    The prediction is not exact with FSDP and TP together (below); the positions' split keeps
    within 2x of it (1.6x)."""
    sizes = common.parse_mesh(SCHEMES["FSDP+TP+SP"])
    mesh = common.make_mesh(sizes)
    compiled = sh.compiled_block(CFG, mesh, B, T, sh.scheme_rules(mesh, B, True))
    got = sh.summarize(sh.parse_collectives(compiled.as_text(), mesh.size)[1])
    want = sh.summarize(sh.predict_layer_collectives(CFG, sizes, B, T, 1, True))
    assert got["all-gather"][1] < 2 * want["all-gather"][1]


# FSDP+TP: the rules are not exact. +SP: no all-to-all either, which XLA adds to split
# attention's backward pass over the batch unless the attention output is pinned to its heads.
@pytest.mark.parametrize("scheme", ["DP", "FSDP", "TP", "TP+SP", "DP+TP+SP"])
def test_model_collectives_per_layer_match_prediction(scheme):
    sizes = common.parse_mesh(SCHEMES[scheme])
    loops = sharded_run(scheme)[2]
    got = {op: (n // CFG.n_layers, b // CFG.n_layers) for op, (n, b) in sh.summarize(loops).items()}
    want = sh.summarize(sh.predict_layer_collectives(CFG, sizes, B, T, 2, scheme.endswith("+SP")))
    assert got.get("all-gather") == want.get("all-gather")
    assert reductions(got) == reductions(want)
    assert set(got) <= {"all-gather", "all-reduce", "reduce-scatter"}


# The forms XLA prints: sync ops (CPU), start/done pairs whose start holds the operands and the
# groups and whose done holds the result (GPU), and async-start wrapping a computation; and a
# layer's op outside any loop, named .../while/body/... (a scan over layers that XLA unrolled).
HLO = """HloModule jit_step, entry_computation_layout={(f32[4,8]{1,0})->f32[4,8]{1,0}}

%add (x: f32[], y: f32[]) -> f32[] {
  %x = f32[] parameter(0)
  %y = f32[] parameter(1)
  ROOT %sum = f32[] add(%x, %y)
}

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  %ags = ((f32[1,8]{1,0}), f32[4,8]{1,0}) all-gather-start(%a), channel_id=1, """ \
    """replica_groups=[2,4]<=[8], dimensions={0}
  %agd = f32[4,8]{1,0} all-gather-done(%ags)
  %ar = (f32[4,8]{1,0}, bf16[8]{0}, f32[]) all-reduce(%a, %b, %c), channel_id=2, """ \
    """replica_groups={{0,1},{2,3},{4,5},{6,7}}, to_apply=%add
  ROOT %t = (s32[], f32[4,8]{1,0}) tuple(%i, %agd)
}

%cond (p: (s32[], f32[4,8])) -> pred[] {
  %p = (s32[], f32[4,8]{1,0}) parameter(0)
  ROOT %lt = pred[] compare(%i, %n), direction=LT
}

%wrapped (q: f32[8,8]) -> f32[4,8] {
  %q = f32[8,8]{1,0} parameter(0)
  ROOT %rs2 = f32[4,8]{1,0} reduce-scatter(%q), channel_id=5, replica_groups={{0,1}}, """ \
    """dimensions={0}, to_apply=%add
}

ENTRY %main (x: f32[4,8]) -> f32[4,8] {
  %x = f32[4,8]{1,0} parameter(0)
  %w = (s32[], f32[4,8]{1,0}) while(%init), condition=%cond, body=%body, """ \
    """backend_config={"known_trip_count":{"n":"3"}}
  %rs = f32[2,8]{1,0} reduce-scatter(%x), channel_id=3, """ \
    """replica_groups=mesh['axis_0'=2,'axis_1'=4] {'axis_0'}, dimensions={0}, to_apply=%add
  %ag2 = f32[8,8]{1,0} all-gather(%x), channel_id=6, replica_groups=mesh['axis_0'=4,""" \
    """'axis_1'=1,'axis_2'=2], device_ids=([2,4]T(1,0)) {'axis_0'}, dimensions={0}
  %cps = (f32[4,8]{1,0}, f32[4,8]{1,0}, u32[], u32[]) collective-permute-start(%x), """ \
    """channel_id=4, source_target_pairs={{0,1},{1,0}}
  %ar3 = f32[2,8]{1,0} all-reduce(%x), channel_id=7, replica_groups={{0,1,2,3},{4,5,6,7}}, """ \
    """to_apply=%add, metadata={op_name="jit(step)/while/body/psum"}
  %cpd = f32[4,8]{1,0} collective-permute-done(%cps)
  %as = ((f32[8,8]{1,0}), f32[4,8]{1,0}) async-start(%y), calls=%wrapped
  ROOT %ad = f32[4,8]{1,0} async-done(%as), calls=%wrapped
}
"""


def test_parse_collectives_reads_loops_groups_tuples_and_async_ops():
    loops, outside = sh.parse_collectives(HLO, 8)
    C = sh.Coll
    assert sorted(loops) == sorted([C("all-gather", 128, 4)] * 3 + [C("all-reduce", 128, 2)] * 3
                                   + [C("all-reduce", 16, 2)] * 3  # the scalar is left out
                                   + [C("all-reduce", 64, 4)])  # unrolled: named while/body
    assert sorted(outside) == sorted([C("reduce-scatter", 128, 2), C("reduce-scatter", 256, 2),
                                      C("collective-permute", 128, 8),
                                      C("all-gather", 256, 4)])  # devices named: axis_0's 4
    # Ring bytes per device: a gather or reduce-scatter sends (N-1)/N of the array, an
    # all-reduce twice that, a permute all of it.
    assert sh.ring_traffic(outside) == 64 + 128 + 128 + 256 * 3 / 4
    assert sh.ring_traffic(loops) == 3 * (128 * 3 / 4 + 2 * (128 + 16) / 2) + 2 * 64 * 3 / 4


def test_memory_per_device_divides_by_the_sharding():
    full = sh.memory_per_device(CFG, common.make_mesh(common.parse_mesh("")), B, T)
    fsdp = sh.memory_per_device(CFG, common.make_mesh(common.parse_mesh("fsdp:8")), B, T)
    dp = sh.memory_per_device(CFG, common.make_mesh(common.parse_mesh("dp:8")), B, T)
    n_params = CFG.param_count()
    assert full["params"] == full["grads"] == 4 * n_params and full["adam"] == 8 * n_params
    assert dp["params"] == full["params"]  # DP replicates the weights
    norms = (2 * CFG.n_layers + 1) * CFG.d_model  # no rule splits the norms' gains
    assert fsdp["params"] == 4 * ((n_params - norms) // 8 + norms)
    assert fsdp["activations"] == dp["activations"] < full["activations"]
    tp_mesh = common.make_mesh(common.parse_mesh("tp:2"))
    tp = sh.memory_per_device(CFG, tp_mesh, B, T)
    sp = sh.memory_per_device(CFG, tp_mesh, B, T, sequence_parallel=True)
    assert sp["params"] == tp["params"] and sp["activations"] < tp["activations"]


def test_bad_meshes_are_one_line_errors():
    with pytest.raises(common.UserError, match="needs 16 devices, but only 8 exist"):
        common.make_mesh(common.parse_mesh("dp:2,fsdp:4,tp:2"))
    with pytest.raises(common.UserError, match="does not divide"):  # 2 kv heads over 4
        common.param_shardings(CFG, common.make_mesh(common.parse_mesh("tp:4")))
    with pytest.raises(common.UserError, match="batch_size=6 does not split"):
        sh.check_batch(6, T, common.make_mesh(common.parse_mesh("fsdp:4")))
    with pytest.raises(common.UserError, match="divides neither the 3 rows"):
        sh.check_batch(6, 15, common.make_mesh(common.parse_mesh("dp:2,tp:2")), True)
    with pytest.raises(common.UserError, match="sequence_parallel needs a --mesh with tp > 1"):
        sh.ShardingConfig(mesh="dp:8", sequence_parallel=True)
    with pytest.raises(common.UserError, match="expected axes"):
        common.parse_mesh("pp:2")


def test_tp_past_the_devices_is_refused_and_one_that_does_not_divide_is_said():
    assert sh.check_tp(2, 1) == "" and sh.check_tp(2, 8) == ""   # one device: nothing to split
    assert "tp=3 does not divide the 8 devices" in sh.check_tp(3, 8)
    with pytest.raises(common.UserError, match="tp=16 exceeds the 8 devices"):
        sh.check_tp(16, 8)


def test_cli_reports_a_bad_mesh_in_one_line():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "03_sharding.py")
    out = subprocess.run([sys.executable, script, "--mesh=fsdp:16"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: mesh fsdp:16 needs 16 devices, but only 8 exist"
    out = subprocess.run([sys.executable, script, "--tp=16"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2 and out.stderr.strip() == "error: tp=16 exceeds the 8 devices"


def test_bench_plan_drops_an_sp_row_that_cannot_split(capsys):
    """The timed TP+SP row splits each group's positions over tp beside FSDP, else its rows or
    its positions, as the analysis checks: where they do not divide, the row is left out."""
    plan = sh.bench_plan(sh.ShardingConfig(bench_batch=4, bench_seq=63), jax.devices(), False)
    assert [name for name, *_ in plan[4]] == ["1 device", "fsdp:8", "fsdp:4,tp:2"]
    assert "splits the positions over tp=2" in capsys.readouterr().out
    two = jax.devices()[:2]   # tp:2 alone: rows or positions; 3 rows of 63 divide neither way
    plan = sh.bench_plan(sh.ShardingConfig(bench_batch=3, bench_seq=63), two, False)
    assert [name for name, *_ in plan[4]] == ["1 device", "fsdp:2", "tp:2"]
    assert "divides neither the 3 rows" in capsys.readouterr().out
    plan = sh.bench_plan(sh.ShardingConfig(bench_batch=4, bench_seq=63), two, False)
    assert [name for name, *_ in plan[4]] == ["1 device", "fsdp:2", "tp:2", "tp:2 SP"]


def test_bench_plan_defaults_on_cpu():
    preset, cfg, batch, seq, meshes = sh.bench_plan(sh.ShardingConfig(), jax.devices(), False)
    assert (preset, batch, seq) == ("tiny", 4, 64) and cfg == common.Config.preset("tiny")
    assert [(name, m.size) for name, _, _, m in meshes] == [
        ("1 device", 1), ("fsdp:8", 8), ("fsdp:4,tp:2", 8), ("fsdp:4,tp:2 SP", 8)]
    assert [sp for _, _, sp, _ in meshes] == [False, False, False, True]


def test_bench_plan_errors_name_the_benchmarks_own_mesh_and_preset(capsys):
    three = jax.devices()[:3]  # tiny's d_model=64 does not split 3 ways; small's 384 does
    with pytest.raises(common.UserError, match=r"^the benchmark's FSDP mesh fsdp:3 \(all 3 "
                       r"devices\) cannot split d_model=64 of preset tiny 3 ways: use "
                       r"--bench_preset=small, or fewer devices$"):
        sh.bench_plan(sh.ShardingConfig(bench_preset="tiny"), three, False)
    assert capsys.readouterr().out == ""
    # Left unset, the preset is the smallest that splits, and says so.
    assert sh.bench_plan(sh.ShardingConfig(), three, False)[0] == "small"
    assert capsys.readouterr().out == ("benchmark: tiny's d_model=64 does not split 3 ways; it "
                                       "takes preset small\n")
    with pytest.raises(common.UserError, match="^the benchmark's FSDP mesh fsdp:5 .* use fewer "
                       "devices$"):  # no preset splits 5 ways
        sh.bench_plan(sh.ShardingConfig(), jax.devices()[:5], False)
    with pytest.raises(common.UserError, match="^bench_seq=1000 exceeds max_seq_len=128 of the "
                       "benchmark's preset tiny"):
        sh.bench_plan(sh.ShardingConfig(bench_seq=1000), jax.devices(), False)
    # Left unset, the length is the device's default, at most the preset's max_seq_len.
    assert sh.bench_plan(sh.ShardingConfig(bench_preset="tiny"), jax.devices(), True)[3] == 128
    assert sh.bench_plan(sh.ShardingConfig(bench_preset="small"), jax.devices(), True)[3] == 512


def test_the_analysis_adapts_its_unset_model_and_batch_to_the_meshes():
    """tiny's d_model=64 does not split 3 or 6 ways: left unset, the analysis takes small,
    and its batch of 16 rounds up to a multiple of every scheme's dp*fsdp; flags the user set
    are kept, and refused where they do not split."""
    def meshes(n, tp=2):
        return [common.make_mesh(s, jax.devices()[:n]) for _, s, _ in sh.default_schemes(n, tp)]
    got = sh.analysis_model(sh.ShardingConfig(), meshes(8), False)
    assert got[0] == "tiny" and got[2] == 16 and got[3] == ""
    got = sh.analysis_model(sh.ShardingConfig(), meshes(6), False)
    assert got[0] == "small" and got[1] == common.Config.preset("small") and got[2] == 18
    assert got[3] == " (tiny's weights do not split over fsdp:6)"
    assert sh.analysis_model(sh.ShardingConfig(batch_size=12), meshes(6), False)[2] == 12
    assert sh.analysis_model(sh.ShardingConfig(), meshes(6), True)[:3:2] == ("small", 18)
    with pytest.raises(common.UserError, match="splits embed=64 of"):
        sh.analysis_model(sh.ShardingConfig(preset="tiny"), meshes(6), False)
    with pytest.raises(common.UserError, match="^no preset splits over these meshes \\(tiny: "
                       ".*embed=64 .*; small: .*embed=384 .*\\): use another --tp, --mesh or "
                       "number of devices$"):  # no preset splits 5 ways
        sh.analysis_model(sh.ShardingConfig(), meshes(5), False)


def test_cli_refuses_the_benchmark_mesh_before_the_analysis():
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                          "03_sharding.py")
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=3")
    out = subprocess.run([sys.executable, script, "--mesh=dp:3", "--batch_size=3",
                          "--bench_preset=tiny"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().startswith("error: the benchmark's FSDP mesh fsdp:3 (all 3 devices)")
    assert "w_up" not in out.stdout  # the analysis never started


def test_config_refuses_zero_sizes_and_unknown_presets():
    for field in ("seq_len", "tp", "bench_iters"):
        with pytest.raises(common.UserError, match=f"{field} must be >= 1"):
            sh.ShardingConfig(**{field: 0})
    with pytest.raises(common.UserError, match="unknown preset 'nope'"):
        sh.ShardingConfig(preset="nope")
    with pytest.raises(common.UserError, match="unknown bench_preset 'nope'"):
        sh.ShardingConfig(bench_preset="nope")


def test_tp_on_all_the_devices_is_allowed_and_gives_tp_schemes_without_fsdp_tp():
    assert sh.check_tp(8, 8) == "" and sh.check_tp(2, 2) == ""
    names = [name for name, *_ in sh.default_schemes(2, 2)]
    assert names == ["DP", "FSDP", "TP", "TP+SP"]  # fsdp:1,tp:2 would only repeat TP
    names = [name for name, *_ in sh.default_schemes(8, 2)]
    assert names == ["DP", "FSDP", "TP", "TP+SP", "FSDP+TP"]


def test_memory_per_device_tp_splits_heads_mlp_probs_and_logits_sp_the_norms():
    one, tp = (common.make_mesh(common.parse_mesh(m)) for m in ("", "tp:2"))
    full = sh.memory_per_device(CFG, one, B, T)["activations"]
    half = sh.memory_per_device(CFG, tp, B, T)["activations"]
    sp = sh.memory_per_device(CFG, tp, B, T, sequence_parallel=True)["activations"]
    c = CFG  # float32: 4 bytes everywhere
    split = (c.n_layers * B * T * 4 * ((2 * c.n_heads + 2 * c.n_kv_heads) * c.head_dim  # q k v o
                                       + c.n_heads * T + 3 * c.d_ff)  # probs; gate, up, gate*up
             + 2 * B * T * c.vocab_size * 4)  # logits (vocab splits over tp)
    assert full - half == split // 2
    # SP: each layer's input, middle and two normalized float32 inputs on half the tokens
    assert half - sp == c.n_layers * B * T * 2 * c.d_model * (4 + 4) // 2


def test_memory_per_device_grads_are_in_the_param_dtype():
    cfg = dataclasses.replace(CFG, dtype="bfloat16")  # float32 params, bf16 compute
    mem = sh.memory_per_device(cfg, common.make_mesh(common.parse_mesh("")), B, T)
    assert mem["params"] == mem["grads"] == 4 * cfg.param_count()
    bf = dataclasses.replace(CFG, param_dtype="bfloat16", dtype="bfloat16")  # Adam's moments stay
    mem = sh.memory_per_device(bf, common.make_mesh(common.parse_mesh("")), B, T)   # float32
    assert mem["params"] == 2 * bf.param_count() and mem["adam"] == 8 * bf.param_count()


def test_predicted_collectives_move_the_compute_dtype():
    """float32 params, bf16 compute: the weights are gathered and their gradients reduced in
    bf16, half float32's bytes (what XLA compiles for GPUs)."""
    bf = dataclasses.replace(CFG, dtype="bfloat16")
    sizes = common.parse_mesh("dp:2,fsdp:4")
    f32 = sh.summarize(sh.predict_layer_collectives(CFG, sizes, B, T, 1))
    b16 = sh.summarize(sh.predict_layer_collectives(bf, sizes, B, T, 1))
    assert set(b16) == set(f32) == {"all-gather", "reduce-scatter", "all-reduce"}
    for op in f32:
        assert b16[op][0] == f32[op][0] and 2 * b16[op][1] == f32[op][1]


def test_block_collectives_match_prediction_dp_with_fsdp():
    """dp x fsdp: DP all-reduces what FSDP's reduce-scatter left of each gradient (1/fsdp)."""
    sizes = common.parse_mesh("dp:2,fsdp:4")
    mesh = common.make_mesh(sizes)
    compiled = sh.compiled_block(CFG, mesh, B, T)
    got = sh.summarize(sh.parse_collectives(compiled.as_text(), mesh.size)[1])
    want = sh.summarize(sh.predict_layer_collectives(CFG, sizes, B, T, 1))
    assert got["all-gather"] == want["all-gather"]
    assert reductions(got) == reductions(want)


def test_model_collectives_per_layer_match_prediction_fsdp_tp():
    """At the test's sizes, FSDP+TP's per-layer collectives in the model match the rules too:
    gathers of each weight's tp slice, activation reductions of each fsdp group's rows."""
    loops = sharded_run("FSDP+TP")[2]
    got = {op: (n // CFG.n_layers, b // CFG.n_layers) for op, (n, b) in sh.summarize(loops).items()}
    want = sh.summarize(sh.predict_layer_collectives(CFG, common.parse_mesh(SCHEMES["FSDP+TP"]),
                                                     B, T, 2))
    assert got.get("all-gather") == want.get("all-gather")
    assert reductions(got) == reductions(want)


def test_adam_update_matches_numpy():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((3, 4)).astype(np.float32)
    params = {"w": jnp.asarray(w)}
    opt = {"mu": {"w": jnp.zeros((3, 4))}, "nu": {"w": jnp.zeros((3, 4))},
           "count": jnp.zeros((), jnp.int32)}
    want, m, v = w.astype(np.float64), 0.0, 0.0
    for t in (1, 2, 3):
        g = rng.standard_normal((3, 4)).astype(np.float32)
        params, opt = sh.adam_update(params, {"w": jnp.asarray(g)}, opt, lr=0.1)
        m, v = 0.9 * m + 0.1 * g, 0.95 * v + 0.05 * g.astype(np.float64) ** 2
        want = want - 0.1 * (m / (1 - 0.9 ** t)) / (np.sqrt(v / (1 - 0.95 ** t)) + 1e-8)
    np.testing.assert_allclose(np.asarray(params["w"]), want, rtol=1e-5, atol=1e-6)
    assert int(opt["count"]) == 3


def test_the_benchmark_model_is_checked_at_its_own_training_state(monkeypatch, capsys):
    """03's step keeps a preset's bf16 weights and grads beside two float32 moments: 12 bytes a
    parameter, not the 16 of float32 weights."""
    monkeypatch.setattr(common, "memory_limit", lambda *a: (50e9, "a test's memory"))
    monkeypatch.setattr(sys, "argv", ["03_sharding.py", "--bench_preset=llama-3-8b"])
    n = common.Config.preset("llama-3-8b").param_count()
    with pytest.raises(common.UserError, match="bench_preset=llama-3-8b needs ") as e:
        sh.main()
    assert f"{12 * n / 1e9:,.3g} GB for bfloat16 weights and gradients and Adam's" in str(e.value)


@pytest.mark.parametrize("per_device", [False, True])
def test_benchmark_bounds_are_the_steps_flops_at_peak_and_its_traffic_at_the_link(
        monkeypatch, capsys, per_device):
    """peak ms: train_flops_per_token x the step's tokens over the peak of the row's devices,
    which a CPU's host reaches once (its simulated devices share it), an accelerator once per
    device (per_device). comm ms: FSDP gathers every weight twice and reduce-scatters every
    gradient, 3 x the params in the compute dtype (a 1/t share of them under TP), sending
    (f-1)/f of each on a ring, plus TP's activation reductions, at the link's bandwidth."""
    peak, link = 1e10, 1e7
    monkeypatch.setattr(sh, "time_training", lambda *a, **k: (0.5, 0.1, 3.0))
    monkeypatch.setattr(common, "ceilings", lambda *a, **k: (peak, 1e9, "a test's peak"))
    monkeypatch.setattr(common, "device_chip",
                        lambda *a: types.SimpleNamespace(link_bw=link, name="a test chip"))
    if per_device:  # as on GPUs
        monkeypatch.setattr(common, "peak_units", lambda devices: len(devices))
    run = sh.ShardingConfig()
    plan = sh.bench_plan(run, jax.devices(), False)
    sh.bench_training(run, plan, 8, False)
    out = capsys.readouterr().out
    _, cfg, bb, bt, meshes = plan
    assert [m[0] for m in meshes] == ["1 device", "fsdp:8", "fsdp:4,tp:2", "fsdp:4,tp:2 SP"]
    n_params, db = cfg.param_count(), jnp.dtype(cfg.dtype).itemsize
    for name, sizes, sp, _ in meshes:
        # mesh, devices, batch, compile s, step ms, peak ms, comm ms, ...
        cells = next(ln[16:].split() for ln in out.splitlines() if ln.startswith(f"{name:<16}"))
        nd, f, t = math.prod(sizes.values()), sizes["fsdp"], sizes["tp"]
        batch = bb * sizes["dp"] * f
        assert cells[:2] == [str(nd), str(batch)]
        t_peak = cfg.train_flops_per_token(bt) * batch * bt / ((nd if per_device else 1) * peak)
        assert float(cells[4]) == pytest.approx(t_peak * 1e3, abs=0.051), name
        comm = 3 * db * n_params / t * (f - 1) / f
        if t > 1:
            acts = sh.predict_layer_collectives(cfg, {"dp": 1, "fsdp": 1, "tp": t}, batch // f,
                                                bt, 2, sp)
            comm += cfg.n_layers * sh.ring_traffic(acts)
        assert float(cells[5]) == pytest.approx(comm / link * 1e3, abs=0.051), name
