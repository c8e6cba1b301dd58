"""models/nested.py and the CoordTok nested-token option: the prefix property, the fill rule, the
order, the option-off identity with the official model, and the train step drawing budgets."""

import coordtok
import jax
import ml_collections
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from coordtok_jax.models.config import ConfigError, validate
from coordtok_jax.models.coordtok import CoordTok
from coordtok_jax.models.nested import (apply_levels, block_of_frames, fill_sources,
                                        nested_tokens, refinement_order, time_first_order)


def _cfg(**overrides):
    cfg = coordtok.get_config("tiny").model
    cfg.nested_tokens = True
    for k, v in overrides.items():
        setattr(cfg, k, v)
    return cfg


@pytest.mark.parametrize("rows, cols", [(4, 16), (2, 8), (3, 5), (1, 1), (8, 8)])
def test_order_is_a_permutation_and_a_quarter_is_the_stride_two_lattice(rows, cols):
    order = refinement_order(rows, cols)
    assert sorted(order.tolist()) == list(range(rows * cols))
    lattice = {i * cols + j for i in range(0, rows, 2) for j in range(0, cols, 2)}
    assert set(order[: len(lattice)].tolist()) == lattice  # coarse before fine


@pytest.mark.parametrize("rows, cols", [(4, 16), (2, 8), (3, 5), (8, 4)])
def test_time_first_order_keeps_whole_rows_coarse_to_fine(rows, cols):
    order = time_first_order(rows, cols)
    assert sorted(order.tolist()) == list(range(rows * cols))
    row_of = order // cols
    firsts = [int(row_of[k * cols]) for k in range(rows)]
    assert all(set(row_of[k * cols:(k + 1) * cols].tolist()) == {firsts[k]} for k in range(rows))  # whole rows
    assert firsts[0] == 0 and (rows < 3 or firsts[1] == 2 ** int(np.floor(np.log2(rows - 1))))  # coarse first
    # a quarter of a 4-row block is its first row: a still clip (rows all equal) loses nothing
    if rows == 4:
        src = fill_sources(order, rows, cols, cols)
        np.testing.assert_array_equal(src, np.tile(np.arange(cols), rows))


@pytest.mark.parametrize("keep", [1, 5, 16, 33, 64])
@pytest.mark.parametrize("make_order", [refinement_order, time_first_order])
def test_fill_sources_point_at_the_nearest_kept_cell(keep, make_order):
    rows, cols = 4, 16
    order = make_order(rows, cols)
    src = fill_sources(order, rows, cols, keep)
    kept = set(order[:keep].tolist())
    for cell in range(rows * cols):
        assert src[cell] in kept
        if cell in kept:
            assert src[cell] == cell
        i, j = divmod(cell, cols)
        best = min((i - a) ** 2 + (j - b) ** 2 for a, b in (divmod(k, cols) for k in kept))
        a, b = divmod(int(src[cell]), cols)
        assert (i - a) ** 2 + (j - b) ** 2 == best


def test_apply_levels_against_a_loop():
    cfg = _cfg(token_blocks=2)
    nt = nested_tokens(cfg, validate(cfg))
    rng = np.random.default_rng(0)
    plane = rng.standard_normal((3, 8, 8, 8))
    fill = rng.standard_normal(8)
    levels = rng.integers(0, len(nt.levels), (3, nt.blocks))
    got = np.asarray(apply_levels(jnp.asarray(plane, jnp.float32), jnp.asarray(levels), jnp.asarray(fill, jnp.float32), nt))
    want = plane.copy()
    for b in range(3):
        for blk in range(nt.blocks):
            keep = nt.levels[levels[b, blk]]
            kept = nt.order[:keep]
            for cell in range(nt.cells):
                r, c = divmod(cell, nt.cols)
                if cell in kept:
                    continue
                src = fill_sources(nt.order, nt.rows, nt.cols, keep)[cell]
                sr, sc = divmod(int(src), nt.cols)
                want[b, blk * nt.rows + r, c] = plane[b, blk * nt.rows + sr, sc] + fill
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)


def _build(cfg, seed=0):
    """CoordTok built inside one jit (eager construction compiles every initializer on its own)."""
    return nnx.jit(lambda: CoordTok(cfg, rngs=nnx.Rngs(seed)))()


@pytest.fixture(scope="module")
def nested_model():
    cfg = _cfg(token_blocks=4)
    model = _build(cfg)
    model.nested_fill_yt[...] = jnp.linspace(-1, 1, 8)  # a non-zero fill, as after training
    return model


def test_decoding_at_a_budget_uses_only_the_prefix(nested_model):
    model = nested_model
    nt = model.nested
    key = jax.random.PRNGKey(1)
    video = jax.random.uniform(key, (2, 16, 32, 32, 3), minval=-1, maxval=1)
    coords = jax.random.uniform(jax.random.PRNGKey(2), (2, 40, 3))
    planes = nnx.jit(lambda m, v: m.encode(v))(model, video)
    levels = jnp.asarray([[0, 1, 2, 3], [3, 0, 0, 1]], jnp.int32)
    run = nnx.jit(lambda m, p, lv: m.decode(m.apply_levels(p, lv), coords))
    out = run(model, planes, levels)

    # Perturb every dropped cell of both temporal planes: nothing changes.
    kept = np.zeros((2,) + planes[1].shape[1:3], bool)
    for b in range(2):
        for blk in range(nt.blocks):
            kept[b, blk * nt.rows:(blk + 1) * nt.rows] = nt.kept[levels[b, blk]].reshape(nt.rows, nt.cols)
    noise = lambda z, s: z + jnp.where(kept[..., None], 0.0, jax.random.normal(jax.random.PRNGKey(s), z.shape) * 3)
    perturbed = (planes[0], noise(planes[1], 3), noise(planes[2], 4))
    np.testing.assert_array_equal(np.asarray(run(model, perturbed, levels)), np.asarray(out))
    # A kept cell does change it, and the full budget is the planes unchanged.
    bumped = (planes[0], planes[1].at[1, 0, 0].add(1.0), planes[2])
    assert not np.allclose(np.asarray(run(model, bumped, levels)), np.asarray(out))
    full = model.apply_levels(planes, jnp.full((2, nt.blocks), len(nt.levels) - 1, jnp.int32))
    for a, b in zip(full, planes):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_option_off_is_the_official_model():
    off = coordtok.get_config("tiny").model
    plain = ml_collections.ConfigDict({k: v for k, v in off.to_dict().items()
                                       if k not in ("nested_tokens", "token_blocks", "token_levels", "token_order")})
    a, b = _build(off), _build(plain)
    sa, sb = nnx.to_pure_dict(nnx.state(a, nnx.Param)), nnx.to_pure_dict(nnx.state(b, nnx.Param))
    assert jax.tree.structure(sa) == jax.tree.structure(sb)
    jax.tree.map(np.testing.assert_array_equal, sa, sb)
    on = nnx.eval_shape(lambda: CoordTok(_cfg(), rngs=nnx.Rngs(0)))
    extra = set(nnx.to_pure_dict(nnx.state(on, nnx.Param))) - set(sa)
    assert extra == {"nested_fill_yt", "nested_fill_xt"}
    video = jax.random.uniform(jax.random.PRNGKey(0), (1, 16, 32, 32, 3), minval=-1, maxval=1)
    coords = jax.random.uniform(jax.random.PRNGKey(1), (1, 8, 3))
    forward = nnx.jit(lambda m: m(video, None, coords))
    np.testing.assert_array_equal(np.asarray(forward(a)), np.asarray(forward(b)))
    with pytest.raises(ValueError, match="nested_tokens=True"):
        a.apply_levels((None, None, None), np.zeros((1, 4), np.int32))


def test_config_errors_name_the_field(nested_model):
    with pytest.raises(ConfigError, match="token_blocks must be a positive integer dividing"):
        CoordTok(_cfg(token_blocks=3), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="token_levels must be fractions"):
        CoordTok(_cfg(token_levels=(0.5, 0.25, 1.0)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="token_levels must be fractions"):
        CoordTok(_cfg(token_levels=(0.25, 0.5)), rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="token_order must be one of"):
        CoordTok(_cfg(token_order="random"), rngs=nnx.Rngs(0))
    nt = nested_model.nested
    planes = tuple(jnp.zeros((1,) + shape) for shape in nested_model.geometry.plane_shapes)
    with pytest.raises(ValueError, match=r"token levels must be \(1, 4\) integers"):
        nested_model.apply_levels(planes, np.zeros((1, 3), np.int32))
    with pytest.raises(ValueError, match="must index config.model.token_levels"):
        nested_model.apply_levels(planes, np.full((1, 4), 4, np.int32))
    np.testing.assert_array_equal(block_of_frames(16, nt), np.repeat(np.arange(4), 4))


def test_train_step_draws_a_budget_per_block_and_trains_the_fills(devices):
    """The loss, with the batch split over a (data=4, fsdp=2) mesh, is the model's at the levels
    drawn from the step key (fold_in 17) computed on one device, and the learned fills get
    gradients (they are used wherever a cell was dropped)."""
    from test_train_step import micro_config

    from coordtok_jax.data.video import to_model_input
    from coordtok_jax.models.nested import sample_levels
    from coordtok_jax.models.patches import indices_to_coords
    from coordtok_jax.train import points
    from coordtok_jax.train.state import make_optimizer, tokenizer_state
    from coordtok_jax.train.step import make_loss_fn
    from coordtok_jax import sharding as sharding_lib

    config = micro_config()
    with config.unlocked():
        config.model.nested_tokens = True
        config.model.token_blocks = 2
    rng = np.random.default_rng(0)
    video = jnp.asarray(rng.integers(0, 256, size=(4, 8, 16, 16, 3), dtype=np.uint8))
    n_frames = jnp.asarray([8, 8, 5, 8], jnp.int32)
    mesh = sharding_lib.make_mesh((1, 1), ("data", "fsdp"), devices=devices[:1])
    plan = tokenizer_state(config, mesh, make_optimizer(config))
    params = plan.create().params
    geometry = validate(config.model)
    loss_fn = make_loss_fn(plan.graphdef, geometry, config)
    key = jax.random.PRNGKey(3)
    mesh8 = sharding_lib.make_mesh((4, 2), ("data", "fsdp"), devices=devices)
    rows = lambda x: jax.device_put(x, sharding_lib.batch_sharding(mesh8, sharding_lib.rules_of(config), x.shape))
    with jax.set_mesh(mesh8):  # each device cuts its own videos' planes
        replicated = jax.device_put(params, sharding_lib.replicated(mesh8))
        (loss, _), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
            replicated, rows(video), rows(n_frames), key)

    k_coords, _ = jax.random.split(key)
    nt = nnx.merge(plan.graphdef, params).nested
    levels = sample_levels(jax.random.fold_in(key, 17), 4, nt)
    assert levels.shape == (4, 2) and int(levels.min()) >= 0 and int(levels.max()) < 4

    @jax.jit
    def reference(params, levels):
        model = nnx.merge(plan.graphdef, params)
        idx = points.sample_stage1(k_coords, n_frames, geometry, config.num_points)
        pred = model(to_model_input(video, n_frames, config.data.pad_value), n_frames,
                     indices_to_coords(idx, geometry.dec_grid), levels)
        return jnp.mean((pred - points.gather_targets(video, idx, geometry)) ** 2)

    want = reference(params, levels)
    assert float(reference(params, jnp.full_like(levels, 3))) != pytest.approx(float(want), rel=1e-6)
    assert float(loss) == pytest.approx(float(want), rel=1e-5)
    assert float(jnp.abs(grads["nested_fill_yt"]).sum()) > 0 and float(jnp.abs(grads["nested_fill_xt"]).sum()) > 0
