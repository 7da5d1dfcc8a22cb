"""Many textual-inversion embeddings trained in one run, through one frozen model (``--concepts`` / ``--sweep``).

K embeddings share the text encoder(s) and UNet; each micro-batch holds one micro-batch of every embedding's own
data (utils/data/balanced.py), each sample's prompt carries its own embedding's placeholder, and the loss is the sum
over embeddings of each embedding's mean loss. An embedding's vectors appear only in its own samples' prompts, so
the gradient each one gets is exactly the gradient of its own mean loss, what a separate run with the same seed and
data computes; AdamW works per parameter, and each embedding is its own parameter group with its own learning rate.
The frozen model runs once per step at K times the batch, which is where the time is saved.

Everything an embedding owns is written as a single run writes it, in ``<output_dir>/<name>/``: ``<name>.pt``,
``learned_embeds.safetensors``, ``embeddings/``, ``image_embeddings/``, ``images/``, ``textual_inversion_loss.csv``,
``training_settings.json`` and the model card. The run's own checkpoints sit in ``<output_dir>`` and resume all of
them together.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field, replace

import torch

from utils.embeddings import Embedding
from utils.textual_inversion import SDXL_ENCODER_KEYS, TextualInversionModel, tokenize_with_placeholder
from utils.token_splice import splice_into

SUMMARY_FILE = "embeddings_summary.csv"
TOTAL_LOSS_CSV = "all_embeddings_loss.csv"  # the loop's own log: the summed loss the optimizer sees


class ManyEmbeddingsModel(TextualInversionModel):
    """TextualInversionModel with K embeddings: one Parameter per embedding and text encoder, joined into the encoder's
    one spliced table at every forward (embedding k's slots follow those of embeddings 0..k-1)."""

    def __init__(self, text_encoders, unet, tables: list[list[torch.Tensor]], sdxl: bool):
        # tables[k][e]: embedding k's vectors for text encoder e; stored flat, embedding-major.
        super().__init__(text_encoders, unet, [t for per in tables for t in per], sdxl)

    def _splice(self) -> None:
        E = len(self.text_encoders)
        for e, te in enumerate(self.text_encoders):
            splice_into(te, torch.cat([self.vectors[i] for i in range(e, len(self.vectors), E)]))


@dataclass
class ManyEmbeddings:
    """The Trainable for K embeddings (see utils/training.py): one parameter group per embedding, and a loss that is
    the sum of the embeddings' own mean losses."""

    embeddings: list[Embedding]
    tokenizers: list
    model: ManyEmbeddingsModel
    lr_factors: list[float]  # embedding k's rate = the run's rate x lr_factors[k]
    csv_name: str = TOTAL_LOSS_CSV
    kind: str = "textual inversion"
    _ids_cache: dict = field(default_factory=dict)
    offsets: list[int] = field(default_factory=list)
    # per-embedding sums of the micro-batch mean losses since the last optimizer step, and how many micro-batches
    loss_sums: torch.Tensor | None = None
    loss_batches: int = 0

    @classmethod
    def build(cls, pipeline, embeddings: list[Embedding], lr_factors: list[float]) -> "ManyEmbeddings":
        sdxl = embeddings[0].is_sdxl
        if sdxl:
            encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
            tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
            tables = [[emb.vectors[k] for k in SDXL_ENCODER_KEYS] for emb in embeddings]
        else:
            encoders, tokenizers = [pipeline.text_encoder], [pipeline.tokenizer]
            tables = [[emb.vectors] for emb in embeddings]
        for module in (*encoders, pipeline.unet):
            module.requires_grad_(False)
            module.eval()
        offsets, at = [], 0
        for emb in embeddings:
            offsets.append(at)
            at += emb.num_vectors
        return cls(embeddings, tokenizers, ManyEmbeddingsModel(encoders, pipeline.unet, tables, sdxl),
                   list(lr_factors), offsets=offsets)

    # -- what the loop reads ----------------------------------------------------------------------------------------

    @property
    def num_embeddings(self) -> int:
        return len(self.embeddings)

    @property
    def name(self) -> str:
        # The checkpoint identity: the names and sizes of all embeddings, in order (a changed list is another run).
        blob = "\n".join(f"{e.name}:{e.num_vectors}" for e in self.embeddings)
        return f"{self.num_embeddings} embeddings {hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    @property
    def initial_step(self) -> int:
        return 0

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.model.vectors)

    def param_groups(self) -> list[dict]:
        """One AdamW parameter group per embedding (its vectors for every text encoder), with its rate factor."""
        E = len(self.tokenizers)
        vecs = list(self.model.vectors)
        return [{"params": vecs[k * E:(k + 1) * E], "lr_factor": self.lr_factors[k]}
                for k in range(self.num_embeddings)]

    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass

    def _token_ids(self, e: int, k: int, prompt: str) -> torch.Tensor:
        key = (e, k, prompt)
        ids = self._ids_cache.get(key)
        if ids is None:
            emb = self.embeddings[k]
            ids = tokenize_with_placeholder(self.tokenizers[e], [prompt], emb.name, emb.num_vectors)[0]
            # slot -(i + 1) of embedding k is row offsets[k] + i of the joined table
            ids = torch.where(ids < 0, ids - self.offsets[k], ids)
            if len(self._ids_cache) < 100_000:
                self._ids_cache[key] = ids
        return ids

    def model_inputs(self, batch: dict, device) -> dict:
        owners = batch["embedding_index"].tolist()
        ids = [torch.stack([self._token_ids(e, k, p) for k, p in zip(owners, batch["prompts"])]).to(device)
               for e in range(len(self.tokenizers))]
        inputs = {"input_ids": ids}
        if self.model.sdxl:
            inputs["add_time_ids"] = batch["add_time_ids"].to(device)
        return inputs

    def reduce_loss(self, per_sample: torch.Tensor, batch: dict) -> torch.Tensor:
        """Sum over the embeddings in the batch of each one's mean per-sample loss: embedding k's vectors get the
        gradient of its own mean, as in its own run (where the loss is the mean over its micro-batch)."""
        K = self.num_embeddings
        owner = batch["embedding_index"].to(per_sample.device)
        counts = torch.bincount(owner, minlength=K)
        sums = torch.zeros(K, dtype=per_sample.dtype, device=per_sample.device).index_add(0, owner, per_sample)
        present = counts > 0
        means = sums[present] / counts[present]
        with torch.no_grad():
            full = torch.zeros_like(sums)
            full[present] = means.detach()
            self.loss_sums = full if self.loss_sums is None else self.loss_sums + full
            self.loss_batches += 1
        return means.sum()

    def take_step_losses(self) -> torch.Tensor | None:
        """Each embedding's mean loss over the micro-batches since the last call (this process's share)."""
        if self.loss_sums is None:
            return None
        out = self.loss_sums / max(self.loss_batches, 1)
        self.loss_sums, self.loss_batches = None, 0
        return out

    def vector_norm(self) -> float:
        return float(sum(v.detach().float().norm() ** 2 for v in self.model.vectors) ** 0.5)

    def state_dict(self) -> dict:
        return {f"vectors.{i}": v.detach().cpu().clone() for i, v in enumerate(self.model.vectors)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for i, v in enumerate(self.model.vectors):
                v.copy_(state[f"vectors.{i}"].to(v.device, v.dtype))

    def detach_from_models(self) -> None:
        from utils.token_splice import unsplice

        for te in self.model.text_encoders:
            unsplice(te)

    # -- one embedding ----------------------------------------------------------------------------------------------

    def current(self, k: int, step: int) -> Embedding:
        """A detached CPU float32 copy of embedding k as trained so far."""
        E = len(self.tokenizers)
        vecs = [v.detach().float().cpu().clone() for v in list(self.model.vectors)[k * E:(k + 1) * E]]
        emb = replace(self.embeddings[k], vectors=dict(zip(SDXL_ENCODER_KEYS, vecs)) if self.model.sdxl else vecs[0],
                      step=step, filename=None, sha256=None)
        return emb

    def view(self, k: int) -> "EmbeddingView":
        return EmbeddingView(self, k)


@dataclass
class EmbeddingView:
    """Embedding k of a ManyEmbeddings, as the single-run output writer (utils/ti_outputs.py) sees a trainable."""

    many: ManyEmbeddings
    k: int

    @property
    def name(self) -> str:
        return self.many.embeddings[self.k].name

    def current(self, step: int) -> Embedding:
        return self.many.current(self.k, step)


class GroupOptimizer:
    """One parameter group of an optimizer, with a ``state_dict()`` shaped as a one-embedding run's optimizer's (what
    A1111's ``.pt.optim`` sidecar holds)."""

    def __init__(self, optimizer, group: int):
        self.optimizer, self.group = optimizer, group

    def state_dict(self) -> dict:
        full = self.optimizer.state_dict()
        group = dict(full["param_groups"][self.group])
        ids = group["params"]
        group.pop("lr_factor", None)
        group["params"] = list(range(len(ids)))
        return {"state": {i: full["state"][p] for i, p in enumerate(ids) if p in full["state"]},
                "param_groups": [group]}
