"""`xtune convert split`: a model folder's weights re-saved as safetensors shards of at most `max_shard_size`.

XTuner's `convert split` writes each tensor of a `pytorch_model.bin` index to a file of its own, so that
machines with little memory can load it piece by piece; here the shard size is chosen, the weights may be
safetensors or `.bin` (read with `weights_only`), and each shard is read and written alone, so memory holds one
shard at a time (a `.bin` file is read whole: pickles cannot be read in part). The other files (config,
tokenizer, generation config, xtune's meta) are copied as they are.
"""

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from huggingface_hub import split_state_dict_into_shards_factory
from safetensors import safe_open
from safetensors.torch import save_file

from xtune.convert.folder import new_folder
from xtune.errors import CheckpointError

WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")
INDEX_SUFFIX = ".index.json"


def weight_files(folder: Path) -> list[Path]:
    """The folder's weight files: its safetensors (single or sharded), else its `.bin` files."""
    for name in WEIGHT_NAMES:
        index = folder / f"{name}{INDEX_SUFFIX}"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            return [folder / shard for shard in shards]
        if (folder / name).is_file():
            return [folder / name]
    raise CheckpointError(
        f"{folder}: no model.safetensors, pytorch_model.bin or their .index.json; pass a merged model folder "
        "(what `xtune convert merge` or `pth_to_hf` writes)."
    )


def _tensor_readers(files: list[Path]) -> dict[str, tuple[Callable[[], torch.Tensor], int]]:
    """name -> (a function reading the tensor, its size in bytes), for every tensor of the files."""
    readers: dict[str, tuple[Callable[[], torch.Tensor], int]] = {}
    for file in files:
        if file.suffix == ".safetensors":
            with safe_open(str(file), framework="pt") as handle:
                for name in handle.keys():
                    sliced = handle.get_slice(name)
                    size = torch.Size(sliced.get_shape()).numel() * _itemsize(sliced.get_dtype())
                    readers[name] = (lambda file=file, name=name: _read_one(file, name), size)
        else:
            state = torch.load(file, map_location="cpu", weights_only=True)
            for name, tensor in state.items():
                readers[name] = (lambda tensor=tensor: tensor, tensor.numel() * tensor.element_size())
    return readers


def _read_one(file: Path, name: str) -> torch.Tensor:
    with safe_open(str(file), framework="pt") as handle:
        return handle.get_tensor(name)


_ITEMSIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
              "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}  # fmt: skip


def _itemsize(dtype: str) -> int:
    return _ITEMSIZES[dtype]


def split_model(src_dir: str | Path, save_dir: str | Path, max_shard_size: str = "2GB") -> Path:
    """Re-save `src_dir`'s weights in `save_dir` as `model-0000N-of-0000M.safetensors` shards of at most
    `max_shard_size` each (a larger tensor gets a shard of its own) with `model.safetensors.index.json`."""
    src = Path(src_dir)
    if not src.is_dir():
        raise CheckpointError(f"{src} is not a folder; pass the merged model's folder.")
    files = weight_files(src)
    readers = _tensor_readers(files)
    sizes = {name: size for name, (_, size) in readers.items()}
    plan = split_state_dict_into_shards_factory(
        sizes, get_storage_size=lambda size: size, get_storage_id=lambda size: None,
        filename_pattern="model{suffix}.safetensors", max_shard_size=max_shard_size,
    )  # fmt: skip
    weights = {path.name for path in files} | {f"{name}{INDEX_SUFFIX}" for name in WEIGHT_NAMES}
    with new_folder(save_dir) as folder:
        for child in sorted(src.iterdir()):
            if child.name not in weights and not child.name.startswith("."):
                (shutil.copytree if child.is_dir() else shutil.copy2)(child, folder / child.name)
        for filename, names in plan.filename_to_tensors.items():
            shard = {name: readers[name][0]().contiguous().clone() for name in names}
            save_file(shard, str(folder / filename), metadata={"format": "pt"})
        if plan.is_sharded:
            index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": plan.tensor_to_filename}
            (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    return Path(save_dir)
