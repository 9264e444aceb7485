"""What the generate stage's images are to the stages that read them: the folder, the manifest,
and the loader that checks every shard against the manifest's sha256 first. Apart from the stage
module, so that a reader depends on this contract and not on how the images are made."""
from __future__ import annotations

import zipfile
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.espresso.files import sha256_file
from pipeline.params import DamagedInputError

if TYPE_CHECKING:
    import pandas as pd

OUT = Path("data/generate")
MANIFEST = OUT / "manifest.csv"
#: The manifest's column with the sha256 of each image's shard.
CHECKSUM = "shard_sha256"


def verify_shard(path: Path, checksum: str | None = None,
                 shape: tuple[int, ...] | None = None) -> str:
    """The sha256 of the shard at ``path``, once it is known good: it equals ``checksum`` (the
    manifest's) or, without one, the shard loads completely as uint8 images of ``shape``.
    ``DamagedInputError`` (one line, naming the file) when it is missing or not good."""
    if not path.is_file():
        raise DamagedInputError(f"shard {path} is missing")
    actual = sha256_file(path)
    if checksum is not None:
        if actual != checksum:
            raise DamagedInputError(f"shard {path} is damaged: its sha256 is not the manifest's")
        return actual
    try:
        images = np.load(path)["images"]
    except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else ""
        raise DamagedInputError(f"shard {path} is damaged: it does not load "
                                f"({type(err).__name__}: {reason})") from None
    if images.dtype != np.uint8 or images.shape != shape:
        raise DamagedInputError(f"shard {path} is damaged: it holds {images.dtype} images of "
                                f"shape {images.shape}, not uint8 {shape}")
    return actual


def load_images(manifest: pd.DataFrame, folder: Path = OUT) -> np.ndarray:
    """The manifest's images, in manifest order, from their shards, each checked against its
    sha256 first: a missing or damaged shard is a one-line ``DamagedInputError`` naming it and
    the fix, never a half-read array or a ``BadZipFile``."""
    fix = "run `dvc repro generate` (or `python -m pipeline.generate`) to regenerate it"
    if CHECKSUM not in manifest:
        raise DamagedInputError(f"the manifest of {folder} has no shard checksums (written by an "
                                f"older version): {fix}")
    shards = {}
    for name, checksum in manifest.groupby("shard", sort=False)[CHECKSUM].first().items():
        try:
            verify_shard(folder / name, checksum)
        except DamagedInputError as err:
            raise DamagedInputError(f"{err}: {fix}") from None
        shards[name] = np.load(folder / name)["images"]
    return np.stack([shards[s][i] for s, i in zip(manifest["shard"], manifest["index"])])
