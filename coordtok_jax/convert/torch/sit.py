"""A self-contained PyTorch triplane SiT (needs only torch) with the official state_dict keys.

    from coordtok_jax.convert.torch.sit import TriplaneSiT, load_official_checkpoint
    model = TriplaneSiT(**SIT_L2)                        # the released SiT-L/2
    load_official_checkpoint(model, "0600000.pt")       # ckpt['ema'] as find_model, strict
    v = model(planes, t, y)                              # planes channel-last, t (B,) in [0, 1]

This file imports nothing from coordtok_jax. It follows the official
`models/diffusion/sit_models.py` (huiwon-jang/CoordTok @ 8475272) as written down in the port
spec, section 7: per-plane PatchEmbed Conv2d(C -> D, k = s = p); xy tokens + the fixed MAE 2D
sin-cos `pos_embed_xy` (a requires_grad=False Parameter, so it is in the state_dict), yt and xt
tokens + the shared learned `pos_embed_t`; + `type_embed[:, k]`; c = TimestepEmbedder(t) (t in
[0, 1], not scaled) + LabelEmbedder(y); adaLN-Zero blocks (LN without affine eps 1e-6, timm
Attention with qkv bias, tanh-GELU Mlp); three FinalLayers; unpatchify 'nhwpqc->nchpwq'; with
learn_sigma the second half of the channels is discarded. Initialisation is the official
`initialize_weights`. The only interface change: planes are channel-last (B, R1, R2, C) in and
out, like the JAX model (the official takes and returns channel-first).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SIT_L2 = dict(hidden_size=1024, depth=24, num_heads=16, patch_size=2, mlp_ratio=4.0, in_channels=8,
              latent_resolution_xy=16, latent_resolution_t=32, num_classes=1, class_dropout_prob=0.0,
              learn_sigma=True)


def sincos_2d(embed_dim: int, grid_size: int) -> torch.Tensor:
    """MAE `get_2d_sincos_pos_embed` (grid from meshgrid(w, h): channels [0, D/2) encode the
    column, [D/2, D) the row), computed in float64, returned float32 (grid_size**2, D)."""
    def one(pos, dim):
        omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
        out = pos.reshape(-1).double()[:, None] * omega[None]
        return torch.cat([torch.sin(out), torch.cos(out)], dim=1)

    g = torch.arange(grid_size, dtype=torch.float32)
    w, h = torch.meshgrid(g, g, indexing="xy")  # numpy meshgrid(grid_w, grid_h): w varies along columns
    return torch.cat([one(w, embed_dim // 2), one(h, embed_dim // 2)], dim=1).float()


def modulate(x, shift, scale):
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    def __init__(self, cin: int, dim: int, patch: int):
        super().__init__()
        self.proj = nn.Conv2d(cin, dim, kernel_size=patch, stride=patch)

    def forward(self, x):  # channel-first in, (B, tokens, D) out (row-major)
        return self.proj(x).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    def __init__(self, dim: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, dim), nn.SiLU(), nn.Linear(dim, dim))

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
        args = t[:, None].float() * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return F.pad(emb, (0, dim % 2))

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    def __init__(self, num_classes: int, dim: int, dropout_prob: float):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), dim)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def forward(self, labels, train: bool, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            if force_drop_ids is None:
                drop = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
            else:
                drop = force_drop_ids == 1
            labels = torch.where(drop, self.num_classes, labels)
        return self.embedding_table(labels)


class Attention(nn.Module):
    """timm Attention(dim, num_heads, qkv_bias=True)."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class SiTBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 6 * dim))

    def forward(self, x, c):
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class FinalLayer(nn.Module):
    def __init__(self, dim: int, patch: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, patch * patch * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim, 2 * dim))

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class TriplaneSiT(nn.Module):
    """forward(planes, t, y, force_drop_ids=None): planes (xy (B, Rxy, Rxy, C), yt and xt
    (B, Rt, Rxy, C)) channel-last -> the three predicted planes, same shapes."""

    def __init__(self, hidden_size=1024, depth=24, num_heads=16, patch_size=2, mlp_ratio=4.0, in_channels=8,
                 latent_resolution_xy=16, latent_resolution_t=32, num_classes=1, class_dropout_prob=0.0,
                 learn_sigma=True):
        super().__init__()
        for name, r in (("latent_resolution_xy", latent_resolution_xy), ("latent_resolution_t", latent_resolution_t)):
            if r % patch_size:
                raise ValueError(f"patch_size={patch_size} must divide {name}={r}")
        if hidden_size % num_heads or hidden_size % 4:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by num_heads={num_heads} and by 4")
        d, p = hidden_size, patch_size
        self.in_channels, self.patch_size, self.learn_sigma = in_channels, p, learn_sigma
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.grids = [(latent_resolution_xy // p, latent_resolution_xy // p),
                      (latent_resolution_t // p, latent_resolution_xy // p),
                      (latent_resolution_t // p, latent_resolution_xy // p)]
        n_xy, n_t = math.prod(self.grids[0]), math.prod(self.grids[1])
        self.pos_embed_xy = nn.Parameter(torch.zeros(1, n_xy, d), requires_grad=False)
        self.pos_embed_t = nn.Parameter(torch.zeros(1, n_t, d))
        self.type_embed = nn.Parameter(torch.randn(1, 3, d))
        self.x_embedder_xy = PatchEmbed(in_channels, d, p)
        self.x_embedder_yt = PatchEmbed(in_channels, d, p)
        self.x_embedder_xt = PatchEmbed(in_channels, d, p)
        self.t_embedder = TimestepEmbedder(d)
        self.y_embedder = LabelEmbedder(num_classes, d, class_dropout_prob)
        self.blocks = nn.ModuleList([SiTBlock(d, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer_xy = FinalLayer(d, p, self.out_channels)
        self.final_layer_yt = FinalLayer(d, p, self.out_channels)
        self.final_layer_xt = FinalLayer(d, p, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        if self.pos_embed_xy.is_meta:
            return

        def basic(m):
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.constant_(m.bias, 0)

        self.apply(basic)
        self.pos_embed_xy.data.copy_(sincos_2d(self.pos_embed_xy.shape[-1], self.grids[0][0]).unsqueeze(0))
        for emb in (self.x_embedder_xy, self.x_embedder_yt, self.x_embedder_xt):
            w = emb.proj.weight.data
            nn.init.xavier_uniform_(w.view([w.shape[0], -1]))
            nn.init.constant_(emb.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        for final in (self.final_layer_xy, self.final_layer_yt, self.final_layer_xt):
            for lin in (final.adaLN_modulation[-1], final.linear):
                nn.init.constant_(lin.weight, 0)
                nn.init.constant_(lin.bias, 0)

    def unpatchify(self, x, grid):
        """(B, h*w, p*p*c) -> channel-first (B, c, h*p, w*p) ('nhwpqc->nchpwq')."""
        (h, w), p, c = grid, self.patch_size, self.out_channels
        x = torch.einsum("nhwpqc->nchpwq", x.reshape(x.shape[0], h, w, p, p, c))
        return x.reshape(x.shape[0], c, h * p, w * p)

    def forward(self, planes, t, y, force_drop_ids=None):
        xy, yt, xt = (z.permute(0, 3, 1, 2) for z in planes)  # channel-last -> official channel-first
        embedders = (self.x_embedder_xy, self.x_embedder_yt, self.x_embedder_xt)
        positions = (self.pos_embed_xy, self.pos_embed_t, self.pos_embed_t)
        x = torch.cat([emb(z) + pos + self.type_embed[:, k].unsqueeze(1)
                       for k, (emb, pos, z) in enumerate(zip(embedders, positions, (xy, yt, xt)))], dim=1)
        c = self.t_embedder(t) + self.y_embedder(y, self.training, force_drop_ids)
        for block in self.blocks:
            x = block(x, c)
        out, start = [], 0
        for final, grid in zip((self.final_layer_xy, self.final_layer_yt, self.final_layer_xt), self.grids):
            n = grid[0] * grid[1]
            z = self.unpatchify(final(x[:, start:start + n], c), grid)
            if self.learn_sigma:
                z, _ = z.chunk(2, dim=1)
            out.append(z.permute(0, 2, 3, 1))
            start += n
        return tuple(out)


def load_official_checkpoint(model: TriplaneSiT, checkpoint, which: str = "ema", strict: bool = True):
    """Loads an official SiT checkpoint (path, file dict or state_dict): ckpt[which] when present
    ('ema' = the official find_model), else the dict itself; the saved args are admitted."""
    if not isinstance(checkpoint, dict):
        import argparse

        with torch.serialization.safe_globals([argparse.Namespace]):
            checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = checkpoint[which] if isinstance(checkpoint.get(which), dict) else checkpoint
    return model.load_state_dict(sd, strict=strict)
