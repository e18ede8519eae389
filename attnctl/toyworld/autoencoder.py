"""A lossless pixel-shuffle autoencoder that diffusers pipelines accept as their ``vae``.

``encode`` folds each ``factor × factor`` block of pixels into channels (``pixel_unshuffle``) and
``decode`` unfolds them (``pixel_shuffle``): both are pure permutations, so ``decode(encode(x)) == x``
bit for bit, in any dtype. There are no weights.

The pipelines read four things from a VAE's config and this one provides them:

- ``block_out_channels``: its length sets ``vae_scale_factor = 2 ** (len - 1)``, which must equal
  ``factor`` (a power of two);
- ``latent_channels = in_channels * factor ** 2``;
- ``scaling_factor`` and ``shift_factor``: the pipelines feed the transformer
  ``(z - shift_factor) * scaling_factor`` and decode ``z / scaling_factor + shift_factor``; choose them
  so the latents of the training images have about zero mean and unit variance.

Loading from a pipeline folder: ``save_pretrained`` records the component in ``model_index.json`` as
``["attnctl.toyworld.autoencoder", "PixelShuffleAutoencoder"]``. diffusers 0.42 resolves a library
that is neither diffusers nor transformers from ``sys.modules`` only (it never imports a module named
by a repository), so this module must be in ``sys.modules`` before ``from_pretrained``: ``import attnctl``
puts a stand-in there that imports this module when diffusers first reads a name from it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.modeling_outputs import AutoencoderKLOutput

# diffusers looks these names up *on this module* (``getattr(module, "ModelMixin")``) to decide how to
# save and load the component, so they must stay module attributes.
from diffusers.models.modeling_utils import ModelMixin

__all__ = [
    "PixelShuffleAutoencoder",
    "PointDistribution",
    "WORLD_SCALING_FACTOR",
    "WORLD_SHIFT_FACTOR",
    "ModelMixin",
    "ConfigMixin",
]

# Measured once on 2,048 shapes-world training images (``world.make_batch(0, 2048)``, 32×32 and 64×64
# alike): folded latents in [-1, 1] have mean 0.70 and standard deviation 0.45 (the light background
# dominates), so ``(z - 0.70) * 2.2`` has about zero mean and unit variance.
WORLD_SHIFT_FACTOR = 0.70
WORLD_SCALING_FACTOR = 2.2


class _ExpectedVaeTypeFilter(logging.Filter):
    """Drops diffusers' load-time "Expected types for vae: (AutoencoderKL,), got PixelShuffleAutoencoder" warning:
    the pipelines annotate their ``vae`` as ``AutoencoderKL``, and this class provides everything they use of one
    (see the module docstring), so the warning is a false alarm on every toy load. Other warnings pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not (message.startswith("Expected types for vae") and "PixelShuffleAutoencoder" in message)


_PIPELINE_LOGGER = logging.getLogger("diffusers.pipelines.pipeline_utils")
if not any(isinstance(f, _ExpectedVaeTypeFilter) for f in _PIPELINE_LOGGER.filters):
    _PIPELINE_LOGGER.addFilter(_ExpectedVaeTypeFilter())


@dataclass
class PointDistribution:
    """A degenerate latent distribution: all its mass at ``mean``.

    Quacks like diffusers' ``DiagonalGaussianDistribution`` as far as the pipelines use it:
    ``sample(generator)`` and ``mode()`` both return ``mean`` (no random numbers are drawn).
    """

    mean: torch.Tensor

    @property
    def std(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    @property
    def var(self) -> torch.Tensor:
        return torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | list[torch.Generator] | None = None) -> torch.Tensor:
        return self.mean

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: PointDistribution | None = None) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)


class PixelShuffleAutoencoder(ModelMixin, ConfigMixin):
    """Pixel (un)shuffle by ``factor``: images ``B×C×H×W`` in [-1, 1] ↔ latents ``B×C·f²×H/f×W/f``.

    Args:
        factor: fold size; a power of two (the pipelines' ``vae_scale_factor``).
        in_channels: image channels.
        scaling_factor, shift_factor: the latent normalisation the pipelines apply (see module doc);
            the defaults are measured on the shapes world.
        block_out_channels: only its length matters (``2 ** (len - 1)`` must equal ``factor``);
            defaults to a tuple of the right length.
        latent_channels: ``in_channels * factor ** 2``; derived when not given.
    """

    config_name = "config.json"
    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        factor: int = 2,
        in_channels: int = 3,
        scaling_factor: float = WORLD_SCALING_FACTOR,
        shift_factor: float = WORLD_SHIFT_FACTOR,
        block_out_channels: tuple[int, ...] | None = None,
        latent_channels: int | None = None,
    ):
        super().__init__()
        if factor < 1 or factor & (factor - 1):
            raise ValueError(f"factor must be a power of two (1, 2, 4, ...), got {factor}")
        n_blocks = factor.bit_length()  # 2 ** (n_blocks - 1) == factor
        if block_out_channels is None:
            block_out_channels = tuple(in_channels * 4**i for i in range(n_blocks))
            self.register_to_config(block_out_channels=block_out_channels)
        elif 2 ** (len(block_out_channels) - 1) != factor:
            raise ValueError(
                f"block_out_channels has length {len(block_out_channels)}, so the pipelines would use a "
                f"vae_scale_factor of {2 ** (len(block_out_channels) - 1)}, but factor is {factor}: give a "
                f"tuple of length {n_blocks}"
            )
        expected = in_channels * factor**2
        if latent_channels is None:
            self.register_to_config(latent_channels=expected)
        elif latent_channels != expected:
            raise ValueError(
                f"latent_channels must be in_channels * factor**2 = {expected}, got {latent_channels}"
            )
        if not scaling_factor or scaling_factor != scaling_factor:
            raise ValueError(f"scaling_factor must be a non-zero number, got {scaling_factor}")
        # No weights. This empty buffer carries the module's dtype and device (`vae.dtype`, `vae.device`)
        # and is saved, so `save_pretrained` writes the weights file that `from_pretrained` expects.
        self.register_buffer("anchor", torch.zeros(0))

    # -- the two maps ---------------------------------------------------------------------------------

    def _check(self, x: torch.Tensor, channels: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels:
            raise ValueError(f"{what} must have shape (B, {channels}, H, W), got {tuple(x.shape)}")

    def encode(self, x: torch.Tensor, return_dict: bool = True) -> AutoencoderKLOutput | tuple:
        """Images ``B×C×H×W`` (H, W multiples of ``factor``) → a point distribution over latents."""
        self._check(x, self.config.in_channels, "images")
        f = self.config.factor
        if x.shape[-2] % f or x.shape[-1] % f:
            raise ValueError(f"image height and width must be multiples of {f}, got {tuple(x.shape[-2:])}")
        dist = PointDistribution(F.pixel_unshuffle(x, f) if f > 1 else x)
        if not return_dict:
            return (dist,)
        return AutoencoderKLOutput(latent_dist=dist)

    def decode(self, z: torch.Tensor, return_dict: bool = True, **kwargs) -> DecoderOutput | tuple:
        """Latents ``B×C·f²×h×w`` → images ``B×C×h·f×w·f``; extra keywords (``generator``) are ignored."""
        self._check(z, self.config.latent_channels, "latents")
        f = self.config.factor
        x = F.pixel_shuffle(z, f) if f > 1 else z
        if not return_dict:
            return (x,)
        return DecoderOutput(sample=x)

    def forward(self, sample: torch.Tensor, return_dict: bool = True, **kwargs) -> DecoderOutput | tuple:
        """Round trip, as ``AutoencoderKL.forward``: ``decode(encode(sample))``."""
        return self.decode(self.encode(sample).latent_dist.mode(), return_dict=return_dict)

    # -- the memory switches pipelines call; a permutation needs none of them ---------------------------

    def enable_slicing(self) -> None:
        pass

    def disable_slicing(self) -> None:
        pass

    def enable_tiling(self, *args, **kwargs) -> None:
        pass

    def disable_tiling(self) -> None:
        pass
