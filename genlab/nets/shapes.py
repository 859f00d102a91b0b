"""Checks of the image sizes a network can take, with errors that say what to change."""

from genlab.errors import GenlabError


def check_divisible(net: str, channels: int, image_size: int, factor: int) -> None:
    if channels < 1:
        raise GenlabError(f"{net} needs at least one image channel; got channels={channels}.")
    if image_size < factor or image_size % factor:
        raise GenlabError(
            f"{net} halves the image {factor.bit_length() - 1} times, so its side must be a multiple of {factor}; "
            f"got image_size={image_size}. Set dataset.image_size to e.g. "
            f"{max(factor, image_size - image_size % factor)} or {image_size - image_size % factor + factor}."
        )
