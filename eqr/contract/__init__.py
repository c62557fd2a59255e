"""The bottom floor: the export directory's contract (files, manifest, step I/O, tolerance rule),
the configurations, the one user-facing error type, atomic I/O and TensorRT engine files.
Nothing here imports torch, onnxruntime or an engine at import time (docs/README.md#the-house).
"""
