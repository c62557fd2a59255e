"""The weight-tied block and its files: `network` (f(z, x) and the latent state), `step_graph`
(the one deployable step), `checkpoint` (safe reads of eqr and official files) and `load`
(`load_model`). Imports name the module, e.g. `from eqr.model.network import EqRModel`.
"""
