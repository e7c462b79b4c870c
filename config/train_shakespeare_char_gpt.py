# GPT baseline on tiny-shakespeare characters: nanoGPT's CPU recipe (4 layers x 128 wide, 4 heads,
# block 64, batch 12, 2000 iterations). The reference every WFC run is compared with.
# 2-core AMD EPYC CPU (2026-11): about 1.5 minutes; val loss about 1.88 (nanoGPT itself: 1.886).
#   python train.py config/train_shakespeare_char_gpt.py
out_dir = 'out-shakespeare-char-gpt'
dataset = 'shakespeare_char'
eval_interval = 250
eval_iters = 20
log_interval = 100
always_save_checkpoint = False  # small data overfits: keep the best val

gradient_accumulation_steps = 1
batch_size = 12
block_size = 64

n_layer = 4
n_head = 4
n_embd = 128
dropout = 0.0

learning_rate = 1e-3
max_iters = 2000
lr_decay_iters = 2000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
