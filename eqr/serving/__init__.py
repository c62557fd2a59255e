"""Serving eqr on NVIDIA Triton Inference Server (docs/serving.md).

The loop stays next to the engine: a decoupled Python-backend model (`triton_model.py`, copied
into the repository as `model.py`) owns a `Scheduler`, so one request costs one IPC however many
outer steps it takes. `repository` writes the model repository, `server` starts tritonserver,
`client` talks to it.
"""
