"""Named pretrained checkpoints (filled in by the pretrained-weights work)."""

REGISTRY = {}


def resolve(model, weights, variant_name):
    """Loads registry tag `weights` into `model`; raises for unknown tags."""
    tags = sorted({tag for (name, tag) in REGISTRY if name == variant_name})
    raise ValueError(
        f"weights={weights!r} is neither an existing file nor a known tag for "
        f"{variant_name or 'this model'}; known tags: {', '.join(tags) or 'none'}."
    )
