"""atheris target ``session``: a real Session (mtls-guard + a scriptable test plugin) fed the input.

Run through ``python -m fuzz`` (bounded, with the seed corpus), or directly with libFuzzer flags:
``python -m fuzz.fuzz_session -max_total_time=60 /tmp/work fuzz/corpus/session``.
"""

from fuzz._entry import main

if __name__ == "__main__":
    main("session")
