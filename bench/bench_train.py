"""Training-step speed and memory: our textual-inversion step next to the diffusers example's, the bare model floor,
and hypernetwork training, on the same model, batches and settings in one run.

    python bench/bench_train.py                                   # tiny model, CPU, 64 px, batch 1 and 4, each mode twice
    python bench/bench_train.py --model sd15 --device cuda --resolution 512 --batch_sizes 1,4,8 \
        --mixed_precision fp16 --attention sdpa,xformers --gradient_checkpointing --json sd15.json

Modes (see bench/README.md):
  ours                  TextualInversion + utils.training.train (the real loop), latents cached
  ours-uncached         the same, the VAE encoding every batch (utils.training_setup.LoaderSource)
  diffusers-example     upstream textual_inversion.py's step: whole token matrix in AdamW, frozen rows copied back,
                        VAE encode every step (re-implemented here, weight decay 0)
  bare                  text encoder + UNet forward/backward with gradients to the vectors, nothing else (the floor)
  hypernetwork          HypernetworkTrainable + the real loop, latents cached, text encoder on the device
  hypernetwork-offload  the same with --offload_text_encoder
  many-K                K textual-inversion embeddings trained together (--concepts: ManyEmbeddings and
                        BalancedBatches), each with the case's batch size: the UNet sees K x batch per step; images/s
                        counts all K x batch. E.g. --modes ours,many-4,many-16 --batch_sizes 4 for the K = 1, 4, 16
                        rows of the many-embeddings issue.

Every (mode, batch size, repeat) runs in its own child process by default on CPU (clean peak-RSS numbers), repeats
interleaved so that load from other processes on a shared machine hits every mode alike. Steps/s = 1 / median step
time after --warmup steps (robust to interference); the mean-based rate is in the JSON too.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

MODES = ("ours", "ours-uncached", "diffusers-example", "bare", "hypernetwork", "hypernetwork-offload")
PLACEHOLDER = "benchtoken"
INIT_TEXT = "object"
NUM_VECTORS = 1


@dataclass
class Case:
    """One measurement: a mode at one batch size and model setting."""

    mode: str
    batch_size: int
    attention: str = "sdpa"
    gradient_checkpointing: bool = False
    repeat: int = 0


@dataclass
class Settings:
    """What every case shares."""

    model: str = "tiny"
    device: str = "cpu"
    resolution: int = 64
    mixed_precision: str = "no"
    steps: int = 150
    warmup: int = 20
    seed: int = 0
    paired: bool = False  # a bare step before each step, timed apart (see TimedSource, bare_on_a_copy)


@dataclass
class Result:
    case: Case
    steps_timed: int
    step_times_s: list[float]
    steps_per_s: float  # 1 / median step time
    steps_per_s_mean: float  # timed steps / their total time
    images_per_s: float
    peak_mem_mb: float | None
    base_mem_mb: float | None  # at the start of the mode (model loaded), so peak - base is what training adds
    mem_kind: str
    threads: int
    notes: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Memory


class MemoryMeter:
    """Peak memory over a block: CUDA allocated bytes, or the process's resident set on CPU.

    torch's CPU allocations bypass tracemalloc, so on CPU this resets and reads the kernel's own high-water mark
    (/proc/self/clear_refs + VmHWM, exact and free); where that is unavailable it samples psutil's RSS in a thread,
    and as a last resort reports ru_maxrss (the whole process's peak, including loading)."""

    def __init__(self, device: str):
        self.device = device
        self.kind = ""
        self.base_mb: float | None = None
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._thread = None
        self._sampled = 0

    def __enter__(self):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.kind = "cuda max_memory_allocated"
            self.base_mb = torch.cuda.memory_allocated() / 2**20
        elif _reset_hwm():
            self.kind = "peak RSS (VmHWM)"
            self.base_mb = _proc_status_kb("VmRSS") / 1024
        else:
            try:
                import psutil

                proc = psutil.Process()
                self.kind = "peak RSS (psutil, sampled)"
                self.base_mb = proc.memory_info().rss / 2**20

                def sample():
                    while not self._stop.wait(0.01):
                        self._sampled = max(self._sampled, proc.memory_info().rss)

                self._thread = threading.Thread(target=sample, daemon=True)
                self._thread.start()
            except ImportError:
                self.kind = "ru_maxrss (whole process)"
        return self

    def __exit__(self, *exc):
        import torch

        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
            self.peak_mb = torch.cuda.max_memory_allocated() / 2**20
        elif self.kind.startswith("peak RSS (VmHWM"):
            self.peak_mb = _proc_status_kb("VmHWM") / 1024
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self.peak_mb = self._sampled / 2**20
        else:
            import resource

            self.peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
        return False


def current_mem_mb(device: str) -> float:
    import torch

    if device.startswith("cuda"):
        return torch.cuda.memory_allocated() / 2**20
    try:
        return _proc_status_kb("VmRSS") / 1024
    except OSError:
        return 0.0


def _proc_status_kb(key: str) -> int:
    m = re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if not m:
        raise OSError(f"no {key} in /proc/self/status")
    return int(m.group(1))


def _reset_hwm() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # "5": reset the peak RSS to the current RSS (Linux >= 4.0)
        return _proc_status_kb("VmHWM") <= _proc_status_kb("VmRSS") + 1024
    except OSError:
        return False


# ---------------------------------------------------------------------------------------------------------------
# The model


def sd15_random_path() -> Path:
    """The full-size SD-1.5 architecture (utils/model_configs/sd1) with random weights, saved once as a diffusers
    folder in the cache (fp16 on disk to halve it; loaded as float32 like any user model)."""
    import diffusers
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel

    from utils.models import CONFIGS_DIR
    from utils.tokenizer import build_clip_tokenizer, cache_root

    out = cache_root() / "bench-models" / "sd15-random-s0"
    if (out / "model_index.json").is_file():
        return out
    cfg = CONFIGS_DIR / "sd1"
    print(f"building random-weight SD-1.5 from {cfg} into {out} (once) ...", file=sys.stderr)
    torch.manual_seed(0)
    unet = diffusers.UNet2DConditionModel.from_config(diffusers.UNet2DConditionModel.load_config(cfg / "unet"))
    vae = diffusers.AutoencoderKL.from_config(diffusers.AutoencoderKL.load_config(cfg / "vae"))
    text_encoder = CLIPTextModel(CLIPTextConfig.from_pretrained(cfg / "text_encoder"))
    sched_cfg = json.loads((cfg / "scheduler" / "scheduler_config.json").read_text())
    scheduler = getattr(diffusers, sched_cfg["_class_name"]).from_config(sched_cfg)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=build_clip_tokenizer(False), unet=unet, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.to(torch.float16)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".sd15-random.", dir=out.parent))
    pipe.save_pretrained(tmp)
    os.replace(tmp, out)
    return out


def model_path(settings: Settings) -> Path:
    if settings.model == "tiny":
        from utils.tiny_models import tiny_model_path

        return tiny_model_path("sd1")
    return sd15_random_path()


class Session:
    """A fresh accelerator and a fresh copy of the model for one case (modes change the model: splices, added
    tokens, attention processors)."""

    def __init__(self, settings: Settings, case: Case, out_dir: Path):
        from accelerate.state import AcceleratorState, GradientState

        from utils.models import ModelSource
        from utils.training import make_accelerator
        from utils.training_setup import ModelOptions, load_model_for_training, training_noise_scheduler

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
        self.accelerator = make_accelerator(out_dir, settings.mixed_precision, 1, "none", settings.seed,
                                            cpu=settings.device == "cpu")
        self.device = self.accelerator.device
        opts = ModelOptions(mixed_precision=settings.mixed_precision,
                            gradient_checkpointing=case.gradient_checkpointing,
                            xformers=case.attention == "xformers")
        self.loaded = load_model_for_training(ModelSource(str(model_path(settings))), opts, self.device)
        self.pipe = self.loaded.pipeline
        self.noise_scheduler = training_noise_scheduler(self.loaded)
        self.out_dir = out_dir
        self.samples: dict = {}  # (count, seed) -> make_samples(...), filled by prepare_data


# Modes whose step never runs the VAE: it leaves the device before the memory window, as the trainers move it off
# once latents are cached.
NO_VAE_MODES = ("ours", "bare", "hypernetwork", "hypernetwork-offload")


# ---------------------------------------------------------------------------------------------------------------
# Data: the same in-memory samples for every mode (image decoding is bench_data.py's business)


def make_samples(pipe, settings: Settings, count: int, seed: int):
    """``count`` pixel tensors in [-1, 1] (smooth, image-like), their cached-style latents, and prompts."""
    import torch

    from utils.latents import encode_pixels

    g = torch.Generator().manual_seed(seed)
    r = settings.resolution
    coarse = torch.rand(count, 3, max(2, r // 16), max(2, r // 16), generator=g) * 2 - 1
    pixels = torch.nn.functional.interpolate(coarse, size=(r, r), mode="bilinear", align_corners=False)
    pixels = (pixels + 0.05 * torch.randn(pixels.shape, generator=g)).clamp(-1, 1)
    latents = []
    for chunk in pixels.split(8):
        mean, std = encode_pixels(pipe.vae, chunk)
        latents.append((mean + std * torch.randn(mean.shape, generator=g)) * pipe.vae.config.scaling_factor)
    styles = ("a photo of", "a rendering of", "a close-up photo of", "a bright photo of", "a cropped photo of")
    prompts = [f"{styles[i % len(styles)]} a {PLACEHOLDER}, picture {i}" for i in range(count)]
    return pixels, torch.cat(latents), prompts


def samples(session: Session, settings: Settings, count: int, seed: int):
    """make_samples, once per session: prepare_data fills these before the memory window opens."""
    key = (count, seed)
    if key not in session.samples:
        session.samples[key] = make_samples(session.pipe, settings, count, seed)
    return session.samples[key]


def prepare_data(session: Session, settings: Settings, case: Case) -> None:
    """Everything the modes take as given, done before their memory is measured: the samples and their float32
    VAE latents (at 512 px the encode's activations would dominate the GPU columns), and the VAE off the device
    for modes that never run it."""
    n = max(8, 4 * case.batch_size)
    for seed in (settings.seed, settings.seed + 1):  # the mode's batches and the bare step's
        samples(session, settings, n, seed)
    if case.mode in NO_VAE_MODES or many_count(case.mode):
        session.pipe.vae.to("cpu")


class MemoryLoader:
    """Stands in for utils.data.TrainLoader (the attributes and iteration LoaderSource uses), serving batches of
    in-memory samples: latents when cached, pixels otherwise."""

    def __init__(self, pixels, latents, prompts, batch_size: int, cached: bool):
        self.pixels, self.latents, self.prompts = pixels, latents, prompts
        self.batch_size, self.world_size, self.rank = batch_size, 1, 0
        self.steps_per_epoch = len(prompts) // batch_size
        self.cached = cached
        self.epoch = self.position = 0

    def iter_epoch(self):
        import torch

        while self.position < self.steps_per_epoch:
            j = self.position
            self.position += 1
            sl = slice(j * self.batch_size, (j + 1) * self.batch_size)
            batch = {"prompts": self.prompts[sl], "index": torch.arange(sl.start, sl.stop)}
            if self.cached:
                batch["latents"] = self.latents[sl].clone()
            else:
                batch["pixel_values"] = self.pixels[sl].clone()
            yield batch


class TimedSource:
    """Wraps the loop's BatchSource: the moment the loop asks for batch k is the moment step k-1 ended.

    With ``bare`` (a BareStep on the same model), one bare forward/backward runs right there, before the batch is
    fetched, and its time is taken out of the step's: the loop's step and the floor are then measured alternately
    under the same load, which makes their ratio trustworthy on a shared machine."""

    def __init__(self, inner, bare: "BareStep | None" = None):
        self.inner = inner
        self.bare = bare
        self.micro_batches_per_epoch = inner.micro_batches_per_epoch
        self.marks: list[float] = []
        self.bare_times: list[float] = []
        self.excluded: list[float] = []  # bare time inside the interval that starts at each mark

    def iter_epoch(self, epoch: int, skip: int):
        it = self.inner.iter_epoch(epoch, skip)
        while True:
            asked = time.perf_counter()
            spent = self.bare() if self.bare is not None else 0.0
            try:
                batch = next(it)
            except StopIteration:
                if self.excluded:  # a bare step run as the epoch ran out lies inside the last step's interval
                    self.excluded[-1] += spent
                return
            self.marks.append(asked)
            self.bare_times.append(spent)
            self.excluded.append(spent)
            yield batch


# ---------------------------------------------------------------------------------------------------------------
# Modes through the real loop: ours, ours-uncached, hypernetwork(-offload)


def run_real_loop(session: Session, settings: Settings, case: Case, trainable, cached: bool, optim,
                  bare: "BareStep | None" = None, names: list[str] | None = None) -> tuple[list[float], list[float]]:
    """Step times of utils.training.train after the warm-up, and of the paired bare steps (empty without).

    ``names``: several embeddings (a ManyEmbeddings trainable), each served the same samples under its own name."""
    from utils.training import LoopConfig, Outputs, train
    from utils.training_setup import LoaderSource

    pipe = session.pipe
    n = max(8, 4 * case.batch_size)
    pixels, latents, prompts = samples(session, settings, n, settings.seed)

    def source_for(own_prompts):
        return LoaderSource(MemoryLoader(pixels, latents, own_prompts, case.batch_size, cached), pipe.vae,
                            settings.seed, sdxl=False)

    if names:
        from utils.data.balanced import BalancedBatches

        inner = BalancedBatches([source_for([p.replace(PLACEHOLDER, name) for p in prompts]) for name in names],
                                settings.seed)
    else:
        inner = source_for(prompts)
    source = TimedSource(inner, bare)
    total = settings.warmup + settings.steps
    end = []
    outputs = Outputs(save=lambda step: [], final=lambda step, opt: end.append(time.perf_counter()) or [])
    cfg = LoopConfig(output_dir=session.out_dir, max_train_steps=total, train_batch_size=case.batch_size,
                     seed=settings.seed, prediction_type=session.loaded.prediction_type, save_every=0,
                     checkpointing_steps=0, preview_every=0, report_to="none", optim=optim)
    summary = train(session.accelerator, trainable, source, session.noise_scheduler, cfg, outputs)
    if summary.step != total or len(source.marks) != total:
        raise RuntimeError(f"{case.mode}: the loop ran {summary.step} steps / {len(source.marks)} batches, "
                           f"expected {total}")
    marks = source.marks + end
    w = settings.warmup
    steps = [b - a - spent for a, b, spent in zip(marks[w:], marks[w + 1:], source.excluded[w:])]
    return steps, (source.bare_times[w:] if bare is not None else [])


def mode_ours(session: Session, settings: Settings, case: Case, cached: bool, paired: bool):
    from utils.trainers.textual_inversion import TextualInversion, new_embedding
    from utils.training import OptimConfig

    embedding = new_embedding(session.loaded, PLACEHOLDER, INIT_TEXT, NUM_VECTORS)
    trainable = TextualInversion.build(session.pipe, embedding)
    bare = BareStep(session, settings, case, trainable) if paired else None
    return run_real_loop(session, settings, case, trainable, cached, OptimConfig(learning_rate="0.005"), bare)


def mode_many(session: Session, settings: Settings, case: Case, k: int):
    """K embeddings in one run (--concepts), each at the case's batch size."""
    from utils.trainers.many_embeddings import ManyEmbeddings
    from utils.trainers.textual_inversion import new_embedding
    from utils.training import OptimConfig

    names = [f"{PLACEHOLDER}{i}" for i in range(k)]
    embeddings = [new_embedding(session.loaded, name, INIT_TEXT, NUM_VECTORS) for name in names]
    trainable = ManyEmbeddings.build(session.pipe, embeddings, [1.0] * k)
    return run_real_loop(session, settings, case, trainable, True, OptimConfig(learning_rate="0.005"), names=names)


def many_count(mode: str) -> int | None:
    """K of a "many-K" mode, else None."""
    head, _, k = mode.partition("-")
    return int(k) if head == "many" and k.isdigit() and int(k) >= 1 else None


def mode_hypernetwork(session: Session, settings: Settings, case: Case, offload: bool, bare: "BareStep | None"):
    from utils.hypernetwork import Hypernetwork, HypernetworkOptions, attention_context_widths
    from utils.trainers.hypernetwork import HypernetworkTrainable
    from utils.training import OptimConfig

    import torch

    unet = session.pipe.unet
    sizes = sorted(attention_context_widths(unet) | {unet.config.cross_attention_dim})
    torch.manual_seed(settings.seed)
    hn = Hypernetwork.create("benchhn", sizes, HypernetworkOptions(layer_structure=[1.0, 2.0, 1.0]))
    trainable = HypernetworkTrainable.build(session.loaded, hn, session.device, offload)
    return run_real_loop(session, settings, case, trainable, True,
                         OptimConfig(learning_rate="0.00001", adam_weight_decay=0.01), bare)


# ---------------------------------------------------------------------------------------------------------------
# The diffusers example's step, re-implemented (examples/textual_inversion/textual_inversion.py, per-step work only)


def mode_diffusers_example(session: Session, settings: Settings, case: Case, bare: "BareStep | None"):
    import torch
    import torch.nn.functional as F
    from diffusers.optimization import get_scheduler

    acc, pipe, device = session.accelerator, session.pipe, session.device
    tokenizer, text_encoder, unet, vae = pipe.tokenizer, pipe.text_encoder, pipe.unet, pipe.vae
    weight_dtype = unet.dtype
    sched = session.noise_scheduler

    # New tokens in the vocabulary, the embedding matrix grown and trained whole (in float32), as upstream.
    new_tokens = [PLACEHOLDER] + [f"{PLACEHOLDER}_{i}" for i in range(1, NUM_VECTORS)]
    tokenizer.add_tokens(new_tokens)
    new_ids = tokenizer.convert_tokens_to_ids(new_tokens)
    init_id = tokenizer.encode(INIT_TEXT, add_special_tokens=False)[0]
    text_encoder.to(torch.float32)
    text_encoder.resize_token_embeddings(len(tokenizer))
    table = text_encoder.get_input_embeddings().weight
    with torch.no_grad():
        for i in new_ids:
            table[i] = table[init_id].clone()
    vae.to(device, dtype=weight_dtype)  # upstream runs the VAE in the weight dtype
    unet.requires_grad_(False)
    vae.requires_grad_(False)
    text_encoder.requires_grad_(False)  # upstream freezes encoder, final norm and positions: all but the tokens
    text_encoder.get_input_embeddings().requires_grad_(True)
    if case.gradient_checkpointing:
        text_encoder.gradient_checkpointing_enable()
        unet.train()
    optimizer = torch.optim.AdamW(text_encoder.get_input_embeddings().parameters(), lr=5e-4,
                                  betas=(0.9, 0.999), weight_decay=0.0, eps=1e-8)
    lr_scheduler = get_scheduler("constant", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=settings.warmup + settings.steps)
    text_encoder, optimizer, lr_scheduler = acc.prepare(text_encoder, optimizer, lr_scheduler)
    orig_embeds = acc.unwrap_model(text_encoder).get_input_embeddings().weight.data.clone()
    text_encoder.train()

    n = max(8, 4 * case.batch_size)
    pixels, _, prompts = samples(session, settings, n, settings.seed)
    prompts = [p.replace(PLACEHOLDER, new_tokens[0]) for p in prompts]
    per_epoch = n // case.batch_size

    def batch_at(k):
        # upstream's Dataset tokenizes each example in __getitem__ (main process with the default 0 workers)
        sl = slice((k % per_epoch) * case.batch_size, (k % per_epoch + 1) * case.batch_size)
        ids = torch.stack([tokenizer(p, padding="max_length", truncation=True,
                                     max_length=tokenizer.model_max_length, return_tensors="pt").input_ids[0]
                           for p in prompts[sl]])
        return {"pixel_values": pixels[sl], "input_ids": ids}

    times, bare_times = [], []
    total = settings.warmup + settings.steps
    for step in range(total):
        if bare is not None:
            bare_times.append(bare())
        t0 = time.perf_counter()
        batch = batch_at(step)
        with acc.accumulate(text_encoder):
            latents = vae.encode(batch["pixel_values"].to(device, dtype=weight_dtype)).latent_dist.sample().detach()
            latents = latents * vae.config.scaling_factor
            noise = torch.randn_like(latents)
            timesteps = torch.randint(0, sched.config.num_train_timesteps, (latents.shape[0],), device=device).long()
            noisy = sched.add_noise(latents, noise, timesteps)
            hidden = text_encoder(batch["input_ids"].to(device))[0].to(dtype=weight_dtype)
            pred = unet(noisy, timesteps, hidden).sample
            target = noise if sched.config.prediction_type == "epsilon" else sched.get_velocity(latents, noise,
                                                                                                   timesteps)
            loss = F.mse_loss(pred.float(), target.float(), reduction="mean")
            acc.backward(loss)
            optimizer.step()
            lr_scheduler.step()
            optimizer.zero_grad()
            keep = torch.ones((len(tokenizer),), dtype=torch.bool)
            keep[min(new_ids): max(new_ids) + 1] = False
            with torch.no_grad():
                acc.unwrap_model(text_encoder).get_input_embeddings().weight[keep] = orig_embeds[keep]
        if acc.sync_gradients:
            logs = {"loss": loss.detach().item(), "lr": lr_scheduler.get_last_lr()[0]}  # noqa: F841 (a sync/step)
        times.append(time.perf_counter() - t0)
    return times[settings.warmup:], bare_times[settings.warmup:]


# ---------------------------------------------------------------------------------------------------------------
# The floor: forward + backward through the spliced text encoder and the UNet, inputs prepared beforehand


class BareStep:
    """One forward + backward through the spliced text encoder and the UNet on inputs prepared beforehand (noisy
    latents, timesteps, token ids), gradients reaching the vectors and then dropped: no data, noise drawing,
    tokenizing, optimizer or bookkeeping. Calling it runs one step and returns its time in seconds."""

    def __init__(self, session: Session, settings: Settings, case: Case, trainable):
        import torch

        from utils.trainers.textual_inversion import tokenize_with_placeholder

        self.acc, self.device = session.accelerator, session.device
        self.model, self.vectors = trainable.model, list(trainable.parameters())
        pipe, sched = session.pipe, session.noise_scheduler
        n = max(8, 4 * case.batch_size)
        _, latents, prompts = samples(session, settings, n, settings.seed + 1)
        g = torch.Generator().manual_seed(settings.seed + 1)
        self.batches = []
        for k in range(n // case.batch_size):
            sl = slice(k * case.batch_size, (k + 1) * case.batch_size)
            lat = latents[sl].to(self.device)
            noise = torch.randn(lat.shape, generator=g).to(self.device)
            t = torch.randint(0, sched.config.num_train_timesteps, (lat.shape[0],), generator=g).to(self.device)
            ids = tokenize_with_placeholder(pipe.tokenizer, prompts[sl], PLACEHOLDER, NUM_VECTORS).to(self.device)
            self.batches.append((sched.add_noise(lat, noise, t), t, ids, noise))
        self.sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        self.count = 0

    def __call__(self) -> float:
        import torch.nn.functional as F

        noisy, t, ids, target = self.batches[self.count % len(self.batches)]
        self.count += 1
        self.sync()
        t0 = time.perf_counter()
        with self.acc.autocast():
            pred = self.model(noisy, t, input_ids=[ids])
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        for p in self.vectors:
            p.grad = None
        self.sync()
        return time.perf_counter() - t0


def bare_on_a_copy(session: Session, settings: Settings, case: Case) -> BareStep:
    """A BareStep on copies of the pristine text encoder and UNet, for pairing with modes that change the model
    (added tokens, hypernetwork processors). Made before the mode's memory is measured (its 'added' MB excludes it)."""
    import copy
    from types import SimpleNamespace

    from utils.trainers.textual_inversion import TextualInversion, new_embedding

    pipe = session.pipe
    twin = SimpleNamespace(text_encoder=copy.deepcopy(pipe.text_encoder), unet=copy.deepcopy(pipe.unet),
                           tokenizer=copy.deepcopy(pipe.tokenizer))
    embedding = new_embedding(session.loaded, PLACEHOLDER, INIT_TEXT, NUM_VECTORS)
    return BareStep(session, settings, case, TextualInversion.build(twin, embedding))


def mode_bare(session: Session, settings: Settings, case: Case) -> list[float]:
    from utils.trainers.textual_inversion import TextualInversion, new_embedding

    embedding = new_embedding(session.loaded, PLACEHOLDER, INIT_TEXT, NUM_VECTORS)
    trainable = TextualInversion.build(session.pipe, embedding)
    trainable.model.to(session.device)
    step = BareStep(session, settings, case, trainable)
    times = [step() for _ in range(settings.warmup + settings.steps)]
    return times[settings.warmup:]


# ---------------------------------------------------------------------------------------------------------------
# Running cases


def run_case(settings: Settings, case: Case) -> Result:
    import torch

    from utils.cluster import apply_threads_per_rank

    threads = apply_threads_per_rank() if settings.device == "cpu" else torch.get_num_threads()
    with tempfile.TemporaryDirectory(prefix="bench_train.") as tmp:
        session = Session(settings, case, Path(tmp))
        prepare_data(session, settings, case)
        notes = {}
        pair = None
        if settings.paired and case.mode in ("diffusers-example", "hypernetwork", "hypernetwork-offload"):
            before = current_mem_mb(settings.device)
            pair = bare_on_a_copy(session, settings, case)
            notes["pairing_copy_mb"] = current_mem_mb(settings.device) - before
        bare = []
        with MemoryMeter(settings.device) as mem:
            if case.mode in ("ours", "ours-uncached"):
                times, bare = mode_ours(session, settings, case, cached=case.mode == "ours", paired=settings.paired)
            elif case.mode in ("hypernetwork", "hypernetwork-offload"):
                times, bare = mode_hypernetwork(session, settings, case, case.mode.endswith("offload"), pair)
            elif case.mode == "diffusers-example":
                times, bare = mode_diffusers_example(session, settings, case, pair)
            elif case.mode == "bare":
                times = mode_bare(session, settings, case)
            elif many_count(case.mode):
                times, bare = mode_many(session, settings, case, many_count(case.mode))
            else:
                raise ValueError(f"unknown mode {case.mode}")
        if bare:
            # total step time over total bare time in the same window: each pair shares its moment's load
            notes["paired_bare_steps_per_s"] = 1 / statistics.median(bare)
            notes["paired_over_bare_pct"] = 100 * (sum(times) / sum(bare) - 1)
        del session, pair
        gc.collect()
    copy_mb = notes.get("pairing_copy_mb", 0.0)  # the twin models are not part of the mode's memory
    if mem.peak_mb is not None:
        mem.peak_mb -= copy_mb
    if mem.base_mb is not None:
        mem.base_mb -= copy_mb
    med = statistics.median(times)
    mean_rate = len(times) / sum(times)
    return Result(case=case, steps_timed=len(times), step_times_s=[round(t, 6) for t in times],
                  steps_per_s=1 / med, steps_per_s_mean=mean_rate,
                  images_per_s=case.batch_size * (many_count(case.mode) or 1) / med,
                  peak_mem_mb=mem.peak_mb, base_mem_mb=mem.base_mb, mem_kind=mem.kind, threads=threads, notes=notes)


def run_isolated(settings: Settings, cases: list[Case]) -> list[Result]:
    """Cases in a child process of their own (a mode's memory peak is its own; nothing carries over between modes).
    One child runs one mode's cases (batch sizes, attention, checkpointing) to pay Python's start-up once."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--_child",
           json.dumps({"settings": asdict(settings), "cases": [asdict(c) for c in cases]})]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=str(ROOT))
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or len(lines) != len(cases):
        last = [ln for ln in proc.stderr.splitlines() if ln.strip()][-1:] or ["no output"]
        raise RuntimeError(f"child exited {proc.returncode}: {last[0].strip()}")
    results = []
    for line in lines:
        data = json.loads(line[len("RESULT "):])
        data["case"] = Case(**data["case"])
        results.append(Result(**data))
    return results


def child_main(payload: str) -> None:
    spec = json.loads(payload)
    for case in spec["cases"]:
        result = run_case(Settings(**spec["settings"]), Case(**case))
        print("RESULT " + json.dumps(asdict(result)), flush=True)


# ---------------------------------------------------------------------------------------------------------------
# Report


def _key(case: Case) -> tuple:
    return (case.attention, case.gradient_checkpointing, case.batch_size, case.mode)


def aggregate(results: list[Result]) -> list[dict]:
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        groups.setdefault(_key(r.case), []).append(r)
    rows = []
    for key, rs in groups.items():
        rates = [r.steps_per_s for r in rs]
        peaks = [r.peak_mem_mb for r in rs if r.peak_mem_mb is not None]
        bases = [r.base_mem_mb for r in rs if r.base_mem_mb is not None]
        rate = statistics.median(rates)
        rows.append({
            "mode": key[3], "batch_size": key[2], "attention": key[0], "gradient_checkpointing": key[1],
            "steps_per_s": rate, "steps_per_s_runs": rates,
            "steps_per_s_mean_runs": [r.steps_per_s_mean for r in rs],
            "spread_pct": 100 * (max(rates) - min(rates)) / rate if len(rates) > 1 else 0.0,
            "images_per_s": rate * key[2] * (many_count(key[3]) or 1), "ms_per_step": 1000 / rate,
            "peak_mem_mb": max(peaks) if peaks else None,
            "added_mem_mb": max(p - b for p, b in zip(peaks, bases)) if peaks and bases else None,
            "paired_over_bare_pct_runs": [r.notes["paired_over_bare_pct"] for r in rs
                                          if "paired_over_bare_pct" in r.notes],
        })
    by = {(r["attention"], r["gradient_checkpointing"], r["batch_size"], r["mode"]): r for r in rows}
    for r in rows:
        k = (r["attention"], r["gradient_checkpointing"], r["batch_size"])
        base, bare = by.get(k + ("diffusers-example",)), by.get(k + ("bare",))
        r["x_vs_diffusers_example"] = r["steps_per_s"] / base["steps_per_s"] if base else None
        r["step_time_over_bare_pct"] = 100 * (bare["steps_per_s"] / r["steps_per_s"] - 1) if bare else None
        paired = r["paired_over_bare_pct_runs"]
        r["paired_over_bare_pct"] = statistics.median(paired) if paired else None
        if r["mode"] == "bare" and any(x["paired_over_bare_pct_runs"] for x in rows):
            r["paired_over_bare_pct"] = 0.0  # the unit the paired figures are in
    for r in rows:
        # Both step times in units of the bare step measured beside them: the ratio survives the machine's load
        # changing between the two modes' runs.
        base = by.get((r["attention"], r["gradient_checkpointing"], r["batch_size"], "diffusers-example"))
        ok = base and base["paired_over_bare_pct"] is not None and r["paired_over_bare_pct"] is not None
        r["x_vs_diffusers_example_paired"] = ((1 + base["paired_over_bare_pct"] / 100) /
                                              (1 + r["paired_over_bare_pct"] / 100)) if ok else None
    order = {m: i for i, m in enumerate(MODES)}
    rows.sort(key=lambda r: (r["attention"], r["gradient_checkpointing"], r["batch_size"], order.get(r["mode"], 99)))
    return rows


def markdown_table(rows: list[dict], mem_kind: str) -> str:
    def f(v, fmt):
        return "–" if v is None else format(v, fmt)

    def pct(v, runs):
        if v is None:
            return "–"
        return f"{v:+.1f}%" + (f" ({' / '.join(f'{x:+.1f}' for x in runs)})" if runs else "")

    head = ("| mode | attn | ckpt | batch | steps/s (runs) | spread | images/s | ms/step | peak mem MB | added MB "
            "| x diffusers-example | step vs bare | step vs bare, paired (runs) | x diffusers-example, paired |")
    lines = [head, "|" + "---|" * 14]
    for r in rows:
        runs = " / ".join(f"{x:.1f}" for x in r["steps_per_s_runs"])
        lines.append(
            f"| {r['mode']} | {r['attention']} | {'on' if r['gradient_checkpointing'] else 'off'} | {r['batch_size']} "
            f"| {r['steps_per_s']:.1f} ({runs}) | {r['spread_pct']:.0f}% | {r['images_per_s']:.1f} "
            f"| {r['ms_per_step']:.1f} | {f(r['peak_mem_mb'], '.0f')} | {f(r['added_mem_mb'], '.0f')} "
            f"| {f(r['x_vs_diffusers_example'], '.2f')} "
            f"| {'–' if r['step_time_over_bare_pct'] is None else format(r['step_time_over_bare_pct'], '+.0f') + '%'} "
            f"| {pct(r['paired_over_bare_pct'], r['paired_over_bare_pct_runs'])} "
            f"| {f(r['x_vs_diffusers_example_paired'], '.2f')} |")
    lines.append("")
    lines.append(f"steps/s = 1 / median step time; memory: {mem_kind}; 'added' = peak minus the memory at the start "
                 f"of the mode (model loaded); 'step vs bare' = extra step time over the bare forward/backward row; "
                 f"'paired' = the same, measured with a bare step run before every training step in the same "
                 f"process (total step time / total bare time; robust to load from other processes); "
                 f"'x diffusers-example, paired' compares the two modes' paired step times.")
    return "\n".join(lines)


def target_lines(rows: list[dict]) -> str:
    """The issue's targets, per batch size: ours >= 1.5x the diffusers example, and within 15% of bare."""
    out = []
    for r in rows:
        if r["mode"] != "ours":
            continue
        x = r["x_vs_diffusers_example_paired"] or r["x_vs_diffusers_example"]
        over = r["paired_over_bare_pct"] if r["paired_over_bare_pct"] is not None else r["step_time_over_bare_pct"]
        if x is None and over is None:
            continue
        where = (f"attn={r['attention']} ckpt={'on' if r['gradient_checkpointing'] else 'off'} "
                 f"batch {r['batch_size']}")
        speed = "–" if x is None else f"{x:.2f}x diffusers-example ({'meets' if x >= 1.5 else 'MISSES'} >= 1.5x)"
        floor = "–" if over is None else f"{over:+.1f}% over bare ({'meets' if over <= 15 else 'MISSES'} <= 15%)"
        out.append(f"- {where}: {speed}; {floor}")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=("tiny", "sd15"), default="tiny",
                   help="tiny: the tiny offline SD-1 model (utils.tiny_models, 'sd1'); sd15: the full-size SD-1.5 "
                        "architecture from utils/model_configs/sd1 with random weights (built once into the cache; "
                        "meant for a GPU, use --resolution 64 for a CPU smoke check).")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="Default: cuda when available, else cpu.")
    p.add_argument("--resolution", type=int, default=None, help="Image size in pixels (default: 64 tiny, 512 sd15).")
    p.add_argument("--batch_sizes", default="1,4", help="Comma-separated per-step batch sizes (default 1,4).")
    p.add_argument("--steps", type=int, default=150, help="Timed steps per case (default 150).")
    p.add_argument("--warmup", type=int, default=20, help="Untimed steps before timing (default 20).")
    p.add_argument("--repeats", type=int, default=2,
                   help="Runs of every case, interleaved (default 2), to see how noisy the machine is.")
    p.add_argument("--modes", default=",".join(MODES),
                   help=f"Comma-separated subset of: {', '.join(MODES)}; also many-K (K embeddings in one run).")
    p.add_argument("--mixed_precision", choices=("no", "fp16", "bf16"), default="no",
                   help="As the trainers' flag: frozen models in this dtype, trained weights float32.")
    p.add_argument("--attention", default="sdpa",
                   help="Comma-separated attention backends to compare: sdpa, xformers (CUDA with xformers only).")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="Also run every case with UNet gradient checkpointing on (rows with ckpt on/off).")
    p.add_argument("--isolate", dest="isolate", action="store_true", default=None,
                   help="Each case in its own child process (default on CPU: clean per-mode peak RSS).")
    p.add_argument("--no_isolate", dest="isolate", action="store_false",
                   help="All cases in this process (default on CUDA, where peak memory is reset per case).")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per process (sets OMP_NUM_THREADS for the children too). Default: as the "
                        "trainers (utils.cluster.threads_per_rank). On a CPU shared with other busy processes use 1: "
                        "multi-threaded torch ops slow down badly when the cores are oversubscribed.")
    p.add_argument("--pairing", dest="pairing", action="store_true", default=None,
                   help="Run a bare forward/backward before every training step, timed apart, and report each mode "
                        "in units of it: ratios that survive load from other processes on a shared machine. Modes "
                        "that change the model pair with a copy of it (subtracted from their memory). Doubles the "
                        "run time. Default on for CPU, off for CUDA.")
    p.add_argument("--no_pairing", dest="pairing", action="store_false", help="See --pairing.")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="PATH", help="Also write every run and the summary rows as JSON here.")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by threads_per_rank() here and in the children
    if args._child:
        child_main(args._child)
        return 0
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        sys.exit("bench_train.py: --device cuda but no CUDA device is available")
    settings = Settings(model=args.model, device=device,
                        resolution=args.resolution or (512 if args.model == "sd15" else 64),
                        mixed_precision=args.mixed_precision, steps=args.steps, warmup=args.warmup, seed=args.seed,
                        paired=(device == "cpu") if args.pairing is None else args.pairing)
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    bad = [m for m in modes if m not in MODES and not many_count(m)]
    if bad:
        sys.exit(f"bench_train.py: unknown mode(s) {', '.join(bad)}; choose from {', '.join(MODES)}, many-K")
    batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    attentions = [a.strip() for a in args.attention.split(",") if a.strip()]
    ckpts = [False, True] if args.gradient_checkpointing else [False]
    isolate = (device == "cpu") if args.isolate is None else args.isolate
    model_path(settings)  # build/cache the model once, before children race to do it
    # Repeats outermost and modes interleaved, so a burst of load from other processes hits every mode alike.
    # One group per child; a backend that cannot run (xformers missing) fails only its own group.
    groups = [[Case(m, b, a, c, rep) for c in ckpts for b in batch_sizes]
              for rep in range(args.repeats) for m in modes for a in attentions]
    results = []
    t0 = time.perf_counter()
    errors = []
    for i, group in enumerate(groups, 1):
        try:
            done = run_isolated(settings, group) if isolate else [run_case(settings, c) for c in group]
        except Exception as e:  # e.g. xformers missing: report it and measure the rest
            first = group[0]
            errors.append({"mode": first.mode, "attention": first.attention, "repeat": first.repeat,
                           "error": " ".join(str(e).split())[-800:]})
            print(f"[{i}/{len(groups)}] {first.mode}: FAILED: {errors[-1]['error']}", file=sys.stderr, flush=True)
            continue
        results += done
        for r in done:
            case = r.case
            print(f"[{i}/{len(groups)}] {case.mode:<21} attn={case.attention} ckpt={int(case.gradient_checkpointing)} "
                  f"batch={case.batch_size} run={case.repeat + 1}: {r.steps_per_s:6.1f} steps/s, "
                  f"peak {r.peak_mem_mb or 0:.0f} MB", file=sys.stderr, flush=True)
    rows = aggregate(results)
    mem_kind = results[0].mem_kind if results else ""
    print(f"\nModel {settings.model} at {settings.resolution} px on {device} ({results[0].threads if results else '?'} "
          f"threads), mixed precision {settings.mixed_precision}, {settings.steps} timed steps after "
          f"{settings.warmup} warm-up, {args.repeats} run(s) per case, {'isolated' if isolate else 'in-process'}, "
          f"{time.perf_counter() - t0:.0f} s in all.\n")
    print(markdown_table(rows, mem_kind))
    for err in errors:
        print(f"\nFAILED {err['mode']} (run {err['repeat'] + 1}): {err['error']}")
    targets = target_lines(rows)
    if targets:
        print("\nTargets (issue 5), from the paired figures where measured:\n" + targets)
    if args.json:
        from utils.fileio import write_text_atomic

        payload = {"settings": asdict(settings), "command": sys.argv, "torch": torch.__version__,
                   "isolated": isolate, "rows": rows, "runs": [asdict(r) for r in results], "errors": errors}
        write_text_atomic(Path(args.json), json.dumps(payload, indent=1))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
