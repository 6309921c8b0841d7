"""The padding forms cnn2snn accepts for an Akida convolution, shared by the lint rules and the
legalization passes.

Padding forms (cnn2snn/quantizeml/onnx_conversion/padding.py, cnn2snn 2.19.3; the SameUpper kernels and
stride are in qanac's table, ``patterns.QANAC``). Per spatial axis of size
``n``, a kernel ``k`` and a stride ``s`` give ``total = max(k - s, 0)`` when ``n % s == 0``, else
``max(k - n % s, 0)``; a convolution's ``pads`` must then be, on both axes in the same form:

    valid       (0, 0)
    same        (total // 2, total - total // 2)   Akida "Same" (TensorFlow SAME: the odd pixel at the end)
    same_upper  (total - total // 2, total // 2)   } Akida "SameUpper": stride 2 only, 3x3 kernels (input
    symmetric   (total - total // 2,) * 2          } layer: 3x3, 5x5, 7x7), and never with max pooling

A max pooling fused after a convolution needs the convolution in the ``same`` form and its own pads in
the ``same`` form of its output size, pool size and pool stride. Anything else is refused by convert()
("Expect pads to be one of ..."). The ``valid`` form converts, but map() puts a layer with a kernel larger
than 1x1 in it in software ("Only padding 'Same' and 'SameUpper' are supported."), except the input layer
(measured: a 3x3 input convolution without padding maps to hardware at stride 1 and 2), so the passes take
it only when no other form fits (``accepted_forms`` lists it last).
"""

from __future__ import annotations

from qanac.backends.akida.patterns import QANAC


def axis_pads(size: int, kernel: int, stride: int, form: str) -> tuple[int, int]:
    """(begin, end) padding of one axis in one of cnn2snn's ``PAD_FORMS``."""

    remainder = size % stride
    total = max(kernel - (stride if remainder == 0 else remainder), 0)
    small, large = total // 2, total - total // 2
    return {"valid": (0, 0), "same": (small, large), "same_upper": (large, small), "symmetric": (large, large)}[form]


def form_pads(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], form: str) -> list[int]:
    """ONNX ``pads`` [h_begin, w_begin, h_end, w_end] of a 2-D window in ``form``."""

    (hb, he), (wb, we) = (axis_pads(size[i], kernel[i], stride[i], form) for i in range(2))
    return [hb, wb, he, we]


def accepted_forms(kernel: tuple[int, int], stride: tuple[int, int], is_input_layer: bool) -> tuple[str, ...]:
    """The padding forms cnn2snn accepts for a convolution with this kernel and stride, ``valid`` last (it
    maps to software)."""

    upper_kernels = QANAC.same_upper_input_kernels if is_input_layer else QANAC.same_upper_kernels
    if stride == (QANAC.same_upper_stride,) * 2 and kernel[0] == kernel[1] and kernel[0] in upper_kernels:
        return ("same", "same_upper", "symmetric", "valid")
    return ("same", "valid")


def pads_form(size: tuple[int, int], kernel: tuple[int, int], stride: tuple[int, int], pads: list[int],
              is_input_layer: bool) -> str | None:
    """The accepted padding form that ``pads`` is, or None when cnn2snn would reject them."""

    for form in accepted_forms(kernel, stride, is_input_layer):
        if form_pads(size, kernel, stride, form) == list(pads):
            return form
    return None


def output_size(size: int, kernel: int, stride: int, begin: int, end: int) -> int:
    return (size + begin + end - kernel) // stride + 1
