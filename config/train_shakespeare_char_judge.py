# The judge: a larger GPT trained longer on the same characters. eval.py scores generated samples
# with it (mean NLL per token), a measure of sample quality that does not trust the sampling
# model's own likelihood. 6 layers x 256 wide, block 128, dropout 0.1.
# 2-core AMD EPYC CPU (2026-11): about 25 minutes alone; its val loss is in RESULTS.md.
#   python train.py config/train_shakespeare_char_judge.py
out_dir = 'out-shakespeare-char-judge'
dataset = 'shakespeare_char'
eval_interval = 500
eval_iters = 40
log_interval = 100
always_save_checkpoint = False

gradient_accumulation_steps = 1
batch_size = 16
block_size = 128

n_layer = 6
n_head = 8
n_embd = 256
dropout = 0.1

learning_rate = 1e-3
max_iters = 2500
lr_decay_iters = 2500
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100
