"""Static int8 quantisation for CPUs: shape pre-processing, calibration on training images, per-channel QDQ."""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from imgcls.model_files import INPUT_NAME

log = logging.getLogger(__name__)


class _Calibration:
    """Feeds uint8 training pixels to the calibrator in small batches (the graph normalises them itself)."""

    def __init__(self, pixels: np.ndarray, batch_size: int = 16):
        self.batches = iter([pixels[i : i + batch_size] for i in range(0, len(pixels), batch_size)])

    def get_next(self) -> dict[str, np.ndarray] | None:
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}


def quantize_int8(fp32_path: Path, path: Path, calibration_pixels: np.ndarray) -> Path:
    """Write an int8 QDQ model (uint8 activations, per-channel int8 weights) calibrated on ``calibration_pixels``.

    ``quant_pre_process`` (shape inference and graph optimisation: batch norm folded into convolutions)
    is what makes the quantised model fast on CPUs; without it we measured no gain.
    """
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory() as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared), skip_symbolic_shape=False)
        quantize_static(
            str(prepared),
            str(path),
            _Calibration(calibration_pixels),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            per_channel=True,
            calibrate_method=CalibrationMethod.MinMax,
            # Quantise the compute-heavy ops; the uint8->float normalisation at the input stays exact.
            op_types_to_quantize=["Conv", "MatMul", "Gemm", "Add", "Relu", "GlobalAveragePool", "MaxPool"],
            extra_options={"ActivationSymmetric": False, "WeightSymmetric": True},
        )
    log.info("Wrote int8 model %s (calibrated on %d images)", path, len(calibration_pixels))
    return path
