# RMoE on Shakespeare (bytes): top-2 of 8 experts, the router logits coming from a GRU shared by
# all layers that carries each token's routing state from layer to layer.
# Hardware: 2 CPU cores, about 6 minutes (python train.py config/rmoe.py).
# configs/topk.py plus the recurrent router and nothing else: rmoe_dim = 64 here (the paper's 128 is
# for d >= 352; this model has d = 128). RMoE's released code also renormalises the kept gates
# (router_renorm=True); here they are not, as in the top-k baseline, so the GRU is the only difference.
out_dir = 'out-rmoe'
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
top_k = 2
router = 'topk'
recurrent_router = True
rmoe_dim = 64
aux_loss_coef = 0.01
router_lr_scale = 0.25  # the routers learn 4x slower: better val loss for top-k and ReMoE (README)
