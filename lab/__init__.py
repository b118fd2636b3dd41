"""
The router lab's internals, behind the entry point bakeoff.py:

    analysis   the numbers of a trained run, from its log.jsonl and ckpt.pt
    report     a bake-off's results.md: its tables, and the claims below
    claims     the papers' claims decided on the numbers: trends, every claim a study can test
    verdict    the one rule that decides a claim, seed by seed (and the rule in words for a report)
    plots      the figures (`python -m lab.plots out-remoe out-topk --out=plots` for any train.py runs)

They read what train.py writes and never train anything themselves.
"""
