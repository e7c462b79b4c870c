# WFC on tiny-shakespeare characters: the default research config (see RESULTS.md for how it was chosen).
# Same blocks and data as the GPT baseline (4 x 128, block 64, batch 12), pinned attention, rotary
# positions, n_future future slots refined by the weight-tied stack.
#   python train.py config/train_shakespeare_char_wfc.py
include('train_shakespeare_char_gpt.py')
out_dir = 'out-shakespeare-char-wfc'
pos_emb = 'rope'
n_future = 4
attn = 'pinned'
dist_power = 1.0
past_loss = 1.0
