"""Aspect-ratio buckets: every training image is resized to a size near a target pixel count."""
from __future__ import annotations

import math


def bucket_size(width: int, height: int, target_pixels: int, multiple: int = 64) -> tuple[int, int]:
    """The (width, height), both multiples of `multiple`, whose area is closest to `target_pixels` while the
    aspect ratio stays closest to width/height.

    With a = width/height, the ideal size is w* = sqrt(P·a), h* = sqrt(P/a); each side is rounded to the
    nearest multiple (at least one multiple), so aspect and area both stay within one rounding step.
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    aspect = width / height
    ideal_w, ideal_h = math.sqrt(target_pixels * aspect), math.sqrt(target_pixels / aspect)
    snap = lambda v: max(multiple, int(round(v / multiple)) * multiple)  # noqa: E731
    return snap(ideal_w), snap(ideal_h)


def center_crop_box(width: int, height: int, target_width: int, target_height: int) -> tuple[int, int, int, int]:
    """The largest centered (left, top, right, bottom) crop of a width×height image with the target's aspect."""
    target_aspect = target_width / target_height
    if width / height > target_aspect:
        crop_w, crop_h = round(height * target_aspect), height
    else:
        crop_w, crop_h = width, round(width / target_aspect)
    left, top = (width - crop_w) // 2, (height - crop_h) // 2
    return left, top, left + crop_w, top + crop_h
