"""XTuner 0.1.x configs, read as they are, into the typed schema.

An XTuner config is an mmengine object graph (`model = dict(type=SupervisedFinetune, llm=dict(...))`). It is read
with `ast` and never run: literals, names bound earlier in the file, arithmetic, comparisons, `if` statements on them
and `dict(...)` calls are evaluated; an imported name or an attribute of one (`AdamW`, `PROMPT_TEMPLATE.internlm2_chat`,
`torch.float16`) is a `Ref`, its dotted path from the import line, never imported. Nothing of the file can run, so it
needs none of the trust a Python config needs, and it never turns on a key that runs code (`trust_remote_code`, a
`module:function` dataset_format): those are refused or left off, with the reason.

Each key the reader takes becomes an `Entry` (XTuner key -> xtune key = value); keys that change nothing in xtune are
listed as ignored, and keys xtune cannot honour raise a ConfigError naming the key and why.
"""

import ast
import math
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

from xtune.config.schema import Config
from xtune.errors import ConfigError, short_repr


@dataclass(frozen=True)
class Ref:
    """An imported name, or an attribute of one, as its dotted path (`torch.optim.AdamW`)."""

    path: str

    @property
    def name(self) -> str:
        return self.path.rpartition(".")[2]

    def __repr__(self) -> str:
        return self.path


@dataclass
class Entry:
    xtuner_key: str
    xtune_key: str
    value: Any
    line: int


@dataclass
class XtunerConfig:
    """What an XTuner config became: xtune's values (with the XTuner line each came from), and the printout's parts."""

    path: Path
    entries: list[Entry] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def values(self) -> dict[str, Any]:
        return {entry.xtune_key: entry.value for entry in self.entries}

    @property
    def lines(self) -> dict[str, int]:
        return {entry.xtune_key: entry.line for entry in self.entries}


def is_xtuner_config(path: Path) -> bool:
    """An mmengine-style config: it imports from xtuner or mmengine, or sets `model = dict(type=...)`."""
    if path.suffix != ".py":
        return False
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return False
    for node in tree.body:
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in ("xtuner", "mmengine"):
            return True
        if isinstance(node, ast.Import) and any(a.name.split(".")[0] in ("xtuner", "mmengine") for a in node.names):
            return True
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "model" for t in node.targets)
            and isinstance(node.value, ast.Call)
            and isinstance(node.value.func, ast.Name)
            and node.value.func.id == "dict"
            and any(k.arg == "type" for k in node.value.keywords)
        ):
            return True
    return False


# Reading the file without running it -------------------------------------------------------------------------------

_BINARY = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
}  # fmt: skip
_COMPARE = {
    ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le, ast.Gt: operator.gt,
    ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not, ast.In: lambda a, b: a in b,
    ast.NotIn: lambda a, b: a not in b,
}  # fmt: skip
_PLAIN_CALLS = {"dict": dict, "list": list, "tuple": tuple, "int": int, "float": float, "str": str, "bool": bool,
                "abs": abs, "min": min, "max": max, "round": round}  # fmt: skip
"""The only calls evaluated: builtins of plain values (never shadowed: a name bound in the file is looked up first)."""


class _Reader:
    def __init__(self, path: Path):
        self.path = path
        self.env: dict[str, Any] = {}
        self.lines: dict[str, int] = {}

    def fail(self, node: ast.AST, what: str) -> ConfigError:
        return ConfigError(
            f"{self.path}:{getattr(node, 'lineno', '?')}: {what}. xtune reads XTuner configs without running them "
            "(literals, names set earlier, arithmetic, dict(...), imported names); write the value out, or convert "
            "the config (`xtune show-cfg --from-xtuner FILE`) and edit the xtune config."
        )

    def run(self, body: list[ast.stmt]) -> None:
        for node in body:
            if isinstance(node, ast.Import):
                for alias in node.names:
                    name = alias.asname or alias.name.split(".")[0]
                    self.bind(name, Ref(alias.name if alias.asname else name), node)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    raise self.fail(node, "a relative import ('from .x import y') names a file beside this config")
                for alias in node.names:
                    if alias.name == "*":
                        raise self.fail(node, f"'from {node.module} import *' hides which names it binds")
                    self.bind(alias.asname or alias.name, Ref(f"{node.module}.{alias.name}"), node)
            elif isinstance(node, ast.Assign):
                value = self.eval(node.value)
                for target in node.targets:
                    if not isinstance(target, ast.Name):
                        raise self.fail(node, "only plain names are assigned ('x = ...')")
                    self.bind(target.id, value, node)
            elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
                self.bind(node.target.id, self.eval(node.value), node)
            elif isinstance(node, ast.AugAssign) and isinstance(node.target, ast.Name):
                current = self.name(node.target)
                self.bind(node.target.id, self.binary(node, node.op, current, self.eval(node.value)), node)
            elif isinstance(node, ast.If):
                self.run(node.body if self.eval(node.test) else node.orelse)
            elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Constant):
                continue  # a docstring
            elif isinstance(node, ast.Pass):
                continue
            else:
                raise self.fail(node, f"a {type(node).__name__} statement is code xtune does not run")

    def bind(self, name: str, value: Any, node: ast.AST) -> None:
        self.env[name] = value
        self.lines[name] = node.lineno

    def name(self, node: ast.Name) -> Any:
        if node.id in self.env:
            return self.env[node.id]
        if node.id in ("True", "False", "None"):
            return {"True": True, "False": False, "None": None}[node.id]
        raise self.fail(node, f"name '{node.id}' is not set earlier in the file")

    def binary(self, node: ast.AST, op: ast.operator, left: Any, right: Any) -> Any:
        if type(op) not in _BINARY or isinstance(left, Ref) or isinstance(right, Ref):
            raise self.fail(node, f"the operation {type(op).__name__} on {short_repr(left)} and {short_repr(right)}")
        if isinstance(op, ast.Pow) and isinstance(right, (int, float)):  # bounded results: a config is no computation
            if abs(right) > 64 or (isinstance(left, int) and left.bit_length() * abs(right) > 4096):
                raise self.fail(node, f"a power of {right}")
        if isinstance(op, ast.Mult) and (isinstance(left, (str, list, tuple)) or isinstance(right, (str, list, tuple))):
            sequence, count = (left, right) if isinstance(left, (str, list, tuple)) else (right, left)
            if isinstance(count, int) and count * len(sequence) > 1_000_000:
                raise self.fail(node, f"a sequence of {len(sequence)} repeated {count} times")
        try:
            return _BINARY[type(op)](left, right)
        except Exception as error:
            raise self.fail(node, f"{type(error).__name__}: {error}") from None

    def eval(self, node: ast.expr) -> Any:
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return self.name(node)
        if isinstance(node, ast.Attribute):
            owner = self.eval(node.value)
            if isinstance(owner, Ref):
                return Ref(f"{owner.path}.{node.attr}")
            raise self.fail(node, f"the attribute '.{node.attr}' of a {type(owner).__name__}")
        if isinstance(node, ast.BinOp):
            return self.binary(node, node.op, self.eval(node.left), self.eval(node.right))
        if isinstance(node, ast.UnaryOp):
            value = self.eval(node.operand)
            if isinstance(node.op, ast.Not):
                return not value
            if isinstance(value, (int, float)) and isinstance(node.op, (ast.USub, ast.UAdd)):
                return -value if isinstance(node.op, ast.USub) else value
            raise self.fail(node, f"the operation {type(node.op).__name__} on {short_repr(value)}")
        if isinstance(node, ast.BoolOp):
            values = [self.eval(v) for v in node.values]
            return all(values) if isinstance(node.op, ast.And) else next((v for v in values if v), values[-1])
        if isinstance(node, ast.Compare):
            left = self.eval(node.left)
            for op, comparator in zip(node.ops, node.comparators):
                right = self.eval(comparator)
                try:
                    if not _COMPARE[type(op)](left, right):
                        return False
                except TypeError as error:
                    raise self.fail(node, f"a comparison: {error}") from None
                left = right
            return True
        if isinstance(node, ast.IfExp):
            return self.eval(node.body) if self.eval(node.test) else self.eval(node.orelse)
        if isinstance(node, (ast.List, ast.Tuple)):
            if any(isinstance(e, ast.Starred) for e in node.elts):
                raise self.fail(node, "a starred item ('*x') in a list")
            items = [self.eval(e) for e in node.elts]
            return items if isinstance(node, ast.List) else tuple(items)
        if isinstance(node, ast.Dict):
            if any(k is None for k in node.keys):
                raise self.fail(node, "a '**' in a dict")
            return {self.eval(k): self.eval(v) for k, v in zip(node.keys, node.values)}
        if isinstance(node, ast.Subscript):
            owner, index = self.eval(node.value), self.eval(node.slice)
            if isinstance(owner, (list, tuple, dict, str)) and not isinstance(index, Ref):
                try:
                    return owner[index]
                except Exception as error:
                    raise self.fail(node, f"an index: {type(error).__name__}: {error}") from None
        if isinstance(node, ast.Slice):
            return slice(*(self.eval(part) if part else None for part in (node.lower, node.upper, node.step)))
        if isinstance(node, ast.Call):
            return self.call(node)
        if isinstance(node, ast.JoinedStr) and all(isinstance(v, ast.Constant) for v in node.values):
            return "".join(v.value for v in node.values)
        described = {"JoinedStr": "an f-string of values", "ListComp": "a list comprehension", "Lambda": "a lambda",
                     "DictComp": "a dict comprehension", "GeneratorExp": "a generator"}  # fmt: skip
        raise self.fail(node, f"{described.get(type(node).__name__, 'a ' + type(node).__name__ + ' expression')}")

    def call(self, node: ast.Call) -> Any:
        function = node.func.id if isinstance(node.func, ast.Name) and node.func.id not in self.env else None
        if function not in _PLAIN_CALLS:
            called = ast.unparse(node.func)
            raise self.fail(node, f"a call of {called}(...): code xtune does not run")
        if any(isinstance(a, ast.Starred) for a in node.args) or any(k.arg is None for k in node.keywords):
            raise self.fail(node, f"'*' or '**' arguments of {function}(...)")
        args = [self.eval(a) for a in node.args]
        kwargs = {k.arg: self.eval(k.value) for k in node.keywords}
        if function == "dict":
            return dict(*args, **kwargs)
        try:
            return _PLAIN_CALLS[function](*args, **kwargs)
        except Exception as error:
            raise self.fail(node, f"{function}(...): {type(error).__name__}: {error}") from None


def read_file(path: Path) -> tuple[dict[str, Any], dict[str, int]]:
    """The file's top-level names -> their values (Refs for imported names), and the line each was last set on."""
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    except SyntaxError as error:
        raise ConfigError(f"{path}:{error.lineno}: not valid Python: {error.msg}.") from None
    reader = _Reader(path)
    reader.run(tree.body)
    return reader.env, reader.lines


# Mapping XTuner's keys to xtune's -------------------------------------------------------------------------------

MODEL_STAGES = {"SupervisedFinetune": "sft", "DPO": "dpo", "ORPO": "orpo", "RewardModel": "reward", "LLaVAModel": "sft"}
"""XTuner's model classes -> xtune's stage (LLaVAModel: an SFT stage with a vision encoder)."""

IGNORED_TOP_LEVEL = {
    "tokenizer": "xtune loads the model's own tokenizer",
    "image_processor": "xtune loads the vision encoder's own processor",
    "env_cfg": "mmengine's runtime environment",
    "visualizer": "xtune always writes metrics.jsonl and loss.png (report_to adds TensorBoard or W&B)",
    "log_level": "mmengine's logging",
    "log_processor": "mmengine's logging",
    "launcher": "xtune launches with NPROC_PER_NODE (torchrun) or --launcher slurm",
}
"""Top-level XTuner keys that change nothing in xtune, and why."""

REWARD_KEYS = {"loss_type": ("reward_loss", get_args(Config.model_fields["reward_loss"].annotation)),
               "penalty_type": ("reward_penalty", get_args(Config.model_fields["reward_penalty"].annotation)),
               "penalty_weight": ("reward_penalty_weight", None)}  # fmt: skip
"""XTuner's RewardModel keys -> xtune's, and the values xtune has."""
REWARD_DEFAULTS = {"loss_type": "ranking", "penalty_type": "log_barrier", "penalty_weight": 0.01}
"""What XTuner's RewardModel takes when a config does not say (xtuner/model/reward.py)."""

IGNORED_HOOKS = {
    "HFCheckpointHook": "`xtune convert pth_to_hf` (or merge) writes the Hugging Face folder from a checkpoint",
    "DatasetInfoHook": "xtune prints its dataset's counts itself (and `xtune check-dataset` shows them)",
    "VarlenAttnArgsToMessageHubHook": "xtune's packed attention needs no hook",
    "ThroughputHook": "xtune logs tokens/s in metrics.jsonl",
    "IterTimerHook": "mmengine's timer",
    "ParamSchedulerHook": "xtune's schedule is warmup_ratio and a cosine decay",
    "DistSamplerSeedHook": "xtune seeds its data order with `seed`",
}

OPTIMIZERS = {"AdamW": "adamw", "AdamW8bit": "adamw_8bit", "PagedAdamW8bit": "paged_adamw_8bit"}
PRECISIONS = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}


UNREAD_DATASETS = {
    "process_ms_dataset": "; xtune reads no ModelScope dataset cache: download the files (`modelscope download "
    "--dataset NAME --local_dir DIR`) and read them with process_hf_dataset, or set data_path = DIR",
    "MOSSSFTDataset": "; MOSS's records (meta_instruction, chat.turn_N with Human/MOSS/Commands/Tool Responses) have no "
    "xtune format yet: convert them to OpenAI messages",
    "build_packed_dataset": "; InternEVO's tokenized .bin files are ids already, which xtune does not take: give it "
    "the text they were made from",
}
"""XTuner's dataset classes xtune does not read -> what to do instead (after the refusal's "xtune reads ...")."""


def _format_of(map_fn: Any, stage: str) -> str:
    """XTuner's dataset_map_fn -> xtune's dataset_format: `alpaca_map_fn` -> `alpaca`, `alpaca_zh_map_fn` ->
    `alpaca_zh`, for each name xtune knows (its formats and XTuner's map functions, `xtune list-dataset-format`)."""
    from xtune.data.xtuner_maps import XTUNER_NAMES
    from xtune.data.xtuner_maps import format_name as known_format

    if map_fn is None:
        return "conversation" if stage == "sft" else "auto"
    name = map_fn.name if isinstance(map_fn, Ref) else None
    if stage != "sft" and name == "orpo_dpo_mix_40k_map_fn":
        return "auto"  # {prompt, chosen, rejected} records with message lists: xtune's preference format reads them
    format_name = known_format(name) if name else None
    if format_name is not None:
        return format_name
    known = ", ".join(f"{name}_map_fn" for name in sorted(XTUNER_NAMES))
    raise ValueError(
        "xtune has no map function of that name (it reads " + known + ", and None for "
        "records already in XTuner's conversation format), and it imports no code from an XTuner config: convert "
        "the data to one of those formats, or convert the config and set dataset_format = 'package.module:function' "
        "in the xtune config (which is code you then trust)."
    )


class _Mapper:
    def __init__(self, path: Path, env: dict[str, Any], lines: dict[str, int]):
        self.path, self.env, self.lines = path, env, lines
        self.out = XtunerConfig(path)

    def set(self, xtuner_key: str, xtune_key: str, value: Any) -> None:
        line = self.lines.get(xtuner_key.split(".")[0].split("[")[0], 0)
        self.out.entries = [e for e in self.out.entries if e.xtune_key != xtune_key]
        self.out.entries.append(Entry(xtuner_key, xtune_key, value, line))

    def refuse(self, key: str, why: str) -> ConfigError:
        line = self.lines.get(key.split(".")[0].split("[")[0])
        return ConfigError(f"{self.path}{f':{line}' if line else ''}: XTuner key '{key}': {why}")

    def ignore(self, key: str, why: str) -> None:
        self.out.ignored.append(f"{key}: {why}")

    def typed(self, value: Any, key: str) -> tuple[str | None, dict]:
        if not isinstance(value, dict):
            raise self.refuse(key, f"expected dict(type=..., ...), got {short_repr(value)}")
        kind = value.get("type")
        return (kind.name if isinstance(kind, Ref) else kind), value

    def map(self) -> XtunerConfig:
        if "model" not in self.env:
            raise ConfigError(f"{self.path}: an XTuner config sets `model = dict(type=...)`; this one does not.")
        if (size := self.env.get("sequence_parallel_size", 1)) != 1:
            self.set("sequence_parallel_size", "sequence_parallel_size", size)
        stage = self.model(self.env["model"])
        self.dataloader(self.env.get("train_dataloader"), stage)
        self.optimizer(self.env.get("optim_wrapper"))
        self.schedule(self.env.get("param_scheduler"))
        self.train_cfg(self.env.get("train_cfg"))
        self.hooks(self.env.get("custom_hooks") or [])
        self.default_hooks(self.env.get("default_hooks") or {})
        self.runtime()
        self.in_optimizer_steps()
        return self.out

    def in_optimizer_steps(self) -> None:
        """XTuner's intervals count iterations (micro-batches); xtune's count optimizer steps, of
        accumulative_counts micro-batches each: a checkpoint, an evaluation or a log line where XTuner's would be."""
        counts = self.out.values.get("accumulative_counts", 1)
        if counts == 1:
            return
        for entry in self.out.entries:
            if entry.xtune_key in ("save_steps", "evaluation_freq", "logging_steps", "warmup_steps") and 0 < entry.value < 10**9:
                steps = max(1, math.ceil(entry.value / counts))
                self.out.notes.append(f"{entry.xtuner_key} = {entry.value} iterations: {entry.xtune_key} = {steps} "
                                      f"optimizer steps of accumulative_counts = {counts} micro-batches")  # fmt: skip
                entry.value = steps

    # model ---------------------------------------------------------------------------------------------------
    def model(self, model: Any) -> str:
        kind, model = self.typed(model, "model")
        if kind not in MODEL_STAGES:
            raise self.refuse("model.type", f"{short_repr(model.get('type'))} is a model class xtune does not have; "
                              f"xtune trains {', '.join(MODEL_STAGES)}")  # fmt: skip
        stage = MODEL_STAGES[kind]
        if stage != "sft":
            self.set("model.type", "stage", stage)
        if stage == "reward":  # RewardModel's defaults, where the config does not set them
            for key, (xtune_key, _) in REWARD_KEYS.items():
                self.set(f"model.{key} (RewardModel's default)", xtune_key, REWARD_DEFAULTS[key])
        llava = kind == "LLaVAModel"
        lora = model.get("llm_lora" if llava else "lora")
        lora_key = "model.llm_lora" if llava else "model.lora"
        for key, value in model.items():
            where = f"model.{key}"
            if key in ("type", "llm", "lora", "llm_lora", "visual_encoder", "visual_encoder_lora"):
                continue
            if key == "use_varlen_attn":
                self.out.notes.append(f"{where} = {value}: xtune's packed rows never attend across samples, whatever "
                                      "this says (pack_to_max_length decides whether samples are packed)")  # fmt: skip
            elif key == "use_activation_checkpointing":
                self.set(where, "gradient_checkpointing", bool(value))
            elif key in ("tokenizer", "max_position_embeddings") and value is None:
                continue
            elif key == "tokenizer":
                self.ignore(where, "xtune loads the model's own tokenizer")
            elif stage == "dpo" and key in ("loss_type", "beta", "label_smoothing"):
                self.set(where, key, value)
            elif stage == "dpo" and key == "ref_llm":
                if value is not None:
                    raise self.refuse(where, "xtune's DPO reference is the starting model itself; a separate ref_llm "
                                      "is not supported: leave it None")  # fmt: skip
            elif stage == "orpo" and key == "beta":
                self.set(where, "orpo_alpha", value)
            elif stage == "reward" and key in REWARD_KEYS:
                xtune_key, allowed = REWARD_KEYS[key]
                if allowed is not None and value not in allowed:
                    raise self.refuse(where, f"= {short_repr(value)}: xtune's reward stage has {', '.join(allowed)}")
                self.set(where, xtune_key, value)
            elif llava and key in ("freeze_visual_encoder", "pretrained_pth", "visual_select_layer", "projector_depth"):
                self.set(where, key, value)  # pretrained_pth: XTuner's iter_N.pth, or an xtune pretrain checkpoint
            elif llava and key == "freeze_llm":
                if value and lora is None:  # with llm_lora, XTuner's frozen LLM carries trained adapters: LoRA
                    self.set(where, "freeze_llm", True)
            else:
                raise self.refuse(where, f"= {short_repr(value)}: xtune has no such setting for {kind}")
        self.llm(model.get("llm"), lora is not None, frozen=llava and bool(model.get("freeze_llm")) and lora is None)
        if lora is not None:
            self.lora(lora, lora_key)
        elif not (llava and model.get("freeze_llm")):
            self.set("model.llm_lora" if llava else "model.lora", "method", "full")
        if llava:
            self.vision(model.get("visual_encoder"), model.get("visual_encoder_lora"))
        return stage

    def llm(self, llm: Any, has_lora: bool, frozen: bool = False) -> None:
        kind, llm = self.typed(llm, "model.llm")
        if kind != "from_pretrained":
            raise self.refuse("model.llm.type", f"{short_repr(llm.get('type'))}: xtune loads a pretrained model "
                              "(AutoModelForCausalLM.from_pretrained)")  # fmt: skip
        for key, value in llm.items():
            where = f"model.llm.{key}"
            if key == "type":
                continue
            if key == "pretrained_model_name_or_path":
                self.set(where, "llm_name_or_path", value)
            elif key == "trust_remote_code":
                if value:
                    self.out.notes.append(f"{where} = True is not carried over: xtune loads InternLM2 without its remote "
                                          "code, and a config read from XTuner never turns on code; models that need "
                                          "theirs: --cfg-options trust_remote_code=True")  # fmt: skip
            elif key == "quantization_config" and frozen and value is not None:
                self.out.notes.append(f"{where}: xtune loads a frozen LLaVA LLM whole, in the compute dtype (more memory "
                                      "than XTuner's 4-bit; the LLM is not trained either way)")  # fmt: skip
            elif key == "quantization_config":
                self.quantization(value, has_lora)
            elif key in ("load_in_4bit", "load_in_8bit"):  # from_pretrained's older spelling of the same
                if value:
                    self.quantization({"type": Ref("transformers.BitsAndBytesConfig"), key: True}, has_lora)
            elif key == "expert_in_one_shard":
                self.ignore(where, "xtune runs transformers' own MoE layers")
            elif key == "moe_implementation":
                self.ignore(where, "xtune runs transformers' own MoE layers")
            elif key == "torch_dtype":
                self.ignore(where, "xtune loads the frozen base in the compute dtype (`dtype`, from optim_wrapper.dtype)")
            elif key in ("attn_implementation", "device_map", "low_cpu_mem_usage"):
                self.ignore(where, "xtune chooses it (its own packed attention, device placement)")
            else:
                raise self.refuse(where, f"= {short_repr(value)}: xtune passes no such argument to the model")

    def quantization(self, config: Any, has_lora: bool) -> None:
        if config is None:
            return
        _, config = self.typed(config, "model.llm.quantization_config")
        four, eight = config.get("load_in_4bit", False), config.get("load_in_8bit", False)
        key = "model.llm.quantization_config"
        if four and eight:
            raise self.refuse(key, "load_in_4bit and load_in_8bit are both True; choose one")
        if config.get("bnb_4bit_quant_type", "nf4") != "nf4" and four:
            raise self.refuse(f"{key}.bnb_4bit_quant_type", "xtune's 4-bit loading is NF4 only")
        if four or eight:
            if not has_lora:
                raise self.refuse(key, "a quantized model cannot be trained in full; add lora=dict(type=LoraConfig, ...)")
            self.set(f"{key}.load_in_{'4' if four else '8'}bit", "quantization", "4bit" if four else "8bit")
            if four and not config.get("bnb_4bit_use_double_quant", True):
                self.out.notes.append(f"{key}.bnb_4bit_use_double_quant = False: xtune always double-quantizes")

    def lora(self, lora: Any, key: str) -> None:
        kind, lora = self.typed(lora, key)
        if kind != "LoraConfig":
            raise self.refuse(f"{key}.type", f"{short_repr(lora.get('type'))}: xtune's adapters are peft's LoraConfig")
        self.set(key, "method", "lora")
        names = {"r": "lora_r", "lora_alpha": "lora_alpha", "lora_dropout": "lora_dropout", "use_dora": "use_dora",
                 "use_rslora": "use_rslora", "modules_to_save": "modules_to_save"}  # fmt: skip
        for name, value in lora.items():
            where = f"{key}.{name}"
            if name in names:
                self.set(where, names[name], list(value) if name == "modules_to_save" else value)
            elif name == "target_modules":
                self.set(where, "lora_target_modules", "all-linear" if value is None else value)
            elif name == "bias" and value != "none":
                raise self.refuse(where, f"= {short_repr(value)}: xtune trains no biases with LoRA; use bias='none'")
            elif name not in ("type", "bias", "task_type"):
                raise self.refuse(where, f"= {short_repr(value)}: xtune has no such LoRA setting")
        if "target_modules" not in lora:
            self.out.notes.append(f"{key}: no target_modules: XTuner adapts every linear layer but the head, as "
                                  "xtune's 'all-linear' does")  # fmt: skip

    def vision(self, encoder: Any, lora: Any) -> None:
        _, encoder = self.typed(encoder, "model.visual_encoder")
        self.set("model.visual_encoder.pretrained_model_name_or_path", "visual_encoder_name_or_path",
                 encoder.get("pretrained_model_name_or_path"))  # fmt: skip
        if lora is not None:
            _, lora = self.typed(lora, "model.visual_encoder_lora")
            self.set("model.visual_encoder_lora", "visual_encoder_lora", True)
            for name, xtune_key in (("r", "visual_encoder_lora_r"), ("lora_alpha", "visual_encoder_lora_alpha")):
                if name in lora:
                    self.set(f"model.visual_encoder_lora.{name}", xtune_key, lora[name])

    # data ----------------------------------------------------------------------------------------------------
    def dataloader(self, loader: Any, stage: str) -> None:
        if not isinstance(loader, dict):
            raise ConfigError(f"{self.path}: an XTuner config sets `train_dataloader = dict(...)`; this one does not.")
        for key, value in loader.items():
            where = f"train_dataloader.{key}"
            if key == "batch_size":
                self.set(where, "batch_size", value)
            elif key == "num_workers":
                self.set(where, "dataloader_num_workers", value)
            elif key == "dataset":
                self.dataset(value, stage)
            elif key == "sampler":
                kind, _ = self.typed(value, where)
                if kind == "LengthGroupedSampler":
                    self.set(where, "group_by_length", True)
                else:
                    self.ignore(where, "xtune shuffles with `seed` (and groups unpacked samples by length)")
            elif key in ("collate_fn", "pin_memory", "persistent_workers", "prefetch_factor", "batch_sampler"):
                self.ignore(where, "xtune collates its own batches")
            else:
                raise self.refuse(where, f"= {short_repr(value)}: xtune's data loader has no such setting")

    def concat(self, dataset: dict, stage: str, key: str) -> None:
        """ConcatDataset(datasets=[...]) -> `datasets`, a source (path, format) per part; the parts' other
        settings (max_length, packing, template) must agree, as they do in XTuner's configs."""
        parts = dataset.get("datasets")
        if not isinstance(parts, (list, tuple)) or not parts:
            raise self.refuse(f"{key}.datasets", f"{short_repr(parts)}: a ConcatDataset lists its datasets")
        sources, shared = [], None
        for index, part in enumerate(parts):
            before = list(self.out.entries)
            self.dataset(part, stage, f"{key}.datasets[{index}]")
            added = {entry.xtune_key: entry.value for entry in self.out.entries if entry not in before}
            if "data_path" not in added:
                raise self.refuse(f"{key}.datasets[{index}]", "several data_files in one part of a ConcatDataset; "
                                  "list each file as a part of its own")  # fmt: skip
            sources.append({"path": added.pop("data_path"), "format": added.pop("dataset_format", "auto")})
            if shared is not None and added != shared:
                raise self.refuse(f"{key}.datasets[{index}]", "its settings differ from the first dataset's "
                                  f"({short_repr(added)} vs {short_repr(shared)}); xtune encodes every source alike")  # fmt: skip
            shared = added
            self.out.entries = [entry for entry in self.out.entries if entry.xtune_key not in ("data_path", "dataset_format")]
        self.set(f"{key}.datasets", "datasets", sources)

    def dataset(self, dataset: Any, stage: str, key: str = "train_dataloader.dataset") -> None:
        kind, dataset = self.typed(dataset, key)
        if kind == "ConcatDataset":
            return self.concat(dataset, stage, key)
        known = ("process_hf_dataset", "build_preference_dataset", "LLaVADataset")
        if kind not in known:
            why = UNREAD_DATASETS.get(kind, "")
            raise self.refuse(f"{key}.type", f"{short_repr(dataset.get('type'))}: xtune reads "
                              f"{', '.join(known)} and ConcatDataset datasets{why}")  # fmt: skip
        for name, value in dataset.items():
            where = f"{key}.{name}"
            if name == "type":
                continue
            if name == "dataset":
                self.source(value, where)
            elif name == "data_path":
                self.set(where, "data_path", value)
            elif name == "image_folder":
                self.set(where, "image_folder", value)
            elif name == "dataset_map_fn":
                try:
                    self.set(where, "dataset_format", _format_of(value, stage))
                except ValueError as why:
                    raise self.refuse(where, f"= {short_repr(value)}: {why}") from None
            elif name == "template_map_fn" and value is None:
                self.ignore(where, "no chat template: the text is trained as it is (pretraining)")
            elif name == "template_map_fn":
                self.template(value, where)
            elif name in ("max_length", "pack_to_max_length", "shuffle_before_pack", "pad_image_to_square", "num_proc"):
                self.set(where, name, value)
            elif name == "use_varlen_attn":
                if kind == "build_preference_dataset":
                    self.set(where, "pack_to_max_length", bool(value))
                self.out.notes.append(f"{where} = {value}: xtune's packed rows never attend across samples")
            elif name == "max_packed_length":
                self.out.notes.append(f"{where}: xtune packs pairs into rows of max_length tokens")
            elif name == "max_dataset_length" and value is not None:
                self.set(where, "max_dataset_length", value)
            elif name == "seed":
                self.ignore(where, "xtune shuffles with the run's `seed`")
            elif name == "reward_token_id":
                self.ignore(where, "xtune's reward is a score head at each answer's last token, no reward token")
            elif name in ("tokenizer", "image_processor", "remove_unused_columns", "is_dpo", "is_reward",
                          "max_dataset_length", "input_ids_with_output", "mode", "split", "map_num_proc"):  # fmt: skip
                self.ignore(where, "xtune reads the same data without it")
            else:
                raise self.refuse(where, f"= {short_repr(value)}: xtune's data road has no such setting")
        if "dataset_map_fn" not in dataset:
            self.set(f"{key}.dataset_map_fn", "dataset_format", _format_of(None, stage))
        values = self.out.values
        if "datasets" in values and "data_path" not in values and "max_dataset_length" in values:
            raise self.refuse(f"{key}.max_dataset_length", "with several data_files XTuner draws that many records from "
                              "all of them together, xtune from each source; concatenate the files into one")  # fmt: skip
        if "datasets" in values and "data_path" not in values:  # data_files listed several: each takes the format
            for source in values["datasets"]:
                source["format"] = values["dataset_format"]
            self.out.entries = [entry for entry in self.out.entries if entry.xtune_key != "dataset_format"]

    def source(self, value: Any, key: str) -> None:
        """load_dataset(path=...) or (path='json', data_files=...), or XTuner's load_jsonl_dataset(data_files=... or
        data_dir=...): `data_path`, or a source per file in `datasets` when there are several."""
        kind, value = self.typed(value, key)
        if kind not in ("load_dataset", "load_jsonl_dataset"):
            raise self.refuse(f"{key}.type", f"{short_repr(value.get('type'))}: xtune reads data as load_dataset "
                              "or load_jsonl_dataset name it (a path, or data_files)")  # fmt: skip
        path, files = value.get("path"), value.get("data_files")
        if kind == "load_jsonl_dataset" and value.get("data_dir") is not None:
            self.set(f"{key}.data_dir", "data_path", value["data_dir"])
            if value.get("suffix"):
                self.out.notes.append(f"{key}.suffix = {value['suffix']!r}: xtune reads every data file in the folder")
        elif files is not None:
            if isinstance(files, dict):
                files = files.get("train", next(iter(files.values()), None)) if len(files) == 1 or "train" in files else files
            files = [files] if isinstance(files, str) else files
            if not (isinstance(files, (list, tuple)) and files and all(isinstance(file, str) for file in files)):
                raise self.refuse(f"{key}.data_files", f"{short_repr(files)}: xtune reads data_files as a path or a "
                                  "list of paths")  # fmt: skip
            if len(files) == 1:
                self.set(f"{key}.data_files", "data_path", files[0])
            else:
                self.set(f"{key}.data_files", "datasets", [{"path": file} for file in files])
        elif isinstance(path, str) and kind == "load_dataset":
            self.set(f"{key}.path", "data_path", path)
            if "/" in path and not Path(path).exists() and not path.startswith(("xtune-tiny/", "xtune-data/", ".")):
                self.out.notes.append(f"{key}.path = {path!r} looks like a hub dataset id: xtune reads it from the local "
                                      "Hugging Face caches and downloads nothing")  # fmt: skip
        else:
            raise self.refuse(key, "neither path nor data_files names the data")

    def template(self, value: Any, key: str) -> None:
        from xtune.data.templates import TEMPLATES

        _, value = self.typed(value, key)
        template = value.get("template")
        name = template.name if isinstance(template, Ref) and "PROMPT_TEMPLATE" in template.path else None
        if name is None:
            raise self.refuse(f"{key}.template", f"{short_repr(template)}: xtune reads PROMPT_TEMPLATE.<name> here")
        if name not in TEMPLATES:
            raise self.refuse(f"{key}.template", f"PROMPT_TEMPLATE.{name}: xtune has no template of that name "
                              f"({', '.join(sorted(TEMPLATES))}; or 'hf', the tokenizer's own)")  # fmt: skip
        self.set(f"{key}.template", "prompt_template", name)

    # optimisation ------------------------------------------------------------------------------------------------
    def optimizer(self, wrapper: Any) -> None:
        if wrapper is None:
            return
        kind, wrapper = self.typed(wrapper, "optim_wrapper")
        for key, value in wrapper.items():
            where = f"optim_wrapper.{key}"
            if key == "optimizer":
                self.optimizer_args(value)
            elif key == "clip_grad":
                self.set(f"{where}.max_norm" if value else where, "max_norm", value.get("max_norm") if value else None)
            elif key == "accumulative_counts":
                self.set(where, "accumulative_counts", value)
            elif key == "dtype":
                if value not in PRECISIONS:
                    raise self.refuse(where, f"= {short_repr(value)}: xtune computes in {', '.join(PRECISIONS)}")
                self.set(where, "dtype", PRECISIONS[value])
            elif key in ("type", "loss_scale"):
                continue
            else:
                raise self.refuse(where, f"= {short_repr(value)}: xtune's optimizer has no such setting")
        if kind == "OptimWrapper" and "dtype" not in wrapper:
            self.set("optim_wrapper.type", "dtype", "fp32")

    def optimizer_args(self, optimizer: Any) -> None:
        kind, optimizer = self.typed(optimizer, "optim_wrapper.optimizer")
        if kind not in OPTIMIZERS:
            raise self.refuse("optim_wrapper.optimizer.type", f"{short_repr(optimizer.get('type'))}: xtune's "
                              f"optimizers are {', '.join(OPTIMIZERS)}")  # fmt: skip
        self.set("optim_wrapper.optimizer.type", "optim_type", OPTIMIZERS[kind])
        for key, value in optimizer.items():
            where = f"optim_wrapper.optimizer.{key}"
            if key in ("lr", "weight_decay"):
                self.set(where, key, value)
            elif key == "betas":
                self.set(where, "betas", tuple(value))
            elif key == "eps" and value == 1e-8 or key == "type":
                continue
            else:
                raise self.refuse(where, f"= {short_repr(value)}: xtune's AdamW takes lr, betas and weight_decay")

    def schedule(self, schedulers: Any) -> None:
        if schedulers is None:
            return
        schedulers = schedulers if isinstance(schedulers, list) else [schedulers]
        loop = self.env.get("train_cfg") if isinstance(self.env.get("train_cfg"), dict) else {}
        max_epochs = loop.get("max_epochs")
        warmup = 0.0
        for index, scheduler in enumerate(schedulers):
            where = f"param_scheduler[{index}]"
            kind, scheduler = self.typed(scheduler, where)
            by_epoch = scheduler.get("by_epoch", True)
            if kind == "LinearLR" and index == 0 and len(schedulers) == 2:
                length = scheduler.get("end", 0) - scheduler.get("begin", 0)
                if by_epoch and max_epochs:
                    warmup = length / max_epochs
                elif by_epoch and "max_iters" not in loop:
                    raise self.refuse(where, "a warmup in epochs, and train_cfg names no max_epochs to relate it to")
                else:
                    self.set(f"{where}.end", "warmup_steps", math.ceil(length))
                    if by_epoch:  # mmengine would stretch it by the epoch length, past max_iters; its author meant iterations
                        self.out.notes.append(f"{where}: by_epoch=True in a loop counted in iterations "
                                              f"(train_cfg.max_iters): read as {math.ceil(length)} iterations")  # fmt: skip
                self.out.notes.append(f"{where}.start_factor = {scheduler.get('start_factor')}: xtune's warmup starts "
                                      "from 0")  # fmt: skip
            elif kind == "CosineAnnealingLR" and index == len(schedulers) - 1:
                lr = self.out.values.get("lr")
                eta_min = scheduler.get("eta_min", 0.0)
                if eta_min and not lr:
                    raise self.refuse(f"{where}.eta_min", "a floor without optim_wrapper.optimizer.lr to relate it to")
                self.set(f"{where}.eta_min", "lr_min_ratio", eta_min / lr if eta_min else 0.0)
            else:
                raise self.refuse(where, f"{kind}: xtune's schedule is a linear warmup (LinearLR) then a cosine decay "
                                  "(CosineAnnealingLR)")  # fmt: skip
        if "warmup_steps" not in self.out.values:
            self.set("param_scheduler[0].end", "warmup_ratio", round(warmup, 12))

    def train_cfg(self, cfg: Any) -> None:
        if cfg is None:
            return
        _, cfg = self.typed(cfg, "train_cfg")
        for key, value in cfg.items():
            if key == "max_epochs":
                self.set("train_cfg.max_epochs", "max_epochs", value)
            elif key == "max_iters":
                steps = math.ceil(value / self.out.values.get("accumulative_counts", 1))
                self.set("train_cfg.max_iters", "max_steps", steps)
                self.out.notes.append(f"train_cfg.max_iters = {value} micro-batches: {steps} optimizer steps "
                                      "(divided by accumulative_counts)")  # fmt: skip
            elif key == "val_interval":
                self.ignore(f"train_cfg.{key}", "xtune's validation runs every eval_steps")
            elif key != "type":
                raise self.refuse(f"train_cfg.{key}", f"= {short_repr(value)}: xtune's loop has no such setting")

    # hooks and runtime -------------------------------------------------------------------------------------------
    def hooks(self, hooks: list) -> None:
        for index, hook in enumerate(hooks):
            where = f"custom_hooks[{index}]"
            kind, hook = self.typed(hook, where)
            if kind in IGNORED_HOOKS:
                self.ignore(f"{where} ({kind})", IGNORED_HOOKS[kind])
            elif kind == "EvaluateChatHook":
                self.evaluate(hook, where)
            else:
                raise self.refuse(where, f"{short_repr(hook.get('type'))}: a hook xtune does not run")

    def evaluate(self, hook: dict, where: str) -> None:
        from xtune.data.templates import SYSTEM_TEMPLATES

        for key, value in hook.items():
            if key == "every_n_iters":
                self.set(f"{where}.every_n_iters", "evaluation_freq", value)
            elif key == "evaluation_inputs":
                self.set(f"{where}.evaluation_inputs", "evaluation_inputs", list(value))
            elif key == "system":
                self.set(f"{where}.system", "SYSTEM", self.system(value, f"{where}.system", SYSTEM_TEMPLATES))
            elif key == "max_new_tokens":
                self.set(f"{where}.max_new_tokens", "evaluation_max_new_tokens", value)
            elif key == "evaluation_images":
                images = [value] if isinstance(value, str) else list(value or [])
                if any(str(image).startswith(("http://", "https://")) for image in images):
                    self.out.notes.append(f"{where}.evaluation_images: xtune reads no URLs; set evaluation_images to "
                                          "local files")  # fmt: skip
                else:
                    self.set(f"{where}.evaluation_images", "evaluation_images", images)
            elif key == "prompt_template":
                template = value.name if isinstance(value, Ref) else value
                if self.out.values.get("prompt_template") not in (None, template):
                    raise self.refuse(f"{where}.prompt_template", f"{template}, but the data is rendered with "
                                      f"{self.out.values['prompt_template']}; xtune evaluates with the training template")  # fmt: skip
            elif key in ("type", "tokenizer", "image_processor", "stop_words", "stop_word", "generation_kwargs"):
                continue
            else:
                raise self.refuse(f"{where}.{key}", f"= {short_repr(value)}: xtune's evaluation has no such setting")

    def system(self, value: Any, key: str, known: dict[str, str]) -> str:
        if isinstance(value, Ref):
            if value.name not in known:
                raise self.refuse(key, f"SYSTEM_TEMPLATE.{value.name}: xtune has no system prompt of that name "
                                  f"({', '.join(known)}); write the text out")  # fmt: skip
            return known[value.name]
        if value is None:
            return ""
        if not isinstance(value, str):
            raise self.refuse(key, f"{short_repr(value)}: a system prompt is text")
        return value

    def default_hooks(self, hooks: dict) -> None:
        for name, hook in hooks.items():
            where = f"default_hooks.{name}"
            kind, hook = self.typed(hook, where) if hook is not None else (None, {})
            if kind == "CheckpointHook":
                if hook.get("by_epoch", True):
                    raise self.refuse(f"{where}.by_epoch", "xtune saves every save_steps optimizer steps; set "
                                      "by_epoch=False")  # fmt: skip
                if hook.get("interval") == -1:  # mmengine: no checkpoint by interval
                    self.set(f"{where}.interval", "save_steps", 10**9)
                    self.out.notes.append(f"{where}.interval = -1: no checkpoint on the way, one at the end")
                elif "interval" in hook:
                    self.set(f"{where}.interval", "save_steps", hook["interval"])
                if "max_keep_ckpts" in hook:
                    self.set(f"{where}.max_keep_ckpts", "save_total_limit", hook["max_keep_ckpts"])
            elif kind == "LoggerHook":
                if "interval" in hook:
                    self.set(f"{where}.interval", "logging_steps", hook["interval"])
            elif kind in IGNORED_HOOKS or hook is None:
                self.ignore(where, IGNORED_HOOKS.get(kind, "unset"))
            else:
                raise self.refuse(where, f"{short_repr(hook.get('type'))}: a hook xtune does not run")

    def runtime(self) -> None:
        for key, why in IGNORED_TOP_LEVEL.items():
            if key in self.env:
                self.ignore(key, why)
        randomness = self.env.get("randomness")
        if isinstance(randomness, dict) and randomness.get("seed") is not None:
            self.set("randomness.seed", "seed", randomness["seed"])
        elif randomness is not None:
            self.out.notes.append("randomness.seed = None: xtune seeds every run (seed = 0 unless set)")
        if self.env.get("load_from") is not None:
            raise self.refuse("load_from", "xtune starts from llm_name_or_path (a merged model folder), or resumes "
                              "its own checkpoints with --resume")  # fmt: skip
        if self.env.get("resume"):
            raise self.refuse("resume", "= True: pass --resume auto to `xtune train`")
        if isinstance(self.env.get("work_dir"), str):
            self.set("work_dir", "work_dir", self.env["work_dir"])
        for key in ("val_dataloader", "val_cfg", "val_evaluator", "test_dataloader", "test_cfg", "test_evaluator"):
            if self.env.get(key) is not None:
                raise self.refuse(key, "xtune validates on val_data_path / val_split; convert the config and set those")


def read_xtuner_config(path: Path) -> XtunerConfig:
    """An XTuner config file -> xtune's values, without running or importing anything."""
    env, lines = read_file(path)
    return _Mapper(path, env, lines).map()


def to_python(config: XtunerConfig) -> str:
    """The equivalent xtune config: each key with the XTuner key it came from, then what was ignored and noted."""
    out = [f"# xtune config read from the XTuner config {config.path} (nothing of that file was run).",
           "# Each key names the XTuner key it came from.", ""]  # fmt: skip
    for entry in config.entries:
        out.append(f"{entry.xtune_key} = {entry.value!r}  # {entry.xtuner_key}")
    if config.notes:
        out += ["", "# Notes:"] + [f"#   {note}" for note in config.notes]
    if config.ignored:
        out += ["", "# Ignored (no meaning in xtune, they change nothing):"] + [f"#   {item}" for item in config.ignored]
    return "\n".join(out) + "\n"
