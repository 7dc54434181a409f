"""Keras' LayerNorm as one ONNX `LayerNormalization` node (opset 17), for `keras_convnext.export`.

TensorFlow has no LayerNorm op: `keras.ops.layer_normalization` traces as

    mean = Mean(x, [-1]);  variance = Mean(SquaredDifference(x, StopGradient(mean)), [-1])
    inv = Rsqrt(variance + epsilon) * gamma
    y = x * inv + (Neg(mean) * inv + beta)

and tf2onnx turns that into about a dozen small ONNX ops that runtimes do not fuse
back (its own rewriter only knows rank-3 inputs and emits
InstanceNormalization). `rewrite_layer_norm` is a tf2onnx graph rewriter that
finds the pattern among the TensorFlow ops, before conversion, and puts one
`LayerNormalization(x, gamma, beta, axis=-1, epsilon)` in its place.
TensorFlow's graph optimizer may already have dropped a `* gamma` of ones or
a `+ beta` of zeros; both forms are matched. Anything that does not match
exactly is left as it was, so the rewrite can only change how a LayerNorm is
written, never what the graph computes.
"""

import numpy as np

LAYER_NORM_OPSET = 17


def _producer(g, tensor):
    return g.get_node_by_output(tensor)


def _skip_identity(g, tensor):
    """The tensor behind StopGradient/Identity wrappers."""
    node = _producer(g, tensor)
    while node is not None and node.type in ("StopGradient", "Identity"):
        tensor = node.input[0]
        node = _producer(g, tensor)
    return tensor


def _const_value(g, tensor):
    node = _producer(g, tensor)
    if node is None or not node.is_const():
        return None
    return np.asarray(node.get_tensor_value(as_list=False))


def _mean_over_last_axis(g, tensor, rank):
    """The input of `Mean(input, [-1], keep_dims=True)` producing `tensor`, else None."""
    node = _producer(g, tensor)
    if node is None or node.type != "Mean" or not node.get_attr_value("keep_dims", False):
        return None
    axes = _const_value(g, node.input[1])
    if axes is None or rank is None or [int(a) % rank for a in np.ravel(axes)] != [rank - 1]:
        return None
    return node.input[0]


def _split_mul(g, tensor, wanted_type):
    """For `tensor = Mul(a, b)` with `b` made by a `wanted_type` node: (b, a), else (None, None)."""
    node = _producer(g, tensor)
    if node is None or node.type != "Mul":
        return None, None
    for own, other in ((0, 1), (1, 0)):
        source = _producer(g, node.input[own])
        if source is not None and source.type == wanted_type:
            return node.input[own], node.input[other]
    return None, None


def _rsqrt_and_gamma(g, inv):
    """`inv` as (Rsqrt output, gamma tensor or None)."""
    node = _producer(g, inv)
    if node is not None and node.type == "Rsqrt":
        return inv, None
    return _split_mul(g, inv, "Rsqrt")


def _match(g, node):
    """The LayerNorm that ends in `node` (an AddV2) as (x, gamma, beta, epsilon), else None."""
    if node.type not in ("AddV2", "Add"):
        return None
    for scaled_index in (0, 1):
        scaled, shift = node.input[scaled_index], node.input[1 - scaled_index]
        found = _match_parts(g, scaled, shift)
        if found is not None:
            return found
    return None


def _match_parts(g, scaled, shift):
    """`scaled = x * inv` and `shift = Neg(mean) * inv [+ beta]`."""
    beta = None
    shift_node = _producer(g, shift)
    if shift_node is None:
        return None
    if shift_node.type in ("AddV2", "Add"):
        for index in (0, 1):
            neg_mul = _producer(g, shift_node.input[index])
            if neg_mul is not None and neg_mul.type == "Mul":
                shift, beta = shift_node.input[index], shift_node.input[1 - index]
                break
        else:
            return None
    neg, inv = _split_mul(g, shift, "Neg")
    if neg is None:
        return None
    scaled_node = _producer(g, scaled)
    if scaled_node is None or scaled_node.type != "Mul" or inv not in scaled_node.input:
        return None
    x = scaled_node.input[1] if scaled_node.input[0] == inv else scaled_node.input[0]
    rank = g.get_rank(x)
    mean = _producer(g, neg).input[0]
    if _mean_over_last_axis(g, mean, rank) != x:
        return None
    rsqrt, gamma = _rsqrt_and_gamma(g, inv)
    if rsqrt is None:
        return None
    add = _producer(g, _producer(g, rsqrt).input[0])
    if add is None or add.type not in ("AddV2", "Add"):
        return None
    variance, epsilon = add.input
    if _const_value(g, epsilon) is None:
        variance, epsilon = epsilon, variance
    epsilon_value = _const_value(g, epsilon)
    if epsilon_value is None or epsilon_value.size != 1:
        return None
    squared = _producer(g, _mean_over_last_axis(g, variance, rank) or "")
    if squared is None or squared.type != "SquaredDifference":
        return None
    if squared.input[0] != x or _skip_identity(g, squared.input[1]) != mean:
        return None
    return x, gamma, beta, float(epsilon_value.ravel()[0])


def _as_vector(g, tensor, channels, fill, name):
    """`tensor` reshaped to `(channels,)`, or a constant `fill` vector where it is None."""
    from tf2onnx import utils

    if tensor is None:
        return g.make_const(utils.make_name(name), np.full((channels,), fill, np.float32)).output[0]
    shape = g.make_const(utils.make_name(name + "_shape"), np.array([channels], np.int64)).output[0]
    return g.make_node("Reshape", [tensor, shape], name=utils.make_name(name)).output[0]


def rewrite_layer_norm(g, ops):
    """tf2onnx rewriter: every float32 last-axis LayerNorm pattern becomes one LayerNormalization."""
    if g.opset < LAYER_NORM_OPSET:
        return ops
    from onnx import TensorProto
    from tf2onnx import utils

    for node in list(ops):
        found = _match(g, node)
        if found is None or node.output[0] in g.outputs:
            continue
        x, gamma, beta, epsilon = found
        shape = g.get_shape(x)
        channels = shape[-1] if shape else -1
        if g.get_dtype(x) != TensorProto.FLOAT or channels is None or channels < 1:
            continue
        scope = node.name.rsplit("/", 1)[0]
        scale = _as_vector(g, gamma, channels, 1.0, f"{scope}/layer_norm_scale")
        inputs = [x, scale]
        if beta is not None:
            inputs.append(_as_vector(g, beta, channels, 0.0, f"{scope}/layer_norm_bias"))
        normalized = g.make_node(
            "LayerNormalization", inputs, attr={"axis": -1, "epsilon": epsilon},
            name=utils.make_name(f"{scope}/LayerNormalization"), shapes=[shape], dtypes=[TensorProto.FLOAT],
        )
        g.replace_all_inputs(node.output[0], normalized.output[0])
    return g.get_nodes()
