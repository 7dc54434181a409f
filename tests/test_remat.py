"""Gradient checkpointing (`remat=True`): the same loss and gradients, and `fit` runs with it."""

import numpy as np
import pytest

import keras

import keras_convnext
from keras_convnext.layers.block import ConvNeXtBlock
from keras_convnext.models.convnext import remat_per_stage

TINY = dict(stage_depths=(1, 1, 1, 1), stage_dims=(8, 16, 24, 32), version="v2", classes=5)


def tiny_model(remat, **kwargs):
    return keras_convnext.ConvNeXt(
        input_shape=(32, 32, 3), classifier_activation=None, remat=remat, **{**TINY, **kwargs}
    )


def images_and_labels(batch=2):
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (batch, 32, 32, 3)).astype("float32")
    labels = rng.integers(0, TINY["classes"], (batch,))
    return images, labels


def loss_and_gradients(model, images, labels):
    """The cross-entropy of `model` on the batch in training mode, and its gradients per trainable variable."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        def loss_of(trainable, non_trainable):
            logits, _ = model.stateless_call(trainable, non_trainable, images, training=True)
            return loss_fn(labels, logits)

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        loss, gradients = jax.jit(jax.value_and_grad(loss_of))(trainable, non_trainable)
    elif backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = loss_fn(labels, model(images, training=True))
        gradients = tape.gradient(loss, model.trainable_variables)
    else:
        loss = loss_fn(labels, model(images, training=True))
        for variable in model.trainable_variables:
            variable.value.grad = None
        loss.backward()
        gradients = [variable.value.grad for variable in model.trainable_variables]
    return keras.ops.convert_to_numpy(loss), [keras.ops.convert_to_numpy(g) for g in gradients]


def test_remat_gives_the_same_loss_and_gradients():
    plain = tiny_model(remat=False)
    rematerialized = tiny_model(remat=True)
    rematerialized.set_weights(plain.get_weights())
    images, labels = images_and_labels()

    plain_loss, plain_gradients = loss_and_gradients(plain, images, labels)
    remat_loss, remat_gradients = loss_and_gradients(rematerialized, images, labels)

    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5, atol=1e-5)
    assert len(remat_gradients) == len(plain_gradients) == len(plain.trainable_variables)
    for variable, remat_gradient, plain_gradient in zip(plain.trainable_variables, remat_gradients, plain_gradients):
        assert np.abs(plain_gradient).max() > 0, variable.path
        np.testing.assert_allclose(remat_gradient, plain_gradient, rtol=1e-5, atol=1e-5, err_msg=variable.path)


def test_remat_of_some_stages_gives_the_same_loss_and_gradients():
    plain = tiny_model(remat=False, stage_depths=(1, 1, 2, 1))
    rematerialized = tiny_model(remat=(2, 3), stage_depths=(1, 1, 2, 1))
    assert [block.remat for block in _blocks(rematerialized)] == [False, False, True, True, True]
    rematerialized.set_weights(plain.get_weights())
    images, labels = images_and_labels()

    plain_loss, plain_gradients = loss_and_gradients(plain, images, labels)
    remat_loss, remat_gradients = loss_and_gradients(rematerialized, images, labels)

    np.testing.assert_allclose(remat_loss, plain_loss, rtol=1e-5, atol=1e-5)
    for variable, remat_gradient, plain_gradient in zip(plain.trainable_variables, remat_gradients, plain_gradients):
        np.testing.assert_allclose(remat_gradient, plain_gradient, rtol=1e-5, atol=1e-5, err_msg=variable.path)


@pytest.mark.parametrize(
    "remat, stages",
    [
        (True, (True,) * 4),
        ((), (False,) * 4),
        ([0, 3], (True, False, False, True)),
        ((False, True, True, False), (False, True, True, False)),
        ((1,), (False, True, False, False)),
    ],
)
def test_remat_per_stage_reads_indices_or_booleans(remat, stages):
    assert remat_per_stage(remat) == stages


@pytest.mark.parametrize("remat", [(4,), (-1,), (True, False), "all", 2, (1, True)])
def test_remat_that_names_no_stage_is_refused_in_words(remat):
    with pytest.raises(ValueError, match="remat must be True or False .* stage indices from 0 to 3"):
        tiny_model(remat=remat)


def test_remat_is_kept_in_the_config_and_passed_by_the_named_constructors():
    model = keras_convnext.ConvNeXtV2Atto(input_shape=(32, 32, 3), classes=3, remat=True)
    blocks = _blocks(model)
    assert len(blocks) == 12 and all(block.remat for block in blocks)
    rebuilt_blocks = _blocks(type(model).from_config(model.get_config()))
    assert len(rebuilt_blocks) == 12 and all(block.remat for block in rebuilt_blocks)
    assert not any(block.remat for block in _blocks(keras_convnext.ConvNeXtAtto(input_shape=(32, 32, 3))))
    # Atto's stages hold 2, 2, 6 and 2 blocks
    per_stage = keras_convnext.ConvNeXtV2Atto(input_shape=(32, 32, 3), classes=3, remat=(False, False, True, False))
    rebuilt = _blocks(type(per_stage).from_config(per_stage.get_config()))
    assert [block.remat for block in rebuilt] == [False] * 4 + [True] * 6 + [False] * 2


def test_remat_survives_a_keras_file(tmp_path):
    path = str(tmp_path / "model.keras")
    tiny_model(remat=True).save(path)
    blocks = _blocks(keras.saving.load_model(path))
    assert len(blocks) == 4 and all(block.remat for block in blocks)


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, ConvNeXtBlock)]


def _fit_one_step(model):
    images, labels = images_and_labels(batch=4)
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_fit_with_remat_and_stochastic_depth():
    _fit_one_step(tiny_model(remat=True, drop_path_rate=0.1))


@pytest.mark.xfail(
    keras.backend.backend() == "tensorflow",
    reason="Keras' remat of a whole model is tf.recompute_grad, which takes no keyword arguments "
    "(the model's `training`) in a graph: every Keras model built in the scope fails so",
    raises=ValueError,
    strict=True,
)
@pytest.mark.slow
def test_fit_inside_a_keras_remat_scope():
    # Keras' own remat wraps the model's call too, so its `training` flag
    # arrives as a traced value on JAX.
    with keras.RematScope(mode="full"):
        model = tiny_model(remat=False)
    _fit_one_step(model)
    images, _ = images_and_labels()
    assert keras.ops.convert_to_numpy(model(images)).shape == (2, TINY["classes"])


def test_inference_is_the_same_with_remat():
    plain = tiny_model(remat=False)
    model = tiny_model(remat=True)
    model.set_weights(plain.get_weights())
    images, _ = images_and_labels()
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(model(images)), keras.ops.convert_to_numpy(plain(images)), rtol=1e-5, atol=1e-5
    )


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="reads the traced JAX program")
def test_remat_puts_each_block_in_a_jax_checkpoint():
    import jax

    images, _ = images_and_labels()

    def checkpoints(model):
        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]
        program = jax.make_jaxpr(lambda t: model.stateless_call(t, non_trainable, images, training=True)[0])(trainable)
        # jax.checkpoint's primitive, named "remat2" in the JAX versions we use.
        return sum(equation.primitive.name in ("remat2", "checkpoint") for equation in program.jaxpr.eqns)

    assert checkpoints(tiny_model(remat=True)) == sum(TINY["stage_depths"])
    assert checkpoints(tiny_model(remat=False)) == 0
