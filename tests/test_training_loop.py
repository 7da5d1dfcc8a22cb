"""The shared loop on the tiny SD-1 model with synthetic latents: resume, frozen weights, schedules, NaN, signals, DDP."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest
import torch

from utils.embeddings import Embedding
from utils.errors import UserError
from utils.trainers.textual_inversion import TextualInversion, tokenize_with_placeholder
from utils.training import LoopConfig, OptimConfig, Outputs, TrainingDiverged, list_checkpoints, make_accelerator, train


class SynthSource:
    """Random latents; rank r of W takes slice r of each global micro-batch (positions are global)."""

    def __init__(self, n=8, batch=2, rank=0, world=1, on_batch=None, poison_at=None):
        g = torch.Generator().manual_seed(1)
        self.latents = torch.randn(n, 4, 8, 8, generator=g)
        self.n, self.b, self.rank, self.world = n, batch, rank, world
        self.micro_batches_per_epoch = n // (batch * world)
        self.on_batch, self.poison_at, self.calls = on_batch, poison_at, 0

    def iter_epoch(self, epoch, skip):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch)).tolist()
        gb = self.b * self.world
        for j in range(skip, self.micro_batches_per_epoch):
            positions = list(range(j * gb + self.rank * self.b, j * gb + (self.rank + 1) * self.b))
            lat = self.latents[[perm[p] for p in positions]].clone()
            self.calls += 1
            if self.on_batch:
                self.on_batch(self.calls)
            if self.poison_at is not None and self.calls >= self.poison_at:
                lat[:] = float("nan")
            yield {"latents": lat, "prompts": ["a photo of myemb"] * self.b, "positions": positions}


def _setup(model_dir, out_dir, steps, *, lr="0.01", batch=2, accum=1, resume=None, ckpt=5, source=None, world=1,
           rank=0):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    init = pipe.text_encoder.get_input_embeddings().weight[[320, 1125]].detach().clone()
    ti = TextualInversion.build(pipe, Embedding("myemb", init))
    acc = make_accelerator(Path(out_dir), "no", accum, "none", 0)
    cfg = LoopConfig(output_dir=Path(out_dir), max_train_steps=steps, train_batch_size=batch,
                     gradient_accumulation_steps=accum, checkpointing_steps=ckpt, save_every=0, preview_every=0,
                     resume_from_checkpoint=resume, optim=OptimConfig(learning_rate=lr))
    src = source or SynthSource(batch=batch, rank=rank, world=world)
    sched = DDPMScheduler.from_config(pipe.scheduler.config)
    return pipe, ti, acc, cfg, src, sched


def _run(model_dir, out_dir, steps, **kw):
    pipe, ti, acc, cfg, src, sched = _setup(model_dir, out_dir, steps, **kw)
    summary = train(acc, ti, src, sched, cfg, Outputs(save=lambda s: [], final=lambda s, o: []))
    return summary, ti.state_dict()["vectors.0"], pipe


def test_exact_resume_is_bit_identical(tiny_sd1, tmp_path):
    s_full, v_full, _ = _run(tiny_sd1, tmp_path / "full", 10)
    s_half, _, _ = _run(tiny_sd1, tmp_path / "split", 5)
    assert s_half.step == 5 and [s for s, _ in list_checkpoints(tmp_path / "split")] == [5]
    s_rest, v_rest, _ = _run(tiny_sd1, tmp_path / "split", 10, resume="latest")
    assert s_full.step == s_rest.step == 10
    assert torch.equal(v_full, v_rest)
    csv_full = (tmp_path / "full" / "textual_inversion_loss.csv").read_text()
    csv_split = (tmp_path / "split" / "textual_inversion_loss.csv").read_text()
    assert csv_full == csv_split and len(csv_full.splitlines()) == 11


def test_only_the_vectors_change(tiny_sd1, tmp_path):
    from diffusers import StableDiffusionPipeline

    before = StableDiffusionPipeline.from_pretrained(tiny_sd1)
    _, vectors, pipe = _run(tiny_sd1, tmp_path / "o", 6, lr="0.05")
    for name in ("text_encoder", "unet", "vae"):
        a, b = getattr(before, name).state_dict(), getattr(pipe, name).state_dict()
        # the splice wraps the token embedding (".base."); the trained vectors are not registered in the encoder
        a_vals = sorted((k.replace(".base.", "."), v) for k, v in a.items())
        b_vals = sorted((k.replace(".base.", "."), v) for k, v in b.items())
        assert [k for k, _ in a_vals] == [k for k, _ in b_vals]
        assert all(torch.equal(x, y) for (_, x), (_, y) in zip(a_vals, b_vals)), name
    vocab = pipe.text_encoder.get_input_embeddings().weight
    assert vocab.shape[0] == 49408 and not vocab.requires_grad
    init = before.text_encoder.get_input_embeddings().weight[[320, 1125]]
    assert not torch.equal(vectors, init)  # it did train


def test_optimizer_holds_only_the_vectors(tiny_sd1, tmp_path):
    _run(tiny_sd1, tmp_path / "o", 5)
    opt = torch.load(tmp_path / "o" / "checkpoint-5" / "optimizer.bin", weights_only=True)
    tensors = [t for st in opt["state"].values() for t in st.values() if torch.is_tensor(t) and t.numel() > 1]
    assert sum(t.numel() for t in tensors) == 2 * 2 * 32  # exp_avg + exp_avg_sq of a [2, 32] table
    ckpt_bytes = sum(f.stat().st_size for f in (tmp_path / "o" / "checkpoint-5").iterdir())
    assert ckpt_bytes < 64_000


def test_schedule_string_ends_training_early(tiny_sd1, tmp_path):
    summary, _, _ = _run(tiny_sd1, tmp_path / "o", 100, lr="0.01:3, 0.001:4")
    assert summary.step == 4 and summary.stopped_by == "schedule"
    rows = (tmp_path / "o" / "textual_inversion_loss.csv").read_text().splitlines()
    assert [r.split(",")[-1] for r in rows[1:]] == ["0.01", "0.01", "0.01", "0.001"]


def test_gradient_accumulation_matches_bigger_batch(tiny_sd1, tmp_path):
    _, v_accum, _ = _run(tiny_sd1, tmp_path / "a", 3, batch=1, accum=2, source=SynthSource(batch=1))
    _, v_batch, _ = _run(tiny_sd1, tmp_path / "b", 3, batch=2, accum=1)
    # accumulation over the same global positions gives the same update as one batch of 2
    torch.testing.assert_close(v_accum, v_batch, rtol=1e-4, atol=1e-6)


def test_nan_stops_with_a_clear_error_and_saves_nothing(tiny_sd1, tmp_path):
    pipe, ti, acc, cfg, _, sched = _setup(tiny_sd1, tmp_path / "o", 10, ckpt=2)
    saved = []
    with pytest.raises(TrainingDiverged, match="diverged at step 4"):
        train(acc, ti, SynthSource(poison_at=4), sched, cfg,
              Outputs(save=lambda s: saved.append(s) or [], final=lambda s, o: saved.append(("final", s)) or []))
    assert [s for s, _ in list_checkpoints(tmp_path / "o")] == [2]
    assert ("final", 3) not in saved and not any(isinstance(s, tuple) for s in saved)


def test_stop_signal_checkpoints_and_resume_matches(tiny_sd1, tmp_path):
    _, v_full, _ = _run(tiny_sd1, tmp_path / "full", 8, ckpt=100)
    src = SynthSource(on_batch=lambda n: os.kill(os.getpid(), signal.SIGUSR1) if n == 3 else None)
    s1, _, _ = _run(tiny_sd1, tmp_path / "cut", 8, ckpt=100, source=src)
    assert s1.stopped_by == "signal" and s1.step == 3
    assert [s for s, _ in list_checkpoints(tmp_path / "cut")] == [3]
    s2, v_cut, _ = _run(tiny_sd1, tmp_path / "cut", 8, ckpt=100, resume="latest")
    assert s2.step == 8 and torch.equal(v_full, v_cut)


def test_signal_checkpoints_even_without_periodic_checkpoints(tiny_sd1, tmp_path):
    src = SynthSource(on_batch=lambda n: os.kill(os.getpid(), signal.SIGTERM) if n == 2 else None)
    s1, _, _ = _run(tiny_sd1, tmp_path / "o", 8, ckpt=0, source=src)
    assert s1.stopped_by == "signal" and [s for s, _ in list_checkpoints(tmp_path / "o")] == [2]


def test_resume_refuses_another_layout_or_run(tiny_sd1, tmp_path):
    _run(tiny_sd1, tmp_path / "o", 4, ckpt=2)
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        _run(tiny_sd1, tmp_path / "o", 6, batch=1, accum=2, resume="latest", source=SynthSource(batch=1))


def test_placeholder_tokenization():
    from utils.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer()
    ids = tokenize_with_placeholder(tok, ["a photo of my-emb, my-emb"], "my-emb", 3)[0].tolist()
    assert ids[:5] == [49406, 320, 1125, 539, -1] and ids[5:9] == [-2, -3, 267, -1]
    assert ids[9:12] == [-2, -3, 49407] and len(ids) == 77 and ids[-1] == 49407
    # never split: a placeholder that does not fit in the first 75 tokens opens the second chunk (as A1111)
    long = " ".join(["word"] * 74) + " my-emb"
    ids = tokenize_with_placeholder(tok, [long], "my-emb", 3)[0].tolist()
    assert -1 not in ids[:77] and ids[75] == 49407 and ids[77:82] == [49406, -1, -2, -3, 49407]


def test_bad_epoch_length(tiny_sd1, tmp_path):
    with pytest.raises(UserError, match="gradient_accumulation_steps"):
        _run(tiny_sd1, tmp_path / "o", 3, batch=2, accum=8)
