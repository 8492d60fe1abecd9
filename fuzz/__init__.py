"""Fuzzing for the runner: atheris targets, their shared harness and the seed corpus builder.

``fuzz.harness`` holds everything the targets check and imports no atheris, so the regression tests
(``tests/fuzz``) replay crash files and seeds through exactly the same code. See ``fuzz/README.md``.
"""
