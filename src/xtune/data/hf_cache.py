"""Hugging Face dataset ids (`data_path = "tatsu-lab/alpaca"`) found in the local caches, offline.

Two caches hold a dataset once it has been downloaded:
- the hub cache (`$HF_HUB_CACHE`, else `$HF_HOME/hub`): `datasets--OWNER--NAME/snapshots/REVISION/` with the
  repository's files; the train split's files are picked by the `datasets` library's own split naming rules;
- the datasets cache (`$HF_DATASETS_CACHE`, else `$HF_HOME/datasets`), which `load_dataset` writes:
  `OWNER___NAME/CONFIG/VERSION/HASH/` with `dataset_info.json` and `NAME-train.arrow` (or its shards).
Nothing is downloaded; a dataset in neither cache is an error naming every place looked.
"""

import os
import re
from pathlib import Path

from xtune.errors import DataError
from xtune.paths import hf_home

DATASET_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
TRAIN_ARROW = re.compile(r".+-train(-\d{5}-of-\d{5})?\.arrow")


def hf_hub_cache() -> Path:
    from xtune.models.load import hf_hub_cache as models_hub_cache  # the one rule for both; torch only when needed

    return models_hub_cache()


def hf_datasets_cache() -> Path:
    """`$HF_DATASETS_CACHE`, else `$HF_HOME/datasets`, else `~/.cache/huggingface/datasets`, as `datasets` decides."""
    if os.environ.get("HF_DATASETS_CACHE"):
        return Path(os.environ["HF_DATASETS_CACHE"]).expanduser()
    return hf_home() / "datasets"


def looks_like_dataset_id(data_path: str) -> bool:
    """`owner/name` or `name`, not a path to a data file."""
    suffix = Path(data_path).suffix.lower()
    return bool(DATASET_ID.fullmatch(data_path)) and suffix not in (".json", ".jsonl", ".parquet", ".csv", ".txt", ".arrow")


def hub_snapshot(cache: Path, dataset_id: str) -> Path | None:
    """The snapshot `refs/main` names, else the newest one."""
    repo = cache / ("datasets--" + dataset_id.replace("/", "--"))
    main = repo / "refs" / "main"
    if main.is_file() and (snapshot := repo / "snapshots" / main.read_text().strip()).is_dir():
        return snapshot
    snapshots = [snapshot for snapshot in (repo / "snapshots").glob("*") if snapshot.is_dir()]
    return max(snapshots, key=lambda snapshot: snapshot.stat().st_mtime, default=None)


def datasets_cache_folders(cache: Path, dataset_id: str) -> list[Path]:
    """`OWNER___NAME/*/*/*/` folders (config, version, hash) that hold train arrow files, newest first."""
    name = dataset_id.replace("/", "___")
    found = [info.parent for info in cache.glob(f"{name}/*/*/*/dataset_info.json") if train_arrow_files(info.parent)]
    return sorted(found, key=lambda folder: folder.stat().st_mtime, reverse=True)


def is_hub_snapshot(path: Path) -> bool:
    return path.parent.name == "snapshots" and path.parent.parent.name.startswith("datasets--")


def is_datasets_cache_folder(path: Path) -> bool:
    """A folder `load_dataset` wrote: dataset_info.json and split arrow files, but no state.json (save_to_disk's)."""
    return (path / "dataset_info.json").is_file() and not (path / "state.json").is_file() and bool(train_arrow_files(path))


def train_arrow_files(folder: Path) -> list[Path]:
    return sorted(path for path in folder.glob("*-train*.arrow") if TRAIN_ARROW.fullmatch(path.name))


def snapshot_train_files(snapshot: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The train split's data files of a hub snapshot, by `datasets`' split naming rules (`data/train-*`,
    `train.jsonl`, ...; every data file when no split is named)."""
    from datasets.data_files import DataFilesDict, get_data_patterns

    try:
        patterns = get_data_patterns(str(snapshot))
    except Exception:  # datasets raises EmptyDatasetError when no file looks like data
        return []
    splits = DataFilesDict.from_patterns(patterns, base_path=str(snapshot))
    train = next((files for split, files in splits.items() if str(split) == "train"), [])
    return sorted(Path(file) for file in train if Path(file).suffix.lower() in suffixes)


def find_dataset(dataset_id: str, suffixes: tuple[str, ...]) -> tuple[Path | None, list[str]]:
    """The snapshot or datasets-cache folder of `dataset_id`, else None; and every place looked, in order."""
    snapshots = hf_hub_cache() / ("datasets--" + dataset_id.replace("/", "--")) / "snapshots"
    snapshot = hub_snapshot(hf_hub_cache(), dataset_id)
    if snapshot is not None and snapshot_train_files(snapshot, suffixes):
        return snapshot, []
    empty = f" (snapshot {snapshot.name} has no train data files: {', '.join(suffixes)})" if snapshot else ""
    places = [f"Hugging Face hub cache {snapshots}{empty}"]
    if folders := datasets_cache_folders(hf_datasets_cache(), dataset_id):
        return folders[0], places
    places.append(f"datasets cache {hf_datasets_cache() / dataset_id.replace('/', '___')}/CONFIG/VERSION/HASH/*-train.arrow")
    return None, places


def not_found(data_path: str, local: Path, places: list[str]) -> DataError:
    looked = "\n".join(f"  - {place}" for place in [f"local path {local.resolve()}", *places])
    return DataError(
        f"data_path = '{data_path}' does not exist, and no Hugging Face dataset of that id is cached. Looked in:\n"
        f"{looked}\nxtune does not download data. Download it first, e.g.\n"
        f"  huggingface-cli download --repo-type dataset {data_path}\n"
        "or fix data_path (or data_root, or the path in datasets) in the config. Set HF_HOME, HF_HUB_CACHE or "
        "HF_DATASETS_CACHE if your caches live elsewhere."
    )
