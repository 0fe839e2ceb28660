"""EMAE: a masked autoencoder whose K masked views of an image run as one batch of K*B sequences.

Read it as a diff of facebookresearch/mae's `MaskedAutoencoderViT`: the same encoder / decoder /
loss split; `random_masking` becomes `parallel_masks` (K views with disjoint visible sets) and the
loss gains a self-consistency term between the views' predictions. K = 1, lambda = 0 is MAE.

The encoder *is* a timm `VisionTransformer` (no head), so its state dict uses timm's key names and
an exported encoder loads into `timm.create_model(...)` without renaming.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch
import torch.nn as nn
from timm.layers.pos_embed_sincos import build_sincos2d_pos_embed
from timm.models.vision_transformer import Block, VisionTransformer
from torch.utils.checkpoint import checkpoint

from emae.losses import consistency_loss, patch_targets, reconstruction_loss
from emae.masking import num_visible, parallel_masks, visible_indices
from emae.attention import check_choice, choose, compute_dtype, kernel_context

# On a CPU the blocks run over chunks of about this many tokens (sequences x length): one K*B batch's
# activations fall out of the caches, and its memory-bound work (GELU, LayerNorm, softmax, the weight
# gradients' reads) then runs at DRAM speed; in chunks it runs from cache, as K batches of B do.
# Measured (docs/performance.md): the decoder of K=4 x 64 x 65 tokens 1.1-1.4x faster in chunks of
# 4096 tokens, 2048 within noise of it, 1024 slower; GPUs want the whole batch (not chunked).
CPU_CHUNK_TOKENS = 4096


@dataclass
class EMAEOutput:
    loss: torch.Tensor  # recon_loss + consistency_weight * consistency_loss
    recon_loss: torch.Tensor
    consistency_loss: torch.Tensor
    pred: torch.Tensor  # [K, B, L, patch*patch*C]
    mask: torch.Tensor  # [K, B, L], True = masked


def sincos_pos_embed(grid_size: int, dim: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding with a zero row for the class token: [1, 1+L, dim]."""
    grid = build_sincos2d_pos_embed([grid_size, grid_size], dim=dim)  # [L, dim]
    return torch.cat([torch.zeros(1, dim), grid], dim=0).unsqueeze(0)


class EMAE(nn.Module):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_pix_loss: bool = True,
        mask_ratio: float = 0.75,
        num_parts: int = 4,
        consistency_weight: float = 1.0,
        consistency_distance: str = "mse",
        grad_checkpointing: bool = False,
        encoder_attention: str = "auto",
        decoder_attention: str = "auto",
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.num_parts = num_parts
        self.consistency_weight = consistency_weight
        self.consistency_distance = consistency_distance
        self.norm_pix_loss = norm_pix_loss
        self.grad_checkpointing = grad_checkpointing
        # SDPA kernel per part: "auto" = emae.attention's measured table, else pinned
        self.attention = {"encoder": check_choice("encoder_attention", encoder_attention),
                          "decoder": check_choice("decoder_attention", decoder_attention)}
        norm_layer = partial(nn.LayerNorm, eps=1e-6)

        # encoder: timm's ViT without head; its learnable pos_embed is frozen to sin-cos below
        self.encoder_kwargs: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
        )
        self.encoder = VisionTransformer(
            **self.encoder_kwargs, num_classes=0, global_pool="token", qkv_bias=True,
            norm_layer=norm_layer, weight_init="skip",
        )
        grid = img_size // patch_size
        self.num_patches = grid * grid
        self.encoder.pos_embed.requires_grad_(False)

        # decoder
        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(
            torch.zeros(1, self.num_patches + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.Sequential(*[
            Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, qkv_bias=True, norm_layer=norm_layer)
            for _ in range(decoder_depth)
        ])
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans)
        self.initialize_weights()

    @classmethod
    def from_config(cls, model_cfg: Any, data_cfg: Any) -> "EMAE":
        return cls(img_size=data_cfg.image_size, in_chans=data_cfg.in_chans,
                   **model_cfg.model_dump())

    def initialize_weights(self) -> None:
        """MAE's initialisation: fixed sin-cos positions, xavier linears, N(0, 0.02) tokens."""
        grid = int(self.num_patches**0.5)
        self.encoder.pos_embed.data.copy_(sincos_pos_embed(grid, self.encoder.embed_dim))
        self.decoder_pos_embed.data.copy_(sincos_pos_embed(grid, self.decoder_pos_embed.shape[-1]))
        w = self.encoder.patch_embed.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.normal_(self.encoder.cls_token, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def no_weight_decay(self) -> set[str]:
        return {"encoder.cls_token", "encoder.pos_embed", "mask_token", "decoder_pos_embed"}

    # ------------------------------------------------------------------ patches

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """imgs: [B, C, H, W] -> [B, L, p*p*C] (MAE's order: row, column, channel)."""
        p, c = self.patch_size, self.in_chans
        b, _, h, w = imgs.shape
        x = imgs.reshape(b, c, h // p, p, w // p, p)
        x = torch.einsum("nchpwq->nhwpqc", x)
        return x.reshape(b, (h // p) * (w // p), p * p * c)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """x: [B, L, p*p*C] -> [B, C, H, W]."""
        p, c = self.patch_size, self.in_chans
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    # ------------------------------------------------------------------ forward

    def forward_encoder(self, imgs: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """imgs: [B, C, H, W], ids_keep: [K, B, n] -> latent [K*B, 1+n, D]."""
        enc = self.encoder
        x = enc.patch_embed(imgs)  # [B, L, D]
        x = x + enc.pos_embed[:, 1:, :]
        k, b, n = ids_keep.shape
        d = x.shape[-1]
        # each part gathers its own visible tokens: [K, B, n, D] -> one batch of K*B sequences
        x = torch.gather(x.unsqueeze(0).expand(k, -1, -1, -1), 2,
                         ids_keep.unsqueeze(-1).expand(-1, -1, -1, d))
        x = x.reshape(k * b, n, d)
        cls = (enc.cls_token + enc.pos_embed[:, :1, :]).expand(k * b, -1, -1)
        x = torch.cat([cls, x], dim=1)  # [K*B, 1+n, D]
        x = enc.norm_pre(x)
        x = self._run_blocks(enc.blocks, x, "encoder")
        return enc.norm(x)

    def forward_decoder(self, latent: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """latent: [K*B, 1+n, D], ids_keep: [K, B, n] -> pred [K, B, L, p*p*C]."""
        k, b, n = ids_keep.shape
        x = self.decoder_embed(latent)  # [K*B, 1+n, Dd]
        dd = x.shape[-1]
        # put the visible tokens back at their positions; mask tokens everywhere else
        tokens = self.mask_token.to(x.dtype).expand(k * b, self.num_patches, dd)
        index = ids_keep.reshape(k * b, n, 1).expand(-1, -1, dd)
        tokens = torch.scatter(tokens, 1, index, x[:, 1:, :])  # [K*B, L, Dd]
        x = torch.cat([x[:, :1, :], tokens], dim=1) + self.decoder_pos_embed
        x = self._run_blocks(self.decoder_blocks, x, "decoder")
        x = self.decoder_pred(self.decoder_norm(x))[:, 1:, :]  # drop the class token
        return x.reshape(k, b, self.num_patches, -1)

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """imgs: [B, C, H, W], pred: [K, B, L, P], mask: [K, B, L] -> (loss, recon, consistency)."""
        pred = pred.float()  # losses in fp32 under autocast
        target = patch_targets(self.patchify(imgs).float(), self.norm_pix_loss)
        recon = reconstruction_loss(pred, target, mask)
        if self.consistency_weight > 0 and self.num_parts > 1:
            consistency = consistency_loss(pred, mask, self.consistency_distance)
        else:
            consistency = torch.zeros((), device=pred.device)
        return recon + self.consistency_weight * consistency, recon, consistency

    def forward(self, imgs: torch.Tensor, generator: torch.Generator | None = None,
                mask: torch.Tensor | None = None) -> EMAEOutput:
        """imgs: [B, C, H, W]. Masks come from `generator` (or are given: [K, B, L])."""
        n_keep = None  # a given mask may use another ratio (e.g. the consistency evaluation)
        if mask is None:
            mask = parallel_masks(imgs.shape[0], self.num_patches, self.num_parts, self.mask_ratio,
                                  generator=generator, device=imgs.device)
            n_keep = num_visible(self.num_patches, self.mask_ratio)  # no device read-back
        ids_keep = visible_indices(mask, n_keep)
        latent = self.forward_encoder(imgs, ids_keep)
        pred = self.forward_decoder(latent, ids_keep)
        loss, recon, consistency = self.forward_loss(imgs, pred, mask)
        return EMAEOutput(loss, recon, consistency, pred, mask)

    def _run_blocks(self, blocks: nn.Sequential, x: torch.Tensor, part: str) -> torch.Tensor:
        """x: [N, T, D] through `blocks` on the part's attention kernel; on a CPU in chunks of
        sequences (CPU_CHUNK_TOKENS), except under activation checkpointing (a GPU's memory
        tool: its peak stays the one `emae plan` estimates)."""
        # under torch.compile the compiler lowers attention itself
        backends = None if torch.compiler.is_compiling() else choose(
            part, self.attention[part], x.device.type, compute_dtype(x), x.shape[1])

        def kernel() -> contextlib.AbstractContextManager:
            return kernel_context(backends) if backends else contextlib.nullcontext()

        if self.grad_checkpointing and torch.is_grad_enabled():
            for block in blocks:  # recomputed in backward on the same kernel
                x = checkpoint(block, x, use_reentrant=False, context_fn=lambda: (kernel(), kernel()))
            return x
        tokens = x.shape[0] * x.shape[1]
        chunks = max(1, tokens // CPU_CHUNK_TOKENS) if x.is_cpu else 1
        with kernel():
            if chunks == 1:
                return blocks(x)
            return torch.cat([blocks(chunk) for chunk in x.chunk(chunks)])

    # ------------------------------------------------------------------ export

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's weights under timm VisionTransformer key names."""
        return {k: v.detach().clone().contiguous() for k, v in self.encoder.state_dict().items()}

