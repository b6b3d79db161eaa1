"""Convert checkpoints to and from Hugging Face format; the same code as ``megatron-lite convert``.

python tools/convert_checkpoint.py to-hf --checkpoint runs/default/checkpoints --out hf/my-model
python tools/convert_checkpoint.py to-hf --checkpoint CKPT --step 1000 --out OUT --max-shard-size 2GB
python tools/convert_checkpoint.py from-hf --hf path/to/Llama-2-7b-hf --out ckpt/llama2
python tools/convert_checkpoint.py verify --checkpoint CKPT --hf OUT
"""

import sys

from megatron_lite.cli import main

if __name__ == "__main__":
    sys.exit(main(["convert", *sys.argv[1:]]))
