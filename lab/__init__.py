"""
The router lab's internals, behind the entry point bakeoff.py:

    analysis   the numbers of a trained run, from its log.jsonl and ckpt.pt
    report     a bake-off's results.md: tables, and the papers' claims checked against the numbers
    plots      the figures (`python -m lab.plots out-remoe out-topk --out=plots` for any train.py runs)

They read what train.py writes and never train anything themselves.
"""
