# ReMoE on Shakespeare (bytes): ReLU routing over 8 experts, held at 2 active per token on average by
# the load-balanced L1 penalty whose coefficient λ adapts online (target sparsity 1 - 2/8 = 0.75).
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/remoe.py). The first ~100 steps
# run denser than top-2 (ReMoE's stages I and II) and so a little slower.
# Same experts and active parameters per token as configs/topk.py.
out_dir = 'out-remoe'
dataset = 'shakespeare_char'  # UTF-8 bytes: the MoE layers, not a 50K-token embedding, hold the parameters
eval_interval = 150
eval_iters = 20
max_iters = 1500
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 256
moe_every = 1
n_expert = 8
top_k = 2  # the average the controller aims for
router = 'remoe'
remoe_lambda0 = 1e-8  # paper defaults
remoe_alpha = 1.2
# What holds the controller at this scale (docs/remoe-small-scale.md, 14 runs): at the full
# learning rate the routers' noisy updates push the sparsity above target faster than λ -> 0 can
# let it back (off ReLU gates get no gradient), λ falls to 1e-45 and experts die. A 4x lower router
# learning rate and a floor at λ0 settle it within ±0.025 from step ~430. (The other routers train at
# x1, better for top-k and RMoE at 3 seeds: results/rmoe-depth. ReMoE at x1 with the floor is not measured.)
router_lr_scale = 0.25
remoe_lambda_floor = True
