"""Image classification service: decode and preprocess, batched ONNX inference, metrics, inference log."""
