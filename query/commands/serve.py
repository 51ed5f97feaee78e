"""The explorer and its text box from the command line: `serve` (a local web app over the store, read-only) and
`activations` (a neuron's activation on any text, computed now from the checkpoint)."""

from __future__ import annotations

import click

from actdb.query.options import AppContext, device_option, format_option, pass_app, read_hook_option
from actdb.query.output import render

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@click.command()
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    help="Address to listen on (other than 127.0.0.1 exposes the store).",
)
@click.option("--port", type=click.IntRange(0, 65535), default=8000, show_default=True, help="Port (0: any free one).")
@click.option(
    "--max-models",
    type=click.IntRange(1, 64),
    default=4,
    show_default=True,
    help="Checkpoints kept loaded at once for 'try a text'.",
)
@device_option
@pass_app
def serve(app: AppContext, host: str, port: int, max_models: int, device: str) -> None:
    """Browse the store in a web browser: neurons, their twins in every seed, their life across checkpoints. The
    store is opened read-only; stopping the server (Ctrl-C) loses nothing."""
    import uvicorn

    from actdb.query.serve.app import create_app

    web = create_app(app.config, device=device, max_loaded=max_models)  # read-only; a missing store is one line
    if host not in LOCAL_HOSTS:
        click.echo(
            f"warning: listening on {host}: anyone who can reach this address can read the whole store", err=True
        )
    shown = f"[{host}]" if ":" in host else host
    click.echo(f"actdb explorer on http://{shown}:{port}/ (read-only; Ctrl-C stops it)", err=True)
    uvicorn.run(web, host=host, port=port, log_level="warning", access_log=False)


@click.command()
@click.argument("target", metavar="MODEL@STEP")
@click.option("--text", required=True, help="The text to run (at most 2000 characters).")
@click.option("--neurons", required=True, help="Comma-separated LAYER.NEURON, e.g. 1.17,0.3.")
@read_hook_option
@device_option
@format_option
@pass_app
def activations(app: AppContext, target: str, text: str, neurons: str, hook: str | None, device: str, fmt: str) -> None:
    """Per token of TEXT, the activation of each neuron, computed now by loading MODEL@STEP with ingest's own
    loader and hooks (the weights must be reachable)."""
    from actdb.query.text_activations import LoadedModels, Probe, text_activations
    from actdb.store.refs import parse_list, parse_neuron, parse_set_ref

    ref = parse_set_ref(target)
    cells = [parse_neuron(x) for x in parse_list(neurons, "neurons")]  # in the order given, each once
    probes = [Probe(ref.model, ref.step, layer, n) for layer, n in cells]
    click.echo(render(text_activations(app.store(), probes, text, LoadedModels(1, device), hook), fmt))


COMMANDS = (serve, activations)
