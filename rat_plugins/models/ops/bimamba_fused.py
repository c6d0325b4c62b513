"""Fused paths of ViM's bidirectional Mamba mixer (:class:`rat_plugins.models.vim.BiMambaV2`).

:class:`FusedBiMambaCPU` (inference on a CPU) and :class:`FusedBiMambaTriton` (CUDA with the
``triton`` scan backend, inference and training).

Without autograd, in float32 with ``d_state`` 16 and the C++ scan kernel available, the mixer runs
in the token-major layout of its linear layers: one kernel for both directions' conv + silu, one
batched matmul for ``x_proj``, one kernel for both directions' ``dt_proj`` + gated scan, the
backward direction scanned from the end in place (no flip, cat or transpose). The kernels live in
``csrc/selective_scan.cpp``; the same numbers as the unfused mixer, to float32 rounding.
"""

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .selective_scan import backend_for, load_cpp_extension

__all__ = ["FusedBiMambaCPU", "FusedBiMambaTriton"]


class FusedBiMambaCPU:
    """The fused path of one mixer, with the stacked parameters its kernels read cached.

    The cache key is each parameter's storage and version counter, which in-place updates
    (optimizer steps, ``load_state_dict``) and ``.to()`` change. A plain object, not a module: the
    mixer's state dict and parameters are unchanged.
    """

    def __init__(self):
        self.cache: Optional[Tuple[tuple, Tuple[torch.Tensor, ...]]] = None

    @staticmethod
    def applies(mixer: nn.Module, hidden_states: torch.Tensor) -> bool:
        """Whether this call of ``mixer`` can run fused (builds the C++ kernel on first use)."""
        if not mixer.use_fast_path or hidden_states.device.type != "cpu":
            return False
        if mixer.d_state != 16 or mixer.d_inner % 16:
            return False
        grad = torch.is_grad_enabled()
        if hidden_states.dtype != torch.float32 or (grad and hidden_states.requires_grad):
            return False
        if any(p.dtype != torch.float32 or (grad and p.requires_grad) for p in mixer.parameters()):
            return False
        return backend_for(hidden_states) == "cpp"

    def params(self, mixer: nn.Module) -> Tuple[torch.Tensor, ...]:
        """Both directions' parameters, stacked in the layouts the kernels read."""
        m = mixer
        pairs = (
            (m.conv1d.weight, m.conv1d_b.weight),
            (m.conv1d.bias, m.conv1d_b.bias),
            (m.x_proj.weight, m.x_proj_b.weight),
            (m.dt_proj.weight, m.dt_proj_b.weight),
            (m.dt_proj.bias, m.dt_proj_b.bias),
            (m.A_log, m.A_b_log),
            (m.D, m.D_b),
        )
        key = tuple((p.data_ptr(), p._version) for pair in pairs for p in pair if p is not None)
        if self.cache is None or self.cache[0] != key:
            conv_w, conv_b, x_w, dt_w, dt_b, a_log, d = pairs
            with torch.no_grad():
                tensors = (
                    torch.stack(conv_w)[:, :, 0, :].transpose(1, 2).contiguous(),  # [2, d_conv, d_inner]
                    torch.stack(conv_b).contiguous() if conv_b[0] is not None else conv_w[0].new_zeros(2, m.d_inner),
                    torch.stack(x_w).transpose(1, 2).contiguous(),  # [2, d_inner, dt_rank + 2 state]
                    torch.stack(dt_w).transpose(1, 2).contiguous(),  # [2, dt_rank, d_inner]
                    -torch.exp(torch.stack(a_log)).transpose(1, 2).contiguous(),  # A: [2, state, d_inner]
                    torch.stack(d).contiguous(),
                    torch.stack(dt_b).contiguous(),
                )
            self.cache = (key, tensors)
        return self.cache[1]

    def __call__(self, mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``mixer(hidden_states)`` fused; call only where :meth:`applies` is True."""
        # the kernels read float32: a frozen ViM under bfloat16 autocast runs its fused path in float32
        with torch.autocast("cpu", enabled=False):
            return self._fused(mixer, hidden_states)

    def _fused(self, mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        ext = load_cpp_extension()
        b, L, _ = hidden_states.shape
        conv_w, conv_b, x_w, dt_w, A, D, dt_b = self.params(mixer)
        xz = mixer.in_proj(hidden_states).contiguous()  # [b, L, 2 d_inner]: x | z
        u = xz.new_empty(2, b, L, mixer.d_inner)
        ext.bimamba_conv_silu(xz, conv_w, conv_b, u)
        dbl = torch.bmm(u.view(2, b * L, mixer.d_inner), x_w)  # [2, b L, dt_rank + 2 state]
        y = xz.new_empty(b, L, mixer.d_inner)
        ext.bimamba_scan(xz, u, dbl, dt_w, A, D, dt_b, y, 0.5 if mixer.if_divide_out else 1.0)
        out = mixer.out_proj(y)
        if mixer.init_layer_scale is not None:
            out = out * mixer.gamma
        return out


class FusedBiMambaTriton:
    """The mixer on CUDA with the Triton scan: both directions' scans in one kernel launch each way.

    The backward direction is computed in the original token order: its causal conv over the
    reversed sequence is an anti-causal conv with the taps reversed, and its scan runs from the
    last token (:func:`rat_plugins.models.ops.triton_scan.bimamba_scan_triton`), which also sums
    the two gated outputs and scales them. No token flip, no concatenated copy of activations; x
    and z stay strided views of ``in_proj``'s output. Differentiable (a trained backbone), the same
    numbers as the unfused mixer up to rounding. Stateless, like the CPU path's interface.
    """

    @staticmethod
    def applies(mixer: nn.Module, hidden_states: torch.Tensor) -> bool:
        """Whether this call of ``mixer`` runs fused: CUDA, ``use_fast_path``, scan backend ``triton``."""
        if not mixer.use_fast_path or hidden_states.device.type != "cuda":
            return False
        return backend_for(hidden_states) == "triton"

    def __call__(self, mixer: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """``mixer(hidden_states)`` fused (any device the Triton kernels run on)."""
        from .triton_scan import bimamba_scan_triton

        m = mixer
        L = hidden_states.shape[1]
        K = m.d_conv
        xz = m.in_proj(hidden_states)  # [b, L, 2 d_inner]
        x, z = xz.transpose(1, 2).chunk(2, dim=1)  # [b, d_inner, L] views
        conv = F.conv1d(x, m.conv1d.weight, m.conv1d.bias, padding=K - 1, groups=m.d_inner)[..., :L]
        conv_b = F.conv1d(x, m.conv1d_b.weight.flip(-1), m.conv1d_b.bias, padding=K - 1, groups=m.d_inner)
        u_f, u_b = F.silu(conv), F.silu(conv_b[..., K - 1 :])
        sizes = [m.dt_rank, m.d_state, m.d_state]
        dt_f, B_f, C_f = m.x_proj(u_f.transpose(1, 2)).split(sizes, dim=-1)
        dt_b, B_b, C_b = m.x_proj_b(u_b.transpose(1, 2)).split(sizes, dim=-1)
        # W @ dt^T: [b, d_inner, L] with time contiguous, the layout the kernels read fastest
        delta_f = torch.matmul(m.dt_proj.weight, dt_f.transpose(1, 2))
        delta_b = torch.matmul(m.dt_proj_b.weight, dt_b.transpose(1, 2))
        A = -torch.exp(torch.stack([m.A_log, m.A_b_log]).float())
        y = bimamba_scan_triton(
            (u_f, u_b),
            (delta_f, delta_b),
            A,
            (B_f.transpose(1, 2), B_b.transpose(1, 2)),
            (C_f.transpose(1, 2), C_b.transpose(1, 2)),
            torch.stack([m.D, m.D_b]).float(),
            torch.stack([m.dt_proj.bias, m.dt_proj_b.bias]).float(),
            z,
            scale=0.5 if m.if_divide_out else 1.0,
        )
        out = m.out_proj(y.transpose(1, 2))
        if m.init_layer_scale is not None:
            out = out * m.gamma
        return out
