"""``train_textual_inversion.py --concepts FILE`` / ``--sweep``: the recipe of a many-embedding run.

The same steps as the single run in train_textual_inversion.py, once per concept where a concept has its own (data
scan, new embedding, output writer, settings) and once for the run where the work is shared (accelerator, model,
latent cache, loop). See utils/trainers/many_embeddings.py for why the result is each embedding's own run.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from utils import cli
from utils.concepts import Concept, Defaults, expand_sweep, load_concepts, parse_sweep, single_concept
from utils.config import TextualInversionConfig
from utils.errors import UserError
from utils.eval_args import eval_options


def concept_config(cfg: TextualInversionConfig, c: Concept) -> TextualInversionConfig:
    """The run's config as concept ``c``'s own single run would have it."""
    preview_prompt = cfg.previews.preview_prompt and cfg.previews.preview_prompt.replace("[name]", c.name)
    return replace(
        cfg,
        embedding=replace(cfg.embedding, placeholder_token=c.name, initializer_token=c.initializer_token,
                          num_vectors=c.num_vectors),
        data=replace(cfg.data, train_data_dir=c.train_data_dir, dataset_name=c.dataset_name),
        prompts=replace(cfg.prompts, template_file=c.template_file),
        optim=replace(cfg.optim, learning_rate=c.learning_rate),
        previews=replace(cfg.previews, preview_prompt=preview_prompt),
        evaluation=replace(cfg.evaluation, eval_data_dir=c.eval_data_dir))


def read_concepts(cfg: TextualInversionConfig) -> list[Concept]:
    """--concepts (or the run's own embedding flags as one concept), expanded by --sweep; checked, no model."""
    e, d = cfg.embedding, cfg.data
    defaults = Defaults(initializer_token=e.initializer_token, num_vectors=e.num_vectors,
                        template_file=cfg.prompts.template_file, learning_rate=cfg.optim.learning_rate,
                        train_data_dir=d.train_data_dir, dataset_name=d.dataset_name)
    if cfg.many.concepts:
        concepts = load_concepts(cfg.many.concepts, defaults)
    elif e.placeholder_token:
        concepts = [single_concept(e.placeholder_token, defaults)]
    else:
        raise UserError("--sweep needs the concept to sweep: --placeholder_token NAME and its data, or --concepts FILE")
    if cfg.many.sweep:
        concepts = expand_sweep(concepts, parse_sweep(cfg.many.sweep), defaults)
    return concepts


def lr_factors(base_text: str, concepts: list[Concept]) -> list[float]:
    """Each concept's rate as a multiple of the run's --learning_rate ``base_text`` (the scheduler's shape applies to
    all). Rates that differ from the run's must be plain numbers, and the run's a plain number > 0."""
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


def check_many_flags(cfg: TextualInversionConfig) -> None:
    """Single-run flags a many-embedding run does not take (one line each, before anything loads)."""
    refused = {
        "--resume_embedding continues one file; train it alone": cfg.embedding.resume_embedding,
        "--enable_buckets: every embedding's micro-batch would have its own size; train without buckets "
        "(--center_crop keeps the aspect) or separately": cfg.data.enable_buckets,
        "--push_to_hub publishes one embedding; publish each folder with python -m tools.hub FOLDER":
            cfg.hub.push_to_hub,
        "--save_as_full_pipeline saves one embedding into a model; train it alone": cfg.embedding.save_as_full_pipeline,
    }
    for message, given in refused.items():
        if given:
            raise UserError(f"{message} (not with --concepts/--sweep)")
    ev = cfg.evaluation
    if ev.eval_data_dir:
        raise UserError("--eval_data_dir: one folder cannot hold every embedding's held-out pictures; give each "
                        "concept its own eval_data_dir in the concepts file (not with --concepts/--sweep)")
    for flag, given in (("--eval_clip_model", ev.eval_clip_model), ("--eval_dino_model", ev.eval_dino_model)):
        if given:
            raise UserError(f"{flag}: one scoring model per embedding would be loaded; not with --concepts/--sweep "
                            f"(train the embedding alone for it)")
    if cfg.optim.max_grad_norm and cfg.optim.clip_grad_mode == "norm":
        raise UserError("--max_grad_norm with --clip_grad_mode norm would clip all embeddings by their joint norm "
                        "(not what each one's own run does); use --clip_grad_mode value, or train separately")


def main(cfg: TextualInversionConfig) -> int:
    check_many_flags(cfg)
    concepts = read_concepts(cfg)
    factors = lr_factors(cfg.optim.learning_rate, concepts)
    cli.check_run(cfg)
    per = [concept_config(cfg, c) for c in concepts]
    eval_opts = []
    for ck, c in zip(per, concepts):  # each embedding's evaluation as its own run would have it (its own pictures)
        try:
            eval_opts.append(eval_options(ck.evaluation, ck.data.train_data_dir))
        except UserError as e:
            raise UserError(f"concept '{c.name}': {e}") from None

    from utils.cluster import apply_threads_per_rank
    from utils.data import TrainLoader, scan_dataset
    from utils.data.balanced import BalancedBatches
    from utils.data.plan import optimizer_steps_per_epoch
    from utils.eval_hook import eval_hooks
    from utils.run import tracker_run_link
    from utils.trainers.many_embeddings import (
        EmbeddingInfo,
        ManyEmbeddings,
        ManyEvalHook,
        ManyOutputs,
        PerEmbeddingLog,
    )
    from utils.trainers.textual_inversion import TextualInversion, TextualInversionOutputs, check_width, new_embedding
    from utils.training import loss_log_name, make_accelerator, train
    from utils.training_setup import (
        LoaderSource,
        latent_store,
        load_model_for_training,
        resolve_max_steps,
        training_noise_scheduler,
    )

    out_dir = Path(cfg.saving.output_dir)
    folders = [out_dir / c.name for c in concepts]
    opts = [cli.data_options(ck, placeholder=c.name) for ck, c in zip(per, concepts)]
    t = cfg.training

    accelerator = make_accelerator(out_dir, cfg.model.mixed_precision, t.gradient_accumulation_steps,
                                   cfg.tracking.report_to, t.seed, ddp_timeout=cfg.cluster.ddp_timeout,
                                   logging_dir=cfg.saving.logging_dir)
    apply_threads_per_rank()
    summaries = []
    for ck, c, folder, (data_cfg, prompt_cfg, _) in zip(per, concepts, folders, opts):
        if accelerator.is_main_process:
            folder.mkdir(parents=True, exist_ok=True)
        report = folder / "skipped_images.txt" if accelerator.is_main_process else None
        try:
            summary = scan_dataset(data_cfg, prompt_cfg, report_file=report)
            cli.check_data_fits(ck, accelerator, summary, data_cfg)
        except UserError as e:
            raise UserError(f"concept '{c.name}': {e}") from None
        accelerator.print(f"{c.name}: {summary.describe()}")
        summaries.append(summary)

    loaded = load_model_for_training(cli.model_source(cfg), cli.model_options(cfg, accelerator.mixed_precision),
                                     accelerator.device)
    embeddings = []
    for c in concepts:
        emb = new_embedding(loaded, c.name, c.initializer_token, c.num_vectors)
        check_width(emb, loaded)
        embeddings.append(emb)
    trainable = ManyEmbeddings.build(loaded.pipeline, embeddings, factors)

    # One latent store for all: a picture two concepts share (a sweep's variants) is encoded once.
    vae = loaded.pipeline.vae
    latent_cfg = opts[0][2]
    store = latent_store(loaded, latent_cfg, keep=not cfg.latents.no_cache_latents and not cfg.data.random_crop)
    sources = []
    for folder, summary, (data_cfg, prompt_cfg, _) in zip(folders, summaries, opts):
        report = folder / ("skipped_images.txt" if accelerator.is_main_process else
                           f"skipped_images.rank{accelerator.process_index}.txt")
        loader = TrainLoader(summary, data_cfg, prompt_cfg, batch_size=t.train_batch_size,
                             rank=accelerator.process_index, world_size=accelerator.num_processes, seed=t.seed,
                             num_workers=cfg.data.dataloader_num_workers, latents=store, report_file=report,
                             accumulation=t.gradient_accumulation_steps)
        sources.append(LoaderSource(loader, vae, t.seed, loaded.family == "sdxl", latent_cfg.latent_sampling))
    batches = BalancedBatches(sources, t.seed, left=trainable.stopped)  # a stopped embedding's samples leave
    A = t.gradient_accumulation_steps
    max_steps = resolve_max_steps(t.max_train_steps, t.num_train_epochs,
                                  optimizer_steps_per_epoch(batches.micro_batches_per_epoch, A))

    infos, writers = [], []
    for k, (ck, c, folder, summary, src) in enumerate(zip(per, concepts, folders, summaries, sources)):
        settings = cli.run_settings(ck, accelerator, loaded, summary, max_steps, embedding_name=c.name,
                                    trained_with=f"{len(concepts)} embeddings in one run")
        writers.append(TextualInversionOutputs(
            accelerator, trainable.view(k), loaded, folder, cli.preview_options(ck, opts[k][0]),
            save_image_embeddings=cfg.embedding.save_image_embeddings, also_bin=cfg.saving.no_safe_serialization,
            settings=settings, save_optimizer_state=cfg.saving.save_optimizer_state))
        infos.append(EmbeddingInfo(c.name, folder, src.micro_batches_per_epoch // A, factors[k]))
    for w in writers[1:]:  # one prompt encoder for every embedding's previews
        w.previewer.encoder = writers[0].previewer.encoder

    run_settings = {**cfg.settings(), "embeddings": [c.name for c in concepts]}
    loop_cfg = cli.loop_config(cfg, max_steps, loaded.prediction_type, run_settings, batches.micro_batches_per_epoch)
    accelerator.print(
        f"{len(concepts)} embeddings in one run: each {t.train_batch_size} picture(s) per process per micro-batch "
        f"(the UNet sees {len(concepts) * t.train_batch_size}), {max_steps} steps; files in {out_dir}/<name>/")
    # Each embedding's evaluation hook as its single run builds it (its own pictures, set, stop and best files).
    own = [eval_hooks(accelerator, o, w, data_cfg, prompt_cfg, log_prefix=f"{c.name}/")
           for o, w, c, (data_cfg, prompt_cfg, _) in zip(eval_opts, writers, concepts, opts)]
    evaluation = ManyEvalHook(trainable, [h[0] if h else None for h in own]) if any(own) else None
    hook = PerEmbeddingLog(trainable, infos, loss_log_name(TextualInversion), evaluation)
    hooks = ([evaluation] if evaluation is not None else []) + [hook]  # the evaluation's files first: in the table
    result = train(accelerator, trainable, batches, training_noise_scheduler(loaded), loop_cfg,
                   ManyOutputs(writers, trainable.stopped).callbacks(previews=not cfg.previews.no_previews),
                   hooks=hooks)
    finish(accelerator, result, folders, out_dir, tracker_run_link(accelerator))
    return 0


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
