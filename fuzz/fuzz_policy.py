"""atheris target ``policy``: path canonicalisation, policy compilation, forwarded certificates and decisions.

Run through ``python -m fuzz`` (bounded, with the seed corpus), or directly with libFuzzer flags:
``python -m fuzz.fuzz_policy -max_total_time=60 /tmp/work fuzz/corpus/policy``.
"""

from fuzz._entry import main

if __name__ == "__main__":
    main("policy")
