"""A self-contained PyTorch CoordTok (needs only torch) with the official state_dict keys.

Weights exported by `python -m coordtok_jax.convert torch-export` (or the released
`CoordTok_UCF101_1M_50K.pth`) run here without the official repository or timm:

    from coordtok_jax.convert.torch.coordtok import CoordTok, load_official_checkpoint
    model = CoordTok(**RELEASED)                      # the released L configuration
    load_official_checkpoint(model, "model.pth")      # strict; `module.`/LPIPS keys handled
    planes = model.encode(video, n_frames)            # video (B, T, H, W, 3) in [-1, 1]
    frames = model.decode_video(planes)               # (B, T, H, W, 3)

This file imports nothing from coordtok_jax, so it can be copied on its own. It follows the
forward of the official code (huiwon-jang/CoordTok @ 8475272) as written down in the port spec,
with the same choices as the JAX model:

* reproduced because the released weights depend on them: padded memory tokens get +1.0 on
  their cross-attention logits (the official float key_padding_mask; `padding_mask='exclude'`
  masks them instead), a temporal patch counts as padded when t_p >= floor(n_frames / pt), and
  the ViT3D self-attention has no mask;
* fixed: the decoder never mutates its coords argument, the positional table is indexed by
  round(coord * (n - 1)) (the official fp32 truncation agrees on every grid coordinate), the
  unpatchify uses the true (rows, cols) token grid, and `decode_video` decodes the remainder
  patches the official leaves at zero. Coordinates are clamped to [0, 1].

Layouts: video and planes are channel-last, as in the JAX model; `state_dict()` keys, order and
shapes equal the official `CoordTok.state_dict()`.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

RELEASED = dict(  # CoordTok_UCF101_1M_50K.pth
    video_shape=(128, 128, 128), enc_embed_dim=1024, enc_num_heads=16, enc_patch_num_layers=8,
    enc_num_layers=24, enc_patch_size_t=8, enc_patch_size_xy=16, latent_resolution_xy=16,
    latent_resolution_t=32, latent_n_features=8, latent_patch_size_xy=8, latent_patch_size_t=16,
    dec_embed_dim=1024, dec_num_heads=16, dec_num_layers=24, dec_patch_size_t=1, dec_patch_size_xy=8,
)
LPIPS_PREFIX = "decoder.lpips_loss."


def _attention(q, k, v, num_heads: int, bias=None, mask=None):
    """q (B, Nq, D), k/v (B, Nk, D) -> (B, Nq, D); heads are contiguous slices of D."""
    b, nq, d = q.shape
    hd = d // num_heads
    split = lambda x: x.reshape(b, x.shape[1], num_heads, hd).transpose(1, 2)
    attn_mask = bias if bias is not None else mask
    out = F.scaled_dot_product_attention(split(q), split(k), split(v), attn_mask=attn_mask)
    return out.transpose(1, 2).reshape(b, nq, d)


class Attention(nn.Module):
    """timm `Attention` (packed qkv Linear, optional qkv bias, proj with bias), no mask."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(_attention(q, k, v, self.num_heads))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """timm `Block`: pre-LN (eps 1e-5), attention, exact-GELU MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.attn = Attention(dim, num_heads, qkv_bias)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MultiheadAttention(nn.Module):
    """nn.MultiheadAttention(dim, heads, bias=False, batch_first=True)'s parameters and math
    (packed in_proj_weight [Wq; Wk; Wv], bias-free out_proj), with an additive logit `bias` or
    a boolean keep-`mask` over the keys."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.out_proj = nn.Linear(dim, dim, bias=False)
        nn.init.xavier_uniform_(self.in_proj_weight)

    def forward(self, query, key, value, bias=None, mask=None):
        wq, wk, wv = self.in_proj_weight.chunk(3, dim=0)
        q, k, v = F.linear(query, wq), F.linear(key, wk), F.linear(value, wv)
        return self.out_proj(_attention(q, k, v, self.num_heads, bias, mask))


class ConditionMaskBlock(nn.Module):
    """x += CrossAttn(LN1(x), mem); x += SelfAttn(LN2(x)); x += MLP(LN3(x)); LN eps 1e-6."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        hidden = int(dim * mlp_ratio)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = MultiheadAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = MultiheadAttention(dim, num_heads)
        self.norm3 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(0.0), nn.Linear(hidden, dim))

    def forward(self, x, memory, bias=None, mask=None):
        h = self.norm1(x)
        x = x + self.cross_attn(h, memory, memory, bias, mask)
        h = self.norm2(x)
        x = x + self.self_attn(h, h, h)
        return x + self.mlp(self.norm3(x))


class PatchEmbed(nn.Module):
    """Conv with kernel = stride = patch (`proj`), output tokens row-major."""

    def __init__(self, cin: int, dim: int, patch: Sequence[int]):
        super().__init__()
        conv = nn.Conv3d if len(patch) == 3 else nn.Conv2d
        self.proj = conv(cin, dim, kernel_size=tuple(patch), stride=tuple(patch))

    def forward(self, x):  # channel-first in, (B, tokens, D) out
        return self.proj(x).flatten(2).transpose(1, 2)


class ViT3D(nn.Module):
    def __init__(self, dim, num_heads, num_layers, patch, num_tokens, mlp_ratio):
        super().__init__()
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.pos_emb = nn.Parameter(torch.randn(1, num_tokens, dim))
        self.patch_embed = PatchEmbed(3, dim, patch)
        self.layers = nn.ModuleList([Block(dim, num_heads, mlp_ratio, qkv_bias=False) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim, eps=1e-5)

    def forward(self, video):  # (B, T, H, W, 3)
        x = self.patch_embed(video.permute(0, 4, 1, 2, 3)) + self.pos_emb
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x[:, 1:])


class CrossSelfTransformer(nn.Module):
    def __init__(self, dim, num_heads, num_layers, mlp_ratio):
        super().__init__()
        self.layers = nn.ModuleList([ConditionMaskBlock(dim, num_heads, mlp_ratio) for _ in range(num_layers)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x, memory, bias=None, mask=None):
        for layer in self.layers:
            x = layer(x, memory, bias, mask)
        return self.norm(x)


class CoordTokEncoder(nn.Module):
    def __init__(self, cfg: "CoordTok"):
        super().__init__()
        d, c = cfg.enc_embed_dim, cfg.latent_n_features
        self.cross_pos_emb = nn.Parameter(torch.randn(1, cfg.num_memory_tokens, d))
        self.encoder = ViT3D(d, cfg.enc_num_heads, cfg.enc_patch_num_layers, cfg.enc_patch,
                             cfg.num_memory_tokens, cfg.mlp_ratio)
        self.patch_embeds_xy = PatchEmbed(c, d, cfg.query_patch_xy)
        self.patch_embeds_yt = PatchEmbed(c, d, cfg.query_patch_t)
        self.patch_embeds_xt = PatchEmbed(c, d, cfg.query_patch_t)
        self.transformer = CrossSelfTransformer(d, cfg.enc_num_heads, cfg.enc_num_layers, cfg.mlp_ratio)
        self.projectors_xy = nn.Linear(d, math.prod(cfg.query_patch_xy) * c)
        self.projectors_yt = nn.Linear(d, math.prod(cfg.query_patch_t) * c)
        self.projectors_xt = nn.Linear(d, math.prod(cfg.query_patch_t) * c)


class DecoderTransformer(nn.Module):
    def __init__(self, cfg: "CoordTok"):
        super().__init__()
        d = cfg.dec_embed_dim
        self.pos_embed = nn.Parameter(torch.randn(1, *cfg.dec_grid, d) * d**-0.5)
        self.patch_embed = nn.Linear(3 * cfg.latent_n_features, d)
        self.layers = nn.ModuleList(
            [Block(d, cfg.dec_num_heads, cfg.mlp_ratio, qkv_bias=True) for _ in range(cfg.dec_num_layers)])
        self.norm = nn.LayerNorm(d, eps=1e-5)


class CoordTokDecoder(nn.Module):
    def __init__(self, cfg: "CoordTok"):
        super().__init__()
        self.transformer = DecoderTransformer(cfg)
        self.projector = nn.Linear(cfg.dec_embed_dim, cfg.patch_values)


def _bilinear(plane, a, b):
    """plane (B, R1, R2, C) sampled at a, b (B, N) in [0, 1], corner-aligned -> (B, N, C)."""
    batch, r1, r2, c = plane.shape
    flat = plane.reshape(batch, r1 * r2, c)

    def split(coord, size):
        s = coord.float().clamp(0.0, 1.0) * (size - 1)
        i0 = s.floor().long()
        return i0, (i0 + 1).clamp(max=size - 1), (s - i0.float()).unsqueeze(-1)

    i0a, i1a, fa = split(a, r1)
    i0b, i1b, fb = split(b, r2)
    at = lambda ia, ib: torch.gather(flat, 1, (ia * r2 + ib).unsqueeze(-1).expand(-1, -1, c))
    c0 = at(i0a, i0b) * (1 - fb) + at(i0a, i1b) * fb
    c1 = at(i1a, i0b) * (1 - fb) + at(i1a, i1b) * fb
    return c0 * (1 - fa) + c1 * fa


class CoordTok(nn.Module):
    """The CoordTok tokenizer. Arguments are the official `train_coordtok.py` ones.

    `encode(video, n_frames=None)`: video (B, T, H, W, 3) float in [-1, 1] (frames past n_frames
    are padding, -3 in the official pipeline), n_frames (B,) or (B, 1) ints ->
    (z_xy (B, Rxy, Rxy, C), z_yt (B, Rt, Rxy, C), z_xt (B, Rt, Rxy, C)), channel-last.
    `decode(planes, coords)`: coords (B, N, 3) = (t, x, y) patch coordinates in [0, 1] ->
    (B, N, pt*px*py*3) laid out (pt, px, py, 3); all N points of a video attend jointly.
    """

    def __init__(self, video_shape=(128, 128, 128), enc_embed_dim=1024, enc_num_heads=16,
                 enc_patch_num_layers=8, enc_num_layers=24, enc_patch_size_t=8, enc_patch_size_xy=16,
                 latent_resolution_xy=16, latent_resolution_t=32, latent_n_features=8,
                 latent_patch_size_xy=8, latent_patch_size_t=16, dec_embed_dim=1024, dec_num_heads=16,
                 dec_num_layers=24, dec_patch_size_t=1, dec_patch_size_xy=8, mlp_ratio=4.0,
                 padding_mask="official"):
        super().__init__()
        T, H, W = (int(v) for v in video_shape)
        if padding_mask not in ("official", "exclude"):
            raise ValueError(f"padding_mask must be 'official' or 'exclude', got {padding_mask!r}")
        for name, part, whole in (("enc_patch_size_t", enc_patch_size_t, T), ("enc_patch_size_xy", enc_patch_size_xy, H),
                                  ("enc_patch_size_xy", enc_patch_size_xy, W), ("dec_patch_size_t", dec_patch_size_t, T),
                                  ("dec_patch_size_xy", dec_patch_size_xy, H), ("dec_patch_size_xy", dec_patch_size_xy, W),
                                  ("latent_patch_size_xy", latent_patch_size_xy, latent_resolution_xy),
                                  ("latent_patch_size_t", latent_patch_size_t, latent_resolution_t),
                                  ("enc_num_heads", enc_num_heads, enc_embed_dim),
                                  ("dec_num_heads", dec_num_heads, dec_embed_dim)):
            if whole % part or part > whole:
                raise ValueError(f"{name}={part} must divide {whole}")
        self.video_shape = (T, H, W)
        self.enc_embed_dim, self.enc_num_heads = enc_embed_dim, enc_num_heads
        self.enc_patch_num_layers, self.enc_num_layers = enc_patch_num_layers, enc_num_layers
        self.dec_embed_dim, self.dec_num_heads, self.dec_num_layers = dec_embed_dim, dec_num_heads, dec_num_layers
        self.latent_n_features, self.mlp_ratio, self.padding_mask = latent_n_features, mlp_ratio, padding_mask
        self.latent_xy, self.latent_t = latent_resolution_xy, latent_resolution_t
        self.enc_patch = (enc_patch_size_t, enc_patch_size_xy, enc_patch_size_xy)
        self.enc_grid = (T // enc_patch_size_t, H // enc_patch_size_xy, W // enc_patch_size_xy)
        self.num_memory_tokens = math.prod(self.enc_grid)
        self.query_patch_xy = (latent_patch_size_xy, latent_patch_size_xy)
        self.query_patch_t = (latent_patch_size_t, latent_patch_size_xy)
        self.dec_patch = (dec_patch_size_t, dec_patch_size_xy, dec_patch_size_xy)
        self.dec_grid = (T // dec_patch_size_t, H // dec_patch_size_xy, W // dec_patch_size_xy)
        self.patch_values = math.prod(self.dec_patch) * 3

        c = latent_n_features
        self.weight_tokens_xy = nn.Parameter(torch.randn(1, latent_resolution_xy, latent_resolution_xy, c))
        self.weight_tokens_yt = nn.Parameter(torch.randn(1, latent_resolution_t, latent_resolution_xy, c))
        self.weight_tokens_xt = nn.Parameter(torch.randn(1, latent_resolution_t, latent_resolution_xy, c))
        self.encoder = CoordTokEncoder(self)
        self.decoder = CoordTokDecoder(self)

    # ---- encoder ---------------------------------------------------------------------------
    def _memory_padding(self, n_frames, batch: int, device):
        tp, hp, wp = self.enc_grid
        pt = self.enc_patch[0]
        n = torch.as_tensor(n_frames, device=device).reshape(-1).long()
        if n.numel() != batch:
            raise ValueError(f"n_frames must hold one length per video ({batch}), got {tuple(n.shape)}")
        t_idx = torch.arange(tp, device=device)[None, :]
        if self.padding_mask == "official":
            padded = (t_idx >= (n // pt)[:, None]).float()
            return padded.repeat_interleave(hp * wp, dim=1)[:, None, None, :], None
        n_valid = ((n + pt - 1) // pt).clamp(1, tp)
        keep = (t_idx < n_valid[:, None]).repeat_interleave(hp * wp, dim=1)
        return None, keep[:, None, None, :]

    def encode(self, video, n_frames=None):
        if video.ndim != 5 or tuple(video.shape[1:]) != self.video_shape + (3,):
            raise ValueError(f"video must be (B, {', '.join(map(str, self.video_shape))}, 3), got {tuple(video.shape)}")
        batch = video.shape[0]
        if n_frames is None:
            n_frames = torch.full((batch,), self.video_shape[0], dtype=torch.long)
        enc = self.encoder
        memory = enc.encoder(video) + enc.cross_pos_emb
        bias, mask = self._memory_padding(n_frames, batch, video.device)
        if bias is not None:
            bias = bias.to(memory.dtype)
        tokens = (self.weight_tokens_xy, self.weight_tokens_yt, self.weight_tokens_xt)
        embeds = (enc.patch_embeds_xy, enc.patch_embeds_yt, enc.patch_embeds_xt)
        q = torch.cat([e(t.permute(0, 3, 1, 2)) for e, t in zip(embeds, tokens)], dim=1)
        x = enc.transformer(q.expand(batch, -1, -1), memory, bias, mask)

        c = self.latent_n_features
        grids = [(self.latent_xy, self.latent_xy, self.query_patch_xy),
                 (self.latent_t, self.latent_xy, self.query_patch_t),
                 (self.latent_t, self.latent_xy, self.query_patch_t)]
        heads = (enc.projectors_xy, enc.projectors_yt, enc.projectors_xt)
        planes, start = [], 0
        for proj, (r1, r2, (p1, p2)) in zip(heads, grids):
            gh, gw = r1 // p1, r2 // p2
            f = proj(x[:, start:start + gh * gw])  # (B, gh*gw, p1*p2*C)
            start += gh * gw
            f = f.reshape(batch, gh, gw, p1, p2, c).permute(0, 1, 3, 2, 4, 5)
            planes.append(f.reshape(batch, r1, r2, c))
        return tuple(planes)

    # ---- decoder ---------------------------------------------------------------------------
    def _position_index(self, coords):
        sizes = torch.tensor(self.dec_grid, device=coords.device)
        idx = torch.round(coords.float() * (sizes - 1).float()).long()
        idx = torch.minimum(idx.clamp(min=0), sizes - 1)
        return (idx[..., 0] * self.dec_grid[1] + idx[..., 1]) * self.dec_grid[2] + idx[..., 2]

    def decode(self, planes, coords):
        z_xy, z_yt, z_xt = planes
        if coords.ndim != 3 or coords.shape[-1] != 3:
            raise ValueError(f"coords must be (B, N, 3) = (t, x, y), got {tuple(coords.shape)}")
        t, x, y = coords[..., 0], coords[..., 1], coords[..., 2]
        features = torch.cat([_bilinear(z_xy, x, y), _bilinear(z_yt, t, y), _bilinear(z_xt, t, x)], dim=-1)
        tr = self.decoder.transformer
        table = tr.pos_embed.reshape(-1, tr.pos_embed.shape[-1])
        h = tr.patch_embed(features) + table[self._position_index(coords)]
        for layer in tr.layers:
            h = layer(h)
        return self.decoder.projector(tr.norm(h))

    def forward(self, video, n_frames, coords):
        return self.decode(self.encode(video, n_frames), coords)

    # ---- full videos -----------------------------------------------------------------------
    def patch_coords(self, num_frames: Optional[int] = None, device=None):
        """All patch coordinates of the first num_frames frames, t-major then x then y: (N, 3)."""
        T = self.video_shape[0]
        num_frames = T if num_frames is None else int(num_frames)
        if not 1 <= num_frames <= T:
            raise ValueError(f"num_frames must be in [1, {T}], got {num_frames}")
        num_t = -(-num_frames // self.dec_patch[0])
        axes = [torch.arange(n, device=device) for n in (num_t,) + self.dec_grid[1:]]
        idx = torch.stack([a.reshape(-1) for a in torch.meshgrid(*axes, indexing="ij")], dim=-1)
        denom = torch.tensor([max(n - 1, 1) for n in self.dec_grid], dtype=torch.float32, device=device)
        return idx.float() / denom

    def decode_video(self, planes, num_frames: Optional[int] = None, points_per_call: Optional[int] = None):
        """(B, num_frames, H, W, 3): every patch decoded in one joint pass, or in contiguous
        chunks of points_per_call (the official slicing, with the remainder decoded)."""
        batch = planes[0].shape[0]
        T = self.video_shape[0]
        num_frames = T if num_frames is None else int(num_frames)
        coords = self.patch_coords(num_frames, planes[0].device).expand(batch, -1, -1)
        n = coords.shape[1]
        step = n if points_per_call is None else int(points_per_call)
        if step <= 0:
            raise ValueError(f"points_per_call must be positive, got {step}")
        values = torch.cat([self.decode(planes, coords[:, s:s + step]) for s in range(0, n, step)], dim=1)
        pt, px, py = self.dec_patch
        _, gx, gy = self.dec_grid
        num_t = n // (gx * gy)
        v = values.reshape(batch, num_t, gx, gy, pt, px, py, 3).permute(0, 1, 4, 2, 5, 3, 6, 7)
        return v.reshape(batch, num_t * pt, gx * px, gy * py, 3)[:, :num_frames]


def load_official_checkpoint(model: CoordTok, checkpoint, strict: bool = True):
    """Loads an official checkpoint (path, file dict or state_dict) into `model`.

    `ckpt['model']` is used when present, the DDP `module.` prefix is stripped and the frozen
    LPIPS keys of stage-2 files are skipped; everything else must match (strict).
    """
    if not isinstance(checkpoint, dict):
        checkpoint = torch.load(checkpoint, map_location="cpu", weights_only=True)
    sd = checkpoint.get("model", checkpoint) if isinstance(checkpoint.get("model"), dict) else checkpoint
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    sd = {k: v for k, v in sd.items() if not k.startswith(LPIPS_PREFIX)}
    return model.load_state_dict(sd, strict=strict)
