# RMoE on Shakespeare: top-2 of 8 experts, the router logits coming from a GRU shared by all
# layers that carries each token's routing state from layer to layer.
# Hardware: 2 CPU cores, about 7 minutes (python train.py config/rmoe.py).
# Same experts and active parameters per token as configs/topk.py, plus the recurrent router:
# rmoe_dim = 64 here (the paper's 128 is for d >= 352; this model has d = 128), +0.08M parameters.
out_dir = 'out-rmoe'
eval_interval = 100
eval_iters = 10
max_iters = 300
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 256
moe_every = 1
n_expert = 8
top_k = 2
router = 'topk'
recurrent_router = True
rmoe_dim = 64
router_renorm = True  # as RMoE's released code does
aux_loss_coef = 0.01
