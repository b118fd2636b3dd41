# Expert prototyping (M6-T) on Shakespeare (bytes): 8 experts in 2 groups of 4, top-1 inside each
# group, the two outputs summed, their gates renormalised to sum to 1. Dropless here; --capacity_factor=1.25
# turns on M6-T's capacity and token dropping (dropped fractions appear in log.jsonl).
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/prototype.py).
# Same experts and active parameters per token as configs/topk.py.
out_dir = 'out-prototype'
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
top_k = 2  # groups
router = 'prototype'
aux_loss_coef = 0.01  # Switch loss inside each group
router_lr_scale = 1.0  # as configs/topk.py (top-1 routers in each group: x0.25 was top-k's rate)
# M6-T sums the groups' softmax probabilities as they are (router_renorm=False); renormalised, they beat
# that by 0.017 nats per byte here, 3 of 3 seeds (results/m6t-capacity), as top-k's do (0.025)
router_renorm = True
