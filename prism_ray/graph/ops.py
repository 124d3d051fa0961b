"""Which ATen operations a scored forward may use: pure tensor math, nothing else (docs/rules.md, "The scored
forward").

An operation is allowed when its packet is named below and the chosen overload writes none of its arguments (no
`out=` or in-place variant). Left out on purpose: random numbers (`rand*`, `bernoulli`, `dropout`), uninitialised
memory (`empty*`), raw memory views and unchecked indexing (`as_strided`, `_unsafe_index`), host round trips and
data-dependent shapes (`item`, `nonzero`, `masked_select`, `unique`), custom and opaque operators (anything outside
`aten`). A graph that needs one of them gets `contract:graph_op` and exports again without it.
"""

from __future__ import annotations

import re

import torch

ALLOWED = frozenset("""
abs acos acosh add addbmm addcdiv addcmul addmm addmv alias all amax amin any arange argmax argmin argsort asin
asinh atan atan2 atanh avg_pool1d avg_pool2d adaptive_avg_pool1d baddbmm batch_norm bitwise_and bitwise_left_shift
bitwise_not bitwise_or bitwise_right_shift bitwise_xor bmm bucketize cat ceil celu chunk clamp clamp_max clamp_min
clone constant_pad_nd contiguous conv1d conv2d conv_transpose1d convolution copy copysign cos cosh cummax cummin
cumprod cumsum detach diag diag_embed diagonal div dot einsum elu embedding eq erf erfc erfinv exp exp2 expand
expand_as expm1 fill flatten flip floor floor_divide fmax fmin fmod frac full full_like gather ge gelu glu group_norm
gru gt hardshrink hardsigmoid hardswish hardtanh heaviside hypot index index_add index_copy index_fill index_put
index_select isfinite isinf isnan isneginf isposinf kron layer_norm le leaky_relu lerp lift_fresh_copy linear
linalg_vector_norm log log10 log1p log2 log_sigmoid_forward log_softmax logaddexp logaddexp2 logcumsumexp logical_and
logical_not logical_or logical_xor logit logsumexp lstm lt masked_fill masked_scatter matmul max max_pool1d
max_pool2d maximum mean min minimum mish mm movedim mul mv nan_to_num narrow native_batch_norm native_group_norm
native_layer_norm ne neg new_full new_ones new_zeros norm one_hot ones ones_like outer pad permute pixel_shuffle pow
prelu prod reciprocal reflection_pad1d relu relu6 remainder repeat repeat_interleave replication_pad1d reshape
rms_norm rnn_relu rnn_tanh roll round rsqrt rsub scalar_tensor scaled_dot_product_attention scatter scatter_add
scatter_reduce searchsorted select selu sgn sigmoid sign signbit silu sin sinc sinh slice softmax softplus
softshrink sort split split_with_sizes sqrt square squeeze stack std std_mean sub sum swapaxes t tan tanh tile topk
transpose tril tril_indices triu triu_indices true_divide trunc type_as unbind unflatten unfold unsqueeze var
var_mean view view_as where xlogy zeros zeros_like
_assert_tensor_metadata _fused_rms_norm _log_softmax _native_batch_norm_legit_no_training _prelu_kernel _safe_softmax
_scaled_dot_product_cudnn_attention _scaled_dot_product_efficient_attention _scaled_dot_product_flash_attention
_scaled_dot_product_flash_attention_for_cpu _softmax _to_copy _unsafe_view to
__and__ __or__ __xor__ __lshift__ __rshift__
""".split())

_NAME = re.compile(r"aten\.([A-Za-z0-9_]+)\.([A-Za-z0-9_]+)")


class OpNotAllowed(ValueError):
    """An operation the scorer does not run; the message names it (cleaned: it comes from the exporter)."""


def resolve(qualified: str) -> torch._ops.OpOverload:
    """`aten.<name>.<overload>` → the operator, if the allowlist admits it."""
    match = _NAME.fullmatch(qualified)
    if match is None:
        raise OpNotAllowed(f"`{printable(qualified)}` is not an ATen operation")
    name, overload = match.groups()
    if name not in ALLOWED:
        raise OpNotAllowed(f"aten.{name}")
    packet = getattr(torch.ops.aten, name, None)
    if packet is None or overload not in packet.overloads():
        raise OpNotAllowed(f"aten.{name}.{overload} (unknown to this torch)")
    op = getattr(packet, overload)
    if op._schema.is_mutable:
        raise OpNotAllowed(f"aten.{name}.{overload} (writes its arguments)")
    return op


def printable(text: str, limit: int = 80) -> str:
    """A name from the exporter, safe to show: identifier characters only, bounded."""
    return re.sub(r"[^A-Za-z0-9_.:]", "?", str(text))[:limit]
