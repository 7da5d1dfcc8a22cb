#!/usr/bin/env python
"""Train a Textual Inversion embedding for Stable Diffusion 1.x / 2.x / SDXL, on one or many GPUs.

    python train_textual_inversion.py --pretrained_model_name_or_path MODEL \\
        --train_data_dir DATA --placeholder_token my-thing --initializer_token object --output_dir out
    accelerate launch --config_file configs/accelerate/multi_gpu_1node.yaml --num_processes 4 \\
        train_textual_inversion.py ...                # the same on 4 GPUs
    python train_textual_inversion.py --demo          # tiny built-in model and sample images, CPU, ~1 minute

Writes <output_dir>/<name>.pt (A1111), learned_embeds.safetensors (diffusers), periodic copies in embeddings/,
previews in images/, the loss log textual_inversion_loss.csv, resumable checkpoint-N/ folders, training_settings.json
and a model card README.md (uploaded with the final files by --push_to_hub).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from utils import cli
from utils.cluster import add_cluster_args
from utils.config import TextualInversionConfig
from utils.errors import UserError, exit_on_user_error
from utils.eval_args import add_eval_args, eval_options

PROG = "train_textual_inversion.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arg(p)
    p.add_argument("--demo", action="store_true",
                   help="Train on the built-in tiny model and examples/sample_images (offline, CPU, about a minute); "
                        "other flags still apply.")
    cli.add_model_args(p)
    g = p.add_argument_group("embedding")
    g.add_argument("--placeholder_token", "--embedding_name", dest="placeholder_token",
                   help="The embedding's name: the word you will write in prompts (and its file name).")
    g.add_argument("--initializer_token", "--init_text", dest="initializer_token", default="*",
                   help="Text whose token embeddings start the vectors (A1111's 'initialization text'; empty = zeros).")
    g.add_argument("--num_vectors", type=int, default=1, help="Vectors per token, 1-75.")
    g.add_argument("--resume_embedding", metavar="FILE",
                   help="Continue training this embedding file (any supported format); its step counter continues.")
    g.add_argument("--save_image_embeddings", action="store_true",
                   help="Also save A1111 PNG cards with the embedding inside, in image_embeddings/.")
    g.add_argument("--save_as_full_pipeline", action="store_true",
                   help="Also save the whole model with the embedding added (new tokenizer tokens and text-encoder "
                        "rows) as a diffusers pipeline in --output_dir, as diffusers' example does.")
    g = p.add_argument_group("many embeddings in one run (README: Many embeddings in one run)")
    g.add_argument("--concepts", metavar="FILE",
                   help="Train every embedding listed in FILE (YAML, JSON or CSV: name, train_data_dir or "
                        "dataset_name, init_text, num_vectors, template, learning_rate) in one run through one "
                        "frozen model; each gets <output_dir>/<name>/ with a single run's files.")
    g.add_argument("--sweep", metavar="GRID",
                   help="Expand the embedding (or each of --concepts) into one variant per combination, e.g. "
                        "\"learning_rate=2e-3,5e-3,1e-2 num_vectors=1,2\" (keys: learning_rate, num_vectors, "
                        "init_text, template); variants are named <name>-lr2e-3-v1 and so on.")
    cli.add_data_args(p, default_template=None)
    # Batch 4: measured on the tiny-world model, batch 1 did not reliably learn the concept in 200 steps (README).
    cli.add_optim_args(p, default_lr="0.005", default_weight_decay=0.0, default_batch_size=4)
    cli.add_output_args(p)
    cli.add_logging_args(p)
    add_eval_args(p)
    add_cluster_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    a = cli.parse_with_config(build_parser(), argv)
    if a.demo:
        apply_demo_defaults(a, sys.argv[1:] if argv is None else argv)
    return a


def resolve_config(argv: list[str] | None = None) -> TextualInversionConfig:
    """Flags + --config file + --demo defaults, once, as the typed config the rest of the run reads."""
    return cli.to_config(parse_args(argv), TextualInversionConfig)


def apply_demo_defaults(a: argparse.Namespace, argv: list[str]) -> None:
    """The README's first command: everything local, small and quick. Flags given explicitly still win. The tiny
    model's folder only: main builds it (build_demo_model) after the flags are checked."""
    from utils.tiny_models import tiny_model_dir

    given = {s.split("=")[0] for s in argv if s.startswith("--")}
    # The tiny model's ops are overhead-bound: one thread is as fast, and far faster beside other busy processes.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    defaults = {
        "--pretrained_model_name_or_path": ("pretrained_model_name_or_path", str(tiny_model_dir("sd1"))),
        "--train_data_dir": ("train_data_dir", str(Path(__file__).resolve().parent / "examples" / "sample_images")),
        "--placeholder_token": ("placeholder_token", "red-ball"),
        "--initializer_token": ("initializer_token", "ball"),
        "--num_vectors": ("num_vectors", 2),
        "--resolution": ("resolution", 64),
        "--train_batch_size": ("train_batch_size", 2),
        "--max_train_steps": ("max_train_steps", 300),
        "--output_dir": ("output_dir", "demo_output"),
        "--preview_every": ("preview_every", 100),
        "--preview_steps": ("preview_steps", 10),
        "--save_every": ("save_every", 100),
        "--checkpointing_steps": ("checkpointing_steps", 100),
        "--save_image_embeddings": ("save_image_embeddings", True),
    }
    for flag, (dest, value) in defaults.items():
        if flag not in given:
            setattr(a, dest, value)


def build_demo_model(cfg: TextualInversionConfig) -> None:
    """--demo's tiny model, built on first use once the flags are known to be good (it needs torch)."""
    from utils.tiny_models import tiny_model_dir, tiny_model_path

    if cfg.model.pretrained_model_name_or_path == str(tiny_model_dir("sd1")):
        tiny_model_path("sd1")


def main(argv: list[str] | None = None) -> int:
    cfg = resolve_config(argv)
    # Everything that can be checked without a model is checked first; the flags before torch is even imported.
    cli.check_flags(cfg)
    if cfg.demo:
        build_demo_model(cfg)
    if cfg.many.active:
        from utils import multi_run

        return multi_run.main(cfg)
    e = cfg.embedding
    if not e.placeholder_token and not e.resume_embedding:
        raise UserError("give --placeholder_token (the embedding's name) or --resume_embedding FILE")
    eval_opts = eval_options(cfg.evaluation, cfg.data.train_data_dir)

    from utils.embeddings import MAX_VECTORS, load_embedding, sanitize_name
    from utils.eval_hook import eval_hooks
    from utils.run import finish_run
    from utils.trainers import textual_inversion
    from utils.trainers.textual_inversion import TextualInversion
    from utils.training import train
    from utils.training_setup import load_model_for_training, training_noise_scheduler

    cli.check_run(cfg)
    resumed = load_embedding(e.resume_embedding) if e.resume_embedding else None
    if e.resume_embedding and resumed is None:
        raise UserError(f"--resume_embedding {e.resume_embedding}: the file holds no embedding")
    if resumed is None and not 1 <= e.num_vectors <= MAX_VECTORS:
        raise UserError(f"--num_vectors must be 1..{MAX_VECTORS} (got {e.num_vectors})")
    name = sanitize_name(e.placeholder_token or resumed.name)
    source = cli.model_source(cfg)
    data_cfg, prompt_cfg, latent_cfg = cli.data_options(cfg, placeholder=name)
    accelerator, summary = cli.start_run(cfg, data_cfg, prompt_cfg)
    cli.check_data_fits(cfg, accelerator, summary, data_cfg)

    loaded = load_model_for_training(source, cli.model_options(cfg, accelerator.mixed_precision), accelerator.device)
    embedding = resumed if resumed is not None else textual_inversion.new_embedding(
        loaded, name, e.initializer_token, e.num_vectors)
    embedding.name = name
    textual_inversion.check_width(embedding, loaded)
    trainable = TextualInversion.build(loaded.pipeline, embedding)

    batches, max_steps = cli.plan_batches(cfg, accelerator, summary, data_cfg, prompt_cfg, latent_cfg, loaded,
                                          initial_step=trainable.initial_step)
    settings = cli.run_settings(cfg, accelerator, loaded, summary, max_steps, embedding_name=name)
    loop_cfg = cli.loop_config(cfg, max_steps, loaded.prediction_type, settings, batches.micro_batches_per_epoch)
    out_dir = loop_cfg.output_dir
    writer = textual_inversion.TextualInversionOutputs(
        accelerator, trainable, loaded, out_dir, cli.preview_options(cfg, data_cfg),
        save_image_embeddings=e.save_image_embeddings, also_bin=cfg.saving.no_safe_serialization,
        settings=settings, save_optimizer_state=cfg.saving.save_optimizer_state)
    outputs = writer.callbacks(previews=not cfg.previews.no_previews)
    hooks = eval_hooks(accelerator, eval_opts, writer, data_cfg, prompt_cfg)

    result = train(accelerator, trainable, batches, training_noise_scheduler(loaded), loop_cfg, outputs, hooks)
    if e.save_as_full_pipeline and accelerator.is_main_process:
        from utils.full_pipeline import save_full_pipeline

        save_full_pipeline(source, name, out_dir)
    finish_run(accelerator, result, name, "embedding", out_dir, hub=cli.hub_target(cfg))
    return 0


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        sys.exit(main())
