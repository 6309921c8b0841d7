"""`qanac devices` and `qanac learn`: the Akida target's own commands (registered through ``Target.commands``,
target.py).

Listing the virtual devices imports nothing of the vendor stack; only the hardware probe imports akida.
`learn` imports it when it runs (``learning.py``).
"""

from __future__ import annotations

from pathlib import Path

import click

from qanac.backends.akida.devices import AUTO, DEFAULT_DEVICE, VIRTUAL_DEVICES, list_hardware_devices
from qanac.backends.akida.learning import LEARN_PASSES
from qanac.cli_support import emit_json, handle_errors, json_option


@click.command("devices")
@json_option
@handle_errors
def devices(as_json: bool) -> None:
    """List Akida devices: the virtual ones qanac maps onto, and any real hardware attached."""

    hardware = list_hardware_devices()
    if as_json:
        emit_json({
            "virtual": [spec.to_dict() for spec in VIRTUAL_DEVICES.values()],
            "default": DEFAULT_DEVICE,
            "hardware": hardware,
        })
        return
    click.echo("virtual devices (for mapping; inference runs on akida's software backend):")
    for spec in VIRTUAL_DEVICES.values():
        default = "  (default)" if spec.name == DEFAULT_DEVICE else ""
        click.echo(f"  {spec.name:<16} IP {spec.ip_version}, {spec.num_nps or '?'} NPs: {spec.description}{default}")
    click.echo(f"  {AUTO:<16} the smallest device that holds the whole model")
    attached = ", ".join(f"#{d['index']} {d['desc']}" for d in hardware)
    click.echo(f"hardware: {attached or 'none attached'}")


@click.command("learn")
@click.argument("bundle", type=click.Path(path_type=Path))
@click.option("--data", "data", required=True, type=click.Path(path_type=Path),
              help="Labelled samples: an .npz with the input array and 'labels' (class indices; indices past the "
                   "bundle's classes add classes) or an image folder with one sub-folder per class (a sub-folder "
                   "named like a known class refines it, any other adds a class).")
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path), help="The learned bundle.")
@click.option("--force", is_flag=True, help="Replace OUTPUT if it exists.")
@click.option("--passes", type=click.IntRange(1, 100), default=LEARN_PASSES, show_default=True,
              help="Passes over the samples (IP v1 edge learning).")
@click.option("--hardware", is_flag=True,
              help="Learn on an attached Akida board (akida.devices()) instead of akida's software backend "
                   "(untested: no board on the build machines).")
@click.option("--device-index", type=int, default=0, show_default=True, help="Which attached board (--hardware).")
@json_option
@handle_errors
def learn(bundle: Path, data: Path, output: Path, force: bool, passes: int, hardware: bool, device_index: int,
          as_json: bool) -> None:
    """Teach a bundle compiled with --learnable new classes, or more samples of known ones, from labelled
    samples; the feature extractor stays as compiled and writes the learned bundle to OUTPUT."""

    from qanac.backends.akida.learning import learn_bundle

    result = learn_bundle(bundle, data, output, force=force, hardware=hardware, device_index=device_index,
                          passes=passes)
    if as_json:
        emit_json(result.to_dict())
        return
    step = result.step
    click.echo(f"learned {step.samples} samples of {data} on Akida IP {result.ip_version}: "
               f"added {', '.join(step.added) or 'no class'}; refined {', '.join(step.refined) or 'no class'}")
    for learned in result.classes:
        click.echo(f"  {learned.label:<20} {learned.samples} samples")
    click.echo(f"wrote {result.output}")
