"""A1111-compatible hypernetworks (docs/a1111-rules.md, "Hypernetworks"): the module, the container, every file layout,
the attention hook for diffusers models, and the prompt tags.

A hypernetwork is, per context width, a pair of residual MLPs (one for the attention keys, one for the values). Every
attention layer whose context (the text for cross-attention, the image features for self-attention) has a width with a
module feeds ``to_k`` / ``to_v`` the transformed context instead of the raw one.
"""

from __future__ import annotations

import glob
import hashlib
import inspect
import json
import os
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import torch
from torch import nn

from utils.errors import UserError, first_line
from utils.fileio import atomic_path
from utils.hashes import sha256_file
from utils.hypernetwork_options import (  # noqa: F401 - the options also import from here
    ACTIVATION_NAMES,
    WEIGHT_INITS,
    HypernetworkOptions,
    check_dropout_structure,
    check_layer_structure,
    check_activation,
    check_weight_init,
    parse_dropout_structure,
    parse_layer_structure,
)
from utils.pt_file import save_pt

DEFAULT_SIZES = (768, 320, 640, 1280)  # SD-1.x: text width + the three UNet channel widths
SAFETENSORS_METADATA_KEY = "a1111_hypernetwork"


def _activation_table() -> dict[str, type[nn.Module]]:
    # A1111's names: a few aliases, then every activation class torch defines, lower-cased. Only the names
    # utils/hypernetwork_options.py lists are used (the flags are checked there, before torch loads).
    table: dict[str, type[nn.Module]] = {
        "linear": nn.Identity,
        "relu": nn.ReLU,
        "leakyrelu": nn.LeakyReLU,
        "elu": nn.ELU,
        "swish": nn.Hardswish,  # A1111's "swish" really is Hardswish; files depend on it
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
    }
    module = torch.nn.modules.activation
    for cls_name, cls in inspect.getmembers(module, inspect.isclass):
        if cls.__module__ == module.__name__:
            table[cls_name.lower()] = cls
    return table


ACTIVATIONS = {name: cls for name, cls in _activation_table().items() if name in ACTIVATION_NAMES}


# --------------------------------------------------------------------------------------------------------------------
# The module


class HypernetworkModule(nn.Module):
    """One residual MLP, ``x + linear(x) * multiplier``; the ``linear`` Sequential has A1111's exact indices."""

    def __init__(
        self,
        dim: int,
        layer_structure: Sequence[float] = (1, 2, 1),
        activation_func: str | None = None,
        weight_init: str = "Normal",
        add_layer_norm: bool = False,
        activate_output: bool = False,
        dropout_structure: Sequence[float] | None = None,
    ):
        super().__init__()
        check_layer_structure(layer_structure)
        if dropout_structure is not None:
            check_dropout_structure(dropout_structure, layer_structure)
        check_weight_init(weight_init)
        self.dim = int(dim)
        self.multiplier = 1.0
        widths = [int(dim * a) for a in layer_structure]
        last = len(layer_structure) - 2
        layers: list[nn.Module] = []
        for i in range(len(layer_structure) - 1):
            layers.append(nn.Linear(widths[i], widths[i + 1]))
            if activation_func not in (None, "linear") and (i < last or activate_output):
                layers.append(_make_activation(activation_func))
            if add_layer_norm:
                layers.append(nn.LayerNorm(widths[i + 1]))
            if dropout_structure is not None and dropout_structure[i + 1] > 0:
                layers.append(nn.Dropout(p=dropout_structure[i + 1]))
        self.linear = nn.Sequential(*layers)
        self._initialise(weight_init, activation_func)

    def _initialise(self, weight_init: str, activation_func: str | None) -> None:
        nonlinearity = "leaky_relu" if activation_func == "leakyrelu" else "relu"
        with torch.no_grad():
            for layer in self.linear:
                if not isinstance(layer, (nn.Linear, nn.LayerNorm)):
                    continue
                # A1111 gives LayerNorm the Normal init whatever the option: its weights start near 0, not 1.
                if weight_init == "Normal" or isinstance(layer, nn.LayerNorm):
                    nn.init.normal_(layer.weight, mean=0.0, std=0.01)
                    nn.init.zeros_(layer.bias)
                    continue
                if weight_init == "XavierUniform":
                    nn.init.xavier_uniform_(layer.weight)
                elif weight_init == "XavierNormal":
                    nn.init.xavier_normal_(layer.weight)
                elif weight_init == "KaimingUniform":
                    nn.init.kaiming_uniform_(layer.weight, nonlinearity=nonlinearity)
                else:
                    nn.init.kaiming_normal_(layer.weight, nonlinearity=nonlinearity)
                nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        # Training always uses the full residual (A1111); the multiplier is an inference-time strength.
        if self.training:
            m = 1.0
        else:
            m = self.multiplier if multiplier is None else multiplier
        return x + self.linear(x) * m

    def load_a1111_state_dict(self, state_dict: dict) -> None:
        """Load weights from any era's file: the 2022 NovelAI names ``linear1``/``linear2`` are renamed first."""
        self.load_state_dict(_rename_legacy_keys(state_dict))


def _make_activation(name: str) -> nn.Module:
    check_activation(name)
    cls = ACTIVATIONS.get(name)
    if cls is None:  # a name this torch version no longer defines
        raise UserError(f"hypernetwork activation function {name!r} is not in this version of torch")
    try:
        return cls()
    except TypeError as e:
        raise UserError(f"hypernetwork activation function {name!r} cannot be used: {e}") from None


_LEGACY_KEYS = {"linear1.": "linear.0.", "linear2.": "linear.1."}


def _rename_legacy_keys(state_dict: dict) -> "OrderedDict[str, torch.Tensor]":
    out: OrderedDict[str, torch.Tensor] = OrderedDict()
    for key, value in state_dict.items():
        for old, new in _LEGACY_KEYS.items():
            if key.startswith(old):
                key = new + key[len(old) :]
                break
        out[key] = value
    return out


# --------------------------------------------------------------------------------------------------------------------
# The container


class Hypernetwork:
    """``layers: {dim: (module_k, module_v)}`` plus the metadata A1111 keeps with them."""

    def __init__(
        self,
        name: str,
        options: HypernetworkOptions | None = None,
        layers: dict[int, tuple[HypernetworkModule, HypernetworkModule]] | None = None,
        step: int = 0,
        sd_checkpoint: str | None = None,
        sd_checkpoint_name: str | None = None,
        filename: str | os.PathLike | None = None,
    ):
        self.name = name
        self.options = (options or HypernetworkOptions()).resolved()
        self.layers = dict(layers or {})
        self.step = step
        self.sd_checkpoint = sd_checkpoint
        self.sd_checkpoint_name = sd_checkpoint_name
        self.filename = Path(filename) if filename is not None else None

    @classmethod
    def create(cls, name: str, sizes: Iterable[int], options: HypernetworkOptions | None = None) -> "Hypernetwork":
        """A new, freshly initialised hypernetwork (uses torch's global RNG, so seed it first for reproducibility)."""
        hn = cls(name, options)
        for dim in sizes:
            hn.layers[int(dim)] = (hn.new_module(dim), hn.new_module(dim))
        hn.eval()
        return hn

    def new_module(self, dim: int, for_loading: bool = False) -> HypernetworkModule:
        o = self.options
        init = o.weight_initialization
        if for_loading and init not in WEIGHT_INITS:
            init = "Normal"  # the file's weights replace the init anyway; A1111 never checks the name when loading
        return HypernetworkModule(
            dim,
            o.layer_structure,
            o.activation_func,
            init,
            o.is_layer_norm,
            o.activate_output,
            o.dropout_structure,
        )

    def modules(self) -> list[HypernetworkModule]:
        return [m for pair in self.layers.values() for m in pair]

    def parameters(self) -> list[nn.Parameter]:
        return [p for m in self.modules() for p in m.parameters()]

    def train(self, mode: bool = True) -> "Hypernetwork":
        # As A1111: the mode switch also decides which weights receive gradients.
        for m in self.modules():
            m.train(mode)
            m.requires_grad_(mode)
        return self

    def eval(self) -> "Hypernetwork":
        return self.train(False)

    def set_multiplier(self, multiplier: float) -> "Hypernetwork":
        for m in self.modules():
            m.multiplier = float(multiplier)
        return self

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "Hypernetwork":
        for m in self.modules():
            m.to(device=device, dtype=dtype)
        return self

    @property
    def shorthash(self) -> str | None:
        """A1111's hypernetwork hash: the first 10 hex digits of the file's SHA-256."""
        if self.filename is None or not self.filename.is_file():
            return None
        return sha256_file(self.filename)[:10]


# --------------------------------------------------------------------------------------------------------------------
# Files


def _load_pickle(path: Path, what: str):
    try:
        # weights_only: never run code from a file; A1111 files hold only plain data and tensors.
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as e:
        raise UserError(f"{path}: {_load_failure(e, what)}") from None


def _load_failure(error: Exception, what: str) -> str:
    # torch's messages are multi-line how-tos; reduce them to what the user needs to know, on one line.
    message = str(error)
    culprit = re.search(r"GLOBAL (\S+)", message)
    if culprit:
        return f"refusing to load this {what}: it needs Python objects beyond tensors and plain data " \
               f"(it asks for {culprit.group(1)})"
    garbled = re.search(r"Unsupported operand \d+|invalid load key[^\n]*", message)
    if isinstance(error, pickle.UnpicklingError) and not garbled:
        return f"refusing to load this {what}: it needs Python objects beyond tensors and plain data"
    detail = garbled.group(0) if garbled else (message.strip().splitlines() or [type(error).__name__])[0]
    return f"not a readable {what} ({detail.split('. ')[0].rstrip('.')})"


def _layer_keys(data: dict) -> list[int]:
    return [k for k in data if isinstance(k, int) and not isinstance(k, bool)]


def options_from_a1111_dict(data: dict) -> HypernetworkOptions:
    """The options of a loaded file with A1111's load defaults for every key an older file lacks
    (docs/a1111-rules.md, "Hypernetworks")."""
    dropout_structure = data.get("dropout_structure")
    if dropout_structure is not None:
        dropout_structure = list(dropout_structure)
    if dropout_structure is not None and any(dropout_structure):
        use_dropout = True
    else:
        use_dropout = bool(data.get("use_dropout", False))
    activation = data.get("activation_func")
    return HypernetworkOptions(
        layer_structure=list(data.get("layer_structure") or [1, 2, 1]),
        activation_func=activation,
        is_layer_norm=bool(data.get("is_layer_norm", False)),
        weight_initialization=data.get("weight_initialization") or "Normal",
        activate_output=bool(data.get("activate_output", True)),  # files before the option applied it to the output
        use_dropout=use_dropout,
        dropout_structure=dropout_structure,
        last_layer_dropout=bool(data.get("last_layer_dropout", False)),
        optional_info=data.get("optional_info"),
    ).resolved()


def hypernetwork_from_a1111_dict(data: dict, path: str | os.PathLike) -> Hypernetwork:
    """Build a Hypernetwork from the dict an A1111 ``.pt`` holds (any era). ``path`` names the file in errors."""
    path = Path(path)
    if not isinstance(data, dict):
        raise UserError(f"{path}: not a hypernetwork file (holds a {type(data).__name__}, not a dict)")
    sizes = _layer_keys(data)
    if not sizes:
        raise UserError(f"{path}: not a hypernetwork file (no layers keyed by width)")
    try:
        options = options_from_a1111_dict(data)
        hn = Hypernetwork(
            name=data.get("name") or path.stem,
            options=options,
            step=int(data.get("step") or 0),
            sd_checkpoint=data.get("sd_checkpoint"),
            sd_checkpoint_name=data.get("sd_checkpoint_name"),
            filename=path,
        )
        for dim in sizes:
            pair = data[dim]
            if not isinstance(pair, (tuple, list)) or len(pair) != 2:
                raise UserError(f"layers for width {dim} are not a (key, value) pair")
            modules = []
            for sd in pair:
                module = hn.new_module(dim, for_loading=True)
                try:
                    module.load_a1111_state_dict(sd)
                except (RuntimeError, AttributeError, TypeError) as e:
                    reason = first_line(e)
                    raise UserError(f"weights for width {dim} do not match the stored options ({reason})") from None
                if not all(bool(torch.isfinite(t).all()) for t in module.state_dict().values()):
                    # e.g. saved from a diverged run: every image it touched would turn NaN
                    raise UserError(f"weights for width {dim} hold NaN or infinite values; refusing a broken "
                                    f"hypernetwork")
                modules.append(module)
            hn.layers[dim] = (modules[0], modules[1])
    except UserError as e:
        if str(e).startswith(str(path)):
            raise
        raise UserError(f"{path}: {e}") from None
    hn.eval()
    return hn


def hypernetwork_to_a1111_dict(hn: Hypernetwork) -> dict:
    """The current A1111 layout: width keys with (state_dict_k, state_dict_v), then the metadata keys."""
    o = hn.options
    data: dict = {}
    for dim, (module_k, module_v) in hn.layers.items():
        data[int(dim)] = (_cpu_state_dict(module_k), _cpu_state_dict(module_v))
    data["step"] = int(hn.step)
    data["name"] = hn.name
    data["layer_structure"] = list(o.layer_structure)
    data["activation_func"] = o.activation_func
    data["is_layer_norm"] = bool(o.is_layer_norm)
    data["weight_initialization"] = o.weight_initialization
    data["sd_checkpoint"] = hn.sd_checkpoint
    data["sd_checkpoint_name"] = hn.sd_checkpoint_name
    data["activate_output"] = bool(o.activate_output)
    data["use_dropout"] = bool(o.use_dropout)
    data["dropout_structure"] = list(o.dropout_structure) if o.dropout_structure is not None else None
    if o.dropout_structure is not None:
        data["last_layer_dropout"] = o.dropout_structure[-2] != 0
    else:
        data["last_layer_dropout"] = bool(o.last_layer_dropout)
    data["optional_info"] = o.optional_info or None
    return data


def _cpu_state_dict(module: nn.Module) -> "OrderedDict[str, torch.Tensor]":
    # Plain CPU tensors, so the file loads anywhere (A1111 wrote device tensors).
    return OrderedDict((k, v.detach().to("cpu").clone()) for k, v in module.state_dict().items())


def load_hypernetwork(path: str | os.PathLike) -> Hypernetwork:
    """Read an A1111 ``.pt`` of any era, or our ``.safetensors`` copy. Never executes code from the file."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"hypernetwork file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        data = _read_safetensors(path)
    else:
        data = _load_pickle(path, "hypernetwork file")
    return hypernetwork_from_a1111_dict(data, path)


def save_hypernetwork(hn: Hypernetwork, path: str | os.PathLike, optimizer=None) -> Path:
    """Write the A1111 ``.pt`` atomically; with ``optimizer`` also the ``.pt.optim`` sidecar (A1111's resume state)."""
    path = save_pt(hypernetwork_to_a1111_dict(hn), path)  # a layout A1111's load-time check accepts
    if optimizer is not None:
        save_optimizer_sidecar(path, optimizer)
    return path


def save_hypernetwork_safetensors(hn: Hypernetwork, path: str | os.PathLike) -> Path:
    """Weights as ``<dim>.k.linear.0.weight`` / ``<dim>.v.…``; the metadata keys as JSON in the header."""
    from safetensors.torch import save_file

    data = hypernetwork_to_a1111_dict(hn)
    tensors: dict[str, torch.Tensor] = {}
    meta: dict = {}
    for key, value in data.items():
        if isinstance(key, int):
            for tag, sd in zip("kv", value):
                for name, t in sd.items():
                    tensors[f"{key}.{tag}.{name}"] = t.contiguous()
        else:
            meta[key] = value
    path = Path(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={SAFETENSORS_METADATA_KEY: json.dumps(meta)})
    return path


def _read_safetensors(path: Path) -> dict:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        data: dict = json.loads(header[SAFETENSORS_METADATA_KEY])
        if not isinstance(data, dict):
            raise ValueError
    except (KeyError, ValueError):
        raise UserError(
            f"{path}: not a hypernetwork safetensors file (no {SAFETENSORS_METADATA_KEY} metadata)"
        ) from None
    pairs: dict[int, tuple[OrderedDict, OrderedDict]] = {}
    for key, t in tensors.items():
        dim, tag, name = key.split(".", 2) if key.count(".") >= 2 else ("", "", key)
        if not dim.isdigit() or tag not in ("k", "v"):
            raise UserError(f"{path}: unexpected tensor name {key!r} in a hypernetwork file")
        pair = pairs.setdefault(int(dim), (OrderedDict(), OrderedDict()))
        pair[0 if tag == "k" else 1][name] = t
    data.update(pairs)
    return data


@dataclass
class OptimizerSidecar:
    optimizer_name: str
    optimizer_state_dict: dict


def sidecar_path(pt_path: str | os.PathLike) -> Path:
    return Path(f"{os.fspath(pt_path)}.optim")


def _fresh_shorthash(path: str | os.PathLike) -> str:
    # Hashed from the bytes every time: a file rewritten within the clock's granularity keeps size and mtime, so a
    # (path, size, mtime)-keyed cache could bind the sidecar to the previous save.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:10]


def save_optimizer_sidecar(pt_path: str | os.PathLike, optimizer) -> Path:
    """``<file>.pt.optim`` bound to the just-written ``.pt`` by its shorthash (A1111 ignores it after any change)."""
    inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the torch optimizer
    payload = {
        "optimizer_name": type(inner).__name__,
        "hash": _fresh_shorthash(pt_path),
        "optimizer_state_dict": inner.state_dict(),
    }
    return save_pt(payload, sidecar_path(pt_path))


def load_optimizer_sidecar(pt_path: str | os.PathLike) -> OptimizerSidecar | None:
    """The saved optimizer state, or None when there is no sidecar or it belongs to another version of the file."""
    side = sidecar_path(pt_path)
    if not side.is_file():
        return None
    data = _load_pickle(side, "optimizer state file")
    if not isinstance(data, dict) or data.get("hash") != _fresh_shorthash(pt_path):
        return None
    state = data.get("optimizer_state_dict")
    if not state:
        return None
    return OptimizerSidecar(data.get("optimizer_name") or "AdamW", state)


# --------------------------------------------------------------------------------------------------------------------
# In the model


def _run_module(module: HypernetworkModule, context: torch.Tensor, multiplier: float) -> torch.Tensor:
    dtype = module.linear[0].weight.dtype
    if context.dtype == dtype:
        return module(context, multiplier)
    # e.g. an fp16 UNet with float32 hypernetwork weights: compute in the weights' precision, hand back the UNet's.
    return module(context.to(dtype), multiplier).to(context.dtype)


def apply_hypernetworks(
    hypernetworks: Sequence[tuple[Hypernetwork, float]], context: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context for to_k, context for to_v): each hypernetwork in order, picked by the context width."""
    return _apply_chain(hypernetworks, context, 0), _apply_chain(hypernetworks, context, 1)


def _apply_chain(
    hypernetworks: Sequence[tuple[Hypernetwork, float]], context: torch.Tensor, which: int
) -> torch.Tensor:
    for hn, multiplier in hypernetworks:
        pair = hn.layers.get(context.shape[-1])
        if pair is not None:
            context = _run_module(pair[which], context, multiplier)
    return context


class _AttentionWithHypernetworks:
    """What the wrapped processor sees as ``attn``: the real layer, but ``to_k`` / ``to_v`` transform their input.

    The processor passes ``to_k`` / ``to_v`` exactly the context A1111 hooks (the text for cross-attention, the
    normalised hidden states for self-attention), so wrapping them keeps diffusers' own attention code unchanged.
    """

    def __init__(self, attn: nn.Module, hypernetworks: Sequence[tuple[Hypernetwork, float]]):
        self._attn = attn
        self._hypernetworks = hypernetworks

    def __getattr__(self, name: str):
        return getattr(self._attn, name)

    def to_k(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_k(_apply_chain(self._hypernetworks, context, 0))

    def to_v(self, context: torch.Tensor) -> torch.Tensor:
        return self._attn.to_v(_apply_chain(self._hypernetworks, context, 1))


class HypernetworkAttnProcessor:
    """Runs the layer's original processor (normally diffusers' AttnProcessor2_0) with hypernetwork-transformed k/v."""

    def __init__(self, original, hypernetworks: Sequence[tuple[Hypernetwork, float]]):
        self.original = original
        self.hypernetworks = list(hypernetworks)

    def __call__(
        self,
        attn: nn.Module,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
        **kwargs,
    ) -> torch.Tensor:
        view = _AttentionWithHypernetworks(attn, self.hypernetworks)
        return self.original(
            view, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, temb=temb,
            **kwargs,
        )


def _attention_layers(model: nn.Module) -> list[nn.Module]:
    from diffusers.models.attention_processor import Attention

    return [m for m in model.modules() if isinstance(m, Attention)]


def attention_context_widths(model: nn.Module) -> set[int]:
    """Context widths the model's attention layers see (text width and self-attention channel widths)."""
    return {int(m.to_k.in_features) for m in _attention_layers(model) if getattr(m, "to_k", None) is not None}


def install_hypernetworks(model: nn.Module, hypernetworks: Sequence[tuple[Hypernetwork, float]]) -> int:
    """Hook ``[(hypernetwork, multiplier), …]`` (applied in that order) into every attention layer; returns the count.

    Installing again replaces the previous set; :func:`remove_hypernetworks` restores the original processors.
    """
    pairs = [(hn, float(m)) for hn, m in hypernetworks]
    weight = next(model.parameters(), None)
    if weight is not None:
        for hn, _ in pairs:
            hn.to(device=weight.device)  # dtype stays: the processor casts the context to the modules' precision
    layers = _attention_layers(model)
    for attn in layers:
        if getattr(attn, "fused_projections", False):
            raise UserError(
                "hypernetworks need separate to_k/to_v projections; unfuse the model's QKV projections first"
            )
        original = attn.processor
        if isinstance(original, HypernetworkAttnProcessor):
            original = original.original
        attn.set_processor(HypernetworkAttnProcessor(original, pairs))
    return len(layers)


def remove_hypernetworks(model: nn.Module) -> None:
    """Put back the exact processor objects that were there before :func:`install_hypernetworks`."""
    for attn in _attention_layers(model):
        if isinstance(attn.processor, HypernetworkAttnProcessor):
            attn.set_processor(attn.processor.original)


class HypernetworkTrainingModule(nn.Module):
    """One module owning the UNet and the hypernetwork modules, for ``accelerator.prepare``.

    DDP averages gradients only of parameters registered in the module it wraps; hypernetwork modules called from
    inside attention processors are otherwise invisible to it and ranks drift apart. Only modules for widths the UNet
    actually has are registered: DDP fails on trainable parameters that never receive a gradient.
    """

    def __init__(self, unet: nn.Module, hypernetworks: Sequence[Hypernetwork]):
        super().__init__()
        self.unet = unet
        widths = attention_context_widths(unet)
        self.hypernetwork_modules = nn.ModuleList(
            m for hn in hypernetworks for dim, pair in hn.layers.items() if dim in widths for m in pair
        )

    def forward(self, *args, **kwargs):
        return self.unet(*args, **kwargs)


# --------------------------------------------------------------------------------------------------------------------
# Prompts and folders

_EXTRA_NETWORK_TAG = re.compile(r"<(\w+):([^>]+)>")


def parse_hypernet_tags(prompt: str) -> tuple[str, list[tuple[str, float]]]:
    """Remove ``<hypernet:NAME>`` / ``<hypernet:NAME:MULT>`` tags; other ``<kind:…>`` tags stay in the text."""
    found: list[tuple[str, float]] = []

    def take(match: re.Match) -> str:
        if match.group(1) != "hypernet":
            return match.group(0)
        items = match.group(2).split(":")
        multiplier = 1.0
        if len(items) > 1:
            try:
                multiplier = float(items[1])
            except ValueError:
                raise UserError(f"bad multiplier {items[1]!r} in prompt tag {match.group(0)}") from None
        found.append((items[0], multiplier))
        return ""

    return _EXTRA_NETWORK_TAG.sub(take, prompt), found


def list_hypernetworks(dirs: str | os.PathLike | Iterable[str | os.PathLike]) -> dict[str, Path]:
    """``{stem: path}`` of every ``*.pt`` below the folders (recursive); ``None.pt`` is never listed.

    Files are taken in case-insensitive path order, so for a repeated stem the last one wins, as in A1111.
    """
    if isinstance(dirs, (str, os.PathLike)):
        dirs = [dirs]
    files: list[str] = []
    for d in dirs:
        files += glob.glob(os.path.join(glob.escape(os.fspath(d)), "**", "*.pt"), recursive=True)
    result: dict[str, Path] = {}
    for f in sorted(files, key=str.lower):
        stem = Path(f).stem
        if stem != "None" and os.path.isfile(f):
            result[stem] = Path(f)
    return result


__all__ = [
    "ACTIVATIONS",
    "DEFAULT_SIZES",
    "WEIGHT_INITS",
    "Hypernetwork",
    "HypernetworkAttnProcessor",
    "HypernetworkModule",
    "HypernetworkOptions",
    "HypernetworkTrainingModule",
    "OptimizerSidecar",
    "apply_hypernetworks",
    "attention_context_widths",
    "hypernetwork_from_a1111_dict",
    "hypernetwork_to_a1111_dict",
    "install_hypernetworks",
    "list_hypernetworks",
    "load_hypernetwork",
    "load_optimizer_sidecar",
    "options_from_a1111_dict",
    "parse_dropout_structure",
    "parse_hypernet_tags",
    "parse_layer_structure",
    "remove_hypernetworks",
    "save_hypernetwork",
    "save_hypernetwork_safetensors",
    "save_optimizer_sidecar",
    "sidecar_path",
]
