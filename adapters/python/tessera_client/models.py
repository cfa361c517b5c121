"""What the editor adapters read off a model's description in the daemon's listing."""

from __future__ import annotations

from typing import Any, Dict, Optional


def exact_render_params(model: Dict[str, Any], semantic: float) -> Optional[Dict[str, Any]]:
    """Job parameters that render `model`'s semantic detail exactly at λ_sem = `semantic`
    (0..1) instead of blending its layer linearly, or None if the model offers no exact
    render. Today that is deep network interpolation (the `dni` parameter, srgan-pair): one
    pass of the network whose weights lie between the pixel model's and the GAN's."""
    if any(p.get("name") == "dni" for p in model.get("parameters", [])):
        return {"dni": semantic}
    return None
