"""What a textual-inversion run writes: the new embedding, periodic copies, PNG cards, previews, final files."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

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
from utils.training_setup import PreviewOptions, RunOutputs, write_settings

EXPECTED_WIDTH = {"sd1": 768, "sd2": 1024, "sdxl": 768 + 1280}


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

    def save_best(self, step: int) -> list[Path]:
        """``<name>-best``: the step --select_best chose, in the same formats as ``<name>`` (named like the file, as
        periodic copies are)."""
        stem = f"{self.trainable.name}-best"
        return self._write(self._current(step, stem), self.out_dir / stem)

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
        self.preview_encoder().db.register(self._current(step))
        out = self.render(step, f"a photo of {self.trainable.name}")
        if out:
            self.last_preview = (step, out[0][0])
        return out
