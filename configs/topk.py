# Top-k softmax MoE on Shakespeare (bytes): 8 experts, 2 active per token, every block MoE.
# Hardware: 2 CPU cores, about 5 minutes (python train.py config/topk.py).
# Same active parameters per token as configs/dense.py, so the two compare at equal compute.
out_dir = 'out-topk'
dataset = 'shakespeare_char'  # UTF-8 bytes: the MoE layers, not a 50K-token embedding, hold the parameters
eval_interval = 150
eval_iters = 20
max_iters = 1500
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 256  # per expert; K * ffn_hidden = the dense config's 512
moe_every = 1
n_expert = 8
top_k = 2
router = 'topk'
aux_loss_coef = 0.01
router_lr_scale = 1.0  # the routers at the model's rate: better than x0.25 for top-k at 4 and 8 layers
# (0.0075 and 0.0040 nats per byte, 3 seeds each: results/rmoe-depth), as for RMoE
# the kept gates rescaled to sum to 1 (Mixtral, RMoE's code): 0.036 better val loss at step 600 (one seed,
# docs/rmoe-small-scale.md). ReMoE's own top-k baseline does not (pre-softmax): topk+router_renorm=False
router_renorm = True
