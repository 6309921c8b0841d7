"""The ``akida`` target declaration (registered through the ``qanac.targets`` entry point group).

Declarative only: the pipeline (canonicalization, then the Akida legalization passes of
``qanac.passes.akida``), the lint rule table (``rules.py``), the device check, the command-line options
(``--device`` for compile and lint, ``--learnable`` for compile, ``--hardware`` for run) and the ``devices`` and
``learn`` commands (``cli.py``).
Importing this module imports neither the vendor stack nor TensorFlow.
"""

from __future__ import annotations

from qanac.targets import CANONICALIZE, Target, TargetOption

# Opt-in approximations (run only with --approx NAME; always reported with their deviation).
APPROXIMATIONS: tuple[str, ...] = ("attention-freeze",)
# Exact rewrites that must follow the approximations (they clean up what those leave behind).
AFTER_APPROXIMATIONS: tuple[str, ...] = ("scale-to-depthwise",)
# Exact rewrites of what Akida refuses or runs in software into forms it maps (passes/akida/).
LEGALIZE: tuple[str, ...] = (
    "dilated-conv-to-dense",
    "grouped-conv-to-dense",
    "even-kernel-to-odd",
    "strided-conv-to-stride1",
    "average-pool-to-depthwise",
    "split-padded-maxpool",
    "identity-conv-after-maxpool",
    "stage-global-average-pool",
)
# Approximations that act on the legalized graph (after every exact rewrite).
FINAL_APPROXIMATIONS: tuple[str, ...] = ("bound-relu",)

TARGET = Target(
    name="akida",
    description="BrainChip Akida IP v2 (.fbz through quantizeml + cnn2snn), mapped on a virtual or real device",
    backend="qanac.backends.akida.backend:AkidaBackend",
    pipeline=CANONICALIZE + APPROXIMATIONS + AFTER_APPROXIMATIONS + LEGALIZE + FINAL_APPROXIMATIONS,
    rules="qanac.backends.akida.rules:AKIDA_RULES",
    device_rules="qanac.backends.akida.v1.rules:rules_for_device",
    device_check="qanac.backends.akida.rules:device_findings",
    passes="qanac.passes.akida",
    options=(
        TargetOption("--device", key="device", commands=("compile", "lint"),
                     help="device the model is mapped onto (compile) or checked against (lint): a name from "
                          "`qanac devices` (default SixNodesIPv2) or 'auto'"),
        TargetOption("--weight-bits", key="weight_bits", commands=("compile",), type=int,
                     help="weight bits on an IP v1 device (AKD1000, AKD1500): 1, 2 or 4 (default 4)"),
        TargetOption("--activation-bits", key="activation_bits", commands=("compile",), type=int,
                     help="activation bits on an IP v1 device (AKD1000, AKD1500): 1 to 4 (default 4)"),
        TargetOption("--learnable", key="learnable", commands=("compile",), is_flag=True,
                     help="prepare the bundle for `qanac learn` from labelled calibration data (--calib X.npz "
                          "with 'labels'): on IP v1 a 1-bit feature layer and an edge-learning classifier primed "
                          "with the known classes, on IP v2 the feature statistics of the known classes"),
        TargetOption("--hardware", key="hardware", commands=("run",), is_flag=True,
                     help="run on a connected Akida board instead of akida's software backend"),
    ),
    commands={"devices": "qanac.backends.akida.cli:devices", "learn": "qanac.backends.akida.cli:learn"},
)
