"""What a model expects as input, and how raw uint8 images are turned into it."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..errors import CnnmodError


@dataclass(frozen=True)
class InputSpec:
    """Channels, size and per-channel normalisation of a model's input.

    ``prepared=True`` marks a module decomposed from tensors already prepared for its model, with
    no ``input_spec=`` to say how: cnnmod cannot know how raw images become such tensors, so it
    refuses raw images for it instead of guessing (it takes float tensors as they are).
    """

    channels: int
    size: tuple[int, int]  # (height, width)
    mean: tuple[float, ...]  # per channel, on the [0, 1] scale
    std: tuple[float, ...]
    prepared: bool = False
    # Photos of another size: None resizes them to ``size`` (a data set of one size, as CIFAR);
    # a share (timm's crop_pct, 0.875 for ImageNet) resizes the shorter side to size / crop_pct,
    # keeping the aspect ratio, then crops the centre ``size``.
    crop_pct: float | None = None

    def to_dict(self) -> dict:
        d = asdict(self)
        if not self.prepared:
            del d["prepared"]  # files of raw-image modules stay as they were
        if self.crop_pct is None:
            del d["crop_pct"]
        return d

    def resized(self, height: int, width: int) -> tuple[int, int]:
        """The size an image of ``height`` x ``width`` is resized to before its centre is cropped."""
        return resized_size(height, width, self.size, self.crop_pct)

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        try:
            crop = d.get("crop_pct")
            return cls(int(d["channels"]), tuple(int(s) for s in d["size"]),
                       tuple(float(m) for m in d["mean"]), tuple(float(s) for s in d["std"]),
                       bool(d.get("prepared", False)), None if crop is None else float(crop))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise CnnmodError(f"expected an input specification (channels, size, mean, std), found {d!r}.") from None

    @classmethod
    def of_prepared(cls, example: torch.Tensor) -> "InputSpec":
        """The specification of tensors shaped like ``example`` (1, C, H, W), already prepared."""
        c = int(example.shape[1])
        return cls(c, (int(example.shape[2]), int(example.shape[3])), (0.0,) * c, (1.0,) * c, True)

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        """Convert a uint8 batch (B, C, H, W) into the normalised float batch the model expects.

        Conversions are documented and fixed: grey is repeated to RGB, RGB becomes grey by the
        ITU-R 601 luma weights, a different size is resized bilinearly (with antialiasing): to
        ``size``, or with ``crop_pct`` the shorter side to size / crop_pct and the centre cropped.
        """
        if images.dim() != 4:
            raise CnnmodError(f"expected a batch of images (B, C, H, W), found shape {tuple(images.shape)}.")
        if self.prepared:
            return self._as_prepared(images)
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        c = x.shape[1]
        if c != self.channels:
            if c == 1:
                x = x.expand(-1, self.channels, -1, -1)
            elif c == 3 and self.channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                raise CnnmodError(f"expected images with {self.channels} channel(s) (or 1 or 3, which are "
                                  f"converted), found {c} channels.")
        if tuple(x.shape[-2:]) != self.size:
            x = F.interpolate(x, size=self.resized(*x.shape[-2:]), mode="bilinear", align_corners=False,
                              antialias=True)
            top, left = (x.shape[-2] - self.size[0]) // 2, (x.shape[-1] - self.size[1]) // 2
            x = x[..., top:top + self.size[0], left:left + self.size[1]]  # the centre (all of it without crop_pct)
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std


    def _as_prepared(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.uint8:
            raise CnnmodError("expected tensors already prepared for this module's model, found raw uint8 images: "
                              "the module was decomposed from prepared tensors without input_spec=, so cnnmod "
                              "cannot know how to prepare images for it (decompose again with "
                              "input_spec=cnnmod.InputSpec(channels, (height, width), mean, std)).")
        if tuple(x.shape[1:]) != (self.channels, *self.size):
            raise CnnmodError(f"expected prepared tensors of shape (B, {self.channels}, {self.size[0]}, "
                              f"{self.size[1]}), found {tuple(x.shape)}.")
        return x.float()


def resized_size(height: int, width: int, size: tuple[int, int], crop_pct: float | None) -> tuple[int, int]:
    """An image's size before its centre ``size`` is cropped: ``size`` itself without ``crop_pct``,
    else the aspect ratio kept and the shorter side min(size) / crop_pct (timm's rule)."""
    if crop_pct is None:
        return tuple(size)
    scale = int(min(size) / crop_pct) / min(height, width)
    return max(size[0], round(height * scale)), max(size[1], round(width * scale))


def measure_spec(images: torch.Tensor) -> InputSpec:
    """Return the input specification of a uint8 data set (its size, channels, mean and std)."""
    x = images.float() / 255.0  # (N, C, H, W)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return InputSpec(int(x.shape[1]), (int(x.shape[2]), int(x.shape[3])),
                     tuple(round(float(m), 6) for m in mean), tuple(round(float(s), 6) for s in std))
