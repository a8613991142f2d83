"""Number formats, one file per family, each a :class:`Format` in the :data:`FORMATS`
registry that ``QuantLinear`` dispatches to:

| format | weight | activations | fast path (CUDA) | file |
|---|---|---|---|---|
| ``fp8`` | FP8 e4m3, per output channel | FP8, per token or per tensor | ``torch._scaled_mm`` (sm89+) | fp8.py |
| ``int8`` | INT8, per output channel | INT8, per token or per tensor | ``torch._int_mm`` | int8.py |
| ``weight-int8`` | INT8, per output channel | layer dtype | dequantize + matmul | weight_int.py |
| ``weight-int4`` / ``weight-int2`` | INT4 / INT2, asymmetric per group | layer dtype | dequantize + matmul | weight_int.py |
| ``nvfp4`` / ``mxfp4`` | E2M1 + block scales (packed) | fake-quantized the same way | simulated | fp4.py |

A new format is a new file here: subclass :class:`Format` (or a sibling's class), call
:func:`register_format`, and import the file below; ``QuantLinear``, mixed precision
(``formats=``) and checkpoints then know it by name, and a technique of its own is a
``QuantConfig`` with ``mode`` its name (as in ../weight_only.py). The imports below fix the
order formats are listed in.
"""

from cadence.accel.quant.formats._base import (
    FORMATS,
    TINY,
    Format,
    PerChannelFormat,
    absmax_scale,
    get_format,
    nbytes,
    pack,
    register_format,
    unpack,
    unregister_format,
)
from cadence.accel.quant.formats.fp8 import FP8, FP8_MAX, quantize_fp8
from cadence.accel.quant.formats.int8 import INT8_MAX, quantize_int8
from cadence.accel.quant.formats.weight_int import dequantize_groupwise, quantize_groupwise
from cadence.accel.quant.formats.fp4 import E2M1_MAX, E2M1_VALUES, MXFP4, NVFP4

__all__ = [
    "E2M1_MAX", "E2M1_VALUES", "FORMATS", "FP8", "FP8_MAX", "INT8_MAX", "MXFP4", "NVFP4", "TINY", "Format",
    "PerChannelFormat", "absmax_scale", "dequantize_groupwise", "get_format", "nbytes", "pack", "quantize_fp8",
    "quantize_groupwise", "quantize_int8", "register_format", "unpack", "unregister_format",
]
