"""The evaluation as a step hook of the one training loop (utils/training.py; see StepHook there).

Every step: the trained vectors' norms against the vocabulary's (textual inversion), logged, with a warning when a
vector leaves the range. Every ``eval_every`` steps: the loss on the fixed evaluation set (utils/evaluation.py), per
timestep band and overall, optionally CLIP/DINO scores of pictures sampled with fixed seeds; from these the
Evaluator (utils/evaluator.py) picks the best step, whose files are written as ``<name>-best``, and decides the
early stop. Everything is in ``evaluation.csv``, the trackers, and at the end ``evaluation.json`` and
``evaluation.png`` (the curves with the stop and best steps marked) in the output folder.

Nothing here draws from a random generator the training uses: the set's pictures, noise and timesteps come from its
own generator, the VAE gives its posterior mean, the model runs in eval mode without gradients and samples pictures
with their own seeded generators. So the training trajectory is bit-identical with the evaluation on or off.
"""

from __future__ import annotations

import csv
import glob
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from utils.errors import UserError
from utils.eval_args import EvalOptions
from utils.eval_report import NormWatch, VocabularyNorms
from utils.evaluation import build_eval_set
from utils.evaluator import Evaluator
from utils.fileio import atomic_path
from utils.text_encoders import TextEncoders
from utils.training import BaseStepHook

# Hypernetworks: DVAR's direction check follows this many fixed, seeded coordinates of the trained weights (a
# random subset estimates the cosine between two moves; the whole network would make every checkpoint megabytes).
DIRECTION_COORDINATES = 4096


@dataclass
class EvalPictures:
    """The evaluation pictures as the model is trained on them (one fixed size), with their prompts."""

    pixels: torch.Tensor  # [P, 3, H, W] in [-1, 1]
    prompts: list[str]
    time_ids: torch.Tensor  # [P, 6]: SDXL's original size, crop corner and target size
    weights: torch.Tensor | None  # [P, 1, h, w] per-pixel loss weights (--use_alpha_as_loss_weight)
    images: list  # PIL, the references of the image scores


def _picture_files(folder: Path, recursive: bool) -> list[Path]:
    from utils.images import is_image_file

    found = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in found if p.is_file() and is_image_file(p))


def load_eval_pictures(folder: str | Path, data_cfg, prompt_cfg, count: int, seed: int = 0) -> EvalPictures:
    """Up to ``count`` pictures of ``folder`` (a seeded choice when there are more), sized as training sizes them
    (A1111's stretch, else the centre cut: one size for all), prompts built as for training (tags neither shuffled
    nor dropped)."""
    from utils.data import (
        alpha_to_weight,
        build_prompt,
        caption_from_filename,
        load_template,
        read_caption_file,
        resolve_template,
    )
    from utils.images import ImageLoadError, apply_geometry, open_image, plan_geometry

    folder = Path(folder)
    files = _picture_files(folder, data_cfg.recursive)
    if not files:
        raise UserError(f"{folder}: no pictures for the evaluation")
    g = torch.Generator().manual_seed(int(seed))
    if len(files) > count:
        files = [files[i] for i in sorted(torch.randperm(len(files), generator=g)[:count].tolist())]
    has_captions = any(f.with_suffix(".txt").is_file() for f in files) or bool(data_cfg.filename_word_regex)
    template = resolve_template(prompt_cfg, has_captions)
    lines = load_template(template) if template is not None else None
    fixed = replace(prompt_cfg, shuffle_tags=False, tag_dropout=0.0)
    rng = np.random.default_rng(int(seed))
    target = (data_cfg.width, data_cfg.height)
    crop = "none" if data_cfg.crop_mode == "none" else "center"
    pixels, prompts, time_ids, weights, images = [], [], [], [], []
    for f in files:
        try:
            loaded = open_image(f)
        except ImageLoadError as e:
            raise UserError(f"evaluation picture {f}: {e}") from None
        geom = plan_geometry(loaded.rgb.size, target, crop)
        img = apply_geometry(loaded.rgb, geom)
        txt = f.with_suffix(".txt")
        try:
            caption = read_caption_file(txt) if txt.is_file() else caption_from_filename(
                f.stem, data_cfg.filename_word_regex, data_cfg.filename_join_string)
        except ValueError as e:
            raise UserError(f"evaluation caption {txt}: {e}") from None
        images.append(img)
        pixels.append(torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1).float() / 127.5 - 1)
        prompts.append(build_prompt(caption, lines, fixed, rng))
        time_ids.append([geom.source[1], geom.source[0], geom.top, geom.left, target[1], target[0]])
        if data_cfg.use_alpha_as_loss_weight:
            alpha = apply_geometry(loaded.alpha, geom) if loaded.alpha is not None else None
            weights.append(alpha_to_weight(alpha, geom.target))
    return EvalPictures(torch.stack(pixels), prompts, torch.tensor(time_ids, dtype=torch.float32),
                        torch.stack(weights) if weights else None, images)


@torch.no_grad()
def encode_latents(vae, pixels: torch.Tensor, batch_size: int = 4) -> torch.Tensor:
    """Scaled latents (the posterior mean: no random draw), float32 on the CPU."""
    cfg = vae.config
    get = cfg.get if isinstance(cfg, dict) else lambda k, d=None: getattr(cfg, k, d)
    scale, shift = float(get("scaling_factor", 0.18215)), float(get("shift_factor", None) or 0.0)
    param = next(vae.parameters())
    out = []
    for i in range(0, len(pixels), batch_size):
        z = vae.encode(pixels[i:i + batch_size].to(param.device, param.dtype)).latent_dist.mean
        out.append(((z.float() - shift) * scale).cpu())
    return torch.cat(out)


def _trained_vectors(trainable):
    """What the norm watch and DVAR's direction check follow: an embedding's vector table (SDXL: one per text
    encoder), or for a hypernetwork a fixed subset of its weights. A trainable that is one of several embeddings
    (utils/trainers/many_embeddings.py) gives its own with ``trained_vectors()``."""
    if hasattr(trainable, "trained_vectors"):
        return trainable.trained_vectors()
    model = trainable.model
    if hasattr(model, "vectors"):  # textual inversion: per text encoder as the embedding holds them
        return model.encoders.embedding_vectors([v.detach() for v in model.vectors])
    flat = torch.cat([p.detach().flatten() for p in trainable.parameters()])
    if flat.numel() <= DIRECTION_COORDINATES:
        return flat
    g = torch.Generator().manual_seed(0)
    idx = torch.randperm(flat.numel(), generator=g)[:DIRECTION_COORDINATES].sort().values
    return flat[idx.to(flat.device)]


def vocabulary_norms(pipeline) -> VocabularyNorms | dict[str, VocabularyNorms]:
    encoders = TextEncoders.of(pipeline)
    norms = [VocabularyNorms.of(table.weight) for _, table in encoders.token_tables()]
    return encoders.embedding_vectors(norms)  # keyed like the embedding's vectors (SDXL: clip_l / clip_g)


class EvalHook(BaseStepHook):
    """The loop's step hook (utils.training.StepHook): evaluation, best step, early stop, norm watch, reports."""

    name = "evaluation"

    def __init__(self, evaluator: Evaluator | None, norms: NormWatch | None, out_dir: Path,
                 save_best: Callable[[int], list[Path]] | None = None,
                 sample: Callable[[int], list] | None = None, scores=None, score_prompt: str | None = None,
                 title: str = "", trainable=None, log_prefix: str = ""):
        self.evaluator = evaluator
        self.trainable = trainable  # whose vectors are watched; None: the loop's trainable
        self.log_prefix = log_prefix  # e.g. "<name>/": several embeddings' metrics side by side in the trackers
        self.norms = norms
        self.out_dir = Path(out_dir)
        self.save_best = save_best
        self.sample = sample  # step -> PIL pictures (main process), for the image scores
        self.scores = scores  # utils.image_scores.ImageScores
        self.score_prompt = score_prompt
        self.title = title
        self.best_files: list[Path] = []

    # -- StepHook ---------------------------------------------------------------------------------------------------

    def start(self, step: int, ctx, share: torch.Tensor | None = None) -> None:
        # The first value of the history is the starting point (a fresh run's untrained vectors); a resumed run has
        # its history from the checkpoint and adds nothing here, so its evaluations stay on the same steps.
        if self.wants_evaluation(step, starting=True):
            self._evaluate(step, ctx, starting_point=True, share=share)

    def wants_evaluation(self, step: int, starting: bool = False) -> bool:
        """Whether start (``starting``) or after_step at ``step`` evaluates the set."""
        ev = self.evaluator
        return ev is not None and (not ev.history if starting else ev.due(step))

    def after_step(self, step: int, ctx, share: torch.Tensor | None = None) -> str | None:
        """``share``: this process's losses of the set, when the caller computed them (utils.evaluator.joint_losses,
        several embeddings' sets in shared forward passes)."""
        if self.norms is not None:
            metrics, warnings = self.norms.check(step, _trained_vectors(self.trainable or ctx.trainable))
            if step % max(1, ctx.cfg.log_every) == 0:
                ctx.accelerator.log(self._prefixed(metrics), step=step)
            for line in warnings:
                ctx.accelerator.print(f"Warning: {line}")
        if not self.wants_evaluation(step):
            return None
        result = self._evaluate(step, ctx, share=share)
        return "early_stop" if result is not None and result.stop else None

    def state_dict(self) -> dict:  # JSON: the loop keeps it in every checkpoint's trainer_state.json
        return {"evaluator": self.evaluator.state_dict() if self.evaluator is not None else None,
                "norms": self.norms.state_dict() if self.norms is not None else None}

    def load_state_dict(self, state: dict) -> None:
        if self.evaluator is not None and state.get("evaluator"):
            try:
                self.evaluator.load_state_dict(state["evaluator"])
            except ValueError as e:
                raise UserError(f"cannot continue the evaluation of the checkpoint: {e}; resume with the same "
                                f"evaluation flags") from None
        if self.norms is not None and state.get("norms"):
            self.norms.load_state_dict(state["norms"])

    def finish(self, step: int, ctx) -> list[Path]:
        ev = self.evaluator
        if ev is None or not ctx.accelerator.is_main_process:
            return []
        files = ev.write_report(self.out_dir, title=self.title) + [self._write_csv()]
        summary = ev.summary()
        if summary.get("stopped_at") is not None:
            ctx.accelerator.print(f"Early stop at step {summary['stopped_at']}: {summary['stop_reason']}.")
        if summary.get("best_step") is not None:
            names = ", ".join(p.name for p in self._best_paths())
            ctx.accelerator.print(f"Best {summary['best_reason']}: {names}.")  # "Best step N: the lowest ..."
        return files + self._best_paths()

    # -- the evaluation ---------------------------------------------------------------------------------------------

    def _evaluate(self, step: int, ctx, starting_point: bool = False, share: torch.Tensor | None = None):
        ev, acc = self.evaluator, ctx.accelerator
        with ctx.evaluating():
            if share is None:
                share = ev.losses(ctx.predict, acc.process_index, acc.num_processes)
            extra = self._image_scores(step, ctx) if self.scores is not None else {}
        per_sample = acc.reduce(share.to(acc.device), "sum").cpu() if acc.num_processes > 1 else share
        if acc.num_processes > 1 and extra:  # scores come from the main process: every rank decides the same
            keys = sorted(extra)
            values = torch.tensor([extra[k] for k in keys], dtype=torch.float64, device=acc.device)
            extra = dict(zip(keys, acc.reduce(values, "sum").tolist()))
        result = ev.record(step, per_sample, vectors=_trained_vectors(self.trainable or ctx.trainable), extra=extra,
                           choose=not starting_point)
        acc.log(self._prefixed(result.metrics), step=step)
        for line in result.warnings:
            acc.print(f"Warning: {line}")
        if acc.is_main_process:
            if result.new_best and self.save_best is not None:
                self.save_best(step)
            self._write_csv()
        return result

    def _prefixed(self, metrics: dict) -> dict:
        return {f"{self.log_prefix}{k}": v for k, v in metrics.items()} if self.log_prefix else metrics

    def _image_scores(self, step: int, ctx) -> dict:
        keys = [k for k in ("clip_i", "clip_t") if self.scores.clip is not None] + (
            ["dino"] if self.scores.dino is not None else [])
        if not ctx.accelerator.is_main_process:
            return dict.fromkeys(keys, 0.0)  # summed with the main process's values
        return self.scores.scores(self.sample(step), self.score_prompt)

    def _best_paths(self) -> list[Path]:
        best = self.evaluator.best if self.evaluator is not None else None
        if best is None or best.best_step is None:
            return []
        return sorted(p for p in self.out_dir.glob(f"{glob.escape(self.title)}-best.*") if p.is_file())

    def _write_csv(self) -> Path:
        """``evaluation.csv``: one row per evaluation (rewritten whole, so a resumed run's file is the
        uninterrupted run's)."""
        history = self.evaluator.history
        columns = ["step"] + list(dict.fromkeys(k for h in history for k in h if k != "step"))
        path = self.out_dir / "evaluation.csv"
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(columns)
                for h in history:
                    w.writerow([h.get(c, "") if not isinstance(h.get(c), float) else f"{h[c]:.7g}" for c in columns])
        return path


def build_eval_hook(accelerator, opts: EvalOptions, trainable, loaded, noise_scheduler, out_dir: Path, *, data_cfg,
                    prompt_cfg, save_best: Callable[[int], list[Path]] | None, preview_opts=None,
                    log_prefix: str = "") -> EvalHook | None:
    """The run's evaluation hook from the checked flags (utils.eval_args), or None when there is nothing to do."""
    is_ti = hasattr(trainable.model, "vectors")
    own = trainable if hasattr(trainable, "trained_vectors") else None  # one of several embeddings: its vectors
    norms = NormWatch(vocabulary_norms(loaded.pipeline), opts.norm_warn_factor) if is_ti else None
    cfg = opts.config
    if cfg is None:
        return EvalHook(None, norms, out_dir, trainable=own, log_prefix=log_prefix) if norms is not None else None
    folder = opts.data_dir or data_cfg.train_data_dir
    pictures = load_eval_pictures(folder, data_cfg, prompt_cfg, cfg.eval_set_size, cfg.eval_seed)
    latents = encode_latents(loaded.pipeline.vae, pictures.pixels)
    extras = {"add_time_ids": pictures.time_ids} if loaded.family == "sdxl" else {}
    eval_set = build_eval_set(latents, pictures.prompts, noise_scheduler.config.num_train_timesteps,
                              cfg.eval_set_size, cfg.eval_seed, extras=extras, loss_weights=pictures.weights)
    # One norm watch, checked every step and at every evaluation (its values then join the evaluation's history).
    evaluator = Evaluator(cfg, eval_set.to(accelerator.device), noise_scheduler, loaded.prediction_type,
                          vocab=norms.vocab if norms is not None else None, norm_factor=opts.norm_warn_factor)
    norms = evaluator.norms
    scores = sample = prompt = None
    if opts.clip_model or opts.dino_model:
        from utils.image_scores import ImageScores, prompt_without

        scores = ImageScores(pictures.images, opts.clip_model, opts.dino_model, device=accelerator.device) \
            if accelerator.is_main_process else _NoScores(opts)
        raw = opts.prompt or (preview_opts.prompt if preview_opts is not None else None) or "a photo of [name]"
        text = raw.replace("[name]", trainable.name)
        sample = _sampler(loaded, trainable, text, opts.num_images, preview_opts)
        prompt = prompt_without(text, trainable.name)
    accelerator.print(f"Evaluation every {cfg.eval_every} steps on {len(eval_set)} fixed samples from "
                      f"{len(pictures.prompts)} picture(s) of {folder}"
                      + (f", early stop: {cfg.early_stopping}" if cfg.early_stopping != "none" else "")
                      + (f", best step by {cfg.select_best}" if cfg.select_best else "") + ".")
    return EvalHook(evaluator, norms, out_dir, save_best, sample, scores, prompt, title=trainable.name,
                    trainable=own, log_prefix=log_prefix)


class _NoScores:
    """The other processes' stand-in: they hold no scoring models (the main process scores)."""

    def __init__(self, opts: EvalOptions):
        self.clip = opts.clip_model
        self.dino = opts.dino_model


def _sampler(loaded, trainable, prompt: str, count: int, preview_opts) -> Callable[[int], list]:
    """step -> ``count`` pictures of ``prompt`` with the weights as trained so far, the same seeds every time."""
    from utils.generation import GenerationParams, generate
    from utils.prompts import EmbeddingDatabase, PromptEncoder

    encoder = PromptEncoder(loaded.pipeline, EmbeddingDatabase([]))
    opts = preview_opts
    params = GenerationParams(prompt=prompt, batch_size=count, seed=opts.seed if opts else 0,
                              steps=opts.steps if opts else 20, sampler=opts.sampler if opts else "Euler a",
                              cfg_scale=opts.cfg_scale if opts else 7.0, width=opts.width if opts else 512,
                              height=opts.height if opts else 512)

    def sample(step: int) -> list:
        if hasattr(trainable, "embedding"):  # textual inversion: the vectors as they are now, under their name
            encoder.db.register(trainable.current(step))
        return [im.image for im in generate(loaded, encoder, params, refresh_embeddings=False, progress=False)]

    return sample


def eval_hooks(accelerator, opts: EvalOptions, writer, data_cfg, prompt_cfg, log_prefix: str = "") -> list:
    """The step hooks a trainer gives the loop for the evaluation flags; ``writer``: its RunOutputs (trainable,
    model, output folder, previews' settings, and ``save_best``); ``log_prefix`` before every tracker metric."""
    from utils.training_setup import training_noise_scheduler

    hook = build_eval_hook(accelerator, opts, writer.trainable, writer.loaded, training_noise_scheduler(writer.loaded),
                           writer.out_dir, data_cfg=data_cfg, prompt_cfg=prompt_cfg, save_best=writer.save_best,
                           preview_opts=writer.previewer.opts, log_prefix=log_prefix)
    return [hook] if hook is not None else []
