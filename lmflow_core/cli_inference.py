"""Inference commands: ``lmflow generate``, ``chat``, ``serve`` and ``evaluate``.

Each opens an :class:`lmflow_core.inference.InferenceSession` on a model directory, an adapter directory or a
hub id, with the template stored with the model unless ``--template`` says otherwise, and with the plugins
named by ``--plugins`` (their flags appear once they are named). :mod:`lmflow_core.cli` adds the commands
(:data:`INFERENCE_COMMANDS`) to the ``lmflow`` group; this module does not import it.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from .clickopts import PluginCommand, dataset_reading_options, debug_option, given, plugin_values
from .errors import LmflowError
from .options import parse_plugin_names


def session_options(function: Callable) -> Callable:
    """The options every inference command shares."""
    options = [
        click.argument("model"),
        click.option("--template", help="Conversation template (default: the one stored with the model)."),
        click.option("--plugins", help="Plugins to use, comma-separated (e.g. speculative)."),
        click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1..."),
        click.option(
            "--dtype",
            type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
            default="auto",
            show_default=True,
            help="Weights dtype (auto: bfloat16 on a GPU that has it, else float32).",
        ),
        click.option(
            "--trust-remote-code", is_flag=True, help="Allow model code from the hub repository to run."
        ),
        debug_option,
    ]
    for option in reversed(options):
        function = option(function)
    return function


def decoding_options(function: Callable) -> Callable:
    """Options that control decoding."""
    options = [
        click.option(
            "--greedy", "mode", flag_value="greedy", help="Pick the most likely token (the default)."
        ),
        click.option("--sample", "mode", flag_value="sample", help="Sample (implied by the options below)."),
        click.option(
            "--temperature",
            type=click.FloatRange(min=0, min_open=True),
            help="Sampling temperature [default: 1.0].",
        ),
        click.option(
            "--top-k",
            type=click.IntRange(min=0),
            help="Sample among the k most likely tokens (0: all) [default: 50].",
        ),
        click.option(
            "--top-p",
            type=click.FloatRange(min=0, max=1, min_open=True),
            help="Nucleus sampling [default: 1.0].",
        ),
        click.option(
            "--repetition-penalty",
            type=click.FloatRange(min=0, min_open=True),
            default=1.0,
            show_default=True,
        ),
        click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True),
        click.option("--stop", multiple=True, help="Stop when this text appears (repeatable)."),
        click.option("--seed", type=int, help="Seed for sampling."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def generation_options(values: dict[str, Any]) -> Any:
    """GenerationOptions from the decoding flags; sampling flags with --greedy are a contradiction."""
    from .generate import GenerationOptions

    sampling = {k: values[k] for k in ("temperature", "top_k", "top_p") if values.get(k) is not None}
    if values.get("mode") == "greedy" and sampling:
        flags = ", ".join("--" + k.replace("_", "-") for k in sampling)
        raise LmflowError(
            f"--greedy contradicts {flags}", "drop --greedy to sample, or drop the sampling options"
        )
    greedy = values.get("mode") != "sample" and not sampling
    return GenerationOptions(
        max_new_tokens=values["max_new_tokens"],
        greedy=greedy,
        temperature=sampling.get("temperature", 1.0),
        top_k=sampling.get("top_k", 50),
        top_p=sampling.get("top_p", 1.0),
        repetition_penalty=values["repetition_penalty"],
        stop_strings=tuple(values.get("stop") or ()),
        seed=values.get("seed"),
    )


def open_from_flags(values: dict[str, Any]) -> Any:
    """An inference session from the shared options and the plugin flags."""
    from .inference import open_session

    ctx = click.get_current_context()
    return open_session(
        values["model"],
        template=values.get("template"),
        plugins=parse_plugin_names(values.get("plugins")),
        plugin_options=plugin_values(ctx, values),
        device=values["device"],
        dtype=values["dtype"],
        trust_remote_code=values["trust_remote_code"],
    )


def report_stats(stats: dict[str, Any]) -> None:
    """Figures a decoder reported (e.g. a draft model's acceptance rate), on stderr."""
    if stats:
        click.echo(
            " | ".join(f"{k}: {v:.3f}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items()),
            err=True,
        )


# --------------------------------------------------------------------------------------------------------------
# lmflow generate
# --------------------------------------------------------------------------------------------------------------


@click.command("generate", cls=PluginCommand)
@session_options
@decoding_options
@click.option("--prompt", help="Text to continue as it is (no template); with --image, a user message.")
@click.option(
    "--messages",
    "messages_file",
    type=click.Path(dir_okay=False),
    help="JSON list of {role, content}: answer as the assistant.",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="PATH",
    help="An image for the (last) user message (repeatable); needs a plugin that reads images "
    "(--plugins multimodal).",
)
@click.option("--no-stream", is_flag=True, help="Print the completion at the end instead of token by token.")
def generate_command(**values: Any) -> None:
    """Generate a completion with MODEL and print it.

    With --prompt the text is continued as it is; with --messages the conversation is rendered with the
    model's template and the assistant's next message is generated. --image attaches an image to the user
    message (--prompt then becomes a user message, rendered with the template).
    """
    if bool(values["prompt"] is not None) == bool(values["messages_file"]):
        raise LmflowError("pass exactly one of --prompt and --messages")
    from .templates import Conversation, Message

    images = [checked_image_path(path) for path in values["images"]]
    if values["messages_file"]:
        messages = conversation_from_file(values["messages_file"])
        if images:
            messages = with_images(messages, images)
    elif images:
        messages = Conversation([Message("user", marked(values["prompt"], len(images)), (), tuple(images))])
    else:
        messages = None
    options = generation_options(values)
    session = open_from_flags(values)
    if messages is not None and messages.images:
        check_reads_images(session)
        if session.template is None:
            raise LmflowError(
                f"model {values['model']} has no conversation template, and images go in a user message",
                "pass --template NAME (see `lmflow templates list`)",
            )
    stream = None if values["no_stream"] else (lambda text: (sys.stdout.write(text), sys.stdout.flush()))
    if messages is not None:
        result = session.chat(messages, options, on_text=stream)
    else:
        result = session.complete(values["prompt"], options, on_text=stream)
    if stream is None:
        sys.stdout.write(result.text)
    sys.stdout.write("\n")
    report_stats(result.stats)


# ---- images ----------------------------------------------------------------------------------------------------

READS_NO_IMAGES = "use a vision-language model with --plugins multimodal"


def checked_image_path(path: str | Path, base: Path | None = None) -> str:
    """The absolute path of an image file (relative to ``base`` if given), once it is checked to be a regular
    file holding an image PIL can read within lmflow's size and pixel limits; raises a one-line LmflowError."""
    from .inputs import read_image_file

    full = Path(path).expanduser()
    if base is not None and not full.is_absolute():
        full = base / full
    read_image_file(full)
    return str(full.absolute())


def checked_image(image: Any, base: Path, where: str) -> Any:
    """An image of a messages file: a path (relative to the file), or a ``data:`` URL; both checked."""
    from .inputs import image_from_data_url

    if not isinstance(image, str):
        raise LmflowError(f"{where}: an image is {type(image).__name__}", "give the path of an image file")
    scheme = image.split(":", 1)[0].lower() if ":" in image else ""
    if scheme == "data":
        image_from_data_url(image, where)
        return image
    if scheme in ("http", "https"):
        raise LmflowError(
            f"{where}: lmflow does not fetch images from the web ({image[:80]})",
            "download the image and give its path",
        )
    if scheme == "file":
        from urllib.parse import unquote, urlparse

        image = unquote(urlparse(image).path)
    return checked_image_path(image, base)


def conversation_from_file(path: str) -> Any:
    """The conversation of a ``--messages`` file, its images' paths made relative to the file and checked."""
    import dataclasses

    from .templates import Conversation

    conversation = Conversation.from_file(path)
    if not conversation.images:
        return conversation
    base = Path(path).expanduser().absolute().parent
    messages = [
        dataclasses.replace(
            m, images=tuple(checked_image(image, base, f"{path}, message {i}") for image in m.images)
        )
        if m.images
        else m
        for i, m in enumerate(conversation.messages)
    ]
    return dataclasses.replace(conversation, messages=messages)


def marked(text: str, count: int) -> str:
    """``text`` after one image marker per image (the LLaVA convention: ``"<image>\\n" * count + text``)."""
    from .templates import IMAGE_MARKER

    return f"{IMAGE_MARKER}\n" * count + text


def with_images(conversation: Any, images: list[str]) -> Any:
    """``conversation`` with ``images`` attached to its last user message, before its text."""
    import dataclasses

    users = [i for i, m in enumerate(conversation.messages) if m.role == "user"]
    if not users:
        raise LmflowError("--image needs a user message in --messages", "add a user message to the file")
    messages = list(conversation.messages)
    last = messages[users[-1]]
    messages[users[-1]] = dataclasses.replace(
        last, content=marked(last.content, len(images)), images=(*images, *last.images)
    )
    return dataclasses.replace(conversation, messages=messages)


def check_reads_images(session: Any) -> None:
    """Refuse images for a session that has no plugin reading them, in one line naming the fix."""
    if not session.reads_images:
        raise LmflowError(
            f"model {session.name} is loaded without a plugin that reads images", READS_NO_IMAGES
        )


# --------------------------------------------------------------------------------------------------------------
# lmflow chat
# --------------------------------------------------------------------------------------------------------------

CHAT_HELP = "Commands: /reset clears the conversation (the system prompt stays), /system TEXT sets the system prompt, /exit quits."
IMAGE_HELP = (
    "/image PATH attaches an image to your next message (/image lists them, /image clear drops them)."
)


@click.command("chat", cls=PluginCommand)
@session_options
@decoding_options
@click.option("--system", "system_prompt", help="System prompt for the conversation.")
def chat_command(**values: Any) -> None:
    """Chat with MODEL in the terminal, in the format it was trained with.

    Replies stream as they are generated. Type /reset to clear the conversation (the system prompt stays),
    /system TEXT to set the system prompt (/system alone clears it), /exit (or end the input) to quit. With a
    plugin that reads images (--plugins multimodal), /image PATH attaches an image to the next message. Reads
    from a pipe as well: one user message per line.
    """
    from .templates import Conversation, Message

    options = generation_options(values)
    session = open_from_flags(values)
    if session.template is None:
        raise LmflowError(
            f"model {values['model']} has no conversation template",
            "pass --template NAME (see `lmflow templates list`)",
        )
    help_text = f"{CHAT_HELP} {IMAGE_HELP}" if session.reads_images else CHAT_HELP
    interactive = sys.stdin.isatty()
    if interactive:
        click.echo(f"lmflow chat | {session.name} | template {session.template_name}. {help_text}")
    system, history, pending = values["system_prompt"], [], []
    while True:
        if interactive:
            click.echo("you> ", nl=False)
        line = sys.stdin.readline()
        if not line:
            break
        text = line.rstrip("\n")
        command, _, argument = text.strip().partition(" ")
        if command == "/exit":
            break
        if command == "/reset":
            history, pending = [], []
            click.echo("(conversation cleared)")
            continue
        if command == "/system":
            system = argument.strip() or None
            click.echo(f"(system prompt {'set' if system else 'cleared'})")
            continue
        if command == "/image":
            click.echo(f"({image_command(session, argument.strip(), pending)})")
            continue
        if command.startswith("/") and not command.startswith("//"):
            click.echo(f"(unknown command {command}. {help_text})")
            continue
        if not text.strip():
            continue
        message = Message("user", marked(text, len(pending)), (), tuple(pending))
        if interactive:
            click.echo("model> ", nl=False)
        try:
            result = session.chat(
                Conversation([*history, message], system),
                options,
                on_text=lambda piece: (sys.stdout.write(piece), sys.stdout.flush()),
            )
        except LmflowError as exc:
            if not message.images:
                raise
            # An image that went bad since /image: the message is dropped, the chat goes on.
            click.echo(f"(error: {exc.one_line()}; the message and its images were not sent)")
            pending = []
            continue
        sys.stdout.write("\n")
        sys.stdout.flush()
        history += [message, Message("assistant", result.text)]
        pending = []
        report_stats(result.stats)


def image_command(session: Any, argument: str, pending: list[str]) -> str:
    """What ``/image ARGUMENT`` does to the ``pending`` images of the next message, as a line to show."""
    if not session.reads_images:
        return f"this model reads no images: {READS_NO_IMAGES}"
    if argument == "clear":
        dropped = len(pending)
        pending.clear()
        return f"{dropped} pending image(s) dropped"
    if not argument:
        if not pending:
            return "no image pending; /image PATH attaches one to your next message"
        return "pending for your next message: " + ", ".join(pending)
    if len(argument) > 1 and argument[0] == argument[-1] and argument[0] in "'\"":
        argument = argument[1:-1]  # a path pasted in quotes
    try:
        path = checked_image_path(argument)
    except LmflowError as exc:
        return f"error: {exc.one_line()}"
    pending.append(path)
    return f"image {path} attached to your next message ({len(pending)} pending)"


# --------------------------------------------------------------------------------------------------------------
# lmflow evaluate
# --------------------------------------------------------------------------------------------------------------


@click.command("evaluate", cls=PluginCommand)
@session_options
@click.option(
    "--dataset",
    required=True,
    help="Data to score: a .json/.jsonl file, a directory of them, or a hub dataset org/name[:split].",
)
@dataset_reading_options
@click.option(
    "--window", type=click.IntRange(min=8), help="Longest context per forward pass (default: the model's)."
)
@click.option(
    "--stride",
    type=click.IntRange(min=1),
    help="Sliding-window step for longer texts (default: half a window).",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--max-samples", type=click.IntRange(min=1), help="Score only the first N records.")
@click.option(
    "--nll-definition",
    default="training",
    show_default=True,
    metavar="training|lmflow",
    help="training: score the tokens training trains, the EOS after each text or answer included. "
    "lmflow: reproduce LMFlow's evaluator (no BOS or EOS; its window, and a stride of 512), "
    "for numbers comparable with LMFlow's.",
)
@click.option(
    "--prompt-structure",
    help="With --nll-definition lmflow: LMFlow's --prompt_structure for text2text inputs [default: {input}].",
)
@click.option(
    "--output", type=click.Path(dir_okay=False), help="JSON report path (default: eval-<dataset>.json)."
)
def evaluate_command(**values: Any) -> None:
    """Measure MODEL's negative log-likelihood on a dataset (the LMFlow benchmark's NLL).

    Prints nll_per_sample (each example's summed NLL, averaged over examples), nll_per_token and perplexity,
    and writes a JSON report. On conversation data only the assistant's tokens are scored. By default the EOS
    after each text or answer is scored too, as training trains it; --nll-definition lmflow gives LMFlow's
    numbers instead.
    """
    from .evaluation import check_evaluation_options, evaluate_dataset, write_report

    check_evaluation_options(
        values["nll_definition"], values["prompt_structure"], values["window"], values["stride"]
    )
    session = open_from_flags(values)
    report = evaluate_dataset(
        session,
        values["dataset"],
        window=values["window"],
        stride=values["stride"],
        batch_size=values["batch_size"],
        max_samples=values["max_samples"],
        nll_definition=values["nll_definition"],
        prompt_structure=values["prompt_structure"],
        dataset_format=values["dataset_format"],
        dataset_config=values["dataset_config"],
        dataset_revision=values["dataset_revision"],
    )
    # eval-test.json for data/test.json; eval-name-test.json for the hub dataset org/name:test
    stem = re.sub(
        r"[^\w.-]+",
        "-",
        Path(values["dataset"]).stem if report["hub"] is None else values["dataset"].split("/", 1)[1],
    )
    output = Path(values["output"] or f"eval-{stem}.json")
    write_report(report, output)
    metrics = report["metrics"]
    click.echo(
        f"model: {report['model']} | dataset: {report['dataset']} ({report['type']}, {report['records']} records)"
        f" | NLL definition: {report['nll_definition']}"
    )
    width = max([16, *(len(key) + 2 for key in metrics)])  # plugins' metrics have long names (lm_eval/...)
    click.echo(f"{'metric':<{width}}{'value':>14}")
    for key in ("nll_per_sample", "nll_per_token", "perplexity", "eval_samples", "eval_tokens"):
        if key in metrics:
            click.echo(f"{key:<{width}}{metrics[key]:>14.4f}")
    for key, value in metrics.items():
        if key not in ("nll_per_sample", "nll_per_token", "perplexity", "eval_samples", "eval_tokens"):
            click.echo(f"{key:<{width}}{value:>14.4f}")
    click.echo(f"report: {output}")


# --------------------------------------------------------------------------------------------------------------
# lmflow serve
# --------------------------------------------------------------------------------------------------------------


@click.command("serve", cls=PluginCommand)
@session_options
@click.option(
    "--host", default="127.0.0.1", show_default=True, help="Address to listen on (0.0.0.0: every interface)."
)
@click.option("--port", type=click.IntRange(min=1, max=65535), default=8000, show_default=True)
@click.option(
    "--api-key",
    envvar="LMFLOW_API_KEY",
    help="Require this key on everything but /health: 'Authorization: Bearer KEY' for the API, a sign-in form "
    "for the chat page (or set LMFLOW_API_KEY).",
)
@click.option(
    "--max-new-tokens",
    type=click.IntRange(min=1),
    help="Cap on a request's max_tokens [default: none, up to the model's context].",
)
@click.option(
    "--max-request-bytes",
    type=click.IntRange(min=1024),
    help="Largest request body; larger ones get a 413 [default: 1 MiB; 32 MiB when a plugin reads images].",
)
@click.option(
    "--request-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=300,
    show_default=True,
    help="Seconds a request may take, waiting included; the text so far is returned then.",
)
@click.option(
    "--max-batch-size",
    type=click.IntRange(min=1),
    default=16,
    show_default=True,
    help="Most requests decoded together (continuous batching); 1 serves one request at a time.",
)
@click.option(
    "--max-waiting",
    type=click.IntRange(min=1),
    default=256,
    show_default=True,
    help="Most requests waiting for the model; more get a 429.",
)
@click.option(
    "--shutdown-timeout",
    type=click.FloatRange(min=0),
    default=30,
    show_default=True,
    help="On SIGTERM, seconds to let the requests in flight finish.",
)
@click.option("--no-ui", is_flag=True, help="Serve the API only, without the chat page.")
@click.option(
    "--allow-local-images",
    type=click.Path(exists=True, file_okay=False),
    metavar="DIR",
    help="Let requests name image files under DIR (a path or file:// URL in an image part); without it, "
    "images come as base64 data: URLs only.",
)
def serve_command(**values: Any) -> None:
    """Serve MODEL: a chat page at / and an OpenAI-compatible API at /v1.

    POST /v1/chat/completions (with "stream": true as server-sent events), GET /v1/models, GET /health.
    Concurrent requests are decoded together. SIGTERM finishes the requests in flight, then exits.
    """
    from .serve import IMAGE_REQUEST_BYTES, ServeSettings, check_port, run_server

    check_port(values["host"], values["port"])
    session = open_from_flags(values)
    if values["allow_local_images"] and not session.reads_images:
        raise LmflowError(
            f"--allow-local-images is given, and model {session.name} is loaded without a plugin that reads "
            "images",
            READS_NO_IMAGES,
        )
    request_bytes = values["max_request_bytes"] or (
        IMAGE_REQUEST_BYTES if session.reads_images else 1024 * 1024
    )
    settings = ServeSettings(
        host=values["host"],
        port=values["port"],
        api_key=values["api_key"],
        max_new_tokens=values["max_new_tokens"],
        max_request_bytes=request_bytes,
        request_timeout=values["request_timeout"],
        max_batch_size=values["max_batch_size"],
        max_waiting=values["max_waiting"],
        shutdown_timeout=values["shutdown_timeout"],
        ui=not values["no_ui"],
        allow_local_images=values["allow_local_images"],
    )
    run_server(session, settings)


INFERENCE_COMMANDS = [generate_command, chat_command, evaluate_command, serve_command]

__all__ = [
    "INFERENCE_COMMANDS",
    "chat_command",
    "evaluate_command",
    "generate_command",
    "given",
    "serve_command",
]
