"""Causal depthwise conv through the causal-conv1d package (the `cuda` backend).

# GPU path: the kernels run only on a GPU; on CPU the tests run `prepare_causal_conv1d` (layouts,
# strides, dtypes as causal-conv1d's C++ checks them) for every mixer, config and TP size.

causal-conv1d takes x (B, D, L) in one of two layouts (csrc/causal_conv1d.cpp, causal_conv1d_fwd):
    channel-first  x.stride(2) == 1
    channel-last   x.stride(1) == 1, and then D % 8 == 0, x.stride(0) % 8 == 0, x.stride(2) % 8 == 0
Its Python wrapper makes x contiguous only when it is neither. A channel-last *view* of a wider
tensor (Mamba-2's xBC slice of the in_proj output, whose row width 2 d_inner + 2 G N + H is 1289
for mamba2_smollm2_135m_hybrid) passes the wrapper and fails the stride check, so
`kernel_layout` passes a valid layout through and copies anything else to channel-first.
Initial / final conv states need channel-last x; prefill with a state (generation) runs F.conv1d.
"""

from __future__ import annotations

from .. import dispatch
from ..contract import FLOATS, on_cuda, require, shape
from .common import check_conv_args, check_update_args

LIB = "causal-conv1d"


def _channel_last_ok(x) -> bool:
    return x.shape[1] % 8 == 0 and x.stride(0) % 8 == 0 and x.stride(2) % 8 == 0


def kernel_layout(x):
    """x (B, D, L) in a layout causal_conv1d_fwd accepts: unchanged when it already does (no copy),
    else a contiguous (channel-first) copy."""
    if x.stride(2) == 1 or (x.stride(1) == 1 and _channel_last_ok(x)):
        return x
    return x.contiguous()


def check_fwd(x, weight, bias=None, device_checks: bool = True) -> None:
    """causal_conv1d_fwd's TORCH_CHECKs (causal-conv1d 1.4-1.7, csrc/causal_conv1d.cpp), for the
    tensors as the kernel receives them (after causal_conv1d_fn's own contiguous() calls)."""
    require(x.dtype in FLOATS, LIB, f"x dtype must be float32, float16 or bfloat16, got {x.dtype}")
    require(weight.dtype in FLOATS, LIB, f"weight dtype must be float32, float16 or bfloat16, got {weight.dtype}")
    on_cuda(LIB, device_checks, x=x, weight=weight, bias=bias)
    bsz, dim, seqlen = x.shape
    width = weight.shape[-1]
    shape(x, (bsz, dim, seqlen), LIB, "x")
    shape(weight, (dim, width), LIB, "weight")
    require(x.stride(2) == 1 or x.stride(1) == 1, LIB, f"x must be channel-first or channel-last, strides {x.stride()}")
    if x.stride(1) == 1 and x.stride(2) > 1:  # is_channel_last
        require(dim % 8 == 0, LIB, f"causal_conv1d only supports channel dimension divisible by 8 for now (dim {dim})")
        require(x.stride(2) % 8 == 0 and x.stride(0) % 8 == 0, LIB,
                "causal_conv1d with channel last layout requires strides (x.stride(0) and x.stride(2)) to be "
                f"multiples of 8 (strides {x.stride()})")
    require(2 <= width <= 4, LIB, f"causal_conv1d only supports width between 2 and 4 (width {width})")
    if bias is not None:
        require(bias.dtype == weight.dtype, LIB, f"bias dtype {bias.dtype} must equal weight dtype {weight.dtype}")
        require(bias.stride(-1) == 1, LIB, "bias must be contiguous")
        shape(bias, (dim,), LIB, "bias")


def check_bwd(x, dout) -> None:
    """causal_conv1d_bwd's layout checks on the output gradient (after its own transposes)."""
    if x.stride(1) == 1 and x.stride(2) > 1:
        if dout.stride(1) != 1:  # the kernel makes such a dout channel-last itself
            dout = dout.transpose(-1, -2).contiguous().transpose(-1, -2)
        require(dout.stride(2) % 8 == 0 and dout.stride(0) % 8 == 0, LIB,
                "causal_conv1d with channel last layout requires strides (dout.stride(0) and dout.stride(2)) to "
                f"be multiples of 8 (strides {dout.stride()})")


def prepare_causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False,
                          device_checks: bool = True):
    """-> (x, weight, bias) exactly as handed to causal_conv1d_fn, checked as its kernel checks
    them; None when this call runs F.conv1d instead (a conv state)."""
    check_conv_args(x, weight, bias, activation, initial_state)
    if initial_state is not None or return_final_state:
        return None
    x = kernel_layout(x)
    weight = weight.to(x.dtype)
    bias = None if bias is None else bias.to(x.dtype).contiguous()
    check_fwd(x, weight, bias, device_checks)
    return x, weight, bias


def causal_conv1d(x, weight, bias=None, activation=None, initial_state=None, return_final_state=False):
    """Same contract as naive.causal_conv1d, on CUDA tensors."""
    args = prepare_causal_conv1d(x, weight, bias, activation, initial_state, return_final_state)
    if args is None:
        # causal-conv1d's initial/final states need a channel-last x; F.conv1d is fine for prefill
        return dispatch.fallback("causal_conv1d", "torch")(x, weight, bias, activation, initial_state,
                                                           return_final_state)
    from causal_conv1d import causal_conv1d_fn

    return causal_conv1d_fn(*args, activation=activation)


def _version_at_least(major: int, minor: int) -> bool:
    import causal_conv1d

    parts = getattr(causal_conv1d, "__version__", "0.0").split(".")
    try:
        return (int(parts[0]), int(parts[1])) >= (major, minor)
    except (ValueError, IndexError):
        return False


def causal_conv1d_update(x, conv_state, weight, bias=None, activation=None):
    """Same contract as naive.causal_conv1d_update (functional: the state is cloned, not modified)."""
    check_update_args(x, conv_state, weight, bias, activation)
    if not _version_at_least(1, 4):  # before 1.4 the state had width k, not k - 1
        return dispatch.fallback("causal_conv1d_update", "naive")(x, conv_state, weight, bias, activation)
    from causal_conv1d import causal_conv1d_update as ccu

    new_state = conv_state.to(x.dtype).clone()
    y = ccu(x, new_state, weight.to(x.dtype), None if bias is None else bias.to(x.dtype), activation)
    return y, new_state.to(conv_state.dtype)
