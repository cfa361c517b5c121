"""What the editor adapters read off a model's description in the daemon's listing: the one
place that says how a model renders exactly at chosen λ instead of blending its detail layers
linearly (opacity is a linear stand-in for λ)."""

from __future__ import annotations

from typing import Any, Dict, Optional

#: A job run with :func:`exact_render_params` renders exactly (srgan-pair's network
#: interpolation, one pass of the network whose weights lie between SRResNet's and SRGAN's).
BY_PARAMS = "params"
#: The daemon renders a finished job exactly with a ``render`` request (``Client.render``):
#: PiSA-SR from the job's kept latents, one VAE decode; the result is one ``exact`` layer,
#: the whole picture at (λ_pix, λ_sem).
BY_RENDER = "render"


def exact_render_kind(model: Dict[str, Any]) -> Optional[str]:
    """:data:`BY_RENDER`, :data:`BY_PARAMS`, or None where `model` offers no exact render."""
    if model.get("exact_render"):
        return BY_RENDER
    if exact_render_params(model, 1.0) is not None:
        return BY_PARAMS
    return None


def exact_render_params(model: Dict[str, Any], semantic: float) -> Optional[Dict[str, Any]]:
    """Job parameters that render `model`'s semantic detail exactly at λ_sem = `semantic`
    (0..1), for :data:`BY_PARAMS` models; None for others."""
    if any(p.get("name") == "dni" for p in model.get("parameters", [])):
        return {"dni": semantic}
    return None
