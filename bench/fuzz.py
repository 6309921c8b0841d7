"""Fuzzer: random small CNNs from PyTorch through every target, each outcome classified.

Per seed, ``random_cnn(seed)`` draws a small CNN (input 1-3 channels at 16-48 px): convolutions with
kernels 1-7, strides 1-2, dilation 1-2, grouped and depthwise, every ``nn.Conv2d`` padding mode
(zeros/reflect/replicate/circular) and explicit ``F.pad`` (constant/reflect/replicate/circular); max and
average pooling with and without ``ceil_mode``; BatchNorm; the activations exporters emit (ReLU, ReLU6,
Hardtanh, LeakyReLU, SiLU, Hardswish, GELU, Sigmoid, Tanh); residual Add; Concat; SE gates (GAP -> 1x1 ->
ReLU -> 1x1 -> Sigmoid -> Mul); a head (GAP+Linear, Flatten+Linear or a 1x1 conv head then GAP); an
optional trailing Softmax. Weights are PyTorch's random initialisation; BatchNorm statistics come from a
few random batches run in train mode. The model is exported with ``torch.onnx.export(opset_version=17,
dynamo=False)`` (the TorchScript exporter; the JSON records it), and saved with ``calib.npy`` (32
samples) and ``held.npz`` (64 other samples), both drawn from the seed.

For every target, as a user runs it (each command a subprocess with ``--timeout``, killed with its whole
session when it runs over):

    qanac compile model.onnx --target T --calib calib.npy -o OUT --json
    qanac verify OUT --data held.npz --json      (when compile exited 0)
    qanac lint model.onnx --target T --json      (when compile exited 3)

Outcomes:

- ``ok``: compile exit 0, verify exit 0, and the bundle agrees with its own quantized model;
- ``refused (lint agrees)`` / ``refused (lint disagrees)``: compile exit 3, and lint does / does not
  report an error finding;
- ``verify failure``: compile exit 0, verify exit 1; the cause is the first failing metric verify names;
- ``wrong bundle``: compile exit 0 but the compiled model's top-1 agreement with float is more than
  ``WRONG_BUNDLE_SLACK`` below that of the bundle's quantized variant (verify compares every variant with
  float; a target without a quantized variant, such as onnxruntime, cannot show this outcome);
- ``crash``: exit 4, a signal, or a Python traceback in the output, of compile, verify or lint;
- ``hang``: a command ran over ``--timeout``;
- ``other``: any other exit (2: the fuzzer gave qanac something it rejects as bad usage).

    python bench/fuzz.py [--seeds 0:100] [--targets onnxruntime,akida] [--timeout 300] [--jobs 1]
                         [--json-out PATH] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import multiprocessing
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
QANAC = Path(sys.executable).with_name("qanac")
TARGETS = ("onnxruntime", "akida")
OUTCOMES = ("ok", "refused (lint agrees)", "refused (lint disagrees)", "verify failure", "wrong bundle",
            "crash", "hang", "other")
FAILING = ("crash", "hang", "wrong bundle")  # the outcomes the CI slice fails on
WRONG_BUNDLE_SLACK = 0.05  # one prediction in 20: qanac verify's default agreement tolerance
NEAR_TIE_MAJORITY = 0.5  # a verify failure where at least this share of inputs are near ties is caused by them
ILL_CONDITIONED_GAIN = 100.0  # a readout gain from which quantization error is amplified past verify's thresholds
EXPORTER = "torch.onnx.export(opset_version=17, dynamo=False)"
CALIB_SAMPLES, HELD_SAMPLES = 32, 64

ACTIVATIONS = ("ReLU", "ReLU6", "Hardtanh", "LeakyReLU", "SiLU", "Hardswish", "GELU", "Sigmoid", "Tanh")
CONV_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
PAD_MODES = ("constant", "reflect", "replicate", "circular")


# ------------------------------------------------------------------------------------------ the models


def _activation(name: str):
    import torch.nn as nn

    return {"ReLU": nn.ReLU, "ReLU6": nn.ReLU6, "Hardtanh": lambda: nn.Hardtanh(-1.0, 1.0),
            "LeakyReLU": lambda: nn.LeakyReLU(0.1), "SiLU": nn.SiLU, "Hardswish": nn.Hardswish,
            "GELU": nn.GELU, "Sigmoid": nn.Sigmoid, "Tanh": nn.Tanh}[name]()


def _build_layer(spec: dict[str, Any]):
    """The ``nn.Module`` a layer spec (a JSON-able dict drawn by ``random_cnn``) describes."""

    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    kind = spec["kind"]
    if kind == "conv":
        layers = [nn.Conv2d(spec["cin"], spec["cout"], spec["k"], stride=spec["stride"], padding=spec["pad"],
                            dilation=spec["dilation"], groups=spec["groups"], bias=spec["bias"],
                            padding_mode=spec["padding_mode"])]
        if spec["bn"]:
            layers.append(nn.BatchNorm2d(spec["cout"]))
        if spec["act"]:
            layers.append(_activation(spec["act"]))
        return nn.Sequential(*layers)
    if kind == "pad":
        class Pad(nn.Module):
            def forward(self, x):
                return F.pad(x, spec["pads"], mode=spec["mode"])
        return Pad()
    if kind == "pool":
        if spec["op"] == "max":
            return nn.MaxPool2d(spec["k"], spec["stride"], spec["pad"], ceil_mode=spec["ceil"])
        return nn.AvgPool2d(spec["k"], spec["stride"], spec["pad"], ceil_mode=spec["ceil"],
                            count_include_pad=spec["count_include_pad"])
    if kind == "residual":
        body = nn.Sequential(*[_build_layer(s) for s in spec["body"]])

        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.body = body
                self.act = _activation(spec["act"]) if spec["act"] else nn.Identity()

            def forward(self, x):
                return self.act(x + self.body(x))
        return Residual()
    if kind == "concat":
        branches = nn.ModuleList(_build_layer(s) for s in spec["branches"])

        class Concat(nn.Module):
            def __init__(self):
                super().__init__()
                self.branches = branches

            def forward(self, x):
                return torch.cat([b(x) for b in self.branches] + ([x] if spec["keep_input"] else []), dim=1)
        return Concat()
    if kind == "se":
        class SE(nn.Module):
            def __init__(self):
                super().__init__()
                self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(spec["c"], spec["hidden"], 1),
                                          nn.ReLU(), nn.Conv2d(spec["hidden"], spec["c"], 1), nn.Sigmoid())

            def forward(self, x):
                return x * self.gate(x)
        return SE()
    if kind == "head":
        if spec["type"] == "gap_linear":
            layers = [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(spec["c"], spec["classes"])]
        elif spec["type"] == "flatten_linear":
            layers = [nn.Flatten(), nn.Linear(spec["c"] * spec["h"] * spec["w"], spec["classes"])]
        else:
            layers = [nn.Conv2d(spec["c"], spec["classes"], 1), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        if spec["softmax"]:
            layers.append(nn.Softmax(dim=1))
        return nn.Sequential(*layers)
    raise ValueError(f"unknown layer kind {kind!r}")


def _output_shape(spec: dict[str, Any], shape: tuple[int, int, int]) -> tuple[int, int, int] | None:
    """(C, H, W) after the layer on a (C, H, W) input, or None when PyTorch rejects the layer there."""

    import torch

    try:
        with torch.no_grad():
            out = _build_layer(spec).eval()(torch.zeros(1, *shape))
    except (RuntimeError, ValueError, NotImplementedError):
        return None
    return tuple(out.shape[1:])


def _draw_conv(rng: random.Random, c: int, h: int, w: int, *, keep_shape: bool = False) -> dict[str, Any]:
    k = rng.choice([1, 1, 3, 3, 3, 5, 7]) if not keep_shape else rng.choice([1, 3, 3, 5])
    dilation = 2 if k > 1 and rng.random() < 0.2 else 1
    stride = 1 if keep_shape else rng.choice([1, 1, 2])
    same = dilation * (k - 1) // 2
    pad = same if keep_shape else rng.choice([0, same, same, min(same + 1, k)])
    group_kind = rng.choices(["dense", "depthwise", "grouped"], [6, 3, 1])[0]
    if group_kind == "depthwise":
        groups, cout = c, (c if keep_shape else c * rng.choice([1, 1, 2]))
    elif group_kind == "grouped" and c % 2 == 0:
        groups = rng.choice([g for g in (2, 4) if c % g == 0])
        cout = c if keep_shape else groups * rng.choice([1, 2, 4])
    else:
        groups, cout = 1, c if keep_shape else rng.choice([4, 8, 8, 12, 16, 24])
    mode = rng.choices(CONV_PADDING_MODES, [5, 1, 1, 1])[0] if pad else "zeros"
    act = rng.choice(ACTIVATIONS) if rng.random() < 0.85 else None
    return {"kind": "conv", "cin": c, "cout": cout, "k": k, "stride": stride, "pad": pad, "dilation": dilation,
            "groups": groups, "bias": rng.random() < 0.5, "padding_mode": mode, "bn": rng.random() < 0.7,
            "act": act}


def _draw_layer(rng: random.Random, c: int, h: int, w: int) -> dict[str, Any]:
    kind = rng.choices(["conv", "pad", "pool", "residual", "concat", "se"], [8, 1, 3, 2, 2, 1])[0]
    if kind == "conv":
        return _draw_conv(rng, c, h, w)
    if kind == "pad":
        mode = rng.choice(PAD_MODES)
        return {"kind": "pad", "mode": mode, "pads": [rng.randint(0, 2) for _ in range(4)]}
    if kind == "pool":
        k = rng.choice([2, 2, 3])
        return {"kind": "pool", "op": rng.choice(["max", "avg"]), "k": k, "stride": rng.choice([1, 2, 2]),
                "pad": rng.choice([0, 0, k // 2]), "ceil": rng.random() < 0.5,
                "count_include_pad": rng.random() < 0.5}
    if kind == "residual":
        body = [_draw_conv(rng, c, h, w, keep_shape=True) for _ in range(rng.randint(1, 2))]
        body[-1]["act"] = None
        return {"kind": "residual", "body": body, "act": rng.choice(ACTIVATIONS + (None,))}
    if kind == "concat":
        branches = []
        for _ in range(rng.randint(1, 2)):
            branch = _draw_conv(rng, c, h, w, keep_shape=True)
            branch["cout"] = rng.choice([4, 8]) if branch["groups"] == 1 else branch["cout"]
            branches.append(branch)
        return {"kind": "concat", "branches": branches, "keep_input": rng.random() < 0.5}
    return {"kind": "se", "c": c, "hidden": max(2, c // 4)}


@dataclass
class Case:
    """One drawn model: its layer specs, input shape and the seed that drew it."""

    seed: int
    input_shape: tuple[int, int, int]  # C, H, W
    layers: list[dict[str, Any]] = field(default_factory=list)

    def summary(self) -> str:
        names = []
        for spec in self.layers:
            if spec["kind"] == "conv":
                extra = "dw" if spec["groups"] == spec["cin"] and spec["groups"] > 1 else (
                    f"g{spec['groups']}" if spec["groups"] > 1 else "")
                names.append(f"conv{spec['k']}s{spec['stride']}{extra}")
            elif spec["kind"] == "head":
                names.append(spec["type"] + ("+softmax" if spec["softmax"] else ""))
            else:
                names.append(spec["kind"])
        c, h, w = self.input_shape
        return f"{c}x{h}x{w}: " + " ".join(names)


def random_cnn(seed: int, max_layers: int = 6) -> Case:
    """Draw a CNN from ``seed``; every layer is checked against PyTorch's shape rules as it is drawn, so
    the model always runs (a layer PyTorch rejects on the current shape is redrawn)."""

    rng = random.Random(seed)
    shape = (rng.randint(1, 3), rng.randint(16, 48), rng.randint(16, 48))
    if rng.random() < 0.5:
        shape = (shape[0], shape[1], shape[1])
    case = Case(seed, shape)
    c, h, w = shape
    for _ in range(rng.randint(2, max_layers)):
        for _attempt in range(20):
            spec = _draw_layer(rng, c, h, w)
            if spec["kind"] == "conv" and spec["cin"] != c:
                continue
            out = _output_shape(spec, (c, h, w))
            if out is not None and min(out[1:]) >= 2 and out[0] <= 64:
                case.layers.append(spec)
                c, h, w = out
                break
    head_type = rng.choice(["gap_linear", "flatten_linear", "conv"]) if c * h * w <= 4096 else \
        rng.choice(["gap_linear", "conv"])
    case.layers.append({"kind": "head", "type": head_type, "c": c, "h": h, "w": w,
                        "classes": rng.choice([4, 5, 10]), "softmax": rng.random() < 0.3})
    return case


def build_model(case: Case):
    """The PyTorch model of ``case``: random initialisation (seeded), BatchNorm statistics from 4 random
    batches in train mode, returned in eval mode."""

    import torch
    import torch.nn as nn

    torch.manual_seed(case.seed)
    model = nn.Sequential(*[_build_layer(spec) for spec in case.layers])
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.5, 1.5)
            nn.init.uniform_(module.bias, -0.2, 0.2)
    model.train()
    with torch.no_grad():
        for _ in range(4):
            model(torch.from_numpy(_images(np.random.default_rng(case.seed + 1), 16, case.input_shape)))
    model.eval()
    _standardise_readout(model, torch.from_numpy(_images(np.random.default_rng(case.seed + 2), 64, case.input_shape)))
    return model


def _standardise_readout(model, images) -> None:
    """Scale and shift the readout (the last Linear or Conv2d, which has a bias) so each class score has
    zero mean and unit variance over ``images``: the float model's top-1 then varies between inputs, and
    top-1 agreement measures something. A conv head's scores are its outputs averaged over the image (the
    head's global average pooling, which commutes with the affine change)."""

    import torch
    import torch.nn as nn

    readout = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    captured = []
    hook = readout.register_forward_hook(lambda _m, _i, out: captured.append(out))
    with torch.no_grad():
        model(images)
    hook.remove()
    scores = captured[0].mean(dim=(2, 3)) if captured[0].dim() == 4 else captured[0]
    mean, std = scores.mean(dim=0), scores.std(dim=0).clamp_min(1e-6)
    with torch.no_grad():
        readout.weight.div_(std.reshape(-1, *[1] * (readout.weight.dim() - 1)))
        readout.bias.sub_(mean).div_(std)


def _images(rng: np.random.Generator, n: int, shape: tuple[int, int, int]) -> np.ndarray:
    """Smooth random images in [-1, 1]: low-resolution noise upsampled, plus a little pixel noise."""

    c, h, w = shape
    coarse = rng.uniform(-1, 1, size=(n, c, (h + 3) // 4, (w + 3) // 4))
    smooth = coarse.repeat(4, axis=2).repeat(4, axis=3)[:, :, :h, :w]
    return np.clip(smooth + rng.normal(0, 0.1, size=smooth.shape), -1, 1).astype(np.float32)


def readout_gain(model) -> float:
    """The largest weight magnitude of the readout after ``_standardise_readout``: how far the standardisation
    stretched class scores that barely vary between inputs. Quantization error in the features is multiplied
    by it, so a large gain (a hundred and more) explains a verify failure as the model's conditioning."""

    import torch.nn as nn

    readout = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))][-1]
    return float(readout.weight.detach().abs().max())


def write_case(case: Case, folder: Path) -> float:
    """``folder``/model.onnx, calib.npy and held.npz (array named after the model's input); returns the
    model's ``readout_gain``."""

    import torch

    folder.mkdir(parents=True, exist_ok=True)
    model = build_model(case)
    data = _images(np.random.default_rng(case.seed), CALIB_SAMPLES + HELD_SAMPLES, case.input_shape)
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on constant folding, not about the model
        torch.onnx.export(model, (torch.from_numpy(data[:1]),), str(folder / "model.onnx"), opset_version=17,
                          dynamo=False, input_names=["input"], output_names=["output"])
    np.save(folder / "calib.npy", data[:CALIB_SAMPLES])
    np.savez(folder / "held.npz", input=data[CALIB_SAMPLES:])
    (folder / "case.json").write_text(json.dumps(asdict(case), indent=1))
    return readout_gain(model)


# ------------------------------------------------------------------------------------------ running qanac


@dataclass
class Ran:
    """How one subprocess ended: exit code (None: killed after the timeout), seconds, its output."""

    returncode: int | None
    seconds: float
    stdout: str
    stderr: str

    @property
    def crashed(self) -> bool:
        return self.returncode is not None and (self.returncode == 4 or self.returncode < 0
                                                or "Traceback (most recent call last)" in self.stderr
                                                or "Traceback (most recent call last)" in self.stdout)

    def document(self) -> Any:
        """The JSON document a ``--json`` command printed (from its first ``{``), or None."""

        start = self.stdout.find("{")
        try:
            return json.loads(self.stdout[start:]) if start >= 0 else None
        except json.JSONDecodeError:
            return None

    def reason(self) -> str:
        """One line: the JSON error message, the signal, or the last line of output."""

        if self.returncode is None:
            return f"no result after {self.seconds:.0f} s"
        if self.returncode < 0:
            frames = [ln.strip() for ln in self.stderr.splitlines() if ln.strip().startswith("File ")]
            return f"killed by {signal.Signals(-self.returncode).name}" + (f" in {frames[0]}" if frames else "")
        document = self.document()
        if isinstance(document, dict) and document.get("message"):
            return str(document["message"]).splitlines()[0]
        lines = [ln for ln in (self.stderr + "\n" + self.stdout).splitlines() if ln.strip()]
        return lines[-1].strip() if lines else f"exit {self.returncode}"


def run(command: list[str], timeout: float) -> Ran:
    """Run ``command`` in its own session; after ``timeout`` seconds the whole session is killed."""

    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                               text=True, start_new_session=True, cwd=REPO,
                               env={**os.environ, "PYTHONFAULTHANDLER": "1"})
    try:
        stdout, stderr = process.communicate(timeout=timeout)
        returncode: int | None = process.returncode
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        returncode = None
    return Ran(returncode, time.perf_counter() - started, stdout, stderr)


def compile_command(folder: Path, target: str) -> list[str]:
    return [str(QANAC), "compile", str(folder / "model.onnx"), "--target", target, "--calib",
            str(folder / "calib.npy"), "-o", str(folder / f"out-{target}"), "--json"]


def verify_command(folder: Path, target: str) -> list[str]:
    return [str(QANAC), "verify", str(folder / f"out-{target}"), "--data", str(folder / "held.npz"), "--json"]


def lint_command(folder: Path, target: str) -> list[str]:
    return [str(QANAC), "lint", str(folder / "model.onnx"), "--target", target, "--json"]


def _error_codes(document: Any, key: str) -> list[str]:
    """The codes of the error-level diagnostics under ``key`` of a ``--json`` document (lint: ``findings``,
    an error document: ``diagnostics``)."""

    entries = document.get(key, []) if isinstance(document, dict) else []
    return [str(e.get("code")) for e in entries if isinstance(e, dict) and e.get("level") == "error"]


def _top1(verdict: dict[str, Any], variant: str) -> float | None:
    results = verdict.get("comparisons", {}).get(variant) or []
    values = [r.get("top1_agreement") for r in results if r.get("top1_agreement") is not None]
    return min(values) if values else None


def classify(folder: Path, target: str, timeout: float) -> dict[str, Any]:
    """Compile, then verify or lint, ``folder``/model.onnx for ``target``; the outcome and its evidence."""

    shutil.rmtree(folder / f"out-{target}", ignore_errors=True)
    compiled = run(compile_command(folder, target), timeout)
    row: dict[str, Any] = {"target": target, "compile_exit": compiled.returncode,
                           "compile_seconds": round(compiled.seconds, 1)}
    if compiled.returncode is None:
        return {**row, "outcome": "hang", "stage": "compile", "detail": compiled.reason()}
    if compiled.crashed:
        return {**row, "outcome": "crash", "stage": "compile", "detail": compiled.reason()}
    if compiled.returncode == 3:
        linted = run(lint_command(folder, target), timeout)
        row.update(lint_exit=linted.returncode, refusal=compiled.reason())
        if linted.returncode is None:
            return {**row, "outcome": "hang", "stage": "lint", "detail": linted.reason()}
        if linted.crashed:
            return {**row, "outcome": "crash", "stage": "lint", "detail": linted.reason()}
        lint_errors = _error_codes(linted.document(), "findings")
        row.update(compile_errors=_error_codes(compiled.document(), "diagnostics"), lint_errors=lint_errors)
        agrees = linted.returncode == 3 and bool(lint_errors)
        return {**row, "outcome": "refused (lint agrees)" if agrees else "refused (lint disagrees)",
                "detail": compiled.reason()}
    if compiled.returncode != 0:
        return {**row, "outcome": "other", "stage": "compile", "detail": compiled.reason()}

    verified = run(verify_command(folder, target), timeout)
    row.update(verify_exit=verified.returncode, verify_seconds=round(verified.seconds, 1))
    if verified.returncode is None:
        return {**row, "outcome": "hang", "stage": "verify", "detail": verified.reason()}
    if verified.crashed:
        return {**row, "outcome": "crash", "stage": "verify", "detail": verified.reason()}
    verdict = verified.document()
    if verified.returncode not in (0, 1) or not isinstance(verdict, dict) or "comparisons" not in verdict:
        return {**row, "outcome": "other", "stage": "verify", "detail": verified.reason()}
    row.update(agreement=_top1(verdict, "compiled"), quantized_agreement=_top1(verdict, "quantized"),
               sqnr_db=min((r["sqnr_db"] for r in verdict["comparisons"]["compiled"]), default=None),
               near_tie_share=max((r.get("near_tie_share") or 0.0 for r in verdict["comparisons"]["compiled"]),
                                  default=None))
    return {**row, **verify_outcome(verdict, verified.returncode)}


def verify_outcome(verdict: dict[str, Any], returncode: int) -> dict[str, str]:
    """``wrong bundle`` when the compiled model's worst top-1 agreement with float is more than
    ``WRONG_BUNDLE_SLACK`` below its quantized variant's; else ``verify failure`` (exit 1, with the first
    failing metric) or ``ok``."""

    compiled_top1, quantized_top1 = _top1(verdict, "compiled"), _top1(verdict, "quantized")
    if compiled_top1 is not None and quantized_top1 is not None \
            and compiled_top1 < quantized_top1 - WRONG_BUNDLE_SLACK:
        return {"outcome": "wrong bundle", "stage": "verify",
                "detail": f"compiled top-1 agreement {compiled_top1:.3f} vs quantized {quantized_top1:.3f}"}
    if returncode == 1:
        failures = verdict.get("failures") or ["verify exit 1"]
        return {"outcome": "verify failure", "detail": str(failures[0])}
    return {"outcome": "ok"}


def fuzz_seed(seed: int, targets: list[str], workdir: Path, timeout: float) -> list[dict[str, Any]]:
    """Every target's row for one seed (a generation failure is a ``crash`` of the fuzzer's own stage)."""

    folder = workdir / f"seed-{seed}"
    case = random_cnn(seed)
    base = {"seed": seed, "model": case.summary(), "folder": str(folder)}
    try:
        base["readout_gain"] = round(write_case(case, folder), 1)
    except Exception as exc:  # the exporter's own failures are rows, not the end of the run
        return [{**base, "target": t, "outcome": "other", "stage": "export", "detail": f"{type(exc).__name__}: {exc}"}
                for t in targets]
    rows = [{**base, **classify(folder, target, timeout)} for target in targets]
    for row in rows:
        if row["outcome"] == "verify failure":
            row["cause"] = failure_cause(row)
    return rows


def failure_cause(row: dict[str, Any]) -> str:
    """Why a bundle failed verify, from its row: most inputs near ties (verify's ``near_tie_share``: the float
    model's top-2 margin within twice the compiled model's error, so agreement there is chance), else an
    ill-conditioned readout (``readout_gain`` of ``ILL_CONDITIONED_GAIN`` or more), else quantization error."""

    if (row.get("near_tie_share") or 0.0) >= NEAR_TIE_MAJORITY:
        return f"near ties ({row['near_tie_share']:.0%} of the inputs)"
    if (row.get("readout_gain") or 0.0) >= ILL_CONDITIONED_GAIN:
        return f"ill-conditioned readout (gain {row['readout_gain']:.0f})"
    return "quantization error"


def reproduce(seed: int, target: str) -> str:
    return f"python bench/fuzz.py --seeds {seed}:{seed + 1} --targets {target} --workdir build/fuzz --keep"


# ------------------------------------------------------------------------------------------ report


def format_report(rows: list[dict[str, Any]], targets: list[str]) -> str:
    counts = {t: Counter(r["outcome"] for r in rows if r["target"] == t) for t in targets}
    width = max(len(o) for o in OUTCOMES)
    lines = [f"{'outcome':<{width}}  " + "  ".join(f"{t:>11}" for t in targets)]
    for outcome in OUTCOMES:
        lines.append(f"{outcome:<{width}}  " + "  ".join(f"{counts[t][outcome]:>11}" for t in targets))
    lines.append(f"{'seeds':<{width}}  " + "  ".join(f"{sum(counts[t].values()):>11}" for t in targets))
    bad = [r for r in rows if r["outcome"] != "ok"]
    if bad:
        lines.append("\nnot ok:")
    for r in sorted(bad, key=lambda r: (OUTCOMES.index(r["outcome"]), r["target"], r["seed"])):
        lines.append(f"  seed {r['seed']} {r['target']}: {r['outcome']}"
                     + (f" [{r['stage']}]" if r.get("stage") else "") + f": {r.get('detail', '')}"
                     + (f"; cause: {r['cause']}" if r.get("cause") else ""))
        gain = f" (readout gain {r['readout_gain']})" if "readout_gain" in r else ""
        lines.append(f"    model {r['model']}{gain}")
        lines.append(f"    reproduce: {reproduce(r['seed'], r['target'])}")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    """``A:B`` (B excluded), single seeds and ranges joined by commas: ``0:4,10,12:14``."""

    seeds: list[int] = []
    for part in text.split(","):
        start, _, stop = part.partition(":")
        seeds.extend(range(int(start), int(stop)) if stop else [int(start)])
    return seeds


def job_pool(jobs: int) -> concurrent.futures.Executor:
    """Where ``--jobs`` seeds run at once: one spawned process per job. torch's RNG (``build_model`` seeds
    it) and its exporter's flags are global to a process, so on threads a seed's weights depended on the
    seeds built meanwhile, and two exports at once failed ("GLOBALS.in_onnx_export must be False")."""

    return concurrent.futures.ProcessPoolExecutor(max_workers=max(1, jobs),
                                                  mp_context=multiprocessing.get_context("spawn"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0:20", help="A:B (B excluded), seeds and ranges joined by commas")
    parser.add_argument("--targets", default=",".join(TARGETS))
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds per qanac command")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once")
    parser.add_argument("--json-out", type=Path)
    parser.add_argument("--workdir", type=Path, help="where models and bundles go (default: a temporary one)")
    parser.add_argument("--keep", action="store_true", help="keep the models and bundles of every seed")
    args = parser.parse_args(argv)
    targets = [t for t in args.targets.split(",") if t]
    seeds = parse_seeds(args.seeds)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="qanac-fuzz-"))
    workdir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    with job_pool(args.jobs) as pool:
        futures = {pool.submit(fuzz_seed, seed, targets, workdir, args.timeout): seed for seed in seeds}
        for future in concurrent.futures.as_completed(futures):
            seed_rows = future.result()
            rows.extend(seed_rows)
            for r in seed_rows:
                print(f"seed {r['seed']:>4} {r['target']:<12} {r['outcome']}"
                      + (f": {r['detail']}" if r.get("detail") else ""), flush=True)
            if not args.keep and all(r["outcome"] == "ok" for r in seed_rows):
                shutil.rmtree(workdir / f"seed-{futures[future]}", ignore_errors=True)
            rows.sort(key=lambda r: (r["seed"], targets.index(r["target"])))
            if args.json_out:  # rewritten after every seed: an interrupted run keeps what it measured
                write_json(args.json_out, args, targets, time.perf_counter() - started, rows)
    print()
    print(format_report(rows, targets))
    seconds = time.perf_counter() - started
    print(f"\n{len(seeds)} seeds x {len(targets)} targets in {seconds:.0f} s; models and failing bundles in {workdir}")
    return 0


def write_json(path: Path, args: argparse.Namespace, targets: list[str], seconds: float,
               rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"exporter": EXPORTER, "seeds": args.seeds, "targets": targets,
                                "timeout": args.timeout, "seconds": round(seconds, 1),
                                "wrong_bundle_slack": WRONG_BUNDLE_SLACK, "rows": rows}, indent=1))


if __name__ == "__main__":
    sys.exit(main())
