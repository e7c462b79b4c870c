# The equal wall-clock comparison (issue: "does WFC beat GPT?"): GPT (nanoGPT's model), the GPT and
# the looped GPT with rotary positions (as the WFC configs use), WFC bidirectional, WFC pinned (the
# default WFC config), and the cheaper pinned WFC that trains the future stream on half of the
# blocks per step.
#   python compare.py --plan=research/plan_walltime.py --budget=600 --jobs=2 --threads=1 \
#       --judge=out-shakespeare-char-judge --out_dir=runs/walltime \
#       --variants=gpt,gpt_rope,looped_rope,wfc_bidirectional,wfc_pinned,wfc_pinned_frac50
VARIANTS = {
    'gpt_rope': ['config/train_shakespeare_char_gpt.py', '--pos_emb=rope'],
    'looped_rope': ['config/train_shakespeare_char_looped.py', '--pos_emb=rope'],
    'wfc_pinned_frac50': ['config/train_shakespeare_char_wfc_onepass.py', '--future_frac=0.5'],
    # depth at (about) equal FLOPs: two layers make a pinned WFC step cost what the 4-layer GPT's does;
    # six give the future more depth per pass
    'wfc_pinned_L2': ['config/train_shakespeare_char_wfc_onepass.py', '--n_layer=2'],
    'wfc_pinned_L6': ['config/train_shakespeare_char_wfc_onepass.py', '--n_layer=6'],
}
# Depth at equal FLOPs (those of the GPT's 300 s):
#   python compare.py --plan=research/plan_walltime.py --tables=flops --budget=300 --jobs=2 --threads=1 \
#       --judge=out-shakespeare-char-judge --variants=gpt,wfc_pinned_L2,wfc_pinned_L6 --out_dir=runs/flops_depth
# Longer budget, the rotary GPT against the default WFC:
#   python compare.py --plan=research/plan_walltime.py --budget=1200 --jobs=2 --threads=1 \
#       --judge=out-shakespeare-char-judge --variants=gpt_rope,wfc_pinned --out_dir=runs/walltime_long
