"""atheris target ``codec``: FrameDecoder at fuzzer-chosen cut points, then every payload through every message decoder.

Run through ``python -m fuzz`` (bounded, with the seed corpus), or directly with libFuzzer flags:
``python -m fuzz.fuzz_codec -max_total_time=60 /tmp/work fuzz/corpus/codec``.
"""

from fuzz._entry import main

if __name__ == "__main__":
    main("codec")
