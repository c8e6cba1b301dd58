"""Transformer building blocks shared by the CoordTok encoder and decoder.

Conventions
* Parameters are float32 and carry logical axis names (`out_sharding` metadata, read by
  `nnx.get_partition_spec`); the trainer maps them to mesh axes with the rules in the config.
  Names: 'embed' (model width), 'mlp' (MLP hidden), 'qkv' (packed q/k/v outputs), 'heads'
  (attention output rows), 'norm' (LayerNorm vectors), 'layers' (stacked blocks).
* Initialisation is PyTorch's default, as the official model uses no custom init:
  Linear/Conv weights and biases U(-1/sqrt(fan_in), 1/sqrt(fan_in)); the packed in_proj of
  nn.MultiheadAttention is Xavier-uniform over the packed (3D, D) matrix.
* Attention is `plain_attention` (XLA, heads next to the batch) or, by config, the cuDNN flash
  kernel on GPUs or query-chunked attention; logits are scaled by head_dim**-0.5 before the
  additive bias, as in PyTorch.
* Layers of one kind form a `Stack`, in one of two parameter layouts chosen by
  `config.model.scan_layers` (as MaxText's `scan_layers`): True (default), one parameter tree with
  a leading 'layers' axis run with `jax.lax.scan` (one compiled layer: short compiles of deep
  models on accelerators); False, one tree per layer (`blocks.0`, `blocks.1`, ...) run as a Python
  loop, which spares the scan's stacked residual and gradient buffers (on CPU the S step is ~20%
  faster: benchmarks/RESULTS.md). Both run the same block function, optionally rematerialised with
  a named `jax.checkpoint_policies` policy; checkpoints hold the layout they were trained with and
  conversion to/from the official format reads and writes either.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from coordtok_jax import sharding


@dataclasses.dataclass(frozen=True)
class Compute:
    """How layers compute: dtype of activations/matmuls, attention kernel, remat policy, and the
    logical axis rules their activations are constrained with (empty: no constraints)."""

    dtype: jnp.dtype = jnp.float32
    attention_impl: Optional[str] = None
    remat_policy: str = "none"
    query_chunk: int = 1024  # for attention_impl='chunked'
    rules: tuple = ()
    scan_unroll: int = 1  # layers per iteration of a Stack's scan
    scan_layers: bool = True  # Stack parameter layout: stacked + lax.scan, or one tree per layer

    def constrain(self, x: jax.Array, names) -> jax.Array:
        """Pins `x` to its logical names' sharding under the context mesh (see sharding.py)."""
        return sharding.constrain(x, names, self.rules)


def attention(q, k, v, *, bias, mask, scale, compute: Compute):
    """Multi-head attention on (B, N, H, hd) inputs -> (B, Nq, H, hd).

    * None / 'xla' (default): `plain_attention`, XLA on any backend.
    * 'cudnn': `jax.nn.dot_product_attention`'s cuDNN flash kernel (GPU, bf16/fp16).
    * 'splash': the Pallas TPU splash-attention kernel (models/splash.py; 'splash_interpret' runs
      it in Pallas's interpreter, on any backend, for tests). A call with an additive `bias` (the
      official +1 on padded memory tokens) stays on plain attention: the kernel has no bias.
    * 'chunked': memory-efficient attention for long sequences on backends without a fused kernel
      (CPU, or GPUs without cuDNN flash attention): queries are processed in chunks of
      `compute.query_chunk` with lax.map, each against all keys, so the logits held at once are
      (B, H, chunk, Nk) instead of (B, H, Nq, Nk). Each query's softmax still covers all keys: the
      result is the same as unchunked attention up to float rounding.
    """
    impl = compute.attention_impl
    if impl == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=scale, implementation="cudnn")
    if impl in ("splash", "splash_interpret") and bias is None:  # the official +1 bias: XLA (see splash.py)
        from coordtok_jax.models.splash import sharded_splash_attention

        return sharded_splash_attention(q, k, v, key_mask=mask, scale=scale, rules=compute.rules,
                                        interpret=impl == "splash_interpret")
    c = compute.query_chunk
    nq = q.shape[1]
    if impl != "chunked" or nq <= c:
        return plain_attention(q, k, v, bias=bias, mask=mask, scale=scale)
    n_chunks = -(-nq // c)
    qp = jnp.pad(q, ((0, 0), (0, n_chunks * c - nq), (0, 0), (0, 0)))
    chunks = qp.reshape((q.shape[0], n_chunks, c) + q.shape[2:]).swapaxes(0, 1)
    out = jax.lax.map(lambda qc: plain_attention(qc, k, v, bias=bias, mask=mask, scale=scale), chunks)
    return out.swapaxes(0, 1).reshape(qp.shape)[:, :nq]


def plain_attention(q, k, v, *, bias=None, mask=None, scale: float):
    """softmax(q k^T * scale + bias, masked) v with q, k, v (B, N, H, hd) -> (B, Nq, H, hd).

    The heads are moved next to the batch before the two matmuls, so both are plain batched
    matmuls over (B, H) and the (Nq, Nk) logits and probabilities are made and read in the layout
    the softmax wants: transposing q, k, v and the output costs O(N hd), where letting XLA pick
    the layout of a (B, N, H, hd) contraction transposes the O(Nq Nk) probabilities (measured on
    CPU: benchmarks/RESULTS.md). Logits and softmax in float32, as jax.nn.dot_product_attention;
    `bias` and `mask` broadcast to (B, H, Nq, Nk), masked logits get the most negative float32.
    """
    qh, kh, vh = (x.transpose(0, 2, 1, 3) for x in (q, k, v))
    logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + bias.astype(jnp.float32)
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bhkd->bhqd", probs, vh).transpose(0, 2, 1, 3)


def named(init: Callable, axes: Sequence[Optional[str]]) -> Callable:
    """Attaches logical axis names to an initializer (metadata only; never shards eagerly)."""
    return nnx.with_partitioning(init, tuple(axes), eager_sharding=False)


def torch_uniform(fan_in: int) -> Callable:
    """PyTorch's default Linear/Conv bias (and weight) init: U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# kaiming_uniform(a=sqrt(5)) == U(-1/sqrt(fan_in), 1/sqrt(fan_in)), fan_in from the kernel shape.
TORCH_KERNEL_INIT = nnx.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")
XAVIER_UNIFORM = nnx.initializers.xavier_uniform()


def normal(stddev: float) -> Callable:
    def init(key, shape, dtype=jnp.float32):
        return stddev * jax.random.normal(key, shape, dtype)

    return init


def dense(
    din: int,
    dout: int,
    axes: tuple[Optional[str], Optional[str]],
    compute: Compute,
    rngs: nnx.Rngs,
    *,
    use_bias: bool = True,
    kernel_init: Callable = TORCH_KERNEL_INIT,
) -> nnx.Linear:
    return nnx.Linear(
        din,
        dout,
        use_bias=use_bias,
        dtype=compute.dtype,
        param_dtype=jnp.float32,
        kernel_init=named(kernel_init, axes),
        bias_init=named(torch_uniform(din), axes[1:]),
        rngs=rngs,
    )


def layer_norm(dim: int, eps: float, compute: Compute, rngs: nnx.Rngs) -> nnx.LayerNorm:
    return nnx.LayerNorm(
        dim,
        epsilon=eps,
        dtype=compute.dtype,
        param_dtype=jnp.float32,
        scale_init=named(nnx.initializers.ones_init(), ("norm",)),
        bias_init=named(nnx.initializers.zeros_init(), ("norm",)),
        rngs=rngs,
    )


def patch_conv(
    cin: int, dout: int, patch: Sequence[int], compute: Compute, rngs: nnx.Rngs
) -> nnx.Conv:
    """Conv with kernel = stride = patch (VALID): the official Conv2d/Conv3d patch embeddings."""
    patch = tuple(int(p) for p in patch)
    fan_in = cin * math.prod(patch)
    return nnx.Conv(
        cin,
        dout,
        kernel_size=patch,
        strides=patch,
        padding="VALID",
        dtype=compute.dtype,
        param_dtype=jnp.float32,
        kernel_init=named(TORCH_KERNEL_INIT, (None,) * len(patch) + (None, "embed")),
        bias_init=named(torch_uniform(fan_in), ("embed",)),
        rngs=rngs,
    )


class Attention(nnx.Module):
    """Multi-head attention with a packed q/k/v projection (kernel (D, 3D) = [Wq | Wk | Wv]).

    Self-attention when `memory` is None, otherwise queries from `x` and keys/values from
    `memory` (torch nn.MultiheadAttention(q, mem, mem)). Heads are contiguous slices of D.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        compute: Compute,
        rngs: nnx.Rngs,
        *,
        qkv_bias: bool,
        out_bias: bool,
        qkv_init: Callable = TORCH_KERNEL_INIT,
    ):
        self.dim = dim
        self.num_heads = num_heads
        self.compute = compute
        self.qkv = dense(dim, 3 * dim, ("embed", "qkv"), compute, rngs, use_bias=qkv_bias, kernel_init=qkv_init)
        self.proj = dense(dim, dim, ("heads", "embed"), compute, rngs, use_bias=out_bias)

    def _project(self, x: jax.Array, first: int, count: int) -> list[jax.Array]:
        """x (B, N, D) -> `count` of [q, k, v] starting at `first`, each (B, N, H, hd).

        One matmul with the packed kernel viewed as (D, 3, H, hd), so each projection comes out
        per head: with heads split over 'tensor' every chip computes only its heads.
        """
        d, h = self.dim, self.num_heads
        dtype = self.compute.dtype
        kernel = self.qkv.kernel[...].reshape(d, 3, h, d // h)[:, first:first + count]
        y = jnp.einsum("bnd,dshk->bnshk", x.astype(dtype), kernel.astype(dtype))
        if self.qkv.bias is not None:
            y = y + self.qkv.bias[...].reshape(3, h, d // h)[first:first + count].astype(dtype)
        return [self.compute.constrain(y[:, :, i], sharding.BLHK) for i in range(count)]

    def __call__(
        self,
        x: jax.Array,
        memory: Optional[jax.Array] = None,
        *,
        bias: Optional[jax.Array] = None,
        mask: Optional[jax.Array] = None,
    ) -> jax.Array:
        if memory is None:
            q, k, v = self._project(x, 0, 3)
        else:
            (q,) = self._project(x, 0, 1)
            k, v = self._project(memory, 1, 2)
        d, h = self.dim, self.num_heads
        out = attention(
            q,
            k,
            v,
            bias=None if bias is None else bias.astype(q.dtype),
            mask=mask,
            scale=(d // h) ** -0.5,
            compute=self.compute,
        )
        out = self.compute.constrain(out, sharding.BLHK)
        return self.compute.constrain(self.proj(out.reshape(out.shape[:-2] + (d,))), sharding.BLD)


class Mlp(nnx.Module):
    """Linear -> exact (erf) GELU -> Linear, as timm's Mlp and the official nn.Sequential MLP."""

    def __init__(self, dim: int, hidden: int, compute: Compute, rngs: nnx.Rngs):
        self.fc1 = dense(dim, hidden, ("embed", "mlp"), compute, rngs)
        self.fc2 = dense(hidden, dim, ("mlp", "embed"), compute, rngs)
        self.compute = compute

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.compute.constrain(jax.nn.gelu(self.fc1(x), approximate=False), sharding.BLF)
        return self.compute.constrain(self.fc2(hidden), sharding.BLD)


class ViTBlock(nnx.Module):
    """timm `Block`: x += attn(LN1(x)); x += mlp(LN2(x)). LayerNorm eps 1e-5."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, qkv_bias: bool, compute: Compute, rngs: nnx.Rngs):
        self.norm1 = layer_norm(dim, 1e-5, compute, rngs)
        self.attn = Attention(dim, num_heads, compute, rngs, qkv_bias=qkv_bias, out_bias=True)
        self.norm2 = layer_norm(dim, 1e-5, compute, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), compute, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class CrossSelfBlock(nnx.Module):
    """The official ConditionMaskBlock (LayerNorm eps 1e-6, bias-free nn.MultiheadAttention):

    x += CrossAttn(LN1(x), mem, mem, memory padding); x += SelfAttn(LN2(x)); x += MLP(LN3(x)).
    """

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float, compute: Compute, rngs: nnx.Rngs):
        mha = dict(qkv_bias=False, out_bias=False, qkv_init=XAVIER_UNIFORM)
        self.norm1 = layer_norm(dim, 1e-6, compute, rngs)
        self.cross_attn = Attention(dim, num_heads, compute, rngs, **mha)
        self.norm2 = layer_norm(dim, 1e-6, compute, rngs)
        self.self_attn = Attention(dim, num_heads, compute, rngs, **mha)
        self.norm3 = layer_norm(dim, 1e-6, compute, rngs)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), compute, rngs)

    def __call__(self, x, memory, memory_bias=None, memory_mask=None):
        x = x + self.cross_attn(self.norm1(x), memory, bias=memory_bias, mask=memory_mask)
        x = x + self.self_attn(self.norm2(x))
        return x + self.mlp(self.norm3(x))


class Stack(nnx.Module):
    """`num_layers` copies of a block: parameters stacked on a leading 'layers' axis and scanned
    (`compute.scan_layers`, default), or one block per layer in `blocks.{i}` run in a loop.

    `__call__(x, *args)` runs the blocks over `x` (B, L, D); `args` are passed unchanged to every
    block. The carry is pinned to the residual-stream sharding at each block's entry and exit.
    """

    def __init__(self, make_block: Callable[[nnx.Rngs], nnx.Module], num_layers: int, compute: Compute,
                 rngs: nnx.Rngs):
        if compute.scan_layers:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def create(r: nnx.Rngs) -> nnx.Module:
                return make_block(r)

            # nnx.vmap would turn the logical names into shardings of whatever mesh is set; shardings
            # come from the rules (sharding.py), so the stack is built as if no mesh were set.
            with jax.sharding.use_abstract_mesh(sharding.NO_MESH):
                self.blocks = create(rngs)
        else:
            self.blocks = nnx.List([make_block(rngs) for _ in range(num_layers)])
        self.num_layers = num_layers
        self.remat_policy = compute.remat_policy
        self.compute = compute

    def __call__(self, x: jax.Array, *args) -> jax.Array:
        pin = lambda t: self.compute.constrain(t, sharding.BLD)  # the residual stream, batch-split
        scanned = self.compute.scan_layers

        def layer_fn(graphdef):  # one block as a function of (carry, its parameters)
            def body(carry, state):
                return pin(nnx.merge(graphdef, state)(pin(carry), *args)), None

            if self.remat_policy == "none":
                return body
            # Inside lax.scan CSE cannot undo the remat; in the Python loop it could.
            return jax.checkpoint(body, policy=getattr(jax.checkpoint_policies, self.remat_policy),
                                  prevent_cse=not scanned)

        if not scanned:
            for block in self.blocks:
                graphdef, state = nnx.split(block)
                x, _ = layer_fn(graphdef)(x, state)
            return x
        graphdef, state = nnx.split(self.blocks)
        x, _ = jax.lax.scan(layer_fn(graphdef), x, state, unroll=min(self.compute.scan_unroll, self.num_layers))
        return x
