"""What the scripts stand on: checkpoints (checkpoint.py), token shards (dataloader.py), devices,
precision, compile and FLOPs (runtime.py) and tokenizers (tokenizer.py)."""
