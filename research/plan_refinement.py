# The refinement screen: recipes meant to make the WFC fixed point pay (a prelude / looped core / coda
# sandwich, consistency losses, depth per sequence, exit rules), side by side with the one-pass WFC,
# the rotary GPT and looped GPTs of the same parameters, at equal iterations (2000) and at equal
# wall-clock (600 s). Evaluation: 64 validation windows, the loss after exactly K passes, exit at
# KL 1e-3 up to 64 passes, passes against entropy and against the slot's own loss.
#   python compare.py --plan=research/plan_refinement.py --tables=steps --steps=2000 --jobs=2 --threads=1 \
#       --calibration_rounds=0 --eval_windows=64 --eval_max_loop=64 --depths=1,2,4,8,16,32,64 \
#       --convergence=True --out_dir=runs/refinement --variants=gpt_rope,looped_rope,one_pass,default_old,...
# Seeds, depth and a longer run (RESULTS.md "What a pass can add"): the same with --seed=1337/1338/1339,
# --depths=1,2,4,8,64 and the variants gpt_rope,one_pass,sw_contract_u8,deep_gpt_rope,looped_sandwich_rope,
# looped4_sandwich_rope; --steps=4000 for gpt_rope,one_pass,sw_contract_u8,looped_sandwich_rope; and --steps=8000
# for gpt_rope,looped_sandwich_rope; sw_contract_past2 alone at seeds 1337 and 1338.
GPT = 'config/train_shakespeare_char_gpt.py'
ONE_PASS = 'config/train_shakespeare_char_wfc_onepass.py'
VARIANTS = {
    'gpt_rope': [GPT, '--pos_emb=rope'],                               # the GPT of the same blocks
    'looped_rope': [GPT, '--pos_emb=rope', '--n_loop=2'],              # the whole stack twice, same parameters
    'one_pass': [ONE_PASS],                                            # the one-pass WFC
    'default_old': [ONE_PASS, '--bound=rms', '--train_depth=8', '--loop_law=uniform', '--bptt=2', '--supervise=2',
                    '--max_loop=8'],                                   # last round's converging default
}
OLD = ['--bound=rms', '--train_depth=8', '--loop_law=uniform', '--bptt=2', '--supervise=2', '--max_loop=8']
SANDWICH = ['--n_prelude=1', '--n_coda=1']                                   # 1 prelude, a 2-block core, 1 coda
ALL4 = ['--bound=rms', '--train_depth=4', '--loop_law=uniform', '--bptt=0', '--supervise=4', '--max_loop=8']
VARIANTS.update({
    'looped_sandwich_rope': [GPT, '--pos_emb=rope', *SANDWICH, '--n_loop=2'],  # Huginn-style looped GPT: the core twice
    'sw_rms_u8': [ONE_PASS, *OLD, *SANDWICH],                               # last default's recipe on the sandwich
    'sw_contract_u8': [ONE_PASS, *OLD, *SANDWICH, '--inject=contract'],     # + Parcae's contractive injection
    'rms_u8_cons': [ONE_PASS, *OLD, '--bptt=4', '--consistency=1'],          # last default + consistency on 4 passes
    'sw_rms_u8_cons': [ONE_PASS, *OLD, *SANDWICH, '--bptt=4', '--consistency=1'],
    'rms_all4_cons': [ONE_PASS, *ALL4, '--consistency=1'],                   # loss on every pass of 1..4 + consistency
    'sw_rms_all4': [ONE_PASS, *ALL4, *SANDWICH],                            # the sandwich, loss on every pass of 1..4
    'sw_contract_row': [ONE_PASS, *OLD, *SANDWICH, '--inject=contract', '--depth_per=row'],  # a depth per sequence (Parcae)
    'sw_contract_cons': [ONE_PASS, *OLD, *SANDWICH, '--inject=contract', '--bptt=4', '--consistency=1'],
})
VARIANTS.update({
    # does compute per token pay at all at this scale? (each future pass of a WFC only adds compute: its
    # next-token slot sees no information a single pass could not read off the past)
    'deep_gpt_rope': [GPT, '--pos_emb=rope', '--n_layer=8'],                   # 8 unique blocks: 2x parameters
    'looped4_sandwich_rope': [GPT, '--pos_emb=rope', *SANDWICH, '--n_loop=4'],  # the core 4 times, same parameters
    'sw_contract_all4': [ONE_PASS, *ALL4, *SANDWICH, '--inject=contract'],     # the default, a loss on every pass of 1..4
    'sw_contract_past2': [ONE_PASS, *OLD, *SANDWICH, '--inject=contract', '--past_loss=2'],  # the default, the causal stream's loss x2
})
