"""Train a sentencepiece BPE tokenizer; the same code as ``megatron-lite tokenizer train``.

python tools/train_tokenizer.py --input 'corpus/*.txt' --output tok/my --vocab-size 32000
python tools/train_tokenizer.py --input docs.jsonl --json-key content --output tok/my --vocab-size 8192
"""

import sys

from megatron_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["tokenizer", "train", *sys.argv[1:]]))
