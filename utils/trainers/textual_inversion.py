"""What makes a training run textual inversion: new vectors spliced into the frozen text encoder(s), and the files
it writes (the embedding in A1111, diffusers and kohya layouts, periodic copies, PNG cards, previews).

The loop in utils/training.py sees only the small Trainable interface implemented here, and the Outputs callbacks
of TextualInversionOutputs.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import nn

from utils.embeddings import (
    Embedding,
    create_embedding,
    create_embedding_sdxl,
    diffusers_prompt_token,
    save_a1111_pt,
    save_diffusers,
    save_diffusers_sdxl,
    save_embedding,
    save_kohya,
    save_png_card,
)
from utils.errors import UserError
from utils.models import LoadedModel
from utils.outputs import RunOutputs, write_settings
from utils.previews import PreviewOptions
from utils.token_splice import find_subsequence, splice_into, unsplice

SDXL_ENCODER_KEYS = ("clip_l", "clip_g")


class TextualInversionModel(nn.Module):
    """Everything the gradient flows through, as one module (so DDP wraps it and all-reduces only the vectors).

    The text encoder(s), UNet and their weights are frozen; the only parameters with ``requires_grad`` are the
    new vectors, one table per text encoder, kept in float32 whatever the models' dtype.
    """

    def __init__(self, text_encoders: list[nn.Module], unet: nn.Module, vectors: list[torch.Tensor], sdxl: bool):
        super().__init__()
        self.text_encoders = nn.ModuleList(text_encoders)
        self.unet = unet
        self.vectors = nn.ParameterList([nn.Parameter(v.detach().clone().float()) for v in vectors])
        self.sdxl = sdxl
        # Read once: diffusers' .dtype walks every submodule (about 1 ms per call on a small UNet).
        self.unet_dtype = next(unet.parameters()).dtype
        self._splice()

    def _splice(self) -> None:
        # The encoders get a view of each vector Parameter, never the Parameter itself: registered inside an encoder
        # it would make transformers report that encoder's dtype as float32 under bf16/fp16, and the pipelines used
        # for previews then cast the conditioning to float32 and fail in the bf16/fp16 UNet. A fresh view per
        # forward keeps the gradient flowing to the Parameter this module owns (and DDP syncs).
        for te, vec in zip(self.text_encoders, self.vectors):
            splice_into(te, vec.view_as(vec))

    def encode(self, input_ids: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor | None]:
        self._splice()
        if not self.sdxl:
            return self.text_encoders[0](input_ids[0]).last_hidden_state, None
        # SDXL: penultimate hidden states of both encoders side by side; pooled output of the second.
        states, pooled = [], None
        for te, ids in zip(self.text_encoders, input_ids):
            out = te(ids, output_hidden_states=True)
            states.append(out.hidden_states[-2])
            pooled = getattr(out, "text_embeds", None)
        return torch.cat(states, dim=-1), pooled

    def forward(self, noisy_latents, timesteps, input_ids: list[torch.Tensor], add_time_ids=None):
        hidden, pooled = self.encode(input_ids)
        hidden = hidden.to(self.unet_dtype)
        added = None
        if self.sdxl:
            added = {"text_embeds": pooled.to(self.unet_dtype), "time_ids": add_time_ids.to(self.unet_dtype)}
        return self.unet(noisy_latents, timesteps, encoder_hidden_states=hidden, added_cond_kwargs=added).sample


def tokenize_with_placeholder(tokenizer, prompts: list[str], name: str, num_vectors: int) -> torch.Tensor:
    """Token ids [B, 77] where every occurrence of ``name`` becomes ``num_vectors`` spliced slots (ids -1 .. -n).

    The name is matched as a token sequence, as A1111 does, so the prompt word and the embedding name cannot drift
    apart (diffusers#3097). Prompts are cut at 75 tokens, never in the middle of the placeholder.
    """
    name_ids = tokenizer(name, add_special_tokens=False).input_ids
    slots = [-(k + 1) for k in range(num_vectors)]
    limit = tokenizer.model_max_length - 2
    pad = tokenizer.pad_token_id
    rows = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False, truncation=False).input_ids
        out: list[int] = []
        i = 0
        while i < len(ids):
            j = find_subsequence(ids, name_ids, i) if name_ids else -1
            if j < 0:
                out += ids[i:]
                break
            out += ids[i:j]
            if len(out) + num_vectors > limit:
                break
            out += slots
            i = j + len(name_ids)
        out = out[:limit]
        row = [tokenizer.bos_token_id] + out + [tokenizer.eos_token_id]
        rows.append(row + [pad] * (limit + 2 - len(row)))
    return torch.tensor(rows, dtype=torch.long)


@dataclass
class TextualInversion:
    """The Trainable for embeddings: the module, its parameters, how a batch becomes model inputs, the outputs."""

    embedding: Embedding  # name, starting vectors, step counter, checkpoint identity
    tokenizers: list
    model: TextualInversionModel
    method = "textual_inversion"
    _ids_cache: dict = field(default_factory=dict)

    @classmethod
    def build(cls, pipeline, embedding: Embedding) -> "TextualInversion":
        sdxl = embedding.is_sdxl
        if sdxl:
            encoders = [pipeline.text_encoder, pipeline.text_encoder_2]
            tokenizers = [pipeline.tokenizer, pipeline.tokenizer_2]
            vectors = [embedding.vectors[k] for k in SDXL_ENCODER_KEYS]
        else:
            encoders, tokenizers, vectors = [pipeline.text_encoder], [pipeline.tokenizer], [embedding.vectors]
        for module in (*encoders, pipeline.unet):
            module.requires_grad_(False)
            module.eval()
        return cls(embedding, tokenizers, TextualInversionModel(encoders, pipeline.unet, vectors, sdxl))

    @property
    def name(self) -> str:
        return self.embedding.name

    @property
    def initial_step(self) -> int:
        return int(self.embedding.step or 0)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.model.vectors)

    def train(self, mode: bool = True) -> None:
        pass  # frozen models stay in eval mode (no dropout in what we do not train)

    def _token_ids(self, k: int, prompt: str) -> torch.Tensor:
        # Templates give a bounded set of prompts; tokenizing each once saves ~0.4 ms per step.
        key = (k, prompt)
        ids = self._ids_cache.get(key)
        if ids is None:
            ids = tokenize_with_placeholder(self.tokenizers[k], [prompt], self.name, self.embedding.num_vectors)[0]
            if len(self._ids_cache) < 100_000:
                self._ids_cache[key] = ids
        return ids

    def model_inputs(self, batch: dict, device) -> dict:
        ids = [torch.stack([self._token_ids(k, p) for p in batch["prompts"]]).to(device)
               for k in range(len(self.tokenizers))]
        inputs = {"input_ids": ids}
        if self.model.sdxl:
            inputs["add_time_ids"] = batch["add_time_ids"].to(device)
        return inputs

    def current(self, step: int) -> Embedding:
        """A detached CPU float32 copy of the embedding as trained so far."""
        emb = copy.copy(self.embedding)
        vecs = [v.detach().float().cpu().clone() for v in self.model.vectors]
        emb.vectors = dict(zip(SDXL_ENCODER_KEYS, vecs)) if self.model.sdxl else vecs[0]
        emb.step = step
        emb.filename = None
        emb.sha256 = None
        return emb

    def state_dict(self) -> dict:
        return {f"vectors.{i}": v.detach().cpu().clone() for i, v in enumerate(self.model.vectors)}

    def load_state_dict(self, state: dict) -> None:
        with torch.no_grad():
            for i, v in enumerate(self.model.vectors):
                v.copy_(state[f"vectors.{i}"].to(v.device, v.dtype))

    def detach_from_models(self) -> None:
        """Give the text encoders their plain token embeddings back (after training)."""
        for te in self.model.text_encoders:
            unsplice(te)


# ---------------------------------------------------------------------------------------------------------------
# The files a run writes


def new_embedding(loaded: LoadedModel, name: str, init_text: str, num_vectors: int) -> Embedding:
    pipe = loaded.pipeline
    if loaded.family == "sdxl":
        return create_embedding_sdxl(name, init_text, num_vectors, [
            (pipe.tokenizer, pipe.text_encoder.get_input_embeddings()),
            (pipe.tokenizer_2, pipe.text_encoder_2.get_input_embeddings())])
    return create_embedding(name, init_text, num_vectors, pipe.tokenizer, pipe.text_encoder.get_input_embeddings())


def model_text_width(loaded: LoadedModel) -> int:
    pipe = loaded.pipeline
    width = pipe.text_encoder.get_input_embeddings().embedding_dim
    if loaded.family == "sdxl":
        width += pipe.text_encoder_2.get_input_embeddings().embedding_dim
    return width


def check_width(embedding: Embedding, loaded: LoadedModel) -> None:
    """An embedding made for another model family cannot be continued on this one."""
    if embedding.is_sdxl != (loaded.family == "sdxl") or embedding.width != model_text_width(loaded):
        raise UserError(f"embedding '{embedding.name}' is {embedding.width} wide ({'SDXL' if embedding.is_sdxl else 'SD'}"
                        f"), but the model's text encoder(s) are {model_text_width(loaded)} wide ({loaded.family})")


def is_vocabulary_word(tokenizer, name: str) -> bool:
    """True when ``name`` is one token the tokenizer already has (``tiger``): prompts already use it as a word."""
    return len(tokenizer(name, add_special_tokens=False)["input_ids"]) == 1


def prompt_word_lines(name: str, tokenizers) -> list[str]:
    """What to write in each tool's prompts, and a note when the name is already a word of the model's vocabulary."""
    token = diffusers_prompt_token(name)
    lines = [f"Prompt word: '{name}' in A1111, kohya and inference.py, 'embedding:{name}' in ComfyUI, '{token}' in "
             f"diffusers (pipe.load_textual_inversion(\"learned_embeds.safetensors\"))."]
    if any(is_vocabulary_word(t, name) for t in tokenizers):
        lines.append(f"Note: '{name}' is already a word of the model's vocabulary. A1111 and ComfyUI match embeddings "
                     f"by name, so there every '{name}' in a prompt becomes the embedding; diffusers needs a new "
                     f"token, so its files carry '{token}' (README: Compatibility).")
    return lines


def save_optimizer_sidecar(pt_path: Path, emb: Embedding, optimizer) -> Path:
    """A1111's ``<file>.pt.optim``: the optimizer state, tagged with the embedding's value checksum (§1.7)."""
    from utils.embeddings import checksum
    from utils.pt_file import save_pt

    # save_pt, not torch.save: A1111 checks the sidecar like any .pt before loading it (see utils/pt_file.py).
    return save_pt({"hash": checksum(emb), "optimizer_state_dict": optimizer.state_dict()}, f"{pt_path}.optim")


class TextualInversionOutputs(RunOutputs):
    """File layout (A1111 names): ``embeddings/<name>-<step>.pt|.safetensors``, ``image_embeddings/<name>-<step>.png``,
    ``images/<name>-<step>-<k>.png``, and at the end ``<name>.pt``, ``learned_embeds.safetensors``,
    ``training_settings.json``. Every file is written to a temp name and renamed."""

    def __init__(self, accelerator, trainable, loaded: LoadedModel, out_dir: Path, preview: PreviewOptions, *,
                 save_image_embeddings: bool, also_bin: bool, settings: dict, save_optimizer_state: bool = False):
        super().__init__(accelerator, trainable, loaded, out_dir, preview, settings=settings,
                         save_optimizer_state=save_optimizer_state)
        self.save_image_embeddings = save_image_embeddings
        self.also_bin = also_bin
        self.last_preview = None  # (step, picture) of the newest preview: a PNG card of that step shows it
        pipe = loaded.pipeline
        tokenizers = [t for t in (pipe.tokenizer, getattr(pipe, "tokenizer_2", None)) if t is not None]
        for line in prompt_word_lines(trainable.name, tokenizers):
            accelerator.print(line)

    def _current(self, step: int, name: str | None = None) -> Embedding:
        emb = self.trainable.current(step)
        return replace(emb, name=name or emb.name, sd_checkpoint=self.loaded.identity.shorthash,
                       sd_checkpoint_name=self.loaded.identity.name)

    def _write(self, emb: Embedding, stem: Path) -> list[Path]:
        if emb.is_sdxl:  # the one-file clip_l/clip_g layout A1111, ComfyUI and kohya read
            return [save_kohya(emb, stem.with_suffix(".safetensors"))]
        return [save_a1111_pt(emb, stem.with_suffix(".pt")),
                save_diffusers(emb, stem.with_suffix(".safetensors"), token=diffusers_prompt_token(emb.name))]

    def save(self, step: int) -> list[Path]:
        # Periodic copies store "<name>-<step>" as their name, as A1111's do (it is what a PNG card loads as).
        emb = self._current(step, f"{self.trainable.name}-{step}")
        files = self._write(emb, self.out_dir / "embeddings" / f"{self.trainable.name}-{step}")
        if self.save_image_embeddings and not emb.is_sdxl:
            # This step's preview, else a picture drawn from the vectors (an older preview would misrepresent it).
            image = self.last_preview[1] if self.last_preview and self.last_preview[0] == step else None
            files.append(save_png_card(emb, self.out_dir / "image_embeddings" / f"{self.trainable.name}-{step}.png",
                                       image))
        return files

    def final(self, step: int, optimizer=None) -> list[Path]:
        emb = self._current(step)
        files = self._write(emb, self.out_dir / self.trainable.name)
        if self.save_optimizer_state and optimizer is not None and not emb.is_sdxl:
            files.append(save_optimizer_sidecar(files[0], emb, optimizer))
        token = diffusers_prompt_token(emb.name)  # the same token as <name>.safetensors
        if emb.is_sdxl:  # diffusers' two files, learned_embeds(_2).safetensors: both belong in the run's file list
            files += save_diffusers_sdxl(emb, self.out_dir / "learned_embeds.safetensors", token=token)
        else:
            files.append(save_embedding(emb, self.out_dir / "learned_embeds.safetensors", "diffusers", token=token))
        if self.also_bin and not emb.is_sdxl:
            files.append(save_embedding(emb, self.out_dir / "learned_embeds.bin", "diffusers", token=token))
        files.append(write_settings(self.out_dir, self.settings, step))
        return files

    def preview(self, step: int) -> list:
        """Render preview images with the vectors as trained so far (main process; own generators only)."""
        self.previewer.encoder.db.register(self._current(step))
        out = self.previewer.render(step, f"a photo of {self.trainable.name}")
        if out:
            self.last_preview = (step, out[0][0])
        return out
