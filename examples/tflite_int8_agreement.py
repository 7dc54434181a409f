"""How far int8 TFLite models drift from float32: top-1 agreement on held-out real images.

Trains ConvNeXt V2 Atto briefly on scikit-learn's digits (real scanned
handwriting, upscaled to 32x32 RGB), converts it to TFLite as float32 and in
five int8 recipes, and runs every file on the held-out 20% of the digits:

    dynamic-range        int8 weights, float activations (export's "tflite-int8")
    int8 per-channel     int8 weights and activations, one weight scale per output channel
    int8 per-tensor      the same with one scale per weight tensor
    int8, norms float    per-channel, with LayerNorm and GRN left in float32
    full-integer         export's "tflite-int8-full": every op int8, int8 inputs and outputs

Prints one Markdown table row per file: top-1 agreement with the float32
Keras model, mean |logit difference| relative to the logits' standard
deviation, accuracy, size, and how many of its tensors are int8 and float32. Runs on the TensorFlow backend (TFLite's
converter is TensorFlow's). The defaults give the table in docs/deployment.md.

    KERAS_BACKEND=tensorflow python examples/tflite_int8_agreement.py --epochs 1
"""

import argparse
import os
import tempfile

os.environ["KERAS_BACKEND"] = "tensorflow"

import numpy as np  # noqa: E402

NORM_LAYERS = ("norm", "grn")  # name parts of LayerNorm and GRN ops in the converted graph


def train(epochs, seed):
    import keras

    import keras_convnext
    from keras_convnext.data import digits_arrays

    keras.utils.set_random_seed(seed)
    x_train, y_train, x_val, y_val = digits_arrays(32, seed=seed)
    model = keras_convnext.ConvNeXtV2Atto(input_shape=(32, 32, 3), weights=None, classes=10, classifier_activation=None)
    model.compile(keras.optimizers.AdamW(2e-3, weight_decay=0.05),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train.astype("float32"), y_train, batch_size=64, epochs=epochs, verbose=2)
    return model, x_train.astype("float32"), x_val.astype("float32"), y_val


def converters(archive, calibration):
    """`{recipe: configured TFLiteConverter}` over one SavedModel."""
    import tensorflow as tf

    def representative():
        for image in calibration:
            yield [image[None]]

    def make(quantize_activations=False, per_tensor=False):
        converter = tf.lite.TFLiteConverter.from_saved_model(archive)
        converter.optimizations = [tf.lite.Optimize.DEFAULT]
        if quantize_activations:
            converter.representative_dataset = representative
            # float32 stays allowed for any op without an int8 kernel.
            converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        if per_tensor:
            converter._experimental_disable_per_channel = True  # the converter's only switch for it
        return converter

    from keras_convnext.export import tflite_converter

    float32 = tf.lite.TFLiteConverter.from_saved_model(archive)
    return {
        "float32": float32,
        "dynamic-range": make(),
        "int8 per-channel": make(quantize_activations=True),
        "int8 per-tensor": make(quantize_activations=True, per_tensor=True),
        "full-integer": tflite_converter(archive, "tflite-int8-full", calibration),
    }


def norms_in_float(archive, calibration, float_content):
    """Per-channel int8 with every LayerNorm/GRN op left in float32 (TFLite's quantization debugger).

    The ops are named by their output tensors in the float32 file.
    """
    import tensorflow as tf

    def dataset():
        for image in calibration:
            yield [image[None]]

    names = [detail["name"] for detail in tf.lite.Interpreter(model_content=float_content).get_tensor_details()]
    denylisted = [name for name in names if any(part in name.lower() for part in NORM_LAYERS)]
    options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=denylisted)
    debugger = tf.lite.experimental.QuantizationDebugger(
        converter=converters(archive, calibration)["int8 per-channel"], debug_dataset=dataset,
        debug_options=options)
    return debugger.get_nondebug_quantized_model(), len(denylisted)


def tensor_types(content):
    """`int8 tensors / float32 tensors` of a TFLite file (weights and activations)."""
    from ai_edge_litert.interpreter import Interpreter

    dtypes = [detail["dtype"] for detail in Interpreter(model_content=content).get_tensor_details()]
    return f"{sum(d == np.int8 for d in dtypes)} / {sum(d == np.float32 for d in dtypes)}"


def run_tflite(content, images):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_content=content)
    interpreter.allocate_tensors()
    source, result = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
    outputs = []
    for image in images:
        if source["dtype"] == np.int8:  # full-integer: quantize the pixels as the file says
            scale, zero_point = source["quantization"]
            image = np.clip(np.round(image / scale + zero_point), -128, 127)
        interpreter.set_tensor(source["index"], image[None].astype(source["dtype"]))
        interpreter.invoke()
        output = np.array(interpreter.get_tensor(result["index"]))[0]
        if result["dtype"] == np.int8:
            scale, zero_point = result["quantization"]
            output = (output.astype("float32") - zero_point) * scale
        outputs.append(output)
    return np.stack(outputs)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--calibration-images", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    from keras_convnext.export import _write_keras_archive

    model, x_train, x_val, y_val = train(args.epochs, args.seed)
    float_logits = model.predict(x_val, verbose=0)
    reference = np.argmax(float_logits, -1)
    calibration = x_train[: args.calibration_images]
    print(f"float32 Keras model: accuracy {np.mean(reference == y_val):.4f} on {len(y_val)} held-out digits")
    print("| recipe | top-1 agreement with float32 | mean logit error / logit std | accuracy | size (MiB) "
          "| int8 / float32 tensors |")
    print("|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as scratch:
        archive = os.path.join(scratch, "saved_model")
        _write_keras_archive(model, archive)
        contents = {recipe: converter.convert() for recipe, converter in converters(archive, calibration).items()}
        try:
            contents["int8, norms float"], kept = norms_in_float(archive, calibration, contents["float32"])
            print(f"(norms float: {kept} LayerNorm/GRN tensors left in float32)")
        except Exception as error:  # an older converter without the debugger's selective quantization
            print(f"(int8 with float norms not available: {error})")
        for recipe, content in contents.items():
            logits = run_tflite(content, x_val)
            top1 = np.argmax(logits, -1)
            drift = np.mean(np.abs(logits - float_logits)) / np.std(float_logits)
            print(f"| {recipe} | {np.mean(top1 == reference):.4f} | {drift:.4f} | {np.mean(top1 == y_val):.4f} "
                  f"| {len(content) / 2**20:.2f} | {tensor_types(content)} |")


if __name__ == "__main__":
    main()
