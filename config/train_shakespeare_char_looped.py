# Looped GPT baseline: the GPT baseline's 4 blocks applied twice (weight-tied, same parameters).
# Separates what looping buys from what future slots buy. Same recipe as the GPT config.
# 2-core AMD EPYC CPU (2026-11): about 3 minutes (two passes per step); see RESULTS.md for its loss.
#   python train.py config/train_shakespeare_char_looped.py
include('train_shakespeare_char_gpt.py')
out_dir = 'out-shakespeare-char-looped'
n_loop = 2
