"""What LLaVA's image loading costs a training step, and what `dataloader_num_workers` takes off it.

    python benchmarks/image_collate.py [--images 16] [--batches 6] [--workers 0,1,2]

A CLIP ViT-L/14-336 image processor (its preprocessor_config.json values: shortest edge 336, center crop 336,
bicubic, CLIP mean/std; no weights needed), xtune's `ImagePreprocessor` (PIL backend, pad to square as LLaVA-1.5),
on `--images` JPEG photos-sized files (640x480, random noise, written once) per batch: the work
`with_pixel_values` does in the collate function of every LLaVA step. Reported: seconds per batch collated in
the training process, and the wait for each batch from a DataLoader with workers while the main process
"trains" (sleeps `--step-s` seconds a step, standing in for a GPU step that leaves the CPU free).
"""

import argparse
import json
import tempfile
import time
from functools import partial
from pathlib import Path

import numpy as np
from PIL import Image


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--batches", type=int, default=6)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--step-s", type=float, default=0.5)
    args = parser.parse_args()

    from transformers import CLIPImageProcessor

    from xtune.data.images import ImagePreprocessor
    from xtune.engine.distributed import Ranks
    from xtune.engine.train import collated

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}).save_pretrained(tmp / "clip")
        rng = np.random.default_rng(0)
        paths = []
        for i in range(args.images * args.batches):
            path = tmp / f"{i}.jpg"
            Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8)).save(path, quality=90)
            paths.append(str(path))
        preprocess = ImagePreprocessor.from_folder(tmp / "clip", pad_image_to_square=True)
        items = [{"images": [path]} for path in paths]
        plan = [(0, list(range(b * args.images, (b + 1) * args.images))) for b in range(args.batches)]
        collate_fn = partial(_collate, preprocess=preprocess)
        report = {"args": vars(args)}
        for workers in (int(w) for w in args.workers.split(",")):
            waits = []
            batches = collated(items, plan, collate_fn, Ranks(), workers)
            for _ in plan:
                started = time.perf_counter()
                batch = next(batches)[2]
                waits.append(time.perf_counter() - started)
                time.sleep(args.step_s)  # the step, on an accelerator
            report[f"workers_{workers}"] = {"wait_s_per_batch": waits[1:], "mean_wait_s": sum(waits[1:]) / len(waits[1:]),
                                            "pixel_values": list(batch["pixel_values"].shape)}  # fmt: skip
        print(json.dumps(report, indent=1))


def _collate(items, preprocess):
    return {"pixel_values": preprocess([path for item in items for path in item["images"]])}


if __name__ == "__main__":
    main()
