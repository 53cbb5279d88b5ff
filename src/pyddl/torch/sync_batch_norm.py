"""SyncBatchNorm: batch statistics over the global batch, on CPU (Gloo) and GPU alike.

torch.nn.SyncBatchNorm refuses CPU tensors, so this one computes the per-channel sum, sum of
squares and count with one pyddl allreduce in forward, and the two gradient sums with one in
backward. The weight and bias gradients stay local sums: the optimizer averages them.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import pyddl

__all__ = ["SyncBatchNorm"]


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum, training):
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        if training:
            local = torch.cat([x.sum(dims), (x * x).sum(dims), x.new_tensor([x.numel() / channels])])
            total = pyddl.allreduce(local.double(), op="sum")
            count = total[-1]
            mean = (total[:channels] / count).to(x.dtype)
            var = (total[channels:2 * channels] / count - (total[:channels] / count) ** 2).clamp_min(0).to(x.dtype)
            if running_mean is not None:
                unbiased = var * (count / max(count - 1, 1)).to(x.dtype)
                running_mean.mul_(1 - momentum).add_(mean, alpha=momentum)
                running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
        else:
            mean, var, count = running_mean, running_var, None
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var + eps)
        xhat = (x - mean.view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count, ctx.training = count, training
        out = xhat
        if weight is not None:
            out = out * weight.view(shape) + bias.view(shape)
        return out

    @staticmethod
    def backward(ctx, grad):
        xhat, invstd, weight = ctx.saved_tensors
        channels = grad.shape[1]
        dims = [d for d in range(grad.dim()) if d != 1]
        shape = [1, channels] + [1] * (grad.dim() - 2)
        sum_dy = grad.sum(dims)
        sum_dy_xhat = (grad * xhat).sum(dims)
        scale = invstd if weight is None else invstd * weight
        if ctx.training:
            total = pyddl.allreduce(torch.cat([sum_dy, sum_dy_xhat]), op="sum")
            g_dy, g_dy_xhat = total[:channels], total[channels:]
            n = ctx.count.to(grad.dtype)
            dx = scale.view(shape) / n * (n * grad - g_dy.view(shape) - xhat * g_dy_xhat.view(shape))
        else:
            dx = grad * scale.view(shape)
        dw = sum_dy_xhat if weight is not None else None
        db = sum_dy if weight is not None else None
        return dx, dw, db, None, None, None, None, None


class SyncBatchNorm(_BatchNorm):
    """Batch normalisation whose statistics cover every rank's batch (Horovod's hvd.SyncBatchNorm).

    Example:
        >>> model = nn.Sequential(nn.Conv2d(3, 8, 3), hvd.SyncBatchNorm(8), nn.ReLU())
    """

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"SyncBatchNorm expects at least 2-D input (N, C, ...), got {input.dim()}-D")

    def forward(self, input):
        self._check_input_dim(input)
        training = self.training or not self.track_running_stats
        if self.training and self.track_running_stats:
            self.num_batches_tracked.add_(1)
        momentum = 0.0 if self.momentum is None else self.momentum
        if self.momentum is None and self.training and self.track_running_stats:
            momentum = 1.0 / float(self.num_batches_tracked)  # cumulative moving average
        if not training or pyddl.size() == 1:
            return torch.nn.functional.batch_norm(
                input, self.running_mean, self.running_var, self.weight, self.bias,
                training, momentum, self.eps)
        return _SyncBN.apply(input, self.weight, self.bias,
                             self.running_mean if self.track_running_stats else None,
                             self.running_var if self.track_running_stats else None,
                             self.eps, momentum, True)
