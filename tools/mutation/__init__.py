"""Mutation testing of the modules behind the README's guarantees (`python -m tools.mutation`): the
targets and their tests (targets.py), the equivalents table (equivalents.toml, equivalents.py), the run."""
