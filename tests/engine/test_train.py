import io

import pytest
from rich.console import Console

from xtune.config.load import load_config
from xtune.engine.train import train


@pytest.mark.parametrize("packed", [False, True])
def test_short_run_loss_falls_packed_or_not(tmp_path, packed):
    overrides = [f"work_dir={str(tmp_path)!r}", "max_steps=30", "max_epochs=1", f"pack_to_max_length={packed}"]
    overrides += ["batch_size=2", "max_length=128"] if packed else []
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", overrides)
    output = io.StringIO()
    result = train(config, Console(file=output, width=200))
    assert len(result.losses) == 30
    assert sum(result.losses[-5:]) / 5 < 0.7 * sum(result.losses[:5]) / 5
    assert ("packed into" in output.getvalue()) == packed
    assert "warning" not in output.getvalue()  # the template writes what the tokenizer's own chat_template writes


def test_a_template_that_writes_other_ids_than_the_tokenizers_is_one_warning_line(tmp_path):
    overrides = [f"work_dir={str(tmp_path)!r}", "max_steps=1", "prompt_template='qwen_chat'", "evaluation_inputs=[]"]
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", overrides)
    output = io.StringIO()
    checkpoint = train(config, Console(file=output, width=100)).checkpoint
    warnings = [line for line in output.getvalue().splitlines() if "warning" in line]
    assert len(warnings) == 1 and "prompt_template 'qwen_chat' and the tokenizer's own chat_template" in warnings[0]
    assert "xtune check-template xtune-tiny/internlm2-chat --prompt-template qwen_chat" in warnings[0]
    # what leaves training carries the template it was trained with, and stops where its replies end
    from transformers import AutoTokenizer, GenerationConfig

    from xtune.models.publish import saved_chat_template

    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    assert tokenizer.chat_template == saved_chat_template("qwen_chat") != saved_chat_template("internlm2_chat")
    eos = GenerationConfig.from_pretrained(checkpoint).eos_token_id
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in eos and tokenizer.eos_token_id in eos


@pytest.mark.parametrize("packed", [False, True])
def test_accumulation_gives_the_gradient_of_the_whole_step(packed):
    import torch

    from tests.engine.test_loss import random_samples
    from xtune.data.loader import collate
    from xtune.data.packing import collate_packed, pack
    from xtune.engine.train import accumulate_gradients
    from xtune.models.attention import use_varlen_attention
    from xtune.models.load import load_model, resolve_model_path

    model = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32)
    use_varlen_attention(model)
    samples = random_samples(8, 40)
    if packed:
        items = pack([s for s in samples], max_length=48, pad_token_id=2)
        batch_of = collate_packed
    else:
        items = samples
        batch_of = lambda group: collate(group, pad_token_id=2)  # noqa: E731

    def gradients(micro_batch):
        model.zero_grad()
        accumulate_gradients(model, [batch_of(items[i : i + micro_batch]) for i in range(0, len(items), micro_batch)], "cpu")
        return torch.cat([p.grad.flatten() for p in model.parameters()])

    whole = gradients(len(items))
    assert (gradients(max(1, len(items) // 4)) - whole).abs().max() < 1e-6
    assert (gradients(1) - whole).abs().max() < 1e-6


def test_freeze_llm_trains_only_modules_to_save(tmp_path):
    import torch
    from safetensors.torch import load_file

    from xtune.errors import ConfigError
    from xtune.models.load import load_model, resolve_model_path

    overrides = [f"work_dir={str(tmp_path)!r}", "max_steps=3", "accumulative_counts=1", "evaluation_inputs=[]",
                 "freeze_llm=True", "modules_to_save=['embed_tokens']", "dtype='fp32'"]  # fmt: skip
    config, _ = load_config("tiny_llama_full_antonyms", overrides)
    output = io.StringIO()
    result = train(config, Console(file=output, width=200))
    trained = sum(p.numel() for p in load_model(resolve_model_path("xtune-tiny/llama")).get_input_embeddings().parameters())
    assert f"{trained:,} of" in output.getvalue()
    base = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.float32).state_dict()
    saved = {}
    for file in result.checkpoint.glob("model*.safetensors"):
        saved.update(load_file(file))
    changed = {name for name, value in saved.items() if not torch.equal(value, base[name])}
    assert changed == {"model.embed_tokens.weight"}

    config.modules_to_save = ["no_such_module"]
    with pytest.raises(ConfigError, match="no module named 'no_such_module'"):
        train(config, Console(file=io.StringIO()))


def test_dataloader_workers_and_the_fused_loss_leave_the_run_unchanged(tmp_path):
    base = ["max_steps=6", "max_epochs=1", "dtype='fp32'", "lora_dropout=0.1", "evaluation_inputs=[]", "save_steps=6"]

    def losses(name, *extra):
        config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path / name)!r}", *base, *extra])
        return train(config, Console(file=io.StringIO())).losses

    reference = losses("reference")
    assert losses("workers", "dataloader_num_workers=2") == reference  # same batches in the same order
    unfused = losses("unfused", "fused_loss=False")
    assert max(abs(a - b) for a, b in zip(unfused, reference, strict=True)) < 1e-5


@pytest.mark.slow
def test_torch_compile_gives_the_same_run(tmp_path):
    base = ["max_steps=3", "max_epochs=1", "dtype='fp32'", "lora_dropout=0.0", "evaluation_inputs=[]", "save_steps=3",
            "pack_to_max_length=True", "batch_size=1", "max_length=128"]  # fmt: skip

    def run(name, *extra):
        config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path / name)!r}", *base, *extra])
        output = io.StringIO()
        return train(config, Console(file=output, width=200)).losses, output.getvalue()

    reference, _ = run("eager")
    compiled, output = run("compiled", "torch_compile=True")
    assert "torch.compile: 4 decoder layers" in output
    assert max(abs(a - b) for a, b in zip(compiled, reference, strict=True)) < 1e-4


@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_under_autocast_needs_no_input_cast(checkpointing):
    """What the training step relies on to leave peft's cast of each adapter's input out: under bf16 autocast,
    with LoRA dropout, the loss and every LoRA gradient are bit-identical without it (also when activation
    checkpointing recomputes the forward in backward)."""
    import torch
    from peft.helpers import disable_input_dtype_casting

    from tests.engine.test_loss import random_samples
    from xtune.config.schema import Config
    from xtune.data.packing import collate_packed, pack
    from xtune.engine.train import accumulate_gradients
    from xtune.models.attention import use_varlen_attention
    from xtune.models.load import load_model, resolve_model_path
    from xtune.models.lora import prepare_trainable

    model = load_model(resolve_model_path("xtune-tiny/llama"), dtype=torch.bfloat16)
    use_varlen_attention(model)
    config = Config(llm_name_or_path="xtune-tiny/llama", data_path="-", lora_r=8, lora_alpha=16, lora_dropout=0.1)
    model = prepare_trainable(model, config).train()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    with torch.no_grad():  # B = 0 at init would hide the adapter's forward
        for name, weight in model.named_parameters():
            if "lora_B" in name:
                weight.normal_(0, 0.02)
    batch = collate_packed(pack(random_samples(8, 40), max_length=160, pad_token_id=2))

    def step(cast_off):
        model.zero_grad()
        torch.manual_seed(0)  # the same dropout masks
        with disable_input_dtype_casting(model, active=cast_off):
            loss, _, _ = accumulate_gradients(model, [batch], "cpu", torch.autocast("cpu", dtype=torch.bfloat16))
        return loss, [p.grad.clone() for p in model.parameters() if p.requires_grad]

    cast_loss, cast_grads = step(cast_off=False)
    loss, grads = step(cast_off=True)
    assert torch.equal(loss, cast_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, cast_grads)) and cast_grads[0].abs().sum() > 0


@pytest.mark.parametrize(
    ("overrides", "cast_off"),
    [([], True), (["dtype='fp32'"], False), (["use_dora=True"], False)],
)
def test_training_steps_leave_the_adapter_input_cast_out_under_autocast(tmp_path, monkeypatch, overrides, cast_off):
    import xtune.engine.train as engine

    seen = []
    original = engine.disable_input_dtype_casting

    def spy(model, active=True):
        seen.append(active)
        return original(model, active=active)

    monkeypatch.setattr(engine, "disable_input_dtype_casting", spy)
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [
        f"work_dir={str(tmp_path)!r}", "max_steps=2", "dtype='bf16'", *overrides,
    ])  # fmt: skip
    train(config, Console(file=io.StringIO()))  # its last step evaluates: generation must work with the cast off
    assert seen == [cast_off]  # once for the whole loop, not a walk over the modules every step


def test_resuming_an_older_checkpoint_is_refused_before_it_trains_over_later_ones(tmp_path):
    from xtune.errors import CheckpointError

    options = [f"work_dir={str(tmp_path)!r}", "max_steps=2", "save_steps=1", "save_total_limit=-1", "evaluation_inputs=[]"]
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", options)
    run = train(config, Console(file=io.StringIO())).run_dir
    before = {path: path.stat().st_mtime_ns for path in run.rglob("*")}
    with pytest.raises(CheckpointError, match="checkpoint-2 came after it in the same run"):
        train(config, Console(file=io.StringIO()), resume=str(run / "checkpoint-1"))
    assert {path: path.stat().st_mtime_ns for path in run.rglob("*")} == before
    output = io.StringIO()
    resumed = train(config, Console(file=output, width=300), resume=str(run / "checkpoint-2"))  # the newest: fine
    assert resumed.run_dir == run and resumed.checkpoint == run / "checkpoint-2" and resumed.losses == []
    assert f"{run} has trained all its 2 steps already; its last checkpoint is {run / 'checkpoint-2'}" in output.getvalue()


def test_no_sample_left_after_the_length_rules_is_an_error_before_the_loop(tmp_path):
    from xtune.errors import DataError

    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path)!r}", "max_length=2"])
    with pytest.raises(DataError, match=r"no sample to train on: \d+ were over max_length=2 .*Raise max_length"):
        train(config, Console(file=io.StringIO()))


def test_a_run_folder_being_trained_is_refused_to_a_second_process(tmp_path):
    from xtune.engine.checkpoint import lock_run
    from xtune.errors import CheckpointError

    options = [f"work_dir={str(tmp_path)!r}", "max_steps=2", "save_steps=1", "save_total_limit=-1", "evaluation_inputs=[]"]
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", options)
    run = train(config, Console(file=io.StringIO())).run_dir
    held = lock_run(run)  # as the first `--resume auto` would hold it while it trains
    try:
        more, _ = load_config("tiny_internlm2_chat_lora_antonyms", [*options[:1], "max_steps=3", *options[2:]])
        before = sorted(p.name for p in run.iterdir())
        with pytest.raises(CheckpointError, match=rf"{run} is being trained by pid \d+ on .* right now"):
            train(more, Console(file=io.StringIO()), resume="auto")
        assert sorted(p.name for p in run.iterdir()) == before
    finally:
        held.close()
    assert train(more, Console(file=io.StringIO()), resume="auto").checkpoint.name == "checkpoint-3"  # free again


@pytest.mark.parametrize("change", ["use_rslora=True", "train_on_last_turn_only=True", "lora_dropout=0.2", "dtype='bf16'",
                                    "use_dora=True", "optim_type='adamw_8bit'", "lr=0.5", "data"])  # fmt: skip
def test_resuming_with_what_is_trained_or_how_changed_is_refused(tmp_path, change):
    import json

    from xtune.errors import CheckpointError

    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"q{i}", "output": f"a{i}"}) + "\n" for i in range(8)))
    options = [f"work_dir={str(tmp_path / 'runs')!r}", f"data_path={str(data)!r}", "max_steps=2", "save_steps=1",
               "evaluation_inputs=[]", "dtype='fp32'"]  # fmt: skip
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", options)
    train(config, Console(file=io.StringIO()))
    if change == "data":
        data.write_text(data.read_text().replace("a7", "b7"))
        changed, _ = load_config("tiny_internlm2_chat_lora_antonyms", [*options, "max_steps=3"])
        match = "the training data changed since the run started"
    else:
        changed, _ = load_config("tiny_internlm2_chat_lora_antonyms", [*options, "max_steps=3", change])
        match = rf"the config changed \({change.split('=')[0]}: "
    with pytest.raises(CheckpointError, match=match):
        train(changed, Console(file=io.StringIO()), resume="auto")
    if change == "lr=0.5":  # what may change does: more steps, other saving and logging
        allowed, _ = load_config("tiny_internlm2_chat_lora_antonyms", [*options, "max_steps=3", "save_steps=5", "logging_steps=2"])
        assert train(allowed, Console(file=io.StringIO()), resume="auto").checkpoint.name == "checkpoint-3"


def test_a_work_dir_that_cannot_hold_runs_is_refused_before_anything_loads(tmp_path, monkeypatch):
    import os

    from xtune.engine import train as train_module
    from xtune.errors import ConfigError

    monkeypatch.setattr(train_module, "load_tokenizer", lambda *a, **k: (_ for _ in ()).throw(AssertionError("loaded")))
    (tmp_path / "a_file").write_text("not a folder")
    config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(tmp_path / 'a_file' / 'runs')!r}"])
    with pytest.raises(ConfigError, match=r"a_file is a file, not a folder"):
        train(config, Console(file=io.StringIO()))
    if os.geteuid() != 0:  # root may write anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        config, _ = load_config("tiny_internlm2_chat_lora_antonyms", [f"work_dir={str(locked / 'runs')!r}"])
        with pytest.raises(ConfigError, match="is not writable by this user"):
            train(config, Console(file=io.StringIO()))
