"""The one road from a model name to a model: resolve a local folder, then load its tokenizer and weights.

xtune never downloads: a name resolves to a folder already on disk (a path, a tiny model that xtune builds,
or the Hugging Face and ModelScope caches).
"""

import importlib.util
import json
import os
import pickle
import re
from contextlib import contextmanager
from pathlib import Path

import torch
import transformers
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BitsAndBytesConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from xtune.errors import CheckpointError, ConfigError, ModelNotFoundError, XtuneError
from xtune.models.internlm2 import is_internlm2, llama_layout_copy, load_internlm2_as_llama
from xtune.paths import hf_home, xtune_home
from xtune.testing.tiny import tiny_model_path

TINY_PREFIX = "xtune-tiny/"
REPO_ID = re.compile(r"[\w][\w.-]*(/[\w][\w.-]*)?")
QUANTIZATIONS = ("4bit", "8bit")


def resolve_model_path(name_or_path: str) -> Path:
    """A local folder, `xtune-tiny/<name>`, or a repo id already in the Hugging Face or ModelScope cache."""
    if not name_or_path:
        raise ModelNotFoundError("the model name is empty; give a local folder, a repo id or xtune-tiny/<name>")
    local = Path(name_or_path).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            raise ModelNotFoundError(
                f"{local} has no config.json, so it is not a model folder; pass the folder that holds config.json "
                "next to the weights"
            )
        return local.resolve()
    if name_or_path.startswith(TINY_PREFIX):
        return tiny_model_path(name_or_path.removeprefix(TINY_PREFIX))
    if not REPO_ID.fullmatch(name_or_path):
        raise ModelNotFoundError(f"there is no folder {local.absolute()}; pass a folder that holds config.json")
    places = [f"local folder {local.absolute()}"]
    hub_cache = hf_hub_cache()
    if snapshot := hf_snapshot(hub_cache, name_or_path):
        return snapshot
    places.append(f"Hugging Face cache {hf_repo_folder(hub_cache, name_or_path) / 'snapshots'}")
    for candidate in modelscope_candidates(modelscope_cache(), name_or_path):
        if (candidate / "config.json").is_file():
            return candidate
        places.append(f"ModelScope cache {candidate}")
    raise ModelNotFoundError(_not_found_message(name_or_path, places))


def _not_found_message(repo_id: str, places: list[str]) -> str:
    looked = "\n".join(f"  - {place}" for place in places)
    return (
        f"model {repo_id!r} was not found. Looked in:\n{looked}\n"
        "xtune does not download models. Download it first, e.g.\n"
        f"  huggingface-cli download {repo_id}    (or: hf download {repo_id})\n"
        f"  modelscope download --model {repo_id}\n"
        "or pass the path of a local folder that holds config.json. "
        "Set HF_HUB_CACHE or MODELSCOPE_CACHE if your caches live elsewhere."
    )


def hf_hub_cache() -> Path:
    """`$HF_HUB_CACHE`, else `$HF_HOME/hub`, else `~/.cache/huggingface/hub`, as huggingface_hub decides."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    return hf_home() / "hub"


def hf_repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def hf_snapshot(cache: Path, repo_id: str) -> Path | None:
    """The snapshot that `refs/main` names, else the newest snapshot that holds config.json."""
    repo = hf_repo_folder(cache, repo_id)
    main = repo / "refs" / "main"
    if main.is_file():
        snapshot = repo / "snapshots" / main.read_text().strip()
        if (snapshot / "config.json").is_file():
            return snapshot
    complete = [snapshot for snapshot in (repo / "snapshots").glob("*") if (snapshot / "config.json").is_file()]
    return max(complete, key=lambda snapshot: snapshot.stat().st_mtime, default=None)


def modelscope_cache() -> Path:
    return Path(os.environ.get("MODELSCOPE_CACHE") or Path.home() / ".cache" / "modelscope" / "hub").expanduser()


def modelscope_candidates(cache: Path, repo_id: str) -> list[Path]:
    """Both ModelScope layouts, each with the name as given and with '.' stored as '___'."""
    names = list(dict.fromkeys([repo_id, repo_id.replace(".", "___")]))
    return [cache / name for name in names] + [cache / "models" / name for name in names]


def read_config(path: Path) -> dict:
    file = Path(path) / "config.json"
    if not file.is_file():
        raise ModelNotFoundError(f"{path} has no config.json, so it is not a model folder")
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise CheckpointError(f"{file} is not valid JSON (line {error.lineno}): {error.msg}") from error


def model_architecture(path: Path) -> str:
    """config.json's `model_type`: "internlm2", "llama", "qwen2", ..."""
    config = read_config(path)
    if "model_type" not in config:
        raise CheckpointError(f"{Path(path) / 'config.json'} has no 'model_type'; the model folder is incomplete")
    return config["model_type"]


def load_tokenizer(path: Path, trust_remote_code: bool = False) -> PreTrainedTokenizerBase:
    path = Path(path)
    if (path / "config.json").is_file() and is_internlm2(read_config(path)) and _has_plain_tokenizer_json(path):
        # AutoTokenizer would read config.json, whose model_type transformers does not know.
        return PreTrainedTokenizerFast.from_pretrained(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the base model's tokenizer files into it."
        )
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as error:
        if (path / "tokenizer.model").is_file() and (missing := missing_for_sentencepiece()):
            raise CheckpointError(
                f"cannot load the tokenizer in {path}: its tokenizer.model is a SentencePiece model, and reading it "
                f"needs {' and '.join(missing)}: pip install {' '.join(missing)} (xtune's own install brings them)."
            ) from error
        raise CheckpointError(f"cannot load the tokenizer in {path}: {_first_line(error)}") from error


def missing_for_sentencepiece() -> list[str]:
    """The packages transformers needs to read a SentencePiece tokenizer.model that are not installed."""
    modules = {"sentencepiece": "sentencepiece", "protobuf": "google.protobuf"}
    return [package for package, module in modules.items() if not _importable(module)]


def _importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or blocked in sys.modules
        return False


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def check_weights(path: Path) -> None:
    """A model folder must hold its weights; say so plainly instead of transformers' OSError."""
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise CheckpointError(
            f"{path} has a config.json but no weights ({WEIGHT_FILES[0]} or a sharded index); "
            "is the download or copy complete?"
        )


def _first_line(error: Exception) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _has_plain_tokenizer_json(path: Path) -> bool:
    tokenizer_config = path / "tokenizer_config.json"
    custom_code = tokenizer_config.is_file() and "auto_map" in json.loads(tokenizer_config.read_text(encoding="utf-8"))
    return (path / "tokenizer.json").is_file() and not custom_code


def load_model(
    path: Path,
    *,
    dtype: torch.dtype = torch.float32,
    quantization: str | None = None,
    device: str | torch.device = "cpu",
    trust_remote_code: bool = False,
) -> PreTrainedModel:
    path = Path(path)
    config = read_config(path)
    if is_internlm2(config):
        if quantization is None:
            return load_internlm2_as_llama(path, dtype).to(device)
        path = llama_layout_copy(path, xtune_home() / "llama-layout")
        config = read_config(path)
    check_model_code(path, config, trust_remote_code)
    check_weights(path)
    with pickles_of_tensors_only(path):
        return AutoModelForCausalLM.from_pretrained(
            path,
            dtype=dtype,
            quantization_config=quantization_config(quantization, dtype),
            device_map={"": device},
            trust_remote_code=trust_remote_code,
            weights_only=True,
        )


@contextmanager
def pickles_of_tensors_only(path: Path):
    """Around a transformers load of `path`: its `.bin` weights (pickles) are read with torch.load(weights_only=True),
    which rebuilds tensors and plain containers and refuses anything else, so no code in them runs; a refused
    pickle is named here instead of torch's advice to load it with weights_only=False."""
    try:
        yield
    except pickle.UnpicklingError as error:
        pickles = ", ".join(sorted(file.name for file in Path(path).glob("*.bin"))) or "its .bin weights"
        advice = ("Weights only load failed", "Please file an issue", "Check the documentation")  # torch's, not ours
        parts = (part.strip().rstrip(".") for part in str(error).split("\n\n"))
        reason = next((part for part in parts if part and not part.startswith(advice)), "refused")
        raise CheckpointError(
            f"{path}: {pickles} is a pickle that torch's weights-only loader refuses ({reason}): loading it whole "
            "could run code in it, so xtune does not. Use the model's safetensors weights (model.safetensors), or "
            "convert the .bin to safetensors where you trust where it came from."
        ) from error


def check_model_code(path: Path, config: dict, trust_remote_code: bool) -> None:
    """Refuses folders that transformers can only run with their own code, unless the user trusts it."""
    model_type = config.get("model_type")
    if trust_remote_code or model_type in CONFIG_MAPPING:
        return
    if "auto_map" in config:
        classes = ", ".join(sorted(set(config["auto_map"].values())))
        raise XtuneError(
            f"{path / 'config.json'} declares custom model code ({classes}) "
            f"for model_type {model_type!r}, which transformers {transformers.__version__} does not know. Loading it "
            f"means running the Python files shipped in {path} with your rights, and those files can do anything. "
            "xtune does not run them unless you say so: if you trust where this folder comes from, set "
            "`trust_remote_code = True` in the config (or pass --trust-remote-code)."
        )
    raise XtuneError(
        f"{path / 'config.json'} has model_type {model_type!r}, which transformers {transformers.__version__} does "
        "not know, and the folder ships no code for it; upgrade transformers, or check that the folder holds a "
        "causal language model"
    )


def quantization_config(quantization: str | None, dtype: torch.dtype) -> BitsAndBytesConfig | None:
    if quantization is None:
        return None
    if quantization == "4bit":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
        )
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ConfigError(f"quantization must be one of {', '.join(QUANTIZATIONS)} or None, got {quantization!r}")
