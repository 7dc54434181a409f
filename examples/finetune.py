"""Fine-tune a pretrained ConvNeXt with the official ConvNeXt V2 recipe, on any Keras backend.

    python examples/finetune.py --backend torch --model ConvNeXtV2Atto \
        --weights convnextv2_atto_1k_224_ema.pt --data tf_flowers --epochs 10
    python examples/finetune.py --data digits --epochs 3   # offline, from scratch

The recipe (`keras_convnext.training.finetune_optimizer`): AdamW (weight
decay 0.05, none on biases, norms, GRN and layer scale), linear warm-up then
cosine decay, layer-wise learning-rate decay (official "group" levels, 0.9
per level by default), label smoothing 0.1, RandAugment + RandomErasing per
image, MixUp/CutMix per batch, drop path, and an EMA of the weights
(`--ema`, copied into the model at the end of training).
"""

import os
import sys

if __name__ == "__main__":  # the backend must be chosen before keras is imported
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import select_backend

    select_backend(sys.argv[1:])

from common import base_parser, build_classifier, fit_and_save, parse
from evaluate import evaluate_classifier


def main(argv=None):
    """Runs the example; returns a dict with `model`, `optimizer`, `history`, `evaluation`."""
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--weights", help="pretrained checkpoint file or registry tag (a new head is trained).")
    parser.add_argument("--learning-rate", type=float, default=2e-4, help="peak learning rate.")
    parser.add_argument("--min-learning-rate", type=float, default=1e-6)
    parser.add_argument("--warmup-epochs", type=float, default=1.0)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--layer-decay", type=float, default=0.9)
    parser.add_argument("--layer-decay-scheme", choices=("group", "single"), default="group")
    parser.add_argument("--label-smoothing", type=float, default=0.1)
    parser.add_argument("--drop-path-rate", type=float, default=0.1)
    parser.add_argument("--mixup", type=float, default=0.8, help="MixUp alpha (0 disables).")
    parser.add_argument("--cutmix", type=float, default=1.0, help="CutMix alpha (0 disables).")
    parser.add_argument("--no-randaugment", action="store_true")
    parser.add_argument("--random-erasing", type=float, default=0.25, help="RandomErasing probability.")
    parser.add_argument("--ema", action="store_true", help="keep an EMA of the weights (use_ema).")
    parser.add_argument("--ema-momentum", type=float, default=0.9999)
    args = parse(parser, argv)

    import keras

    from keras_convnext import data, training

    keras.utils.set_random_seed(args.seed)
    image_layers = training.augmentation_layers(
        rand_augment=not args.no_randaugment, random_erasing=args.random_erasing, seed=args.seed
    )

    def augment(images):
        for layer in image_layers:
            images = layer(images, training=True)
        return images

    datasets = data.load_dataset(
        args.data, args.image_size, args.batch_size, args.seed, limit=args.limit,
        augment=augment if image_layers else None,
        batch_augment=training.batch_mixing(args.mixup, args.cutmix, seed=args.seed),
    )
    model = build_classifier(args, datasets.num_classes, weights=args.weights, drop_path_rate=args.drop_path_rate)

    steps_per_epoch = args.steps_per_epoch or max(1, (datasets.train_size or args.batch_size) // args.batch_size)
    total_steps = max(1, steps_per_epoch * args.epochs)
    optimizer = training.finetune_optimizer(
        model,
        learning_rate=args.learning_rate,
        total_steps=total_steps,
        warmup_steps=min(total_steps, int(args.warmup_epochs * steps_per_epoch)),
        min_learning_rate=args.min_learning_rate,
        weight_decay=args.weight_decay,
        layer_decay=args.layer_decay,
        layer_decay_scheme=args.layer_decay_scheme,
        use_ema=args.ema,
        ema_momentum=args.ema_momentum,
    )
    model.compile(
        optimizer=optimizer,
        loss=training.classification_loss(args.label_smoothing),
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
    )
    history = fit_and_save(model, datasets, args)
    evaluation = evaluate_classifier(
        model, datasets.validation, datasets.class_names, args.output_dir, history, verbose=not args.quiet
    )
    return {"model": model, "optimizer": optimizer, "history": history, "evaluation": evaluation}


if __name__ == "__main__":
    main()
