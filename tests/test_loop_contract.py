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

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(4, 4, 1)
        with torch.no_grad():
            self.conv.weight.copy_(torch.randn(4, 4, 1, 1, generator=g) * 0.1)
            self.conv.bias.zero_()
        self.scale = nn.Parameter(torch.zeros(4))

    def forward(self, noisy_latents, timesteps, cond):
        return self.conv(noisy_latents) + self.scale[None, :, None, None] * cond[:, :, None, None]


class FakeTrainer:
    """The smallest thing the loop trains: every parameter of TinyDenoiser; a batch conditions it by a per-prompt
    vector."""

    kind = "fake"
    csv_name = "fake_loss.csv"

    def __init__(self, name="fake"):
        self.name = name
        self.model = TinyDenoiser()
        self.initial_step = 0
        self.mode_calls: list[str] = []

    def parameters(self):
        return list(self.model.parameters())

    def train(self):
        self.mode_calls.append("train")

    def eval(self):
        self.mode_calls.append("eval")

    def model_inputs(self, batch, device):
        cond = torch.tensor([[float(len(p) % 5), 1.0, -1.0, 0.5] for p in batch["prompts"]], device=device)
        return {"cond": cond}

    def vector_norm(self):
        return float(sum(p.detach().norm() ** 2 for p in self.parameters()) ** 0.5)

    def state_dict(self):
        return {k: v.detach().clone() for k, v in self.model.state_dict().items()}

    def load_state_dict(self, state):
        self.model.load_state_dict(state)


class Source:
    """n synthetic latents, a fixed permutation per epoch; positions are places in the epoch's global order."""

    def __init__(self, n=8, batch=2, poison_at=None):
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(n, 4, 4, 4, generator=g)
        self.n, self.b = n, batch
        self.micro_batches_per_epoch = n // batch
        self.poison_at, self.calls = poison_at, 0

    def iter_epoch(self, epoch, skip):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch)).tolist()
        for j in range(skip, self.micro_batches_per_epoch):
            positions = list(range(j * self.b, (j + 1) * self.b))
            latents = self.latents[[perm[p] for p in positions]].clone()
            self.calls += 1
            if self.poison_at is not None and self.calls >= self.poison_at:
                latents[:] = float("nan")
            yield {"latents": latents, "prompts": [f"prompt {perm[p]}" for p in positions], "positions": positions}


def _scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=100)


def _run(out: Path, steps: int, *, hooks=(), resume=None, ckpt=0, accum=1, batch=2, lr="0.01", outputs=None,
         source=None, trainer=None, **cfg_kw):
    trainer = trainer or FakeTrainer()
    acc = make_accelerator(out, "no", accum, "none", 0)
    cfg = LoopConfig(output_dir=out, max_train_steps=steps, train_batch_size=batch, gradient_accumulation_steps=accum,
                     checkpointing_steps=ckpt, save_every=0, preview_every=0, resume_from_checkpoint=resume,
                     optim=OptimConfig(learning_rate=lr), **cfg_kw)
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
    """Evaluating in the hook (eval mode, no gradients, its own generator) leaves the trained weights bit-identical."""
    _, plain = _run(tmp_path / "plain", 6)
    hook = StopAt(100)
    _, hooked = _run(tmp_path / "hooked", 6, hooks=[hook])
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
