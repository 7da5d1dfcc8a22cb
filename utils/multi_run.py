"""``train_textual_inversion.py --concepts FILE`` / ``--sweep``: the recipe of a many-embedding run.

The same steps as the single run in train_textual_inversion.py, once per concept where a concept has its own (data
scan, new embedding, output writer, settings) and once for the run where the work is shared (accelerator, model,
latent cache, loop). See utils/multi_embedding.py for why the result is each embedding's own run.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from utils import cli
from utils.concepts import Concept, Defaults, expand_sweep, load_concepts, parse_sweep, single_concept
from utils.errors import UserError


def concept_args(args: argparse.Namespace, c: Concept) -> argparse.Namespace:
    """The run's flags as concept ``c``'s own single run would have them."""
    a = argparse.Namespace(**vars(args))
    a.placeholder_token, a.initializer_token, a.num_vectors = c.name, c.initializer_token, c.num_vectors
    a.train_data_dir, a.dataset_name = c.train_data_dir, c.dataset_name
    a.template_file, a.learning_rate = c.template_file, c.learning_rate
    if a.preview_prompt:
        a.preview_prompt = a.preview_prompt.replace("[name]", c.name)
    return a


def read_concepts(args: argparse.Namespace) -> list[Concept]:
    """--concepts (or the run's own embedding flags as one concept), expanded by --sweep; checked, no model."""
    defaults = Defaults(initializer_token=args.initializer_token, num_vectors=args.num_vectors,
                        template_file=args.template_file, learning_rate=str(args.learning_rate),
                        train_data_dir=args.train_data_dir, dataset_name=args.dataset_name)
    if args.concepts:
        concepts = load_concepts(args.concepts, defaults)
    elif args.placeholder_token:
        concepts = [single_concept(args.placeholder_token, defaults)]
    else:
        raise UserError("--sweep needs the concept to sweep: --placeholder_token NAME and its data, or --concepts FILE")
    if args.sweep:
        concepts = expand_sweep(concepts, parse_sweep(args.sweep), defaults)
    return concepts


def lr_factors(args: argparse.Namespace, concepts: list[Concept]) -> list[float]:
    """Each concept's rate as a multiple of the run's --learning_rate (the scheduler's shape applies to all).

    Rates that differ from the run's must be plain numbers, and the run's a plain number > 0."""
    base_text = str(args.learning_rate)
    if all(c.learning_rate == base_text for c in concepts):
        return [1.0] * len(concepts)
    try:
        base = float(base_text)
    except ValueError:
        base = None
    for c in concepts:
        if c.learning_rate == base_text:
            continue
        try:
            float(c.learning_rate)
        except ValueError:
            raise UserError(f"concept '{c.name}': learning_rate {c.learning_rate!r} is a schedule; per-concept rates "
                            f"must be plain numbers (give an A1111 schedule as --learning_rate for all)") from None
        if base is None or base <= 0:
            raise UserError(f"concepts with their own learning_rate need a plain-number --learning_rate > 0 (got "
                            f"{base_text!r}): each concept's rate is that rate scaled, with --lr_scheduler's shape")
    return [1.0 if c.learning_rate == base_text else float(c.learning_rate) / base for c in concepts]


def check_many_flags(args: argparse.Namespace) -> None:
    """Single-run flags a many-embedding run does not take (one line each, before anything loads)."""
    refused = {
        "resume_embedding": "--resume_embedding continues one file; train it alone",
        "enable_buckets": "--enable_buckets: every embedding's micro-batch would have its own size; train without "
                          "buckets (--center_crop keeps the aspect) or separately",
        "push_to_hub": "--push_to_hub publishes one embedding; publish each folder with python -m utils.hub FOLDER",
        "save_as_full_pipeline": "--save_as_full_pipeline saves one embedding into a model; train it alone",
    }
    for dest, message in refused.items():
        if getattr(args, dest, None):
            raise UserError(f"{message} (not with --concepts/--sweep)")
    if args.max_grad_norm and args.clip_grad_mode == "norm":
        raise UserError("--max_grad_norm with --clip_grad_mode norm would clip all embeddings by their joint norm "
                        "(not what each one's own run does); use --clip_grad_mode value, or train separately")


def main(args: argparse.Namespace) -> int:
    from utils.cluster import apply_threads_per_rank
    from utils.data import TrainLoader, scan_dataset
    from utils.data.balanced import BalancedBatches
    from utils.data.plan import optimizer_steps_per_epoch
    from utils.latents import LatentStore, vae_identity
    from utils.multi_embedding import ManyEmbeddings
    from utils.multi_outputs import EmbeddingInfo, ManyOutputs, PerEmbeddingLog
    from utils.ti_outputs import TextualInversionOutputs, check_width, new_embedding
    from utils.training import config_for_trackers, make_accelerator, train
    from utils.training_setup import (
        LoaderSource,
        load_model_for_training,
        resolve_max_steps,
        tracker_run_link,
        training_noise_scheduler,
    )

    check_many_flags(args)
    concepts = read_concepts(args)
    factors = lr_factors(args, concepts)
    per = [concept_args(args, c) for c in concepts]
    out_dir = Path(args.output_dir)
    folders = [out_dir / c.name for c in concepts]
    cfgs = [cli.data_options(a, placeholder=c.name) for a, c in zip(per, concepts)]

    accelerator = make_accelerator(out_dir, args.mixed_precision, args.gradient_accumulation_steps, args.report_to,
                                   args.seed, ddp_timeout=args.ddp_timeout, logging_dir=args.logging_dir)
    apply_threads_per_rank()
    summaries = []
    for a, c, folder, (data_cfg, prompt_cfg, _) in zip(per, concepts, folders, cfgs):
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        report = folder / "skipped_images.txt" if accelerator.is_main_process else None
        try:
            summary = scan_dataset(data_cfg, prompt_cfg, report_file=report)
            cli.check_data_fits(a, accelerator, summary, data_cfg)
        except UserError as e:
            raise UserError(f"concept '{c.name}': {e}") from None
        accelerator.print(f"{c.name}: {summary.describe()}")
        summaries.append(summary)

    loaded = load_model_for_training(cli.model_source(args), cli.model_options(args, accelerator.mixed_precision),
                                     accelerator.device)
    embeddings = []
    for c in concepts:
        emb = new_embedding(loaded, c.name, c.initializer_token, c.num_vectors)
        check_width(emb, loaded)
        embeddings.append(emb)
    trainable = ManyEmbeddings.build(loaded.pipeline, embeddings, factors)

    # One latent store for all: a picture two concepts share (a sweep's variants) is encoded once.
    vae = loaded.pipeline.vae
    latent_cfg = cfgs[0][2]
    store = LatentStore.for_vae(vae, latent_cfg, identity=vae_identity(vae, loaded.identity.sha256 or
                                                                        loaded.identity.name),
                                keep=not args.no_cache_latents and not args.random_crop)
    sources = []
    for folder, summary, (data_cfg, prompt_cfg, _) in zip(folders, summaries, cfgs):
        report = folder / ("skipped_images.txt" if accelerator.is_main_process else
                           f"skipped_images.rank{accelerator.process_index}.txt")
        loader = TrainLoader(summary, data_cfg, prompt_cfg, batch_size=args.train_batch_size,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, seed=args.seed,
                             num_workers=args.dataloader_num_workers, latents=store, report_file=report,
                             accumulation=args.gradient_accumulation_steps)
        sources.append(LoaderSource(loader, vae, args.seed, loaded.family == "sdxl", latent_cfg.latent_sampling))
    batches = BalancedBatches(sources, args.seed)
    A = args.gradient_accumulation_steps
    max_steps = resolve_max_steps(args.max_train_steps, args.num_train_epochs,
                                  optimizer_steps_per_epoch(batches.micro_batches_per_epoch, A))

    infos, writers = [], []
    for k, (a, c, folder, summary, src) in enumerate(zip(per, concepts, folders, summaries, sources)):
        settings = cli.run_settings(a, accelerator, loaded, summary, max_steps, embedding_name=c.name,
                                    trained_with=f"{len(concepts)} embeddings in one run",
                                    concepts=args.concepts, sweep=args.sweep)
        writers.append(TextualInversionOutputs(
            accelerator, trainable.view(k), loaded, folder, cli.preview_options(a, cfgs[k][0]),
            save_image_embeddings=args.save_image_embeddings, also_bin=args.no_safe_serialization,
            settings=settings, save_optimizer_state=args.save_optimizer_state))
        infos.append(EmbeddingInfo(c.name, folder, src.micro_batches_per_epoch // A, factors[k]))
    for w in writers[1:]:  # one prompt encoder for every embedding's previews
        w._encoder = writers[0].preview_encoder()

    run_settings = {"concepts": args.concepts, "sweep": args.sweep, "embeddings": [c.name for c in concepts],
                    **{k: v for k, v in vars(args).items() if k not in ("config", "hub_token")}}
    loop_cfg = cli.loop_config(args, max_steps, loaded.prediction_type, config_for_trackers(run_settings),
                               batches.micro_batches_per_epoch)
    accelerator.print(
        f"{len(concepts)} embeddings in one run: each {args.train_batch_size} picture(s) per process per micro-batch "
        f"(the UNet sees {len(concepts) * args.train_batch_size}), {max_steps} steps; files in {out_dir}/<name>/")
    hook = PerEmbeddingLog(trainable, infos, trainable_csv())
    result = train(accelerator, trainable, batches, training_noise_scheduler(loaded), loop_cfg,
                   ManyOutputs(writers).callbacks(previews=not args.no_previews), hooks=[hook])
    finish(accelerator, result, folders, out_dir, tracker_run_link(accelerator))
    return 0


def trainable_csv() -> str:
    """The single run's loss log name (each embedding's folder gets one)."""
    from utils.textual_inversion import TextualInversion

    return TextualInversion.csv_name


def finish(accelerator, result, folders: list[Path], out_dir: Path, run_link: str | None) -> None:
    """Trackers closed; each embedding's folder gets its model card, as a single run's does."""
    from utils.cluster import log_output_artifact

    log_output_artifact(accelerator, out_dir.resolve().name, "embeddings", result.files, {"step": result.step})
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    from utils import hub

    for folder in folders:
        hub.write_model_card(folder, hub.card_info(folder, hub.read_settings(folder), run_link=run_link))
    print(f"Done at step {result.step} ({result.stopped_by}). {len(folders)} embeddings in {out_dir.resolve()}/<name>/; "
          f"the table is in {out_dir / 'embeddings_summary.csv'}")
