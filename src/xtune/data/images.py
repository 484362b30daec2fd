"""Image files -> the pixel values a vision encoder takes, as LLaVA prepares them.

LLaVA-1.5 pads each image to a square of the processor's mean colour before the processor resizes and
crops it (`image_aspect_ratio="pad"`), so that nothing at the edges is cropped away; LLaVA-1.0 and the
pretraining stage crop the center instead.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from os import PathLike
from pathlib import Path

import torch
from PIL import Image, UnidentifiedImageError

from xtune.errors import DataError, ModelNotFoundError

ImageLike = str | PathLike | Image.Image

BUILTIN_IMAGES = {"view.png": "a lake with a wooden pier, mountains and the sun, drawn by xtune with Pillow"}
"""Images xtune ships (`xtune-data/NAME`), for the LLaVA configs' evaluation_images (XTuner's evaluate on a photo
of a pier it downloads; this one is local)."""


def image_path(path: str | PathLike) -> Path:
    """A local image path, or `xtune-data/<name>` for one of BUILTIN_IMAGES."""
    from importlib import resources

    from xtune.data.sources import BUILTIN_PREFIX

    text = str(path)
    if text.startswith(BUILTIN_PREFIX) and text[len(BUILTIN_PREFIX) :] in BUILTIN_IMAGES:
        return Path(str(resources.files("xtune.data") / "builtin" / text[len(BUILTIN_PREFIX) :]))
    return Path(path)


def load_image(path: str | PathLike) -> Image.Image:
    """The image at `path` (or `xtune-data/<name>`, one xtune ships) in RGB; a missing or unreadable file is a
    DataError naming it."""
    try:
        with Image.open(image_path(path)) as image:
            return image.convert("RGB")
    except FileNotFoundError as error:
        raise DataError(f"image {path} not found (looked at {Path(path).resolve()}); fix the path") from error
    except UnidentifiedImageError as error:
        raise DataError(f"image {path} is not an image file Pillow can read; replace or remove it") from error
    except OSError as error:  # truncated or damaged data, a folder, no permission
        raise DataError(f"image {path} cannot be read ({error}); replace or remove it") from error


def pad_to_square(image: Image.Image, background: tuple[int, int, int]) -> Image.Image:
    """`image` centered on a square canvas of its longer side filled with `background` (LLaVA's `expand2square`)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    canvas = Image.new(image.mode, (side, side), background)
    canvas.paste(image, ((side - width) // 2, (side - height) // 2))
    return canvas


def background_of(processor) -> tuple[int, int, int]:
    """The processor's mean colour in 0-255, the padding colour LLaVA uses: it normalizes to about zero."""
    return tuple(int(channel * 255) for channel in processor.image_mean)


@dataclass(frozen=True)
class ImagePreprocessor:
    """Images -> `pixel_values` [N, 3, H, W] float32 through a Hugging Face image processor."""

    processor: object
    """An image processor of transformers (`CLIPImageProcessor`, `SiglipImageProcessor`, ...)."""
    pad_image_to_square: bool = False
    """Pad each image to a square of the mean colour before the processor sees it (LLaVA-1.5's "pad")."""

    @classmethod
    def from_folder(cls, path: str | PathLike, pad_image_to_square: bool = False) -> "ImagePreprocessor":
        """The image processor saved in a vision encoder's folder (its preprocessor_config.json)."""
        from transformers import AutoImageProcessor

        if not (Path(path) / "preprocessor_config.json").is_file():
            raise ModelNotFoundError(
                f"{path} has no preprocessor_config.json, so no image processor; "
                "pass the vision encoder's folder, which holds one"
            )
        try:
            # The PIL backend is what LLaVA used, and gives the same pixels with or without torchvision.
            processor = AutoImageProcessor.from_pretrained(path, backend="pil")
        except (OSError, ValueError) as error:
            raise ModelNotFoundError(f"cannot load the image processor in {path}: {error}") from error
        return cls(processor, pad_image_to_square)

    def __call__(self, images: Sequence[ImageLike]) -> torch.Tensor:
        if not images:
            return torch.empty((0, *self.pixel_shape()), dtype=torch.float32)
        opened = [image.convert("RGB") if isinstance(image, Image.Image) else load_image(image) for image in images]
        if self.pad_image_to_square:
            background = background_of(self.processor)
            opened = [pad_to_square(image, background) for image in opened]
        return self._pixel_values(opened)

    def pixel_shape(self) -> tuple[int, int, int]:
        """(channels, height, width) of one image's pixel values."""
        return tuple(self._pixel_values([Image.new("RGB", (64, 64))]).shape[1:])

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor:
        return self.processor(images=images, return_tensors="pt")["pixel_values"].to(torch.float32)
