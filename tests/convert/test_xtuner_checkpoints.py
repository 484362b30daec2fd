"""XTuner 0.1.x checkpoints (iter_N.pth files, mmengine's dict, DeepSpeed folders), built here in XTuner's key
layout from xtune adapters, convert back to the same model; bad paths are refused before anything loads. ZeRO-3
folders are written by DeepSpeed itself, over two gloo processes."""

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import LoraConfig, get_peft_model, get_peft_model_state_dict
from rich.console import Console
from safetensors.torch import load_file

from xtune.config.load import load_config
from xtune.convert.folder import find_checkpoint
from xtune.convert.merge import merge
from xtune.convert.pth_to_hf import pth_to_hf
from xtune.convert.xtuner import load_xtuner_state
from xtune.engine.checkpoint import RUN_META
from xtune.errors import CheckpointError
from xtune.models.internlm2 import attention_shape, fuse_wqkv, llama_to_internlm2_state_dict
from xtune.models.llava import Projector
from xtune.models.load import load_model, read_config, resolve_model_path
from xtune.models.lora import attach_adapter

BASE = "xtune-tiny/internlm2-chat"
CONFIG = "tiny_internlm2_chat_lora_antonyms"
INPUT = torch.tensor([[1, 300, 301, 302, 400, 500, 7, 8]])
TO_INTERNLM2 = {"self_attn.o_proj": "attention.wo", "mlp.gate_proj": "feed_forward.w1", "mlp.up_proj": "feed_forward.w3",
                "mlp.down_proj": "feed_forward.w2"}  # fmt: skip
QUIET = Console(file=io.StringIO())


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(xtune adapter folder, the same adapter in XTuner's names): q/k/v share lora_A, as one LoRA on wqkv does."""
    config, _ = load_config(CONFIG)
    torch.manual_seed(0)
    model = load_model(resolve_model_path(BASE))
    lora = LoraConfig(r=4, lora_alpha=config.lora_alpha, init_lora_weights=False, task_type="CAUSAL_LM",
                      target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])  # fmt: skip
    peft_model = get_peft_model(model, lora)
    with torch.no_grad():
        for name, module in peft_model.named_modules():
            if name.endswith("self_attn"):
                module.k_proj.lora_A.default.weight.copy_(module.q_proj.lora_A.default.weight)
                module.v_proj.lora_A.default.weight.copy_(module.q_proj.lora_A.default.weight)
            if hasattr(module, "lora_B"):
                module.lora_B.default.weight.mul_(0.05)
    folder = tmp_path_factory.mktemp("reference")
    peft_model.save_pretrained(folder)
    (folder / RUN_META).write_text(json.dumps({"llm_name_or_path": BASE, "method": "lora"}))
    return folder, xtuner_names(get_peft_model_state_dict(peft_model), read_config(resolve_model_path(BASE)))


def xtuner_names(adapter: dict, config: dict) -> dict:
    """What XTuner's SupervisedFinetune.state_dict() holds for this adapter on InternLM2's own modules."""
    state = {}
    for name, tensor in adapter.items():
        prefix, module, factor = name.split(".layers.")[0], name.split(".layers.")[1].rsplit(".lora_", 1)[0], name.rsplit(".lora_", 1)[1]
        layer, module = module.split(".", 1)
        key = lambda internlm2: f"llm.{prefix}.layers.{layer}.{internlm2}.lora_{factor.replace('.weight', '.default.weight')}"  # noqa: E731
        if module == "self_attn.q_proj":
            if factor.startswith("A"):
                state[key("attention.wqkv")] = tensor
            else:
                k, v = (adapter[name.replace("q_proj", kv)] for kv in ("k_proj", "v_proj"))
                state[key("attention.wqkv")] = fuse_wqkv(tensor, k, v, *attention_shape(config))
        elif module in TO_INTERNLM2:
            state[key(TO_INTERNLM2[module])] = tensor
    return state


def fake_mmengine(monkeypatch):
    """A class pickled under mmengine's HistoryBuffer name, as mmengine's message hub holds them."""
    module = types.ModuleType("mmengine.logging.history_buffer")

    class HistoryBuffer:
        def __init__(self):
            self._log_history, self.max_length = np.array([1.5, 2.5]), 1000000

    HistoryBuffer.__module__, HistoryBuffer.__qualname__ = module.__name__, "HistoryBuffer"
    module.HistoryBuffer = HistoryBuffer
    for name in ("mmengine", "mmengine.logging", "mmengine.logging.history_buffer"):
        monkeypatch.setitem(sys.modules, name, module if name == module.__name__ else types.ModuleType(name))
    return HistoryBuffer


def layouts(state, tmp_path, monkeypatch):
    plain = tmp_path / "plain" / "iter_2.pth"
    plain.parent.mkdir()
    torch.save(state, plain)
    mmengine = tmp_path / "mmengine" / "iter_2.pth"
    mmengine.parent.mkdir()
    buffer = fake_mmengine(monkeypatch)()
    torch.save({"meta": {"cfg": "model = dict(...)", "seed": 0, "iter": 2}, "state_dict": state,
                "message_hub": {"log_scalars": {"train/loss": buffer}}}, mmengine)  # fmt: skip
    deepspeed = tmp_path / "deepspeed" / "iter_2.pth"
    deepspeed.mkdir(parents=True)
    torch.save({"module": state, "buffer_names": [], "ds_version": "0.14.0", "iter": 2}, deepspeed / "mp_rank_00_model_states.pt")
    monkeypatch.delitem(sys.modules, "mmengine")  # reading needs no mmengine
    return {"plain": plain, "mmengine": mmengine, "deepspeed": deepspeed}


def logits(adapter):
    with torch.no_grad():
        return attach_adapter(load_model(resolve_model_path(BASE)), adapter, BASE).eval()(INPUT).logits


def test_each_xtuner_layout_converts_to_the_adapter_it_was_built_from(reference, tmp_path, monkeypatch):
    folder, state = reference
    expected = logits(folder)
    assert not torch.allclose(expected, logits_of_base(), atol=1e-3)  # the adapter changes the model
    for layout, pth in layouts(state, tmp_path, monkeypatch).items():
        out = pth_to_hf(CONFIG, pth, tmp_path / f"hf-{layout}", fp32=True, console=QUIET)
        assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
        assert torch.allclose(logits(out), expected, atol=1e-5), layout


def logits_of_base():
    with torch.no_grad():
        return load_model(resolve_model_path(BASE)).eval()(INPUT).logits


def test_a_llava_stage_2_starts_from_an_xtuner_projector(tmp_path, monkeypatch):
    torch.manual_seed(1)
    projector = Projector(32, 256, depth=2)
    pth = tmp_path / "iter_2181.pth"
    torch.save({"meta": {"iter": 2181}, "state_dict": {f"projector.{k}": v for k, v in projector.state_dict().items()}}, pth)
    loaded = Projector.load(pth)
    assert loaded.settings == projector.settings
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in projector.state_dict().items())


def refuse_loading(monkeypatch):
    def loads(*_, **__):
        raise AssertionError("loaded something before refusing the path")

    for target in ("xtune.convert.pth_to_hf.load_config", "xtune.convert.merge.resolve_model_path",
                   "xtune.engine.train.load_tokenizer", "xtune.engine.train.resolve_model_path"):  # fmt: skip
        monkeypatch.setattr(target, loads)


def test_a_missing_path_is_refused_before_anything_loads(tmp_path, monkeypatch):
    from xtune.engine.train import train

    config, _ = load_config("tiny_llava_finetune_shapes", [f"pretrained_pth={str(tmp_path / 'iter_2181.pth')!r}", f"work_dir={str(tmp_path / 'w')!r}"])
    refuse_loading(monkeypatch)
    with pytest.raises(CheckpointError, match="iter_2181.pth.*no such file"):
        train(config, QUIET)
    with pytest.raises(CheckpointError, match="iter_5.pth.*no such file"):
        pth_to_hf(CONFIG, tmp_path / "iter_5.pth", tmp_path / "out", console=QUIET)
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        pth_to_hf(CONFIG, tmp_path / "checkpoint-9", tmp_path / "out", console=QUIET)
    (tmp_path / "iter_6.pth").mkdir()
    with pytest.raises(CheckpointError, match="not a DeepSpeed checkpoint"):
        merge(BASE, tmp_path / "iter_6.pth", tmp_path / "out", console=QUIET)


def test_pickled_code_is_refused(tmp_path, reference):
    pth = tmp_path / "iter_1.pth"
    torch.save({"state_dict": reference[1], "hook": io.StringIO}, pth)  # a global outside tensors and mmengine's
    with pytest.raises(CheckpointError, match="io.StringIO.*weights_only=True"):
        pth_to_hf(CONFIG, pth, tmp_path / "out", console=QUIET)


def test_a_work_dir_resolves_to_its_newest_runs_newest_checkpoint(tmp_path):
    for run, step in (("20260101_000000", 9), ("20260102_000000", 1), ("20260102_000000", 3), ("20260103_000000", None)):
        (tmp_path / run).mkdir(exist_ok=True)
        if step is not None:
            (tmp_path / run / f"checkpoint-{step}").mkdir()
            (tmp_path / run / f"checkpoint-{step}" / RUN_META).write_text("{}")
    assert find_checkpoint(tmp_path) == tmp_path / "20260102_000000" / "checkpoint-3"


def test_the_mmengine_layout_holds_objects_that_weights_only_alone_refuses(tmp_path, monkeypatch):
    pth = layouts({"projector.model.0.weight": torch.ones(2, 2)}, tmp_path, monkeypatch)["mmengine"]
    unsafe = set(torch.serialization.get_unsafe_globals_in_checkpoint(pth))
    assert "mmengine.logging.history_buffer.HistoryBuffer" in unsafe and any(name.startswith("numpy") for name in unsafe)


def test_merge_is_clip_folds_a_vision_encoder_adapter_in(tmp_path):
    from transformers import CLIPVisionModel

    from xtune.convert.merge import merge_visual_encoder
    from xtune.models.llava import VISION_LORA_TARGETS, load_visual_encoder

    base = resolve_model_path("xtune-tiny/clip-vision")
    torch.manual_seed(2)
    encoder = get_peft_model(load_visual_encoder(base), LoraConfig(r=4, lora_alpha=8, target_modules=VISION_LORA_TARGETS, init_lora_weights=False))
    encoder.save_pretrained(tmp_path / "llava" / "visual_encoder_adapter")
    pixels = torch.randn(1, 3, encoder.config.image_size, encoder.config.image_size)
    with torch.no_grad():
        expected = encoder.eval()(pixels).last_hidden_state
        out = merge_visual_encoder("xtune-tiny/clip-vision", tmp_path / "llava", tmp_path / "merged", fp32=True, console=QUIET)
        merged = CLIPVisionModel.from_pretrained(out).eval()(pixels).last_hidden_state
    assert torch.allclose(merged, expected, atol=1e-5)
    assert (out / "preprocessor_config.json").is_file()


def test_an_internlm2_adapter_keeps_xtuners_own_names_as_its_pth_to_hf_writes_them(reference, tmp_path, monkeypatch):
    """XTuner's pth_to_hf writes InternLM2's adapter on wqkv/wo/w1-w3 (what LMDeploy reads): so does xtune's."""
    _, state = reference
    out = pth_to_hf(CONFIG, layouts(state, tmp_path, monkeypatch)["plain"], tmp_path / "hf", fp32=True, console=QUIET)
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert set(adapter_config["target_modules"]) == {"wqkv", "wo", "w1", "w2", "w3"} and adapter_config["r"] == 4


@pytest.fixture(scope="module")
def full_fine_tune():
    """(the trained model, XTuner's state of it: llm.model.*, in InternLM2's own names)."""
    torch.manual_seed(3)
    trained = load_model(resolve_model_path(BASE))
    with torch.no_grad():
        for parameter in trained.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    own_names = llama_to_internlm2_state_dict(trained.state_dict(), read_config(resolve_model_path(BASE)))
    return trained.eval(), {f"llm.{name}": tensor for name, tensor in own_names.items()}


def full_logits(folder):
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder).eval()(INPUT).logits


def test_a_full_fine_tune_becomes_a_model_folder(full_fine_tune, tmp_path, monkeypatch):
    """XTuner's full weights (llm.model.*, in InternLM2's own names) -> a model folder with their logits."""
    trained, state = full_fine_tune
    with torch.no_grad():
        expected = trained(INPUT).logits
    for layout, pth in layouts(state, tmp_path, monkeypatch).items():
        out = pth_to_hf(CONFIG, pth, tmp_path / f"full-{layout}", fp32=True, console=QUIET)
        assert torch.allclose(full_logits(out), expected, atol=1e-5), layout
    broken = tmp_path / "broken.pth"
    torch.save({name: tensor for name, tensor in list(state.items())[1:]}, broken)
    with pytest.raises(CheckpointError, match="do not fit xtune-tiny/internlm2-chat"):
        pth_to_hf(CONFIG, broken, tmp_path / "broken-out", fp32=True, console=QUIET)


def test_a_zero3_folder_and_a_pth_given_to_merge_say_what_to_do(reference, tmp_path, monkeypatch):
    _, state = reference
    zero3 = tmp_path / "zero3" / "iter_2.pth"
    zero3.mkdir(parents=True)
    torch.save({"module": {name: torch.empty(0) for name in state}}, zero3 / "mp_rank_00_model_states.pt")
    with pytest.raises(CheckpointError, match="ZeRO-3 placeholders .* no ZeRO-3 zero_pp_rank_0_mp_rank_00_model_states.pt"):
        pth_to_hf(CONFIG, zero3, tmp_path / "out", console=QUIET)
    pth = layouts(state, tmp_path, monkeypatch)["plain"]
    with pytest.raises(CheckpointError, match="alpha is in the config it was trained with, which is not beside it.*--config"):
        merge(BASE, pth, tmp_path / "merged")
    assert not (tmp_path / "out").exists() and not (tmp_path / "merged").exists()


def test_merge_takes_an_iter_pth_with_the_config_xtuner_keeps_beside_it(reference, tmp_path, monkeypatch):
    """`xtuner convert merge` wants pth_to_hf's folder; xtune also takes the .pth, its alpha read from the config."""
    folder, state = reference
    expected = merge(BASE, folder, tmp_path / "from-adapter", fp32=True, console=QUIET)
    pth = layouts(state, tmp_path, monkeypatch)["deepspeed"]
    xtuner_config = pth.parent / "tiny_xtuner_cfg.py"  # as XTuner writes work_dirs/<cfg>/<cfg>.py
    xtuner_config.write_text(TINY_XTUNER)
    merged = merge(BASE, pth, tmp_path / "from-pth", fp32=True, console=QUIET)
    assert not list(tmp_path.glob(".xtune-merge-*"))  # the scratch conversion is gone
    with torch.no_grad():
        want = load_model(expected, dtype=torch.float32).eval()(INPUT).logits
        got = load_model(merged, dtype=torch.float32).eval()(INPUT).logits
    assert torch.allclose(got, want, atol=1e-5) and torch.allclose(want, logits(folder), atol=1e-4)
    xtuner_config.unlink()
    again = merge(BASE, pth, tmp_path / "with-config", fp32=True, console=QUIET, config=CONFIG)
    assert (again / "model.safetensors").is_file()


TINY_XTUNER = """
from datasets import load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from xtuner.dataset import process_hf_dataset
from xtuner.model import SupervisedFinetune
model = dict(type=SupervisedFinetune,
             llm=dict(type=AutoModelForCausalLM.from_pretrained, pretrained_model_name_or_path='xtune-tiny/internlm2-chat'),
             lora=dict(type=LoraConfig, r=4, lora_alpha=32, lora_dropout=0.0, bias='none', task_type='CAUSAL_LM'))
train_dataloader = dict(batch_size=1, dataset=dict(type=process_hf_dataset, dataset=dict(type=load_dataset,
                        path='xtune-tiny/antonyms')))
"""


ODD_PROJECTOR = Projector(31, 255, depth=2)
"""Every weight's numel is odd, so two ranks' shares of it are padded."""


def frozen_base() -> dict:
    """The base weights a LoRA run freezes, under the names XTuner's PEFT-wrapped InternLM2 gives them."""
    config = read_config(resolve_model_path(BASE))
    own_names = llama_to_internlm2_state_dict(load_model(resolve_model_path(BASE)).state_dict(), config)
    lora_modules = ("wqkv", "wo", "w1", "w2", "w3")
    return {f"llm.base_model.model.{name.removesuffix('.weight')}.base_layer.weight" if name.split(".")[-2] in lora_modules
            else f"llm.base_model.model.{name}": tensor for name, tensor in own_names.items()}  # fmt: skip


@pytest.fixture(scope="module")
def zero3(reference, full_fine_tune, tmp_path_factory):
    """work_dirs/<cfg>/ with ZeRO-3 iter_N.pth/ folders DeepSpeed wrote on two gloo ranks: the LoRA adapter in bf16
    (frozen base left out, as XTuner saves) and in fp32 (frozen base saved), the full fine-tune, and a LLaVA
    stage-1 projector with a frozen encoder and LLM beside it."""
    pytest.importorskip("deepspeed")
    work_dir = tmp_path_factory.mktemp("work_dirs")
    base = frozen_base()
    torch.manual_seed(4)
    with torch.no_grad():
        for parameter in ODD_PROJECTOR.parameters():
            parameter.normal_()
    projector = {f"projector.{name}": tensor for name, tensor in ODD_PROJECTOR.state_dict().items()}
    frozen_llava = {"visual_encoder.embeddings.patch_embedding.weight": torch.randn(9, 3, 2, 2),
                    "llm.model.norm.weight": torch.randn(7)}  # fmt: skip
    checkpoints = [("lora-bf16", "bf16", reference[1], base, True), ("lora-fp32", "fp32", reference[1], base, False),
                   ("full", "fp32", full_fine_tune[1], {}, True), ("projector", "fp32", projector, frozen_llava, True)]  # fmt: skip
    spec = work_dir / "spec.pt"
    torch.save([{"tag": f"{name}/iter_2.pth", "dtype": dtype, "trained": trained, "frozen": frozen, "exclude_frozen": exclude}
                for name, dtype, trained, frozen, exclude in checkpoints], spec)  # fmt: skip
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    writer = Path(__file__).with_name("deepspeed_zero3_writer.py")
    ranks = []
    for rank in range(2):
        environment = {**os.environ, "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2",
                       "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1"}  # fmt: skip
        ranks.append(subprocess.Popen([sys.executable, str(writer), str(spec), str(work_dir)], env=environment,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))  # fmt: skip
    logs = [rank.communicate(timeout=600)[1] for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], logs[0][-3000:] + logs[1][-3000:]
    return {name: work_dir / name / "iter_2.pth" for name, *_ in checkpoints}


def test_zero3_folders_deepspeed_wrote_hold_their_weights_partitioned(zero3, monkeypatch):
    """What makes ZeRO-3 differ: the model states hold no weights, every rank's optimizer file a padded share."""
    files = sorted(path.name for path in zero3["lora-bf16"].iterdir())
    assert files == ["bf16_zero_pp_rank_0_mp_rank_00_optim_states.pt", "bf16_zero_pp_rank_1_mp_rank_00_optim_states.pt",
                     "zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]  # fmt: skip
    fake_mmengine(monkeypatch)
    model_states = torch.load(zero3["projector"] / "zero_pp_rank_1_mp_rank_00_model_states.pt", weights_only=False)
    assert all(tensor.numel() == 0 for tensor in model_states["module"].values())
    assert type(model_states["message_hub"]["log_scalars"]["train/loss"]).__name__ == "HistoryBuffer"
    optimizer = torch.load(zero3["projector"] / "zero_pp_rank_1_mp_rank_00_optim_states.pt", weights_only=False)
    numels = [parameter.numel() for parameter in ODD_PROJECTOR.parameters()]
    assert all(numel % 2 for numel in numels)
    groups = optimizer["optimizer_state_dict"]["fp32_flat_groups"]
    assert len(groups) == 2 and sum(group.numel() for group in groups) == sum((n + 1) // 2 for n in numels)
    assert torch.load(zero3["lora-fp32"] / "zero_pp_rank_0_mp_rank_00_model_states.pt", weights_only=False)["frozen_param_fragments"]


def test_zero3_weights_gather_as_deepspeeds_zero_to_fp32_gathers_them(zero3, monkeypatch):
    """xtune's reading (weights_only) gives what DeepSpeed's own script (which unpickles) gives, frozen base aside."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    fake_mmengine(monkeypatch)
    for name, folder in zero3.items():
        ours = load_xtuner_state(folder)
        theirs = get_fp32_state_dict_from_zero_checkpoint(folder.parent, tag=folder.name, exclude_frozen_parameters=True)
        assert ours.keys() == theirs.keys() and all(torch.equal(ours[key], theirs[key]) for key in ours), name


def test_a_zero3_lora_folder_converts_to_the_adapter_it_was_built_from(reference, zero3, tmp_path, monkeypatch):
    folder, state = reference
    out = pth_to_hf(CONFIG, zero3["lora-fp32"], tmp_path / "hf-fp32", fp32=True, console=QUIET)
    assert torch.allclose(logits(out), logits(folder), atol=1e-5)
    # bf16 training keeps fp32 master weights of the bf16 ones: the adapter is the bf16-rounded one
    rounded = {name: tensor.to(torch.bfloat16).float() for name, tensor in state.items()}
    plain = pth_to_hf(CONFIG, layouts(rounded, tmp_path, monkeypatch)["plain"], tmp_path / "hf-plain", fp32=True, console=QUIET)
    out = pth_to_hf(CONFIG, zero3["lora-bf16"], tmp_path / "hf-bf16", fp32=True, console=QUIET)
    converted, expected = (load_file(folder / "adapter_model.safetensors") for folder in (out, plain))
    assert converted.keys() == expected.keys() and all(torch.equal(converted[name], expected[name]) for name in expected)
    assert torch.allclose(logits(out), logits(plain), atol=1e-5)


def test_a_zero3_full_fine_tune_and_projector_convert(full_fine_tune, zero3, tmp_path):
    trained, _ = full_fine_tune
    out = pth_to_hf(CONFIG, zero3["full"], tmp_path / "full", fp32=True, console=QUIET)
    with torch.no_grad():
        assert torch.allclose(full_logits(out), trained(INPUT).logits, atol=1e-5)
    loaded = Projector.load(zero3["projector"])  # pretrained_pth = ".../iter_2.pth"
    assert loaded.settings == ODD_PROJECTOR.settings
    assert all(torch.equal(loaded.state_dict()[name], tensor) for name, tensor in ODD_PROJECTOR.state_dict().items())


def test_a_zero3_folder_with_pickled_code_or_a_missing_rank_is_refused(zero3, tmp_path, monkeypatch):
    folder = shutil.copytree(zero3["lora-fp32"], tmp_path / "iter_2.pth")
    optim = folder / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    torch.save(torch.load(optim, weights_only=False) | {"hook": io.StringIO}, optim)
    with pytest.raises(CheckpointError, match="zero_pp_rank_1_mp_rank_00_optim_states.pt holds pickled objects of _io.StringIO"):
        pth_to_hf(CONFIG, folder, tmp_path / "out", console=QUIET)
    optim.unlink()
    refuse_loading(monkeypatch)
    with pytest.raises(CheckpointError, match=r"optimizer files of ranks \[0\] and model states of ranks \[0, 1\]"):
        pth_to_hf(CONFIG, folder, tmp_path / "out", console=QUIET)
    assert not (tmp_path / "out").exists()


def test_a_llava_runs_internlm2_lora_converts_to_the_llm_adapter_xtunes_llava_loads(reference, tmp_path, xtune_home):
    """XTuner's LLaVAModel state: the LLM's LoRA in InternLM2's names (`llm.`), the projector (`projector.`). The
    adapter becomes llm_adapter/ in the Llama layout a LLaVA model is built in, with the logits of the adapter it was
    made from; the projector comes back as it was."""
    from xtune.models.llava import load_llava

    folder, llm_state = reference
    llm_hidden = read_config(resolve_model_path(BASE))["hidden_size"]
    torch.manual_seed(2)
    projector = Projector(64, llm_hidden, depth=2)  # xtune-tiny/clip-vision's width -> the LLM's
    pth = tmp_path / "iter_2.pth"
    torch.save({"meta": {"iter": 2}, "state_dict": {**llm_state, **{f"projector.{k}": v for k, v in projector.state_dict().items()}}}, pth)
    out = pth_to_hf("tiny_llava_finetune_shapes", pth, tmp_path / "hf", fp32=True, console=QUIET)
    adapter_config = json.loads((out / "llm_adapter" / "adapter_config.json").read_text())
    assert "q_proj" in adapter_config["target_modules"] and adapter_config["base_model_name_or_path"] == BASE
    assert torch.allclose(logits(out / "llm_adapter"), logits(folder), atol=1e-5)
    loaded = Projector.load(out / "projector")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in projector.state_dict().items())

    llava, _ = load_llava(BASE, "xtune-tiny/clip-vision", out)  # what `xtune chat --llava` builds from it
    with torch.no_grad():
        text_logits = llava.llm(INPUT).logits
    assert torch.allclose(text_logits, logits(folder), atol=1e-5)
