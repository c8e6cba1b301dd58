"""An independent float64 NumPy implementation of the official CoordTok forward (spec 3-5).

Written from the spec with explicit loops over tokens, patches and points, sharing nothing with
the package except the parameter tree it reads (nested dict of arrays as `nnx.State.to_pure_dict`
returns it, stacked layers on a leading axis).
"""

from __future__ import annotations

import math

import numpy as np
from scipy.special import erf


def f64(tree):
    if isinstance(tree, dict):
        return {k: f64(v) for k, v in tree.items()}
    return np.asarray(tree, np.float64)


def layer(stack: dict, i: int) -> dict:
    if isinstance(stack, dict):
        return {k: layer(v, i) for k, v in stack.items()}
    return stack[i]


def layer_norm(x, p, eps):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * p["scale"] + p["bias"]


def linear(x, p):
    y = x @ p["kernel"]
    return y + p["bias"] if "bias" in p else y


def gelu(x):
    return 0.5 * x * (1.0 + erf(x / math.sqrt(2.0)))


def softmax(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def attention(xq, xkv, p, heads, additive=None, keep=None):
    """Packed-projection multi-head attention; additive (B, S) added to logits, keep (B, S) bool."""
    d = xq.shape[-1]
    w = p["qkv"]["kernel"]
    b = p["qkv"].get("bias", np.zeros(3 * d))
    q = xq @ w[:, :d] + b[:d]
    k = xkv @ w[:, d : 2 * d] + b[d : 2 * d]
    v = xkv @ w[:, 2 * d :] + b[2 * d :]
    hd = d // heads
    out = np.zeros_like(q)
    for h in range(heads):
        sl = slice(h * hd, (h + 1) * hd)
        logits = q[..., sl] @ np.swapaxes(k[..., sl], -1, -2) * hd**-0.5
        if additive is not None:
            logits = logits + additive[:, None, :]
        if keep is not None:
            logits = np.where(keep[:, None, :], logits, -np.inf)
        out[..., sl] = softmax(logits) @ v[..., sl]
    return linear(out, p["proj"])


def mlp(x, p):
    return linear(gelu(linear(x, p["fc1"])), p["fc2"])


def vit_block(x, p, heads):
    h = layer_norm(x, p["norm1"], 1e-5)
    x = x + attention(h, h, p["attn"], heads)
    return x + mlp(layer_norm(x, p["norm2"], 1e-5), p["mlp"])


def patch_embed(x, p, patch):
    """Conv with kernel = stride = patch on channel-last x (B, *spatial, Cin), explicit loops."""
    kernel, bias = p["kernel"], p["bias"]
    grid = [s // k for s, k in zip(x.shape[1:-1], patch)]
    tokens = []
    for idx in np.ndindex(*grid):  # row-major: first spatial axis outermost
        sl = tuple(slice(i * k, (i + 1) * k) for i, k in zip(idx, patch))
        block = x[(slice(None),) + sl]  # (B, *patch, Cin)
        axes = (list(range(1, block.ndim)), list(range(kernel.ndim - 1)))
        tokens.append(np.tensordot(block, kernel, axes=axes) + bias)
    return np.stack(tokens, axis=1)


def encode(params, cfg, video, n_frames, mode="official"):
    p = f64(params)
    video = np.asarray(video, np.float64)
    n_frames = np.asarray(n_frames).reshape(-1)
    T, H, W = cfg.video_shape
    pt, pxy = cfg.enc_patch_size_t, cfg.enc_patch_size_xy
    tp, hp, wp = T // pt, H // pxy, W // pxy
    enc = p["encoder"]
    vit = enc["encoder"]

    x = patch_embed(video, vit["patch_embed"], (pt, pxy, pxy)) + vit["pos_emb"]
    cls = np.broadcast_to(vit["cls_token"], (x.shape[0], 1, x.shape[-1]))
    x = np.concatenate([cls, x], axis=1)
    for i in range(cfg.enc_patch_num_layers):
        x = vit_block(x, layer(vit["layers"]["blocks"], i), cfg.enc_num_heads)
    memory = layer_norm(x[:, 1:], vit["norm"], 1e-5) + enc["cross_pos_emb"]

    additive, keep = None, None
    token_t = np.array([t for t in range(tp) for _ in range(hp * wp)])
    if mode == "official":
        additive = (token_t[None, :] >= (n_frames // pt)[:, None]).astype(np.float64)
    else:
        valid_t = np.clip(-(-n_frames // pt), 1, tp)
        keep = token_t[None, :] < valid_t[:, None]

    C = cfg.latent_n_features
    qs = []
    for name, psz in (("xy", (cfg.latent_patch_size_xy,) * 2), ("yt", (cfg.latent_patch_size_t, cfg.latent_patch_size_xy)),
                      ("xt", (cfg.latent_patch_size_t, cfg.latent_patch_size_xy))):
        qs.append(patch_embed(p[f"weight_tokens_{name}"], enc[f"patch_embeds_{name}"], psz))
    counts = [q.shape[1] for q in qs]
    x = np.broadcast_to(np.concatenate(qs, axis=1), (video.shape[0], sum(counts), memory.shape[-1])).copy()

    tr = enc["transformer"]
    for i in range(cfg.enc_num_layers):
        lp = layer(tr["layers"]["blocks"], i)
        x = x + attention(layer_norm(x, lp["norm1"], 1e-6), memory, lp["cross_attn"], cfg.enc_num_heads, additive, keep)
        h = layer_norm(x, lp["norm2"], 1e-6)
        x = x + attention(h, h, lp["self_attn"], cfg.enc_num_heads)
        x = x + mlp(layer_norm(x, lp["norm3"], 1e-6), lp["mlp"])
    x = layer_norm(x, tr["norm"], 1e-6)

    planes = []
    start = 0
    rxy, rt = cfg.latent_resolution_xy, cfg.latent_resolution_t
    for name, (r1, r2), (p1, p2), n in zip(
        ("xy", "yt", "xt"), ((rxy, rxy), (rt, rxy), (rt, rxy)),
        ((cfg.latent_patch_size_xy,) * 2, (cfg.latent_patch_size_t, cfg.latent_patch_size_xy),
         (cfg.latent_patch_size_t, cfg.latent_patch_size_xy)), counts):
        feats = linear(x[:, start : start + n], enc[f"projectors_{name}"])
        start += n
        gw = r2 // p2
        plane = np.zeros((x.shape[0], r1, r2, C))
        for tok in range(n):
            i, j = divmod(tok, gw)
            for a in range(p1):
                for b in range(p2):
                    plane[:, i * p1 + a, j * p2 + b, :] = feats[:, tok, (a * p2 + b) * C : (a * p2 + b + 1) * C]
        planes.append(plane)
    return planes


def bilinear(plane, a, b):
    """Official get_embedding for one point: plane (R1, R2, C), a, b scalars in [0, 1]."""
    r1, r2, _ = plane.shape
    sa, sb = a * (r1 - 1), b * (r2 - 1)
    i0a, i0b = int(math.floor(sa)), int(math.floor(sb))
    i1a, i1b = min(i0a + 1, r1 - 1), min(i0b + 1, r2 - 1)
    fa, fb = sa - i0a, sb - i0b
    c0 = plane[i0a, i0b] * (1 - fb) + plane[i0a, i1b] * fb
    c1 = plane[i1a, i0b] * (1 - fb) + plane[i1a, i1b] * fb
    return c0 * (1 - fa) + c1 * fa


def gather(planes, coords):
    z_xy, z_yt, z_xt = (np.asarray(z, np.float64) for z in planes)
    coords = np.asarray(coords, np.float64)
    B, N, _ = coords.shape
    out = np.zeros((B, N, 3 * z_xy.shape[-1]))
    for bi in range(B):
        for n in range(N):
            t, x, y = coords[bi, n]
            out[bi, n] = np.concatenate([bilinear(z_xy[bi], x, y), bilinear(z_yt[bi], t, y), bilinear(z_xt[bi], t, x)])
    return out


def decode(params, cfg, planes, coords):
    p = f64(params)
    dec = p["decoder"]
    tr = dec["transformer"]
    T, H, W = cfg.video_shape
    sizes = (T // cfg.dec_patch_size_t, H // cfg.dec_patch_size_xy, W // cfg.dec_patch_size_xy)
    coords = np.asarray(coords, np.float64)
    x = linear(gather(planes, coords), tr["patch_embed"])
    table = tr["pos_embed"][0]
    for bi in range(coords.shape[0]):
        for n in range(coords.shape[1]):
            ti, xi, yi = (int(round(c * (s - 1))) for c, s in zip(coords[bi, n], sizes))
            x[bi, n] += table[ti, xi, yi]
    for i in range(cfg.dec_num_layers):
        x = vit_block(x, layer(tr["layers"]["blocks"], i), cfg.dec_num_heads)
    return linear(layer_norm(x, tr["norm"], 1e-5), dec["projector"])
