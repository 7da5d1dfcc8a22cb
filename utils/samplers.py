"""A1111 sampler names mapped to diffusers schedulers.

A scheduler is always built from the loaded model's own scheduler config (``from_config``), so its beta schedule and
prediction type (epsilon or v) carry over; only the solver and its options change.

A1111's k-diffusion samplers walk the model's sigmas from t=999 down to 0 evenly ("linspace" spacing); its DDIM and
PLMS use the CompVis "uniform" spacing, which is what the models' own configs ("leading" + steps_offset 1) describe.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from utils.errors import UserError


@dataclass(frozen=True)
class SamplerSpec:
    scheduler: str  # diffusers class name
    options: dict = field(default_factory=dict)
    needs: str | None = None  # an optional package the diffusers class depends on


_LIN = {"timestep_spacing": "linspace"}  # k-diffusion spacing, see module docstring
# Explicit False, so a model config that turned Karras sigmas on cannot make "Euler" secretly "Euler Karras".
_K = {**_LIN, "use_karras_sigmas": False}
_KARRAS = {**_LIN, "use_karras_sigmas": True}
_DPMPP = {"algorithm_type": "dpmsolver++", "solver_order": 2}
_SDE = {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}

SAMPLERS: dict[str, SamplerSpec] = {
    "Euler a": SamplerSpec("EulerAncestralDiscreteScheduler", _LIN),
    "Euler": SamplerSpec("EulerDiscreteScheduler", _K),
    "LMS": SamplerSpec("LMSDiscreteScheduler", _K, needs="scipy"),
    "LMS Karras": SamplerSpec("LMSDiscreteScheduler", _KARRAS, needs="scipy"),
    "Heun": SamplerSpec("HeunDiscreteScheduler", _K),
    "DPM2": SamplerSpec("KDPM2DiscreteScheduler", _K),
    "DPM2 Karras": SamplerSpec("KDPM2DiscreteScheduler", _KARRAS),
    "DPM2 a": SamplerSpec("KDPM2AncestralDiscreteScheduler", _K),
    "DPM2 a Karras": SamplerSpec("KDPM2AncestralDiscreteScheduler", _KARRAS),
    "DPM++ 2M": SamplerSpec("DPMSolverMultistepScheduler", {**_K, **_DPMPP}),
    "DPM++ 2M Karras": SamplerSpec("DPMSolverMultistepScheduler", {**_KARRAS, **_DPMPP}),
    "DPM++ 2M SDE": SamplerSpec("DPMSolverMultistepScheduler", {**_K, **_SDE}),
    "DPM++ 2M SDE Karras": SamplerSpec("DPMSolverMultistepScheduler", {**_KARRAS, **_SDE}),
    "DPM++ 3M SDE": SamplerSpec("DPMSolverMultistepScheduler", {**_K, **_SDE, "solver_order": 3}),
    "DPM++ 3M SDE Karras": SamplerSpec("DPMSolverMultistepScheduler", {**_KARRAS, **_SDE, "solver_order": 3}),
    "DPM++ SDE": SamplerSpec("DPMSolverSDEScheduler", _K, needs="torchsde"),
    "DPM++ SDE Karras": SamplerSpec("DPMSolverSDEScheduler", _KARRAS, needs="torchsde"),
    "DDIM": SamplerSpec("DDIMScheduler"),
    "PLMS": SamplerSpec("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": SamplerSpec("UniPCMultistepScheduler"),
}
# Not offered: "DPM++ 2S a", "DPM fast" and "DPM adaptive" have no diffusers counterpart (a look-alike would write a
# sampler name into the infotext that the image was not made with).


def sampler_names() -> list[str]:
    return list(SAMPLERS)


def resolve_sampler_name(name: str) -> str:
    """The canonical A1111 spelling of ``name`` (matched case-insensitively); UserError listing the valid ones."""
    wanted = " ".join(name.split()).casefold()
    for canonical in SAMPLERS:
        if canonical.casefold() == wanted:
            return canonical
    raise UserError(f"unknown sampler {name!r}; valid names: {', '.join(SAMPLERS)}")


def check_generation(steps: int, cfg_scale: float, batch_size: int, n_iter: int, sampler: str,
                     sizes: dict[str, int | None], multiple: int = 8) -> None:
    """The generation settings' checks, standard library only: inference.py runs them on its flags before torch
    loads (a size None is the model's default, checked later), utils.generation.validate with the final sizes and
    the VAE's factor."""
    if steps < 1:
        raise UserError(f"steps must be at least 1 (got {steps})")
    if not math.isfinite(cfg_scale):
        raise UserError(f"cfg scale must be a finite number (got {cfg_scale})")
    if batch_size < 1 or n_iter < 1:
        raise UserError(f"batch size and batch count must be at least 1 (got {batch_size}, {n_iter})")
    for name, value in sizes.items():
        if value is not None and (value < multiple or value % multiple):
            raise UserError(f"{name} must be a positive multiple of {multiple} (got {value})")
    resolve_sampler_name(sampler)


def _dependency_available(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def build_scheduler(name: str, base_config):
    """A diffusers scheduler for A1111 sampler ``name``, configured from the model's scheduler ``base_config``."""
    import diffusers

    spec = SAMPLERS[resolve_sampler_name(name)]
    if spec.needs and not _dependency_available(spec.needs):
        raise UserError(f"sampler {name!r} needs the {spec.needs} package (pip install {spec.needs}); "
                        f"or pick another sampler")
    cls = getattr(diffusers, spec.scheduler)
    return cls.from_config(base_config, **spec.options)
