# GPT baseline on tiny-shakespeare characters at nanoGPT's GPU recipe size (its
# config/train_shakespeare_char.py): 6 layers x 384 wide, 6 heads, block 256, batch 64, dropout 0.2,
# lr 1e-3 -> 1e-4 over 5000 iterations, compiled, the device and dtype picked automatically (cuda + bf16).
# Expected loss and time: not yet measured on a GPU (nanoGPT reports val 1.4697 in about 3 minutes on
# one A100; `python tools/gpu_check.py` measures ours at this shape for a few hundred iterations).
#   python train.py config/train_shakespeare_char_gpt_gpu.py
include('train_shakespeare_char_gpt.py')
out_dir = 'out-shakespeare-char-gpt-gpu'
eval_interval = 250
eval_iters = 200
log_interval = 10

batch_size = 64
block_size = 256
n_layer = 6
n_head = 6
n_embd = 384
dropout = 0.2

learning_rate = 1e-3
max_iters = 5000
lr_decay_iters = 5000
min_lr = 1e-4
beta2 = 0.99
warmup_iters = 100

device = 'auto'
dtype = 'auto'
compile = True
