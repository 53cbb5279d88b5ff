"""DistributedOptimizer: Horovod's optimizer wrapper, by composition.

It subclasses torch.optim.Optimizer only so that LR schedulers and `isinstance` checks accept
it; all state lives in the wrapped optimizer, to which every attribute is delegated (torchft's
OptimizerWrapper does the same). Gradients are reduced by a GradientReducer while backward
runs; `step()` waits only for the buckets still in flight.
"""

from __future__ import annotations

import contextlib
import warnings

import torch

import pyddl
from pyddl.torch.reducer import DEFAULT_BUCKET_BYTES, GradientReducer, ReducerOptions

__all__ = ["DistributedOptimizer", "PartialDistributedOptimizer"]


def _core_op(op) -> str:
    from pyddl.torch.ops import reduce_op_name

    return reduce_op_name(op)


class _LocalGradients:
    """The reducer of a rank outside the optimizer's process set: nothing to reduce."""

    def synchronize(self) -> None:
        pass

    def pending(self) -> bool:
        return False


class DistributedOptimizer(torch.optim.Optimizer):
    """Wrap `optimizer` so `step()` applies gradients averaged (or summed) over all ranks.

    Args:
        optimizer: any torch optimizer.
        named_parameters: (name, parameter) pairs, e.g. `model.named_parameters()`; default:
            the optimizer's parameters, named by position.
        compression: `Compression.none` / `.fp16` / `.bf16` (or a Horovod-style Compressor).
        backward_passes_per_step: backward passes accumulated locally before one allreduce.
        op: `Average` (default), `Sum`, `Min`, `Max`, `Product`.
        gradient_predivide_factor: divide by this before the sum and by size/factor after
            (Average only), to control overflow as in Horovod.
        algorithm: "native", "multiring" or "auto" (default: the job's setting).
        sparse_as_dense: True densifies sparse gradients (`nn.Embedding(sparse=True)`) and
            reduces them with the rest. False (Horovod's default): from the second step each
            is allgathered (its rows and values) and summed; the first step, before they are
            known, sums them dense, except a SparseAdam's, known sparse from the start. Either
            way they come back sparse, as SparseAdam needs.
        num_groups, groups: Horovod's grouping of gradients into fused allreduces; accepted
            and unused, as `bucket_bytes` decides the fusion.
        bucket_bytes: the size of one gradient bucket (default 2 MiB; see reducer.py).
        process_set: the ranks that average their gradients (hvd.add_process_set); default:
            every rank. On a rank outside it, step() applies the local gradients, as in Horovod.

    Example:
        >>> opt = hvd.DistributedOptimizer(torch.optim.SGD(model.parameters(), lr=0.1 * hvd.size()),
        ...                                named_parameters=model.named_parameters())
        >>> loss.backward(); opt.step()
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters=None,
        compression=None,
        backward_passes_per_step: int = 1,
        op=None,
        gradient_predivide_factor: float = 1.0,
        num_groups: int = 0,
        groups=None,
        sparse_as_dense: bool = False,
        process_set=None,
        algorithm: str | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
    ):
        # Deliberately no super().__init__(): the wrapped optimizer owns param_groups/state.
        self._optimizer = optimizer
        if backward_passes_per_step < 1:
            raise ValueError(f"backward_passes_per_step must be >= 1, got {backward_passes_per_step}")
        if gradient_predivide_factor <= 0:
            raise ValueError(f"gradient_predivide_factor must be positive, got {gradient_predivide_factor}")
        op_name = "average" if op is None else _core_op(op)
        if gradient_predivide_factor != 1.0 and op_name != "average":
            raise ValueError("gradient_predivide_factor applies to op=Average only")
        from pyddl.torch.ops import _comm_of

        named = self._named(optimizer, named_parameters)  # its errors come first, even before init
        comm = _comm_of(process_set)
        self._parameter_names = {p: n for n, p in named}  # Horovod's attribute: parameter -> name
        prescale, postscale = 1.0, 1.0
        if op_name == "average" and gradient_predivide_factor != 1.0:
            prescale, postscale = 1.0 / gradient_predivide_factor, gradient_predivide_factor / comm.size
        codec = getattr(compression, "codec", None) if compression is not None else None
        compressor = compression if compression is not None and codec is None else None
        # As in Horovod, a rank outside the process set keeps its gradients local.
        self._reducer = _LocalGradients() if not comm.is_member else GradientReducer(
            named,
            ReducerOptions(
                op=op_name,
                codec=codec,
                compressor=compressor,
                algorithm=algorithm,
                bucket_bytes=bucket_bytes,
                backward_passes_per_step=backward_passes_per_step,
                prescale=prescale,
                postscale=postscale,
                sparse_as_dense=sparse_as_dense,
                sparse_from_start=self._sparse_from_start(optimizer, named),
            ),
            comm,
        )
        self._synchronized = False
        self._should_synchronize = True

    @staticmethod
    def _sparse_from_start(optimizer, named) -> tuple[tuple[str, int], ...]:
        # SparseAdam takes sparse gradients only (an embedding's: rows, sparse_dim 1), so its
        # parameters' gradients are reduced sparse from the first step, not summed dense in it.
        if not isinstance(optimizer, torch.optim.SparseAdam):
            return ()
        return tuple((name, 1) for name, p in named if p.requires_grad)

    @staticmethod
    def _named(optimizer, named_parameters) -> list:
        opt_params = [p for g in optimizer.param_groups for p in g["params"]]
        if named_parameters is None:  # Horovod's names: group i, position j
            return [(f"allreduce.noname.{i}.{j}", p)
                    for i, g in enumerate(optimizer.param_groups) for j, p in enumerate(g["params"])]
        named = list(named_parameters)
        if any(not isinstance(x, tuple) or len(x) != 2 for x in named):
            raise TypeError("named_parameters must be (name, parameter) pairs, e.g. model.named_parameters()")
        names = [n for n, _ in named]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"named_parameters has duplicate names: {', '.join(dupes)}")
        known = {id(p) for _, p in named}
        missing = [i for i, p in enumerate(opt_params) if id(p) not in known]
        if missing:
            raise ValueError(
                f"named_parameters does not cover all of the optimizer's parameters (missing "
                f"{len(missing)}, e.g. position {missing[0]}); pass model.named_parameters() of the "
                "model whose parameters the optimizer holds"
            )
        wanted = {id(p) for p in opt_params}
        return [(n, p) for n, p in named if id(p) in wanted]

    # Delegation ---------------------------------------------------------------------------

    @property
    def param_groups(self):
        return self._optimizer.param_groups

    @param_groups.setter
    def param_groups(self, value):
        self._optimizer.param_groups = value

    @property
    def state(self):
        return self._optimizer.state

    @property
    def defaults(self):
        return self._optimizer.defaults

    def __getattr__(self, name):
        # Only reached for attributes not found normally: hand them to the wrapped optimizer.
        if name == "_optimizer":
            raise AttributeError(name)
        return getattr(self._optimizer, name)

    def __repr__(self) -> str:
        return f"DistributedOptimizer({self._optimizer!r})"

    def state_dict(self):
        return self._optimizer.state_dict()

    def load_state_dict(self, state_dict):
        return self._optimizer.load_state_dict(state_dict)

    def add_param_group(self, param_group):
        raise NotImplementedError(
            "pyddl: add a parameter group to the optimizer before wrapping it in DistributedOptimizer"
        )

    # Horovod's protocol -------------------------------------------------------------------

    def synchronize(self) -> None:
        """Wait until every gradient is reduced (e.g. before clipping); step() then skips it
        inside `skip_synchronize()`."""
        self._wait_reduced()
        self._synchronized = True

    def _wait_reduced(self) -> None:
        # A failed bucket is Horovod's HorovodInternalError, which hvd.elastic.run acts on.
        from pyddl.torch.ops import horovod_errors

        with horovod_errors():
            self._reducer.synchronize()

    @contextlib.contextmanager
    def skip_synchronize(self):
        """Within this block step() applies the gradients as they are (after synchronize())."""
        self._should_synchronize = False
        try:
            yield
        finally:
            self._should_synchronize = True

    def step(self, closure=None):
        """Wait for the gradients still in flight, then step the wrapped optimizer."""
        if self._should_synchronize:
            if self._synchronized:
                warnings.warn(
                    "optimizer.step() called without optimizer.skip_synchronize() after "
                    "optimizer.synchronize(); the gradients were already reduced, so nothing more "
                    "is done — use `with optimizer.skip_synchronize(): optimizer.step()`",
                    stacklevel=2,
                )
            else:
                # Also when no gradient arrived here (a loss that used no parameter on this
                # rank): the other ranks' bucket collectives need this rank's zeros.
                self._wait_reduced()
        self._synchronized = False
        timeline = pyddl.world().timeline
        start = timeline.now_us() if timeline.enabled else 0.0
        result = self._optimizer.step(closure) if closure is not None else self._optimizer.step()
        if timeline.enabled:
            timeline.span("optimizer step", start, timeline.now_us(), "compute")
        return result

    def zero_grad(self, set_to_none: bool = True):
        if self._reducer.pending():
            raise RuntimeError(
                "pyddl: optimizer.zero_grad() was called after loss.backward() but before "
                "optimizer.step() or optimizer.synchronize(); the gradients are still being reduced. "
                "Call zero_grad() before backward() or after step()."
            )
        return self._optimizer.zero_grad(set_to_none=set_to_none)


def PartialDistributedOptimizer(*args, **kwargs):  # noqa: N802 (Horovod's name)
    """Horovod's Keras wrapper that leaves some layers' gradients local; not in pyddl.torch."""
    raise NotImplementedError(
        "pyddl.torch has no PartialDistributedOptimizer (Horovod has it for Keras only): wrap an "
        "optimizer over the shared parameters in hvd.DistributedOptimizer, and step a plain torch "
        "optimizer over the local layers' parameters"
    )
