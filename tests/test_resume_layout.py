"""A fold resumed on another GPU count / batch / accumulation continues at the same share of
training by samples seen: the epoch's seeded permutation cut into the new batches after the images
already seen, the schedule rebuilt for the new steps per epoch and set to the matching step."""
from __future__ import annotations

import multiprocessing
import os
import traceback
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from test_ddp import MODEL, PER_PROCESS, _free_port, make_inputs

import level1_models.train as train_module
from level1_models.config import ConfigError, build_config
from level1_models.folder import ModelFolder
from level1_models.loop import epoch_micro_batches, lr_schedule, make_optimizer, make_scheduler, set_schedule_position
from level1_models.resume import FoldState, Layout, recut_resume
from level1_models.train import run_oof, setup_runtime

torch.set_num_threads(1)

CFG = build_config(MODEL, {**PER_PROCESS, "epochs": 2, "warmup_epochs": 0.5})  # batch 4, lr set for batch 8


def _saved(old: Layout, epoch: int, in_epoch: int, cfg=CFG) -> tuple[dict, FoldState]:
    st = FoldState(epoch=epoch)
    st.progress.samples, st.progress.step = in_epoch, in_epoch // old.global_batch * old.accumulate
    st.progress.loss_sum, st.progress.images = 5.0, in_epoch // old.world_size
    steps = epoch * old.steps_per_epoch + in_epoch // old.global_batch
    state = {**st.to_dict(), "layout": st.layout_record(old, steps), "config": cfg.to_dict()}
    return state, FoldState.from_checkpoint(state)


def test_a_recut_epoch_goes_on_after_the_images_already_seen():
    old, new = Layout.of(CFG, 2, 48), Layout.of(CFG, 1, 48)  # 2 x 4 = 8 (6 steps), 1 x 4 = 4 (12 steps)
    assert (old.steps_per_epoch, new.steps_per_epoch, old.images_per_epoch) == (6, 12, 48)
    state, st = _saved(old, epoch=1, in_epoch=24)
    position, line = recut_resume(CFG, new, state, st, 0, Path("fold0/last.pt"))
    assert position == 12 + 6 and st.progress.step == 6 and st.progress.samples == 24
    seed = 123
    before = np.concatenate(epoch_micro_batches(48, 4, 2, 1, seed)[:3])  # what the 2-process run trained on
    after = np.concatenate(epoch_micro_batches(48, 4, 1, 1, seed)[st.progress.step:])
    perm = np.concatenate(epoch_micro_batches(48, 48, 1, 1, seed))
    np.testing.assert_array_equal(np.concatenate([before, after]), perm)  # each image of the epoch once
    assert st.progress.images == 24 and st.progress.loss_sum == 10.0  # rank 0's share stands for both
    assert line == ("fold 0: resuming on 1 process x batch 4 (was 2 x 4): 75% of training done by samples seen "
                    "(epoch 2, 24 of 48 images); the schedule continues from there")
    # A new batch that does not divide the images seen starts at the last whole new batch.
    bigger = Layout.of(build_config(MODEL, {**PER_PROCESS, "epochs": 2, "warmup_epochs": 0.5, "batch_size": 16}), 1, 48)
    state, st = _saved(old, epoch=0, in_epoch=40)
    position, _ = recut_resume(CFG, bigger, state, st, 0, Path("fold0/last.pt"))
    assert position == 2 and st.progress.samples == 32 and st.progress.step == 2


def test_the_same_layout_or_an_old_last_pt_resumes_as_saved():
    layout = Layout.of(CFG, 2, 48)
    state, st = _saved(layout, epoch=1, in_epoch=24)
    assert recut_resume(CFG, layout, state, st, 0, Path("last.pt")) is None
    assert st.progress.step == 3 and st.progress.loss_sum == 5.0
    state.pop("layout")
    assert recut_resume(CFG, Layout.of(CFG, 1, 48), state, FoldState.from_checkpoint(state), 0, Path("last.pt")) is None


@pytest.mark.parametrize("change", [{"epochs": 3}, {"scheduler": "constant"}, {"lr": 1e-3}, {"epoch_fraction": 0.5}])
def test_another_schedule_is_refused_naming_the_difference(change):
    state, st = _saved(Layout.of(CFG, 2, 48), epoch=1, in_epoch=24)
    cfg = build_config(MODEL, {**PER_PROCESS, "epochs": 2, "warmup_epochs": 0.5, **change})
    with pytest.raises(ConfigError) as err:
        recut_resume(cfg, Layout.of(cfg, 1, 48), state, st, 0, Path("fold0/last.pt"))
    (name, value), = change.items()
    assert f"{name} {getattr(CFG, name)!r} -> {value!r}" in str(err.value) and "delete fold0/last.pt" in str(err.value)
    with pytest.raises(ConfigError, match="trained on 48 images, this run has 40"):
        recut_resume(CFG, Layout.of(CFG, 2, 40), state, st, 0, Path("fold0/last.pt"))


def _run_steps(optimizer, scheduler, model, n: int) -> list[float]:
    lrs = []
    for _ in range(n):
        lrs.append(optimizer.param_groups[0]["lr"])
        model.weight.grad = torch.ones_like(model.weight)
        model.bias.grad = torch.ones_like(model.bias)
        optimizer.step()
        scheduler.step()
    return lrs


def test_the_schedule_continues_at_the_same_share_of_training():
    """8 -> 4 images per step after 7 of 12 old steps (epoch 2, 8 of 48 images): the new run's lr is
    the new configuration's at step 12 + 2 of 24 and falls to the cosine's end at its last step."""
    old, new = Layout.of(CFG, 2, 48), Layout.of(CFG, 1, 48)
    model = torch.nn.Linear(3, 2)
    opt = make_optimizer(CFG, model, CFG.lr * CFG.lr_factor(2))
    _run_steps(opt, make_scheduler(CFG, opt, old.steps_per_epoch), model, 7)
    saved = opt.state_dict()
    state, st = _saved(old, epoch=1, in_epoch=8)
    position, _ = recut_resume(CFG, new, state, st, 0, Path("last.pt"))
    assert position == 14

    base = CFG.lr * CFG.lr_factor(1)
    assert base == pytest.approx(CFG.lr * 0.5 ** 0.5)  # the sqrt rule: half the global batch
    resumed = make_optimizer(CFG, model, base)
    scheduler = make_scheduler(CFG, resumed, new.steps_per_epoch)
    resumed.load_state_dict(saved)
    set_schedule_position(scheduler, base, position)
    assert resumed.param_groups[0]["lr"] == pytest.approx(base * lr_schedule(CFG, new.steps_per_epoch)(14))
    moments = resumed.state[model.weight]["exp_avg"].clone()
    np.testing.assert_array_equal(moments, opt.state[model.weight]["exp_avg"])  # Adam's state kept
    lrs = _run_steps(resumed, scheduler, model, CFG.epochs * new.steps_per_epoch - position)

    fresh_model = torch.nn.Linear(3, 2)
    fresh = make_optimizer(CFG, fresh_model, base)
    expected = _run_steps(fresh, make_scheduler(CFG, fresh, new.steps_per_epoch), fresh_model, 24)[position:]
    np.testing.assert_allclose(lrs, expected, rtol=1e-12)
    assert lrs[-1] < 0.01 * base and resumed.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))


# --- two processes killed inside an epoch, resumed on one --------------------------------------


class Killed(Exception):
    pass


class KillingClock(train_module.CheckpointClock):
    """A mid-epoch checkpoint after every step (not every 20th under DDP); the 4th kills both processes
    once written (rank 0 writes before every process resets the clock)."""

    saves = 0

    def __init__(self, minutes, env, device):
        super().__init__(minutes, env, device, check_every=1)
        self.saving = False

    def due(self) -> bool:
        self.saving = super().due()
        return self.saving

    def reset(self) -> None:
        if self.saving:
            type(self).saves += 1
            if type(self).saves == 4:
                raise Killed("simulated kill")
        self.saving = False
        super().reset()


CHANGES = {"epochs": 2, "checkpoint_minutes": 1e-9}


def _killed_worker(rank: int, world: int, port: int, out: str, errors) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        torch.set_num_threads(1)
        train_module.CheckpointClock = KillingClock
        cfg, rt = setup_runtime(build_config(MODEL, {**PER_PROCESS, **CHANGES}))
        run_oof(cfg, make_inputs(n_train=48), Path(out), rt)
    except Killed:
        errors.put(f"rank {rank}: killed")
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_two_processes_killed_inside_an_epoch_finish_on_one(tmp_path, monkeypatch, capsys):
    for var in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    out = tmp_path / "model"
    ctx = multiprocessing.get_context("fork")
    errors = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_killed_worker, args=(r, 2, port, str(out), errors)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=300)
    messages = sorted(errors.get(timeout=10) for _ in procs)
    assert messages == ["rank 0: killed", "rank 1: killed"], messages
    folder = ModelFolder(out)
    saved = torch.load(folder.last(0), weights_only=True)
    # 24 training images per fold, 3 steps of 2 x 4 an epoch: killed one step into epoch 2.
    assert saved["layout"]["world_size"] == 2 and saved["layout"]["samples_seen"] == 32
    assert saved["layout"]["samples_seen_in_epoch"] == 8 and saved["layout"]["optimizer_steps"] == 4

    capsys.readouterr()
    cfg, rt = setup_runtime(build_config(MODEL, {**PER_PROCESS, **CHANGES, "checkpoint_minutes": 0}))
    lrs = []
    real_step = train_module.Trainer.optimizer_step

    def recording_step(trainer):
        real_step(trainer)
        lrs.append(trainer.optimizer.param_groups[0]["lr"])

    monkeypatch.setattr(train_module.Trainer, "optimizer_step", recording_step)
    metrics = run_oof(cfg, make_inputs(n_train=48), out, rt)
    log = capsys.readouterr().out
    assert ("fold 0: resuming on 1 process x batch 4 (was 2 x 4): 67% of training done by samples seen "
            "(epoch 2, 8 of 24 images); the schedule continues from there") in log
    assert metrics["complete"] and folder.oof.is_file() and folder.test.is_file()
    for k in (0, 1):
        assert folder.fold_done(k).is_file() and folder.fold_oof(k).is_file() and folder.fold_test(k).is_file()
        assert not folder.last(k).exists()
        curve = pd.read_csv(folder.curves_csv(k))
        assert curve["epoch"].tolist() == [1, 2] and curve["lr"].iloc[-1] == pytest.approx(0.0, abs=1e-9)
    # Fold 0 on one process: 6 steps of 4 an epoch, from step 6 + 2 of 12; then fold 1's 12 steps.
    assert len(lrs) == 4 + 12 and lrs[3] == pytest.approx(0.0, abs=1e-12)
    base = cfg.lr * cfg.lr_factor(1)
    factor = lr_schedule(cfg, 6)
    np.testing.assert_allclose(lrs[:4], [base * factor(s) for s in range(9, 13)], rtol=1e-9, atol=1e-15)
    assert pd.read_parquet(folder.oof)["image_id"].is_unique
