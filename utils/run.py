"""The start and end of a training run: the accelerator and data scan, the batch plan, and after the loop the
artifact, the trackers closed, the model card, the Hub upload and what the output folder holds."""

from __future__ import annotations

from pathlib import Path

from utils.data import DataConfig, PromptConfig, scan_dataset
from utils.data.plan import optimizer_steps_per_epoch
from utils.latents import LatentConfig
from utils.models import LoadedModel
from utils.outputs import describe_outputs
from utils.training import make_accelerator
from utils.training_setup import LoaderSource, build_batch_source, resolve_max_steps


def start_run(out_dir: Path, mixed_precision: str | None, gradient_accumulation_steps: int, report_to: str, seed: int,
              ddp_timeout: float | None, data_cfg: DataConfig, prompt_cfg: PromptConfig, logging_dir: str = "logs"):
    """The accelerator (one thread budget per rank) and the data scan, which fails before any model is loaded."""
    from utils.cluster import apply_threads_per_rank

    accelerator = make_accelerator(out_dir, mixed_precision, gradient_accumulation_steps, report_to, seed,
                                   ddp_timeout=ddp_timeout, logging_dir=logging_dir)
    apply_threads_per_rank()
    report = out_dir / "skipped_images.txt"
    summary = scan_dataset(data_cfg, prompt_cfg, report_file=report if accelerator.is_main_process else None)
    accelerator.print(summary.describe())
    return accelerator, summary


def plan_batches(accelerator, summary, data_cfg: DataConfig, prompt_cfg: PromptConfig, latent_cfg: LatentConfig,
                 loaded: LoadedModel, out_dir: Path, *, batch_size: int, accumulation: int, seed: int,
                 num_workers: int, cache_latents: bool, max_train_steps: int | None, num_train_epochs: int | None,
                 report_to: str, ddp_timeout: float | None, initial_step: int = 0) -> tuple[LoaderSource, int]:
    """The batch source, the number of optimizer steps to train to, and the printed plan."""
    batches = build_batch_source(accelerator, summary, data_cfg, prompt_cfg, latent_cfg, loaded,
                                 batch_size=batch_size, seed=seed, num_workers=num_workers,
                                 cache_latents=cache_latents, report_file=out_dir / "skipped_images.txt",
                                 accumulation=accumulation)
    steps_per_epoch = optimizer_steps_per_epoch(batches.micro_batches_per_epoch, accumulation)
    max_steps = resolve_max_steps(max_train_steps, num_train_epochs, steps_per_epoch, initial_step)
    print_run_plan(accelerator, loaded, summary, out_dir, batch_size=batch_size, accumulation=accumulation,
                   max_steps=max_steps, steps_per_epoch=steps_per_epoch, num_workers=num_workers,
                   report_to=report_to, ddp_timeout=ddp_timeout)
    return batches, max_steps


def print_run_plan(accelerator, loaded: LoadedModel, summary, out_dir: Path, *, batch_size: int, accumulation: int,
                   max_steps: int, steps_per_epoch: int, num_workers: int, report_to: str,
                   ddp_timeout: float | None) -> None:
    from utils.cluster import attention_backend, run_plan

    accelerator.print(run_plan(
        accelerator, train_batch_size=batch_size, gradient_accumulation_steps=accumulation,
        max_train_steps=max_steps, steps_per_epoch=steps_per_epoch, attention=attention_backend(loaded.pipeline.unet),
        dataset_examples=summary.num_examples, dataset_kind=summary.kind, dataloader_num_workers=num_workers,
        output_dir=out_dir, trackers=report_to, ddp_timeout=ddp_timeout).describe())


def finish_run(accelerator, result, name: str, kind: str, out_dir: Path, hub=None) -> None:
    """Final files as a W&B artifact (when W&B is on), trackers closed, the model card written (README.md) and, with
    ``hub`` (a utils.hub.HubTarget from --push_to_hub), published; then what the output folder holds."""
    from utils.cluster import log_output_artifact

    log_output_artifact(accelerator, name, kind, result.files, {"step": result.step})
    run_link = tracker_run_link(accelerator)
    accelerator.end_training()
    if not accelerator.is_main_process:
        return
    from utils import hub as hub_card

    out_dir = Path(out_dir)
    settings = hub_card.read_settings(out_dir)
    hub_card.write_model_card(out_dir, hub_card.card_info(out_dir, settings, run_link=run_link))
    print(f"Done at step {result.step} ({result.stopped_by}). Outputs in {out_dir.resolve()}:")
    for line in describe_outputs(out_dir, result.files):
        print(f"  {line}")
    if hub is None:
        return
    if result.stopped_by == "signal":
        print("Not published: the run was stopped before its end; it is published when a resumed run finishes.")
        return
    try:
        repo_id = hub_card.publish(out_dir, hub, run_link=run_link)
    except Exception as e:  # network, permissions, quota: the run itself is done and saved
        from utils.errors import UserError

        raise UserError(f"training finished and everything is saved in {out_dir}, but the upload to the Hub failed "
                        f"({type(e).__name__}: {' '.join(str(e).split())[:300]}); publish it later with: "
                        f"python -m tools.hub {out_dir}" + (f" --hub_model_id {hub.repo_id}" if hub.repo_id else "")
                        ) from None
    print(f"Published: https://huggingface.co/{repo_id}")


def tracker_run_link(accelerator) -> str | None:
    """The W&B run's page, or where an offline run waits for `wandb sync` (None without W&B)."""
    if not accelerator.is_main_process:
        return None
    try:
        run = accelerator.get_tracker("wandb", unwrap=True)
    except (ValueError, KeyError):
        return None
    if run is None or not hasattr(run, "id"):
        return None
    url = getattr(run, "url", None)
    if url:
        return url
    run_dir = Path(getattr(run, "dir", "") or ".").parent
    return f"W&B run `{run.id}` (offline; upload it with `wandb sync {run_dir}`)"
