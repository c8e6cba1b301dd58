"""CoordTok models (Flax NNX)."""

from coordtok_jax.models.config import ConfigError, Geometry, validate
from coordtok_jax.models.coordtok import CoordTok, count_params
from coordtok_jax.models.triplane import triplane_gather

__all__ = ["CoordTok", "ConfigError", "Geometry", "count_params", "triplane_gather", "validate"]
