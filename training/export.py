"""Export the trained model to ONNX (uint8 pixels in, probabilities and embedding out) and prove it matches torch."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import onnx
import torch

from imgcls.model_files import INPUT_NAME, OUTPUT_EMBEDDING, OUTPUT_PROBS
from imgcls.onnx_run import predict, session_for
from imgcls.preprocess import PreprocessSpec
from training.model import ClassifierNet, ServingGraph

log = logging.getLogger(__name__)

OPSET = 17
#: Images whose two best torch probabilities are closer than this are ties that float rounding may flip
#: (seen with untrained models); they are counted but not held against top-1 agreement.
TIE_MARGIN = 1e-5
MAX_PROB_DIFF = 1e-3


class ExportError(RuntimeError):
    """The exported graph does not reproduce the torch model."""


def export_fp32(model: ClassifierNet, spec: PreprocessSpec, path: Path) -> Path:
    """Write the fp32 serving graph with a dynamic batch axis and check it with ``onnx.checker``."""
    graph = ServingGraph(model, spec.mean, spec.std).eval()
    example = torch.zeros(2, spec.size, spec.size, 3, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
        torch.onnx.export(
            graph,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_PROBS, OUTPUT_EMBEDDING],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_PROBS: {0: "batch"}, OUTPUT_EMBEDDING: {0: "batch"}},
            opset_version=OPSET,
            dynamo=False,  # the TorchScript exporter: seconds instead of a torch.export trace, same graph
        )
    onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    return path


@torch.no_grad()
def check_parity(model: ClassifierNet, spec: PreprocessSpec, path: Path, pixels: np.ndarray) -> dict:
    """Compare ONNX Runtime with torch on ``pixels``; raise :class:`ExportError` unless top-1 agrees everywhere."""
    graph = ServingGraph(model, spec.mean, spec.std).eval()
    ref_probs, ref_emb = [], []
    for start in range(0, len(pixels), 256):
        p, e = graph(torch.from_numpy(pixels[start : start + 256]))
        ref_probs.append(p.numpy())
        ref_emb.append(e.numpy())
    ref_p, ref_e = np.concatenate(ref_probs), np.concatenate(ref_emb)
    onnx_p, onnx_e = predict(session_for(path), pixels)
    top2 = np.sort(ref_p, axis=1)[:, -2:] if ref_p.shape[1] > 1 else np.zeros((len(ref_p), 2))
    ties = (top2[:, 1] - top2[:, 0]) < TIE_MARGIN
    disagree = (ref_p.argmax(1) != onnx_p.argmax(1)) & ~ties
    result = {
        "images": int(len(pixels)),
        "max_abs_diff_probs": float(np.abs(ref_p - onnx_p).max()),
        "max_abs_diff_embedding": float(np.abs(ref_e - onnx_e).max()),
        "top1_agreement": float(1.0 - disagree.mean()),
        "near_ties_excluded": int(ties.sum()),
    }
    log.info("Export parity on %d images: %s", len(pixels), result)
    if disagree.any() or result["max_abs_diff_probs"] > MAX_PROB_DIFF:
        raise ExportError(
            f"{path} disagrees with the torch model: {int(disagree.sum())} top-1 mismatches, max probability "
            f"difference {result['max_abs_diff_probs']:.2e} (limit {MAX_PROB_DIFF}). "
            "Please report this with the run's config.json."
        )
    return result


def export_fp16(fp32_path: Path, path: Path) -> Path:
    """Half-precision weights and activations for GPUs; uint8 input and float32 outputs stay as they are."""
    from onnxconverter_common import float16

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = float16.convert_float_to_float16(onnx.load(str(fp32_path)), keep_io_types=True)
    truncated = sum("truncated" in str(w.message) for w in caught)
    if truncated:
        log.info("fp16: %d weights below the float16 range were clamped to +-1e-7 (harmless)", truncated)
    _fix_casts(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


def _fix_casts(model: onnx.ModelProto) -> None:
    """Make Cast nodes produce the type the converter declared for their output.

    The converter retypes the uint8->float Cast's output to float16 but leaves its ``to`` attribute at
    float, which onnxruntime rejects; the Cast must produce float16 directly.
    """
    declared = {vi.name: vi.type.tensor_type.elem_type for vi in model.graph.value_info}
    for node in model.graph.node:
        if node.op_type != "Cast":
            continue
        want = declared.get(node.output[0])
        for attr in node.attribute:
            if attr.name == "to" and want == onnx.TensorProto.FLOAT16 and attr.i == onnx.TensorProto.FLOAT:
                attr.i = onnx.TensorProto.FLOAT16
