"""`qanac devices`: the Akida target's own command (registered through ``Target.commands``, target.py).

Listing the virtual devices imports nothing of the vendor stack; only the hardware probe imports akida.
"""

from __future__ import annotations

import click

from qanac.backends.akida.devices import AUTO, DEFAULT_DEVICE, VIRTUAL_DEVICES, list_hardware_devices
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
