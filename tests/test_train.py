"""09_train.py: it learns; every mesh takes the same steps as one device; resume is exact; two
processes equal one; AdamW equals a numpy AdamW; bad input is one line."""
import dataclasses
import json
import math
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import types

import jax
import numpy as np
import pytest

import common

train_mod = common.import_script("09_train")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_run(tmp_path, **kw):
    # The layer loop compiles faster on a CPU; test_loss_decreases runs the unrolled default.
    base = dict(preset="tiny", steps=4, batch_size=8, seq_len=32, warmup=2, log_every=1,
                eval_every=100, eval_batches=1, sample_len=0, ckpt_every=0, scan_layers=True,
                data=os.path.join(ROOT, "common.py"), out_dir=str(tmp_path / "out"))
    return train_mod.TrainConfig(**dict(base, **kw))


def losses(history):
    return [r["loss"] for r in history if "loss" in r]


def test_loss_decreases(tmp_path):
    """It learns; the last step's validation loss is the mean of its --eval_batches batches'."""
    tc = tiny_run(tmp_path, steps=20, lr=1e-2, scan_layers=False, eval_batches=3)
    hist, params, cfg = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    ls = losses(hist)
    assert ls[-1] < ls[0] - 1.0, ls
    _, (val, _) = train_mod.load_data(tc, cfg, common.BYTES, log=lambda s: None)
    loss = jax.jit(lambda x, y: common.cross_entropy(common.forward(params, x, cfg), y))
    each = [float(loss(*common.get_batch(val, i, 8, 32, tc.seed + 1))) for i in range(3)]
    assert hist[-1]["val_loss"] == pytest.approx(np.mean(each), rel=1e-5)
    assert max(each) - min(each) > 1e-3, each  # three batches, not one three times


@pytest.fixture(scope="module")
def one_device_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("one")


@pytest.fixture(scope="module")
def one_device_run(one_device_dir):
    """The history of 4 steps on one device, its last step saved in one_device_dir/out."""
    tc = tiny_run(one_device_dir, batch_size=16, ckpt_every=4)
    return train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])[0]


@pytest.mark.parametrize("mesh,sp", [("fsdp:8", False), ("dp:2,fsdp:2,tp:2", False),
                                     ("dp:2,fsdp:2,tp:2", True)])
def test_sharded_steps_equal_single_device(tmp_path, mesh, sp, one_device_run):
    """Same losses and gradient norms on 8 devices, with 2 micro-batches, as on one device with
    one batch: sharding and accumulation change where and in what order, not what."""
    got, _, _ = train_mod.train(tiny_run(tmp_path, batch_size=16, mesh=mesh, grad_accum=2,
                                         sequence_parallel=sp), log=lambda s: None)
    np.testing.assert_allclose(losses(got), losses(one_device_run), rtol=2e-5)
    np.testing.assert_allclose([r["grad_norm"] for r in got],
                               [r["grad_norm"] for r in one_device_run], rtol=1e-4)
    # 16 x 32 tokens a step; the 8 simulated devices share the host, whose measured peak is the
    # MFU's basis once
    flops = train_mod.model_config(tiny_run(tmp_path)).train_flops_per_token(32)
    peak = common.ceilings("float32")[0]
    for r in got:
        assert r["tokens_per_s"] == pytest.approx(16 * 32 / (r["ms_per_step"] / 1e3), rel=1e-6)
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * flops / peak, rel=1e-6)


def test_a_row_times_the_steps_since_the_last_row(tmp_path, monkeypatch):
    """ms per step is the time since the last row over the steps it spans: under a clock that
    moves one second as each step's batch is read, logging every third step, every row says
    1000 ms and one batch of tokens a second."""
    now, read = [0.0], common.get_batch

    def batch_and_tick(*a, **k):
        now[0] += 1.0
        return read(*a, **k)
    monkeypatch.setattr(common, "get_batch", batch_and_tick)
    monkeypatch.setattr(train_mod, "BATCHES_AHEAD", 0)  # each batch read in the loop, in turn
    monkeypatch.setattr(train_mod, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    hist, _, _ = train_mod.train(tiny_run(tmp_path, log_every=3), log=lambda s: None,
                                 devices=jax.devices()[:1])
    assert [r["step"] for r in hist] == [1, 3, 4]  # the first, every third, the last
    for r in hist:
        assert (r["ms_per_step"], r["tokens_per_s"]) == pytest.approx((1000, 8 * 32), rel=1e-6)


def test_not_utf8_counts_bad_bytes_but_not_a_character_cut_at_either_end():
    text = "aé€😀b".encode()  # characters of 1, 2, 3 and 4 bytes
    for cut in range(len(text) + 1):
        assert train_mod.not_utf8(text[:cut]) == train_mod.not_utf8(text[cut:]) == 0, cut
    assert train_mod.not_utf8(b"ab\xffcd") == 1 and train_mod.not_utf8(b"abc\xff") == 1
    assert train_mod.not_utf8(b"\x80" + text) == 0 and train_mod.not_utf8(b"\x80" * 4) == 1
    assert train_mod.not_utf8(b"\xe2\x82x") == 2  # a character cut inside the data is bad


@pytest.mark.parametrize("ahead", [0, 1, 2, 5])
def test_batches_built_ahead_come_in_order_and_stop_with_the_loop(ahead):
    """prefetched gives make(step) for every step in order, builds no more than `ahead` of them
    before they are taken, hands on an error raised while building, and a loop that stops early
    leaves no batch being built."""
    built, taken = [], []

    def make(step):
        built.append(step)
        if step == 7:
            raise common.UserError("step 7")
        return step * 10
    with train_mod.prefetched(make, range(3, 9), ahead) as batches:
        for step, b in zip(range(3, 9), batches):
            assert b == step * 10 and len(built) <= len(taken) + 1 + ahead
            taken.append(step)
            if step == 6:
                with pytest.raises(common.UserError, match="step 7"):
                    next(batches)
                break
    assert taken == [3, 4, 5, 6]
    before = len(built)
    with train_mod.prefetched(make, range(0, 100), ahead) as batches:
        assert next(batches) == 0
    n = len(built)
    time.sleep(0.05)
    assert len(built) == n <= before + 1 + ahead  # and nothing built after the loop left
    busy = []

    def slow(step):
        busy.append(step)
        time.sleep(0.05)
        busy.remove(step)
        return step
    with train_mod.prefetched(slow, range(10), ahead) as batches:
        assert next(batches) == 0
    assert busy == []  # a batch begun on the thread is finished before the loop goes on


def test_sequence_parallel_splits_the_rows_of_a_micro_batch():
    """The rows each dp x fsdp group holds in one micro-batch: 16 over 4 groups in 4 micro-batches
    is 1, too few to split over tp = 2, so the positions are split; 31 positions cannot be."""
    tc = train_mod.TrainConfig(preset="tiny", mesh="dp:4,tp:2", sequence_parallel=True,
                               batch_size=16, grad_accum=4, seq_len=32)
    assert tc.sequence_parallel_rows() == 1
    with pytest.raises(common.UserError, match="divides neither the 1 rows"):
        dataclasses.replace(tc, seq_len=31)


@pytest.mark.parametrize("batch", [8, 4])  # 2 rows per dp group: rows split; 1: positions
def test_sequence_parallel_splits_the_residual_stream(batch):
    """Under tp without FSDP no weight is gathered, so an all-gather in the compiled loss and
    gradient is the residual stream's tokens gathered before a tensor-parallel matmul: there
    under sequence parallelism, absent without it; and the loss and gradients stay the same."""
    cfg, mesh = common.PRESETS["tiny"], common.make_mesh(common.parse_mesh("dp:4,tp:2"))
    params = common.init_params(cfg, jax.random.key(0))
    x = np.random.default_rng(0).integers(0, cfg.vocab_size, (batch, 32), np.int32)
    gathers, results = [], []
    for sp in (False, True):
        tc = train_mod.TrainConfig(preset="tiny", seq_len=32, batch_size=batch, mesh="dp:4,tp:2",
                                   sequence_parallel=sp)
        step = jax.jit(jax.value_and_grad(
            train_mod.make_loss_fn(cfg, tc, mesh, common.attention_reference)))
        gathers.append(step.lower(params, x, x).compile().as_text().count(" all-gather("))
        results.append(step(params, x, x))
    assert gathers[0] == 0 and gathers[1] > 0, gathers
    for a, b in zip(jax.tree.leaves(results[0]), jax.tree.leaves(results[1])):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_remat_reaches_the_training_loss():
    """--remat=full makes the training loss's compiled backward pass keep each layer's input
    only: far fewer bytes of temporaries than --remat=none's (test_common measures the forward's
    remat alone)."""
    cfg, mesh = common.PRESETS["tiny"], train_mod.make_mesh("dp:1", jax.devices()[:1])
    params = common.init_params(cfg, jax.random.key(0))
    x, temp = np.zeros((8, 32), np.int32), {}
    for remat in ("none", "full"):
        tc = train_mod.TrainConfig(preset="tiny", seq_len=32, batch_size=8, remat=remat,
                                   scan_layers=True)
        grad = jax.jit(jax.grad(train_mod.make_loss_fn(cfg, tc, mesh, common.attention_reference)))
        temp[remat] = grad.lower(params, x, x).compile().memory_analysis().temp_size_in_bytes
    assert temp["full"] < 0.75 * temp["none"], temp


def test_pallas_attention_takes_the_same_steps(tmp_path, one_device_run):
    """Lesson 08's kernel (interpreted here, run per device under a dp x tp mesh): the same
    losses as the default attention, to float32 rounding."""
    got, _, _ = train_mod.train(tiny_run(tmp_path, batch_size=16, steps=2, attention="pallas",
                                         mesh="dp:2,tp:2"), log=lambda s: None,
                                devices=jax.devices()[:4])
    np.testing.assert_allclose(losses(got), losses(one_device_run)[:2], rtol=2e-5)


@pytest.mark.parametrize("attention,mesh", [("naive", "dp:1"), ("flash", "dp:1"),
                                            ("pallas", "dp:2,tp:2")])
def test_doc_mask_keeps_attention_within_each_document(attention, mesh):
    """With segment ids a packed row's loss is its documents' losses, each run alone (RoPE sees
    only offsets, so a document's positions need not restart), and not the row's as one text."""
    cfg = common.PRESETS["tiny"]
    devices = jax.devices()[:math.prod(common.parse_mesh(mesh).values())]
    tc = train_mod.TrainConfig(preset="tiny", seq_len=32, batch_size=4, mesh=mesh)
    mesh = train_mod.make_mesh(mesh, devices)
    loss_fn = jax.jit(train_mod.make_loss_fn(cfg, tc, mesh, train_mod.attention_fn(attention,
                                                                                   mesh)))
    params = common.init_params(cfg, jax.random.key(0))
    rows = np.random.default_rng(0).integers(0, cfg.vocab_size, (4, 33), np.int32)
    x, y = rows[:, :-1], rows[:, 1:]
    docs = ((0, 7), (7, 22), (22, 32))
    seg = np.broadcast_to(np.repeat(np.arange(3, dtype=np.int32), [b - a for a, b in docs]),
                          x.shape)
    alone = sum((b - a) * common.cross_entropy(common.forward(params, x[:, a:b], cfg), y[:, a:b])
                for a, b in docs) / 32
    np.testing.assert_allclose(loss_fn(params, x, y, seg), alone, rtol=2e-6)
    assert abs(loss_fn(params, x, y) - alone) > 1e-3


def test_doc_mask_trains_on_documents(tmp_path):
    """--doc_mask through a run: each file of the data a document, said in the log, and the
    first loss is not the unmasked run's (the windows span files)."""
    text = open(common.__file__).read()
    (tmp_path / "docs").mkdir()
    for i in range(40):
        (tmp_path / "docs" / f"{i:02d}.py").write_text(text[i * 150:(i + 1) * 150])
    (_, edges), _ = common.load_corpus(str(tmp_path / "docs"), edges=True)
    first = {}
    for mask in (False, True):
        logged = []
        tc = tiny_run(tmp_path / str(mask), data=str(tmp_path / "docs"), steps=2, doc_mask=mask)
        first[mask] = losses(train_mod.train(tc, log=logged.append,
                                             devices=jax.devices()[:1])[0])[0]
        said = f"attention kept within each of the {len(edges) - 1} train documents"
        assert any(said in line for line in logged) == mask
    assert np.isfinite(first[True]) and abs(first[True] - first[False]) > 1e-4, first


def test_resume_is_exact(tmp_path):
    tc = tiny_run(tmp_path, steps=6, ckpt_every=2)
    full, _, _ = train_mod.train(dataclasses.replace(tc, out_dir=str(tmp_path / "full")),
                                 log=lambda s: None, devices=jax.devices()[:1])
    first, _, _ = train_mod.train(tc, stop_after=3, log=lambda s: None, devices=jax.devices()[:1])
    assert [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)] == \
        ["ckpt_00000002", "ckpt_00000003"]
    rest, _, _ = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert [r["step"] for r in rest] == [4, 5, 6]
    assert losses(first) + losses(rest) == losses(full)  # bit for bit
    rows = [json.loads(line) for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    assert {"step", "loss", "lr", "tokens_per_s", "mfu"} <= set(rows[0])
    # step n trained at the schedule's rate for n (lr_schedule(n - 1)), warmup included
    assert [r["lr"] for r in full] == pytest.approx(
        [float(train_mod.lr_schedule(n - 1, tc)) for n in range(1, 7)], rel=1e-6)
    # As if killed after step 6 was logged but before its checkpoint was written: the rerun
    # trains steps 5 and 6 again from step 4's, and the file keeps one row per step.
    shutil.rmtree(os.path.join(tc.out_dir, "ckpt_00000006"))
    again, _, _ = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert [r["step"] for r in again] == [5, 6] and losses(again) == losses(full)[4:]
    rows = [json.loads(line) for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    logged = []  # once more: at steps=6 already, so nothing is compiled or trained
    assert train_mod.train(tc, log=logged.append, devices=jax.devices()[:1])[0] == []
    assert any("nothing to train" in s for s in logged)
    assert not any("compiled the train step" in s for s in logged)


def test_resuming_with_another_batch_says_so(tmp_path, capsys):
    """A smaller batch after running out of memory is allowed, but the run is then not the
    uninterrupted one: the resume says so, and says nothing where the batch is the same."""
    tc = tiny_run(tmp_path, steps=2, ckpt_every=1)
    train_mod.train(dataclasses.replace(tc, steps=1), log=lambda s: None,
                    devices=jax.devices()[:1])
    train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert "note: resuming" not in capsys.readouterr().out
    train_mod.train(dataclasses.replace(tc, steps=3, batch_size=4), log=lambda s: None,
                    devices=jax.devices()[:1])
    assert "note: resuming with batch_size=4 (the checkpoint's steps ran at 8)" in \
        capsys.readouterr().out
    train_mod.train(dataclasses.replace(tc, steps=4, batch_size=4, doc_mask=True),
                    log=lambda s: None, devices=jax.devices()[:1])
    assert "note: resuming with doc_mask=True (the checkpoint's steps ran at False)" in \
        capsys.readouterr().out
    train_mod.train(dataclasses.replace(tc, steps=5, batch_size=4, doc_mask=True, lr=0.5),
                    log=lambda s: None, devices=jax.devices()[:1])
    assert "lr=0.5 (the checkpoint's steps ran at 0.006), min_lr=0.05 (the checkpoint's steps " \
        "ran at 0.0006)" in capsys.readouterr().out
    train_mod.train(dataclasses.replace(tc, steps=6, batch_size=4, doc_mask=True, lr=0.5,
                                        warmup=1, grad_clip=0.5, fp8=True), log=lambda s: None,
                    devices=jax.devices()[:1])
    assert "warmup=1 (the checkpoint's steps ran at 2), grad_clip=0.5 (the checkpoint's steps " \
        "ran at 1), fp8=current (the checkpoint's steps ran at False)" in capsys.readouterr().out


def test_resuming_on_other_data_says_so(tmp_path, capsys):
    """The checkpoint records a fingerprint of the data its steps read; a resume on other data
    (an edited file, another Python's standard library) is said, naming both."""
    data = tmp_path / "data.txt"
    data.write_bytes(open(os.path.join(ROOT, "common.py"), "rb").read())
    tc = tiny_run(tmp_path, steps=1, ckpt_every=1, data=str(data))
    train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    before = common.corpus_id(*common.load_corpus(str(data)))
    data.write_bytes(data.read_bytes()[:-1000])
    after = common.corpus_id(*common.load_corpus(str(data)))
    train_mod.train(dataclasses.replace(tc, steps=2), log=lambda s: None,
                    devices=jax.devices()[:1])
    assert (f"note: resuming with data of {after} (the checkpoint's steps read {before})"
            in capsys.readouterr().out)
    # a checkpoint from before fingerprints were recorded resumes without a note
    path = common.list_checkpoints(tc.out_dir)[-1]
    meta = json.load(open(os.path.join(path, "meta.json")))
    del meta["data"]
    json.dump(meta, open(os.path.join(path, "meta.json"), "w"))
    train_mod.train(dataclasses.replace(tc, steps=3), log=lambda s: None,
                    devices=jax.devices()[:1])
    out = capsys.readouterr().out
    assert "resumed from" in out and "note:" not in out


def test_resume_on_another_mesh(tmp_path, one_device_run):
    """A checkpoint holds whole arrays, so a run saved on one device resumes on 8 (each array
    placed as that mesh's rules say) and goes back to one, taking the same steps throughout."""
    tc = tiny_run(tmp_path, batch_size=16, ckpt_every=2)
    one = dict(log=lambda s: None, devices=jax.devices()[:1])
    first, _, _ = train_mod.train(tc, stop_after=2, **one)
    mesh_tc = dataclasses.replace(tc, mesh="dp:2,fsdp:2,tp:2")
    middle, params, cfg = train_mod.train(mesh_tc, stop_after=3, log=lambda s: None)
    want = common.param_shardings(cfg, train_mod.make_mesh(mesh_tc.mesh, jax.devices()))
    placed = jax.tree.map(lambda a, s: a.sharding.is_equivalent_to(s, a.ndim), params, want)
    assert all(jax.tree.leaves(placed)), placed
    last, _, _ = train_mod.train(tc, **one)
    assert [r["step"] for r in middle + last] == [3, 4]
    np.testing.assert_allclose(losses(first + middle + last), losses(one_device_run), rtol=2e-5)


def test_interrupted_save_keeps_previous_checkpoint(tmp_path, monkeypatch):
    tc = tiny_run(tmp_path, steps=4, ckpt_every=2)
    train_mod.train(tc, stop_after=2, log=lambda s: None, devices=jax.devices()[:1])

    def crash(fd, data, at):
        if at > 0:  # the header written, the arrays not
            raise KeyboardInterrupt
        return write(fd, data, at)
    write = os.pwrite
    monkeypatch.setattr(common.os, "pwrite", crash)  # dies halfway through writing step 4
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    # From the command line, the interrupt names what is kept (common.run prints it as one line)
    monkeypatch.setattr(common, "parse_flags", lambda _: tc)
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda tc: real_train(
        tc, log=lambda s: None, devices=jax.devices()[:1]))
    with pytest.raises(KeyboardInterrupt, match="keeps ckpt_00000002: the same command resumes"):
        train_mod.main()
    monkeypatch.undo()
    assert [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)] == ["ckpt_00000002"]
    rest, _, _ = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert [r["step"] for r in rest] == [3, 4]


def test_a_signal_after_the_last_step_says_the_training_is_done(tmp_path, monkeypatch):
    """A Ctrl-C during the last validation stops the command before its plot and export; the
    message says that no step is left, not that the run will resume."""
    tc = tiny_run(tmp_path, steps=2, ckpt_every=100, eval_every=100)
    monkeypatch.setattr(common, "parse_flags", lambda _: tc)

    def ctrl_c_at_the_last_step(line):
        if line.startswith("step     2 | loss"):  # logged after the step's flag was read
            os.kill(os.getpid(), signal.SIGINT)
    real_train = train_mod.train
    monkeypatch.setattr(train_mod, "train", lambda tc: real_train(
        tc, log=ctrl_c_at_the_last_step, devices=jax.devices()[:1]))
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt, match="^every step trained: .* keeps ckpt_00000002, "
                           "the last; the same command does what came after training"):
            train_mod.main()
    finally:
        signal.signal(signal.SIGINT, before)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_saves_the_step_in_flight_and_the_run_resumes_from_it(tmp_path, one_device_run,
                                                                      sig, capfd):
    """The first Ctrl-C or SIGTERM (a scheduler's notice) lets the step in flight end and saves
    it, though no checkpoint was due for 100 steps; the rerun then takes the uninterrupted run's
    steps from there. (Here it comes while step 2 is logged, so step 3 is the one in flight.)"""
    tc = tiny_run(tmp_path, batch_size=16, ckpt_every=100)
    # A shell's background job starts with SIGINT ignored; Python's own handlers are what a
    # terminal gives, and what the run must hand back.
    handlers = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}
    before = {s: signal.signal(s, h) for s, h in handlers.items()}
    try:
        _signal_saves_and_resumes(tc, one_device_run, sig, handlers)
        name = "Ctrl-C" if sig == signal.SIGINT else "SIGTERM"
        assert f"{name}: stopping after the current step, and saving it" in \
            capfd.readouterr().err
        with train_mod.stop_after_the_step(saving=False):  # --ckpt_every=0 says so
            os.kill(os.getpid(), sig)
        assert "step (--ckpt_every=0: nothing is saved)" in capfd.readouterr().err
        signal.signal(sig, signal.SIG_IGN)
        with train_mod.stop_after_the_step():      # a job that ignores the signal goes on so
            assert signal.getsignal(sig) is signal.SIG_IGN
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def _signal_saves_and_resumes(tc, one_device_run, sig, handlers):
    def signal_at_step_2(line):
        if line.startswith("step     2 |"):
            os.kill(os.getpid(), sig)
    with pytest.raises(KeyboardInterrupt):
        train_mod.train(tc, log=signal_at_step_2, devices=jax.devices()[:1])
    assert [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)] == ["ckpt_00000003"]
    assert {s: signal.getsignal(s) for s in handlers} == handlers  # given back
    with train_mod.stop_after_the_step() as asked:  # a second signal stops at once
        os.kill(os.getpid(), sig)
        assert asked == [True]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert {s: signal.getsignal(s) for s in handlers} == handlers
    rest, _, _ = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert [r["step"] for r in rest] == [4]
    np.testing.assert_allclose(losses(rest), losses(one_device_run)[3:], rtol=2e-5)


def test_ctrl_c_among_several_processes_is_passed_on_as_sigterm(capfd):
    """With peers, the first Ctrl-C is sent on as SIGTERM, to JAX's preemption service (here a
    handler stands in for it, and stays in place), and the flag stays unset: a process must not
    stop at a step its peers do not."""
    got = []
    before = {s: signal.signal(s, h) for s, h in ((signal.SIGINT, signal.default_int_handler),
                                                  (signal.SIGTERM, lambda *a: got.append(a[0])))}
    try:
        with train_mod.stop_after_the_step(peers=True) as asked:
            os.kill(os.getpid(), signal.SIGINT)
            assert asked == [False] and got == [signal.SIGTERM]
        assert "Ctrl-C, taken as SIGTERM: every process saves" in capfd.readouterr().err
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_signal_during_validation_leaves_it_off(tmp_path, capfd):
    """A stop asked for while the validation batches run ends them there (a long validation
    would hold back the step after it, and its save): the next step is saved, and the run stops
    with no loss row for the unfinished validation."""
    tc = tiny_run(tmp_path, steps=6, ckpt_every=100, eval_every=2, eval_batches=50)
    logged = []

    def ctrl_c_before_validation(line):
        logged.append(line)
        if line.startswith("step     2 | loss"):  # logged just before step 2's validation
            os.kill(os.getpid(), signal.SIGINT)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            train_mod.train(tc, log=ctrl_c_before_validation, devices=jax.devices()[:1])
    finally:
        signal.signal(signal.SIGINT, before)
    assert "step     2 | validation left off: a stop was asked for" in logged
    assert [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)] == ["ckpt_00000003"]
    rows = [json.loads(line) for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    assert not any("val_loss" in r for r in rows)


def test_a_rerun_with_no_checkpoint_keeps_the_earlier_log(tmp_path):
    """--ckpt_every=0 leaves a log and no checkpoint: running into the same directory again
    starts afresh, and the earlier run's rows stay, in metrics.jsonl.old."""
    tc = tiny_run(tmp_path, steps=2)
    train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    first = open(os.path.join(tc.out_dir, "metrics.jsonl")).read()
    logged = []
    train_mod.train(dataclasses.replace(tc, lr=1e-4), log=logged.append,
                    devices=jax.devices()[:1])
    assert open(os.path.join(tc.out_dir, "metrics.jsonl.old")).read() == first
    assert any("kept as metrics.jsonl.old" in line for line in logged)
    assert [json.loads(r)["step"] for r in open(os.path.join(tc.out_dir, "metrics.jsonl"))] == \
        [1, 2]


def test_a_checkpoint_is_written_while_the_next_steps_train(tmp_path, monkeypatch):
    """Step 2's checkpoint waits, inside its write, until step 3 is logged: written in line, it
    would wait in vain. The run still ends with both checkpoints in place."""
    tc = tiny_run(tmp_path, steps=4, ckpt_every=2)
    step_3, real_save, waited = threading.Event(), common.save_checkpoint, []

    def slow_save(out_dir, step, *a, **k):
        if step == 2:
            waited.append(step_3.wait(timeout=60))
        return real_save(out_dir, step, *a, **k)
    monkeypatch.setattr(common, "save_checkpoint", slow_save)
    train_mod.train(tc, log=lambda line: line.startswith("step     3 |") and step_3.set(),
                    devices=jax.devices()[:1])
    assert waited == [True]
    assert [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)] == [
        "ckpt_00000002", "ckpt_00000004"]


def test_ckpt_keep_keeps_the_newest(tmp_path):
    tc = tiny_run(tmp_path, steps=5, ckpt_every=1, ckpt_keep=3)
    train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert [os.path.basename(p) for p in common.list_checkpoints(tc.out_dir)] == [
        "ckpt_00000003", "ckpt_00000004", "ckpt_00000005"]


def test_a_full_disk_names_the_checkpoint_kept(tmp_path, monkeypatch):
    """It names the newest checkpoint kept, the one a rerun resumes from."""
    tc = tiny_run(tmp_path, steps=4, ckpt_every=1)
    train_mod.train(tc, stop_after=2, log=lambda s: None, devices=jax.devices()[:1])
    assert len(common.list_checkpoints(tc.out_dir)) == 2

    def full(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(common.os, "pwrite", full)
    with pytest.raises(common.UserError, match=r"could not write the checkpoint of step 3 to .* "
                       r"\(No space left on device\); it keeps ckpt_00000002, which the same"):
        train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    with pytest.raises(common.UserError, match="step 1 .* it holds no checkpoint yet"):
        train_mod.train(dataclasses.replace(tc, out_dir=str(tmp_path / "new")), log=lambda s: None,
                        devices=jax.devices()[:1])


def test_export_hf_writes_the_trained_weights_for_06_and_other_tools(tmp_path, monkeypatch,
                                                                      capsys):
    """--export_hf writes the last step's weights as a Hugging Face Llama directory (load_hf_llama
    reads the checkpoint's params back exactly) in the compute dtype, which 06 serves with its
    byte tokenizer and no `tokenizers` package; a finished run exports alone when rerun; nothing
    is overwritten."""
    tc = tiny_run(tmp_path, ckpt_every=4, export_hf=str(tmp_path / "hf"))
    train_mod.train_and_sample(tc)
    assert "exported the model to" in capsys.readouterr().out
    (ckpt,) = common.list_checkpoints(tc.out_dir)
    stored = common.read_safetensors(os.path.join(ckpt, common.STATE_FILE))
    cfg, params = common.load_hf_llama(tc.export_hf)
    assert cfg == train_mod.model_config(tc)
    for k, v in jax.tree_util.tree_flatten_with_path(params)[0]:
        np.testing.assert_array_equal(v, stored["['params']" + jax.tree_util.keystr(k)])
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # as if not installed
    *_, tokenizer, which = common.import_script("06_kv_cache_inference").load_checkpoint_dir(
        tc.export_hf)
    assert tokenizer.encode("caf\u00e9") == list("caf\u00e9".encode()) and "Hugging Face" in which
    again = dataclasses.replace(tc, export_hf=str(tmp_path / "hf2"))
    train_mod.train_and_sample(again)  # at steps already: nothing trained, the export written
    assert "nothing to train" in capsys.readouterr().out
    assert open(os.path.join(again.export_hf, "model.safetensors"), "rb").read() == \
        open(os.path.join(tc.export_hf, "model.safetensors"), "rb").read()
    with pytest.raises(common.UserError, match="--export_hf=.*already exists"):
        train_mod.train_and_sample(dataclasses.replace(tc, steps=8))
    assert len(common.list_checkpoints(tc.out_dir)) == 1  # refused before any step
    with pytest.raises(common.UserError, match="is --out_dir, where the checkpoints go"):
        train_mod.train_and_sample(dataclasses.replace(tc, steps=8, export_hf=tc.out_dir + "/"))
    assert len(common.list_checkpoints(tc.out_dir)) == 1
    with pytest.raises(common.UserError, match="--breakdown times a step and trains none"):
        dataclasses.replace(tc, breakdown=True)
    # inside an out_dir the run has yet to make: its parent will exist when the export is written;
    # a bfloat16 run exports in bfloat16, the dtype its forward computes in
    fresh = dataclasses.replace(tc, out_dir=str(tmp_path / "fresh"), steps=1, sample_len=0,
                                export_hf=str(tmp_path / "fresh" / "hf"), dtype="bfloat16")
    train_mod.train_and_sample(fresh)
    written = common.read_safetensors(os.path.join(fresh.export_hf, "model.safetensors"))
    assert {str(a.dtype) for a in written.values()} == {"bfloat16"}
    assert common.read_json(os.path.join(fresh.export_hf, "config.json"))["torch_dtype"] == \
        "bfloat16"


def first_loss(path, tc, tokenizer):
    """The loss of the Hugging Face model at `path` on the first batch `tc` trains on."""
    cfg, params = common.load_hf_llama(str(path), "float32")
    (tokens, _), _ = train_mod.load_data(tc, cfg, tokenizer, log=lambda s: None)
    x, y = common.get_batch(tokens, 0, tc.batch_size, tc.seq_len, tc.seed)
    logp = jax.nn.log_softmax(common.forward(params, x, cfg), axis=-1)
    return -float(np.mean(np.take_along_axis(np.asarray(logp), y[..., None], -1)))


def test_init_from_fine_tunes_a_hugging_face_model(tmp_path, monkeypatch):
    """--init_from starts from the directory's weights: the first step's loss is theirs on that
    batch. An exported byte-level model goes round: 09 -> Hugging Face -> 09."""
    first = tiny_run(tmp_path / "a", export_hf=str(tmp_path / "hf"), sample_len=4, ckpt_every=4)
    train_mod.train_and_sample(first)
    history = [json.loads(line) for line in open(os.path.join(first.out_dir, "metrics.jsonl"))]
    tc = tiny_run(tmp_path / "b", init_from=str(tmp_path / "hf"), ckpt_every=4)
    rows = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])[0]
    want = first_loss(tmp_path / "hf", tc, common.BYTES)
    assert losses(rows)[0] == pytest.approx(want, rel=1e-5) and want < history[0]["loss"] - 0.5
    # Before its first step, the fine-tune measures the loaded model: the export's last loss
    assert rows[0] == {"step": 0, "val_loss": pytest.approx(history[-1]["val_loss"], rel=1e-5)}
    (ckpt,) = common.list_checkpoints(tc.out_dir)
    assert not os.path.exists(os.path.join(ckpt, "tokenizer.json"))  # bytes: none needed
    # Run again from the start (its checkpoint gone): the file keeps one row per step, step 0's
    # measurement of the loaded model included
    shutil.rmtree(ckpt)
    train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    steps = [json.loads(line)["step"] for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    assert steps == list(range(tc.steps + 1))
    # A resume names the model it fine-tunes: another one (of the same shape and tokens) is
    # refused, the same one moved is not, and neither is a run from scratch
    shutil.copytree(tmp_path / "hf", tmp_path / "other")
    shutil.copytree(tmp_path / "hf", tmp_path / "moved" / "hf")
    for init_from, out_dir, match in (
            ("other", tc.out_dir, "holds a fine-tune of .*hf, not of .*other: resume with "
                                  "--init_from=.*hf, or use another --out_dir"),
            ("", tc.out_dir, "holds a fine-tune of .*hf: resume with --init_from="),
            ("hf", first.out_dir, "holds a model trained from scratch, not a fine-tune of .*hf: "
                                  "resume without --init_from")):
        with pytest.raises(common.UserError, match=match):
            init_from = init_from and str(tmp_path / init_from)
            train_mod.train(dataclasses.replace(tc, init_from=init_from, out_dir=out_dir),
                            log=lambda s: None)
    moved = dataclasses.replace(tc, init_from=str(tmp_path / "moved" / "hf"))
    assert train_mod.train(moved, log=lambda s: None, devices=jax.devices()[:1])[0] == []
    monkeypatch.chdir(tmp_path / "moved" / "hf")  # named from inside it: "." is still hf
    assert train_mod.train(dataclasses.replace(tc, init_from="."), log=lambda s: None,
                           devices=jax.devices()[:1])[0] == []
    # a checkpoint written before the model's name was kept is taken as the one named now
    (ckpt,) = common.list_checkpoints(tc.out_dir)
    meta = common.read_json(os.path.join(ckpt, "meta.json"))
    assert meta.pop("init_from")
    json.dump(meta, open(os.path.join(ckpt, "meta.json"), "w"))
    assert train_mod.train(moved, log=lambda s: None, devices=jax.devices()[:1])[0] == []
    hf_cfg = json.load(open(tmp_path / "moved" / "hf" / "config.json"))
    json.dump(dict(hf_cfg, rope_theta=123.0), open(tmp_path / "moved" / "hf" / "config.json", "w"))
    with pytest.raises(common.UserError, match=r"another config \(--init_from=.*hf: rope_theta "):
        train_mod.train(moved, log=lambda s: None)
    # 09 loads float32 whatever the checkpoint's own dtype (float64 included)
    json.dump(dict(hf_cfg, torch_dtype="float64"),
              open(tmp_path / "moved" / "hf" / "config.json", "w"))
    assert train_mod.model_config(moved).param_dtype == "float32"
    monkeypatch.setattr(sys, "argv", ["09_train.py", "--preset=tiny", f"--init_from={tmp_path}"])
    with pytest.raises(common.UserError, match="--preset and --init_from both name the model"):
        train_mod.main()
    for bad, match in ((tmp_path / "none", "--init_from: checkpoint directory .* does not exist"),
                       (tmp_path / "a", "--init_from: .* has no config.json")):
        with pytest.raises(common.UserError, match=match):
            train_mod.train(dataclasses.replace(tc, init_from=str(bad)), log=lambda s: None)


def test_init_from_reads_the_data_with_its_tokenizer(tmp_path):
    """A model with a BPE tokenizer: the data are read as its tokens (ids past 255), the first
    loss is the model's on them, the checkpoints carry the tokenizer.json, 06 decodes with it,
    and the export passes it on with the model's token ids."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train([os.path.join(ROOT, "common.py")], tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    spec = json.loads(tok.to_str())
    cfg = dataclasses.replace(common.Config.preset("tiny"), vocab_size=320)
    common.save_hf_llama(str(tmp_path / "hf"), cfg, common.init_params(cfg, jax.random.key(2)),
                         {"tokenizer.json": spec, "config.json": {"eos_token_id": 299},
                          "generation_config.json": {"eos_token_id": 299}})
    tc = tiny_run(tmp_path, init_from=str(tmp_path / "hf"), ckpt_every=4, sample_len=4,
                  export_hf=str(tmp_path / "export"))
    tokenizer = train_mod.data_tokenizer(tc)
    (tokens, _), _ = train_mod.load_data(tc, cfg, tokenizer, log=lambda s: None)
    assert tokens.max() >= 256 and tokens.max() < 300
    (tmp_path / "latin").mkdir()  # bytes that are not UTF-8 reach the model as U+FFFD: said
    (tmp_path / "latin" / "a.txt").write_bytes(open(os.path.join(ROOT, "common.py"), "rb").read(
        8000) + "café, naïve".encode("latin-1"))
    lines = []
    train_mod.load_data(dataclasses.replace(tc, data=str(tmp_path / "latin")), cfg, tokenizer,
                        log=lines.append)
    assert [s for s in lines if "UTF-8" in s] == [
        "note: 2 bytes of the data are not UTF-8: the tokenizer reads them as U+FFFD, the "
        "replacement character (convert the files to UTF-8 to keep them)"]
    for shift in range(3):  # UTF-8 cut 95/5 inside a character (two shifts of three): no note
        (tmp_path / "euro.txt").write_text("a" * shift + "€" * 3000, encoding="utf-8")
        lines = []
        train_mod.load_data(dataclasses.replace(tc, data=str(tmp_path / "euro.txt")), cfg,
                            tokenizer, log=lines.append)
        assert not [s for s in lines if "UTF-8" in s], lines
    train_mod.train_and_sample(tc)
    rows = [json.loads(line) for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))]
    assert rows[0]["step"] == 0 and "val_loss" in rows[0]
    assert losses(rows)[0] == pytest.approx(first_loss(tmp_path / "hf", tc, tokenizer), rel=1e-5)
    (ckpt,) = common.list_checkpoints(tc.out_dir)
    assert common.read_json(os.path.join(ckpt, "tokenizer.json")) == spec
    served = common.import_script("06_kv_cache_inference").load_checkpoint_dir(tc.out_dir)[3]
    assert served.encode("def forward(") == tok.encode("def forward(").ids
    assert served.stop == (299,)  # the source's end of sequence ends 06's answers
    exported = str(tmp_path / "export")
    assert common.read_json(os.path.join(exported, "tokenizer.json")) == spec
    assert common.read_json(os.path.join(exported, "config.json"))["eos_token_id"] == 299
    assert common.load_tokenizer(exported).stop == (299,)
    small = dataclasses.replace(cfg, vocab_size=280)  # the tokenizer's ids reach 299
    common.save_hf_llama(str(tmp_path / "small"), small,
                         common.init_params(small, jax.random.key(2)), {"tokenizer.json": spec})
    with pytest.raises(common.UserError, match="token 29[0-9], past the model's vocabulary of 280"):
        train_mod.train(tiny_run(tmp_path / "s", init_from=str(tmp_path / "small")),
                        log=lambda s: None)


def test_a_tokenizer_trains_a_model_from_scratch_on_its_tokens(tmp_path, capsys):
    """--tokenizer=DIR: the preset's shape with a vocabulary of exactly the tokenizer's ids, the
    data read as its tokens, the checkpoints and the export carrying its tokenizer.json (06
    encodes with it), and a resume on other tokens refused."""
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    tok.train([os.path.join(ROOT, "common.py")], tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet()))
    (tmp_path / "tok").mkdir()
    (tmp_path / "tok" / "tokenizer.json").write_text(tok.to_str())
    (tmp_path / "tok" / "vocab.json").write_text("{}")
    tc = tiny_run(tmp_path, tokenizer=str(tmp_path / "tok"), ckpt_every=4, sample_len=4,
                  export_hf=str(tmp_path / "export"))
    train_mod.train_and_sample(tc)
    out = capsys.readouterr().out
    assert "with a vocabulary of 300" in out and "bytes a token" in out
    (last,) = [json.loads(line) for line in open(os.path.join(tc.out_dir, "metrics.jsonl"))][-1:]
    per_token = re.search(r"validation (\d+\.\d+) bytes a token", out)[1]  # the loss a byte:
    assert last["val_loss_per_byte"] == pytest.approx(last["val_loss"] / float(per_token),
                                                      rel=1e-2)  # over the split's bytes a token
    exported = common.read_json(str(tmp_path / "export" / "config.json"))
    assert exported["vocab_size"] == tok.get_vocab_size() == 300
    assert common.read_json(str(tmp_path / "export" / "tokenizer.json")) == json.loads(tok.to_str())
    served = common.import_script("06_kv_cache_inference").load_checkpoint_dir(tc.out_dir)[3]
    assert served.encode("def forward(") == tok.encode("def forward(").ids
    cfg = train_mod.model_config(tc)
    tokens = train_mod.load_data(tc, dataclasses.replace(cfg, vocab_size=300),
                                 train_mod.data_tokenizer(tc), log=lambda s: None)[0][0]
    assert 256 <= tokens.max() < 300  # merged tokens, read as the tokenizer reads them
    with pytest.raises(common.UserError, match="trained on other tokens than bytes"):
        train_mod.train(dataclasses.replace(tc, tokenizer="", steps=8), log=lambda s: None)
    for wrong in ("none", "tok/vocab.json"):  # missing, or a file not called tokenizer.json
        with pytest.raises(common.UserError, match="--tokenizer=.*expected a directory holding"):
            train_mod.train(dataclasses.replace(tc, tokenizer=str(tmp_path / wrong)),
                            log=lambda s: None)
    as_file = dataclasses.replace(tc, tokenizer=str(tmp_path / "tok" / "tokenizer.json"))
    assert train_mod.data_tokenizer(as_file).spec == json.loads(tok.to_str())
    with pytest.raises(common.UserError, match="--tokenizer is for a model trained from scratch"):
        dataclasses.replace(tc, init_from=str(tmp_path / "export"))


def test_fine_tuning_data_are_documents_begun_and_ended(tmp_path):
    """Through a checkpoint's tokenizer, each file of --data is a document in both splits: it
    begins at one of the offsets load_data returns, with the tokenizer's BOS, and ends before
    the next with the end of sequence; --doc_mask's segments come from those offsets."""
    tokenizers = pytest.importorskip("tokenizers")
    text = open(os.path.join(ROOT, "common.py")).read()
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator([text], tokenizers.trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
        special_tokens=["<s>", "</s>"]))
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", bos)])
    cfg = dataclasses.replace(common.Config.preset("tiny"), vocab_size=320)
    common.save_hf_llama(str(tmp_path / "hf"), cfg, common.init_params(cfg, jax.random.key(2)),
                         {"tokenizer.json": json.loads(tok.to_str()),
                          "generation_config.json": {"eos_token_id": eos}})
    (tmp_path / "docs").mkdir()
    for i in range(30):
        (tmp_path / "docs" / f"{i:02d}.py").write_text(text[i * 400:(i + 1) * 400])
    tc = tiny_run(tmp_path, data=str(tmp_path / "docs"), init_from=str(tmp_path / "hf"))
    splits = train_mod.load_data(tc, cfg, train_mod.data_tokenizer(tc), log=lambda s: None)
    assert sum(len(edges) - 1 for _, edges in splits) == 30
    for tokens, edges in splits:
        assert edges[0] == 0 and edges[-1] == len(tokens)
        np.testing.assert_array_equal(tokens[edges[:-1]], bos)
        np.testing.assert_array_equal(tokens[np.array(edges[1:]) - 1], eos)
        assert (tokens == bos).sum() == (tokens == eos).sum() == len(edges) - 1


def test_damaged_metrics_lines_are_passed_over(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_bytes(b'{"step": 1, "loss": 2.0}\n\xff\xfe{"st\n{"step": 2, "loss": 1.5}\n')
    assert [r["step"] for r in train_mod.read_metrics(str(path))] == [1, 2]


def test_non_finite_loss_stops_and_keeps_checkpoint(tmp_path):
    tc = tiny_run(tmp_path, steps=30, lr=1e5, warmup=0, grad_clip=0.0, ckpt_every=1)
    with pytest.raises(common.UserError, match="not finite"):
        train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    ckpts = common.list_checkpoints(tc.out_dir)
    assert ckpts
    state, meta = common.load_checkpoint(ckpts[-1], {"params": common.init_params(
        common.Config.preset("tiny"), jax.random.key(0))})
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(state))


def test_adamw_matches_a_numpy_adamw():
    """Adam's Algorithm 1 with decoupled weight decay (as torch.optim.AdamW), in numpy, with the
    decay mask built from the parameters' names: every weight but the norm gains."""
    tc = train_mod.TrainConfig(weight_decay=0.1, b1=0.9, b2=0.95)
    cfg = common.Config.preset("tiny")
    params = common.init_params(cfg, jax.random.key(0))
    paths, treedef = jax.tree_util.tree_flatten_with_path(params)
    names = [jax.tree_util.keystr(k) for k, _ in paths]
    decays = [not name.endswith("norm']") for name in names]
    assert sorted(n for n, d in zip(names, decays) if not d) == \
        ["['final_norm']", "['layers']['attn_norm']", "['layers']['mlp_norm']"]  # stacked
    ours, state = params, train_mod.adamw_init(params)
    ref = [np.asarray(p, np.float64) for _, p in paths]
    m, v = [np.zeros_like(p) for p in ref], [np.zeros_like(p) for p in ref]
    lr, eps = 1e-2, 1e-8
    for t in range(1, 4):
        g = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
        ours, state = train_mod.adamw_update(g, state, ours, lr, tc, train_mod.decay_mask(cfg))
        for i, gi in enumerate(np.asarray(x, np.float64) for x in jax.tree.leaves(g)):
            m[i] = 0.9 * m[i] + 0.1 * gi
            v[i] = 0.95 * v[i] + 0.05 * gi * gi
            step = (m[i] / (1 - 0.9 ** t)) / (np.sqrt(v[i] / (1 - 0.95 ** t)) + eps)
            ref[i] = ref[i] - lr * (step + (0.1 * ref[i] if decays[i] else 0.0))
    for got, want in zip(jax.tree.leaves(ours), ref):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_lr_schedule_is_linear_warmup_then_cosine():
    """Update n (lr_schedule(n - 1)): n / 10 of the peak up to step 10, then the cosine, which
    ends at min_lr on the run's last step, step 100: the peak is used once."""
    tc = train_mod.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr=0.1)
    want = [n / 10 if n <= 10 else 0.1 + 0.45 * (1 + math.cos(math.pi * (n - 10) / 90))
            for n in range(1, 101)]
    got = [float(train_mod.lr_schedule(n - 1, tc)) for n in range(1, 101)]
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got[-1] == pytest.approx(0.1) and got.count(1.0) == 1


def test_the_default_learning_rate_follows_the_width_and_fine_tuning():
    """Without --lr: 1e-3 at `small`'s width, inversely with d_model, 2e-5 to fine-tune; the end
    of the cosine a tenth of the peak unless --min_lr says otherwise."""
    small, wide = train_mod.TrainConfig(), train_mod.TrainConfig(preset="llama-3.2-1b")
    assert (small.peak_lr(), small.final_lr()) == pytest.approx((1e-3, 1e-4))
    assert wide.peak_lr() == pytest.approx(1e-3 * 384 / 2048)
    tune = train_mod.TrainConfig(init_from="some/dir")
    assert (tune.peak_lr(), tune.final_lr()) == pytest.approx((2e-5, 2e-6))
    # --lr alone brings its own end (the header's fine-tuning line), --min_lr alone keeps the peak
    assert train_mod.TrainConfig(init_from="d", lr=3e-5).final_lr() == pytest.approx(3e-6)
    assert train_mod.TrainConfig(min_lr=0.0).peak_lr() == pytest.approx(1e-3)
    assert float(train_mod.lr_schedule(19, small)) == pytest.approx(1e-3)  # warmup ends
    with pytest.raises(common.UserError, match="min_lr=0.01 is above lr=0.001 .the default"):
        train_mod.TrainConfig(min_lr=1e-2)


def test_clipping_scales_the_global_norm_down_to_the_threshold():
    rng = np.random.default_rng(0)
    grads = {"a": rng.normal(size=(3, 4)), "b": [rng.normal(size=5)]}
    norm = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(grads)))
    for max_norm, want in ((norm / 2, norm / 2), (2 * norm, norm), (0.0, norm)):
        clipped, before = train_mod.clip_by_global_norm(grads, max_norm)
        after = np.sqrt(sum(np.sum(np.square(g)) for g in jax.tree.leaves(clipped)))
        assert float(before) == pytest.approx(norm, rel=1e-6)
        assert after == pytest.approx(want, rel=1e-5)
        jax.tree.map(lambda c, g: np.testing.assert_allclose(c, g * after / norm, rtol=1e-5),
                     clipped, grads)


def test_breakdown_says_when_the_difference_is_not_the_optimizers_time(monkeypatch):
    """A whole step faster than its forward + backward alone would print a negative AdamW time;
    the breakdown says why instead. The peak's line says that simulated devices share the host
    only where there are several."""
    for times, said, n_dev in (((0.010, 0.030, 0.025), "5 ms (16.7%)", 1),
                               ((0.010, 0.030, 0.032), None, 8),
                               ((0.010, 0.030, 0.02996), "0.04 ms (0.1%)", 1)):  # not "0.0 ms"
        left = list(times)   # forward, forward + backward, the whole step [s]
        monkeypatch.setattr(common, "bench", lambda *a, **k: common.Timing(0, left[0], left[0],
                                                                           left.pop(0) and 1))
        monkeypatch.setattr(common, "measure_peaks", lambda **k: {"matmul_flops": 1e12})
        monkeypatch.setattr(common, "kernel_times", lambda *a, **k: None)
        lines = []
        mem = types.SimpleNamespace(argument_size_in_bytes=2 * 2**20,  # tiny's, in MiB
                                    temp_size_in_bytes=3 * 2**30)
        step = types.SimpleNamespace(memory_analysis=lambda: mem)
        train_mod.breakdown(step, lambda p, x, y, seg: 0.0, {}, {}, (None, None, None), 6e9,
                            1e12, 1, lines.append, common.Config.preset("tiny"), 256, n_dev)
        # forward: a third of the step's 6e9 FLOPs in 10 ms, 0.2 TFLOP/s, 20% of the 1e12 peak
        assert lines[1].split()[1:4] == ["10.0", "0.2", "20.0%"], lines
        note = [line for line in lines if "less than forward + backward" in line]
        assert len(note) == (said is not None) and all(said in line for line in note), lines
        assert any("2.00 MiB of arguments" in ln and "3.00 GiB of temporaries" in ln
                   for ln in lines), lines
        peak_line, = [ln for ln in lines if ln.startswith("measured ")]
        assert ("simulated devices share" in peak_line) == (n_dev > 1), peak_line


def test_the_run_passes_scan_layers_to_the_attention_choice(tmp_path, monkeypatch):
    seen = []
    real = train_mod.pick_attention

    def spy(*a, **k):
        seen.append(a[4:] + tuple(k.values()))
        return real(*a, **k)
    monkeypatch.setattr(train_mod, "pick_attention", spy)
    train_mod.train(tiny_run(tmp_path, steps=1), log=lambda s: None, devices=jax.devices()[:1])
    assert seen == [(True, False, False)]   # scan_layers, short documents, Hopper segments


def test_attention_choice_follows_device_dtype_and_deterministic_kernels():
    pick, det = train_mod.pick_attention, " --xla_gpu_deterministic_ops=true"
    assert pick("auto", "bfloat16", "gpu") == "cudnn"
    assert pick("auto", "float32", "gpu") == pick("auto", "bfloat16", "cpu") == "naive"
    assert pick("auto", "bfloat16", "gpu", "--xla_foo=1" + det) == "pallas"
    assert pick("auto", "bfloat16", "gpu", "--xla_gpu_deterministic_ops") == "pallas"
    assert pick("auto", "bfloat16", "gpu", "--xla_gpu_deterministic_ops=1") == "pallas"
    with pytest.raises(common.UserError, match="needs an NVIDIA GPU"):  # before any data read
        pick("cudnn", "bfloat16", "cpu", det)
    with pytest.raises(common.UserError, match="attention=cudnn takes 16-bit inputs"):
        pick("cudnn", "float32", "gpu")
    assert pick("auto", "bfloat16", "gpu", "--xla_gpu_deterministic_ops=false") == "cudnn"
    assert pick("auto", "bfloat16", "cpu", det) == "naive"
    assert pick("flash", "bfloat16", "gpu", det) == "flash"
    with pytest.raises(common.UserError, match="fails under --xla_gpu_deterministic_ops"):
        pick("cudnn", "bfloat16", "gpu", det)
    # one compiled layer holds one attention backward: cuDNN's works there, when asked for
    assert pick("cudnn", "bfloat16", "gpu", det, scan_layers=True) == "cudnn"
    assert pick("auto", "bfloat16", "gpu", det, scan_layers=True) == "pallas"
    # --doc_mask over short documents: the kernel that skips the blocks the mask empties
    assert pick("auto", "bfloat16", "gpu", short_documents=True) == "pallas"
    assert pick("auto", "bfloat16", "cpu", short_documents=True) == "naive"
    assert pick("cudnn", "bfloat16", "gpu", short_documents=True) == "cudnn"
    # --doc_mask where 08's Hopper kernels take the segment ids: 08's kernel at any length
    assert pick("auto", "bfloat16", "gpu", hopper_segments=True) == "pallas"
    assert pick("auto", "float32", "gpu", hopper_segments=True) == "naive"
    masked = train_mod.TrainConfig(doc_mask=True, seq_len=2048)
    assert not train_mod.hopper_segments(masked, common.PRESETS["llama-3.2-1b"])   # a CPU


def test_hopper_segments_follow_the_mask_the_window_and_the_dtype(monkeypatch):
    """On an sm90 GPU (faked) 08's Hopper kernels take --doc_mask's segment ids of a window that
    is a multiple of their 128-row tiles, in bf16 compute (float32 weights, as 09 keeps them);
    not without --doc_mask, nor of a 2,000-token window, nor in float32 compute."""
    monkeypatch.setattr(jax, "devices", lambda *a: [types.SimpleNamespace(
        platform="gpu", compute_capability="9.0")])
    cfg = dataclasses.replace(common.PRESETS["llama-3.2-1b"], param_dtype="float32")
    tc = train_mod.TrainConfig(doc_mask=True, seq_len=2048)
    assert train_mod.hopper_segments(tc, cfg)
    assert not train_mod.hopper_segments(dataclasses.replace(tc, doc_mask=False), cfg)
    assert not train_mod.hopper_segments(dataclasses.replace(tc, seq_len=2000), cfg)
    assert not train_mod.hopper_segments(tc, dataclasses.replace(cfg, dtype="float32"))


def test_pallas_attention_passes_on_deterministic(monkeypatch):
    """Under --xla_gpu_deterministic_ops 09 asks 08's kernel for repeatable gradients."""
    k08, seen = common.import_script("08_pallas_kernels"), []
    monkeypatch.setattr(k08, "flash_attention", lambda *a, **k: seen.append(k["deterministic"]))
    q = np.zeros((1, 8, 2, 4), np.float32)
    for det in (False, True):
        train_mod.attention_fn("pallas", None, det)(q, q, q, True, None)
    assert seen == [False, True]


@pytest.mark.parametrize("kw,match", [
    (dict(mesh="dp:3"), "uses 3 devices"),
    (dict(mesh="tp:8"), "does not divide"),
    (dict(mesh="xy:2"), "expected axes"),
    (dict(batch_size=6, mesh="dp:4,fsdp:2"), "must split"),
    (dict(data="/does/not/exist"), "does not exist"),
    (dict(mesh="tp:8", batch_size=4, seq_len=36, sequence_parallel=True), "divides neither"),
    (dict(sample_len=10, sample_prompt=""), "sample_prompt"),
    (dict(sequence_parallel=True), "needs a --mesh with tp > 1"),
    (dict(b2=1.0), "b2 must be in"),
    (dict(lr=1e-3, min_lr=1e-2), "min_lr=0.01 is above lr=0.001"),
    (dict(seq_len=4096), "pass --seq_len=128 or less"),
    (dict(num_processes=2), "needs --coordinator"),
    (dict(coordinator="localhost"), "expected HOST:PORT"),
    (dict(coordinator="localhost:99999"), "expected HOST:PORT"),
    (dict(out_dir=os.path.join(ROOT, "common.py")), "--out_dir=.* is a file"),
    (dict(fp8_scaling="delayed"), "applies to fp8 matmuls"),
    (dict(fp8=True, fp8_scaling="late"), "fp8_scaling must be one of"),
    (dict(steps=2**31), "steps must be below 2\\*\\*31"),
    (dict(seed=-1), "seed must be >= 0"),
    (dict(ckpt_keep=0), "ckpt_keep must be >= 1"),
    (dict(lr=float("nan")), "lr must be > 0"),
    (dict(lr=1e-40, min_lr=0.0), "lr must be"),   # subnormal: XLA trains at lr 0
    (dict(grad_clip=float("nan")), "grad_clip must be >= 0"),
    (dict(attention="cudnn", dtype="float32"), "attention=cudnn needs an NVIDIA GPU"),
])
def test_bad_input(tmp_path, kw, match):
    with pytest.raises(common.UserError, match=match):
        train_mod.train(tiny_run(tmp_path, **kw), log=lambda s: None)


def test_an_out_dir_inside_the_data_is_refused(tmp_path):
    """Else the checkpoints written there become training text when the run resumes."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_bytes(open(os.path.join(ROOT, "common.py"), "rb").read())
    with pytest.raises(common.UserError, match="lies inside --data"):
        train_mod.train(tiny_run(tmp_path, data=str(corpus), out_dir=str(corpus / "run")),
                        log=lambda s: None)


def test_processes_that_found_different_checkpoints_stop():
    train_mod.check_same_start(np.array([4, 4]), "out")
    with pytest.raises(common.UserError, match="steps 4, 0 by process.*every host sees"):
        train_mod.check_same_start(np.array([4, 0]), "out")


def test_processes_started_with_other_flags_or_devices_stop():
    """Each process reads its own flags: another --batch_size or --seed would train each on its
    own reading of the batch, another --mesh would wait forever in a collective."""
    tc = train_mod.TrainConfig(num_processes=2, coordinator="host-0:1234")
    ours = train_mod.flag_digests(tc)
    train_mod.check_same_flags([ours, train_mod.flag_digests(
        dataclasses.replace(tc, process_id=1))], tc)
    theirs = train_mod.flag_digests(dataclasses.replace(tc, process_id=1, batch_size=16, seed=1))
    with pytest.raises(common.UserError, match="^the processes were started with different "
                       "--batch_size, --seed: give every process the same flags but --process_id"):
        train_mod.check_same_flags([ours, theirs], tc)


def test_a_tensor_parallel_group_must_lie_within_a_process():
    """The batch is fed per process: a tp group over two processes would see one's rows only."""
    def mesh(processes, per, dp, fsdp, tp):
        devs = [types.SimpleNamespace(process_index=p) for p in range(processes)
                for _ in range(per)]
        return types.SimpleNamespace(devices=np.array(devs).reshape(dp, fsdp, tp),
                                     shape={"dp": dp, "fsdp": fsdp, "tp": tp})
    train_mod.check_tp_within_processes(mesh(2, 2, 2, 1, 2))   # each process one tp pair
    train_mod.check_tp_within_processes(mesh(2, 4, 1, 4, 2))
    for bad in (mesh(2, 1, 1, 1, 2), mesh(4, 1, 2, 1, 2), mesh(2, 2, 1, 1, 4)):
        with pytest.raises(common.UserError, match="spreads a tensor-parallel group over "
                           "processes of .* devices: tp must divide each process's devices"):
            train_mod.check_tp_within_processes(bad)


def test_a_check_on_process_0_stops_every_process(monkeypatch):
    """Process 0 alone checks the directories it writes; the others learn its outcome from one
    broadcast and stop with a line, where they would wait in the next collective until a
    timeout's traceback."""
    def refuse():
        raise common.UserError("--export_hf=x already exists")
    told = []
    monkeypatch.setattr(train_mod.jax, "process_count", lambda: 2)
    monkeypatch.setattr(train_mod.multihost_utils, "broadcast_one_to_all",
                        lambda x: told.append(int(x)) or np.int32(1))  # process 0 failed
    monkeypatch.setattr(train_mod.jax, "process_index", lambda: 1)
    with pytest.raises(common.UserError, match="^process 0 stopped at its check of --export_hf"):
        train_mod.on_process_0(refuse, "--export_hf")  # (not run here: process 1)
    monkeypatch.setattr(train_mod.jax, "process_index", lambda: 0)
    with pytest.raises(common.UserError, match="^--export_hf=x already exists$"):
        train_mod.on_process_0(refuse, "--export_hf")
    assert told == [0, 1]  # process 1 said nothing failed; process 0 that it did
    monkeypatch.setattr(train_mod.multihost_utils, "broadcast_one_to_all", lambda x: x)
    train_mod.on_process_0(lambda: None, "--export_hf")
    monkeypatch.setattr(train_mod.jax, "device_count", lambda: 6)
    monkeypatch.setattr(train_mod.jax, "local_device_count", lambda: 2)
    with pytest.raises(common.UserError, match="has 2 of the 6 devices of 2 processes: every "
                       "process needs the same number of devices"):
        train_mod.check_processes_agree(train_mod.TrainConfig())


def test_data_past_max_data_mb_is_cut_and_said(tmp_path):
    (tmp_path / "corpus").mkdir()
    for i in range(3):
        (tmp_path / "corpus" / f"{i}.txt").write_bytes(bytes([97 + i]) * 2**20)
    tc = tiny_run(tmp_path, data=str(tmp_path / "corpus"), max_data_mb=2)
    logged = []
    (train, _), (val, _) = train_mod.load_data(tc, train_mod.model_config(tc), common.BYTES,
                                               logged.append)
    assert len(train) + len(val) == 2 * 2**20 and set(np.unique(np.concatenate([train, val]))) \
        == {97, 98}
    assert logged == ["note: reading the first 2 MiB of the data's 3 MiB (--max_data_mb reads "
                      "more)"]
    train_mod.load_data(dataclasses.replace(tc, max_data_mb=3), train_mod.model_config(tc),
                        common.BYTES, logged.append)
    assert len(logged) == 1


def test_short_validation_split_is_refused_before_training(tmp_path):
    (tmp_path / "small.txt").write_bytes(b"x" * 1000)  # 950 bytes to train on, 50 to validate
    with pytest.raises(common.UserError, match="validation split of the data holds 50 bytes"):
        train_mod.train(tiny_run(tmp_path, seq_len=64, data=str(tmp_path / "small.txt")),
                        log=lambda s: None)
    assert not os.path.exists(tmp_path / "out" / "metrics.jsonl")


def test_damaged_newest_checkpoint_is_passed_over(tmp_path, capsys):
    """A power loss can leave the newest checkpoint unreadable: resume from the one before."""
    tc = tiny_run(tmp_path, steps=3, ckpt_every=1)
    full, _, _ = train_mod.train(dataclasses.replace(tc, out_dir=str(tmp_path / "full")),
                                 log=lambda s: None, devices=jax.devices()[:1])
    train_mod.train(tc, stop_after=2, log=lambda s: None, devices=jax.devices()[:1])
    newest = common.list_checkpoints(tc.out_dir)[-1]
    open(os.path.join(newest, common.STATE_FILE), "wb").close()
    metrics = os.path.join(tc.out_dir, "metrics.jsonl")
    with open(metrics, "a") as f:
        f.write('{"step": 9, "lo')  # a line cut short by a kill
    rest, _, _ = train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert "ckpt_00000002 is damaged" in capsys.readouterr().err
    assert [r["step"] for r in rest] == [2, 3] and losses(rest) == losses(full)[1:]
    assert [json.loads(line)["step"] for line in open(metrics)] == [1, 2, 3]  # the cut line gone
    with open(metrics, "a") as f:
        f.write('{"step": 9, "lo')
    train_mod.plot_metrics(tc.out_dir)  # passes over the cut line
    for path in common.list_checkpoints(tc.out_dir):
        open(os.path.join(path, "meta.json"), "w").close()
    with pytest.raises(common.UserError, match="every checkpoint in .* is damaged"):
        train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])


def test_out_dir_of_another_config(tmp_path):
    train_mod.train(tiny_run(tmp_path, steps=1, ckpt_every=1), log=lambda s: None,
                    devices=jax.devices()[:1])
    with pytest.raises(common.UserError, match="another config .preset tiny: seed 0 there, 1 here."):
        train_mod.train(tiny_run(tmp_path, steps=2, seed=1), log=lambda s: None,
                        devices=jax.devices()[:1])


def run_script(args, env_devices, **kw):
    flags = os.environ["XLA_FLAGS"].replace("device_count=8", f"device_count={env_devices}")
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=flags)
    return subprocess.Popen([sys.executable, os.path.join(ROOT, "09_train.py")] + args, env=env,
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def test_fp8_delayed_scaling_follows_the_plain_run_and_resumes_exactly(tmp_path,
                                                                      one_device_run):
    """fp8_scaling=delayed (scales from the maxima recorded at the step before, kept with the
    optimizer state): the losses stay within fp8's rounding of the plain run's; stopped after
    step 2 and resumed, the run gives the same losses bit for bit, so the maxima travel with
    the checkpoint; a checkpoint written without them is refused with a message."""
    tc = tiny_run(tmp_path, batch_size=16, fp8=True, fp8_scaling="delayed", remat="dots",
                  ckpt_every=2)
    one = dict(log=lambda s: None, devices=jax.devices()[:1])
    logged = []
    full, _, _ = train_mod.train(dataclasses.replace(tc, out_dir=str(tmp_path / "full")),
                                 log=logged.append, devices=jax.devices()[:1])
    assert any(s.startswith("fp8: recorded the first maxima") for s in logged)  # calibrate_fp8
    # e4m3 rounds each element by up to 2^-4 of itself, and delayed scales lag a step: the loss
    # stays within a few percent (2.2% at step 3 on one version of the data, common.py's text)
    np.testing.assert_allclose(losses(full), losses(one_device_run), rtol=4e-2)
    # each step records the maxima it saw: those kept at step 2 and at step 4 differ
    two, four = (common.read_safetensors(os.path.join(p, common.STATE_FILE))
                 for p in common.list_checkpoints(str(tmp_path / "full")))
    maxima = [k for k in two if k.startswith("['opt']['fp8']")]  # x, w, g of 7 matmuls
    unchanged = [k for k in maxima if np.array_equal(two[k], four[k])]
    assert len(maxima) == 21 and not unchanged, unchanged
    first, _, _ = train_mod.train(tc, stop_after=2, **one)
    rest, _, _ = train_mod.train(tc, **one)
    assert losses(first) + losses(rest) == losses(full)
    newest = common.list_checkpoints(tc.out_dir)[-1]
    meta = json.load(open(os.path.join(newest, "meta.json")))
    json.dump(dict(meta, fp8_maxima=False), open(os.path.join(newest, "meta.json"), "w"))
    with pytest.raises(common.UserError, match="without fp8 maxima"):
        train_mod.train(dataclasses.replace(tc, steps=6), **one)


def test_fp8_delayed_scaling_records_its_first_maxima_before_the_first_step():
    """With nothing recorded, delayed scaling's scales would be 1, and e5m2 at a scale of 1
    flushes small gradients to zero. calibrate_fp8 records the maxima in one unquantized pass
    over the first micro-batch: each weight's is its own, and the first step's gradient then
    points the way the plain gradient does as closely as current scaling's, with nothing
    flushed."""
    cfg = common.PRESETS["tiny"]
    tc = train_mod.TrainConfig(preset="tiny", seq_len=128, batch_size=32, grad_accum=2,
                               fp8=True, fp8_scaling="delayed")
    mesh = train_mod.make_mesh("dp:1", jax.devices()[:1])
    params = common.init_params(cfg, jax.random.key(0))
    x, y = np.split(np.random.default_rng(0).integers(0, cfg.vocab_size, (32, 129), np.int32),
                    [128], axis=1)
    y = np.concatenate([x[:, 1:], y], axis=1)
    nothing = common.import_script("07_numerics").delayed_amax(cfg.n_layers)
    amax = train_mod.calibrate_fp8(cfg, tc, mesh, common.attention_reference, params, nothing,
                                   x, y, None)
    for name, m in amax.items():
        w = np.abs(params["layers"][name])  # [layers, ...]
        np.testing.assert_array_equal(m["w"], w.reshape(len(w), -1).max(axis=1))
        assert np.all(np.asarray(m["x"]) > 0) and np.all(np.asarray(m["g"]) > 0)

    def grads(tc, *amax):
        loss_fn = train_mod.make_loss_fn(cfg, tc, mesh, common.attention_reference)
        g = jax.jit(jax.grad(loss_fn))(params, x[::2], y[::2], None, *amax)["layers"]
        return np.concatenate([np.ravel(a) for a in jax.tree.leaves(g)])
    plain, current = (grads(dataclasses.replace(tc, fp8=f, fp8_scaling="current"))
                      for f in (False, True))
    calibrated, ones = grads(tc, amax), grads(tc, nothing)

    def cos(g):
        return g @ plain / np.linalg.norm(g) / np.linalg.norm(plain)
    assert cos(calibrated) > cos(current) - 1e-3 and np.mean(calibrated == 0) == 0
    assert cos(ones) < cos(current) - 0.02 and np.mean(ones == 0) > 0.05, (cos(ones),
                                                                          np.mean(ones == 0))


def test_fp8_training_follows_the_plain_run(tmp_path, one_device_run):
    """Every layer's matmul in fp8 (lesson 07), under remat=dots (which recomputes the scaling
    in the backward pass): the losses stay within fp8's rounding of the plain run's, and
    differ."""
    got, _, _ = train_mod.train(tiny_run(tmp_path, batch_size=16, fp8=True, remat="dots"),
                                log=lambda s: None, devices=jax.devices()[:1])
    fp8, plain = np.array(losses(got)), np.array(losses(one_device_run))
    np.testing.assert_allclose(fp8, plain, rtol=1e-2)
    assert np.max(np.abs(fp8 - plain) / plain) > 1e-5


def test_two_processes_equal_one(tmp_path, one_device_run, one_device_dir):
    """Two processes of 4 devices each, one program over a dp x fsdp x tp mesh of all 8: the
    losses of the one-device run with the same settings (tiny_run, batch 16), and its last
    checkpoint, written by process 0 from the shards of both, as is the export (--export_hf).
    Both processes sample, process 0 prints it."""
    same = tiny_run(tmp_path, batch_size=16, ckpt_every=4, sample_len=8)
    args = [f"--{f.name}={getattr(same, f.name)}" for f in dataclasses.fields(same)
            if f.name not in ("out_dir", "mesh", "coordinator", "num_processes", "process_id",
                              "export_hf")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [run_script(args + [f"--out_dir={tmp_path / 'two'}", "--mesh=dp:2,fsdp:2,tp:2",
                                f"--export_hf={tmp_path / 'hf'}",
                                f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}"], 4) for i in range(2)]
    outs = [p.communicate(timeout=240) for p in procs]
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 0, err[-2000:]
    assert "sample:" in outs[0][0] and "sample:" not in outs[1][0]
    # a CPU is in no datasheet: each measures its peak, and process 0's stands for both
    basis = [[ln for ln in out.splitlines() if ln.startswith("MFU basis")] for out, _ in outs]
    assert basis[0] == basis[1] and "process 0's measurement" in basis[0][0]
    two = [json.loads(line)["loss"] for line in open(tmp_path / "two" / "metrics.jsonl")]
    np.testing.assert_allclose(two, losses(one_device_run), rtol=2e-5)
    (ckpt_two,), (ckpt_one,) = (common.list_checkpoints(str(d)) for d in
                                (tmp_path / "two", one_device_dir / "out"))
    a, b = (common.read_safetensors(os.path.join(c, common.STATE_FILE))
            for c in (ckpt_two, ckpt_one))
    assert sorted(a) == sorted(b)
    for k in a:
        # AdamW's m / sqrt(v) magnifies the last bits where gradients are tiny: a few elements
        # move further than the rest (measured: 1 in 24,576 at 1.02e-3 of a leaf's largest
        # value, the others below 2.2e-4, on data that is this repository's common.py). A shard
        # put in the wrong place moves most of its elements by the leaf's own scale.
        scale, err = np.max(np.abs(b[k])), np.abs(a[k] - b[k])
        assert err.max() < 1e-2 * scale and np.mean(err > 1e-3 * scale) < 1e-3, k
    _, exported = common.load_hf_llama(str(tmp_path / "hf"))  # process 0's, from both's shards
    for k, v in jax.tree_util.tree_flatten_with_path(exported)[0]:
        np.testing.assert_array_equal(v, a["['params']" + jax.tree_util.keystr(k)])


def test_two_processes_fine_tune_as_one_device_does(tmp_path):
    """--init_from over two processes: each device reads its own slices of the Hugging Face
    weights, and the losses (step 0's validation included) are the one-device run's."""
    cfg = common.Config.preset("tiny")
    common.save_hf_llama(str(tmp_path / "hf"), cfg, common.init_params(cfg, jax.random.key(7)),
                         {"tokenizer.json": common.byte_tokenizer_json()})
    one = tiny_run(tmp_path / "one", init_from=str(tmp_path / "hf"), steps=2, batch_size=16)
    want = train_mod.train(one, log=lambda s: None, devices=jax.devices()[:1])[0]
    args = [f"--{f.name}={getattr(one, f.name)}" for f in dataclasses.fields(one)
            if f.name not in ("out_dir", "mesh", "preset", "coordinator", "num_processes",
                              "process_id")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [run_script(args + [f"--out_dir={tmp_path / 'two'}", "--mesh=dp:2,fsdp:2,tp:2",
                                f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}"], 4) for i in range(2)]
    for p in procs:
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    got = [json.loads(line) for line in open(tmp_path / "two" / "metrics.jsonl")]
    assert [r["step"] for r in got] == [0, 1, 2]
    np.testing.assert_allclose([got[0]["val_loss"]] + losses(got),
                               [want[0]["val_loss"]] + losses(want), rtol=2e-5)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "ctrl-c"])
def test_a_stop_signal_to_one_process_saves_the_same_step_on_all(tmp_path, sig):
    """A scheduler's SIGTERM reaches one process of two: both hear of it through JAX's
    preemption service, agree on a step, save it and stop with one line naming it. A Ctrl-C
    is taken as SIGTERM (left alone, it stopped its process, and the other waited for ever)."""
    args = [f"--{f.name}={getattr(tiny_run(tmp_path), f.name)}"
            for f in dataclasses.fields(train_mod.TrainConfig)
            if f.name in ("preset", "seq_len", "batch_size", "sample_len", "data", "scan_layers")]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [run_script(args + ["--steps=100000", "--log_every=1", "--eval_every=100000",
                                f"--out_dir={tmp_path / 'out'}", "--mesh=dp:2,fsdp:2,tp:2",
                                f"--coordinator=127.0.0.1:{port}", "--num_processes=2",
                                f"--process_id={i}"], 4) for i in range(2)]
    for line in procs[1].stdout:                    # training has begun
        if line.startswith("step     1 |"):
            break
    procs[1].send_signal(sig)
    outs = [p.communicate(timeout=240) for p in procs]
    kept = [os.path.basename(p) for p in common.list_checkpoints(str(tmp_path / "out"))]
    assert len(kept) == 1, (kept, [err[-2000:] for _, err in outs])
    for p, (out, err) in zip(procs, outs):
        assert p.returncode == 130, err[-2000:]
        assert f"step {int(kept[0][5:]):5d} | a process was sent SIGTERM" in out
        assert f"keeps {kept[0]}: the same command resumes from it" in err.splitlines()[-1]
    assert ("Ctrl-C, taken as SIGTERM: every process saves" in outs[1][1]) == (sig == signal.SIGINT)


def test_cli_error_is_one_line():
    p = run_script(["--mesh=dp:2,fsdp:2,tp:3", "--steps=1"], 8)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and "uses 12 devices" in err and "Traceback" not in err


def test_validation_loss_is_measured_on_the_held_out_split(tmp_path):
    """A file whose first 95% (the training split) is one byte repeated and whose last 5% is
    another: the model learns the first, so its training loss falls far below ln 256 while the
    validation loss, on bytes it never saw, stays far above it."""
    data = tmp_path / "two_bytes.txt"
    data.write_bytes(b"a" * 19000 + b"b" * 1000)
    history, _, _ = train_mod.train(tiny_run(tmp_path, steps=30, eval_every=30, lr=1e-2,
                                             data=str(data)), log=lambda s: None,
                                    devices=jax.devices()[:1])
    last = history[-1]
    assert last["loss"] < 0.5 < math.log(256) < last["val_loss"]


def test_sample_at_a_low_temperature_is_greedy_over_the_last_window():
    """09's sampler recomputes the whole window for every byte; near temperature 0 it must pick
    what argmax over common.forward picks, with the oldest bytes dropped once the prompt and
    its continuation outgrow max_seq_len (tiny: 128)."""
    cfg = common.Config.preset("tiny")
    params = common.init_params(cfg, jax.random.key(1))
    forward = jax.jit(lambda t: common.forward(params, t[None], cfg)[0, -1])
    for prompt in (b"def ", bytes(range(32, 157))):          # 4 bytes; 125, which slides
        want = list(prompt)
        for _ in range(5):
            want.append(int(np.argmax(forward(np.array(want[-128:], np.int32)))))
        got = train_mod.sample(params, cfg, prompt, 5, temperature=1e-6)
        assert got == bytes(want).decode("utf-8", errors="replace")
    # A Llama preset's vocabulary is larger than the bytes it trains on: the sample stays bytes
    # (it raised "bytes must be in range(0, 256)").
    wide = dataclasses.replace(cfg, vocab_size=1024)
    params = common.init_params(wide, jax.random.key(1))
    params["lm_head"] = params["lm_head"].at[:, 256:].add(100.0)   # the best tokens are not bytes
    assert len(train_mod.sample(params, wide, b"def ", 8).encode("utf-8", "surrogateescape")) >= 8


def test_a_second_run_in_the_same_out_dir_is_refused(tmp_path):
    """Two runs saving into one out_dir would delete each other's half-written checkpoints (a
    save clears the temporary directories it finds): the second is refused while the first
    holds the directory, and the directory is free again once the first ends."""
    tc = tiny_run(tmp_path, steps=1)
    with common.hold_dir(tc.out_dir):
        with pytest.raises(common.UserError, match=rf"^--out_dir={tc.out_dir} is in use by "
                           rf"another run \(pid {os.getpid()} on .+\): wait for it to end"):
            train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])
    assert len(train_mod.train(tc, log=lambda s: None, devices=jax.devices()[:1])[0]) == 1
    assert len(train_mod.train(dataclasses.replace(tc, steps=2), log=lambda s: None,
                               devices=jax.devices()[:1])[0]) == 2  # released after each run


def test_a_coordinator_that_cannot_work_is_one_line(monkeypatch, capsys):
    """A host name that does not resolve, a process 0 that never answers, or a port already held
    on process 0's host would otherwise fail inside JAX's C++ (a 5-minute wait and an abort, or
    a traceback)."""
    with pytest.raises(common.UserError, match="the host 'no-such-host.invalid' does not resolve"):
        train_mod.wait_for_coordinator("no-such-host.invalid:1234", connect=True, wait_s=0)
    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
        with pytest.raises(common.UserError, match=f"nothing answers at 127.0.0.1:{port} .*"
                           f"after 0 s: start process 0 there"):
            train_mod.wait_for_coordinator(f"127.0.0.1:{port}", connect=True, wait_s=0)
        train_mod.wait_for_coordinator(f"127.0.0.1:{port}", connect=False, wait_s=0)  # process 0
    answers = [socket.gaierror(-2, "Name or service not known")] * 2 + [["an address"]]

    def lookup(*a, **k):  # a cluster that publishes the name a little after the process starts
        got = answers.pop(0)
        if isinstance(got, Exception):
            raise got
        return got
    monkeypatch.setattr(train_mod.socket, "getaddrinfo", lookup)
    naps = []
    train_mod.wait_for_coordinator("host-0:1234", connect=False, sleep=naps.append)
    assert len(naps) == 2 and capsys.readouterr().err.count("does not resolve") == 1
    monkeypatch.undo()
    with socket.socket() as held:
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        train_mod.wait_for_coordinator(f"127.0.0.1:{port}", connect=True, wait_s=0)  # answers
        tc = train_mod.TrainConfig(coordinator=f"127.0.0.1:{port}", num_processes=2)
        with pytest.raises(common.UserError, match=f"could not host the coordinator on port "
                           f"{port} .Address already in use.: another program"):
            train_mod.join(tc)


def test_a_process_left_alone_ends_with_one_line(tmp_path):
    """Process 0 of 2 with no process 1: JAX would abort from C++ with a stack dump at its
    timeout; the run says what is missing first and exits 1."""
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    out = subprocess.run([sys.executable, "09_train.py", f"--coordinator=127.0.0.1:{port}",
                          "--num_processes=2", "--join_timeout=4", f"--out_dir={tmp_path}"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert out.returncode == 1, out.stderr
    assert out.stderr.strip().splitlines()[-1] == (
        "error: not all 2 processes joined within 4 s: start each with the same --coordinator "
        "and --num_processes and its own --process_id")


def test_the_sample_prompt_reads_what_a_shell_passes(monkeypatch):
    seen = []
    monkeypatch.setattr(train_mod, "train_and_sample", seen.append)
    monkeypatch.setattr("sys.argv", ["09_train.py", r"--sample_prompt=def f():\n\treturn"])
    train_mod.main()
    assert seen[0].sample_prompt == "def f():\n\treturn"
