"""`er-jax`: the command line, every verb in one package (generate, train, sweep, calibrate, validate, predict,
plot, bench). Each module registers its verbs on the parser; `main` runs one and turns a ValueError into a
one-line error and exit status 2."""
from __future__ import annotations

import argparse
import sys

from er_jax import xla_cache
from er_jax.cli import bench, calibrate, generate, train


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="er-jax", description="System-aware self-speculative decoding for RL rollouts")
    sub = p.add_subparsers(dest="command", required=True)
    generate.register(sub)
    train.register(sub)  # GRPO
    calibrate.register(sub)  # sweep, calibrate, validate, predict, plot
    bench.register(sub)  # bench rollout
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    xla_cache.enable()  # warm-ups compile once per machine ($ER_JAX_XLA_CACHE: a directory, or "off")
    try:
        return args.fn(args)
    except ValueError as e:
        print(f"er-jax: error: {e}", file=sys.stderr)
        return 2

