"""Encoder export (safetensors, timm key names) and loading of pre-trained models."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from emae.errors import EmaeError
from emae.io import atomic_write

ENCODER_FILE = "encoder.safetensors"


def save_encoder(model: Any, path: str | Path) -> None:
    """Write the encoder's weights with the timm constructor arguments in the file's metadata.

    One metadata key only: safetensors writes its metadata map in a random order, so with two
    keys the same weights gave two different files (and two encoder digests, which every
    evaluation records and a resume checks)."""
    state = model.encoder_state_dict()
    metadata = {"timm_kwargs": json.dumps(model.encoder_kwargs, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(state, str(tmp), metadata=metadata))


def encoder_kwargs(path: str | Path) -> dict[str, Any]:
    """The timm VisionTransformer arguments that an exported encoder was trained with."""
    path = _existing(path, "encoder export")
    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata() or {}
    if "timm_kwargs" not in metadata:
        raise EmaeError(f"{path}: not an emae encoder export (no timm_kwargs metadata)")
    return json.loads(metadata["timm_kwargs"])


def load_encoder(path: str | Path, **timm_overrides: Any) -> VisionTransformer:
    """A timm VisionTransformer initialised from an export. `timm_overrides` set e.g.
    `num_classes`, `global_pool`, `drop_path_rate`; every encoder key must load (only a new head
    may be missing), otherwise the error lists the mismatched keys."""
    from safetensors.torch import load_file

    kwargs = {"num_classes": 0, "global_pool": "token", **encoder_kwargs(path), **timm_overrides}
    model = VisionTransformer(**kwargs)
    state = load_file(str(path))
    check_state_dict(model, state, path, allowed_missing=("head.", "fc_norm."))
    model.load_state_dict(state, strict=False)
    return model


def reinitialise(encoder: VisionTransformer, kwargs: dict[str, Any]) -> None:
    """Give `encoder` (built from an export with timm `kwargs`) the weights pre-training starts
    from (sin-cos positions, xavier): the random-init baseline of the evaluations. Seed first."""
    from emae.models.emae import EMAE

    fresh = EMAE(**kwargs, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=1).encoder
    missing, unexpected = encoder.load_state_dict(fresh.state_dict(), strict=False)
    assert not unexpected and all(k.startswith(("head.", "fc_norm.")) for k in missing)


def check_state_dict(model: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path,
                     allowed_missing: tuple[str, ...] = ()) -> None:
    """Raise an error listing missing, unexpected and wrongly shaped keys."""
    own = model.state_dict()
    missing = [k for k in own if k not in state and not k.startswith(allowed_missing)]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in state if k in own and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = []
        for title, keys in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)):
            if keys:
                shown = ", ".join(keys[:8]) + (f", ... ({len(keys)} in all)" if len(keys) > 8 else "")
                parts.append(f"{title}: {shown}")
        raise EmaeError(f"{path}: checkpoint does not match the model architecture; " + "; ".join(parts))


def load_pretrained(path: str | Path, map_location: str | torch.device = "cpu"):
    """(EMAE model with decoder, its Config) from a pre-training checkpoint (`checkpoints/last.pt`)."""
    from emae.config import config_from_tree
    from emae.models.emae import EMAE

    path = _existing(path, "pre-training checkpoint")
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as err:  # noqa: BLE001 - a corrupt file: say which one
        raise EmaeError(f"{path}: cannot read checkpoint: {err}") from None
    if not isinstance(checkpoint, dict) or "model" not in checkpoint or "config" not in checkpoint:
        raise EmaeError(f"{path}: not an emae pre-training checkpoint (needs 'model' and 'config')")
    config = config_from_tree(checkpoint["config"])
    model = EMAE.from_config(config.model, config.data)
    check_state_dict(model, checkpoint["model"], path)
    model.load_state_dict(checkpoint["model"])
    return model, config


def _existing(path: str | Path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise EmaeError(f"{path}: {what} not found")
    return path
