"""The deployable step: one outer step with the I/O contract of `model.step.onnx`.

Every backend (torch, ONNX Runtime, TensorRT) runs exactly this computation, so host loops
read only O(B) convergence scalars and O(B*L) predictions per step. The names and dtypes are
`eqr.contract.artifact.INPUTS` and `OUTPUTS`:

inputs   tokens int32 [B, L]; z_H, z_L float32 [B, L, D]; done bool [B]
outputs  z_H_out, z_L_out float32 [B, L, D]; logits float32 [B, L, V]; preds int32 [B, L];
         residual float32 [B]    = ||(z_H, z_L)_out - (z_H, z_L)_in|| / ||(z_H, z_L)_in||
         logit_delta float32 [B] = mean over positions of ||logits(z_H_out) - logits(z_H_in)||_2
         q_halt float32 [B]

`done` freezes rows: where done[b], z_H_out[b], z_L_out[b] are z_H[b], z_L[b] bit for bit (and
residual[b] is 0); the other outputs of such a row are unspecified. Backends with static shapes
(CUDA-graph replay) feed their frozen-slot mask there, so no kernel outside the graph is needed;
every other backend feeds all False (the loop compacts settled rows away instead).

The noisy step graph (`model.step.noisy.onnx`, built when asked) has one more input, last:
noise float32 [B, U, L, D], the path-noise addends sigma * eps of the step's U damped updates
(`EqRModel.step`'s update order), drawn and scaled by the host; the graph without it is noise-free.
"""
from __future__ import annotations

import torch
from torch import nn

from eqr.model.network import EqRModel, LatentState


class StepGraph(nn.Module):
    """Wraps `EqRModel.step` (noise-free, or with the given addends) and adds the convergence
    outputs of the I/O contract."""

    def __init__(self, model: EqRModel) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, z_H: torch.Tensor, z_L: torch.Tensor,
                done: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        out = self.model.step(LatentState(z_H, z_L), tokens, noise=0.0 if noise is None else noise)
        z_H_out, z_L_out = out.state.z_H.float(), out.state.z_L.float()
        if done is not None:  # frozen rows keep their state
            held = done.view(-1, 1, 1)  # [B, 1, 1]
            z_H_out, z_L_out = torch.where(held, z_H, z_H_out), torch.where(held, z_L, z_L_out)
        logits = out.logits.float()  # [B, L, V]
        logits_in = self.model.lm_head(z_H.to(self.model.dtype)).float()  # [B, L, V]
        delta = torch.cat(((z_H_out - z_H).flatten(1), (z_L_out - z_L).flatten(1)), dim=1)  # [B, 2*L*D]
        norm_in = torch.cat((z_H.flatten(1), z_L.flatten(1)), dim=1).norm(dim=1)  # [B]
        residual = delta.norm(dim=1) / norm_in.clamp_min(1e-12)  # [B]
        logit_delta = (logits - logits_in).norm(dim=-1).mean(dim=-1)  # [B]
        preds = logits.argmax(dim=-1).to(torch.int32)  # [B, L]
        return z_H_out, z_L_out, logits, preds, residual, logit_delta, out.q_halt.float()

