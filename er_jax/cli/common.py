"""What several verbs share: the model arguments (--model / --preset / --layers / --dtype / --drafter), loading the
model they name (io.registry.load_model, the one way to get a model) and its costs."""
from __future__ import annotations

import argparse

from er_jax.config import DRAFTER_HEADS, SCHEMES
from er_jax.config import platform as platform_name


def default_dtype() -> str:
    return "float32" if platform_name() == "cpu" else "bfloat16"


def model_args(p: argparse.ArgumentParser, required: bool = True, default_model: str | None = None) -> None:
    from er_jax.io.registry import presets

    title = "model" + ("" if required else " (default: the one the calibration names)" if default_model is None
                       else f" (default: --model {default_model})")
    g = p.add_argument_group(title)
    g.add_argument("--model", help='a named model ("smollm2"), a .gguf file or a Hugging Face directory')
    g.add_argument("--preset", help=f"a shape preset with random weights: {', '.join(sorted(presets()))}")
    g.add_argument("--layers", type=int, help="keep only the first N layers (shrinks a model for CPU)")
    g.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: float32 on CPU, else bfloat16")
    g.add_argument("--drafter", default="int4", choices=SCHEMES)
    g.add_argument("--drafter-head", default=None, choices=DRAFTER_HEADS,
                   help="the drafter's LM head: the target's own (shared) or an int8 copy (default: SpecRollout's)")
    p.set_defaults(default_model=default_model)


def load(args, weights: bool = True, seed: int | None = None):
    """The io.registry.Model the model arguments name (--model defaults to the verb's default_model)."""
    from er_jax.io.registry import load_model

    model = args.model or (None if args.preset else getattr(args, "default_model", None))
    seed = getattr(args, "seed", 0) if seed is None else seed
    return load_model(model, args.dtype or default_dtype(), preset=args.preset, layers=args.layers, seed=seed,
                      weights=weights)


def costs(args, calib_costs=None):
    """The model's costs from --model / --preset when given, else from the calibration file."""
    from er_jax import controller

    if getattr(args, "model", None) or getattr(args, "preset", None):
        return controller.ModelCosts.from_config(load(args, weights=False).config, args.drafter)
    if calib_costs is None:
        raise ValueError("no model to cost: pass --model or --preset (or a calibration written by calibrate)")
    return calib_costs
