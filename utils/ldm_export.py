"""Write a diffusers SD-1.x / SD-2.x / SDXL pipeline as one ``.safetensors`` in the original (LDM / sgm) key layout.

That is the layout A1111 users have (``model.diffusion_model.*``, ``first_stage_model.*``,
``cond_stage_model.transformer.*`` for CLIP, ``cond_stage_model.model.*`` for SD-2's OpenCLIP,
``conditioner.embedders.{0,1}.*`` for SDXL's two text encoders). The tests use it to
prove that single-file checkpoints load offline and give the same images as the folder they came from.

The command line is tools/ldm_export.py (``python -m tools.ldm_export --model FOLDER --out FILE``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from utils.fileio import atomic_path

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_L_PREFIX = "conditioner.embedders.0."
SDXL_CLIP_G_PREFIX = "conditioner.embedders.1."

# Inside a ResNet block the two codebases name the same layers differently.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2"}
_VAE_TOP = {"conv_norm_out": "norm_out"}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPENCLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                   "self_attn.out_proj": "attn.out_proj"}


def _count(keys, pattern: str) -> dict[int, int]:
    """For keys like ``down_blocks.<b>.resnets.<l>.…``: block index -> number of layers (from the keys themselves)."""
    found: dict[int, set[int]] = {}
    for k in keys:
        m = re.match(pattern, k)
        if m:
            found.setdefault(int(m.group(1)), set()).add(int(m.group(2)))
    return {b: len(ls) for b, ls in found.items()}


def _rename_resnet(rest: str) -> str:
    layer, _, param = rest.rpartition(".")
    return f"{_UNET_RESNET.get(layer, layer)}.{param}"


def unet_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """UNet2DConditionModel state dict -> LDM ``openaimodel.UNetModel`` names (no ``model.diffusion_model.`` prefix).

    LDM numbers the encoder as one flat list ``input_blocks`` (conv_in, then per level its ResNet(+attention) layers
    and a downsampler) and the decoder as ``output_blocks`` (per level its layers; the upsampler rides on the last one).
    """
    down_res = _count(sd, r"down_blocks\.(\d+)\.resnets\.(\d+)\.")
    up_res = _count(sd, r"up_blocks\.(\d+)\.resnets\.(\d+)\.")
    has_down = {int(m.group(1)) for k in sd if (m := re.match(r"down_blocks\.(\d+)\.downsamplers\.", k))}
    up_has_attn = {int(m.group(1)) for k in sd if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    down_base, i = {}, 1
    for b in sorted(down_res):
        down_base[b] = i
        i += down_res[b] + (b in has_down)
    up_base, j = {}, 0
    for b in sorted(up_res):
        up_base[b] = j
        j += up_res[b]

    out = {}
    for key, value in sd.items():
        out[_unet_key(key, down_base, down_res, up_base, up_res, up_has_attn)] = value
    return out


def _unet_key(key, down_base, down_res, up_base, up_res, up_has_attn) -> str:
    module, _, param = key.rpartition(".")
    if module in _UNET_TOP:
        return f"{_UNET_TOP[module]}.{param}"
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        idx = down_base[b] + layer
        return f"input_blocks.{idx}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"input_blocks.{idx}.1.{rest}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        b = int(m.group(1))
        return f"input_blocks.{down_base[b] + down_res[b]}.0.op.{m.group(2)}"
    if m := re.match(r"mid_block\.(resnets|attentions)\.(\d+)\.(.*)", key):
        kind, layer, rest = m.group(1), int(m.group(2)), m.group(3)
        # LDM's middle block is [ResNet, attention, ResNet]
        return f"middle_block.{2 * layer}.{_rename_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        b, kind, layer, rest = int(m.group(1)), m.group(2), int(m.group(3)), m.group(4)
        idx = up_base[b] + layer
        return f"output_blocks.{idx}.0.{_rename_resnet(rest)}" if kind == "resnets" else f"output_blocks.{idx}.1.{rest}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        b = int(m.group(1))
        slot = 2 if b in up_has_attn else 1
        return f"output_blocks.{up_base[b] + up_res[b] - 1}.{slot}.conv.{m.group(2)}"
    raise ValueError(f"no LDM name known for UNet weight {key!r}")


def vae_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """AutoencoderKL state dict -> LDM ``AutoencoderKL`` names (without the ``first_stage_model.`` prefix)."""
    n_up = len(_count(sd, r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\."))
    out = {}
    for key, value in sd.items():
        new, is_attn = _vae_key(key, n_up)
        if is_attn and new.endswith(".weight") and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's VAE attention uses 1x1 convolutions
        out[new] = value
    return out


def _vae_key(key: str, n_up: int) -> tuple[str, bool]:
    side, _, rest = key.partition(".")
    if side not in ("encoder", "decoder"):
        return key, False  # quant_conv, post_quant_conv
    module, _, param = rest.rpartition(".")
    if module in ("conv_in", "conv_out", "conv_norm_out"):
        return f"{side}.{_VAE_TOP.get(module, module)}.{param}", False
    if m := re.match(r"down_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.down.{m.group(1)}.block.{m.group(2)}.{_vae_resnet(m.group(3))}", False
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        return f"{side}.down.{m.group(1)}.downsample.conv.{m.group(2)}", False
    # the decoder's levels are stored lowest resolution last in LDM, first in diffusers
    if m := re.match(r"up_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.up.{n_up - 1 - int(m.group(1))}.block.{m.group(2)}.{_vae_resnet(m.group(3))}", False
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        return f"{side}.up.{n_up - 1 - int(m.group(1))}.upsample.conv.{m.group(2)}", False
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.mid.block_{int(m.group(1)) + 1}.{_vae_resnet(m.group(2))}", False
    if m := re.match(r"mid_block\.attentions\.0\.(.*)\.(weight|bias)", rest):
        return f"{side}.mid.attn_1.{_VAE_ATTN[m.group(1)]}.{m.group(2)}", True
    raise ValueError(f"no LDM name known for VAE weight {key!r}")


def _vae_resnet(rest: str) -> str:
    return rest.replace("conv_shortcut", "nin_shortcut")


def clip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> SD-1's ``FrozenCLIPEmbedder`` (a wrapped transformers CLIP: names stay)."""
    return {CLIP_PREFIX + k.removeprefix("text_model."): v for k, v in sd.items()
            if not k.endswith("position_ids")}


def openclip_to_ldm(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel -> SD-2's ``FrozenOpenCLIPEmbedder`` (open_clip names, fused q/k/v projections)."""
    sd = {k.removeprefix("text_model."): v for k, v in sd.items() if not k.endswith("position_ids")}
    out = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        if key == "embeddings.token_embedding.weight":
            out["token_embedding.weight"] = value
        elif key == "embeddings.position_embedding.weight":
            out["positional_embedding"] = value
        elif key.startswith("final_layer_norm."):
            out["ln_final." + key.rpartition(".")[2]] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            qkv.setdefault((int(m.group(1)), m.group(3)), {})[m.group(2)] = value
        elif m := re.match(r"encoder\.layers\.(\d+)\.(.*)\.(weight|bias)", key):
            out[f"transformer.resblocks.{m.group(1)}.{_OPENCLIP_LAYER[m.group(2)]}.{m.group(3)}"] = value
        else:
            raise ValueError(f"no OpenCLIP name known for text encoder weight {key!r}")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts["q"], parts["k"], parts["v"]])
    return {OPENCLIP_PREFIX + k: v for k, v in out.items()}


def pipeline_to_ldm(pipe, text_encoder_format: str | None = None) -> dict[str, torch.Tensor]:
    """The whole pipeline as one LDM state dict (SD-1.x, SD-2.x, or SDXL in the ``sgm`` layout).

    ``text_encoder_format`` (SD-1/2): "clip" (SD-1) or "openclip" (SD-2); by default OpenCLIP when the text
    encoder uses GELU (OpenCLIP) rather than CLIP's quick-GELU.
    """
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(pipe.unet.state_dict()).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    if getattr(pipe, "text_encoder_2", None) is not None:
        out.update(_sdxl_text_to_ldm(pipe.text_encoder.state_dict(), pipe.text_encoder_2.state_dict()))
        return out
    if text_encoder_format is None:
        text_encoder_format = "clip" if pipe.text_encoder.config.hidden_act == "quick_gelu" else "openclip"
    to_text = {"clip": clip_to_ldm, "openclip": openclip_to_ldm}[text_encoder_format]
    out.update(to_text(pipe.text_encoder.state_dict()))
    return out


def _sdxl_text_to_ldm(clip_l: dict[str, torch.Tensor], clip_g: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """SDXL's ``conditioner.embedders.0`` (CLIP-L, transformers names) and ``.1`` (OpenCLIP-G with its projection)."""
    out = {k.replace("cond_stage_model.", SDXL_CLIP_L_PREFIX, 1): v for k, v in clip_to_ldm(clip_l).items()}
    projection = clip_g.get("text_projection.weight")
    clip_g = {k: v for k, v in clip_g.items() if k != "text_projection.weight"}
    out.update({k.replace("cond_stage_model.", SDXL_CLIP_G_PREFIX, 1): v for k, v in openclip_to_ldm(clip_g).items()})
    if projection is not None:
        # open_clip multiplies x @ text_projection; a torch Linear stores the transpose
        out[SDXL_CLIP_G_PREFIX + "model.text_projection"] = projection.T
    return out


def export_single_file(pipeline_folder: str | os.PathLike, out_path: str | os.PathLike,
                       text_encoder_format: str | None = None) -> Path:
    """Load a diffusers pipeline folder and write it as one LDM-layout ``.safetensors`` (atomically)."""
    from safetensors.torch import save_file

    from utils.models import ModelSource, load_pipeline

    pipe = load_pipeline(ModelSource(str(pipeline_folder))).pipeline
    state = {k: v.detach().contiguous().clone() for k, v in pipeline_to_ldm(pipe, text_encoder_format).items()}
    out = Path(out_path)
    with atomic_path(out) as tmp:
        save_file(state, str(tmp), metadata={"format": "pt"})
    return out


if __name__ == "__main__":
    raise SystemExit("python -m utils.ldm_export moved: use python -m tools.ldm_export")
