"""Triplane SiT without torch: configs and validation, official counts / keys / shapes (SiT-L/2
via eval_shape), the sin-cos table, the official initialisation (zero output), a float64 NumPy
forward reference on non-square planes, label dropout / CFG, bf16, conversion round trips and
strict errors. The PyTorch side is in test_sit_torch.py."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import sit
from flax import nnx

from coordtok_jax.convert.coordtok import ConversionError
from coordtok_jax.convert.sit import (
    sit_from_official,
    sit_official_entries,
    sit_official_shapes,
    sit_to_official,
    unwrap_sit_checkpoint,
)
from coordtok_jax.models.config import ConfigError
from coordtok_jax.models.coordtok import count_params
from coordtok_jax.models.sit import (
    TriplaneSiT,
    count_sit_params,
    sincos_2d,
    sit_model_from_params,
    timestep_embedding,
    unpatchify,
    validate_sit,
)

SIZES = ["S/2", "B/2", "L/2", "XL/2", "tiny"]
forward = nnx.jit(lambda m, p, t, y, train=False, **kw: m(p, t, y, train=train, **kw), static_argnames="train")


def medium(**overrides):
    """Non-square yt/xt planes (12x8), odd head count, 3 blocks, 4 channels: catches axis swaps."""
    cfg = sit.model_config("tiny")
    cfg.update(dict(hidden_size=48, depth=3, num_heads=3, in_channels=4, latent_resolution_xy=8,
                    latent_resolution_t=12, **overrides))
    return cfg


def abstract_state(cfg):
    return nnx.to_pure_dict(nnx.state(nnx.eval_shape(lambda: TriplaneSiT(cfg, rngs=nnx.Rngs(0)))))


def random_tree(cfg, seed=0, scale=0.2):
    """Every value random (adaLN and final layers too, unlike the zero init); the fixed table kept."""
    rng = np.random.default_rng(seed)
    tree = jax.tree.map(lambda x: (scale * rng.standard_normal(x.shape)).astype(np.float32), abstract_state(cfg))
    g = validate_sit(cfg)
    tree["pos_embed_xy"] = sincos_2d(g.hidden_size, g.grids[0][0])[None]
    return tree


def inputs(cfg, batch=3, seed=1, labels=None):
    g = validate_sit(cfg)
    rng = np.random.default_rng(seed)
    planes = tuple(rng.standard_normal((batch,) + s).astype(np.float32) for s in g.plane_shapes)
    t = rng.uniform(0, 1, batch).astype(np.float32)
    y = np.zeros(batch, np.int32) if labels is None else np.asarray(labels, np.int32)
    return planes, t, y


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def _reference(reference_dir):
    return json.loads((reference_dir / "sit_L2_state_dict.json").read_text())


# ---- configuration ---------------------------------------------------------------------------

@pytest.mark.parametrize("size", SIZES)
def test_configs_validate(size):
    config = sit.get_config(size)
    g = sit.validate(config)
    want = {"S/2": (12, 384, 6), "B/2": (12, 768, 12), "L/2": (24, 1024, 16), "XL/2": (28, 1152, 16),
            "tiny": (2, 64, 2)}[size]
    assert (g.depth, g.hidden_size, g.num_heads, g.patch) == want + (2,)
    assert g.plane_shapes == (((8, 8, 8),) * 3 if size == "tiny" else ((16, 16, 8), (32, 16, 8), (32, 16, 8)))
    assert config.batch_size == (8 if size == "tiny" else 64) and config.optimizer.weight_decay == 0.0
    assert dict(config.logical_axis_rules)["embed"] == "fsdp" and config.data.source == "synthetic"


def test_L2_config_is_the_reference_one(reference_dir):
    ref, m = _reference(reference_dir)["config"], sit.model_config("L/2")
    assert [m.depth, m.hidden_size, m.patch_size, m.num_heads, m.mlp_ratio, m.in_channels] == \
        [ref["depth"], ref["hidden_size"], ref["patch_size"], ref["num_heads"], ref["mlp_ratio"], ref["in_channels"]]
    assert [m.latent_resolution_t, m.latent_resolution_xy] == ref["input_size"]
    assert (m.num_classes, m.class_dropout_prob, m.learn_sigma) == (ref["num_classes"], ref["class_dropout_prob"],
                                                                    ref["learn_sigma"])


@pytest.mark.parametrize("field,value,match", [
    ("latent_resolution_t", 7, "patch_size=2 must divide config.model.latent_resolution_t=7"),
    ("latent_resolution_xy", 9, "latent_resolution_xy=9"),
    ("num_heads", 3, "num_heads=3 must divide config.model.hidden_size=64"),
    ("hidden_size", 66, "hidden_size=66 must be a multiple of 4"),
    ("class_dropout_prob", 1.0, "class_dropout_prob"),
    ("learn_sigma", 1, "learn_sigma"),
    ("depth", 0, "depth must be a positive integer"),
    ("dtype", "float64", "dtype"),
    ("remat_policy", "sometimes", "remat_policy"),
])
def test_validation_names_the_field(field, value, match):
    cfg = sit.model_config("tiny").to_dict()  # a plain dict: ConfigDict would refuse some types
    cfg[field] = value
    with pytest.raises(ConfigError, match=match):
        validate_sit(cfg)
    bad = sit.model_config("tiny")
    bad.latent_resolution_xy = 5
    with pytest.raises(ConfigError, match="latent_resolution_xy=5"):
        TriplaneSiT(bad, rngs=nnx.Rngs(0))
    cfg = sit.model_config("tiny").to_dict()
    del cfg["num_classes"]
    with pytest.raises(ConfigError, match="config.model.num_classes is missing"):
        validate_sit(cfg)


# ---- official layout -------------------------------------------------------------------------

def test_L2_counts_keys_and_shapes_equal_the_reference(reference_dir):
    ref = _reference(reference_dir)
    cfg = sit.model_config("L/2")
    model = nnx.eval_shape(lambda: TriplaneSiT(cfg, rngs=nnx.Rngs(0)))
    assert count_sit_params(model) == ref["total_numel"] == 461_462_720
    assert count_params(model) == count_sit_params(model, include_buffers=False) == ref["trainable_numel"]
    shapes = sit_official_shapes(cfg)
    assert list(shapes.items()) == [(k, tuple(s)) for k, s, _ in ref["state_dict"]]
    for level, name in ((1, "numel_by_top_module"), (2, "numel_by_2nd_level")):
        by = {}
        for k, s in shapes.items():
            prefix = ".".join(k.split(".")[:level])
            by[prefix] = by.get(prefix, 0) + math.prod(s)
        assert by == ref[name]
    assert [e.key for e in sit_official_entries(24) if e.path == ("pos_embed_xy",)] == ref["non_trainable_entries"]


def test_every_variable_has_logical_axis_names():
    model = nnx.eval_shape(lambda: TriplaneSiT(medium(), rngs=nnx.Rngs(0)))
    allowed = {None, "embed", "mlp", "qkv", "heads", "layers"}
    leaves = jax.tree.leaves(nnx.state(model), is_leaf=lambda x: isinstance(x, nnx.Variable))
    for var in leaves:
        names = var.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(var.shape) and set(names) <= allowed, var
    blocks = nnx.state(model)["blocks"]["blocks"]
    assert blocks["attn"]["qkv"]["kernel"].get_metadata()["out_sharding"] == ("layers", "embed", "qkv")


def test_sincos_table_matches_an_independent_computation():
    d, grid = 16, 4
    q = d // 4
    want = np.zeros((grid * grid, d))
    for i in range(grid):  # row
        for j in range(grid):  # column
            for k in range(q):
                w = 10000.0 ** (-k / q)
                want[i * grid + j, [k, q + k, 2 * q + k, 3 * q + k]] = [
                    math.sin(j * w), math.cos(j * w), math.sin(i * w), math.cos(i * w)]
    np.testing.assert_allclose(sincos_2d(d, grid), want, rtol=0, atol=1e-7)
    big = sincos_2d(1024, 8)  # the L/2 table: the first half encodes the column index
    assert big.dtype == np.float32 and big.shape == (64, 1024)
    np.testing.assert_array_equal(big[:8, 512:], np.broadcast_to(big[0, 512:], (8, 512)))  # row 0
    assert np.abs(big[1, :512] - big[0, :512]).max() > 0.1
    cols = np.tile(np.arange(8.0), 8)
    np.testing.assert_allclose(big[:, 0], np.sin(cols), atol=1e-7)
    np.testing.assert_allclose(big[:, 256 + 1], np.cos(cols * 10000 ** (-1 / 256)), atol=1e-7)
    # a rectangular grid (the yt / xt planes: Rt/p rows, Rxy/p columns), token n = row * cols + col
    rect = sincos_2d(d, (3, 5))
    for i in range(3):
        for j in range(5):
            k = np.arange(q)
            w = 10000.0 ** (-k / q)
            np.testing.assert_allclose(rect[i * 5 + j], np.concatenate(
                [np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)]), atol=1e-6)
    t = np.array([0.0, 0.25, 1.0], np.float32)
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t)),
                               np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1), atol=2e-7)


# ---- initialisation and forward --------------------------------------------------------------

def test_pos_embed_t_starts_at_zero_or_at_the_sincos_table():
    cfg = sit.get_config("tiny").model
    assert cfg.pos_embed_t_init == "zeros"
    zeros = TriplaneSiT(cfg, rngs=nnx.Rngs(0))
    np.testing.assert_array_equal(np.asarray(zeros.pos_embed_t[...]), 0.0)
    cfg.pos_embed_t_init = "sincos"
    table = TriplaneSiT(cfg, rngs=nnx.Rngs(0))
    grid = table.geometry.grids[1]
    np.testing.assert_array_equal(np.asarray(table.pos_embed_t[...])[0], sincos_2d(cfg.hidden_size, grid))
    assert isinstance(table.pos_embed_t, nnx.Param)  # still learned: same parameter tree as the official
    cfg.pos_embed_t_init = "ones"
    with pytest.raises(ValueError, match="pos_embed_t_init must be 'zeros'"):
        TriplaneSiT(cfg, rngs=nnx.Rngs(0))


def test_official_initialisation_gives_zero_output():
    cfg = sit.model_config("tiny")

    @jax.jit  # one compilation for the initialisation and the forward
    def init_and_run(planes, t, y):
        model = TriplaneSiT(cfg, rngs=nnx.Rngs(0))
        return nnx.to_pure_dict(nnx.state(model)), model(planes, t, y)

    state, out = init_and_run(*map(lambda x: jax.tree.map(jnp.asarray, x), inputs(cfg)))
    s = jax.tree.map(np.asarray, state)
    np.testing.assert_array_equal(s["pos_embed_xy"][0], sincos_2d(64, 4))
    zero = [s["pos_embed_t"], s["blocks"]["blocks"]["adaLN_modulation"]["kernel"]]
    zero += [s[f"final_layer_{p}"][n][w] for p in ("xy", "yt", "xt") for n in ("linear", "adaLN_modulation")
             for w in ("kernel", "bias")]
    zero += [x for path, x in jax.tree_util.tree_leaves_with_path(s) if "bias" in jax.tree_util.keystr(path)]
    assert all(not np.any(z) for z in zero)
    assert 0.015 < s["t_embedder"]["fc1"]["kernel"].std() < 0.025 and 0.5 < s["type_embed"].std() < 1.5
    bound = math.sqrt(6 / (8 * 2 * 2 + 64))  # Xavier on the flattened (D, C*p*p) patch weight
    assert 0.9 * bound < np.abs(s["x_embedder_xy"]["proj"]["kernel"]).max() <= bound
    qkv = s["blocks"]["blocks"]["attn"]["qkv"]["kernel"]
    assert 0.9 * math.sqrt(6 / (64 + 192)) < np.abs(qkv).max() <= math.sqrt(6 / (64 + 192))
    assert [o.shape for o in out] == [(3, 8, 8, 8)] * 3 and all(not np.any(np.asarray(o)) for o in out)


def _numpy_forward(tree, cfg, planes, t, y):
    """Float64 reference written from the spec (channel-first like the official)."""
    g = validate_sit(cfg)
    p, d, hd = g.patch, g.hidden_size, g.hidden_size // g.num_heads
    f64 = jax.tree.map(lambda x: np.asarray(x, np.float64), tree)
    lin = lambda x, m: x @ m["kernel"] + m["bias"]
    silu = lambda x: x / (1 + np.exp(-x))
    ln = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    gelu = lambda x: 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    tokens = []
    for k, (name, z) in enumerate(zip(("xy", "yt", "xt"), planes)):
        zc = np.asarray(z, np.float64).transpose(0, 3, 1, 2)  # (B, C, R1, R2)
        b, c, r1, r2 = zc.shape
        patches = zc.reshape(b, c, r1 // p, p, r2 // p, p).transpose(0, 2, 4, 1, 3, 5).reshape(b, -1, c * p * p)
        w = f64[f"x_embedder_{name}"]["proj"]["kernel"].transpose(2, 0, 1, 3).reshape(c * p * p, d)  # (C,p,p)
        pos = f64["pos_embed_xy"] if k == 0 else f64["pos_embed_t"]
        tokens.append(patches @ w + f64[f"x_embedder_{name}"]["proj"]["bias"] + pos + f64["type_embed"][:, k][:, None])
    x = np.concatenate(tokens, 1)
    freqs = np.exp(-math.log(10000) * np.arange(128) / 128)
    temb = np.concatenate([np.cos(t[:, None] * freqs), np.sin(t[:, None] * freqs)], 1)
    c = lin(silu(lin(temb, f64["t_embedder"]["fc1"])), f64["t_embedder"]["fc2"])
    c = c + f64["y_embedder"]["embedding_table"][y]
    blocks = f64["blocks"]["blocks"]
    for i in range(g.depth):
        blk = jax.tree.map(lambda a: a[i], blocks)
        sh1, sc1, g1, sh2, sc2, g2 = np.split(lin(silu(c), blk["adaLN_modulation"]), 6, -1)
        h = ln(x) * (1 + sc1[:, None]) + sh1[:, None]
        q, kk, v = (a.reshape(a.shape[0], a.shape[1], -1, hd).transpose(0, 2, 1, 3)
                    for a in np.split(lin(h, blk["attn"]["qkv"]), 3, -1))
        logits = q @ kk.transpose(0, 1, 3, 2) / math.sqrt(hd)
        att = np.exp(logits - logits.max(-1, keepdims=True))
        o = (att / att.sum(-1, keepdims=True)) @ v
        x = x + g1[:, None] * lin(o.transpose(0, 2, 1, 3).reshape(x.shape), blk["attn"]["proj"])
        h = ln(x) * (1 + sc2[:, None]) + sh2[:, None]
        x = x + g2[:, None] * lin(gelu(lin(h, blk["mlp"]["fc1"])), blk["mlp"]["fc2"])
    out, start = [], 0
    for name, (gh, gw) in zip(("xy", "yt", "xt"), g.grids):
        fl = f64[f"final_layer_{name}"]
        sh, sc = np.split(lin(silu(c), fl["adaLN_modulation"]), 2, -1)
        f = lin(ln(x[:, start:start + gh * gw]) * (1 + sc[:, None]) + sh[:, None], fl["linear"])
        img = np.einsum("nhwpqc->nchpwq", f.reshape(-1, gh, gw, p, p, g.out_channels))
        img = img.reshape(-1, g.out_channels, gh * p, gw * p)[:, :g.channels]  # chunk(2): first half
        out.append(img.transpose(0, 2, 3, 1))
        start += gh * gw
    return out


@pytest.fixture(scope="module")
def medium_run():
    """Random medium model (learn_sigma), inputs and its float32 output (compiled once)."""
    cfg = medium()
    tree = random_tree(cfg, seed=2)
    planes, t, y = inputs(cfg)
    out = forward(sit_model_from_params(tree, cfg), tuple(map(jnp.asarray, planes)), jnp.asarray(t), jnp.asarray(y))
    return tree, (planes, t, y), out


def test_forward_matches_numpy_reference_on_nonsquare_planes(medium_run):
    tree, (planes, t, y), out = medium_run
    want = _numpy_forward(tree, medium(), planes, t, y)
    assert [o.shape for o in out] == [(3, 8, 8, 4), (3, 12, 8, 4), (3, 12, 8, 4)]
    for a, b in zip(out, want):
        assert a.dtype == jnp.float32 and rel(a, b) <= 1e-5


def test_per_layer_blocks_match_the_stacked_ones(medium_run):
    """model.scan_layers=False: the same weights (through the official layout) in one tree per
    block give the stacked model's output, and the tree round-trips bit-exact."""
    tree, (planes, t, y), out = medium_run
    cfg = medium(scan_layers=False)
    official = sit_to_official(tree)
    per_layer = sit_from_official(official, cfg)
    assert sorted(per_layer["blocks"]["blocks"]) == [0, 1, 2]
    assert per_layer["blocks"]["blocks"][2]["adaLN_modulation"]["bias"].shape == (6 * cfg.hidden_size,)
    again = sit_to_official(per_layer)
    assert list(again) == list(official)
    for k in official:
        np.testing.assert_array_equal(again[k], official[k], err_msg=k)
    got = forward(sit_model_from_params(per_layer, cfg), tuple(map(jnp.asarray, planes)), jnp.asarray(t), jnp.asarray(y))
    for a, b in zip(got, out):
        assert rel(a, b) <= 1e-6


def test_unpatchify_layout():
    tokens = np.arange(2 * 3 * 2 * 2 * 2 * 5, dtype=np.float32).reshape(2, 6, 2 * 2 * 5)  # grid 3x2, p 2, c 5
    out = np.asarray(unpatchify(jnp.asarray(tokens), (3, 2), 2, 5))
    for i in range(3):
        for j in range(2):
            for a in range(2):
                for b in range(2):
                    np.testing.assert_array_equal(out[:, i * 2 + a, j * 2 + b],
                                                  tokens[:, i * 2 + j].reshape(2, 2, 2, 5)[:, a, b])


def test_labels_dropout_guidance_and_learn_sigma_false():
    cfg = medium(num_classes=3, class_dropout_prob=0.25, learn_sigma=False)
    tree = random_tree(cfg, seed=4)
    assert tree["y_embedder"]["embedding_table"].shape == (4, 48)  # + the null class
    assert tree["final_layer_yt"]["linear"]["kernel"].shape == (48, 2 * 2 * 4)  # no sigma channels
    model = sit_model_from_params(tree, cfg)
    np_in = inputs(cfg, batch=4, labels=[0, 1, 2, 1])
    planes, t, y = map(lambda x: jax.tree.map(jnp.asarray, x), np_in)

    @nnx.jit  # one compilation: the guided pass runs the conditional and forced-null batches
    def run(m, planes, t, y, key, scale):
        return m.forward_with_cfg(planes, t, y, scale), m(planes, t, y, train=True, dropout_key=key)

    cond, dropped = run(model, planes, t, y, jax.random.key(0), 1.0)
    null, _ = run(model, planes, t, y, jax.random.key(0), 0.0)
    guided, _ = run(model, planes, t, y, jax.random.key(0), 4.0)
    want_cond = _numpy_forward(tree, cfg, *np_in)
    want_null = _numpy_forward(tree, cfg, *np_in[:2], np.full(4, 3))  # the null class row
    drop = np.asarray(jax.random.uniform(jax.random.key(0), (4,)) < 0.25)  # the official token_drop
    want_dropped = _numpy_forward(tree, cfg, *np_in[:2], np.where(drop, 3, np_in[2]))
    for c, n, gd, d, wc, wn, wd in zip(cond, null, guided, dropped, want_cond, want_null, want_dropped):
        assert rel(c, wc) <= 1e-5 and rel(n, wn) <= 1e-5 and rel(d, wd) <= 1e-5 and rel(c, n) > 1e-3
        np.testing.assert_allclose(gd, n + 4.0 * (c - n), rtol=1e-5, atol=1e-5)
    trace = lambda f: jax.eval_shape(f)  # errors raised while tracing: nothing compiles
    with pytest.raises(ValueError, match="dropout_key"):
        trace(lambda: model(planes, t, y, train=True))
    uncond = sit_model_from_params(random_tree(medium()), medium())
    with pytest.raises(ValueError, match="class_dropout_prob > 0"):
        trace(lambda: uncond(planes, t, jnp.zeros(4, jnp.int32), force_drop_ids=jnp.ones(4, jnp.int32)))
    with pytest.raises(ValueError, match=r"plane yt must be \(4,\) \+ \(12, 8, 4\)"):
        uncond((planes[0], planes[0], planes[2]), t, y)


def test_bf16_compute_and_remat_run(medium_run):
    tree, (planes, t, y), want = medium_run
    model = sit_model_from_params(tree, medium(dtype="bfloat16", remat_policy="nothing_saveable"))
    got = forward(model, tuple(map(jnp.asarray, planes)), jnp.asarray(t), jnp.asarray(y))
    for a, b in zip(got, want):
        assert a.dtype == jnp.float32 and rel(a, b) < 5e-2


# ---- conversion ------------------------------------------------------------------------------

def test_numpy_round_trip_is_bit_exact_and_strict():
    cfg = medium()
    tree = random_tree(cfg, seed=6)
    official = sit_to_official(tree)
    assert list((k, v.shape) for k, v in official.items()) == list(sit_official_shapes(cfg).items())
    np.testing.assert_array_equal(  # Conv2d (out, in, kh, kw) from the Flax (kh, kw, in, out) kernel
        official["x_embedder_yt.proj.weight"][7, 3, 1, 0], tree["x_embedder_yt"]["proj"]["kernel"][1, 0, 3, 7])
    np.testing.assert_array_equal(official["blocks.2.adaLN_modulation.1.weight"],
                                  tree["blocks"]["blocks"]["adaLN_modulation"]["kernel"][2].T)
    back = sit_from_official(official, cfg)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b, strict=True), back, tree)
    params_only = {k: v for k, v in tree.items() if k != "pos_embed_xy"}
    with pytest.raises(ConversionError, match="model_config"):
        sit_to_official(params_only)
    np.testing.assert_array_equal(sit_to_official(params_only, cfg)["pos_embed_xy"], tree["pos_embed_xy"])
    half = {k: v.astype(np.float16) for k, v in official.items()}
    assert sit_from_official(half, cfg)["type_embed"].dtype == np.float32

    bad = dict(official)
    del bad["blocks.1.mlp.fc2.bias"], bad["final_layer_xt.linear.weight"]
    bad["blocks.3.attn.qkv.weight"] = np.zeros((144, 48), np.float32)
    bad["blocks.0.attn.qkv.weight"] = np.zeros((144, 47), np.float32)
    bad["pos_embed_t"] = np.zeros((1, 20, 48), np.float32)
    bad["type_embed"] = np.zeros((1, 3, 48), np.int32)
    bad["pos_embed_xy"] = official["pos_embed_xy"] + 1e-3
    with pytest.raises(ConversionError) as e:
        sit_from_official(bad, cfg, source="sit.pt")
    msg = str(e.value)
    for text in ("sit.pt does not match", "2 missing keys", "blocks.1.mlp.fc2.bias", "final_layer_xt.linear.weight",
                 "1 unexpected keys", "blocks.3.attn.qkv.weight", "2 wrong shapes",
                 "blocks.0.attn.qkv.weight: (144, 47), expected (144, 48)",
                 "pos_embed_t: (1, 20, 48), expected (1, 24, 48)", "not floating point", "type_embed: int32",
                 "pos_embed_xy: max |difference|", "depth 4"):
        assert text in msg, (text, msg)
    ok = dict(official, pos_embed_xy=official["pos_embed_xy"] + 5e-7)  # EMA-sized drift is accepted
    np.testing.assert_array_equal(sit_from_official(ok, cfg)["pos_embed_xy"], ok["pos_embed_xy"])


def test_unwrap_official_checkpoint():
    ema, raw = {"a": np.zeros(1)}, {"a": np.ones(1)}
    ckpt = {"model": raw, "ema": ema, "opt": {"state": {}}, "args": object()}
    assert unwrap_sit_checkpoint(ckpt) == ema and unwrap_sit_checkpoint(ckpt, "model") == raw
    assert unwrap_sit_checkpoint(raw) == raw  # find_model: no 'ema' -> the dict itself
    with pytest.raises(ValueError, match="which"):
        unwrap_sit_checkpoint(ckpt, "opt")
    with pytest.raises(ConversionError, match="expected a state_dict"):
        unwrap_sit_checkpoint({"ema": [1, 2]})
