#!/usr/bin/env python
"""Train an A1111-compatible hypernetwork for Stable Diffusion, on one or many GPUs.

    python train_hypernetwork.py --pretrained_model_name_or_path MODEL --train_data_dir DATA \\
        --hypernetwork_name my-style --layer_structure "1, 2, 1" --output_dir out
    accelerate launch --config_file configs/accelerate/multi_gpu_1node.yaml --num_processes 4 \\
        train_hypernetwork.py ...                     # the same on 4 GPUs

Uses the same loop, data, checkpoints, resume, signals, trackers and previews as train_textual_inversion.py. Writes
<output_dir>/<name>.pt (A1111 layout) and <name>.safetensors, periodic copies in hypernetworks/, previews in images/,
the loss log hypernetwork_loss.csv, resumable checkpoint-N/ folders, training_settings.json and a model card
README.md (uploaded with the final files by --push_to_hub).
"""

from __future__ import annotations

import argparse
import sys

from utils import cli
from utils.cluster import add_cluster_args
from utils.config import HypernetworkConfig, HypernetworkSettings
from utils.errors import UserError, exit_on_user_error
from utils.eval_args import add_eval_args, eval_options
from utils.hypernetwork_options import WEIGHT_INITS, HypernetworkOptions, check_options, parse_layer_structure

PROG = "train_hypernetwork.py"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_config_arg(p)
    cli.add_model_args(p)
    g = p.add_argument_group("hypernetwork")
    g.add_argument("--hypernetwork_name", help="Name of the new hypernetwork (file name, <hypernet:NAME> tag).")
    g.add_argument("--resume_hypernetwork", metavar="FILE",
                   help="Continue training this hypernetwork file (.pt of any A1111 era, or our .safetensors); "
                        "its step counter continues and its architecture options are kept.")
    g.add_argument("--layer_structure", default="1, 2, 1",
                   help="Relative layer widths, starting and ending with 1 (A1111's 'Modules layer structure').")
    g.add_argument("--activation_func", default="linear",
                   help="linear, relu, leakyrelu, elu, swish (= Hardswish, as A1111), tanh, sigmoid, or any "
                        "torch.nn activation name in lower case (gelu, silu, mish, ...).")
    g.add_argument("--weight_init", default="Normal",
                   choices=WEIGHT_INITS)
    g.add_argument("--layer_norm", action="store_true", help="LayerNorm after each layer.")
    g.add_argument("--use_dropout", action="store_true", help="Dropout (training only).")
    g.add_argument("--dropout_structure", default="",
                   help="Dropout probability per layer, e.g. '0, 0.05, 0' (implies --use_dropout).")
    g.add_argument("--last_layer_dropout", action="store_true", help="Dropout before the last layer too.")
    g.add_argument("--activate_output", action="store_true", help="Apply the activation after the last layer.")
    g.add_argument("--sizes", default=None,
                   help="Context widths that get modules, e.g. '768, 320, 640, 1280' (A1111's SD-1 default). "
                        "Default: the model's text width and its UNet attention widths.")
    g.add_argument("--offload_text_encoder", action="store_true",
                   help="Keep the text encoder on the CPU: prompts are encoded once and cached (saves its memory).")
    g.add_argument("--embeddings_dir", action="append", default=[],
                   help="Embedding folders usable in training prompts (repeatable).")
    cli.add_data_args(p, default_template="hypernetwork")
    cli.add_optim_args(p, default_lr="0.00001", default_weight_decay=0.01)
    cli.add_output_args(p)
    cli.add_logging_args(p)
    add_eval_args(p)
    add_cluster_args(p)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return cli.parse_with_config(build_parser(), argv)


def resolve_config(argv: list[str] | None = None) -> HypernetworkConfig:
    """Flags + --config file, once, as the typed config the rest of the run reads."""
    return cli.to_config(parse_args(argv), HypernetworkConfig)


def parse_sizes(text: str) -> list[int]:
    """``--sizes '768, 320'`` -> [768, 320]; anything but positive whole numbers is a one-line error."""
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise UserError(f"--sizes {text!r}: expected comma-separated widths such as '768, 320, 640, 1280'") from None
    if not sizes or min(sizes) <= 0:
        raise UserError(f"--sizes {text!r}: expected comma-separated positive widths such as '768, 320, 640, 1280'")
    return sizes


def hypernetwork_options(a: HypernetworkSettings):
    try:
        dropout = [float(x) for x in a.dropout_structure.split(",") if x.strip()] if a.dropout_structure else None
    except ValueError:
        raise UserError(f"--dropout_structure {a.dropout_structure!r}: expected comma-separated numbers") from None
    return check_options(HypernetworkOptions(
        layer_structure=parse_layer_structure(a.layer_structure), activation_func=a.activation_func.lower(),
        is_layer_norm=a.layer_norm, weight_initialization=a.weight_init, activate_output=a.activate_output,
        use_dropout=a.use_dropout or bool(dropout), dropout_structure=dropout,
        last_layer_dropout=a.last_layer_dropout))


def main(argv: list[str] | None = None) -> int:
    cfg = resolve_config(argv)
    h = cfg.hypernetwork
    cli.check_flags(cfg)
    if not h.hypernetwork_name and not h.resume_hypernetwork:
        raise UserError("give --hypernetwork_name or --resume_hypernetwork FILE")
    sizes = parse_sizes(h.sizes) if h.sizes else None
    options = hypernetwork_options(h)  # the architecture flags, checked before torch loads
    eval_opts = eval_options(cfg.evaluation, cfg.data.train_data_dir)

    from accelerate.utils import set_seed

    from utils.embeddings import sanitize_name
    from utils.eval_hook import eval_hooks
    from utils.hypernetwork import Hypernetwork, attention_context_widths, load_hypernetwork
    from utils.prompts import warn_refused_files
    from utils.run import finish_run
    from utils.trainers.hypernetwork import HypernetworkOutputs, HypernetworkTrainable
    from utils.training import train
    from utils.training_setup import load_model_for_training, training_noise_scheduler

    cli.check_run(cfg)
    resumed = load_hypernetwork(h.resume_hypernetwork) if h.resume_hypernetwork else None
    name = sanitize_name(h.hypernetwork_name or resumed.name)
    source = cli.model_source(cfg)
    data_cfg, prompt_cfg, latent_cfg = cli.data_options(cfg, placeholder=name)
    accelerator, summary = cli.start_run(cfg, data_cfg, prompt_cfg)
    cli.check_data_fits(cfg, accelerator, summary, data_cfg)

    loaded = load_model_for_training(source, cli.model_options(cfg, accelerator.mixed_precision), accelerator.device)
    if resumed is not None:
        hn = resumed
        hn.name = name
    else:
        text_width = loaded.pipeline.unet.config.cross_attention_dim
        sizes = sizes or sorted(attention_context_widths(loaded.pipeline.unet) | {text_width})
        set_seed(cfg.training.seed)  # the new modules' initial weights are the same on every rank
        hn = Hypernetwork.create(name, sizes, options)
    trainable = HypernetworkTrainable.build(loaded, hn, accelerator.device, h.offload_text_encoder,
                                            embeddings_dirs=h.embeddings_dir)
    if accelerator.is_main_process:
        warn_refused_files(trainable.conditioning.encoder.db, PROG)

    batches, max_steps = cli.plan_batches(cfg, accelerator, summary, data_cfg, prompt_cfg, latent_cfg, loaded,
                                          initial_step=trainable.initial_step)
    settings = cli.run_settings(cfg, accelerator, loaded, summary, max_steps, hypernetwork_name=name,
                                sizes=sorted(hn.layers))
    loop_cfg = cli.loop_config(cfg, max_steps, loaded.prediction_type, settings, batches.micro_batches_per_epoch)
    out_dir = loop_cfg.output_dir
    outputs = HypernetworkOutputs(accelerator, trainable, loaded, out_dir, cli.preview_options(cfg, data_cfg),
                                  settings=settings, save_optimizer_state=cfg.saving.save_optimizer_state)

    hooks = eval_hooks(accelerator, eval_opts, outputs, data_cfg, prompt_cfg)
    result = train(accelerator, trainable, batches, training_noise_scheduler(loaded), loop_cfg,
                   outputs.callbacks(previews=not cfg.previews.no_previews), hooks)
    finish_run(accelerator, result, name, "hypernetwork", out_dir, hub=cli.hub_target(cfg))
    return 0


if __name__ == "__main__":
    with exit_on_user_error(PROG):
        sys.exit(main())
