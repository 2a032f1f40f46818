"""A miniature replication of Li & Liang's claims on E2E (`make replicate`; docs/replication.md).

`lm`: a small BPE tokenizer and GPT-2 pretrained here as a plain language model; `splits`: the data
splits; `finetune`: full fine-tuning through the same loop as prefix-tuning; `serve_check`: served
output equals `prefixserve eval`'s greedy output; `run`: the whole experiment and its report.
"""
