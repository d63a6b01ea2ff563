"""Write a small real image collection from images that PyPI packages ship (no hub download).

- photos/<topic>/*.png|jpg : scikit-image's bundled photographs (cat, coffee, rocket, ...)
- faces/{train,test}/{face,other}/*.png : scikit-image's LFW subset (100 faces, 100 non-faces,
  25x25 grey), split 70/30 per class: a real labelled set for the probe, index and search demo.
"""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
from PIL import Image

TOPICS = {
    "animals": ["chelsea.png", "horse.png"],
    "objects": ["coffee.png", "camera.png", "rocket.jpg", "motorcycle_left.png", "astronaut.png"],
    "science": ["hubble_deep_field.jpg", "retina.jpg", "ihc.png", "cell.png", "microaneurysms.png"],
    "textures": ["brick.png", "grass.png", "gravel.png"],
}


def main(out: Path) -> None:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        sys.exit("scikit-image is not installed; run scripts/setup.sh")
    data = Path(spec.submodule_search_locations[0]) / "data"
    for topic, names in TOPICS.items():
        d = out / "photos" / topic
        d.mkdir(parents=True, exist_ok=True)
        for n in names:
            shutil.copy(data / n, d / n)
    faces = np.load(data / "lfw_subset.npy")  # (200, 25, 25) floats in [0, 1]
    for i, arr in enumerate(faces):
        label = "face" if i < 100 else "other"
        split = "train" if i % 100 < 70 else "test"
        d = out / "faces" / split / label
        d.mkdir(parents=True, exist_ok=True)
        Image.fromarray((arr * 255).round().astype(np.uint8), "L").save(d / f"{label}_{i:03d}.png")
    print(f"wrote demo images under {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "demo-out/images"))
