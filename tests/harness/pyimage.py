"""The realistic Python image (Debian 12 minbase + python3, three layers)
that ``scripts/build-images.sh`` builds once per machine into a cache.

Building it takes debootstrap and the network, so tests never build it
themselves: they find it here, and fail (never skip) with a message naming
the script when it is missing.
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

from .images import OciImage, manifest
from .proc import HarnessError

DEFAULT_CACHE = Path("/var/cache/crfs/images")
CACHE_ENV = "CRFS_IMAGE_CACHE"
TAG = "python"
BUILD_SCRIPT = "scripts/build-images.sh"
LAYERS = 3


def image_cache() -> Path:
    """Where build-images.sh puts its images (``$CRFS_IMAGE_CACHE`` overrides)."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE)


def python_image() -> OciImage:
    """The cached python image; HarnessError unless it is complete."""
    entry = image_cache() / "python"
    image = OciImage(entry / "oci", TAG)
    env = f"{CACHE_ENV}={image_cache()} " if os.environ.get(CACHE_ENV) else ""
    command = f"sudo {env}{BUILD_SCRIPT}"
    if not (entry / "complete").is_file() or not (image.layout / "index.json").is_file():
        raise HarnessError(f"the python test image is missing or incomplete in {entry}: "
                           f"run `{command}` (scripts/setup.sh does) to build it")
    rebuild = f"rebuild it with `{command} --force`"
    try:
        layers = manifest(image)["layers"]
    except (HarnessError, OSError, ValueError, KeyError) as e:
        raise HarnessError(f"the python test image in {entry} is unreadable ({e}): {rebuild}") from e
    if len(layers) != LAYERS:
        raise HarnessError(f"the python test image in {entry} has {len(layers)} layers, not {LAYERS}: {rebuild}")
    return image


def layer_sizes(image: OciImage) -> list[int]:
    """Compressed size of each layer, bottom first (from the manifest)."""
    return [desc["size"] for desc in manifest(image)["layers"]]


def uncompressed_sizes(image: OciImage) -> list[int]:
    """Size of each layer tar once gunzipped, bottom first (reads every blob)."""
    sizes = []
    for desc in manifest(image)["layers"]:
        algo, hexdigest = desc["digest"].split(":", 1)
        with gzip.open(image.layout / "blobs" / algo / hexdigest) as f:
            sizes.append(sum(len(chunk) for chunk in iter(lambda: f.read(1 << 20), b"")))
    return sizes


def build_info(image: OciImage) -> dict:
    """When the image was built and how long it took, as build-images.sh recorded it."""
    entry = image.layout.parent
    info = {"completed": (entry / "complete").read_text().strip()}
    seconds = entry / "build-seconds"
    if seconds.is_file():
        info["seconds"] = json.loads(seconds.read_text())
    return info
