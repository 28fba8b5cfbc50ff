"""Adapters that make er_jax a component of other frameworks.

Each adapter lives in its own module and imports its framework, so importing one needs that framework
installed; er_jax itself never depends on any of them (`pip install "er-jax[tunix]"` for `er_jax.integrations.tunix`).
"""
