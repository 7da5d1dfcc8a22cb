"""Training data: images + captions as a per-rank stream of micro-batches, prompts from templates, buckets.

Use from a trainer, in this order (all cheap: nothing grows with the number of images but a directory listing)::

    summary = scan_dataset(data_cfg, prompt_cfg, report_file=out / "skipped_images.txt")   # UserError if nothing usable
    print(summary.describe())
    store = LatentStore.for_vae(vae, latent_cfg, identity=vae_identity(vae, model_hash))   # utils.latents; optional
    loader = TrainLoader(summary, data_cfg, prompt_cfg, batch_size=b, rank=r, world_size=n, seed=s, latents=store)
    for batch in loader: ...                # endless; loader.epoch / loader.position / loader.state_dict() for resume

The package, one concern per module:

* ``config``   DataConfig, PromptConfig (the data flags, checked when built);
* ``prompts``  captions (.txt side-cars, A1111's caption from a file name), templates, tag shuffle/dropout;
* ``plan``     the epoch layout: micro-batches and optimizer steps per epoch, every sample's global position, the
               generators of one use, a folder's epoch order;
* ``folder``   folder datasets: listing, the compact index, their micro-batches;
* ``stream``   streamed datasets (``datasets`` streaming): opening, row counts, their micro-batches;
* ``items``    one use -> tensors (a cached latent or decoded pixels), collation;
* ``loader``   the endless, resumable pipeline (``TrainLoader``);
* ``scan``     ``scan_dataset``.

Latents (cache, sampling modes) are utils/latents.py. Sharding: ``datasets.distributed.split_dataset_by_node`` for
streams, the epoch plan for folders; never also ``accelerator.prepare`` the loader.
"""

from utils.data.config import LATENT_FACTOR, DataConfig, PromptConfig
from utils.data.items import alpha_to_weight
from utils.data.loader import TrainLoader, iter_batches
from utils.data.plan import (
    epoch_plan,
    item_rng,
    latent_seed,
    micro_batches_per_epoch,
    optimizer_steps_per_epoch,
    sample_positions,
    steps_per_epoch,
)
from utils.data.prompts import (
    TEMPLATES_DIR,
    build_prompt,
    caption_from_filename,
    load_template,
    process_tags,
    read_caption_file,
    resolve_template,
)
from utils.data.scan import scan_dataset
from utils.data.sources import DatasetSummary, Example, Skipped

__all__ = [
    "LATENT_FACTOR", "TEMPLATES_DIR", "DataConfig", "DatasetSummary", "Example", "PromptConfig", "Skipped",
    "TrainLoader", "alpha_to_weight", "build_prompt", "caption_from_filename", "epoch_plan", "item_rng",
    "iter_batches", "latent_seed", "load_template", "micro_batches_per_epoch", "optimizer_steps_per_epoch",
    "process_tags", "read_caption_file", "resolve_template", "sample_positions", "scan_dataset", "steps_per_epoch",
]
