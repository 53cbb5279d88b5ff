"""SyncBatchNorm: batch statistics over the global batch, on CPU (Gloo) and GPU alike.

torch.nn.SyncBatchNorm refuses CPU tensors, so this one computes the per-channel sum, sum of
squares and count with one pyddl allreduce in forward, and the two gradient sums with one in
backward. The weight and bias gradients stay local sums: the optimizer averages them.
"""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import pyddl
from pyddl.torch.ops import horovod_errors

__all__ = ["SyncBatchNorm"]


class _SyncBN(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, eps, momentum):
        channels = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        # Sums in float64: a sum of squares over a global batch loses digits in float32, and
        # overflows in float16.
        xd = x.double()
        local = torch.cat([xd.sum(dims), (xd * xd).sum(dims), xd.new_tensor([x.numel() / channels])])
        with horovod_errors():
            total = pyddl.allreduce(local, op="sum")
        count = total[-1]
        mean64 = total[:channels] / count
        var64 = (total[channels : 2 * channels] / count - mean64**2).clamp_min(0)
        if running_mean is not None:
            # torch's BatchNorm keeps the unbiased variance of the (here: global) batch.
            unbiased = var64 * (count / (count - 1).clamp_min(1))
            running_mean.mul_(1 - momentum).add_(mean64.to(running_mean.dtype), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
        shape = [1, channels] + [1] * (x.dim() - 2)
        invstd = torch.rsqrt(var64 + eps).to(x.dtype)
        xhat = (x - mean64.to(x.dtype).view(shape)) * invstd.view(shape)
        ctx.save_for_backward(xhat, invstd, weight)
        ctx.count = count
        if weight is None:
            return xhat
        return xhat * weight.view(shape) + bias.view(shape)

    @staticmethod
    def backward(ctx, grad):
        xhat, invstd, weight = ctx.saved_tensors
        channels = grad.shape[1]
        dims = [d for d in range(grad.dim()) if d != 1]
        shape = [1, channels] + [1] * (grad.dim() - 2)
        sum_dy = grad.sum(dims)
        sum_dy_xhat = (grad * xhat).sum(dims)
        # The input gradient needs both sums over the global batch (one allreduce, as in
        # Horovod's SyncBatchNorm); weight and bias keep local sums, which the optimizer averages.
        with horovod_errors():
            total = pyddl.allreduce(torch.cat([sum_dy, sum_dy_xhat]).double(), op="sum")
        g_dy, g_dy_xhat = total[:channels].to(grad.dtype), total[channels:].to(grad.dtype)
        n = ctx.count.to(grad.dtype)
        scale = invstd if weight is None else invstd * weight
        dx = scale.view(shape) / n * (n * grad - g_dy.view(shape) - xhat * g_dy_xhat.view(shape))
        if weight is None:
            return dx, None, None, None, None, None, None
        return dx, sum_dy_xhat, sum_dy, None, None, None, None


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
        running = self.training and self.track_running_stats
        return _SyncBN.apply(input, self.weight, self.bias,
                             self.running_mean if running else None,
                             self.running_var if running else None,
                             self.eps, momentum)
