"""A hypernetwork's architecture options and their checks, with the standard library only: train_hypernetwork.py
checks its architecture flags here before torch is imported. utils/hypernetwork.py maps the names to torch modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import Sequence

from utils.errors import UserError

WEIGHT_INITS = ("Normal", "XavierUniform", "XavierNormal", "KaimingUniform", "KaimingNormal")

# A1111's activation names: its aliases ("swish" is torch's Hardswish), then every activation class of
# torch.nn.modules.activation in lower case. tests/test_hypernetwork.py checks this list against torch's classes.
ACTIVATION_NAMES = (
    "linear", "relu", "leakyrelu", "elu", "swish", "tanh", "sigmoid",
    "celu", "gelu", "glu", "hardshrink", "hardsigmoid", "hardswish", "hardtanh", "logsigmoid", "logsoftmax", "mish",
    "prelu", "relu6", "rrelu", "selu", "silu", "softmax", "softmax2d", "softmin", "softplus", "softshrink", "softsign",
    "tanhshrink",
)
# torch activation classes that cannot be built without arguments, so no hypernetwork can use them.
ACTIVATIONS_NEEDING_ARGUMENTS = ("multiheadattention", "threshold")


def check_activation(name: str) -> None:
    if name in ACTIVATIONS_NEEDING_ARGUMENTS:
        raise UserError(f"hypernetwork activation function {name!r} cannot be used: torch's class needs arguments "
                        "that a hypernetwork file does not hold")
    if name not in ACTIVATION_NAMES:
        raise UserError(
            f"unsupported hypernetwork activation function {name!r}; choose one of {', '.join(sorted(ACTIVATION_NAMES))}"
        )


def check_weight_init(name: str) -> None:
    if name not in WEIGHT_INITS:
        raise UserError(f"unknown hypernetwork weight init {name!r}; choose one of {', '.join(WEIGHT_INITS)}")


def parse_layer_structure(text: str) -> list[float]:
    """``"1, 2, 1"`` -> ``[1.0, 2.0, 1.0]`` (A1111 keeps floats in the file)."""
    try:
        values = [float(part) for part in text.replace(" ", "").split(",") if part]
    except ValueError:
        raise UserError(f"layer structure {text!r} is not a comma-separated list of numbers") from None
    check_layer_structure(values)
    return values


def parse_dropout_structure(
    layer_structure: Sequence[float] | None, use_dropout: bool, last_layer_dropout: bool
) -> list[float]:
    """The per-layer dropout A1111 derives when a file or the user gives no explicit dropout structure."""
    if layer_structure is None:
        layer_structure = [1, 2, 1]
    n = len(layer_structure)
    if not use_dropout:
        return [0] * n
    return [0] + [0.3] * (n - 3) + [0.3 if last_layer_dropout else 0] + [0]


def check_layer_structure(layer_structure: Sequence[float]) -> None:
    if len(layer_structure) < 2 or layer_structure[0] != 1 or layer_structure[-1] != 1:
        raise UserError(
            f"hypernetwork layer structure {list(layer_structure)} must have at least two entries "
            "and start and end with 1"
        )
    if any(not math.isfinite(a) or a <= 0 for a in layer_structure):
        raise UserError(f"hypernetwork layer structure {list(layer_structure)} must contain only positive numbers")


def check_dropout_structure(dropout_structure: Sequence[float], layer_structure: Sequence[float]) -> None:
    if len(dropout_structure) != len(layer_structure):
        raise UserError(
            f"dropout structure {list(dropout_structure)} must have as many entries as the layer structure "
            f"{list(layer_structure)}"
        )
    for p in dropout_structure:
        if p != 0 and not 0 < p < 1:
            raise UserError(f"dropout probability {p} in {list(dropout_structure)} must be 0 or between 0 and 1")


@dataclass
class HypernetworkOptions:
    """The architecture and metadata options A1111 stores next to the weights (names as the file's keys)."""

    layer_structure: list[float] = field(default_factory=lambda: [1.0, 2.0, 1.0])
    activation_func: str | None = None
    is_layer_norm: bool = False
    weight_initialization: str = "Normal"
    activate_output: bool = False
    use_dropout: bool = False
    dropout_structure: list[float] | None = None  # None: derived from use_dropout / last_layer_dropout
    last_layer_dropout: bool = False
    optional_info: str | None = None

    def resolved(self) -> "HypernetworkOptions":
        """A copy with ``dropout_structure`` filled in, as A1111 holds it after creating or loading, and the activation
        named."""
        if self.dropout_structure is None:
            ds = parse_dropout_structure(self.layer_structure, self.use_dropout, self.last_layer_dropout)
        else:
            ds = list(self.dropout_structure)
        # A non-zero structure means dropout is on (A1111 infers this on load; set it now so a round trip is exact).
        # No activation is "linear": the same network in A1111, and ComfyUI refuses a file whose activation is None.
        return replace(self, dropout_structure=ds, use_dropout=bool(self.use_dropout or any(ds)),
                       activation_func=self.activation_func or "linear")


def check_options(options: HypernetworkOptions) -> HypernetworkOptions:
    """Every architecture option checked without building a module (so before any model loads); returns them."""
    resolved = options.resolved()
    check_layer_structure(resolved.layer_structure)
    check_dropout_structure(resolved.dropout_structure, resolved.layer_structure)
    check_activation(resolved.activation_func or "linear")
    check_weight_init(resolved.weight_initialization)
    return options
