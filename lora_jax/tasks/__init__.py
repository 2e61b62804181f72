"""Tasks: a model plus its data, loss and evaluation, selected by `config.task`.

Each module here provides `build(config, placer, workdir) -> Task` (see `task.py`):
`code_search` (the default: stdlib docstring -> code retrieval on MiniLM), `planted_rank`
(teacher/student with a planted rank-k update), `causal_lm` (a small decoder pretrained on the
stdlib, adapted to another corpus), `jsonl_classification` and `jsonl_sft` (the user's own data).
Helpers: `stdlib_functions` (the `ast` extractor), `retrieval` (pooling, InfoNCE, R@k/MRR),
`corpora` (byte-level corpora), `jsonl` (reading and checking JSONL files).
"""
