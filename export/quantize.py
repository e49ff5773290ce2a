"""Weight quantization of an exported decoder with onnxruntime's own tools.

int8 and int4 both use ``MatMulNBitsQuantizer`` (block-wise, symmetric): every
MatMul with a constant weight, the LM head included, becomes a ``MatMulNBits``
node that onnxruntime runs with dequantize-on-the-fly kernels.
"""
from __future__ import annotations

import logging

import onnx

log = logging.getLogger(__name__)

BLOCK_SIZE = 32      # values per scale; 32 kept argmax agreement highest in our measurements
ACCURACY_LEVEL = 4   # int8 activations in the kernel: the fast CPU path


def quantize_weights(model: onnx.ModelProto, weights: str) -> onnx.ModelProto:
    """Return ``model`` with its MatMul weights quantized to ``weights`` (int8|int4)."""
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    bits = {"int8": 8, "int4": 4}[weights]
    quantizer = MatMulNBitsQuantizer(
        model, bits=bits, block_size=BLOCK_SIZE, is_symmetric=True, accuracy_level=ACCURACY_LEVEL)
    quantizer.process()
    return quantizer.model.model


def float_matmul_weights(model: onnx.ModelProto) -> list[str]:
    """Names of the float initializers that MatMul nodes multiply by (what quantization should pack)."""
    floats = {t.name for t in model.graph.initializer if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16)}
    return [n.input[1] for n in model.graph.node if n.op_type == "MatMul" and len(n.input) > 1 and n.input[1] in floats]
