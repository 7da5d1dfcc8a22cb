"""The loop's contract, tested by itself: a fake trainer (a tiny nn.Module, no text encoder, no diffusers model) and
synthetic latents. Step hooks, accumulation, learning rate per step, exact resume, stop signals, the NaN guard, the
save / preview / final calls and skipped fp16 steps."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from utils.training import (
    BaseStepHook,
    LoopConfig,
    OptimConfig,
    Outputs,
    list_checkpoints,
    make_accelerator,
    train,
)


class TinyDenoiser(nn.Module):
    """prediction = conv(noisy) + scale * cond: one 1x1 convolution and a per-channel scale on the conditioning."""

    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.dropout = nn.Dropout(dropout)  # the global RNG's only user in a step, as a hypernetwork's dropout
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 4, 1, 1, generator=g) * 0.1)
            self.conv.bias.zero_()
        self.scale = nn.Parameter(torch.zeros(4))

    def forward(self, noisy_latents, timesteps, cond):
        return self.dropout(self.conv(noisy_latents)) + self.scale[None, :, None, None] * cond[:, :, None, None]


class FakeTrainer:
    """The smallest thing the loop trains: every parameter of TinyDenoiser; a batch conditions it by a per-prompt
    vector."""

    method = "fake"

    def __init__(self, name="fake", dropout=0.0):
        self.name = name
        self.model = TinyDenoiser(dropout)
        self.initial_step = 0
        self.mode_calls: list[str] = []

    def parameters(self):
        return list(self.model.parameters())

    def train(self, mode=True):
        self.mode_calls.append("train" if mode else "eval")
        self.model.dropout.train(mode)

    def model_inputs(self, batch, device):
        cond = torch.tensor([[float(len(p) % 5), 1.0, -1.0, 0.5] for p in batch["prompts"]], device=device)
        return {"cond": cond}

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


class Source:
    """n synthetic latents, a fixed permutation per epoch; positions are places in the epoch's global order."""

    def __init__(self, n=8, batch=2, poison=(), on_batch=None):
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(n, 4, 4, 4, generator=g)
        self.n, self.b = n, batch
        self.micro_batches_per_epoch = n // batch
        self.poison, self.on_batch, self.calls = set(poison), on_batch, 0
        self.served: list[tuple[int, int]] = []  # (epoch, micro-batch) in the order they were served

    def iter_epoch(self, epoch, skip):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch)).tolist()
        for j in range(skip, self.micro_batches_per_epoch):
            positions = list(range(j * self.b, (j + 1) * self.b))
            latents = self.latents[[perm[p] for p in positions]].clone()
            self.calls += 1
            self.served.append((epoch, j))
            if self.on_batch:
                self.on_batch(self.calls)
            if (epoch, j) in self.poison:
                latents[:] = float("nan")
            yield {"latents": latents, "prompts": [f"prompt {perm[p]}" for p in positions], "positions": positions}


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100)


def _run(out: Path, steps: int, *, hooks=(), resume=None, ckpt=0, accum=1, batch=2, lr="0.01", outputs=None,
         source=None, trainer=None, scaler=None, schedule="constant", **cfg_kw):
    trainer = trainer or FakeTrainer()
    acc = make_accelerator(out, "no", accum, "none", 0)
    if scaler is not None:
        acc.scaler = scaler  # what accelerate builds for fp16 on a GPU; on the CPU it is handed in
    cfg_kw = {"save_every": 0, "preview_every": 0, **cfg_kw}
    cfg = LoopConfig(output_dir=out, max_train_steps=steps, train_batch_size=batch, gradient_accumulation_steps=accum,
                     checkpointing_steps=ckpt, resume_from_checkpoint=resume,
                     optim=OptimConfig(learning_rate=lr, lr_scheduler=schedule), **cfg_kw)
    outputs = outputs or Outputs(save=lambda s: [], final=lambda s, o: [])
    summary = train(acc, trainer, source or Source(batch=batch), _scheduler(), cfg, outputs, hooks=hooks)
    return summary, trainer


# ---------------------------------------------------------------------------------------------------------------
# Step hooks


class StopAt(BaseStepHook):
    """Stops at a step, counts the steps it saw (its checkpointed state), evaluates the model without gradients."""

    name = "stop_at"

    def __init__(self, at: int):
        self.at = at
        self.seen = 0
        self.steps: list[int] = []
        self.started_at = None
        self.eval_losses: list[float] = []
        self.finished = None

    def start(self, step, ctx):
        self.started_at = step

    def after_step(self, step, ctx):
        self.seen += 1
        self.steps.append(step)
        assert ctx.loss == ctx.loss and ctx.lr > 0  # the step's loss and rate are there
        g = torch.Generator().manual_seed(123)  # its own numbers: the training RNG is not touched
        latents = torch.randn(2, 4, 4, 4, generator=g)
        with ctx.evaluating():
            pred = ctx.predict(latents, torch.tensor([5, 50]), {"prompts": ["a", "bb"]})
        assert not pred.requires_grad
        self.eval_losses.append(float(pred.float().pow(2).mean()))
        return "early_stop" if step >= self.at else None

    def state_dict(self):
        return {"seen": self.seen}

    def load_state_dict(self, state):
        self.seen = int(state["seen"])

    def finish(self, step, ctx):
        self.finished = (step, ctx.stopped_by)
        path = ctx.cfg.output_dir / "hook.json"
        if ctx.accelerator.is_main_process:
            path.write_text(json.dumps({"step": step, "seen": self.seen}))
        return [path]


def test_a_hook_stops_the_run_with_a_checkpoint_and_its_reason(tmp_path):
    hook = StopAt(4)
    finals = []
    outputs = Outputs(save=lambda s: [], final=lambda s, o: finals.append(s) or [])
    summary, _ = _run(tmp_path / "o", 10, hooks=[hook], outputs=outputs)
    assert summary.step == 4 and summary.stopped_by == "early_stop"
    assert hook.steps == [1, 2, 3, 4] and hook.started_at == 0
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [4]  # written although checkpointing_steps=0
    state = json.loads((tmp_path / "o" / "checkpoint-4" / "trainer_state.json").read_text())
    assert state["hooks"] == {"stop_at": {"seen": 4}} and state["stopped_by"] == "early_stop"
    assert finals == [4] and hook.finished == (4, "early_stop")
    assert tmp_path / "o" / "hook.json" in summary.files


def test_hook_state_is_restored_on_resume_and_the_same_stop_happens(tmp_path):
    full, trained_full = _run(tmp_path / "full", 10, hooks=[StopAt(6)])
    cut, _ = _run(tmp_path / "cut", 3, hooks=[StopAt(6)], ckpt=3)
    assert cut.stopped_by == "max_steps" and cut.step == 3
    hook = StopAt(6)
    resumed, trained_resumed = _run(tmp_path / "cut", 10, hooks=[hook], resume="latest", ckpt=3)
    assert hook.started_at == 3 and hook.steps == [4, 5, 6]
    assert hook.seen == 6  # 3 restored from the checkpoint + 3 seen now
    assert (full.step, full.stopped_by) == (resumed.step, resumed.stopped_by) == (6, "early_stop")
    for k, v in trained_full.state_dict().items():
        assert torch.equal(v, trained_resumed.state_dict()[k]), k
    # Resumed again from the stop's own checkpoint: the run stays stopped, no step more.
    again = StopAt(6)
    after, _ = _run(tmp_path / "cut", 10, hooks=[again], resume="latest", ckpt=3)
    assert (after.step, after.stopped_by) == (6, "early_stop") and again.steps == []


def test_a_hook_does_not_change_the_trajectory(tmp_path):
    """Evaluating in the hook (eval mode, no gradients, its own generator) leaves the trained weights bit-identical,
    also when training draws dropout masks from the global RNG."""
    _, plain = _run(tmp_path / "plain", 6, trainer=FakeTrainer(dropout=0.5))
    hook = StopAt(100)
    _, hooked = _run(tmp_path / "hooked", 6, hooks=[hook], trainer=FakeTrainer(dropout=0.5))
    assert len(hook.eval_losses) == 6
    for k, v in plain.state_dict().items():
        assert torch.equal(v, hooked.state_dict()[k]), k
    assert "eval" in hooked.mode_calls and hooked.mode_calls[-1] == "train"


def test_reduce_loss_is_the_trainers_to_define(tmp_path):
    """The loop hands the per-sample losses and the batch to the trainer's reduce_loss when it has one."""
    seen = []

    class Summing(FakeTrainer):
        def reduce_loss(self, per_sample, batch):
            seen.append((tuple(per_sample.shape), len(batch["prompts"])))
            return per_sample.sum()

    _run(tmp_path / "mean", 2, lr="0.001")
    _run(tmp_path / "sum", 2, lr="0.001", trainer=Summing())
    assert seen == [((2,), 2)] * 2
    # The logged loss is the reduced one: with a batch of 2, the sum is twice the mean.
    rows = (tmp_path / "sum" / "fake_loss.csv").read_text().splitlines()[1:]
    mean_rows = (tmp_path / "mean" / "fake_loss.csv").read_text().splitlines()[1:]
    assert float(rows[0].split(",")[3]) == pytest.approx(2 * float(mean_rows[0].split(",")[3]), rel=1e-6)


# ---------------------------------------------------------------------------------------------------------------
# The rest of the contract


def _weights(trainer):
    return trainer.state_dict()


def _same(a, b):
    return all(torch.equal(v, b[k]) for k, v in a.items())


def _rows(out):
    return [r.split(",") for r in (out / "fake_loss.csv").read_text().splitlines()[1:]]


def test_accumulation_matches_a_bigger_batch(tmp_path):
    """2 micro-batches of 1 accumulated = 1 batch of 2 (same samples, same noise): the same update, the same loss."""
    big, big_t = _run(tmp_path / "big", 4, batch=2)
    acc, acc_t = _run(tmp_path / "acc", 4, batch=1, accum=2, source=Source(batch=1))
    assert big.step == acc.step == 4
    for k, v in _weights(big_t).items():
        assert torch.allclose(v, _weights(acc_t)[k], atol=1e-6), k
    assert not _same(_weights(big_t), _weights(FakeTrainer()))
    for a, b in zip(_rows(tmp_path / "big"), _rows(tmp_path / "acc")):
        assert a[:3] == b[:3] and float(a[3]) == pytest.approx(float(b[3]), rel=1e-5)


def test_each_step_gets_its_own_learning_rate(tmp_path):
    """A1111's schedule string: the rate for step k is applied to the update that makes step k+1, and logged."""
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    applied = []
    handle = register_optimizer_step_pre_hook(lambda opt, a, k: applied.append(opt.param_groups[0]["lr"]))
    try:
        summary, _ = _run(tmp_path / "o", 6, lr="0.01:2, 0.005:4, 0.001")
    finally:
        handle.remove()
    assert applied == [0.01, 0.01, 0.005, 0.005, 0.001, 0.001]
    assert [r[4] for r in _rows(tmp_path / "o")] == ["0.01", "0.01", "0.005", "0.005", "0.001", "0.001"]
    # The schedule's end ends the run before max_train_steps.
    short, _ = _run(tmp_path / "s", 10, lr="0.01:3")
    assert (short.step, short.stopped_by) == (3, "schedule")


def test_resume_from_a_checkpoint_is_bit_identical(tmp_path):
    full, full_t = _run(tmp_path / "full", 8, ckpt=3)
    assert [s for s, _ in list_checkpoints(tmp_path / "full")] == [3, 6, 8]  # the last step too, for a requeue
    _run(tmp_path / "cut", 5, ckpt=3)
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3, 5]
    source = Source()
    resumed, resumed_t = _run(tmp_path / "cut", 8, ckpt=3, resume="latest", source=source)
    assert source.served[0] == (1, 1)  # 5 steps of 4 per epoch done: epoch 1, second micro-batch
    assert resumed.step == 8 and _same(_weights(full_t), _weights(resumed_t))
    assert _rows(tmp_path / "full") == _rows(tmp_path / "cut")


def test_a_stop_signal_checkpoints_and_the_resumed_run_matches(tmp_path):
    import os
    import signal

    _, full_t = _run(tmp_path / "full", 6)
    source = Source(on_batch=lambda calls: calls == 3 and os.kill(os.getpid(), signal.SIGUSR1))
    stopped, _ = _run(tmp_path / "cut", 6, source=source)
    assert (stopped.step, stopped.stopped_by) == (3, "signal")  # the current step finished, then stopped
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3]  # although checkpointing_steps=0
    resumed, resumed_t = _run(tmp_path / "cut", 6, resume="latest")
    assert resumed.step == 6 and _same(_weights(full_t), _weights(resumed_t))


def test_the_nan_guard_ends_the_run_and_saves_nothing(tmp_path):
    from utils.training import TrainingDiverged

    calls = []
    outputs = Outputs(save=lambda s: calls.append(("save", s)) or [], final=lambda s, o: calls.append("final") or [])
    with pytest.raises(TrainingDiverged, match="diverged at step 3"):
        _run(tmp_path / "o", 8, source=Source(poison={(0, 2)}), outputs=outputs, ckpt=1, save_every=1)
    assert calls == [("save", 1), ("save", 2)]  # nothing of step 3, no final files
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [1, 2]
    assert [r[0] for r in _rows(tmp_path / "o")] == ["1", "2"]  # the rows before the divergence are kept


def test_save_preview_and_final_come_at_their_steps(tmp_path):
    events = []
    trainer = FakeTrainer()

    def preview(step):
        events.append(f"preview {step} ({trainer.mode_calls[-1]})")
        return []

    outputs = Outputs(save=lambda s: events.append(f"save {s}") or [],
                      final=lambda s, o: events.append(f"final {s}") or [], preview=preview)
    _run(tmp_path / "o", 6, outputs=outputs, trainer=trainer, save_every=2, preview_every=3)
    # A periodic copy at every multiple of save_every, the last step included; the last step's preview before
    # its copy (a PNG card shows it); previews with the trainable in eval mode.
    assert events == ["save 2", "preview 3 (eval)", "save 4", "preview 6 (eval)", "save 6", "final 6"]
    assert trainer.mode_calls[-1] == "train"


def test_skipped_fp16_steps_are_not_counted(tmp_path):
    """A NaN loss under a loss scaler is a skipped update: no step number, no log row, no rate advance; the data
    goes on. (accelerate builds this scaler for fp16 on a GPU; here it is handed in on the CPU.)"""
    scaler = torch.amp.GradScaler("cpu")
    source = Source(poison={(0, 1)})
    summary, trainer = _run(tmp_path / "o", 4, scaler=scaler, source=source, lr="0.01:2, 0.005")
    assert (summary.step, summary.skipped_steps, summary.stopped_by) == (4, 1, "max_steps")
    assert source.served == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0)]
    rows = _rows(tmp_path / "o")
    assert [r[0] for r in rows] == ["1", "2", "3", "4"] and [r[4] for r in rows] == ["0.01", "0.01", "0.005", "0.005"]
    assert all(torch.isfinite(v).all() for v in _weights(trainer).values())
    assert scaler.get_scale() == 2.0 ** 16 / 2  # halved once


class StopOnRankZero(BaseStepHook):
    name = "rank_zero_stop"

    def after_step(self, step, ctx):
        return "early_stop" if ctx.accelerator.process_index == 0 and step == 2 else None


def _hook_ranks_worker(rank, out):
    summary, trainer = _run(Path(out), 6, hooks=[StopOnRankZero()], batch=1, source=Source(batch=1))
    torch.save({"step": summary.step, "stopped_by": summary.stopped_by, "weights": trainer.state_dict()},
               f"{out}.rank{rank}.pt")


@pytest.mark.slow
def test_a_stop_one_rank_asks_for_stops_every_rank_at_the_same_step(tmp_path):
    """Only rank 0's hook says stop: both ranks end at that step (rank 1 with the reason 'hook'), the checkpoint is
    written and the ranks hold the same weights."""
    from test_gpu_readiness import _two_ranks

    _two_ranks(_hook_ranks_worker, str(tmp_path / "o"))
    r0, r1 = (torch.load(f"{tmp_path / 'o'}.rank{r}.pt", weights_only=True) for r in range(2))
    assert (r0["step"], r0["stopped_by"]) == (2, "early_stop") and (r1["step"], r1["stopped_by"]) == (2, "hook")
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [2]
    assert _same(r0["weights"], r1["weights"])


def test_only_skipped_updates_in_a_row_end_the_run(tmp_path, monkeypatch):
    """The fp16 guard counts skipped updates in a row: a good step starts the count again; the limit in a row ends
    the run with one line (the limit is 50; 3 here)."""
    import utils.training as training

    monkeypatch.setattr(training, "MAX_SKIPPED_IN_A_ROW", 3)
    # 2 skipped, 1 good, 2 skipped, then good ones: never 3 in a row
    summary, _ = _run(tmp_path / "a", 4, scaler=torch.amp.GradScaler("cpu"),
                      source=Source(poison={(0, 0), (0, 1), (0, 3), (1, 0)}))
    assert (summary.step, summary.skipped_steps) == (4, 4)
    with pytest.raises(training.TrainingDiverged, match="skipped 3 updates in a row"):
        _run(tmp_path / "b", 4, scaler=torch.amp.GradScaler("cpu"), source=Source(poison={(0, 0), (0, 1), (0, 2)}))


class _Ranks:
    """What check_ranks_agree reads of an Accelerator: N processes whose gathered digests are this rank's, with the
    rows of the ranks in ``off`` changed."""

    def __init__(self, n: int, off=()):
        self.num_processes, self.device, self.off, self.printed = n, torch.device("cpu"), set(off), []

    def gather(self, t):
        rows = [t + (1e-9 if r in self.off else 0.0) for r in range(self.num_processes)]
        return torch.cat(rows)

    def print(self, *args):
        self.printed.append(" ".join(map(str, args)))


@pytest.mark.parametrize("ranks, off", [(2, {1}), (3, {0}), (3, {2})])
def test_ranks_holding_different_weights_are_an_error(ranks, off):
    from utils.training import check_ranks_agree

    trainer = FakeTrainer()
    same = _Ranks(ranks)
    check_ranks_agree(same, trainer)
    assert same.printed == [f"Checked: all {ranks} processes hold identical trained weights."]
    with pytest.raises(RuntimeError, match=f"the {ranks} processes hold different trained weights"):
        check_ranks_agree(_Ranks(ranks, off), trainer)


def test_a_stop_signal_during_a_skipped_update_still_checkpoints_and_stops(tmp_path):
    import os
    import signal

    source = Source(poison={(0, 1)}, on_batch=lambda calls: calls == 2 and os.kill(os.getpid(), signal.SIGUSR1))
    stopped, _ = _run(tmp_path / "o", 6, scaler=torch.amp.GradScaler("cpu"), source=source)
    assert (stopped.step, stopped.skipped_steps, stopped.stopped_by) == (1, 1, "signal")
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [1]


def test_a_run_shorter_than_the_checkpoint_interval_still_ends_with_a_checkpoint(tmp_path):
    """A requeued job that already finished must resume at its end, not redo it: the last step is checkpointed
    even when it is not a multiple of --checkpointing_steps (step 1 included)."""
    for steps in (1, 3):
        _run(tmp_path / f"o{steps}", steps, ckpt=5)
        assert [s for s, _ in list_checkpoints(tmp_path / f"o{steps}")] == [steps]


def test_hooks_need_distinct_names_and_the_bar_names_the_method(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"step hooks need distinct names: \['same', 'same'\]"):
        _run(tmp_path / "a", 1, hooks=[type("A", (BaseStepHook,), {"name": "same"})(),
                                       type("B", (BaseStepHook,), {"name": "same"})()])
    _run(tmp_path / "b", 1)
    assert "Training fake" in capsys.readouterr().err


@pytest.mark.parametrize("clip_mode", ["norm", "value"])
def test_the_dashboard_gets_every_log_every_steps_numbers(tmp_path, clip_mode, monkeypatch):
    """--report_to tensorboard with --log_every 2: at steps 2 and 4 the tracker holds the logged loss and rate, the
    epoch, the trained weights' norm, images/s and (norm clipping only) the gradient norm."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from PIL import Image

    out = tmp_path / "o"
    trainer = FakeTrainer()
    acc = make_accelerator(out, "no", 1, "tensorboard", 0)
    cfg = LoopConfig(output_dir=out, max_train_steps=4, train_batch_size=2, save_every=0, preview_every=2,
                     report_to="tensorboard", log_every=2,
                     optim=OptimConfig(learning_rate="0.01", max_grad_norm=1e-3, clip_grad_mode=clip_mode))
    # a grey preview picture (mode "L": the tracker gets it as RGB)
    previews = Outputs(save=lambda s: [], final=lambda s, o: [],
                       preview=lambda step: [(Image.new("L", (8, 6), 10 * step), f"step {step}")])
    import time as real_time
    import types

    import utils.training as training

    readings = iter([100.0])
    clock = types.SimpleNamespace(**{k: getattr(real_time, k) for k in dir(real_time) if not k.startswith("_")})
    clock.perf_counter = lambda: next(readings, 110.0)  # the loop's clock only
    monkeypatch.setattr(training, "time", clock)
    train(acc, trainer, Source(n=4), _scheduler(), cfg, previews)
    monkeypatch.undo()
    acc.end_training()
    events = EventAccumulator(str(next(p.parent for p in out.rglob("events.out.tfevents.*"))))
    events.Reload()
    scalars = {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    expected = {"loss", "lr", "epoch", "vector_norm", "images_per_sec"} | ({"grad_norm"} if clip_mode == "norm" else set())
    assert set(scalars) == expected
    assert all([s for s, _ in values] == [2, 4] for values in scalars.values())
    rows = {int(r[0]): r for r in _rows(out)}
    assert [v for _, v in scalars["loss"]] == pytest.approx([float(rows[2][3]), float(rows[4][3])], rel=1e-6)
    assert [v for _, v in scalars["lr"]] == pytest.approx([0.01, 0.01])
    assert [v for _, v in scalars["epoch"]] == [0, 1]  # 2 steps per epoch (4 pictures, batch 2)
    final_norm = float(torch.cat([p.detach().flatten() for p in trainer.parameters()]).norm())
    assert scalars["vector_norm"][-1][1] == pytest.approx(final_norm, rel=1e-6)  # every trained weight, one L2 norm
    # images/s = pictures trained so far / seconds since the start (the clock below: 10 s at every reading)
    assert [v for _, v in scalars["images_per_sec"]] == pytest.approx([4 / 10, 8 / 10])
    if clip_mode == "norm":
        assert all(v > 1e-3 for _, v in scalars["grad_norm"])  # the norm before clipping, as accelerate returns it
    images = events.Images("preview")
    assert [e.step for e in images] == [2, 4]
    from io import BytesIO

    pictures = [Image.open(BytesIO(e.encoded_image_string)) for e in images]
    assert [(p.size, p.mode) for p in pictures] == [((8, 6), "RGB")] * 2
    assert [p.getpixel((0, 0)) for p in pictures] == [(20, 20, 20), (40, 40, 40)]



def test_the_loss_log_counts_epochs_and_steps_within_them(tmp_path):
    _run(tmp_path / "o", 5)  # 8 pictures, batch 2: 4 steps per epoch
    assert [(r[0], r[1], r[2]) for r in _rows(tmp_path / "o")] == [
        ("1", "0", "0"), ("2", "0", "1"), ("3", "0", "2"), ("4", "0", "3"), ("5", "1", "0")]


def test_skipped_updates_are_remembered_across_a_resume(tmp_path):
    """A checkpoint after a skipped fp16 update: the resumed run knows it (the data goes on after the skipped
    micro-batch too, not one behind)."""
    _run(tmp_path / "o", 2, ckpt=2, scaler=torch.amp.GradScaler("cpu"), source=Source(poison={(0, 1)}))
    source = Source()
    resumed, _ = _run(tmp_path / "o", 3, resume="latest", scaler=torch.amp.GradScaler("cpu"), source=source)
    assert (resumed.step, resumed.skipped_steps) == (3, 1)
    assert source.served[0] == (0, 3)  # micro-batches 0..2 were used: 2 steps and the skipped one


def test_a_fresh_run_in_an_old_folder_starts_a_fresh_loss_log(tmp_path):
    from utils.training import LossLog

    path = tmp_path / "loss.csv"
    path.write_text("step,epoch,epoch_step,loss,learn_rate\n1,0,0,0.5,0.01\n2,0,1,0.4,0.01\n")
    log = LossLog(path, None)
    log.add(1, 0, 0, 0.25, 0.02)
    log.flush()
    assert path.read_text().splitlines()[1:] == ["1,0,0,0.2500000,0.02"]
    resumed = LossLog(path, 0)  # resuming at step 0 keeps no row
    resumed.flush()
    assert path.read_text().splitlines()[1:] == []


def test_trainer_state_round_trips_and_reads_a_checkpoint_older_than_its_fields(tmp_path):
    """A fresh state starts at step 0; state_dict/load_state_dict round-trip every field; a checkpoint written before
    skipped_steps, identity and layout existed resumes with 0 skipped and no check; another run's identity or
    another data layout is refused in one line."""
    from utils.errors import UserError
    from utils.training import TrainerState

    fresh = TrainerState({"kind": "fake"}, {"global": 2})
    assert (fresh.step, fresh.skipped_steps, fresh.tracker_run_id, fresh.stopped_by) == (0, 0, None, None)
    fresh.step, fresh.skipped_steps, fresh.tracker_run_id, fresh.stopped_by = 7, 2, "run-1", "early_stop"
    again = TrainerState({"kind": "fake"}, {"global": 2})
    again.load_state_dict(json.loads(json.dumps(fresh.state_dict())))
    assert (again.step, again.skipped_steps, again.tracker_run_id, again.stopped_by) == (7, 2, "run-1", "early_stop")
    again.check_resumable(tmp_path)
    old = TrainerState({"kind": "fake"}, {"global": 2})
    old.load_state_dict({"step": 3})
    assert (old.step, old.skipped_steps, old.tracker_run_id, old.stopped_by) == (3, 0, None, None)
    old.check_resumable(tmp_path)
    for identity, layout, what in (({"kind": "other"}, {"global": 2}, "belongs to another run"),
                                   ({"kind": "fake"}, {"global": 4}, "was written with")):
        other = TrainerState(identity, layout)
        other.load_state_dict(fresh.state_dict())
        with pytest.raises(UserError, match=what):
            other.check_resumable(tmp_path)


@pytest.mark.parametrize("others_voted", [False, True])
def test_run_hooks_every_hook_sees_the_step_and_a_vote_elsewhere_stops_this_process(others_voted):
    """_run_hooks with 2 processes (their all-reduce faked): the first hook's reason wins, every hook sees the step,
    and a process told nothing stops with the reason 'hook' when another process voted to stop."""
    from types import SimpleNamespace

    from utils.training import _run_hooks

    class Says(BaseStepHook):
        def __init__(self, name, reason):
            self.name, self.reason, self.seen = name, reason, []

        def after_step(self, step, ctx):
            self.seen.append(step)
            return self.reason

    reduced = []
    acc = SimpleNamespace(device=torch.device("cpu"), num_processes=2,
                          reduce=lambda t, op: reduced.append(op) or t + float(others_voted))
    ctx = SimpleNamespace(accelerator=acc)
    quiet = [Says("a", None), Says("b", None)]
    assert _run_hooks(quiet, 3, ctx) == ("hook" if others_voted else None)
    assert [h.seen for h in quiet] == [[3], [3]] and reduced == ["sum"]
    talking = [Says("a", None), Says("b", "early_stop"), Says("c", "diverged")]
    assert _run_hooks(talking, 4, ctx) == "early_stop"
    assert [h.seen for h in talking] == [[4], [4], [4]]
    acc.num_processes = 1  # one process: no vote to take
    assert _run_hooks(quiet, 5, ctx) is None and reduced == ["sum", "sum"]


def test_the_trackers_config_is_flat_json_and_holds_no_secrets():
    """What W&B, TensorBoard and training_settings.json get: every setting but the secret ones (by name, any case,
    as a whole word of the name), each value a JSON scalar (paths, lists and the like as text)."""
    from dataclasses import make_dataclass

    from utils.training import config_for_trackers

    settings = {"hub_token": "hf_x", "HUB_TOKEN": "hf_y", "my_api_key": "k", "wandb_key": "w", "secret": "s",
                "db_password_file": "p", "auth_token": "a", "tokenizer_name": "tok", "push_to_hub": True,
                "learning_rate": 0.005, "max_train_steps": 10, "resume_from_checkpoint": None,
                "output_dir": Path("/o"), "sweep": ["lr=1", "n=2"]}
    want = {"tokenizer_name": "tok", "push_to_hub": True, "learning_rate": 0.005, "max_train_steps": 10,
            "resume_from_checkpoint": None, "output_dir": "/o", "sweep": "['lr=1', 'n=2']"}
    assert config_for_trackers(settings) == want
    as_dataclass = make_dataclass("Settings", list(settings))(**settings)
    assert config_for_trackers(as_dataclass) == want
    json.dumps(config_for_trackers(settings))


def test_an_epoch_with_a_micro_batch_left_over_drops_it_and_goes_on(tmp_path):
    """5 micro-batches per epoch, accumulation 2: 2 optimizer steps per epoch use 4 of them; the fifth is not
    trained on (a step never spans two epochs) and the run goes on into the next epoch to its last step."""
    source = Source(n=10, batch=2)
    summary, _ = _run(tmp_path / "o", 4, accum=2, source=source)
    assert summary.step == 4
    used = [(e, j) for e, j in source.served if j < 4]
    assert used == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    assert [(r[0], r[1], r[2]) for r in _rows(tmp_path / "o")] == [("1", "0", "0"), ("2", "0", "1"),
                                                                  ("3", "1", "0"), ("4", "1", "1")]


def test_resuming_a_finished_run_says_so_and_trains_nothing(tmp_path, capsys):
    _run(tmp_path / "o", 3, ckpt=3)
    capsys.readouterr()
    source = Source()
    again, _ = _run(tmp_path / "o", 3, ckpt=3, resume="latest", source=source)
    assert again.step == 3 and source.served == []
    assert "Already trained to step 3 (>= 3); nothing to do." in capsys.readouterr().out


def test_the_progress_bar_shows_loss_rate_epoch_and_skipped_updates(tmp_path, capsys):
    _run(tmp_path / "a", 3)
    bar = capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]
    assert "Training fake" in bar and "3/3" in bar and "lr=0.01" in bar and "epoch=0" in bar and "loss=" in bar
    assert "skipped" not in bar  # said only when there are some
    _run(tmp_path / "b", 3, scaler=torch.amp.GradScaler("cpu"), source=Source(poison={(0, 1)}))
    assert "skipped=1" in capsys.readouterr().err.replace("\r", "\n").splitlines()[-1]


def test_an_old_checkpoint_the_file_system_will_not_remove_does_not_end_the_run(tmp_path, monkeypatch):
    """--checkpoints_total_limit removes old checkpoints; on NFS a file still open elsewhere makes its folder "busy"
    (EBUSY). That leftover must not end a run that is otherwise fine: the newer checkpoints are written and kept."""
    import errno
    import os

    real_rmdir = os.rmdir

    def rmdir(path, *a, **k):
        if str(path).endswith("checkpoint-1"):
            raise OSError(errno.EBUSY, "Device or resource busy", str(path))
        return real_rmdir(path, *a, **k)

    monkeypatch.setattr(os, "rmdir", rmdir)
    summary, _ = _run(tmp_path / "o", 3, ckpt=1, checkpoints_total_limit=1)
    assert summary.step == 3
    # checkpoint-2 went as usual; checkpoint-1's emptied folder stays (its removal was refused) and is no checkpoint
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [3] and (tmp_path / "o" / "checkpoint-1").is_dir()
