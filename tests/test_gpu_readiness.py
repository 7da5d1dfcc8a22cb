"""CUDA paths checked on the CPU: fp16 VAE decode, skipped fp16 steps, the offloaded text encoder's dtype, what DDP
wraps and broadcasts, the dtypes models load in, the bench's memory window, xformers messages, bench/gpu_smoke.sh."""

from __future__ import annotations

import numpy as np
import pytest
import torch


# ---------------------------------------------------------------------------------------------------------------
# fp16 VAE decode honours force_upcast


@pytest.mark.filterwarnings("ignore:invalid value encountered in cast")  # the NaN picture of the failure case
def test_fp16_vae_with_force_upcast_decodes_in_float32(tiny_sd1):
    from types import SimpleNamespace

    from diffusers import AutoencoderKL
    from diffusers.image_processor import VaeImageProcessor

    from utils.generation import decode_latents

    vae = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").half().requires_grad_(False)
    reference = AutoencoderKL.from_pretrained(tiny_sd1 / "vae").half().float().requires_grad_(False)  # same weights
    pipe = SimpleNamespace(vae=vae, image_processor=VaeImageProcessor(vae_scale_factor=8))
    # Activations past fp16's range (65504), as SDXL's VAE produces: fp16 gives NaN, i.e. a black picture.
    latents = torch.full((1, 4, 8, 8), 7e4) * vae.config.scaling_factor
    latents[0, 1] *= -0.5

    vae.register_to_config(force_upcast=False)
    black = np.asarray(decode_latents(pipe, latents)[0])
    assert black.max() == 0  # the failure this guards against

    vae.register_to_config(force_upcast=True)
    weights = {k: v.clone() for k, v in vae.state_dict().items()}
    image = np.asarray(decode_latents(pipe, latents)[0])
    expected = np.asarray(decode_latents(SimpleNamespace(vae=reference, image_processor=pipe.image_processor),
                                         latents)[0])
    assert image.max() > 0 and np.array_equal(image, expected)
    assert vae.dtype == torch.float16  # put back, bit for bit
    assert all(torch.equal(v, weights[k]) for k, v in vae.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------
# The loop on synthetic latents (tiny SD-1 textual inversion), one or two processes


class Latents:
    """Random latents; rank r of W takes slice r of each global micro-batch. ``poison``: (epoch, batch index) slots
    whose latents are NaN (a forward that overflows), found again after a resume."""

    def __init__(self, n=8, batch=2, rank=0, world=1, poison=()):
        self.latents = torch.randn(n, 4, 8, 8, generator=torch.Generator().manual_seed(1))
        self.n, self.b, self.rank, self.world, self.poison = n, batch, rank, world, set(poison)
        self.micro_batches_per_epoch = n // (batch * world)
        self.served: list[tuple[int, int]] = []

    def iter_epoch(self, epoch, skip):
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch)).tolist()
        gb = self.b * self.world
        for j in range(skip, self.micro_batches_per_epoch):
            positions = list(range(j * gb + self.rank * self.b, j * gb + (self.rank + 1) * self.b))
            lat = self.latents[[perm[p] for p in positions]].clone()
            if (epoch, j) in self.poison:
                lat[:] = float("nan")
            self.served.append((epoch, j))
            yield {"latents": lat, "prompts": ["a photo of myemb"] * self.b, "positions": positions}


def _ti_run(model_dir, out_dir, steps, *, source, scaler=None, resume=None, ckpt=0, save_every=0, lr="0.01",
            schedule="constant", report_to="none", logged=None):
    from pathlib import Path

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from utils.embeddings import Embedding
    from utils.trainers.textual_inversion import TextualInversion
    from utils.training import LoopConfig, OptimConfig, Outputs, make_accelerator, train

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    init = pipe.text_encoder.get_input_embeddings().weight[[320, 1125]].detach().clone()
    ti = TextualInversion.build(pipe, Embedding("myemb", init))
    acc = make_accelerator(Path(out_dir), "no", 1, "none", 0)
    if scaler is not None:
        acc.scaler = scaler  # what accelerate builds for fp16 on a GPU; on the CPU it has to be handed in
    if logged is not None:
        acc.log = lambda values, step=None, **kw: logged.append((step, dict(values)))
    cfg = LoopConfig(output_dir=Path(out_dir), max_train_steps=steps, train_batch_size=source.b,
                     checkpointing_steps=ckpt, save_every=save_every, preview_every=0, resume_from_checkpoint=resume,
                     report_to=report_to, optim=OptimConfig(learning_rate=lr, lr_scheduler=schedule))
    saves = []
    outputs = Outputs(save=lambda s: saves.append(s) or [], final=lambda s, o: saves.append(("final", s, o)) or [])
    summary = train(acc, ti, source, DDPMScheduler.from_config(pipe.scheduler.config), cfg, outputs)
    return summary, ti, pipe, acc, saves


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(worker, *args, timeout=300):
    """Run ``worker(rank, *args)`` in 2 forked processes joined into one gloo group by accelerate."""
    import time

    import torch.multiprocessing as mp

    ctx = mp.start_processes(_rank_entry, args=(worker, _free_port(), args), nprocs=2, join=False,
                             start_method="fork")
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1):
            assert time.monotonic() < deadline, "the 2 ranks timed out"
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()


def _rank_entry(rank, worker, port, args):
    import os

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    torch.set_num_threads(1)
    worker(rank, *args)


# ---------------------------------------------------------------------------------------------------------------
# DDP wraps only the trained parameters


def _frozen_state(model):
    vectors = {id(v) for v in model.vectors}
    state = {f"param:{n}": p.detach().clone() for n, p in model.named_parameters() if id(p) not in vectors}
    state.update({f"buffer:{n}": b.detach().clone() for n, b in model.named_buffers()})
    return state


def _ddp_frozen_worker(rank, model_dir, out_dir):
    import os

    out = os.path.join(out_dir, f"rank{rank}")
    # Build the run as _ti_run does, but make rank 1's frozen weights and buffers differ on purpose first.
    from pathlib import Path

    from diffusers import DDPMScheduler, StableDiffusionPipeline

    from utils.embeddings import Embedding
    from utils.trainers.textual_inversion import TextualInversion
    from utils.training import LoopConfig, OptimConfig, Outputs, make_accelerator, train

    pipe = StableDiffusionPipeline.from_pretrained(model_dir)
    init = pipe.text_encoder.get_input_embeddings().weight[[320, 1125]].detach().clone()
    ti = TextualInversion.build(pipe, Embedding("myemb", init))
    buffers = dict(ti.model.named_buffers())
    assert any("position_ids" in n for n in buffers), sorted(buffers)
    if rank == 1:
        with torch.no_grad():
            pipe.unet.conv_in.weight.add_(0.5)
            pipe.text_encoder.get_input_embeddings().weight[:100].mul_(2.0)
            for name, b in buffers.items():
                if "position_ids" in name:
                    b.copy_(b.flip(-1))
    before = _frozen_state(ti.model)
    acc = make_accelerator(Path(out), "no", 1, "none", 0)
    assert acc.num_processes == 2
    cfg = LoopConfig(output_dir=Path(out), max_train_steps=3, train_batch_size=1, checkpointing_steps=0,
                     save_every=0, preview_every=0, optim=OptimConfig(learning_rate="0.05"))
    train(acc, ti, Latents(batch=1, rank=rank, world=2), DDPMScheduler.from_config(pipe.scheduler.config), cfg,
          Outputs(save=lambda s: [], final=lambda s, o: []))
    after = _frozen_state(ti.model)
    torch.save({"unchanged": sorted(k for k in before if torch.equal(before[k], after[k])), "all": sorted(before),
                "vectors": [v.detach().clone() for v in ti.model.vectors], "init": init}, out + ".pt")
    acc.end_training()


def test_ddp_leaves_each_ranks_frozen_weights_and_buffers_alone(tiny_sd1, tmp_path):
    """Rank 1's frozen weights and buffers differ from rank 0's on purpose: DDP must neither broadcast them when it
    wraps the model nor before each forward, and the trained vectors' gradients must still be averaged (the loop
    checks at the end that both ranks hold identical vectors)."""
    _two_ranks(_ddp_frozen_worker, str(tiny_sd1), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    for r in (r0, r1):
        assert r["unchanged"] == r["all"], sorted(set(r["all"]) - set(r["unchanged"]))[:5]
    assert any(k.startswith("buffer:") for k in r1["all"])
    for a, b, init in zip(r0["vectors"], r1["vectors"], r0["init"][None]):
        assert torch.equal(a, b) and not torch.equal(a, init)


def test_a_trained_tensor_outside_the_wrapped_module_is_refused():
    from utils.distributed import sync_only_trainables

    model = torch.nn.Sequential(torch.nn.Linear(2, 2))
    loose = torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"shapes \[\(3,\)\].*not be synchronised"):
        sync_only_trainables(model, [model[0].weight, loose])
    assert sync_only_trainables(model, [model[0].weight]) == ["0.bias"]


# ---------------------------------------------------------------------------------------------------------------
# fp16 steps the loss scaler skips


def _scaler():
    return torch.amp.GradScaler("cpu")  # what accelerate uses for fp16 on a GPU, here on the CPU


def _csv(out_dir):
    return (out_dir / "textual_inversion_loss.csv").read_text().splitlines()


def test_skipped_fp16_steps_are_not_counted_scheduled_logged_or_saved(tiny_sd1, tmp_path):
    from utils.lr_schedule import LearningRate

    # Batches 2 and 5 overflow in the forward (NaN loss): the scaler skips those updates; the NaN guard must not
    # end the run over them.
    source = Latents(poison={(0, 2), (1, 1)})
    logged = []
    summary, ti, _, acc, saves = _ti_run(tiny_sd1, tmp_path, 6, source=source, scaler=_scaler(), save_every=1,
                                         schedule="linear", report_to="tensorboard", logged=logged)
    assert (summary.step, summary.skipped_steps, summary.stopped_by) == (6, 2, "max_steps")
    assert source.served == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
    rows = [r.split(",") for r in _csv(tmp_path)[1:]]
    assert [r[0] for r in rows] == ["1", "2", "3", "4", "5", "6"]
    schedule = LearningRate("0.01", 6, "linear")
    assert [r[4] for r in rows] == [f"{schedule.rate(k):g}" for k in range(6)]  # the schedule did not move on skips
    assert all(np.isfinite(float(r[3])) for r in rows)
    assert [s for s in saves if not isinstance(s, tuple)] == [1, 2, 3, 4, 5, 6]  # the last step's copy included
    optimizer = saves[-1][2]
    assert int(optimizer.state_dict()["state"][0]["step"]) == 6  # AdamW made 6 updates
    assert torch.isfinite(ti.model.vectors[0]).all()
    last = {step: values for step, values in logged}[6]
    assert last["skipped_steps"] == 2 and last["loss_scale"] == 2.0 ** 16 / 4  # halved on each skip


def test_resume_after_skipped_steps_is_bit_identical(tiny_sd1, tmp_path):
    poison = {(0, 2), (1, 1)}
    _, full, _, _, _ = _ti_run(tiny_sd1, tmp_path / "full", 8, source=Latents(poison=poison), scaler=_scaler(),
                               ckpt=4)
    _ti_run(tiny_sd1, tmp_path / "cut", 4, source=Latents(poison=poison), scaler=_scaler(), ckpt=4)
    again = Latents(poison=poison)
    summary, cut, _, _, _ = _ti_run(tiny_sd1, tmp_path / "cut", 8, source=again, scaler=_scaler(), ckpt=4,
                                    resume="latest")
    assert again.served[0] == (1, 1)  # the data goes on after the 4 steps and the 1 skipped update before them
    assert summary.step == 8 and summary.skipped_steps == 2
    assert torch.equal(full.model.vectors[0], cut.model.vectors[0])
    assert _csv(tmp_path / "full") == _csv(tmp_path / "cut")


def test_an_update_that_never_stops_being_skipped_ends_the_run(tiny_sd1, tmp_path, monkeypatch):
    from utils import training

    monkeypatch.setattr(training, "MAX_SKIPPED_IN_A_ROW", 5)
    poison = {(e, j) for e in range(1, 10) for j in range(4)}
    with pytest.raises(training.TrainingDiverged, match="skipped 5 updates in a row"):
        _ti_run(tiny_sd1, tmp_path, 100, source=Latents(poison=poison), scaler=_scaler())
    assert len(_csv(tmp_path)) == 1 + 4  # the 4 real steps of the first epoch were logged


def _skip_worker(rank, model_dir, out_dir):
    import os

    # Only rank 1's forward overflows: DDP averages its NaN gradients into rank 0's, so both scalers skip.
    source = Latents(batch=1, rank=rank, world=2, poison={(0, 1)} if rank == 1 else set())
    summary, ti, _, acc, _ = _ti_run(model_dir, os.path.join(out_dir, "run"), 3, source=source, scaler=_scaler())
    torch.save({"step": summary.step, "skipped": summary.skipped_steps, "served": source.served,
                "vectors": ti.model.vectors[0].detach().clone()}, os.path.join(out_dir, f"rank{rank}.pt"))
    acc.end_training()


def test_two_processes_skip_the_same_updates(tiny_sd1, tmp_path):
    _two_ranks(_skip_worker, str(tiny_sd1), str(tmp_path))
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2))
    assert r0["step"] == r1["step"] == 3 and r0["skipped"] == r1["skipped"] == 1
    assert r0["served"] == r1["served"] == [(0, 0), (0, 1), (0, 2), (0, 3)]
    assert torch.equal(r0["vectors"], r1["vectors"])


# ---------------------------------------------------------------------------------------------------------------
# --offload_text_encoder: float32 on the CPU, previews as without offloading


def _hn_trainable(model_dir, offload):
    from utils.hypernetwork import Hypernetwork, HypernetworkOptions
    from utils.trainers.hypernetwork import HypernetworkTrainable
    from utils.models import ModelSource
    from utils.training_setup import ModelOptions, load_model_for_training

    loaded = load_model_for_training(ModelSource(str(model_dir)), ModelOptions("bf16"), "cpu")
    torch.manual_seed(0)
    hn = Hypernetwork.create("hn", [32, 64], HypernetworkOptions(activation_func="relu"))
    for p in hn.parameters():  # A1111 starts the last layers at zero; make this one visible in the image
        torch.nn.init.normal_(p, std=0.05)
    return loaded, HypernetworkTrainable.build(loaded, hn, "cpu", offload)


def test_offloaded_text_encoder_is_float32_and_previews_are_unchanged(tiny_sd1, tmp_path):
    from utils.previews import PreviewOptions, render_previews

    opts = PreviewOptions(prompt="a photo", steps=2, width=64, height=64)
    images = {}
    for offload in (False, True):
        loaded, trainable = _hn_trainable(tiny_sd1, offload)
        te = loaded.pipeline.text_encoder
        assert loaded.pipeline.unet.dtype == torch.bfloat16
        assert te.dtype == (torch.float32 if offload else torch.bfloat16) and te.device.type == "cpu"
        hidden, _ = trainable.conditioning.get(["a photo of a thing"])
        assert hidden.dtype == te.dtype
        weights = {k: v.clone() for k, v in te.state_dict().items()}
        trainable.train(False)
        out = render_previews("cpu", loaded, trainable.conditioning.encoder, opts, tmp_path / str(offload), "hn", 1,
                              "a photo")
        images[offload] = np.asarray(out[0][0])
        assert te.dtype == (torch.float32 if offload else torch.bfloat16)  # back where it was, bit for bit
        assert all(torch.equal(v, weights[k]) for k, v in te.state_dict().items())
    assert np.array_equal(images[True], images[False])


# ---------------------------------------------------------------------------------------------------------------
# Loading for training: every component created in its training dtype, the VAE from the files' float32 values
# (peak host RAM itself is not measurable on the tiny models: a few MB either way)


@pytest.fixture(scope="module")
def sd1_single_file(tiny_sd1, tmp_path_factory):
    from utils.ldm_export import export_single_file

    return export_single_file(tiny_sd1, tmp_path_factory.mktemp("ckpt") / "tiny-sd1.safetensors")


@pytest.mark.parametrize("kind", ["folder", "safetensors", "ckpt"])
def test_training_load_creates_components_in_their_dtype(tiny_sd1, sd1_single_file, kind, monkeypatch, tmp_path):
    from safetensors.torch import load_file

    from utils import training_setup
    from utils.models import ModelSource, load_pipeline
    from utils.training_setup import ModelOptions, load_model_for_training

    single = sd1_single_file
    if kind == "ckpt":  # a pickle with Lightning's state_dict wrapper
        single = tmp_path / "tiny-sd1.ckpt"
        torch.save({"state_dict": load_file(str(sd1_single_file))}, single)
    source = (ModelSource(str(tiny_sd1)) if kind == "folder" else
              ModelSource(str(single), model_config=str(tiny_sd1)))
    reference = load_pipeline(source).pipeline  # float32, the files' own values
    seen = {}

    def spy(*args, **kwargs):
        loaded = load_pipeline(*args, **kwargs)
        seen.update({n: getattr(loaded.pipeline, n).dtype for n in ("unet", "text_encoder", "vae")})
        return loaded

    monkeypatch.setattr(training_setup, "load_pipeline", spy)
    pipe = load_model_for_training(source, ModelOptions("fp16"), "cpu").pipeline
    # as they come out of the loader, before anything is cast: no float32 UNet / text encoder in host RAM
    assert seen == {"unet": torch.float16, "text_encoder": torch.float16, "vae": torch.float32}
    for name in ("unet", "text_encoder", "vae"):
        ours, ref = getattr(pipe, name).state_dict(), getattr(reference, name).state_dict()
        assert ours.keys() == ref.keys()
        dtype = torch.float32 if name == "vae" else torch.float16
        assert all(ours[k].dtype == dtype and torch.equal(ours[k], ref[k].to(dtype)) for k in ref), name


# ---------------------------------------------------------------------------------------------------------------
# bench/bench_train.py: the memory window holds the training steps, not the data preparation


def _load_bench(name):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_{name}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_bench_prepares_every_modes_data_outside_the_memory_window(tiny_sd1, monkeypatch):
    bench = _load_bench("bench_train")
    window = {"open": False}
    calls = []
    enter, exit_ = bench.MemoryMeter.__enter__, bench.MemoryMeter.__exit__
    make_samples = bench.make_samples

    def opened(self):
        window["open"] = True
        return enter(self)

    def closed(self, *exc):
        window["open"] = False
        return exit_(self, *exc)

    def spy(*args, **kwargs):
        calls.append(window["open"])
        return make_samples(*args, **kwargs)

    monkeypatch.setattr(bench.MemoryMeter, "__enter__", opened)
    monkeypatch.setattr(bench.MemoryMeter, "__exit__", closed)
    monkeypatch.setattr(bench, "make_samples", spy)
    settings = bench.Settings(steps=2, warmup=1, paired=True)
    for mode in (*bench.MODES, "many-3"):  # many-3: three embeddings in one run (the GPU K = 1, 4, 16 rows)
        calls.clear()
        result = bench.run_case(settings, bench.Case(mode, 1))
        assert result.steps_timed == 2 and result.peak_mem_mb is not None
        assert calls and not any(calls), (mode, calls)  # the VAE encode of the samples ran before the window
        assert result.images_per_s == pytest.approx((3 if mode == "many-3" else 1) * result.steps_per_s)


def test_memory_meter_counts_only_what_happens_inside_it():
    bench = _load_bench("bench_train")
    mb = 2 ** 20
    before = torch.ones(200 * mb // 4)  # a transient 200 MB before the window (data preparation)
    del before
    with bench.MemoryMeter("cpu") as meter:
        inside = torch.ones(100 * mb // 4)
        inside += 1
    del inside
    added = meter.peak_mb - meter.base_mb
    assert 90 <= added < 190, (meter.kind, meter.base_mb, meter.peak_mb)


# ---------------------------------------------------------------------------------------------------------------
# xformers built for another torch/CUDA: one line, not a traceback; the attention backend under hypernetworks

NO_OPERATOR = ("No operator found for `memory_efficient_attention_forward` with inputs:\n"
               "     query       : shape=(1, 2, 1, 40) (torch.float32)\n"
               "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA support")


class _BrokenXformers:
    """Stands in for an xformers build made for another torch: fails when its ops are used, or when imported."""

    def __init__(self, at_import: bool):
        self.at_import = at_import

    @property
    def ops(self):
        if self.at_import:
            raise ImportError("/site-packages/xformers/_C.so: undefined symbol: _ZN3c104cuda9SetDeviceEi")
        return self

    def memory_efficient_attention(self, q, k, v):
        raise NotImplementedError(NO_OPERATOR)


@pytest.mark.parametrize("at_import", [False, True])
def test_a_mismatched_xformers_build_is_one_line(tiny_sd1, monkeypatch, at_import):
    import diffusers.models.attention_processor as ap
    from diffusers import UNet2DConditionModel

    from utils.errors import UserError
    from utils.models import enable_xformers

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet")
    randn = torch.randn
    monkeypatch.setattr(ap, "is_xformers_available", lambda: True)
    monkeypatch.setattr(ap, "xformers", _BrokenXformers(at_import), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch, "randn", lambda *a, device=None, **k: randn(*a, **k))  # diffusers' probe tensor
    with pytest.raises(UserError) as e:
        enable_xformers(unet)
    msg = str(e.value)
    assert "\n" not in msg and "is installed but cannot run with torch" in msg
    assert ("undefined symbol" if at_import else "No operator found for `memory_efficient_attention_forward`") in msg
    assert "pip install -r requirements-cuda.txt" in msg and "SDPA" in msg
    assert {type(p).__name__ for p in unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_hypernetwork_runs_name_the_attention_they_run_on(tiny_sd1):
    from diffusers import UNet2DConditionModel
    from diffusers.models.attention_processor import XFormersAttnProcessor

    from utils.cluster import attention_backend
    from utils.hypernetwork import Hypernetwork, HypernetworkOptions, install_hypernetworks

    unet = UNet2DConditionModel.from_pretrained(tiny_sd1 / "unet")
    hn = Hypernetwork.create("hn", [32, 64], HypernetworkOptions())
    install_hypernetworks(unet, [(hn, 1.0)])
    assert attention_backend(unet) == "torch SDPA with hypernetworks"
    unet.set_attn_processor(XFormersAttnProcessor())  # what --enable_xformers_memory_efficient_attention installs
    install_hypernetworks(unet, [(hn, 1.0)])
    assert attention_backend(unet) == "xformers with hypernetworks"


# ---------------------------------------------------------------------------------------------------------------
# An error on one rank ends the others within seconds, not after the collective timeout

FAILING_RANK = """
import sys
import torch
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from utils.errors import UserError, exit_on_user_error
from utils.training import make_accelerator

with exit_on_user_error("worker"):
    acc = make_accelerator(Path(sys.argv[2]), "no", 1, "none", 0, ddp_timeout=1800)
    for i in range(1000000):
        if i == 3 and acc.process_index == 1:
            raise UserError("rank 1 met a bad input")  # rank 0 is already waiting in the next all-reduce
        acc.reduce(torch.ones(1), "sum")
"""


def test_an_error_on_one_rank_ends_the_others_without_waiting_for_the_timeout(tmp_path):
    import os
    import subprocess
    import sys
    import time
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    script = tmp_path / "worker.py"
    script.write_text(FAILING_RANK)
    env = {**os.environ, "ACCELERATE_USE_CPU": "true", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    p = subprocess.run([str(Path(sys.executable).parent / "accelerate"), "launch", "--config_file",
                        str(root / "configs" / "accelerate" / "cpu_2proc.yaml"), "--main_process_port",
                        str(_free_port()), str(script), str(root), str(tmp_path)],
                       cwd=root, env=env, capture_output=True, text=True, timeout=300)
    took = time.monotonic() - t0
    out = p.stdout + p.stderr
    assert p.returncode != 0 and "worker: error: rank 1 met a bad input" in out, out[-3000:]
    assert took < 120, took  # the launcher stops rank 0 at once; the collective timeout is 1800 s


# ---------------------------------------------------------------------------------------------------------------
# bench/gpu_smoke.sh, CPU dry run: every command it will run on the first GPU still runs


@pytest.mark.slow
def test_gpu_smoke_script_tiny_mode_runs_and_prints_its_table(tmp_path):
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(root / "bench" / "gpu_smoke.sh"), "--tiny", str(tmp_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    table = {line.split(" | ")[0].strip("| "): line.split(" | ")[2] for line in p.stdout.splitlines()
             if line.startswith("| ") and not line.startswith("| check")}
    for check in ("ti-bf16", "hn-bf16", "inference-bf16", "bench ours sdpa b1", "bench hypernetwork sdpa b1"):
        assert table.get(check) == "ok", (check, p.stdout[-3000:])
    assert table.get("bench ours xformers") == "n/a"  # no xformers on a CPU: reported, not a failure
    assert "2 steps" in p.stdout and "image mean" in p.stdout
