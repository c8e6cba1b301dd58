"""Attention through the Pallas TPU splash-attention kernel (jax.experimental.pallas.ops.tpu).

`splash_attention(q, k, v, key_mask=None, scale=...)` takes the model's (B, N, H, hd) layout and
returns what `layers.plain_attention` returns, computed blockwise in VMEM: the (Nq, Nk) logits are
never materialised in HBM, which is what lets the paper's one-pass decode of a 128-frame video
(32,768 jointly attending points) and the L train steps fit a chip (benchmarks/RESULTS.md).

* Sequence lengths are padded to the kernel's block sizes; padded keys are excluded through the
  kernel's segment ids (keys of segment 1 are invisible to queries of segment 0), and so are the
  keys a boolean `key_mask` (B, 1, 1, Nk) drops ('exclude' padding). Padded query rows are cut off.
* The kernel has no additive bias: the official +1 logit on padded memory tokens ('official'
  padding, the encoder's cross-attention) stays on plain attention (layers.attention decides).
* The kernel takes queries already scaled; heads are vmapped per batch element.
* `interpret=True` runs the same kernel in Pallas's interpreter on any backend (tests on CPU).
* Under a mesh (`sharded_splash_attention`) the kernel runs per chip in a shard_map: batch and
  heads split as the rules split `activation_batch` / `activation_heads`, sequences whole (GSPMD
  cannot partition a Mosaic kernel by itself).
"""

from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from coordtok_jax import sharding

BLOCK = 128  # q / kv block of the kernel (the TPU's lane width; sequences are padded to it)


def _pad_to(x: jax.Array, axis: int, multiple: int) -> jax.Array:
    n = x.shape[axis]
    extra = -n % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths)


def splash_attention(q, k, v, *, key_mask: Optional[jax.Array] = None, scale: float, block: int = BLOCK,
                     interpret: bool = False) -> jax.Array:
    """softmax(q k^T * scale, keys kept by key_mask) v; q, k, v (B, N, H, hd) -> (B, Nq, H, hd)."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as kernel_lib
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as mask_lib

    b, nq, h, _ = q.shape
    nk = k.shape[1]
    qh = _pad_to((q * jnp.asarray(scale, q.dtype)).transpose(0, 2, 1, 3), 2, block)
    kh, vh = (_pad_to(x.transpose(0, 2, 1, 3), 2, block) for x in (k, v))
    nq_p, nk_p = qh.shape[2], kh.shape[2]
    keep = jnp.arange(nk_p)[None, :] < nk  # (1, Nk_p): padding keys are dropped
    if key_mask is not None:
        keep = keep & _pad_to(jnp.broadcast_to(key_mask, (b, 1, 1, nk)).reshape(b, nk), 1, block)
    segments = kernel_lib.SegmentIds(q=jnp.zeros((b, nq_p), jnp.int32),
                                     kv=jnp.broadcast_to(jnp.where(keep, 0, 1), (b, nk_p)).astype(jnp.int32))
    sizes = kernel_lib.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    mask = mask_lib.MultiHeadMask([mask_lib.FullMask((nq_p, nk_p)) for _ in range(h)])
    kernel = kernel_lib.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1, interpret=interpret)
    out = jax.vmap(kernel)(qh, kh, vh, segments)
    return out[:, :, :nq].transpose(0, 2, 1, 3)


def sharded_splash_attention(q, k, v, *, key_mask: Optional[jax.Array] = None, scale: float, rules=(),
                             interpret: bool = False) -> jax.Array:
    """`splash_attention` per chip under the context mesh (as is without one)."""
    mesh = jax.sharding.get_abstract_mesh()
    run = lambda q, k, v, *m: splash_attention(q, k, v, key_mask=m[0] if m else None, scale=scale,
                                               interpret=interpret)
    if mesh.empty or mesh.size == 1:
        return run(q, k, v, *([] if key_mask is None else [key_mask]))
    spec = sharding.logical_to_mesh(sharding.BLHK, q.shape, rules, mesh) if rules else PartitionSpec()
    batch, heads = (tuple(spec) + (None,) * 4)[0], (tuple(spec) + (None,) * 4)[2]
    qkv = PartitionSpec(batch, None, heads, None)  # sequences whole on every chip
    args, specs = [q, k, v], [qkv, qkv, qkv]
    if key_mask is not None:
        args.append(key_mask)
        specs.append(PartitionSpec(batch if key_mask.shape[0] > 1 else None, None, None, None))
    return jax.shard_map(run, mesh=mesh, in_specs=tuple(specs), out_specs=qkv, check_vma=False)(*args)
