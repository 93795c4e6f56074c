"""Rows and optimizers: TensorFlow's Gather, Scatter*, ScatterNd*, Apply* and SparseApply* raw ops.

RowCalls is a mixin of both Client (each method is one call: a batch of one operation, so a single call
and a pipelined one share every check) and Pipeline (each method queues the operation). Signatures are
TF's raw ops' (tf.raw_ops.ResourceScatterAdd, ResourceApplyAdam, ...) with variable names for the
resource arguments, TF's defaults for the flags, and `read_value=False`: the updates return the variable's
VariableInfo, or with read_value=True its value after the update. gather returns the rows.

Arguments: numpy arrays are sent as they are (never cast; indices int32 or int64); Python numbers and
lists take the variable's dtype losslessly (indices: int64), as assign's values do.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from tensorps.client import codec
from tensorps.client.errors import InvalidArgumentError
from tensorps.client.queued import QueuedOp
from tensorps.v1 import tensorps_pb2 as pb

Array = np.ndarray[Any, Any]

GATHER = pb.BATCH_OP_GATHER
SCATTER_KINDS = {
    "update": pb.BATCH_OP_SCATTER_UPDATE,
    "add": pb.BATCH_OP_SCATTER_ADD,
    "sub": pb.BATCH_OP_SCATTER_SUB,
    "mul": pb.BATCH_OP_SCATTER_MUL,
    "div": pb.BATCH_OP_SCATTER_DIV,
    "min": pb.BATCH_OP_SCATTER_MIN,
    "max": pb.BATCH_OP_SCATTER_MAX,
}
SCATTER_ND_KINDS = {
    "update": pb.BATCH_OP_SCATTER_ND_UPDATE,
    "add": pb.BATCH_OP_SCATTER_ND_ADD,
    "sub": pb.BATCH_OP_SCATTER_ND_SUB,
}
APPLY_KINDS = frozenset(range(pb.BATCH_OP_APPLY_GRADIENT_DESCENT, pb.BATCH_OP_SPARSE_APPLY_RMS_PROP + 1))
ROW_KINDS = frozenset((GATHER, *SCATTER_KINDS.values(), *SCATTER_ND_KINDS.values(), *APPLY_KINDS))


def returns_value(op: QueuedOp) -> bool:
    """Whether a row operation's result is an array (a gather's rows, or read_value) or a VariableInfo."""
    return op.kind == GATHER or op.read_value


def reply_estimate(op: QueuedOp, sizes: dict[str, int], row_sizes: dict[str, int]) -> int | None:
    """The bytes a row operation's reply carries, if known (None: unknown)."""
    if op.kind == GATHER:
        per = row_sizes.get(op.name)
        return None if per is None else per * op.inputs[0].size
    if not op.read_value:
        return 0
    return sizes.get(op.name)


class RowCalls:
    """The row and optimizer calls of Client and Pipeline: each builds one QueuedOp and hands it to
    `_row_op` (Client: run it; Pipeline: queue it), converting Python values with `_row_value`."""

    def _row_op(self, op: QueuedOp) -> Any:
        raise NotImplementedError

    def _row_value(self, name: str, value: Any) -> Array:
        raise NotImplementedError

    def _row_name(self, name: Any) -> str:
        raise NotImplementedError

    def _row_flag(self, value: Any, what: str) -> bool:
        raise NotImplementedError

    def _indices(self, indices: Any) -> Array:
        try:
            if isinstance(indices, np.ndarray | np.generic):
                array = np.asarray(indices)
                codec.dtype_of(array.dtype)
                return codec.as_wire_array(array)
            return codec.from_python(indices, codec.dtype_of("int64"), name="indices")
        except codec.CodecError as exc:
            raise InvalidArgumentError(str(exc)) from None

    def _queued(
        self,
        kind: int,
        name: Any,
        inputs: tuple[Any, ...],
        *,
        slots: tuple[Any, ...] = (),
        indices: Any = None,
        use_locking: bool,
        read_value: bool,
        **attributes: Any,
    ) -> Any:
        checked = self._row_name(name)
        slot_names = tuple(self._row_name(slot) for slot in slots)
        arrays = tuple(self._row_value(checked, value) for value in inputs)
        if indices is not None:
            arrays = (*arrays, self._indices(indices))
        flags = {k: self._row_flag(v, k) for k, v in attributes.items() if k != "batch_dims"}
        batch_dims = attributes.get("batch_dims", 0)
        if isinstance(batch_dims, bool) or not isinstance(batch_dims, int | np.integer):
            raise InvalidArgumentError(f"batch_dims must be an int, not {type(batch_dims).__name__}")
        return self._row_op(
            QueuedOp(
                kind,
                checked,
                use_locking=self._row_flag(use_locking, "use_locking"),
                read_value=self._row_flag(read_value, "read_value"),
                inputs=arrays,
                slots=slot_names,
                batch_dims=int(batch_dims),
                use_nesterov=flags.get("use_nesterov", False),
                update_slots=flags.get("update_slots", True),
                multiply_linear_by_lr=flags.get("multiply_linear_by_lr", False),
            )
        )

    # ---- rows ----------------------------------------------------------------------------------

    def gather(self, name: str, indices: Any, *, batch_dims: int = 0) -> Any:
        """ResourceGather: the rows `indices` of variable `name`, shape
        `var.shape[:batch_dims] + indices.shape[batch_dims:] + var.shape[batch_dims + 1:]`."""
        return self._queued(
            GATHER, name, (), indices=indices, use_locking=False, read_value=True, batch_dims=batch_dims
        )

    def _scatter(self, kind: int, name: str, indices: Any, updates: Any, flags: tuple[bool, bool]) -> Any:
        checked = self._row_name(name)
        arrays = (self._indices(indices), self._row_value(checked, updates))
        return self._row_op(
            QueuedOp(
                kind,
                checked,
                use_locking=self._row_flag(flags[0], "use_locking"),
                read_value=self._row_flag(flags[1], "read_value"),
                inputs=arrays,
            )
        )

    def scatter_update(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = True, read_value: bool = False
    ) -> Any:
        """ResourceScatterUpdate: var[indices] = updates (a scalar update broadcasts); of duplicates, the last
        one wins (TF: one of them)."""
        return self._scatter(SCATTER_KINDS["update"], name, indices, updates, (use_locking, read_value))

    def scatter_add(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterAdd: var[indices] += updates; duplicates accumulate."""
        return self._scatter(SCATTER_KINDS["add"], name, indices, updates, (use_locking, read_value))

    def scatter_sub(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterSub: var[indices] -= updates; duplicates accumulate."""
        return self._scatter(SCATTER_KINDS["sub"], name, indices, updates, (use_locking, read_value))

    def scatter_mul(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterMul: var[indices] *= updates; duplicates accumulate."""
        return self._scatter(SCATTER_KINDS["mul"], name, indices, updates, (use_locking, read_value))

    def scatter_div(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterDiv: var[indices] /= updates (integers: C++ division, towards zero)."""
        return self._scatter(SCATTER_KINDS["div"], name, indices, updates, (use_locking, read_value))

    def scatter_min(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterMin: var[indices] = min(var[indices], updates)."""
        return self._scatter(SCATTER_KINDS["min"], name, indices, updates, (use_locking, read_value))

    def scatter_max(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterMax: var[indices] = max(var[indices], updates)."""
        return self._scatter(SCATTER_KINDS["max"], name, indices, updates, (use_locking, read_value))

    def scatter_nd_update(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = True, read_value: bool = False
    ) -> Any:
        """ResourceScatterNdUpdate: the slices var[indices[..., :k]] = updates (k = indices.shape[-1])."""
        return self._scatter(SCATTER_ND_KINDS["update"], name, indices, updates, (use_locking, read_value))

    def scatter_nd_add(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterNdAdd: the slices var[indices[..., :k]] += updates."""
        return self._scatter(SCATTER_ND_KINDS["add"], name, indices, updates, (use_locking, read_value))

    def scatter_nd_sub(
        self, name: str, indices: Any, updates: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceScatterNdSub: the slices var[indices[..., :k]] -= updates."""
        return self._scatter(SCATTER_ND_KINDS["sub"], name, indices, updates, (use_locking, read_value))

    # ---- dense optimizers ------------------------------------------------------------------------

    def apply_gradient_descent(
        self, var: str, alpha: Any, delta: Any, *, use_locking: bool = False, read_value: bool = False
    ) -> Any:
        """ResourceApplyGradientDescent: var -= alpha * delta."""
        return self._queued(
            pb.BATCH_OP_APPLY_GRADIENT_DESCENT,
            var,
            (alpha, delta),
            use_locking=use_locking,
            read_value=read_value,
        )

    def apply_momentum(
        self,
        var: str,
        accum: str,
        lr: Any,
        grad: Any,
        momentum: Any,
        *,
        use_locking: bool = False,
        use_nesterov: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceApplyMomentum: accum = accum * momentum + grad; var -= lr * accum (or Nesterov's)."""
        return self._queued(
            pb.BATCH_OP_APPLY_MOMENTUM,
            var,
            (lr, momentum, grad),
            slots=(accum,),
            use_locking=use_locking,
            read_value=read_value,
            use_nesterov=use_nesterov,
        )

    def apply_adagrad(
        self,
        var: str,
        accum: str,
        lr: Any,
        grad: Any,
        *,
        use_locking: bool = False,
        update_slots: bool = True,
        read_value: bool = False,
    ) -> Any:
        """ResourceApplyAdagrad: accum += grad²; var -= lr * grad / sqrt(accum)."""
        return self._queued(
            pb.BATCH_OP_APPLY_ADAGRAD,
            var,
            (lr, grad),
            slots=(accum,),
            use_locking=use_locking,
            read_value=read_value,
            update_slots=update_slots,
        )

    def apply_adam(  # noqa: PLR0917 (TF's raw-op signature)
        self,
        var: str,
        m: str,
        v: str,
        beta1_power: Any,
        beta2_power: Any,
        lr: Any,
        beta1: Any,
        beta2: Any,
        epsilon: Any,
        grad: Any,
        *,
        use_locking: bool = False,
        use_nesterov: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceApplyAdam: m and v updated, var -= lr·sqrt(1-β2^t)/(1-β1^t) · m / (sqrt(v) + ε)."""
        return self._queued(
            pb.BATCH_OP_APPLY_ADAM,
            var,
            (beta1_power, beta2_power, lr, beta1, beta2, epsilon, grad),
            slots=(m, v),
            use_locking=use_locking,
            read_value=read_value,
            use_nesterov=use_nesterov,
        )

    def apply_rms_prop(  # noqa: PLR0917 (TF's raw-op signature)
        self,
        var: str,
        ms: str,
        mom: str,
        lr: Any,
        rho: Any,
        momentum: Any,
        epsilon: Any,
        grad: Any,
        *,
        use_locking: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceApplyRMSProp: ms, mom updated; var -= mom."""
        return self._queued(
            pb.BATCH_OP_APPLY_RMS_PROP,
            var,
            (lr, rho, momentum, epsilon, grad),
            slots=(ms, mom),
            use_locking=use_locking,
            read_value=read_value,
        )

    def apply_ftrl(  # noqa: PLR0917 (TF's raw-op signature)
        self,
        var: str,
        accum: str,
        linear: str,
        grad: Any,
        lr: Any,
        l1: Any,
        l2: Any,
        lr_power: Any,
        *,
        use_locking: bool = False,
        multiply_linear_by_lr: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceApplyFtrl (FTRL-proximal)."""
        return self._queued(
            pb.BATCH_OP_APPLY_FTRL,
            var,
            (lr, l1, l2, lr_power, grad),
            slots=(accum, linear),
            use_locking=use_locking,
            read_value=read_value,
            multiply_linear_by_lr=multiply_linear_by_lr,
        )

    # ---- sparse optimizers -----------------------------------------------------------------------

    def sparse_apply_adagrad(
        self,
        var: str,
        accum: str,
        lr: Any,
        grad: Any,
        indices: Any,
        *,
        use_locking: bool = False,
        update_slots: bool = True,
        read_value: bool = False,
    ) -> Any:
        """ResourceSparseApplyAdagrad: Adagrad on the rows `indices` (grad[i] updates row indices[i])."""
        return self._queued(
            pb.BATCH_OP_SPARSE_APPLY_ADAGRAD,
            var,
            (lr, grad),
            slots=(accum,),
            indices=indices,
            use_locking=use_locking,
            read_value=read_value,
            update_slots=update_slots,
        )

    def sparse_apply_momentum(  # noqa: PLR0917 (TF's raw-op signature)
        self,
        var: str,
        accum: str,
        lr: Any,
        grad: Any,
        indices: Any,
        momentum: Any,
        *,
        use_locking: bool = False,
        use_nesterov: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceSparseApplyMomentum: momentum on the rows `indices`."""
        return self._queued(
            pb.BATCH_OP_SPARSE_APPLY_MOMENTUM,
            var,
            (lr, momentum, grad),
            slots=(accum,),
            indices=indices,
            use_locking=use_locking,
            read_value=read_value,
            use_nesterov=use_nesterov,
        )

    def sparse_apply_ftrl(  # noqa: PLR0917 (TF's raw-op signature)
        self,
        var: str,
        accum: str,
        linear: str,
        grad: Any,
        indices: Any,
        lr: Any,
        l1: Any,
        l2: Any,
        lr_power: Any,
        *,
        use_locking: bool = False,
        multiply_linear_by_lr: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceSparseApplyFtrl: FTRL-proximal on the rows `indices`."""
        return self._queued(
            pb.BATCH_OP_SPARSE_APPLY_FTRL,
            var,
            (lr, l1, l2, lr_power, grad),
            slots=(accum, linear),
            indices=indices,
            use_locking=use_locking,
            read_value=read_value,
            multiply_linear_by_lr=multiply_linear_by_lr,
        )

    def sparse_apply_rms_prop(  # noqa: PLR0917 (TF's raw-op signature)
        self,
        var: str,
        ms: str,
        mom: str,
        lr: Any,
        rho: Any,
        momentum: Any,
        epsilon: Any,
        grad: Any,
        indices: Any,
        *,
        use_locking: bool = False,
        read_value: bool = False,
    ) -> Any:
        """ResourceSparseApplyRMSProp: RMSProp on the rows `indices`."""
        return self._queued(
            pb.BATCH_OP_SPARSE_APPLY_RMS_PROP,
            var,
            (lr, rho, momentum, epsilon, grad),
            slots=(ms, mom),
            indices=indices,
            use_locking=use_locking,
            read_value=read_value,
        )
