"""A ProcessPoolExecutor editing the tiles of one shared image in place.

Run:  python examples/executor_tiles.py [--backend posix|sysv|mmap]

``mpshm.numpy.zeros`` puts a 4096 x 4096 RGB image (48 MiB) in a shared
memory segment. Each task receives the whole image (as a handle of a few
hundred bytes) and the coordinates of one tile; the worker gets a writable,
zero-copy view, inverts its tile in place and returns only a checksum. No
pixel is pickled in either direction, and the parent sees every change.
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import as_completed

import numpy as np

import mpshm
import mpshm.numpy

HEIGHT, WIDTH, TILE = 4096, 4096, 512  # 8 x 8 tiles of 512 x 512 pixels


def paint(image: np.ndarray) -> None:
    """Draw a synthetic test pattern into *image* (height x width x 3, uint8)."""
    y = (np.arange(image.shape[0]) % 256).astype(np.uint8)[:, None]
    x = (np.arange(image.shape[1]) % 256).astype(np.uint8)[None, :]
    image[..., 0] = x  # red grows to the right
    image[..., 1] = y  # green grows downwards
    image[..., 2] = x ^ y  # blue: a checkerboard-like texture


def invert_tile(image: np.ndarray, top: int, left: int, size: int) -> int:
    """Invert one tile of *image* in place; return the sum of its new pixels.

    *image* is a view of the parent's segment: writing to it writes to the
    parent's image. Tiles do not overlap, so tasks never write the same pixel.
    """
    tile = image[top : top + size, left : left + size]
    np.subtract(255, tile, out=tile)  # in place: no copy of the tile either
    return int(tile.sum(dtype=np.uint64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="posix", help="posix (default), sysv or mmap")
    backend = parser.parse_args().backend

    image = mpshm.numpy.zeros((HEIGHT, WIDTH, 3), dtype=np.uint8, backend=backend)
    paint(image)
    name = mpshm.numpy.segment_name(image)  # what SharedMemory(name) would attach
    print(f"image {image.shape} uint8, {image.nbytes / 2**20:.0f} MiB in {name} ({backend})")

    corners = [(top, left) for top in range(0, HEIGHT, TILE) for left in range(0, WIDTH, TILE)]
    began = time.perf_counter()
    with mpshm.ProcessPoolExecutor(max_workers=2, backend=backend) as executor:
        # Every submit sends the image as a handle: 64 tasks, no copy of the pixels.
        futures = {
            executor.submit(invert_tile, image, top, left, TILE): (top, left)
            for top, left in corners
        }
        sums = {futures[f]: f.result() for f in as_completed(futures)}
    print(f"{len(sums)} tiles of {TILE} x {TILE} inverted in place in "
          f"{time.perf_counter() - began:.2f} s")

    # Check in the parent: the whole image is the inverted pattern, and each
    # worker's checksum matches what the parent now sees in that tile.
    expected = np.empty_like(image)  # a private array, for comparison
    paint(expected)
    np.subtract(255, expected, out=expected)
    assert np.array_equal(image, expected), "the image is not the inverted pattern"
    for (top, left), total in sums.items():
        assert total == image[top : top + TILE, left : left + TILE].sum(dtype=np.uint64)
    print(f"checked: every pixel inverted; pixel (0, 0) is now {image[0, 0].tolist()}, "
          f"pixel (100, 300) {image[100, 300].tolist()}")

    mpshm.numpy.release(image)  # destroy the segment now
    print(f"released {name}")


if __name__ == "__main__":
    main()
