# Dense baseline on Shakespeare (bytes): the same model with one SwiGLU per block and no experts.
# Hardware: 2 CPU cores, about 4 minutes (python train.py config/dense.py).
# ffn_hidden = top_k * ffn_hidden of configs/topk.py, so both have the same active parameters per token.
out_dir = 'out-dense'
dataset = 'shakespeare_char'  # UTF-8 bytes: the MoE layers, not a 50K-token embedding, hold the parameters
eval_interval = 150
eval_iters = 20
max_iters = 1500
batch_size = 16
block_size = 128
n_layer = 4
n_head = 4
n_embd = 128
ffn_hidden = 512
moe_every = 0
