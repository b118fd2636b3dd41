# Dense baseline on Shakespeare: the same model with one SwiGLU per block and no experts.
# Hardware: 2 CPU cores, about 6 minutes (python train.py config/dense.py).
# ffn_hidden = top_k * ffn_hidden of configs/topk.py, so both have the same active parameters per token.
out_dir = 'out-dense'
eval_interval = 100
eval_iters = 10
max_iters = 300
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512
moe_every = 0
