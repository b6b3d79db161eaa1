"""Tokenize files, globs or JSONL into a ``.bin``/``.idx`` dataset; the same code as ``megatron-lite preprocess``.

python tools/preprocess_data.py --input 'corpus/*.txt' --tokenizer tok/my.model --output data/my
python tools/preprocess_data.py --input docs.jsonl --json-key content --tokenizer tok/my.model --output data/my
python tools/preprocess_data.py --input 'shards/*.jsonl.gz' --tokenizer tok/my.model --output data/my --workers auto
"""

import sys

from megatron_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["preprocess", *sys.argv[1:]]))
