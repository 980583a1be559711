"""Generated inputs for calibration and verification: seeded synthetic images and generic
questions, drawn from independent random streams so that calibration and verification never
share an image."""

from __future__ import annotations

import numpy as np

QUESTIONS = [
    "What is in the image?",
    "How many shapes are there?",
    "Is there a red circle on the left side of the picture?",
    "What colour is the largest object?",
    "Describe the image.",
    "Which shape is at the top?",
]


# Independent random streams (see the module docstring).
CALIBRATION_STREAM, VERIFICATION_STREAM = 1, 2


def synthetic_images(n: int, size: int, seed: int, stream: int = VERIFICATION_STREAM) -> list:
    """``n`` seeded RGB images: a flat background with a few coloured rectangles and discs."""
    from PIL import Image

    rng = np.random.default_rng([stream, seed])
    images = []
    yy, xx = np.mgrid[0:size, 0:size]
    for _ in range(n):
        img = np.empty((size, size, 3), dtype=np.float32)
        img[:] = rng.uniform(0, 255, 3)
        for _ in range(int(rng.integers(1, 5))):
            colour = rng.uniform(0, 255, 3)
            cx, cy = rng.uniform(0, size, 2)
            r = rng.uniform(size / 10, size / 3)
            inside = (xx - cx) ** 2 + (yy - cy) ** 2 <= r**2 if rng.random() < 0.5 else (abs(xx - cx) <= r) & (abs(yy - cy) <= r)
            img[inside] = colour
        images.append(Image.fromarray(img.astype(np.uint8)))
    return images
