"""Command line: parses flags, calls one function per verb, prints results."""

import logging
import os
import sys
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.console import Console
from rich.table import Table

from xtune.errors import XtuneError

app = typer.Typer(
    help="xtune: fine-tune LLMs and VLMs (full, LoRA, QLoRA), convert, and chat.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
console = Console(soft_wrap=True)  # piped output: a long path stays on one line
err_console = Console(stderr=True, soft_wrap=True)
_state = {"debug": False}


def _print_version(value: bool) -> None:
    if value:
        version()
        raise typer.Exit()


@app.callback()
def _global(
    debug: Annotated[bool, typer.Option("--debug", help="Show full stack traces on errors.")] = False,
    _version: Annotated[
        bool, typer.Option("--version", callback=_print_version, is_eager=True, help="Print xtune's version and exit.")
    ] = False,
):
    _state["debug"] = debug


@app.command("version")
def version():
    """Print the installed xtune's version."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed_version

    try:
        console.print(installed_version("xtune"), highlight=False)
    except PackageNotFoundError:  # run from a source tree that is not installed
        from xtune import __version__

        console.print(__version__, highlight=False)


@app.command("list-cfg")
def list_cfg(
    pattern: Annotated[
        Optional[str], typer.Option("-p", "--pattern", help="Match as you type: qwen2.5, internlm2_1_8b, llama3, qlora.")
    ] = None,
    family: Annotated[bool, typer.Option("--family", help="Group the configs by model family.")] = False,
):
    """List the built-in configs (`copy-cfg NAME DIR` writes one out to edit)."""
    from itertools import groupby

    from xtune.config.load import config_family, list_configs

    names = list_configs(pattern)
    if not family:
        for name in names:
            console.print(name, highlight=False)
        return
    by_family = sorted(names, key=lambda name: ((config_family(name) or "other").lower(), name))
    for group, members in groupby(by_family, key=lambda name: config_family(name) or "other"):
        console.print(f"{group}:", highlight=False, markup=False)
        for name in members:
            console.print(f"  {name}", highlight=False)


@app.command("copy-cfg")
def copy_cfg(name: str, dest_dir: Path):
    """Copy a built-in config to DEST_DIR/NAME_copy.py to edit it."""
    from xtune.config.load import copy_config

    console.print(f"copied to {copy_config(name, dest_dir)}", highlight=False)


@app.command("show-cfg")
def show_cfg(
    config: Annotated[Optional[str], typer.Argument(help="Config file or built-in name.")] = None,
    fields: Annotated[bool, typer.Option("--fields", help="List every config key with its type and meaning.")] = False,
    from_xtuner: Annotated[
        Optional[Path],
        typer.Option("--from-xtuner", help="An XTuner 0.1 config (read, not run): print the equivalent xtune config, "
                     "each key with the XTuner key it came from, and what was ignored."),
    ] = None,
):
    """Print a config as xtune resolves it, or (--fields) every key a config may set."""
    from xtune.config.load import load_config
    from xtune.config.schema import Config

    if from_xtuner is not None:
        from xtune.config.xtuner import is_xtuner_config, read_xtuner_config, to_python

        text = to_python(read_xtuner_config(from_xtuner))  # a key xtune refuses is an error, not a comment
        if is_xtuner_config(from_xtuner):
            load_config(str(from_xtuner))  # and the values validate
        sys.stdout.write(text)
        return
    if fields or config is None:
        table = Table("key", "type", "default", "meaning")
        for name, info in Config.model_fields.items():
            default = "required" if info.is_required() else repr(info.default)
            table.add_row(name, str(info.annotation).replace("typing.", ""), default, info.description or "")
        console.print(table)
        return
    resolved, path = load_config(config, allow_code=True)  # shown, not run
    console.print(f"# {path}")
    console.print_json(resolved.model_dump_json())


AllowCode = Annotated[
    bool,
    typer.Option(
        "--allow-code",
        help="Let a YAML config run code: trust_remote_code, or a module:function dataset_format. Only for configs you trust.",
    ),
]


@app.command(
    "train", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
)
def train_cmd(
    ctx: typer.Context,
    config: Annotated[str, typer.Argument(help="Config file (.py or .yaml) or built-in config name.")],
    work_dir: Annotated[Optional[str], typer.Option(help="Overrides the config's work_dir.")] = None,
    resume: Annotated[
        Optional[str], typer.Option(help="'auto' (the newest complete checkpoint in work_dir) or a checkpoint folder.")
    ] = None,
    deepspeed: Annotated[
        Optional[str],
        typer.Option(help="DeepSpeed ZeRO: deepspeed_zero1|zero2|zero2_offload|zero3|zero3_offload or a JSON file."),
    ] = None,
    launcher: Annotated[
        str, typer.Option(help="'torchrun' (NPROC_PER_NODE re-launches through it) or 'slurm' (one process per srun task).")
    ] = "torchrun",
    allow_code: AllowCode = False,
    trust_checkpoint: Annotated[
        bool,
        typer.Option(
            "--trust-checkpoint",
            help="Resume a DeepSpeed checkpoint this machine did not write: its state is pickles, which can run code.",
        ),
    ] = False,
):
    """Train with a config. Override keys with `--cfg-options key=value key=value ...` (after the config)."""
    from xtune.config.load import load_config
    from xtune.engine.distributed import slurm_environment, torchrun_command
    from xtune.engine.train import train

    if launcher == "slurm":
        slurm_environment(os.environ)
    elif launcher != "torchrun":
        raise XtuneError(f"--launcher {launcher!r}: use 'torchrun' or 'slurm'.")
    elif (command := torchrun_command(sys.argv[1:])) is not None:
        os.execv(command[0], command)
    overrides = _cfg_options(ctx.args)
    if work_dir is not None:
        overrides.append(f"work_dir={work_dir!r}")
    if deepspeed is not None:
        overrides.append(f"deepspeed={deepspeed!r}")
    resolved, path = load_config(config, overrides, allow_code)
    if os.environ.get("RANK", "0") == "0":
        err_console.print(f"config {path}:")
        err_console.print_json(resolved.model_dump_json())
    result = train(resolved, err_console, resume=resume, trust_checkpoint=trust_checkpoint, config_file=Path(path))
    if os.environ.get("RANK", "0") == "0":
        console.print(f"checkpoint: {result.checkpoint}", highlight=False)


def _cfg_options(args: list[str]) -> list[str]:
    if not args:
        return []
    if args[0] != "--cfg-options":
        raise XtuneError(f"unexpected arguments {' '.join(args)}; did you mean --cfg-options key=value ...?")
    values = args[1:]
    bad = [value for value in values if "=" not in value]
    if bad or not values:
        raise XtuneError(f"--cfg-options takes key=value pairs, got {' '.join(bad) or 'nothing'}.")
    return values


_EXTRA_ARGS = {"allow_extra_args": True, "ignore_unknown_options": True}
ConfigArgument = Annotated[str, typer.Argument(help="Config file (.py or .yaml) or built-in config name.")]


@app.command("preprocess", context_settings=_EXTRA_ARGS)
def preprocess_cmd(
    ctx: typer.Context,
    config: ConfigArgument,
    num_proc: Annotated[
        Optional[int], typer.Option(min=1, help="Tokenizing processes; default: the config's num_proc.")
    ] = None,
    allow_code: AllowCode = False,
):
    """Tokenize a config's data into the cache training reads. Override keys with `--cfg-options key=value ...`."""
    from xtune.config.load import load_config
    from xtune.data.inspect import preprocess, render_preprocess

    resolved, _ = load_config(config, _cfg_options(ctx.args), allow_code)
    render_preprocess(preprocess(resolved, num_proc=num_proc), console)


@app.command("check-dataset", context_settings=_EXTRA_ARGS)
def check_dataset_cmd(ctx: typer.Context, config: ConfigArgument, allow_code: AllowCode = False):
    """Counts, lengths, truncation, padding or packing, and every malformed record (exit 1 if any)."""
    from xtune.config.load import load_config
    from xtune.data.inspect import check_dataset, render_check

    resolved, _ = load_config(config, _cfg_options(ctx.args), allow_code)
    check = check_dataset(resolved)
    render_check(check, console)
    if not check.ok:
        err_console.print(
            f"[bold red]error:[/] {len(check.bad_records)} malformed records (listed above); fix them, "
            "or set skip_bad_records = True to train without them.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command("check-custom-dataset", context_settings=_EXTRA_ARGS)
def check_custom_dataset_cmd(ctx: typer.Context, config: ConfigArgument, allow_code: AllowCode = False):
    """XTuner's check: the first sample after its dataset_format, in the template, encoded; then check-dataset's
    counts and every malformed record (exit 1 if any)."""
    from xtune.config.load import load_config
    from xtune.data.inspect import check_dataset, config_tokenizer, first_sample_steps, render_check, render_sample_steps

    resolved, _ = load_config(config, _cfg_options(ctx.args), allow_code)
    tokenizer = config_tokenizer(resolved)
    check = check_dataset(resolved, tokenizer)
    render_sample_steps(first_sample_steps(resolved.model_copy(update={"skip_bad_records": True}), tokenizer), console)
    render_check(check, console)
    if not check.ok:
        err_console.print(
            f"[bold red]error:[/] {len(check.bad_records)} records do not fit their dataset_format (listed above); "
            "fix them, set dataset_format (`xtune list-dataset-format` lists the names), or set "
            "skip_bad_records = True to train without them.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)


@app.command("list-dataset-format")
def list_dataset_format():
    """The dataset_format names (xtune's and XTuner's; XTuner's NAME_map_fn works too), one line each."""
    from xtune.data.formats import FORMATS
    from xtune.data.xtuner_maps import DESCRIPTIONS, XTUNER_FORMATS, XTUNER_NAMES

    names = [*FORMATS, *XTUNER_FORMATS]
    width = max(map(len, names))
    for name in names:
        xtuner = f" [XTuner: {name}_map_fn]" if name in XTUNER_NAMES else ""
        console.print(f"{name:<{width}}  {DESCRIPTIONS[name]}{xtuner}", highlight=False, markup=False)


@app.command("log-dataset", context_settings=_EXTRA_ARGS)
def log_dataset_cmd(
    ctx: typer.Context,
    config: ConfigArgument,
    n: Annotated[int, typer.Option("-n", min=1, help="How many samples to show.")] = 3,
    allow_code: AllowCode = False,
):
    """Show the first samples as training sees them, trained tokens highlighted ([[...]] when piped)."""
    from xtune.config.load import load_config
    from xtune.data.inspect import first_samples, render_samples

    resolved, _ = load_config(config, _cfg_options(ctx.args), allow_code)
    render_samples(first_samples(resolved, n), console)


@app.command("check-template")
def check_template_cmd(
    model: Annotated[str, typer.Argument(help="Model (or tokenizer) folder or id whose chat_template is the reference.")],
    prompt_template: Annotated[
        Optional[str], typer.Option(help="The named template to check; default: the one recorded with the model.")
    ] = None,
):
    """Render probe conversations with a named template and with the tokenizer's own chat_template: 'identical', or
    the first differing token of each; and whether each generation prompt is a prefix of the training ids."""
    from xtune.data.check_template import check_template
    from xtune.infer.chat import pick_template
    from xtune.models.load import load_tokenizer, resolve_model_path

    path = resolve_model_path(model)
    tokenizer = load_tokenizer(path)
    if not getattr(tokenizer, "chat_template", None):
        raise XtuneError(f"{path}: the tokenizer has no chat_template to compare with.")
    template = pick_template(prompt_template, None, path, None)
    if template.name == "hf":
        raise XtuneError("nothing to compare: 'hf' is the tokenizer's own template; name one with --prompt-template.")
    results = check_template(tokenizer, template)
    for result in results:
        if result.refused is not None:
            verdict = f"skipped: the tokenizer's chat_template refuses it ({result.refused})"
        elif result.identical:
            verdict = "identical"
        else:
            verdict = (f"differs at token {result.position}: {template.name} writes {result.ours}, the tokenizer's "
                       f"chat_template writes {result.theirs}")  # fmt: skip
        if result.prefix_holds is not None:
            verdict += "; generation prompts are prefixes" if result.prefix_holds else "; a generation prompt is NOT a prefix"
        console.print(f"{result.probe}: {verdict}", highlight=False, markup=False)
    if any(not result.identical and result.refused is None for result in results):
        raise typer.Exit(1)


@app.command(context_settings={"allow_extra_args": True})
def chat(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Base model folder or id.")],
    adapter: Annotated[Optional[str], typer.Option(help="LoRA adapter folder (a checkpoint-<step>).")] = None,
    prompt_template: Annotated[
        Optional[str], typer.Option(help="Chat template; default: the one recorded with the adapter or model, else the tokenizer's.")
    ] = None,
    system: Annotated[str, typer.Option(help="System prompt.")] = "",
    system_template: Annotated[
        Optional[str], typer.Option(help="A named system prompt: alpaca, coder, sql, lawyer, medical, colorist, arxiv_gentile, moss_sft.")
    ] = None,
    no_streamer: Annotated[bool, typer.Option("--no-streamer", help="Print each answer whole instead of streaming it.")] = False,
    input: Annotated[Optional[str], typer.Option("--input", help="Prompts file, one per line ('-' for stdin); answers go to stdout.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="With --input: write answers as JSONL here too.")] = None,
    max_new_tokens: int = 512,
    temperature: Annotated[float, typer.Option(help="0 decodes greedily.")] = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    repetition_penalty: float = 1.0,
    stop_words: Annotated[Optional[list[str]], typer.Option("--stop-words", help="Extra stop words.")] = None,
    seed: int = 0,
    bits: Annotated[Optional[int], typer.Option(help="Load the base in 4 or 8 bits.")] = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    visual_encoder: Annotated[Optional[str], typer.Option(help="LLaVA: the base vision encoder (CLIP/SigLIP folder or id).")] = None,
    llava: Annotated[Optional[str], typer.Option(help="LLaVA: the trained parts (a LLaVA checkpoint or pth_to_hf output).")] = None,
    image: Annotated[Optional[str], typer.Option(help="LLaVA: the image the conversation is about.")] = None,
    with_plugins: Annotated[
        Optional[list[str]],
        typer.Option("--with-plugins", help="Let the model call tools: calculate, solve, search (e.g. --with-plugins calculate solve)."),
    ] = None,
    search_folder: Annotated[Optional[Path], typer.Option(help="The folder of .txt/.md files the search plugin reads.")] = None,
    agent_max_turns: Annotated[int, typer.Option(help="With plugins: the most replies (tool calls included) per question.")] = 5,
    list_tools: Annotated[
        bool, typer.Option(help="With plugins: list them in the prompt; --no-list-tools for a model trained without the list.")
    ] = True,
    thinking: Annotated[
        bool, typer.Option(help="--no-thinking: Qwen3-style templates answer without reasoning (an empty think block ends the prompt).")
    ] = True,
):
    """Chat with a model (and adapter), or a LLaVA model about an image: interactive, or --input for scripts.
    With --with-plugins the model may call tools; their calls and results are shown (on stderr with --input)."""
    import json

    import torch

    from xtune.infer.chat import answer_all, load_any_chat_model, pick_template, read_input, repl, system_prompt
    from xtune.infer.generate import GenerationOptions
    from xtune.models.load import resolve_model_path

    plugins = []
    if with_plugins:
        from xtune.infer.plugins import get_plugins

        names = [name for value in [*with_plugins, *ctx.args] for name in value.replace(",", " ").split()]
        plugins = get_plugins(names, search_folder)
        if llava is not None:
            raise XtuneError("--with-plugins does not work with LLaVA models yet.")
    elif ctx.args:
        raise XtuneError(f"unexpected arguments: {' '.join(ctx.args)}.")
    elif search_folder is not None:
        raise XtuneError("--search-folder is for the search plugin: add --with-plugins search.")

    torch.manual_seed(seed)
    system = system_prompt(system, system_template)
    options = GenerationOptions(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
        repetition_penalty=repetition_penalty, stop_words=tuple(stop_words or ()),
    )  # fmt: skip
    if input not in (None, "-") and not Path(input).is_file():  # before a model that may take minutes to load
        raise XtuneError(f"--input {input}: no such file; give a file of prompts, one per line, or - for stdin.")
    if output is not None and output.exists():
        raise XtuneError(f"--output {output} already exists; it is never overwritten: choose another file or move it.")
    if image is not None and llava is None:
        raise XtuneError("--image needs a LLaVA model: pass --visual-encoder and --llava.")
    llm, tokenizer = load_any_chat_model(model, adapter, visual_encoder, llava, bits, device, dtype, trust_remote_code)
    if llava is None:
        _warn_of_other_base(adapter, model)
    template = replace(pick_template(prompt_template, adapter or llava, resolve_model_path(model), tokenizer),
                       enable_thinking=thinking)  # fmt: skip
    if plugins:
        from xtune.infer.agent import chat_with_plugins

        chat_with_plugins(
            llm, tokenizer, template, plugins, system, options, input, output, agent_max_turns, list_tools, err_console
        )
        return
    if input is None:
        repl(llm, tokenizer, template, system, options, stream=not no_streamer, image=image)
        return
    conversations = read_input(input, image)
    replies = answer_all(llm, tokenizer, template, conversations, system, options)
    for reply in replies:
        print(reply.replace("\n", "\\n"), flush=True)
    if output is not None:
        with output.open("x", encoding="utf-8") as out:
            for conversation, reply in zip(conversations, replies):
                out.write(json.dumps({"prompt": conversation.turns[-1].content, "answer": reply}) + "\n")


@app.command()
def serve(
    model: Annotated[str, typer.Argument(help="Base model folder or id (or a merged model).")],
    adapter: Annotated[Optional[str], typer.Option(help="LoRA adapter folder (a checkpoint-<step>).")] = None,
    host: Annotated[str, typer.Option(help="Interface to listen on; loopback by default.")] = "127.0.0.1",
    port: int = 8000,
    api_key: Annotated[Optional[str], typer.Option(help="Require 'Authorization: Bearer KEY' on every request.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help="Chat template; default as for chat.")] = None,
    system: Annotated[str, typer.Option(help="System prompt for requests without one.")] = "",
    max_new_tokens: Annotated[int, typer.Option(help="Default max_tokens of a request.")] = 512,
    max_tokens_limit: Annotated[int, typer.Option(help="Requests asking for more max_tokens get 400.")] = 4096,
    max_queued_requests: Annotated[int, typer.Option(help="Requests waiting beyond this get 503 (retry later).")] = 32,
    max_body_bytes: Annotated[int, typer.Option(help="Larger request bodies get 413.")] = 1 << 20,
    max_batch_size: Annotated[int, typer.Option(help="Replies generated together, at most.")] = 16,
    visual_encoder: Annotated[Optional[str], typer.Option(help="LLaVA: the base vision encoder (CLIP/SigLIP folder or id).")] = None,
    llava: Annotated[Optional[str], typer.Option(help="LLaVA: the trained parts (a LLaVA checkpoint or pth_to_hf output).")] = None,
    allow_local_images: Annotated[Optional[str], typer.Option(help="LLaVA: image_url parts may name image files in this folder.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Load the base in 4 or 8 bits.")] = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """An OpenAI-compatible server: POST /v1/chat/completions (streaming or not, tools, LLaVA images), GET /v1/models."""
    from xtune.infer.generate import GenerationOptions
    from xtune.infer.serve import serve as run_server

    run_server(
        model, adapter, host, port, api_key, prompt_template, system, bits, device, dtype, trust_remote_code,
        GenerationOptions(max_new_tokens=max_new_tokens), max_body_bytes=max_body_bytes,
        max_tokens_limit=max_tokens_limit, max_queued_requests=max_queued_requests, max_batch_size=max_batch_size,
        visual_encoder=visual_encoder, llava=llava, allow_local_images=allow_local_images,
    )  # fmt: skip


@app.command()
def webui(
    host: Annotated[str, typer.Option(help="Interface to listen on; loopback by default. Any other needs the token.")] = "127.0.0.1",
    port: int = 7860,
    root: Annotated[
        Optional[list[Path]],
        typer.Option("--root", help="A folder the UI may read and write (configs, data, work_dirs/); repeatable. "
                     "Default: the current folder."),
    ] = None,
    token: Annotated[
        Optional[str], typer.Option(help="The access token; default: a random one, printed at start.")
    ] = None,
    device: str = "auto",
):
    """A web UI: configure, check data, train (each run an `xtune train` process), watch, chat and export."""
    from xtune.webui.app import run_webui

    run_webui(host, port, root or [Path.cwd()], token, device, console=err_console)


@app.command()
def mmbench(
    model: Annotated[str, typer.Argument(help="Base LLM folder or id.")],
    visual_encoder: Annotated[str, typer.Option(help="The base vision encoder (CLIP/SigLIP folder or id).")],
    llava: Annotated[str, typer.Option(help="The trained LLaVA parts (a checkpoint or pth_to_hf output).")],
    data_path: Annotated[Path, typer.Option(help="MMBench TSV (base64 images, question, hint, options, answer).")],
    work_dir: Annotated[Path, typer.Option(help="Answers and scores go to a new folder inside.")] = Path("work_dirs/mmbench"),
    prompt_template: Annotated[Optional[str], typer.Option(help="Chat template; default: the one recorded with --llava.")] = None,
    bits: Annotated[Optional[int], typer.Option(help="Load the base in 4 or 8 bits.")] = None,
    batch_size: int = 8,
    device: str = "auto",
    dtype: str = "auto",
):
    """Score a LLaVA model on MMBench: accuracy overall and per category; every answer saved."""
    from xtune.infer.mmbench import mmbench as run_mmbench

    result = run_mmbench(model, visual_encoder, llava, data_path, work_dir, prompt_template, bits, device, dtype,
                         batch_size=batch_size, console=err_console)  # fmt: skip
    table = Table("category", "accuracy")
    for category, accuracy in sorted(result.per_category.items()):
        table.add_row(category, f"{accuracy:.1%}")
    console.print(table)
    overall = "n/a (no answers in the file)" if result.overall is None else f"{result.overall:.1%}"
    console.print(f"overall {overall} over {result.n} questions; answers: {result.answers_path}", highlight=False)


@app.command("test", context_settings=_EXTRA_ARGS)
def test_cmd(
    ctx: typer.Context,
    config: ConfigArgument,
    checkpoint: Annotated[str, typer.Option(help="A checkpoint-<step> (LoRA or full), a run folder or a work_dir (its newest).")],
    device: str = "auto",
    dtype: str = "auto",
    allow_code: AllowCode = False,
):
    """XTuner's `test`: a checkpoint's validation loss and perplexity on its config's validation data (val_data_path
    or val_split), and its answers to evaluation_inputs. Benchmarks: `xtune eval`."""
    from xtune.config.load import load_config
    from xtune.evaluate.config_test import score_checkpoint

    resolved, _ = load_config(config, _cfg_options(ctx.args), allow_code)
    result = score_checkpoint(resolved, checkpoint, device, dtype)
    console.print(f"{result['checkpoint']}: validation loss {result['eval_loss']:.4f}, perplexity "
                  f"{result['eval_perplexity']:.4f} over {result['eval_trained_tokens']} trained tokens", highlight=False)  # fmt: skip
    for answer in result["answers"]:
        console.print(f"[dim]{answer['input']!r}[/] -> {answer['output']!r}", highlight=False)


@app.command("eval")
def eval_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or id (the base, with --adapter).")],
    tasks: Annotated[Optional[str], typer.Option(help="Comma-separated: mmlu, ceval, cmmlu, a name given by --data NAME=PATH, or a generation task's .jsonl.")] = None,
    harness: Annotated[Optional[str], typer.Option(help="lm-evaluation-harness tasks, comma-separated (names, globs, YAML files; needs xtune[harness]); offline, only tasks whose data are local.")] = None,
    harness_include: Annotated[Optional[Path], typer.Option(help="A folder of your own harness task YAMLs (lm_eval's include_path).")] = None,
    adapter: Annotated[Optional[str], typer.Option(help="LoRA adapter folder (a checkpoint-<step>).")] = None,
    data: Annotated[Optional[list[str]], typer.Option(help="NAME=PATH (a folder in a benchmark's layout, a repo id in the HF cache, or a .jsonl), or one folder holding a folder per task; repeatable. Default: the HF cache.")] = None,
    split: Annotated[Optional[str], typer.Option(help="Split scored; default: MMLU test, C-Eval val, CMMLU test.")] = None,
    shots: Annotated[Optional[int], typer.Option(min=0, help="Few-shot: the first N dev questions of each subject, answered, before each question; default 0 (harness tasks: each task's own default).")] = None,
    chat: Annotated[Optional[bool], typer.Option("--chat/--no-chat", help="Render prompts with the chat template; default: multiple choice as plain text, generation tasks as chats.")] = None,
    scoring: Annotated[str, typer.Option(help="Multiple choice by each option's 'loglikelihood', or by the letter the model writes ('generation').")] = "loglikelihood",
    compare: Annotated[Optional[str], typer.Option("--compare", help="BASE: the same tasks on the base model too, side by side, with the difference and its paired stderr.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="A new folder for answers.jsonl, results.json and the charts; default work_dirs/eval/<time>.")] = None,
    scorer: Annotated[Optional[str], typer.Option(help="Generation tasks: your metric, pkg.mod:fn(prediction, reference) -> number or dict.")] = None,
    prompt_template: Annotated[Optional[str], typer.Option(help="Chat template; default: the one recorded with the adapter or model, else the tokenizer's.")] = None,
    system: Annotated[str, typer.Option(help="System prompt of chat-rendered prompts.")] = "",
    limit: Annotated[Optional[int], typer.Option(min=1, help="Only the first N questions of each task.")] = None,
    max_new_tokens: Annotated[int, typer.Option(min=1, help="Generation tasks: the longest reply.")] = 256,
    batch_size: Annotated[int, typer.Option(min=1, help="Prompts generated together.")] = 16,
    tokens_per_batch: Annotated[int, typer.Option(min=1, help="Tokens packed into one forward when scoring log-likelihoods.")] = 8192,
    bits: Annotated[Optional[int], typer.Option(help="Load the base in 4 or 8 bits.")] = None,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
):
    """Score a model on multiple-choice benchmarks (MMLU, C-Eval, CMMLU in their own layouts, zero- or few-shot) and
    generation tasks (exact match, ROUGE-L, BLEU, your scorer); --compare BASE: did it get better, did it forget.
    NPROC_PER_NODE=N runs it on N processes."""
    from xtune.engine.distributed import torchrun_command
    from xtune.evaluate.report import comparison_table, results_table
    from xtune.evaluate.run import EvalOptions, run_eval

    if not tasks and not harness:
        raise XtuneError("no tasks: pass --tasks mmlu,ceval,... (or a generation task's .jsonl) and/or --harness TASKS.")
    if harness and os.environ.get("NPROC_PER_NODE", "1") not in ("", "1"):
        raise XtuneError("--harness runs in one process (lm_eval's model wrapper around a loaded model); unset "
                         "NPROC_PER_NODE, or run --tasks alone on several processes.")  # fmt: skip
    if (command := torchrun_command(sys.argv[1:])) is not None:
        os.execv(command[0], command)
    options = EvalOptions(
        tasks=tuple(name.strip() for name in (tasks or "").split(",") if name.strip()), data=tuple(data or ()), split=split,
        shots=shots or 0, chat=chat, scoring=scoring, prompt_template=prompt_template, system=system, scorer=scorer,
        limit=limit, max_new_tokens=max_new_tokens, batch_size=batch_size, tokens_per_batch=tokens_per_batch,
        bits=bits, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
    )  # fmt: skip
    if adapter is not None:
        _warn_of_other_base(adapter, model)
    if harness:  # lm_eval installed, the task names known: before any task runs
        from xtune.evaluate.harness import check_harness_tasks

        check_harness_tasks(harness, str(harness_include) if harness_include else None)
    folder = output
    if options.tasks:
        result = run_eval(model, adapter, options, output, compare, err_console)
        if result is None:  # not rank 0
            return
        console.print(results_table(result.summaries) if result.comparison is None else comparison_table(result.comparison))
        folder = result.output
    if harness:
        from xtune.engine.checkpoint import new_run_dir
        from xtune.evaluate.harness import harness_eval
        from xtune.evaluate.run import DEFAULT_OUTPUT

        folder = folder if folder is not None else new_run_dir(DEFAULT_OUTPUT)
        summaries, comparison = harness_eval(
            model, adapter, harness, folder / "harness" if options.tasks else folder, compare,
            include_path=str(harness_include) if harness_include else None, num_fewshot=shots,
            batch_size=batch_size, limit=limit, device=device, dtype=dtype, bits=bits,
            trust_remote_code=trust_remote_code, apply_chat_template=bool(chat), prompt_template=prompt_template,
            system_instruction=system or None,
        )  # fmt: skip
        console.print(results_table(summaries) if comparison is None else comparison_table(comparison))
    console.print(f"answers and results: {folder}", highlight=False)


data_app = typer.Typer(help="Dataset tools.", no_args_is_help=True)
app.add_typer(data_app, name="data")


@data_app.command("repeat")
def data_repeat(
    input: Annotated[Path, typer.Option("-i", "--input", help="A JSON array or JSONL file of records.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="New file (.json array or .jsonl); never overwritten.")],
    n: Annotated[int, typer.Option("-n", help="How many times each record is written.", min=1)],
):
    """Write every record of a dataset N times (e.g. to oversample a small self-cognition set)."""
    from xtune.data.tools import repeat_dataset

    count = repeat_dataset(input, output, n)
    console.print(f"wrote {count} records to {output}", highlight=False)


convert_app = typer.Typer(help="Convert checkpoints: pth_to_hf (a checkpoint as a clean HF folder), merge (LoRA into its base), split (re-shard a model), gguf (for llama.cpp), ollama (a Modelfile).", no_args_is_help=True)
app.add_typer(convert_app, name="convert")
MaxShardSize = Annotated[str, typer.Option(help="Largest safetensors shard, e.g. 2GB or 500MB.")]


@convert_app.command("pth_to_hf")
def convert_pth_to_hf(
    config: ConfigArgument,
    checkpoint: Annotated[str, typer.Argument(help="A checkpoint-<step> folder, or a run folder (its newest checkpoint).")],
    save_dir: Annotated[Path, typer.Argument(help="New folder to write.")],
    fp32: Annotated[bool, typer.Option("--fp32", help="Save in fp32 instead of the base model's dtype.")] = False,
    max_shard_size: MaxShardSize = "2GB",
    export: Annotated[Optional[str], typer.Option(help="LLaVA runs: 'hf-llava' also writes a transformers LlavaForConditionalGeneration folder.")] = None,
    allow_code: AllowCode = False,
):
    """A training checkpoint as a Hugging Face folder: a PEFT adapter (LoRA runs), a model (full runs), or a
    LLaVA run's parts."""
    from xtune.convert.pth_to_hf import pth_to_hf

    pth_to_hf(config, checkpoint, save_dir, fp32=fp32, max_shard_size=max_shard_size, console=err_console, export=export,
              allow_code=allow_code)  # fmt: skip


@convert_app.command("merge")
def convert_merge(
    base: Annotated[str, typer.Argument(help="Base model folder or id.")],
    adapter: Annotated[str, typer.Argument(help="LoRA adapter folder (a checkpoint-<step> or pth_to_hf output), or XTuner's iter_N.pth.")],
    save_dir: Annotated[Path, typer.Argument(help="New folder to write.")],
    max_shard_size: MaxShardSize = "2GB",
    device: Annotated[str, typer.Option(help="Where to merge: cpu or cuda.")] = "cpu",
    fp32: Annotated[bool, typer.Option("--fp32", help="Save in fp32 instead of the base model's dtype.")] = False,
    keep_layout: Annotated[bool, typer.Option("--keep-layout", help="Save an InternLM2 base in its own layout (default: Llama layout).")] = False,
    prompt_template: Annotated[Optional[str], typer.Option(help="Chat template to save; default: the adapter's.")] = None,
    is_clip: Annotated[bool, typer.Option("--is-clip", help="BASE is a CLIP/SigLIP vision encoder, ADAPTER its LoRA (XTuner's flag).")] = False,
    config: Annotated[Optional[str], typer.Option(help="ADAPTER is XTuner's iter_N.pth: the config it was trained with (default: the one in its work_dir).")] = None,
):
    """Merge a LoRA (or QLoRA) adapter into its base and save a standalone model with its chat template."""
    from xtune.convert.merge import merge, merge_visual_encoder

    if is_clip:
        merge_visual_encoder(base, adapter, save_dir, max_shard_size, fp32, console=err_console)
        return
    _warn_of_other_base(adapter, base)
    merge(base, adapter, save_dir, max_shard_size, device, fp32, keep_layout, prompt_template, console=err_console,
          config=config)  # fmt: skip


@convert_app.command("split")
def convert_split(
    merged_dir: Annotated[Path, typer.Argument(help="A model folder (a merged model, or pth_to_hf's output of a full run).")],
    save_dir: Annotated[Path, typer.Argument(help="New folder to write.")],
    max_shard_size: MaxShardSize = "2GB",
):
    """Re-save a model's weights as safetensors shards of at most --max-shard-size (XTuner's `convert split`), the
    other files copied."""
    from xtune.convert.split import split_model

    console.print(f"saved to {split_model(merged_dir, save_dir, max_shard_size)}", highlight=False)


@convert_app.command("gguf")
def convert_gguf_cmd(
    model: Annotated[str, typer.Argument(help="Model folder or id (e.g. `convert merge`'s output), or the base with --adapter.")],
    out: Annotated[Path, typer.Argument(help="The .gguf file to write.")],
    adapter: Annotated[Optional[Path], typer.Option(help="A LoRA adapter folder, merged into MODEL (16-bit) first.")] = None,
    outtype: Annotated[str, typer.Option(help="Matrix weights as f16, bf16 or q8_0 (norms and biases stay f32).")] = "f16",
):
    """A GGUF file for llama.cpp (and Ollama, LM Studio): tensors, tokenizer and chat template (Llama, Mistral,
    Qwen2, InternLM2)."""
    from xtune.convert.gguf import convert_gguf

    if adapter is not None:
        _warn_of_other_base(adapter, model)
    convert_gguf(model, out, adapter, outtype, console=err_console)


@convert_app.command("ollama")
def convert_ollama_cmd(
    gguf_file: Annotated[Path, typer.Argument(help="A .gguf file written by `xtune convert gguf`.")],
    prompt_template: Annotated[Optional[str], typer.Option(help="xtune template to translate; default: the one the GGUF records (the model's training template).")] = None,
    system: Annotated[Optional[str], typer.Option(help="SYSTEM of the Modelfile; default: the template's default system text.")] = None,
):
    """An Ollama Modelfile beside GGUF_FILE: FROM it, TEMPLATE (the chat template in Ollama's Go template), PARAMETER
    stop, SYSTEM. Then: ollama create NAME -f Modelfile."""
    from xtune.convert.ollama import write_modelfile

    path = write_modelfile(gguf_file, prompt_template=prompt_template, system=system)
    console.print(f"wrote {path}", highlight=False)


def _warn_of_other_base(adapter, base) -> None:
    from xtune.models.lora import other_base_warning

    warning = other_base_warning(adapter, base) if adapter is not None else None
    if warning:
        err_console.print(f"[bold yellow]warning:[/] {warning}", highlight=False)


@app.command()
def demo(
    work_dir: Annotated[Optional[str], typer.Option(help="Where the demo runs are written.")] = None,
    llava: Annotated[bool, typer.Option("--llava", help="The multimodal demo: LLaVA's two stages on shape drawings.")] = False,
):
    """Train a tiny model on a learnable task and show its answers before and after."""
    from xtune.demo import run_demo, run_llava_demo

    if llava:
        result = run_llava_demo(work_dir or "work_dirs/demo_llava", console)
    else:
        result = run_demo(work_dir or "work_dirs/demo", console)
    if result.accuracy_after < 0.9:
        raise XtuneError(f"the demo model reached only {result.accuracy_after:.0%} held-out accuracy (expected >= 90%).")


reward_app = typer.Typer(help="Reward models: score preference pairs.", no_args_is_help=True)
app.add_typer(reward_app, name="reward")


@reward_app.command("score")
def reward_score(
    model: Annotated[str, typer.Argument(help="A reward model: the folder `xtune convert merge` writes from a reward run (any transformers sequence classifier), or the run's checkpoint-<step>.")],
    input: Annotated[Path, typer.Option("--input", help="Preference records {prompt, chosen, rejected}, in any format and file type training reads.")],
    prompt_template: Annotated[Optional[str], typer.Option(help="Chat template; default: the one recorded with the model, else the tokenizer's.")] = None,
    system: Annotated[Optional[str], typer.Option(help="System prompt; default: the one the model was trained with.")] = None,
    max_length: Annotated[Optional[int], typer.Option(min=1, help="Cut each prompt and answer to this many tokens, as training does; default: whole.")] = None,
    output: Annotated[Optional[Path], typer.Option(help="Also write the scores as JSONL here (never overwritten).")] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 8,
    device: str = "auto",
    dtype: str = "auto",
):
    """Score both answers of each pair: one line per pair (location, chosen score, rejected score), then the share
    of pairs whose chosen answer scores higher."""
    from xtune.infer.reward import accuracy, score_file

    scores = score_file(model, input, prompt_template, system, max_length, batch_size, device, dtype, output)
    for score in scores:
        print(f"{score.location}\t{score.chosen:.6g}\t{score.rejected:.6g}", flush=True)
    correct = sum(score.chosen > score.rejected for score in scores)
    console.print(f"accuracy {accuracy(scores):.1%}: the chosen answer scored higher in {correct} of {len(scores)} pairs",
                  highlight=False)  # fmt: skip


def _quiet_library_noise() -> None:
    """Messages from libraries that a user can do nothing about."""
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # "Failed to load CPU gemm_4bit_forward ..."
    if "DS_ACCELERATOR" not in os.environ and not Path("/proc/driver/nvidia").exists():
        os.environ["DS_ACCELERATOR"] = "cpu"  # else DeepSpeed, imported by accelerate, warns on every CPU-only run
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated")


def main() -> None:
    _quiet_library_noise()
    try:
        app()
    except XtuneError as error:
        if _state["debug"]:
            raise
        err_console.print(f"[bold red]error:[/] {error}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
